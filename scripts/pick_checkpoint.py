"""Rank the sweep's checkpoints by their `hope eval --json` results: `python scripts/pick_checkpoint.py RUN...`.

A run qualifies when learning on is not worse than learning off on held-out text; qualified runs
rank by re-read gain, the others after them by held-out loss. Prints the ranking as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(runs: list[str]) -> None:
    rows = []
    for run in runs:
        path = Path(run) / "eval.json"
        try:
            r = json.loads(path.read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            print(f"{run}: no evaluation", file=sys.stderr)
            continue
        ok = r["heldout_loss_learn"] <= r["heldout_loss_frozen"]
        rows.append({"run": run, "qualifies": ok, "reread_gain": r["reread_gain"],
                     "heldout_loss_learn": r["heldout_loss_learn"], "heldout_loss_frozen": r["heldout_loss_frozen"]})
    rows.sort(key=lambda x: (not x["qualifies"], -x["reread_gain"] if x["qualifies"] else x["heldout_loss_learn"]))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
