"""HOPE's OpenAI-compatible HTTP server: sessions whose memories persist between requests.

`create_app(settings)` (server.app) builds the FastAPI application; `hope serve` (server.cli)
runs it under uvicorn. The engine (hope_core) knows nothing of HTTP or storage; this package
adds the transaction around each request (sessions.py), the stores (stores/), the HTTP routes
(routers/) and metrics (metrics.py).
"""
