"""`hope <command>`: dispatch to the part of the project that owns the command.

The model package never imports the server; this thin entry point imports whichever the
command needs, so `hope train` works without the web stack loaded.
"""

from __future__ import annotations

import os
import sys

import tomllib

COMMANDS = {
    "train": ("hope_core.train", "pre-train the slow weights (HOPE.md 2.3)"),
    "eval": ("hope_core.evaluate", "held-out loss, re-read gain, ablations, decode speed"),
    "serve": ("server.cli", "the OpenAI-compatible memory server"),
    "bench": ("bench.cli", "benchmarks: decode speed, concurrency, state I/O, baselines"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: hope <command> [options]\n\ncommands:\n{lines}", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    try:
        module.main(argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, OSError, tomllib.TOMLDecodeError) as e:
        # bad arguments, configs, paths: one line, not a traceback (HOPE_DEBUG=1 shows it)
        if os.environ.get("HOPE_DEBUG"):
            raise
        print(f"hope {argv[0]}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
