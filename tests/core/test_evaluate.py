"""`hope eval` at its edges: data it cannot use is a one-line error, not a crash after the work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hope import cli
from hope_core import data
from hope_core.evaluate import EvalConfig


def test_eval_on_held_out_text_too_short_for_a_window_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for source in EvalConfig().sources:
        data.TokenStream.from_tokens(np.arange(5, 300, dtype=np.uint16)).save(tmp_path / f"{source}-heldout.npy")
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--token-dir", str(tmp_path), "--quick", "--no-ablations"])
    assert info.value.code == 2
    assert "no window of" in capsys.readouterr().err
