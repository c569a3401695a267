"""Tensor parallelism on GPUs: greedy agreement and decode throughput, TP=1 against TP=2.

Model: the Qwen3-8B architecture (36 layers, hidden 4096, 32 query / 8 KV heads of 128, FFN
12288, vocabulary 151936) in bf16 with random weights made on each GPU (``load_format="dummy"``:
no checkpoint is written or read; every rank draws the same full tensors from per-tensor seeds
and keeps its shard, so every TP size runs the same model).

Workload: N = 64 requests, prompts of 32..128 random token ids (seed 0), 256 output tokens
each, greedy, EOS ignored; ``--num-requests 16,64,256,512`` runs several counts one after
another on each engine (sized for the largest, so it starts once).  Each TP size runs in a
fresh child process (a clean GPU and process group); the engine itself starts the TP workers.
Measured per TP size and count: the time to generate one token for every request (prefill)
and all 256 (prefill + decode; ``--repeat R`` times, the median counts); decode tokens/s is
``N * 255 / (full - prefill)``.  "Pure decode" tokens/s comes from one more run through
``LLMEngine.step()`` whose clock starts once every request has its first token: no prefill step
in it and no separately timed prefill subtracted (with long prompts that difference of two large
times is noisy).  "Full-batch" tokens/s counts only that run's steps before the first request
finishes: a decode batch of fixed size N (with long prompts, requests prefilled early finish
early, and the tail of smaller batches would otherwise weigh in).  Greedy
agreement: with random weights in bf16, near-ties can flip a late token, so the report gives
the share of tokens before each request's first divergence and where the earliest one is, not
only exact matches, and a near-tie check on a greedy run with top-5 log-probabilities
(``--check-tokens`` tokens): at each request's first divergence, is each size's token among the
other's top 5?  A token outside is a mismatch.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python benchmarks/bench_tensor_parallel.py --out tp.json

(The three variables keep NVLink multicast off; the script sets them when they are unset.)
``--smoke`` runs a tiny Qwen3 on the CPU (gloo) to check the script end to end.  ``--dtype
float32`` runs the GPU model in fp32, where TP=2's greedy tokens must equal TP=1's exactly (in
bf16 the random model's near-ties let the two summation orders pick different tokens).
``--profile-steps K`` also profiles K pure decode steps on rank 0's GPU (torch.profiler) and
prints the step period, the GPU's busy time and kernel time per kind of work (GEMMs, attention,
cross-rank sums, ...) for each TP size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_var, "0" if _var == "NCCL_NVLS_ENABLE" else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_common import git_commit  # noqa: E402

QWEN3_8B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
    intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
)
TINY = dict(QWEN3_8B, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, torch_dtype="float32")


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# ---------------------------------------------------------------------- one TP size (child process)
def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One TP size: one engine (sized for the largest request count), every request count in turn."""
    import torch

    from pagedattn import LLM

    cuda = args.device == "cuda"
    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    counts = request_counts(args.num_requests)
    t0 = time.perf_counter()
    llm = LLM(args.model_dir, device=args.device, dtype=args.dtype,
              tensor_parallel_size=args.child, num_kv_blocks=None if cuda else 512,
              load_format="dummy", seed=args.seed, max_num_seqs=max(counts),
              max_model_len=args.max_prompt + args.output_len + 16, enforce_eager=args.enforce_eager,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False)
    init_s = time.perf_counter() - t0
    try:
        runs = {str(n): _run_count(llm, args, n, vocab, cuda) for n in counts}
        m = llm.get_metrics()
        all_reduce = _all_reduce_kind(llm)
    finally:
        llm.shutdown()
    return {"tp": args.child, "device": torch.cuda.get_device_name() if cuda else "cpu", "init_seconds": init_s,
            "all_reduce": all_reduce, "kv_blocks_total": m["kv_blocks_total"],
            "num_preemptions": m["num_preemptions"], "runs": runs}


class FullCollections:
    """Counts this process's full (generation 2) garbage collections and their total time:
    pauses in which rank 0 launches no step."""

    def __init__(self) -> None:
        self.count, self.seconds, self._t0 = 0, 0.0, 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._t0

    def snapshot(self) -> tuple[int, float]:
        return self.count, self.seconds


_FULL_GC = FullCollections()


class TritonCompiles:
    """Names of the Triton kernels this process (rank 0) compiles: a compilation inside a timed
    run is a stall the warm-up should have taken (ranks run the same kernels, so rank 0 stands
    for all).  Uses Triton's post-compile hook; without Triton (CPU-only installs) it sees none."""

    def __init__(self) -> None:
        self.names: list[str] = []
        try:
            import triton
        except ImportError:
            return
        runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
        if runtime is not None and hasattr(runtime, "jit_post_compile_hook"):
            runtime.jit_post_compile_hook = self._on_compile

    def _on_compile(self, **kwargs: Any) -> None:
        # "name[num_warps=...](arg: type, ...)": the types show the specialisation that was new
        self.names.append(str(kwargs.get("repr", "?")))

    def __len__(self) -> int:
        return len(self.names)


_COMPILES = TritonCompiles()


def _run_count(llm: Any, args: argparse.Namespace, n: int, vocab: int, cuda: bool) -> dict[str, Any]:
    """The timed runs of ``n`` requests on a warm engine."""
    import torch

    from pagedattn import SamplingParams

    prompts = workload(n, args.min_prompt, args.max_prompt, vocab, seed=0)
    # Warm-up on the same shapes (another seed): compiles every kernel the timed runs hit.
    warm = workload(n, args.min_prompt, args.max_prompt, vocab, seed=1)
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)

    def timed(max_tokens: int) -> tuple[float, list[list[int]]]:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        sync()
        return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]

    prefill_s = min(timed(1)[0] for _ in range(2))
    gc_before, compiled_before = _FULL_GC.snapshot(), len(_COMPILES)
    full_runs = [timed(args.output_len) for _ in range(args.repeat)]
    gc_after = _FULL_GC.snapshot()
    tokens = full_runs[0][1]
    fulls = [t for t, _ in full_runs]
    full_s = statistics.median(fulls)
    assert all(len(t) == args.output_len for t in tokens), "every request must produce output_len tokens"
    phase = decode_phase(llm, prompts, args.output_len, cuda)
    compiled_in_timed = _COMPILES.names[compiled_before:]
    # Greedy tokens with every position's top-5 log-probabilities: shows whether the TP sizes'
    # divergences are near-ties (see near_tie_agreement).
    check = SamplingParams(temperature=0.0, max_tokens=min(args.check_tokens, args.output_len), logprobs=5)
    lp = llm.generate(prompts, check, use_tqdm=False)
    checked = [{"tokens": o.outputs[0].token_ids,
                "top5": [{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs]} for o in lp]
    profiled = profile_decode(llm, prompts, args.profile_steps) if args.profile_steps and cuda else None
    return {
        "prefill_seconds": prefill_s, "full_seconds": full_s, "full_seconds_per_repeat": fulls,
        "repeats_identical": all(r[1] == tokens for r in full_runs),
        # rank 0's full garbage collections during the timed generations, all repeats together
        "full_gc_count": gc_after[0] - gc_before[0], "full_gc_seconds": gc_after[1] - gc_before[1],
        # Triton kernels rank 0 compiled in the timed generations and the pure decode run (the
        # warm-up should leave none)
        "triton_compiles_in_timed_runs": compiled_in_timed,
        "decode_tok_per_s": n * (args.output_len - 1) / max(full_s - prefill_s, 1e-9),
        "output_tok_per_s": n * args.output_len / full_s,
        "decode_step_profile": profiled, **phase,
        "tokens": tokens, "first_logprobs": [c["top5"][0] for c in checked], "checked": checked,
    }


def decode_phase(llm: Any, prompts: list[list[int]], output_len: int, cuda: bool) -> dict[str, Any]:
    """Throughput of the pure decode steps: the requests run through ``LLMEngine.step()`` and the
    clock starts once every one has its first token (no prefill left), so no separately timed
    prefill is subtracted.  Counts the tokens generated after that point."""
    import torch

    from pagedattn import SamplingParams

    eng = llm.engine
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, params, stream=False)
    sched = eng.scheduler
    while sched.waiting or sched.swapped or not all(r.prefill_done for r in sched.running):
        eng.step()
    sync()
    # Every request makes exactly output_len tokens (EOS ignored): what the running ones still owe.
    tokens = sum(output_len - s.num_output_tokens for r in sched.running for s in r.seqs)
    batch = sum(len(r.seqs) for r in sched.running)
    t, steps = time.perf_counter(), 0
    full_steps, full_seconds = 0, 0.0
    while eng.has_unfinished_requests():
        finished = eng.step()  # (streaming off) the requests that finished in this step
        steps += 1
        if finished and not full_steps:
            # Up to here every sequence made one token a step: a decode batch of fixed size.
            # (``step()`` has read this step's tokens, so the device is done with it.)
            full_steps, full_seconds = steps, time.perf_counter() - t
    sync()
    seconds = time.perf_counter() - t
    return {"decode_phase_seconds": seconds, "decode_phase_tokens": tokens, "decode_phase_steps": steps,
            "decode_phase_tok_per_s": tokens / max(seconds, 1e-9),
            # The steps before the first request finishes: all ``batch`` sequences decode in each.
            "full_batch_steps": full_steps, "full_batch_size": batch,
            "full_batch_tok_per_s": batch * full_steps / full_seconds if full_seconds > 0 else None}


def request_counts(spec: str) -> list[int]:
    counts = [int(c) for c in spec.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--num-requests takes positive counts, got {spec!r}")
    return counts


# Kernel name fragments per kind of work, first match wins (cuBLAS names its Hopper GEMMs nvjet).
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cross-rank sums (+ add & norm)", ("_reduce_add_rms_norm", "barrier_kernel", "all_reduce", "AllReduce")),
    ("logits all-gather", ("AllGather", "CatArrayBatchedCopy")),
    ("GEMMs", ("nvjet", "gemm", "xmma", "cutlass", "splitKreduce")),
    ("paged attention", ("_decode_kernel", "_merge_splits", "_cascade", "_extend")),
    ("norm, rotary, SiLU, KV store", ("_rms_norm", "_qk_norm_rope", "_silu_and_mul", "_store_kv")),
)


def profile_decode(llm: Any, prompts: list[list[int]], steps: int) -> dict[str, Any]:
    """Device time of ``steps`` pure decode steps under torch.profiler (this process's GPU, i.e.
    rank 0): the step period, busy time and kernel time per kind of work, per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pagedattn import SamplingParams

    eng = llm.engine
    for p in prompts:
        eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
    while eng.scheduler.waiting or not all(r.prefill_done for r in eng.scheduler.running):
        eng.step()
    eng.step()  # the first overlapped launch
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    while eng.has_unfinished_requests():
        eng.step()
    trace = Path(tempfile.mkdtemp(prefix="tp-profile-")) / "trace.json"
    prof.export_chrome_trace(str(trace))
    kernels = sorted((e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "kernel"),
                     key=lambda e: e["ts"])
    shutil.rmtree(trace.parent, ignore_errors=True)
    span_us = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    per_kind: dict[str, float] = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    per_kind["other"] = 0.0
    for e in kernels:
        kind = next((k for k, frags in KERNEL_KINDS if any(f in e["name"] for f in frags)), "other")
        per_kind[kind] += e["dur"]
    busy_us = sum(per_kind.values())
    return {"steps": steps, "batch": len(prompts), "period_ms": span_us / steps / 1e3,
            "busy_ms": busy_us / steps / 1e3, "kernel_ms": {k: v / steps / 1e3 for k, v in per_kind.items()}}


def _all_reduce_kind(llm: Any) -> str:
    """What the row-parallel layers sum with on rank 0: "p2p" (one-shot, see
    ``pagedattn.distributed.all_reduce``), "process group" (NCCL or gloo), or "none" (TP=1)."""
    from pagedattn.distributed.all_reduce import P2PAllReduce
    from pagedattn.models.layers import RowParallelLinear

    rows = [m for m in llm.engine.executor.worker.model.modules() if isinstance(m, RowParallelLinear)]
    if not rows or rows[0].tp_size == 1:
        return "none"
    return "p2p" if isinstance(rows[0].all_reduce, P2PAllReduce) else "process group"


# ---------------------------------------------------------------------- comparison and report
def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    """Per request, the index of the first differing token (None: identical)."""
    firsts: list[int | None] = []
    for a, b in zip(ref, got, strict=True):
        firsts.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None))
    total = sum(len(a) for a in ref)
    before = sum(len(a) if f is None else f for a, f in zip(ref, firsts))
    diverged = [(f, i) for i, f in enumerate(firsts) if f is not None]
    earliest = min(diverged) if diverged else None
    return {
        "identical_requests": sum(f is None for f in firsts), "requests": len(ref),
        "share_of_tokens_before_divergence": before / total,
        "share_of_tokens_equal_positionwise": sum(x == y for a, b in zip(ref, got) for x, y in zip(a, b)) / total,
        "earliest_divergence": None if earliest is None else {"token": earliest[0], "request": earliest[1]},
        "first_divergence_per_request": firsts,
    }


def near_tie_agreement(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> dict[str, Any]:
    """Greedy runs with top-5 log-probabilities, compared the way vLLM compares runs that may
    round differently: per request, the tokens are identical, or at the first position where
    they differ each run's token is among the other's top 5 (a near-tie that a different
    summation order may break either way; after it the contexts differ, so nothing later is
    compared).  Anything else is a mismatch: a real disagreement.  ``gap`` is how much more
    likely the reference found its own token than the other run's, in nats."""
    identical, near, mismatched, gaps = 0, 0, [], []
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        pos = next((j for j, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        if pos is None:
            identical += 1
            continue
        ta, tb = str(a["tokens"][pos]), str(b["tokens"][pos])
        top_a, top_b = a["top5"][pos], b["top5"][pos]
        if tb in top_a and ta in top_b:
            near += 1
            gaps.append(top_a[ta] - top_a[tb])
        else:
            mismatched.append({"request": i, "token": pos})
    return {"requests": len(ref), "identical": identical, "near_ties": near, "mismatches": mismatched,
            "near_tie_gap_max": max(gaps) if gaps else None,
            "near_tie_gap_median": sorted(gaps)[len(gaps) // 2] if gaps else None}


def logprob_agreement(ref: list[dict[str, float]], got: list[dict[str, float]]) -> dict[str, Any]:
    """First generated token of every request: same top-1?  How far apart are the
    log-probabilities of the tokens both runs rank in their top 5, and the top-1 margins?"""
    same_top1, diffs, margins = 0, [], []
    for a, b in zip(ref, got, strict=True):
        top_a, top_b = max(a, key=a.__getitem__), max(b, key=b.__getitem__)
        same_top1 += top_a == top_b
        diffs += [abs(a[t] - b[t]) for t in a.keys() & b.keys()]
        ranked = sorted(a.values(), reverse=True)
        margins.append(ranked[0] - ranked[1] if len(ranked) > 1 else float("inf"))
    diffs.sort()
    return {
        "same_top1": same_top1, "requests": len(ref),
        "logprob_abs_diff_median": diffs[len(diffs) // 2] if diffs else None,
        "logprob_abs_diff_max": diffs[-1] if diffs else None,
        "top1_margin_median": sorted(margins)[len(margins) // 2],
    }



def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (``argv`` as on the command line); returns the summary, with
    ``failures`` naming TP sizes whose run failed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp-sizes", default="1,2", help="comma-separated; the first is the reference")
    ap.add_argument("--num-requests", default=None,
                    help="concurrent requests (default 64, 4 with --smoke); comma-separated counts run one after "
                    "another on each engine")
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--check-tokens", type=int, default=32,
                    help="tokens per request of the greedy run with top-5 log-probabilities (near-tie check)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed generations per count; the median is reported (all are kept in the JSON)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="default: bfloat16 on CUDA, float32 on the CPU; float32 checks greedy agreement exactly")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="also profile this many decode steps on rank 0's GPU and print where their time goes")
    ap.add_argument("--child-timeout", type=float, default=1500, help="seconds one TP size may take")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="a tiny Qwen3 on the CPU, 4 short requests")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke and args.child is None:
        args.device, args.min_prompt, args.max_prompt, args.output_len = "cpu", 4, 12, 8
    args.num_requests = args.num_requests or ("4" if args.smoke else "64")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.repeat < 1 or args.check_tokens < 1:
        raise SystemExit(f"--repeat and --check-tokens must be >= 1, got {args.repeat} and {args.check_tokens}")

    if args.child is not None:
        Path(args.result_file).write_text(json.dumps(run_child(args)))
        return {}

    sizes = [int(s) for s in args.tp_sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="tp-bench-"))
    (work / "config.json").write_text(json.dumps(TINY if args.smoke else QWEN3_8B))
    results: dict[int, dict[str, Any]] = {}
    failures: dict[int, str] = {}
    for tp in sizes:
        out = work / f"tp{tp}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(tp), "--model-dir", str(work),
               "--result-file", str(out), "--num-requests", args.num_requests, "--min-prompt",
               str(args.min_prompt), "--max-prompt", str(args.max_prompt), "--output-len", str(args.output_len),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--seed", str(args.seed),
               "--device", args.device, "--profile-steps", str(args.profile_steps), "--repeat", str(args.repeat),
               "--check-tokens", str(args.check_tokens), "--dtype", args.dtype]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        print(f"--- TP={tp}: {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=args.child_timeout)
            ok = proc.returncode == 0 and out.is_file()
            if not ok:
                failures[tp] = f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            ok, failures[tp] = False, f"timed out after {args.child_timeout:.0f} s"
        if ok:
            results[tp] = json.loads(out.read_text())
            out.unlink()
        print(f"--- TP={tp}: {'done' if ok else 'FAILED (' + failures[tp] + ')'} in {time.perf_counter() - t:.0f} s",
              flush=True)

    ref_tp = sizes[0]
    weights = {"float32": "fp32", "bfloat16": "bf16"}[args.dtype]
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
        "device": next((r["device"] for r in results.values()), None),
        "model": f"{'tiny Qwen3' if args.smoke else 'Qwen3-8B shape'}, random {weights} weights",
        "workload": {k: v for k, v in vars(args).items() if k not in ("child", "model_dir", "result_file")},
        "engines": {str(tp): {k: v for k, v in r.items() if k != "runs"} for tp, r in results.items()},
        "runs": {n: compare(results, n, ref_tp) for n in map(str, request_counts(args.num_requests))},
        "failures": {str(tp): f for tp, f in failures.items()},
    }
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    for n, run_ in summary["runs"].items():
        report(summary, results, n, run_, ref_tp, args.output_len)
    for tp, f in failures.items():
        print(f"TP={tp} FAILED: {f}")
    if len(results) > 1:
        last = list(results)[-1]
        print(f"\nDecode tok/s on {summary['device']}, {summary['model']}, prompts of {args.min_prompt}.."
              f"{args.max_prompt} tokens, {args.output_len} output tokens a request: (N x {args.output_len - 1}) / "
              "(full - prefill) times; the pure decode steps after every request's first token; the full-batch "
              "steps among those (before any request finishes)")
        cols = (("", "decode_tok_per_s", "decode_speedup"), ("pure ", "decode_phase_tok_per_s", "decode_phase_speedup"),
                ("full ", "full_batch_tok_per_s", "full_batch_speedup"))
        print(f"{'requests':>8s}" + "".join("".join(f"{label + 'TP=' + str(tp):>12s}" for tp in results)
                                           + f"{'speedup':>9s}" for label, _, _ in cols))
        for n, run_ in summary["runs"].items():
            print(f"{n:>8s}" + "".join(
                "".join(f"{r['runs'][n][key] or float('nan'):12.0f}" for r in results.values())
                + f"{run_[sp_key].get(str(last), float('nan')):8.2f}x" for _, key, sp_key in cols))
    summary["results_with_tokens"] = results
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _speedups(runs: dict[int, dict[str, Any]], ref: dict[str, Any] | None, key: str) -> dict[str, float]:
    """``runs[tp][key] / ref[key]`` per TP size, where both figures exist (a run with no request
    finishing has no full-batch figure)."""
    if not ref or not ref[key]:
        return {}
    return {str(tp): r[key] / ref[key] for tp, r in runs.items() if r[key]}


def compare(results: dict[int, dict[str, Any]], n: str, ref_tp: int) -> dict[str, Any]:
    """One request count across TP sizes: throughput, speed-up over ``ref_tp``, agreement with it."""
    runs = {tp: r["runs"][n] for tp, r in results.items()}
    ref = runs.get(ref_tp)
    others = {tp: r for tp, r in runs.items() if tp != ref_tp and ref is not None}
    return {
        "results": {str(tp): {k: v for k, v in r.items() if k not in ("tokens", "first_logprobs", "checked")}
                    for tp, r in runs.items()},
        "decode_speedup": _speedups(runs, ref, "decode_tok_per_s"),
        "decode_phase_speedup": _speedups(runs, ref, "decode_phase_tok_per_s"),
        "full_batch_speedup": _speedups(runs, ref, "full_batch_tok_per_s"),
        "greedy_agreement": {str(tp): agreement(ref["tokens"], r["tokens"]) for tp, r in others.items()},
        "near_tie_agreement": {str(tp): near_tie_agreement(ref["checked"], r["checked"]) for tp, r in others.items()},
        "first_token_logprobs": {str(tp): logprob_agreement(ref["first_logprobs"], r["first_logprobs"])
                                 for tp, r in others.items()},
    }


def report(summary: dict[str, Any], results: dict[int, dict[str, Any]], n: str, run_: dict[str, Any], ref_tp: int,
           output_len: int) -> None:
    """Print one request count's agreement, throughput and (if profiled) step breakdown."""
    for tp, a in run_["greedy_agreement"].items():
        e = a["earliest_divergence"]
        where = "none" if e is None else f"token {e['token']} of request {e['request']}"
        print(f"\n{n} requests, greedy agreement TP={tp} vs TP={ref_tp}: {a['identical_requests']}/{a['requests']} "
              f"requests identical, {a['share_of_tokens_before_divergence']:.1%} of tokens before their request's "
              f"first divergence, earliest divergence: {where}")
        nt = run_["near_tie_agreement"][tp]
        gap = "" if nt["near_tie_gap_max"] is None else (
            f" (TP={ref_tp}'s log-probability gap between the two tokens: median {nt['near_tie_gap_median']:.3g}, "
            f"max {nt['near_tie_gap_max']:.3g})")
        print(f"near-tie check over {nt['requests']} requests: {nt['identical']} identical, {nt['near_ties']} first "
              f"differ where each token is in the other's top 5{gap}, {len(nt['mismatches'])} mismatches")
        la = run_["first_token_logprobs"][tp]
        print(f"first token, TP={tp} vs TP={ref_tp}: same top-1 in {la['same_top1']}/{la['requests']}; "
              f"|logprob difference| of shared top-5 tokens median {la['logprob_abs_diff_median']:.3g}, "
              f"max {la['logprob_abs_diff_max']:.3g}; median top-1 margin {la['top1_margin_median']:.3g}")
    print(f"\nDecode throughput, {summary['model']}, {n} requests x {output_len} tokens on {summary['device']}")
    print(f"{'TP':>3s} {'all-reduce':>13s} {'init s':>7s} {'prefill s':>9s} {'total s':>8s} {'decode tok/s':>12s} "
          f"{'output tok/s':>12s} {'speedup':>8s} {'pure decode':>11s} {'speedup':>8s} {'KV blocks':>9s} "
          f"{'full GCs (s)':>12s} {'compiles':>8s}")
    for tp, e in results.items():
        r = e["runs"][n]
        sp = run_["decode_speedup"].get(str(tp), float("nan"))
        pure_sp = run_["decode_phase_speedup"].get(str(tp), float("nan"))
        print(f"{tp:3d} {e['all_reduce']:>13s} {e['init_seconds']:7.1f} {r['prefill_seconds']:9.3f} "
              f"{r['full_seconds']:8.2f} {r['decode_tok_per_s']:12.0f} {r['output_tok_per_s']:12.0f} {sp:7.2f}x "
              f"{r['decode_phase_tok_per_s']:11.0f} {pure_sp:7.2f}x "
              f"{e['kv_blocks_total']:9d} {r['full_gc_count']:5d} ({r['full_gc_seconds']:.2f}) "
              f"{len(r['triton_compiles_in_timed_runs']):8d}")
        for name in r["triton_compiles_in_timed_runs"]:
            print(f"    TP={tp} compiled after the warm-up: {name}")
    profiled = {tp: e["runs"][n]["decode_step_profile"] for tp, e in results.items()
                if e["runs"][n].get("decode_step_profile")}
    if profiled:
        first = next(iter(profiled.values()))
        print(f"\nA decode step on rank 0's GPU, ms ({first['steps']} steps of {first['batch']} sequences profiled)")
        print(f"{'':32s}" + "".join(f"{'TP=' + str(tp):>9s}" for tp in profiled))
        for label, key in (("step period", "period_ms"), ("GPU busy", "busy_ms")):
            print(f"{label:32s}" + "".join(f"{b[key]:9.3f}" for b in profiled.values()))
        for kind in first["kernel_ms"]:
            print(f"  {kind:30s}" + "".join(f"{b['kernel_ms'][kind]:9.3f}" for b in profiled.values()))


if __name__ == "__main__":
    sys.exit(1 if run().get("failures") else 0)
