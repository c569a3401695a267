"""CPU throughput: pagedattn against HF transformers on the same machine, in the same run.

Workload: 16 prompts of 16..128 random token ids, 64 new tokens each, greedy (``--temperature T``:
sampled at T, top-k and top-p off, for every engine), EOS ignored,
the embedded default model (SmolLM2-135M) in float32, 2 threads.  Baselines: HF's padded
batch ``generate`` (all prompts left-padded into one batch) and, optionally, HF one request at
a time and HF's continuous batching ``generate_batch``.

    python benchmarks/bench_cpu_throughput.py [--repeat 3] [--out results.json] [--hf-sequential] [--hf-cb]
                                              [--trace run.jsonl]

``--repeat N`` alternates our run and HF's padded batch N times and reports medians: on a shared
machine one pair of runs can be off by 20%, so the ratio quoted is the median of the ratios of
back-to-back pairs.  Round ``r`` uses fresh prompts (seed ``r``; round 0 is the workload above),
so our prefix cache never sees a prompt twice, and both engines first run one untimed round of
their own (a different seed), so one-time costs (oneDNN's kernel generation for each GEMM shape,
allocator growth) are left out of every timed round.

``--trace`` records the block pool during our run (``pagedattn viz run.jsonl --html`` draws it);
recording adds a little host work per step, so leave it off for the numbers you report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import torch
from bench_common import git_commit

from pagedattn import LLM, SamplingParams


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def hf_sampling(temperature: float) -> dict:
    """``generate``'s arguments for greedy or pure temperature sampling (no top-k / top-p, which a
    checkpoint's generation config may otherwise switch on)."""
    if temperature <= 0:
        return dict(do_sample=False)
    return dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)


def bench_ours(llm: LLM, prompts: list[list[int]], new: int, temperature: float = 0.0) -> tuple[float, int]:
    sp = SamplingParams(temperature=temperature, max_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    return dt, sum(len(o.outputs[0].token_ids) for o in outs)


def bench_hf_padded(model, prompts: list[list[int]], new: int, pad: int, temperature: float = 0.0) -> tuple[float, int]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad,
                             **hf_sampling(temperature))
    dt = time.perf_counter() - t
    return dt, (out.shape[1] - width) * len(prompts)


def bench_hf_sequential(model, prompts: list[list[int]], new: int, pad: int,
                        temperature: float = 0.0) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=pad, **hf_sampling(temperature))
            n += out.shape[1] - ids.shape[1]
    return time.perf_counter() - t, n


def bench_hf_cb(model, prompts: list[list[int]], new: int, pad: int, temperature: float = 0.0) -> tuple[float, int]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new, eos_token_id=-1, pad_token_id=pad, **hf_sampling(temperature))
    t = time.perf_counter()
    with torch.inference_mode():
        res = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    dt = time.perf_counter() - t
    return dt, sum(len(r.generated_tokens) for r in res.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled at it, every engine")
    ap.add_argument("--hf-sequential", action="store_true", help="also time HF one request at a time")
    ap.add_argument("--hf-cb", action="store_true", help="also time HF generate_batch (continuous batching)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="alternate ours / HF padded this many times (medians)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--trace", default=None, help="record a block-pool trace of our run (JSON lines) here")
    args = ap.parse_args()
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    llm = LLM(device="cpu", dtype="float32")
    vocab = llm.engine.arch.vocab_size
    rounds = [workload(args.num_prompts, args.min_len, args.max_len, vocab, seed=r) for r in range(args.repeat)]
    warmup = workload(args.num_prompts, args.min_len, args.max_len, vocab, seed=10_000)
    hf = pad = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(llm.engine.source.model_dir, dtype=torch.float32).eval()
        pad = llm.engine.tokenizer.pad_token_id if llm.engine.tokenizer is not None else 0
        pad = 0 if pad is None else pad
    bench_ours(llm, warmup, args.new_tokens, args.temperature)
    if hf is not None:
        bench_hf_padded(hf, warmup, args.new_tokens, pad, args.temperature)
    tracer = None
    if args.trace:
        from pagedattn.viz import TraceRecorder

        tracer = TraceRecorder(args.trace)
        llm.engine.attach_tracer(tracer)
    ours: list[tuple[float, int]] = []
    padded: list[tuple[float, int]] = []
    for prompts in rounds:
        try:
            ours.append(bench_ours(llm, prompts, args.new_tokens, args.temperature))
        finally:
            if tracer is not None:  # record the first run only, then nothing else on this engine
                llm.engine.detach_tracer()
                print(f"trace written to {args.trace}")
                tracer = None
        if hf is not None:
            padded.append(bench_hf_padded(hf, prompts, args.new_tokens, pad, args.temperature))
    rows = [("pagedattn", *_median_run(ours))]
    if hf is not None:
        rows.append(("HF padded batch generate", *_median_run(padded)))
        if args.hf_cb:
            rows.append(("HF generate_batch (paged)",
                         *bench_hf_cb(hf, rounds[0], args.new_tokens, pad, args.temperature)))
        if args.hf_sequential:
            rows.append(("HF one request at a time",
                         *bench_hf_sequential(hf, rounds[0], args.new_tokens, pad, args.temperature)))
    # Each round's ours/HF ratio from back-to-back runs; the median of those is the figure.
    pair_ratios = [(n / dt) / (hn / hdt) for (dt, n), (hdt, hn) in zip(ours, padded)]
    ratio = statistics.median(pair_ratios) if pair_ratios else None
    base = rows[1] if hf is not None else None
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        "torch": torch.__version__,
        "commit": git_commit(),
        "workload": vars(args),
        "results": [{"name": r[0], "seconds": r[1], "tokens": r[2], "tok_per_s": r[2] / r[1]} for r in rows],
        "rounds": {"pagedattn_seconds": [r[0] for r in ours], "hf_padded_seconds": [r[0] for r in padded],
                   "ratios": pair_ratios},
        "speedup_vs_hf_padded": ratio,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(f"\n{'engine':28s} {'tokens':>7s} {'seconds':>8s} {'tok/s':>8s} {'vs HF padded':>13s}")
    for name, dt, n in rows:
        rel = f"{(n / dt) / (base[2] / base[1]):.2f}x" if base else "-"
        print(f"{name:28s} {n:7d} {dt:8.2f} {n / dt:8.1f} {rel:>13s}")
    if ratio is not None:
        print(f"median of {len(pair_ratios)} back-to-back ratios: {ratio:.2f}x "
              f"({', '.join(f'{r:.2f}' for r in pair_ratios)})")


def _median_run(runs: list[tuple[float, int]]) -> tuple[float, int]:
    """The median time over runs (all runs produce the same token count)."""
    return statistics.median(dt for dt, _ in runs), runs[0][1]



if __name__ == "__main__":
    main()
