"""The examples run end to end and pass their own checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_seed_walkthrough_runs_and_passes_its_checks() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "seed_walkthrough.py")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout
    assert "FAILED" not in proc.stdout
    # Each part of the walkthrough ran.
    for part in ("1. Two sequences share", "2. Copy-on-write", "3. Swap", "4. Batched decode", "5. Sliding window"):
        assert part in proc.stdout
