"""KV-cache memory: slots held but unused, and how many sequences fit in a fixed budget.

(a) **Waste.**  bench_throughput's workload -- 256 requests, prompt and output lengths each
uniform in 100..1024 (random ids, seed 0), EOS ignored, temperature 0.6, the Qwen3-0.6B
architecture with random weights in bf16 -- runs through the engine with a tracer that, at the
end of every step, compares the KV slots held (GPU blocks held by live sequences x block_size)
with the tokens actually stored there (the sum of the live sequences' computed context
lengths).  Waste = 1 - stored / held, averaged over wall time and at its worst step.  For
reference, the same steps' waste had each live sequence reserved, contiguously, either
``max_model_len`` slots or exactly prompt + max_tokens (an oracle that knows output lengths).

(b) **Capacity.**  How many sequences of that length distribution fit in a KV budget (default
the K/V of 8192 x 64 tokens): a contiguous cache reserving the longest possible sequence (2 x
max-len) per sequence, or exactly prompt + output (oracle); paging, with every sequence at its
final length (worst case) and at its time-averaged length over its life (steady state); and
the engine itself given a pool of exactly that budget and more requests than fit: the number of
sequences it keeps on the GPU over the steps where memory is the limit.

Waste depends only on lengths and the block size, so ``--device cpu --smoke`` runs the same
code on a tiny model in seconds.

    python benchmarks/bench_memory.py [--budget-tokens 524288] [--out result.json]
    python benchmarks/bench_memory.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_prefix_cache import (
    add_engine_args,
    apply_smoke,
    engine_kwargs,
    free_device_memory,
    model_folder,
    resolve_device_dtype,
    run_info,
    sync,
    vocab_size,
)
from bench_throughput import workload

SMOKE = dict(num_requests=8, min_len=8, max_len=24, num_kv_blocks=64, budget_tokens=256, capacity_requests=24,
             capacity_steps=40)
MEMORY_BOUND_FILL = 0.9  # a step is memory-bound when requests queue and the pool is this full


@dataclass
class StepSample:
    """KV usage at the end of one engine step (GPU-resident sequences only)."""

    seconds: float  # wall time of the step
    seqs: int  # sequences holding GPU blocks
    held_slots: int  # distinct GPU blocks held x block_size
    stored_tokens: int  # sum of those sequences' computed context lengths
    reserved_max_len: int  # seqs x max_model_len: a contiguous cache's reservation
    reserved_oracle: int  # sum of prompt + max_tokens: a contiguous cache that knows output lengths
    queued: int  # requests waiting or swapped out


class KVUsageTracer:
    """An engine tracer (``engine.attach_tracer``) sampling KV usage at the end of every step."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.samples: list[StepSample] = []
        self.num_preemptions = 0
        self._bm: Any = None
        self._t0 = 0.0

    def attach(self, bm: Any) -> None:
        self._bm = bm

    def begin_step(self, step: int) -> None:
        self._t0 = time.perf_counter()

    def end_step(self, step: int, stats: dict[str, Any]) -> None:
        self.samples.append(self._sample(time.perf_counter() - self._t0, stats))

    def event(self, kind: str, **fields: Any) -> None:
        if kind == "preempt":
            self.num_preemptions += 1

    def _sample(self, seconds: float, stats: dict[str, Any]) -> StepSample:
        bm, eng = self._bm, self.engine
        # num_computed_tokens counts the positions a step still in flight (async scheduling) is
        # writing now.
        seqs = stored = oracle = 0
        for req in eng.scheduler.running:  # running requests are the GPU-resident ones
            for seq in req.seqs:
                if bm.has_seq(seq.seq_id):
                    seqs += 1
                    stored += seq.num_computed_tokens
                    oracle += min(seq.prompt_len + (req.params.max_tokens or eng.max_model_len), eng.max_model_len)
        return StepSample(seconds, seqs, stats["blocks_used"] * bm.block_size, stored, seqs * eng.max_model_len,
                          oracle, stats["waiting"] + stats["swapped"])


# ====================================================================== (a) waste
def waste_summary(samples: Sequence[StepSample]) -> dict[str, Any]:
    """Waste fractions over the steps that held any KV, time-weighted and worst."""
    rows = [s for s in samples if s.held_slots > 0]
    if not rows:
        raise RuntimeError("no step held any KV block")
    t = np.array([s.seconds for s in rows])
    stored = np.array([s.stored_tokens for s in rows], dtype=np.float64)

    def waste(reserved: list[int]) -> np.ndarray:
        return 1.0 - stored / np.array(reserved, dtype=np.float64)

    paged = waste([s.held_slots for s in rows])
    worst = int(paged.argmax())
    return {
        "steps": len(rows),
        "paged_time_avg": float((paged * t).sum() / t.sum()),
        "paged_step_avg": float(paged.mean()),
        "paged_worst": float(paged[worst]),
        "paged_worst_step_seqs": rows[worst].seqs,
        "paged_best": float(paged.min()),  # below 0 only if sequences share blocks (prefix caching)
        "contiguous_max_len_time_avg": float((waste([s.reserved_max_len for s in rows]) * t).sum() / t.sum()),
        "contiguous_oracle_time_avg": float((waste([s.reserved_oracle for s in rows]) * t).sum() / t.sum()),
        "peak_seqs": max(s.seqs for s in rows),
        "peak_held_slots": max(s.held_slots for s in rows),
    }


def run_waste(folder: Path, args: argparse.Namespace, device: torch.device, dtype: str) -> dict[str, Any]:
    """bench_throughput's workload through ``LLM.generate`` with the tracer attached."""
    from pagedattn import LLM, SamplingParams

    prompts, outs = workload(args.num_requests, args.min_len, args.max_len, vocab_size(folder))
    llm = LLM(str(folder), max_model_len=2 * args.max_len, max_num_seqs=args.max_num_seqs,
              **engine_kwargs(args, device, dtype))
    # Warm-up over more prompt tokens than one step takes, so chunked prefill is compiled too
    # (compilation inside the timed run would inflate the time weight of the first steps).
    llm.generate(prompts[:64], SamplingParams(temperature=0.6, max_tokens=4, ignore_eos=True), use_tqdm=False)
    tracer = KVUsageTracer(llm.engine)
    llm.engine.attach_tracer(tracer)
    params = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True) for o in outs]
    sync(device)
    t = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    seconds = time.perf_counter() - t
    n_out = sum(len(r.outputs[0].token_ids) for r in res)
    kv_blocks = llm.get_metrics()["kv_blocks_total"]
    samples, preemptions = tracer.samples, tracer.num_preemptions
    del llm, res, tracer  # the tracer references the engine: drop both before freeing its pool
    free_device_memory()
    return {**waste_summary(samples), "kv_blocks_total": kv_blocks, "num_preemptions": preemptions,
            "seconds": seconds, "output_tok_per_s": n_out / seconds}


# ====================================================================== (b) capacity
def cdiv(a: np.ndarray, b: int) -> np.ndarray:
    return -(-a // b)


def capacity_model(prompt_lens: Sequence[int], out_lens: Sequence[int], budget: int, block_size: int,
                   contiguous_len: int) -> dict[str, float]:
    """Expected sequences in ``budget`` KV slots for each layout, from the length distribution."""
    p = np.asarray(prompt_lens, dtype=np.int64)
    o = np.asarray(out_lens, dtype=np.int64)
    final = p + o
    paged_final = cdiv(final, block_size) * block_size
    # Over its life a sequence decodes o steps, holding blocks for p + k + 1 tokens at step k.
    # A running batch samples sequences in proportion to their lifetime, hence weights o.
    held_over_life = np.array([(cdiv(pi + np.arange(1, oi + 1), block_size) * block_size).sum()
                               for pi, oi in zip(p, o)], dtype=np.float64)
    paged_steady = held_over_life.sum() / o.sum()
    per_seq = {
        "contiguous_max_len": float(contiguous_len),
        "contiguous_oracle": float(final.mean()),
        "paged_final": float(paged_final.mean()),
        "paged_steady": float(paged_steady),
    }
    return {k: {"slots_per_seq": v, "seqs": budget / v} for k, v in per_seq.items()}


def measure_capacity(folder: Path, args: argparse.Namespace, device: torch.device, dtype: str) -> dict[str, Any]:
    """Give the engine a pool of exactly ``budget_tokens`` and more requests than fit; count the
    sequences it keeps on the GPU over the memory-bound steps."""
    from pagedattn import LLM, SamplingParams

    prompts, outs = workload(args.capacity_requests, args.min_len, args.max_len, vocab_size(folder), seed=1)
    num_blocks = args.budget_tokens // args.block_size
    free_device_memory()  # the previous engine's pool must be gone before this one is allocated
    kw = {**engine_kwargs(args, device, dtype), "num_kv_blocks": num_blocks}
    llm = LLM(str(folder), max_model_len=2 * args.max_len, max_num_seqs=args.capacity_requests, **kw)
    eng = llm.engine
    tracer = KVUsageTracer(eng)
    eng.attach_tracer(tracer)
    for p, o in zip(prompts, outs):
        eng.add_request({"prompt_token_ids": p}, SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True),
                        stream=False)
    for _ in range(args.capacity_steps):
        if not eng.has_unfinished_requests():
            break
        eng.step()
    for rid in list(eng.requests):
        eng.abort_request(rid)
    samples, preemptions = tracer.samples, tracer.num_preemptions
    del llm, eng, tracer
    free_device_memory()
    # Skip the first max_len steps: until the first wave of requests can have finished, every
    # sequence is young (short), so more fit than in the steady state.
    full = MEMORY_BOUND_FILL * num_blocks * args.block_size
    bound = [s for s in samples[args.max_len:] if s.queued and s.held_slots >= full]
    seqs = [s.seqs for s in bound]
    return {
        "num_kv_blocks": num_blocks, "steps": len(samples), "memory_bound_steps": len(bound),
        "seqs_mean": float(np.mean(seqs)) if seqs else None, "seqs_min": min(seqs, default=None),
        "seqs_max": max(seqs, default=None), "seqs_peak_any_step": max((s.seqs for s in samples), default=0),
        "num_preemptions": preemptions,
        "waste_memory_bound_time_avg": waste_summary(bound)["paged_time_avg"] if bound else None,
        "seqs_per_step": [s.seqs for s in samples],
    }


# ====================================================================== report
def check_args(args: argparse.Namespace) -> None:
    for name in ("num_requests", "min_len", "budget_tokens", "capacity_requests", "max_num_seqs"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.capacity_steps <= args.max_len:
        raise ValueError(f"capacity_steps ({args.capacity_steps}) must exceed max_len ({args.max_len}): "
                         "the first max_len steps are not measured")
    if args.max_len < args.min_len:
        raise ValueError(f"max_len ({args.max_len}) must be >= min_len ({args.min_len})")
    if args.budget_tokens < 2 * args.max_len:
        raise ValueError(f"budget_tokens ({args.budget_tokens}) must hold at least one sequence of "
                         f"2 x max_len = {2 * args.max_len} tokens")


def kv_bytes_per_token(folder: Path, dtype: str) -> int:
    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * (4 if dtype == "float32" else 2)


def print_tables(result: dict[str, Any], args: argparse.Namespace) -> None:
    w, cap = result["waste"], result["capacity"]
    print(f"\nKV memory on {result['device']} ({result['date']}, commit {result['commit']}), block size "
          f"{args.block_size}")
    print(f"(a) {args.num_requests} requests, prompt and output lengths uniform in {args.min_len}..{args.max_len}: "
          f"{w['steps']} steps, up to {w['peak_seqs']} sequences, {w['num_preemptions']} preemptions")
    print(f"{'reservation':40s} {'waste, time avg':>15s} {'worst step':>10s}")
    print(f"{'paged (blocks held)':40s} {w['paged_time_avg']:15.2%} {w['paged_worst']:10.2%}")
    print(f"{'contiguous, exact prompt+output (oracle)':40s} {w['contiguous_oracle_time_avg']:15.2%} {'':>10s}")
    print(f"{'contiguous, max_model_len per sequence':40s} {w['contiguous_max_len_time_avg']:15.2%} {'':>10s}")
    gib = result["budget_bytes"] / (1 << 30)
    print(f"(b) sequences in a budget of {args.budget_tokens} tokens ({gib:.1f} GiB of K/V at "
          f"{result['kv_bytes_per_token']} B/token)")
    print(f"{'layout':40s} {'slots/seq':>10s} {'sequences':>10s}")
    names = {"contiguous_max_len": f"contiguous, {2 * args.max_len} per sequence",
             "contiguous_oracle": "contiguous, exact prompt+output (oracle)",
             "paged_final": "paged, every sequence at final length", "paged_steady": "paged, steady state (model)"}
    for key, label in names.items():
        print(f"{label:40s} {cap['model'][key]['slots_per_seq']:10.0f} {cap['model'][key]['seqs']:10.0f}")
    e = cap["engine"]
    seqs = f"{e['seqs_mean']:.0f} ({e['seqs_min']}..{e['seqs_max']})" if e["seqs_mean"] else "-"
    print(f"{'paged, engine, memory-bound steps':40s} {'':>10s} {seqs:>10s}")
    print(f"    engine: {e['memory_bound_steps']} memory-bound steps of {e['steps']} (after step {args.max_len}), "
          f"{e['num_preemptions']} preemptions; paging vs contiguous max_model_len: "
          f"{(e['seqs_mean'] or 0) / cap['model']['contiguous_max_len']['seqs']:.2f}x sequences")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--budget-tokens", type=int, default=8192 * 64, help="KV budget of part (b), in tokens")
    ap.add_argument("--capacity-requests", type=int, default=2048, help="requests offered to the engine in (b)")
    ap.add_argument("--capacity-steps", type=int, default=1600,
                    help="engine steps to run in (b); those after the first max-len steps are measured")
    add_engine_args(ap)
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    check_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device, dtype = resolve_device_dtype(args)
    folder = model_folder(args, device)
    waste = run_waste(folder, args, device, dtype)
    prompts, outs = workload(args.num_requests, args.min_len, args.max_len, vocab_size(folder))
    model = capacity_model([len(p) for p in prompts], outs, args.budget_tokens, args.block_size, 2 * args.max_len)
    engine = measure_capacity(folder, args, device, dtype)
    per_tok = kv_bytes_per_token(folder, dtype)
    result = {
        **run_info(device), "dtype": dtype, "waste": waste, "kv_bytes_per_token": per_tok,
        "budget_bytes": per_tok * args.budget_tokens, "capacity": {"model": model, "engine": engine},
        "workload": vars(args),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print_tables(result, args)
    return result


if __name__ == "__main__":
    main()
