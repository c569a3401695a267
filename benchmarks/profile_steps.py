"""Where a run's time goes, step by step: each engine step's wall time, charged to the batch it
waited for and grouped by kind (steps with prompt tokens; decodes by batch size), against the
step's bound: the larger of the time to read the weights and the batch's K/V once at the copy
bandwidth (the per-step roofline of ``bench_throughput.py``) and the time of its matmul and
attention FLOPs at the bfloat16 matmul rate measured in the same run.

    python benchmarks/profile_steps.py [--workload throughput|family] [--out steps.json]
    python benchmarks/profile_steps.py --device cpu --smoke --model-dir DIR   # a CPU check
    python benchmarks/profile_steps.py --replay [--workload family] --bandwidth-gbps 2999 --tflops 700

Workloads: ``throughput`` is ``bench_throughput.py``'s (256 requests, prompt and output lengths
uniform in 100..1024, greedy, EOS ignored); ``family`` is one point of ``bench_prefix_family.py``
(``--system-prompts`` system prompts of ``--prompt-len`` tokens, unique turns of 20..300 tokens,
outputs of 16..600, prefix caching on unless ``--no-caching``).  Qwen3-0.6B architecture with
random weights in bfloat16.  The engine warms up on 8 tiny requests (``bench_throughput.py``'s
``--warmup short``), then every request is added at once and the engine is stepped until idle.

With async scheduling a step launches its batch and then waits for the previous one, so its
time is charged to the batch that was in flight when it began (a step that left nothing in
flight before it, to "first launch"); a step that runs its batch synchronously is charged to
that batch.  A step's time spent waiting for the device (the wait for the batch in flight) is
shown beside it: a kind of step that hardly waits is bound by the host's work, not the GPU's.
The bound reads every K/V block the batch's attention needs once: a block that
several sequences share (a cached prefix) counts once, as cascade decode reads it.  FLOPs: two
per weight and new token in the decoder layers, two per LM-head weight and sampled row, and
four per head dimension, head and layer for each (new token, visible key) pair.  Decode steps
also show the padding of their CUDA-graph bucket.

``--replay`` needs no GPU: it runs the workload's schedule on the CPU through a one-layer
stand-in of the model (same vocabulary and batch limits: the scheduler's batches do not depend
on the model's weights or speed) and prints each kind's bound for the real model, costed from
its shapes at the given bandwidth and matmul rate: what a GPU run's table is compared with.
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
from bench_throughput import QWEN3_0_6B, copy_bandwidth, make_model, workload

DECODE_BANDS = ((128, "decode, batch >= 128"), (32, "decode, batch 32-127"), (8, "decode, batch 8-31"),
                (1, "decode, batch 1-7"))
KINDS = ("with prompt tokens", *(name for _, name in DECODE_BANDS), "first launch")


@dataclass
class Batch:
    """What one launched step held: its rows, whether any is a prompt chunk, the distinct K/V
    tokens its attention reads, its new tokens, its (new token, visible key) pairs and, for a
    decode, the CUDA-graph bucket it pads to."""

    rows: int
    prompt: bool
    kv_tokens: int
    new_tokens: int
    attn_pairs: int
    bucket: int | None

    @property
    def kind(self) -> str:
        if self.prompt:
            return KINDS[0]
        return next(name for lo, name in DECODE_BANDS if self.rows >= lo)


def distinct_kv_tokens(ends: list[tuple[list[int], int]], block_size: int) -> int:
    """Tokens of K/V in the distinct blocks that sequences with (block table, context length)
    ``ends`` read: a block shared by several counts once, with the most tokens any reads of it."""
    filled: dict[int, int] = {}
    for table, ctx in ends:
        for i, block in enumerate(table[:-(-ctx // block_size)]):
            filled[block] = max(filled.get(block, 0), min(block_size, ctx - i * block_size))
    return sum(filled.values())


Snapshot = list[tuple[Any, int, int]]  # per row: its block table (a copy), chunk start, new tokens


def snapshot_of(sched: Any, scheduler: Any) -> Snapshot:
    """What :func:`batch_of` needs of a scheduled step, copied as cheaply as possible: it is taken
    inside the timed step (tables change once it ends), so its cost counts as the engine's."""
    return [(scheduler.block_table(s.seq.seq_id)[:], s.start, s.num_new_tokens) for s in sched.scheduled]


def batch_of(snap: Snapshot, block_size: int, buckets: list[int] | None) -> Batch:
    rows = len(snap)
    prompt = any(n > 1 for _, _, n in snap)
    ends = [(table, start + n) for table, start, n in snap]
    new = sum(n for _, _, n in snap)
    # Causal: new token j of a chunk from ``start`` sees start + j + 1 keys.
    pairs = sum(n * start + n * (n + 1) // 2 for _, start, n in snap)
    bucket = None
    if buckets and not prompt and rows <= buckets[-1]:
        bucket = min(b for b in buckets if b >= rows)
    return Batch(rows, prompt, distinct_kv_tokens(ends, block_size), new, pairs, bucket)


Charged = tuple[float, float, Batch | None]  # a step's seconds, its seconds waiting on the device, its batch


def step_through(engine: Any) -> tuple[list[Charged], float]:
    """Step ``engine`` until idle; each step's seconds, the part of them spent waiting for the
    device, and the batch they are charged to, and the wall time of the whole loop.  A batch is
    snapshotted when it is scheduled (its block tables as its attention will read them) and
    described after the loop: working out its distinct K/V blocks inside the timed step would
    charge the profiler's own Python to the engine's host work."""
    graphs = getattr(engine.runner, "graphs", None)
    buckets = list(graphs.buckets) if graphs is not None else None
    scheduler = engine.scheduler
    orig = scheduler.schedule
    launched: list[Any] = []
    described: dict[int, Snapshot] = {}
    launched_all: list[Any] = []

    def schedule() -> Any:
        out = orig()
        launched.append(out)
        if not out.is_empty:
            described[id(out)] = snapshot_of(out, scheduler)
            launched_all.append(out)  # keeps each id unique while it is in ``described``
        return out

    executor = engine.executor
    wait_event = executor.wait_event
    waited = [0.0]

    def timed_wait(event: Any) -> None:
        t = time.perf_counter()
        wait_event(event)
        waited[0] += time.perf_counter() - t

    scheduler.schedule = schedule
    executor.wait_event = timed_wait
    raw: list[tuple[float, float, Snapshot | None]] = []
    try:
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            before = engine._inflight
            awaited = described[id(before.sched)] if before is not None else None
            launched.clear()
            waited[0] = 0.0
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            after = engine._inflight
            if after is not None and after is not before:  # its own batch left in flight
                raw.append((dt, waited[0], awaited))
            elif launched and not launched[-1].is_empty:  # ran its batch to the end
                raw.append((dt, waited[0], described[id(launched[-1])]))
            else:
                raw.append((dt, waited[0], awaited))
        wall = time.perf_counter() - t0
    finally:
        scheduler.schedule = orig
        executor.wait_event = wait_event
    block_size = engine.config.block_size
    return [(dt, w, None if snap is None else batch_of(snap, block_size, buckets)) for dt, w, snap in raw], wall


@dataclass
class Limits:
    """What a step's bound is made of: bytes per weight pass and per K/V token at ``bandwidth``
    (bytes/s); FLOPs per new token, per sampled row and per attention pair at ``flops`` (/s)."""

    weight_bytes: int
    kv_bytes_per_token: int
    bandwidth: float
    flops_per_token: int
    flops_per_row: int
    flops_per_pair: int
    flops: float

    def bound(self, b: Batch) -> float:
        read = (self.weight_bytes + self.kv_bytes_per_token * b.kv_tokens) / self.bandwidth
        work = (self.flops_per_token * b.new_tokens + self.flops_per_row * b.rows
                + self.flops_per_pair * b.attn_pairs) / self.flops
        return max(read, work)


def table(charged: list[Charged], wall: float, limits: Limits) -> dict[str, Any]:
    rows: dict[str, dict[str, float]] = {}
    for dt, wait, b in charged:
        kind = b.kind if b is not None else KINDS[-1]
        r = rows.setdefault(kind, {"steps": 0, "seconds": 0.0, "waiting_s": 0.0, "bound_s": 0.0, "graph_rows": 0,
                                   "padded_rows": 0})
        r["steps"] += 1
        r["seconds"] += dt
        r["waiting_s"] += wait
        if b is not None:
            r["bound_s"] += limits.bound(b)
            if b.bucket is not None:  # replayed from a CUDA graph of ``bucket`` rows
                r["graph_rows"] += b.rows
                r["padded_rows"] += b.bucket
    stepped = sum(dt for dt, _, _ in charged)
    return {"wall_s": wall, "steps_s": stepped, "outside_steps_s": wall - stepped,
            "bound_s": sum(r["bound_s"] for r in rows.values()),
            "kinds": {k: rows[k] for k in KINDS if k in rows}}


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The dense matmul rate (FLOP/s) of ``device`` in ``dtype``: the median of square products
    (8192 on a GPU, 1024 on a CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for _ in range(12):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / sorted(times[2:])[len(times[2:]) // 2]


def _flops(model: torch.nn.Module, vocab: int, hidden: int, layers: int, heads: int, head_dim: int
           ) -> dict[str, int]:
    """:class:`Limits`' FLOP counts of ``model`` (a tied head counts once): two per decoder-layer
    weight (all but the embedding and the LM head) and new token, two per LM-head weight and
    sampled row, four per head dimension, head and layer and attended pair."""
    params = {name: p.numel() for name, p in model.named_parameters()}
    embeds = sum(n for name, n in params.items() if "embed" in name or "lm_head" in name)
    return {"flops_per_token": 2 * (sum(params.values()) - embeds), "flops_per_row": 2 * vocab * hidden,
            "flops_per_pair": 4 * layers * heads * head_dim}


def limits_of(engine: Any, bandwidth: float, flops: float) -> Limits:
    arch = engine.arch
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    return Limits(weight_bytes, engine.kv_pool.spec.bytes_per_token, bandwidth, flops=flops,
                  **_flops(engine.model, arch.vocab_size, arch.hidden_size, arch.num_layers, arch.num_heads,
                           arch.head_dim))


def arch_limits(cfg: dict[str, Any], bandwidth: float, flops: float, dtype_bytes: int = 2) -> Limits:
    """:class:`Limits` of a Qwen3 model of config ``cfg`` with weights and K/V of ``dtype_bytes``
    bytes an element, from its shapes alone (built on the meta device)."""
    import transformers

    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg))
    layers, head_dim = cfg["num_hidden_layers"], cfg["head_dim"]
    weights = sum(p.numel() for p in model.parameters())  # a tied head counts once
    return Limits(weights * dtype_bytes, layers * cfg["num_key_value_heads"] * head_dim * 2 * dtype_bytes, bandwidth,
                  flops=flops, **_flops(model, cfg["vocab_size"], cfg["hidden_size"], layers,
                                        cfg["num_attention_heads"], head_dim))


def stand_in(folder: Path, cfg: dict[str, Any]) -> None:
    """A one-layer float32 model with ``cfg``'s vocabulary and context, written to ``folder``."""
    import transformers

    small = dict(cfg, num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small)).save_pretrained(folder)


def print_bounds(res: dict[str, Any]) -> None:
    print(f"{res['workload']} replayed on the CPU (commit {res['commit']}): {res['requests']} requests, "
          f"{res['output_tokens']} output tokens; bounds of {res['model']} at {res['copy_bandwidth_GBps']:.0f} GB/s "
          f"and {res['matmul_TFLOPs']:.0f} TFLOP/s")
    print("| steps of | steps | bound s | ms per step |")
    print("| --- | --- | --- | --- |")
    for kind, r in res["kinds"].items():
        print(f"| {kind} | {r['steps']} | {r['bound_s']:.3f} | {1e3 * r['bound_s'] / r['steps']:.2f} |")
    print(f"whole run: a bound of {res['bound_s']:.3f} s")


def print_table(res: dict[str, Any]) -> None:
    print(f"{res['workload']} on {res['device']} (commit {res['commit']}): {res['requests']} requests, "
          f"{res['output_tokens']} output tokens in {res['wall_s']:.2f} s; copy bandwidth "
          f"{res['copy_bandwidth_GBps']:.0f} GB/s")
    print("| steps charged to | steps | seconds | share of the run | ms per step | waiting on the device | bound s | "
          "time / bound | graph padding |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, r in res["kinds"].items():
        pad = f"{r['padded_rows'] / r['graph_rows'] - 1:.1%}" if r["graph_rows"] else "-"
        ratio = f"{r['seconds'] / r['bound_s']:.2f}x" if r["bound_s"] else "-"
        print(f"| {kind} | {r['steps']} | {r['seconds']:.3f} | {r['seconds'] / res['wall_s']:.1%} | "
              f"{1e3 * r['seconds'] / r['steps']:.2f} | {r['waiting_s'] / r['seconds']:.0%} | {r['bound_s']:.3f} | "
              f"{ratio} | {pad} |")
    print(f"| outside engine.step | - | {res['outside_steps_s']:.3f} | {res['outside_steps_s'] / res['wall_s']:.1%} "
          f"| - | - | - | - | - |")
    print(f"matmul rate {res['matmul_TFLOPs']:.0f} TFLOP/s; whole run: {res['wall_s']:.3f} s against a bound "
          f"of {res['bound_s']:.3f} s "
          f"({res['bound_s'] / res['wall_s']:.1%} of it)")


def requests(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    if args.workload == "throughput":
        n, lo, hi = (6, 4, 12) if args.smoke else (256, 100, 1024)
        return workload(n, lo, hi, vocab)
    w = dict(FULL)
    if args.smoke:
        w.update(num_requests=6, turn_min=2, turn_max=8, output_min=2, output_max=8)
    return chat_workload(args.system_prompts, args.prompt_len, w, vocab)


def add_workload_args(ap: argparse.ArgumentParser, default: str) -> None:
    """The workload options :func:`requests` reads (``bench_host_step.py`` takes them too)."""
    ap.add_argument("--workload", choices=("throughput", "family"), default=default)
    ap.add_argument("--system-prompts", type=int, default=2, help="family: system prompts")
    ap.add_argument("--prompt-len", type=int, default=1000, help="family: tokens of each system prompt")
    ap.add_argument("--no-caching", action="store_true", help="family: prefix caching off")


def check_workload_args(args: argparse.Namespace) -> None:
    if args.system_prompts < 1 or args.prompt_len < 1:
        raise ValueError("--system-prompts and --prompt-len must be at least 1")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_workload_args(ap, "throughput")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="a tiny workload on --model-dir (a CPU check)")
    ap.add_argument("--model-dir", default=None, help="a model folder instead of the random Qwen3-0.6B")
    ap.add_argument("--replay", action="store_true", help="the bounds of the random Qwen3-0.6B's steps, its "
                    "schedule run on the CPU through a one-layer stand-in (no GPU)")
    ap.add_argument("--bandwidth-gbps", type=float, default=None, help="--replay: the copy bandwidth to cost at")
    ap.add_argument("--tflops", type=float, default=None, help="--replay: the matmul rate to cost at")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    if args.replay:
        if args.bandwidth_gbps is None or args.tflops is None or args.model_dir is not None:
            raise ValueError("--replay needs --bandwidth-gbps and --tflops and builds its own stand-in model")
        args.device = "cpu"
    elif args.smoke != (args.model_dir is not None):
        raise ValueError("--smoke and --model-dir go together (a tiny workload on a given model)")
    check_workload_args(args)

    from pagedattn import LLM, SamplingParams

    folder = args.model_dir or tempfile.mkdtemp(prefix="qwen3-0.6b-random-")
    if args.replay:
        stand_in(Path(folder), QWEN3_0_6B)
    elif args.model_dir is None:
        make_model(Path(folder), torch.bfloat16)  # writes the folder; the HF model is dropped
    config = json.loads(Path(folder, "config.json").read_text())
    prompts, outs = requests(args, config["vocab_size"])
    engine_args: dict[str, Any] = {"device": args.device}
    if args.smoke:
        # the overlapped loop, as on a GPU
        engine_args.update(num_kv_blocks=256, block_size=4, swap_space_gib=0.01, async_scheduling=True)
    else:
        engine_args.update(max_model_len=max(map(len, prompts)) + max(outs) + 16, max_num_seqs=256,
                           max_num_batched_tokens=16384, gpu_memory_utilization=0.85)
    if args.replay:  # every request's blocks at once: no preemption, as on a GPU of this model's pool
        bs = engine_args.get("block_size", 16)
        engine_args.update(num_kv_blocks=sum(-(-(len(p) + n) // bs) for p, n in zip(prompts, outs)) + 64)
    caching = args.workload == "family" and not args.no_caching
    llm = LLM(folder, enable_prefix_caching=caching, **engine_args)
    rng = random.Random(1)
    warm = [[rng.randrange(100, config["vocab_size"] - 100) for _ in range(rng.randint(4, 32))] for _ in range(8)]
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    engine = llm.engine
    for p, n in zip(prompts, outs):
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), stream=False)
    charged, wall = step_through(engine)
    if args.replay:
        llm.shutdown()
        limits = arch_limits(QWEN3_0_6B, args.bandwidth_gbps * 1e9, args.tflops * 1e12)
        res = {"workload": args.workload, "model": "Qwen3-0.6B (bf16)", "commit": git_commit(),
               "date": time.strftime("%Y-%m-%d"), "requests": len(prompts), "output_tokens": sum(outs),
               "num_steps": len(charged), "copy_bandwidth_GBps": args.bandwidth_gbps, "matmul_TFLOPs": args.tflops,
               "prefix_caching": caching, **table(charged, wall, limits)}
        print_bounds(res)
        if args.out:
            args.out.write_text(json.dumps(res, indent=2))
        return res
    cuda = torch.device(args.device).type == "cuda"
    # On CUDA bench_throughput's measure, whose roofline this is; on the CPU a host copy.
    bandwidth = copy_bandwidth() if cuda else host_copy_gbps(torch.device("cpu"), 1 << 26, 9) * 1e9
    limits = limits_of(engine, bandwidth, matmul_flops(torch.device(args.device), torch.bfloat16 if cuda
                                                       else torch.float32))
    llm.shutdown()
    res = {"workload": args.workload, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "requests": len(prompts),
           "output_tokens": sum(outs), "longest_output": max(outs), "num_steps": len(charged),
           "copy_bandwidth_GBps": bandwidth / 1e9, "matmul_TFLOPs": limits.flops / 1e12,
           "weight_bytes": limits.weight_bytes, "kv_bytes_per_token": limits.kv_bytes_per_token,
           "prefix_caching": caching, **table(charged, wall, limits)}
    print_table(res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
