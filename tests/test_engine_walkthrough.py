"""The engine walkthrough (examples/engine_walkthrough.py) runs end to end and passes its checks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

from pagedattn.viz import Trace

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The pictures docs/walkthrough.md shows, one per concept plus the run's timelines.
PICTURES = (
    "walkthrough_1_prefix_shared.png", "walkthrough_2_growth.png", "walkthrough_3_cow_fork.png",
    "walkthrough_3_cow_copy.png", "walkthrough_4_swapped_out.png", "walkthrough_4_swapped_in.png",
    "walkthrough_5_window.png", "walkthrough_6_batched.png", "walkthrough_timeline.png",
    "walkthrough_window_timeline.png",
)
SCENES = ("1. Two requests share", "2. Growth", "3. Copy-on-write", "4. Offload", "5. Sliding window",
          "6. Batched decode")


def test_engine_walkthrough_runs_into_a_temp_dir_and_passes_its_checks(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "engine_walkthrough.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout and "FAILED" not in proc.stdout
    for scene in SCENES:
        assert scene in proc.stdout
    for name in PICTURES:
        png = tmp_path / "images" / name
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert png.stat().st_size < 200_000, name
        assert str(png) in proc.stdout  # the script says where it wrote each file
    for name in ("walkthrough_trace.html", "walkthrough_window_trace.html"):
        page = tmp_path / name
        assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
        assert page.stat().st_size < 1_000_000


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("engine_walkthrough", EXAMPLES / "engine_walkthrough.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_a_fact_missing_from_the_trace_fails_the_run(tmp_path: Path) -> None:
    """A run in which nothing was shared, copied, swapped or released must exit with 1."""
    ex = _load_example()
    ex.FAILURES.clear()
    trace = Trace({"num_blocks": 16, "num_cpu_blocks": 8, "block_size": 4}, [], {})
    idle = SimpleNamespace(forwards=[])
    metrics = {"prefix_cache_hit_tokens": 0, "num_cow_copies": 0, "num_swap_preemptions": 0}
    figs: list = []
    ex.scene_prefix_and_growth(idle, trace, tmp_path, ["0", "1"], figs, metrics)
    ex.scene_cow(idle, trace, "2", [], figs, metrics, metrics)
    ex.scene_swap(idle, trace, tmp_path, ["3", "4", "5"], figs, metrics, metrics)
    ex.scene_window(idle, trace, tmp_path, "0", figs)
    ex.scene_batched(idle, trace, tmp_path, ["6", "7", "8", "9"], figs)
    assert len(ex.FAILURES) == 5 and not figs
    assert ex.summary() == 1
    ex.FAILURES.clear()
    assert ex.summary() == 0
