"""The `hope` command: one entry point for the model (train, eval) and the server (serve)."""
