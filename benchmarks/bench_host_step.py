"""The engine's host work per step, without a device: every step's forward is replaced by random
tokens, so what is timed is what the CPU does around it (schedule, step build, host batch,
launch bookkeeping, output processing).  On a GPU this work overlaps the device's step only
while it is the shorter of the two (``profile_steps.py``'s "waiting on the device" column).

    python benchmarks/profile_steps.py ...            # the same workloads on a GPU
    python benchmarks/bench_host_step.py [--workload family|throughput] [--out host.json]
    python benchmarks/bench_host_step.py --smoke      # a few seconds (CI)

The workloads are ``profile_steps.py``'s (Qwen3-0.6B's vocabulary and batch limits; the model is
a one-layer stand-in that never runs).  Each row of the table is one band of steps by batch size:
the median milliseconds of each phase and of the whole ``engine.step``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from bench_common import git_commit
from bench_throughput import QWEN3_0_6B
from profile_steps import DECODE_BANDS, add_workload_args, check_workload_args, requests, stand_in

PHASES = ("schedule", "build", "host_batch", "launched", "process", "end_step", "step")


def fake_forward(engine: Any, seed: int = 0) -> None:
    """Replace the device's step with random tokens (or logits, for a step that samples on the
    host); the host batch and input ids are still made, as the runner makes them."""
    from pagedattn.runtime.model_runner import StepOutput

    runner = engine.executor.worker.runner
    vocab = engine.arch.vocab_size
    gen = torch.Generator().manual_seed(seed)

    def execute(step: Any, prev: torch.Tensor | None = None) -> Any:
        runner.run_kv_ops(step.kv_ops)
        if step.is_empty:
            return StepOutput.empty(step, runner.device)
        runner.host_batch(step)
        runner.input_ids(step, prev)
        rows = len(step.sample_rows)
        if step.greedy:
            return StepOutput(tokens=torch.randint(0, vocab, (rows,), generator=gen))
        return StepOutput(logits=torch.randn(rows, vocab, generator=gen))

    engine.executor.execute = execute


def time_phases(engine: Any) -> tuple[dict[str, list[float]], Callable[[], int]]:
    """Wrap each phase to record its wall time per step; returns the records and a function that
    runs one timed step and gives its batch size."""
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    rows = [0]

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrap(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name].append(time.perf_counter() - t)
        return wrap

    schedule = engine.scheduler.schedule

    def counted_schedule() -> Any:
        out = schedule()
        rows[0] = -1 if any(s.num_new_tokens > 1 for s in out.scheduled) else len(out.scheduled)
        return out

    engine.scheduler.schedule = timed("schedule", counted_schedule)
    engine.scheduler.launched = timed("launched", engine.scheduler.launched)
    engine.step_builder.build = timed("build", engine.step_builder.build)
    runner = engine.executor.worker.runner
    runner.host_batch = timed("host_batch", runner.host_batch)
    engine._process = timed("process", engine._process)
    engine._end_step = timed("end_step", engine._end_step)
    step = timed("step", engine.step)

    def one() -> int:
        n = {p: len(v) for p, v in times.items()}
        step()
        for p, v in times.items():  # a phase the step skipped counts as 0
            if len(v) == n[p]:
                v.append(0.0)
        return rows[0]

    return times, one


def band_of(rows: int) -> str:
    if rows < 0:
        return "with prompt tokens"
    return next(name for lo, name in DECODE_BANDS if rows >= lo) if rows else "nothing scheduled"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_workload_args(ap, "family")
    ap.add_argument("--stream", action="store_true", help="every request reports its output at every step "
                    "(as the server's streaming requests do), not only when it finishes")
    ap.add_argument("--smoke", action="store_true", help="a tiny workload (seconds)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    check_workload_args(args)
    torch.set_num_threads(1)

    from pagedattn import LLM, SamplingParams

    folder = Path(tempfile.mkdtemp(prefix="host-step-"))
    stand_in(folder, QWEN3_0_6B)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    prompts, outs = requests(args, vocab)
    bs = 16
    llm = LLM(str(folder), device="cpu", enable_prefix_caching=args.workload == "family" and not args.no_caching,
              block_size=bs, max_num_seqs=256, max_num_batched_tokens=16384, async_scheduling=True,
              max_model_len=max(map(len, prompts)) + max(outs) + 16,
              num_kv_blocks=sum(-(-(len(p) + n) // bs) for p, n in zip(prompts, outs)) + 64)
    engine = llm.engine
    fake_forward(engine)
    for p, n in zip(prompts, outs):
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), stream=args.stream)
    times, step = time_phases(engine)
    bands: list[str] = []
    while engine.has_unfinished_requests():
        bands.append(band_of(step()))
    table: dict[str, dict[str, float]] = {}
    for band in dict.fromkeys(bands):
        idx = [i for i, b in enumerate(bands) if b == band]
        table[band] = {"steps": len(idx), **{p: 1e3 * statistics.median(times[p][i] for i in idx) for p in PHASES}}
    res = {"workload": args.workload, "requests": len(prompts), "commit": git_commit(), "num_steps": len(bands),
           "prefix_caching": engine.config.enable_prefix_caching, "stream": args.stream, "bands_ms": table}
    print(f"{args.workload}, {len(prompts)} requests{', streaming' if args.stream else ''}, the forward replaced by "
          f"random tokens (commit {res['commit']}); median ms per step")
    print("| steps | count | " + " | ".join(PHASES) + " |")
    print("| --- " * (len(PHASES) + 2) + "|")
    for band, r in table.items():
        print(f"| {band} | {r['steps']:.0f} | " + " | ".join(f"{r[p]:.3f}" for p in PHASES) + " |")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
