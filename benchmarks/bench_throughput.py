"""End-to-end offline throughput on a GPU, against the HBM roofline and HF transformers.

The workload nano-vllm and vLLM publish: the Qwen3-0.6B architecture (random weights:
throughput does not depend on them) in bf16, 256 requests whose prompt and output lengths are
each uniform in 100..1024 (random token ids, seed 0), EOS ignored, temperature 0.6.

Reported: output tokens/s; the *roofline* for this workload -- every decode step must read the
weights once plus every K/V byte of every running sequence, over the device-to-device copy
bandwidth measured in the same run -- and the share of it reached; and HF transformers'
continuous batching (``generate_batch``) on a subset of the same requests, in the same run.
The engine is built in this process and warmed up on 8 tiny requests (what a user's engine has
seen before its first real batch; ``--warmup workload``: 64 requests of the workload's own
lengths, which hides what the first batch pays), then runs the workload ``--runs`` times: the
first timed run is the figure.

    python benchmarks/bench_throughput.py [--num-requests 256] [--hf-requests 64] [--out result.json]

``--penalties`` gives every request of ours repetition, presence and frequency penalties (the
sampler then counts every sequence's tokens each step and no decode step overlaps the next):
run it with and without on the same machine for their cost; ``--top-p 0.9`` likewise gives every
request top-p (the sampler's filter path).  The HF baseline is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from bench_common import git_commit

QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
    rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
)


def make_model(folder: Path, dtype: torch.dtype):
    import transformers

    cfg = transformers.Qwen3Config(**QWEN3_0_6B)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(folder)
    return model


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    outs = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, outs


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    t = sorted(times[5:])[len(times[5:]) // 2]
    del a, b
    return 2 * nbytes / t


def roofline_tok_s(prompts: list[list[int]], outs: list[int], weight_bytes: int, kv_bytes_per_token: int,
                   bw: float, max_batch: int) -> float:
    """Decode-only lower bound on time: each step reads the weights and every live K/V byte.

    Requests run ``max_batch`` at a time, a new one starting as soon as one finishes (what a
    continuous batcher with enough memory does)."""
    total_bytes = 0
    # Event simulation over decode steps: each live sequence has (remaining, context).
    pending = list(zip((len(p) for p in prompts), outs))[::-1]
    live: list[list[int]] = []
    while pending or live:
        while pending and len(live) < max_batch:
            ctx, n = pending.pop()
            live.append([ctx, n])
        total_bytes += weight_bytes + kv_bytes_per_token * sum(c for c, _ in live)
        for s in live:
            s[0] += 1
            s[1] -= 1
        live = [s for s in live if s[1] > 0]
    return sum(outs) / (total_bytes / bw)


def bench_ours(folder: Path, prompts, outs, args) -> dict:
    from pagedattn import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(folder), device="cuda", dtype="bfloat16", max_model_len=args.max_len * 2 + 16,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enforce_eager=args.enforce_eager, gpu_memory_utilization=args.gpu_memory_utilization)
    init_s = time.perf_counter() - t0
    params = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True, seed=i if args.seeded else None,
                             **extra_sampling(args)) for i, o in enumerate(outs)]
    warm_params = SamplingParams(temperature=0.6, max_tokens=32, ignore_eos=True, **extra_sampling(args))
    if args.warmup == "workload":
        # The same length distribution (another seed): every shape the timed run meets is warm.
        warm, _ = workload(64, args.min_len, args.max_len, QWEN3_0_6B["vocab_size"], seed=1)
    else:  # what a user's engine has seen before its first real batch: a few tiny requests
        warm = [[i + 1] * 8 for i in range(8)]
    llm.generate(warm, warm_params, use_tqdm=False)
    runs = []
    for run in range(args.runs):
        if args.trace and run == 0:  # recording costs host time: do not report figures from a traced run
            from pagedattn.viz import TraceRecorder

            llm.engine.attach_tracer(TraceRecorder(args.trace))
        torch.cuda.synchronize()
        t = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t)
        llm.engine.detach_tracer()
        n = sum(len(r.outputs[0].token_ids) for r in res)
        assert n == sum(outs), "every request must produce exactly its max_tokens"
    m = llm.get_metrics()
    del llm
    torch.cuda.empty_cache()
    dt = runs[0]
    return {"seconds": dt, "output_tokens": n, "tok_per_s": n / dt, "init_seconds": init_s,
            "run_seconds": runs, "run_tok_per_s": [n / r for r in runs], "warmup": args.warmup,
            "kv_blocks_total": m["kv_blocks_total"], "num_preemptions": m["num_preemptions"]}


def extra_sampling(args) -> dict:
    """The sampling fields ``--penalties`` and ``--top-p`` set on every request (none without them)."""
    extra = {"top_p": args.top_p} if args.top_p < 1.0 else {}
    if args.penalties:
        extra |= {"repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5}
    return extra


def bench_hf(model, prompts, outs) -> dict:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max(outs), do_sample=True, temperature=0.6, top_p=1.0, top_k=0,
                           eos_token_id=-1, pad_token_id=0)
    impl = None
    for cand in ("paged|sdpa", "sdpa_paged"):
        try:
            model.set_attn_implementation(cand)
            impl = cand
            break
        except Exception:
            continue
    t = time.perf_counter()
    # No inference_mode here: generate_batch updates its own static tensors in place.
    with torch.no_grad():
        res = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n = sum(len(r.generated_tokens) for r in res.values())
    return {"seconds": dt, "output_tokens": n, "tok_per_s": n / dt, "attn_implementation": impl,
            "num_requests": len(prompts), "max_new_tokens": max(outs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--hf-requests", type=int, default=64, help="HF subset size (0: skip HF)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--warmup", choices=("short", "workload"), default="short",
                    help="before the timed runs: 8 tiny requests (what a user's engine has seen; default) or "
                         "64 requests of the workload's own lengths (another seed)")
    ap.add_argument("--runs", type=int, default=2, help="timed runs of the workload on the same engine; the "
                    "first is the figure, later ones show what warming up on it gains")
    ap.add_argument("--penalties", action="store_true",
                    help="repetition, presence and frequency penalties on every request (ours only)")
    ap.add_argument("--seeded", action="store_true", help="a seed on every request of ours (each its own stream)")
    ap.add_argument("--top-p", type=float, default=1.0, help="top-p on every request of ours (1: none)")
    ap.add_argument("--trace", default=None,
                    help="record a block-pool trace of the timed run here (pagedattn viz draws it; slows the run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = torch.bfloat16
    folder = Path(tempfile.mkdtemp(prefix="qwen3-0.6b-random-"))
    hf = make_model(folder, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    kv_per_tok = 2 * QWEN3_0_6B["num_hidden_layers"] * QWEN3_0_6B["num_key_value_heads"] * QWEN3_0_6B["head_dim"] * 2
    prompts, outs = workload(args.num_requests, args.min_len, args.max_len, QWEN3_0_6B["vocab_size"])
    bw = copy_bandwidth()
    roof = roofline_tok_s(prompts, outs, weight_bytes, kv_per_tok, bw, args.max_num_seqs)
    ours = bench_ours(folder, prompts, outs, args)
    hf_res = None
    if args.hf_requests:
        try:
            hf_res = bench_hf(hf, prompts[: args.hf_requests], outs[: args.hf_requests])
            if not hf_res["output_tokens"]:
                raise RuntimeError("HF generate_batch produced no tokens")
        except Exception as e:  # the baseline failing must not hide our figures
            print(f"HF baseline failed: {e!r}")
            hf_res = None
    result = {
        "device": torch.cuda.get_device_name(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_GBps": bw / 1e9,
        "weight_bytes": weight_bytes,
        "roofline_tok_per_s": roof,
        "ours": ours,
        "hf_generate_batch": hf_res,
        "share_of_roofline": ours["tok_per_s"] / roof,
        "speedup_vs_hf": (ours["tok_per_s"] / hf_res["tok_per_s"]) if hf_res else None,
        "workload": vars(args),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nEnd-to-end throughput on {result['device']} (copy bandwidth {bw / 1e12:.2f} TB/s)")
    print(f"{'engine':34s} {'requests':>8s} {'out tokens':>10s} {'seconds':>8s} {'tok/s':>9s}")
    name = "pagedattn" + (" (penalties)" if args.penalties else "") + (" (seeded)" if args.seeded else "") \
        + (f" (top-p {args.top_p})" if args.top_p < 1.0 else "")
    print(f"{name:34s} {args.num_requests:8d} {ours['output_tokens']:10d} {ours['seconds']:8.2f} "
          f"{ours['tok_per_s']:9.0f}")
    if hf_res:
        print(f"{'HF generate_batch (' + str(hf_res['attn_implementation']) + ')':34s} {hf_res['num_requests']:8d} "
              f"{hf_res['output_tokens']:10d} {hf_res['seconds']:8.2f} {hf_res['tok_per_s']:9.0f}")
    print(f"{'roofline (weights + K/V per step)':34s} {'':8s} {'':10s} {'':8s} {roof:9.0f}")
    later = ", ".join(f"{t / roof:.1%}" for t in ours["run_tok_per_s"][1:])
    print(f"warm-up: {args.warmup}; first timed run {result['share_of_roofline']:.1%} of the roofline"
          + (f", later runs {later}" if later else ""))
    print(f"share of roofline: {result['share_of_roofline']:.1%}"
          + (f"   speedup vs HF: {result['speedup_vs_hf']:.1f}x" if hf_res else ""))



if __name__ == "__main__":
    main()
