"""`hope serve`: run the server under uvicorn. Flags override the `HOPE_*` environment."""

from __future__ import annotations

import argparse
import logging
import sys

from hope_core import logs as hope_logs


def configure_logging(level: str) -> None:
    hope_logs.configure_logging(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hope serve", description="Serve HOPE with an OpenAI-compatible API. "
                                "Every flag has a HOPE_* environment variable (e.g. HOPE_PORT); "
                                "HOPE_API_KEYS='tenant:key,...' turns on authentication.")
    p.add_argument("--host", help="address to listen on (HOPE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (HOPE_PORT, default 8000)")
    p.add_argument("--checkpoint", help="checkpoint directory (HOPE_CHECKPOINT, default: the bundled one)")
    p.add_argument("--store", help="memory://, sqlite:///path or redis://host:port/db "
                   "(HOPE_STORE, default sqlite in ~/.local/share/hope)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (HOPE_DEVICE, default auto)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="HOPE_LOG_LEVEL, default info")
    p.add_argument("--busy-policy", choices=["wait", "reject"], help="a request on a busy session waits or "
                   "gets 409 (HOPE_BUSY_POLICY, default wait)")
    p.add_argument("--max-concurrent-requests", type=int, help="HOPE_MAX_CONCURRENT_REQUESTS, default 64")
    p.add_argument("--session-ttl", type=float, dest="session_ttl_s",
                   help="seconds a session lives without use, 0 forever (HOPE_SESSION_TTL_S)")
    p.add_argument("--state-dtype", choices=["float32", "bfloat16"], help="HOPE_STATE_DTYPE, default float32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    from pydantic import ValidationError

    from server.settings import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        sys.exit(f"hope serve: invalid settings:\n{e}")
    configure_logging(settings.log_level)

    import torch
    import uvicorn

    from hope_core.checkpoint import DEFAULT_CHECKPOINT, check_device
    from server.app import create_app, load_engine

    if settings.checkpoint is None and not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        sys.exit(f"hope serve: the bundled checkpoint is missing ({DEFAULT_CHECKPOINT}); "
                 "pass --checkpoint DIR or train one with `hope train --config configs/bundled.toml`")
    # The device and the checkpoint are checked and loaded here, before uvicorn: a failure in the
    # app's lifespan would come out as a traceback inside a log line and exit 3. Here the
    # ValueError or OSError reaches hope.cli: one line `hope serve: error: ...`, exit 2.
    device = check_device(settings.resolved_device())
    # "one per core" is torch's count before load_engine leaves this thread at one (the
    # scheduler's thread then sets this count for itself)
    settings = settings.model_copy(update={"threads": settings.threads or torch.get_num_threads()})
    engine = load_engine(settings, "cpu" if settings.engine_process else device)
    uvicorn.run(create_app(settings, engine), host=settings.host, port=settings.port, log_config=None,
                log_level="debug" if settings.log_level == "debug" else "warning",
                access_log=settings.log_level == "debug", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
