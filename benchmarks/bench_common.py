"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the helpers above serve torch-free scripts (serving.py) too
    import torch


def git_commit() -> str:
    """The commit the figures belong to: ``GIT_COMMIT`` when set (a machine that has the files but
    stale or no git metadata), else ``git rev-parse --short HEAD``, else "unknown"."""
    if env := os.environ.get("GIT_COMMIT"):
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


RESULT_MARK = "BENCH-RESULT "


def run_child(script: str, config: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 3600,
              verbose: bool = False) -> dict[str, Any]:
    """Run ``script --child JSON`` in a fresh interpreter (nothing compiled, loaded or cached in
    this process reaches it) and return the dict it printed with :func:`child_result`.  Its
    stderr (the engine's log) is shown with ``verbose`` or when it fails."""
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(config)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    if verbose or proc.returncode:
        sys.stderr.write(proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{os.path.basename(script)} run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if not lines:
        raise RuntimeError(f"{os.path.basename(script)} run printed no result: {proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def child_result(result: dict[str, Any]) -> None:
    """Hand a child run's result to :func:`run_child` (one marked line on stdout)."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings end here); nothing to wait for on the CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def median_us(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median time of ``fn`` in microseconds: ``triton.testing.do_bench`` on CUDA, wall-clock
    repetitions elsewhere."""
    if device.type == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=10, rep=max(reps, 20), return_mode="median")) * 1e3
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Copy of ``nbytes``, bytes read + written per second, in GB/s."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    us = median_us(lambda: y.copy_(x), device, reps)
    return 2 * x.numel() * 4 / us / 1e3
