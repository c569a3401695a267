"""Where does a step's time go?  Runs the throughput workload (smaller) under cProfile and
times a replay of the captured decode graph, so host overhead and device time can be compared.

    python benchmarks/profile_engine.py [--num-requests 256] [--output-len 256]
    python benchmarks/profile_engine.py --cpu [--threads 2]

``--cpu`` profiles the CPU throughput workload instead (``bench_cpu_throughput.py``: 16 prompts,
64 greedy tokens, the embedded model in fp32): the prefill step, the median decode step split
into scheduling, the forward pass and the host work after it, and the operators of a few decode
steps under ``torch.profiler`` (self time: on a CPU the small ops' dispatch shows up here).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch
from bench_throughput import QWEN3_0_6B, make_model, workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--e2e", action="store_true",
                    help="the bench_throughput workload (outputs 100..1024); report time per kind of step")
    ap.add_argument("--cpu", action="store_true", help="profile the CPU throughput workload (see above)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for --cpu")
    args = ap.parse_args()
    if args.cpu:
        profile_cpu(args.threads, args.top)
        return
    from pagedattn import LLM, SamplingParams

    folder = Path(tempfile.mkdtemp(prefix="qwen3-prof-"))
    hf = make_model(folder, torch.bfloat16)
    del hf
    torch.cuda.empty_cache()
    llm = LLM(str(folder), device="cuda", dtype="bfloat16", max_model_len=2048 + 16, max_num_seqs=256,
              max_num_batched_tokens=16384, gpu_memory_utilization=0.85)
    prompts, outs = workload(args.num_requests, 100, 1024, QWEN3_0_6B["vocab_size"])
    sp = SamplingParams(temperature=0.6, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)
    eng = llm.engine
    if args.e2e:
        step_kinds(eng, prompts, outs)
        return
    timers = {"schedule": 0.0, "execute": 0.0, "process": 0.0}
    orig_sched, orig_exec, orig_proc = eng.scheduler.schedule, eng.runner.execute, eng._process

    def timed(name, fn):
        def wrap(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            timers[name] += time.perf_counter() - t
            return r
        return wrap

    eng.scheduler.schedule = timed("schedule", orig_sched)
    eng.runner.execute = timed("execute", orig_exec)
    eng._process = timed("process", orig_proc)
    steps0 = eng.num_steps
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t
    steps = eng.num_steps - steps0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"wall {wall:.2f}s  steps {steps}  tokens {n}  tok/s {n / wall:.0f}")
    for k, v in timers.items():
        print(f"  {k:10s} {v:7.2f}s  {1e3 * v / steps:6.2f} ms/step")
    # Device time of one full-batch decode graph replay.
    g = eng.runner.graphs
    if g is not None:
        b = g.buckets[-1]
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            g.graphs[b][0].replay()  # the plain variant (no shared prefixes)
        e.record()
        e.synchronize()
        print(f"  decode graph replay at batch {b} (stale inputs): {s.elapsed_time(e) / 10:.2f} ms")
    eng.scheduler.schedule, eng.runner.execute, eng._process = orig_sched, orig_exec, orig_proc
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompts, sp, use_tqdm=False)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    print(buf.getvalue())


def profile_cpu(threads: int, top: int) -> None:
    """The CPU throughput workload, one step at a time (one untimed round first)."""
    import os
    import statistics

    from bench_cpu_throughput import workload as cpu_workload
    from torch.profiler import ProfilerActivity, profile

    from pagedattn import LLM, SamplingParams

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    llm = LLM(device="cpu", dtype="float32")
    eng = llm.engine
    vocab = eng.arch.vocab_size
    sp = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    llm.generate(cpu_workload(16, 16, 128, vocab, seed=10_000), sp, use_tqdm=False)
    parts: dict[str, list[float]] = {"schedule": [], "execute": [], "process": []}
    orig = {"schedule": eng.scheduler.schedule, "execute": eng.executor.execute, "process": eng._process}

    def timed(name, fn):
        def wrap(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            parts[name].append(time.perf_counter() - t)
            return r
        return wrap

    eng.scheduler.schedule = timed("schedule", orig["schedule"])
    eng.executor.execute = timed("execute", orig["execute"])
    eng._process = timed("process", orig["process"])
    for p in cpu_workload(16, 16, 128, vocab, seed=0):
        eng.add_request(p, sp, stream=False)
    steps = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)
    eng.scheduler.schedule, eng.executor.execute, eng._process = orig["schedule"], orig["execute"], orig["process"]
    decode_ms = 1e3 * statistics.median(steps[1:])
    print(f"prefill step {steps[0]:.3f}s; {len(steps) - 1} decode steps, median {decode_ms:.2f} ms")
    for name, ts in parts.items():
        print(f"  {name:9s} median {1e3 * statistics.median(ts[1:]):7.3f} ms per decode step")
    for p in cpu_workload(16, 16, 128, vocab, seed=1):
        eng.add_request(p, sp, stream=False)
    for _ in range(20):  # the prefill, then decodes with some context behind them
        eng.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            eng.step()
    while eng.has_unfinished_requests():
        eng.step()
    print("5 decode steps (profiler overhead included):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def step_kinds(eng, prompts, outs) -> None:
    """Drive the engine step by step and split wall time by kind of step."""
    from pagedattn import SamplingParams

    for p, o in zip(prompts, outs):
        eng.add_request(p, SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True), stream=False)
    kinds: dict[str, list[float]] = {}
    orig = eng.scheduler.schedule
    seen: list = []

    def sched():
        out = orig()
        seen.append(out)
        return out

    eng.scheduler.schedule = sched
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        seen.clear()
        t = time.perf_counter()
        eng.step()
        dt = time.perf_counter() - t
        if not seen:
            kind = "overlapped decode"
        elif any(s.num_new_tokens > 1 for s in seen[0].scheduled):
            kind = "with prefill"
        else:
            kind = "synchronous decode"
        kinds.setdefault(kind, []).append(dt)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"e2e wall {wall:.2f}s, {sum(outs)} tokens, {sum(outs) / wall:.0f} tok/s")
    for k, v in kinds.items():
        print(f"  {k:20s} steps {len(v):5d}  total {sum(v):6.2f}s  mean {1e3 * sum(v) / len(v):6.2f} ms")


if __name__ == "__main__":
    main()
