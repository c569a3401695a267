"""Prefix caching on every shared-prefix shape: a family of chat workloads, caching on vs off.

Each point of the family is a chat service: ``S`` system prompts of ``L`` tokens each, and
``--num-requests`` requests, each one system prompt (round robin) followed by a unique user
turn of 20..300 tokens, with 16..600 output tokens (greedy, EOS ignored; seed 0).  Every
(point, caching) pair runs in a fresh process and is timed on its first run after start-up,
as a service meets its first burst: what start-up leaves uncompiled, and what the first
requests of each system prompt must still compute, are part of the figure.

The sweep (``--system-prompts``, ``--prompt-lens``) defaults to S in {2, 8} and L in {500,
1000, 3000}.  Reported per point: seconds with caching off and on, the speedup, output
tokens/s, mean time to first token and the prefix-cache hit rate; points with >= 1000 shared
tokens per request should reach >= 3x on a GPU.  The model is Qwen3-0.6B's architecture with
random weights, dtype "auto" (bf16).

    python benchmarks/bench_prefix_family.py [--num-requests 256] [--out family.json]
    python benchmarks/bench_prefix_family.py --device cpu --smoke     # tiny model, a CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from bench_common import child_result, run_child, sync
from bench_prefix_cache import model_folder, run_info, ttft_stats, vocab_size

TARGET_SPEEDUP = 3.0
TARGET_MIN_SHARED = 1000
FULL = dict(num_requests=256, turn_min=20, turn_max=300, output_min=16, output_max=600)
SMOKE = dict(num_requests=8, turn_min=2, turn_max=10, output_min=2, output_max=6)


def chat_workload(num_system: int, system_len: int, w: dict[str, int], vocab: int,
                  seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompts (system prompt ``i % num_system``, then a unique turn) and output lengths."""
    rng = random.Random(seed)
    systems = [[rng.randrange(vocab) for _ in range(system_len)] for _ in range(num_system)]
    prompts, outs = [], []
    for i in range(w["num_requests"]):
        turn = [rng.randrange(vocab) for _ in range(rng.randint(w["turn_min"], w["turn_max"]))]
        prompts.append(systems[i % num_system] + turn)
        outs.append(rng.randint(w["output_min"], w["output_max"]))
    return prompts, outs


# ====================================================================== one run (a fresh process)
def child(cfg: dict[str, Any]) -> dict[str, Any]:
    from pagedattn import LLM, SamplingParams

    device = torch.device(cfg["device"])
    prompts, outs = chat_workload(cfg["num_system"], cfg["system_len"], cfg["workload"], cfg["vocab"])
    t0 = time.perf_counter()
    llm = LLM(cfg["model_dir"], enable_prefix_caching=cfg["caching"], **cfg["engine"])
    build = time.perf_counter() - t0
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outs]
    sync(device)
    t = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    seconds = time.perf_counter() - t
    m = llm.get_metrics()
    llm.shutdown()
    n_out = sum(len(o.outputs[0].token_ids) for o in results)
    if n_out != sum(outs):
        raise RuntimeError(f"expected {sum(outs)} output tokens, got {n_out}")
    queried = m["prefix_cache_query_tokens"]
    return {"build_s": build, "seconds": seconds, "output_tokens": n_out, "prompt_tokens": sum(map(len, prompts)),
            "output_tok_per_s": n_out / seconds, "ttft_ms": ttft_stats(results),
            "prefix_cache_hit_rate": m["prefix_cache_hit_tokens"] / queried if queried else 0.0}


# ====================================================================== the driver
def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def check_args(args: argparse.Namespace) -> None:
    if not args.system_prompts or min(args.system_prompts) < 1:
        raise ValueError(f"system_prompts: need counts >= 1, got {args.system_prompts}")
    if not args.prompt_lens or min(args.prompt_lens) < 1:
        raise ValueError(f"prompt_lens: need lengths >= 1, got {args.prompt_lens}")
    if args.num_requests is not None and args.num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {args.num_requests}")
    if args.model_dir and not (Path(args.model_dir) / "config.json").is_file():
        raise ValueError(f"model_dir: no config.json in {args.model_dir}")


def print_table(result: dict[str, Any]) -> None:
    w = result["workload"]
    print(f"\nPrefix caching over a family of chat workloads on {result['device']} ({result['date']}, commit "
          f"{result['commit']}), dtype {result['dtype']}: {w['num_requests']} requests, turns {w['turn_min']}.."
          f"{w['turn_max']} tokens, outputs {w['output_min']}..{w['output_max']}; each run a fresh process, its "
          "first batch timed")
    print("| system prompts | shared tokens | off s | on s | on/off | out tok/s off | out tok/s on "
          f"| TTFT mean off / on ms | hit rate | target (>= {TARGET_SPEEDUP:.0f}x at >= {TARGET_MIN_SHARED}) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in result["points"]:
        off, on = p["off"], p["on"]
        target = ("ok" if p["speedup"] >= TARGET_SPEEDUP else "MISS") if p["system_len"] >= TARGET_MIN_SHARED else "-"
        print(f"| {p['num_system']} | {p['system_len']} | {off['seconds']:.2f} | {on['seconds']:.2f} "
              f"| {p['speedup']:.2f}x | {off['output_tok_per_s']:.0f} | {on['output_tok_per_s']:.0f} "
              f"| {off['ttft_ms']['mean']:.0f} / {on['ttft_ms']['mean']:.0f} | {on['prefix_cache_hit_rate']:.1%} "
              f"| {target} |")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model-dir", default=None, help="use this HF model folder instead of a random Qwen3")
    ap.add_argument("--smoke", action="store_true", help="tiny model and workloads (a CPU check in seconds)")
    ap.add_argument("--system-prompts", type=ints, default=None, help="comma-separated counts (default 2,8)")
    ap.add_argument("--prompt-lens", type=ints, default=None,
                    help="comma-separated system prompt lengths (default 500,1000,3000)")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--num-kv-blocks", type=int, default=None, help="default: sized from free memory")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--verbose", action="store_true", help="show each run's engine log")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child_result(child(json.loads(args.child)))
        return {}
    args.system_prompts = args.system_prompts or ([2, 3] if args.smoke else [2, 8])
    args.prompt_lens = args.prompt_lens or ([20, 40] if args.smoke else [500, 1000, 3000])
    check_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was requested but no CUDA device is available")
    folder = model_folder(args, device)
    w = dict(SMOKE if args.smoke else FULL)
    if args.num_requests is not None:
        w["num_requests"] = args.num_requests
    blocks = args.num_kv_blocks or (256 if args.smoke else None)
    engine = dict(device=str(device), dtype=args.dtype, num_kv_blocks=blocks,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                  swap_space_gib=0.01 if args.smoke else 4.0)
    points = []
    for s in args.system_prompts:
        for length in args.prompt_lens:
            base = {"device": str(device), "model_dir": str(folder), "engine": engine, "workload": w,
                    "vocab": vocab_size(folder), "num_system": s, "system_len": length}
            off, on = (run_child(__file__, {**base, "caching": c}, verbose=args.verbose) for c in (False, True))
            points.append({"num_system": s, "system_len": length, "off": off, "on": on,
                           "speedup": off["seconds"] / on["seconds"]})
            print(f"S={s} L={length}: off {off['seconds']:.2f} s, on {on['seconds']:.2f} s", file=sys.stderr)
    result = {**run_info(device), "dtype": args.dtype, "workload": w, "engine": engine, "points": points}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


if __name__ == "__main__":
    main()
