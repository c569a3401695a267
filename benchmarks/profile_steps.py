"""Where a run's time goes, step by step: each engine step's wall time, charged to the batch it
waited for and grouped by kind (steps with prompt tokens; decodes by batch size), against the
time to read the weights and the batch's K/V once at the copy bandwidth (the per-step roofline
of ``bench_throughput.py``).

    python benchmarks/profile_steps.py [--workload throughput|family] [--out steps.json]
    python benchmarks/profile_steps.py --device cpu --smoke --model-dir DIR   # a CPU check

Workloads: ``throughput`` is ``bench_throughput.py``'s (256 requests, prompt and output lengths
uniform in 100..1024, greedy, EOS ignored); ``family`` is one point of ``bench_prefix_family.py``
(``--system-prompts`` system prompts of ``--prompt-len`` tokens, unique turns of 20..300 tokens,
outputs of 16..600, prefix caching on unless ``--no-caching``).  Qwen3-0.6B architecture with
random weights in bfloat16.  The engine warms up on 8 tiny requests (``bench_throughput.py``'s
``--warmup short``), then every request is added at once and the engine is stepped until idle.

With async scheduling a step launches its batch and then waits for the previous one, so its
time is charged to the batch that was in flight when it began (a step that left nothing in
flight before it, to "first launch"); a step that runs its batch synchronously is charged to
that batch.  The bound counts every live K/V byte of a batch once, shared prefixes included
(cascade decode reads a group's prefix once, so with caching on it is not a lower bound for
those steps).  Decode steps also show the padding of their CUDA-graph bucket.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_common import git_commit
from bench_moe import copy_bandwidth as host_copy_gbps
from bench_prefix_family import FULL, chat_workload
from bench_throughput import copy_bandwidth, make_model, workload

DECODE_BANDS = ((128, "decode, batch >= 128"), (32, "decode, batch 32-127"), (8, "decode, batch 8-31"),
                (1, "decode, batch 1-7"))
KINDS = ("with prompt tokens", *(name for _, name in DECODE_BANDS), "first launch")


@dataclass
class Batch:
    """What one launched step held: its rows, whether any is a prompt chunk, the K/V tokens
    its attention reads and, for a decode, the CUDA-graph bucket it pads to."""

    rows: int
    prompt: bool
    kv_tokens: int
    bucket: int | None

    @property
    def kind(self) -> str:
        if self.prompt:
            return KINDS[0]
        return next(name for lo, name in DECODE_BANDS if self.rows >= lo)


def batch_of(sched: Any, buckets: list[int] | None) -> Batch:
    rows = len(sched.scheduled)
    prompt = any(s.num_new_tokens > 1 for s in sched.scheduled)
    kv = sum(s.start + s.num_new_tokens for s in sched.scheduled)
    bucket = None
    if buckets and not prompt and rows <= buckets[-1]:
        bucket = min(b for b in buckets if b >= rows)
    return Batch(rows, prompt, kv, bucket)


def step_through(engine: Any) -> tuple[list[tuple[float, Batch | None]], float]:
    """Step ``engine`` until idle; each step's seconds and the batch they are charged to, and
    the wall time of the whole loop."""
    graphs = getattr(engine.runner, "graphs", None)
    buckets = list(graphs.buckets) if graphs is not None else None
    orig = engine.scheduler.schedule
    launched: list[Any] = []

    def schedule() -> Any:
        out = orig()
        launched.append(out)
        return out

    engine.scheduler.schedule = schedule
    charged: list[tuple[float, Batch | None]] = []
    try:
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            before = engine._inflight
            waited = batch_of(before.sched, buckets) if before is not None else None
            launched.clear()
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            after = engine._inflight
            if after is not None and after is not before:  # its own batch left in flight
                charged.append((dt, waited))
            elif launched and not launched[-1].is_empty:  # ran its batch to the end
                charged.append((dt, batch_of(launched[-1], buckets)))
            else:
                charged.append((dt, waited))
        wall = time.perf_counter() - t0
    finally:
        engine.scheduler.schedule = orig
    return charged, wall


def table(charged: list[tuple[float, Batch | None]], wall: float, weight_bytes: int, kv_bytes_per_token: int,
          bandwidth: float) -> dict[str, Any]:
    rows: dict[str, dict[str, float]] = {}
    for dt, b in charged:
        kind = b.kind if b is not None else KINDS[-1]
        r = rows.setdefault(kind, {"steps": 0, "seconds": 0.0, "bound_s": 0.0, "graph_rows": 0, "padded_rows": 0})
        r["steps"] += 1
        r["seconds"] += dt
        if b is not None:
            r["bound_s"] += (weight_bytes + kv_bytes_per_token * b.kv_tokens) / bandwidth
            if b.bucket is not None:  # replayed from a CUDA graph of ``bucket`` rows
                r["graph_rows"] += b.rows
                r["padded_rows"] += b.bucket
    stepped = sum(dt for dt, _ in charged)
    return {"wall_s": wall, "steps_s": stepped, "outside_steps_s": wall - stepped,
            "bound_s": sum(r["bound_s"] for r in rows.values()),
            "kinds": {k: rows[k] for k in KINDS if k in rows}}


def print_table(res: dict[str, Any]) -> None:
    print(f"{res['workload']} on {res['device']} (commit {res['commit']}): {res['requests']} requests, "
          f"{res['output_tokens']} output tokens in {res['wall_s']:.2f} s; copy bandwidth "
          f"{res['copy_bandwidth_GBps']:.0f} GB/s")
    print("| steps charged to | steps | seconds | share of the run | ms per step | bytes bound s | "
          "time / bound | graph padding |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, r in res["kinds"].items():
        pad = f"{r['padded_rows'] / r['graph_rows'] - 1:.1%}" if r["graph_rows"] else "-"
        ratio = f"{r['seconds'] / r['bound_s']:.2f}x" if r["bound_s"] else "-"
        print(f"| {kind} | {r['steps']} | {r['seconds']:.3f} | {r['seconds'] / res['wall_s']:.1%} | "
              f"{1e3 * r['seconds'] / r['steps']:.2f} | {r['bound_s']:.3f} | {ratio} | {pad} |")
    print(f"| outside engine.step | - | {res['outside_steps_s']:.3f} | {res['outside_steps_s'] / res['wall_s']:.1%} "
          f"| - | - | - | - |")
    print(f"whole run: {res['wall_s']:.3f} s against a bytes bound of {res['bound_s']:.3f} s "
          f"({res['bound_s'] / res['wall_s']:.1%} of it)")


def requests(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    if args.workload == "throughput":
        n, lo, hi = (6, 4, 12) if args.smoke else (256, 100, 1024)
        return workload(n, lo, hi, vocab)
    w = dict(FULL)
    if args.smoke:
        w.update(num_requests=6, turn_min=2, turn_max=8, output_min=2, output_max=8)
    return chat_workload(args.system_prompts, args.prompt_len, w, vocab)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--workload", choices=("throughput", "family"), default="throughput")
    ap.add_argument("--system-prompts", type=int, default=2, help="family: system prompts")
    ap.add_argument("--prompt-len", type=int, default=1000, help="family: tokens of each system prompt")
    ap.add_argument("--no-caching", action="store_true", help="family: prefix caching off")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="a tiny workload on --model-dir (a CPU check)")
    ap.add_argument("--model-dir", default=None, help="a model folder instead of the random Qwen3-0.6B")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    if args.smoke != (args.model_dir is not None):
        raise ValueError("--smoke and --model-dir go together (a tiny workload on a given model)")
    if args.system_prompts < 1 or args.prompt_len < 1:
        raise ValueError("--system-prompts and --prompt-len must be at least 1")

    from pagedattn import LLM, SamplingParams

    folder = args.model_dir or tempfile.mkdtemp(prefix="qwen3-0.6b-random-")
    if args.model_dir is None:
        make_model(Path(folder), torch.bfloat16)  # writes the folder; the HF model is dropped
    config = json.loads(Path(folder, "config.json").read_text())
    prompts, outs = requests(args, config["vocab_size"])
    engine_args: dict[str, Any] = {"device": args.device}
    if args.smoke:
        engine_args.update(num_kv_blocks=256, block_size=4, swap_space_gib=0.01)
    else:
        engine_args.update(max_model_len=max(map(len, prompts)) + max(outs) + 16, max_num_seqs=256,
                           max_num_batched_tokens=16384, gpu_memory_utilization=0.85)
    caching = args.workload == "family" and not args.no_caching
    llm = LLM(folder, enable_prefix_caching=caching, **engine_args)
    rng = random.Random(1)
    warm = [[rng.randrange(100, config["vocab_size"] - 100) for _ in range(rng.randint(4, 32))] for _ in range(8)]
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    engine = llm.engine
    for p, n in zip(prompts, outs):
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), stream=False)
    charged, wall = step_through(engine)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv_per_token = engine.kv_pool.spec.bytes_per_token
    cuda = torch.device(args.device).type == "cuda"
    # On CUDA bench_throughput's measure, whose roofline this is; on the CPU a host copy.
    bandwidth = copy_bandwidth() if cuda else host_copy_gbps(torch.device("cpu"), 1 << 26, 9) * 1e9
    llm.shutdown()
    res = {"workload": args.workload, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "requests": len(prompts),
           "output_tokens": sum(outs), "longest_output": max(outs), "num_steps": len(charged),
           "copy_bandwidth_GBps": bandwidth / 1e9, "weight_bytes": weight_bytes,
           "kv_bytes_per_token": kv_per_token, "prefix_caching": caching,
           **table(charged, wall, weight_bytes, kv_per_token, bandwidth)}
    print_table(res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
