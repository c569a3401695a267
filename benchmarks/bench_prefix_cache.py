"""Prefix caching end to end: many requests sharing one long system prompt, caching on vs off.

Workload: 128 requests, each one shared prefix of 2048 random token ids followed by its own
suffix of 16..64 random ids (seed 0), 64 output tokens each, greedy, EOS ignored.  The Qwen3-0.6B
architecture with random weights (throughput does not depend on them) in bf16.  Both modes run
in the same process, one engine after the other, each warmed up first on the same workload
around a different shared prefix (every kernel path compiled, nothing the timed run can hit).

Reported per mode: output and total (prompt + output) tokens/s; time to first token -- from a
request's arrival to its first sampled token, all requests being queued at once, so it includes
queueing -- mean, p50 and p90; the engine's prefix-cache hit rate over the timed run; and the
on/off ratios.

    python benchmarks/bench_prefix_cache.py [--num-requests 128] [--out result.json]
    python benchmarks/bench_prefix_cache.py --device cpu --smoke     # tiny model, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import git_commit, sync
from bench_throughput import make_model

# A Qwen3 small enough to run the smoke settings on a CPU in well under a second.
TINY_QWEN3 = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
    rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
)

# --smoke replaces these defaults (explicit flags still win).
SMOKE = dict(num_requests=6, prefix_len=48, suffix_min=3, suffix_max=9, output_len=4, num_kv_blocks=96,
             max_num_batched_tokens=64)


# ====================================================================== shared with bench_memory
def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """Flags both KV benchmarks take: where the model comes from and how the engine is sized."""
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--model-dir", default=None, help="use this HF model folder instead of a random Qwen3")
    ap.add_argument("--smoke", action="store_true", help="tiny model and workload (a CPU check in seconds)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-kv-blocks", type=int, default=None, help="default: sized from free memory")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--swap-space-gib", type=float, default=4.0)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                    help="overlap decode steps with host work (auto: on CUDA)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")


def apply_smoke(ap: argparse.ArgumentParser, args: argparse.Namespace, smoke: dict[str, Any]) -> None:
    """With ``--smoke``, swap in tiny defaults for every flag left at its default."""
    if not args.smoke:
        return
    for name, value in {**smoke, "swap_space_gib": 0.01}.items():
        if getattr(args, name) == ap.get_default(name):
            setattr(args, name, value)


def resolve_device_dtype(args: argparse.Namespace) -> tuple[torch.device, str]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was requested but no CUDA device is available")
    return device, args.dtype or ("bfloat16" if device.type == "cuda" else "float32")


def model_folder(args: argparse.Namespace, device: torch.device) -> Path:
    """The model to serve: ``--model-dir``, else a random tiny Qwen3 (smoke) or Qwen3-0.6B (CUDA)."""
    if args.model_dir:
        folder = Path(args.model_dir)
        if not (folder / "config.json").is_file():
            raise ValueError(f"model_dir: no config.json in {folder}")
        return folder
    folder = Path(tempfile.mkdtemp(prefix="pagedattn-bench-model-"))
    if args.smoke:
        import transformers

        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**TINY_QWEN3))
        model.save_pretrained(folder)
        return folder
    if device.type != "cuda":
        raise ValueError("device: the full Qwen3-0.6B workload needs CUDA; use --smoke or --model-dir on the CPU")
    model = make_model(folder, torch.bfloat16)
    del model  # the engine loads its own copy from the folder
    free_device_memory()
    return folder


def vocab_size(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["vocab_size"])


def engine_kwargs(args: argparse.Namespace, device: torch.device, dtype: str) -> dict[str, Any]:
    return dict(
        device=str(device), dtype=dtype, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_batched_tokens=args.max_num_batched_tokens,
        swap_space_gib=args.swap_space_gib, enforce_eager=args.enforce_eager,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
    )


def free_device_memory() -> None:
    """Drop a finished engine's memory (CUDA graphs and pools hold reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_info(device: torch.device) -> dict[str, Any]:
    """Card (or CPU), date, commit and library versions, for the record."""
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        card = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    commit = git_commit()
    info: dict[str, Any] = {"device": card, "date": time.strftime("%Y-%m-%d"), "commit": commit,
                            "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


# ====================================================================== this benchmark
def check_args(args: argparse.Namespace) -> None:
    for name in ("num_requests", "prefix_len", "suffix_min", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.suffix_max < args.suffix_min:
        raise ValueError(f"suffix_max ({args.suffix_max}) must be >= suffix_min ({args.suffix_min})")


def shared_prefix_workload(n: int, prefix_len: int, suffix_min: int, suffix_max: int, vocab: int,
                           seed: int = 0) -> list[list[int]]:
    """``n`` prompts: one common prefix, then a unique suffix of ``suffix_min..suffix_max`` ids."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(vocab) for _ in range(rng.randint(suffix_min, suffix_max))] for _ in range(n)]


def ttft_stats(outputs: Sequence[Any]) -> dict[str, float]:
    """Time to first token in ms from each output's ``arrival_time``/``first_token_time``."""
    ms = np.array([(o.metrics["first_token_time"] - o.metrics["arrival_time"]) * 1e3 for o in outputs])
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "max": float(ms.max())}  # max: when the last prefill was done; the rest of the run is decode


def run_mode(folder: Path, prompts: list[list[int]], args: argparse.Namespace, device: torch.device,
             dtype: str, caching: bool) -> dict[str, Any]:
    """Build an engine with prefix caching on or off, warm it up, and time the whole workload."""
    from pagedattn import LLM, SamplingParams

    max_len = args.prefix_len + args.suffix_max + args.output_len + 16
    llm = LLM(str(folder), enable_prefix_caching=caching, max_model_len=max_len,
              max_num_seqs=max(args.num_requests, 1), **engine_kwargs(args, device, dtype))
    # Warm-up: the same workload around another shared prefix.  It takes every kernel path the
    # timed run takes (chunked prefill continuing a prompt, prefill on top of cached blocks,
    # decode), so no compilation lands in the timing, yet caches nothing the timed run can hit.
    warm = shared_prefix_workload(len(prompts), args.prefix_len, args.suffix_min, args.suffix_max,
                                  vocab_size(folder), seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(warm, params, use_tqdm=False)
    before = llm.get_metrics()
    sync(device)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    seconds = time.perf_counter() - t
    after = llm.get_metrics()
    del llm
    free_device_memory()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    if n_out != args.output_len * len(prompts):
        raise RuntimeError(f"expected {args.output_len * len(prompts)} output tokens, got {n_out}")
    n_prompt = sum(map(len, prompts))
    queried = after["prefix_cache_query_tokens"] - before["prefix_cache_query_tokens"]
    hit = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    return {
        "prefix_caching": caching, "seconds": seconds, "output_tokens": n_out, "prompt_tokens": n_prompt,
        "output_tok_per_s": n_out / seconds, "total_tok_per_s": (n_out + n_prompt) / seconds,
        "ttft_ms": ttft_stats(outs), "prefix_cache_hit_rate": hit / queried if queried else 0.0,
        "prefix_cache_hit_tokens": hit, "prompt_tokens_computed": queried - hit,
    }


def print_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nPrefix caching on {result['device']} ({result['date']}, commit {result['commit']}): "
          f"{args.num_requests} requests, shared prefix {args.prefix_len} + suffix {args.suffix_min}..{args.suffix_max}"
          f" tokens, {args.output_len} output tokens each")
    print(f"{'prefix caching':14s} {'seconds':>8s} {'out tok/s':>10s} {'total tok/s':>11s} {'TTFT mean':>10s} "
          f"{'p50':>8s} {'p90':>8s} {'hit rate':>8s}")
    for r in (result["off"], result["on"]):
        t = r["ttft_ms"]
        print(f"{'on' if r['prefix_caching'] else 'off':14s} {r['seconds']:8.2f} {r['output_tok_per_s']:10.0f} "
              f"{r['total_tok_per_s']:11.0f} {t['mean']:8.1f}ms {t['p50']:6.1f}ms {t['p90']:6.1f}ms "
              f"{r['prefix_cache_hit_rate']:8.1%}")
    print(f"on / off: throughput {result['throughput_ratio']:.2f}x, mean TTFT {result['ttft_mean_ratio']:.2f}x lower")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--prefix-len", type=int, default=2048, help="tokens of the shared system prompt")
    ap.add_argument("--suffix-min", type=int, default=16)
    ap.add_argument("--suffix-max", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    add_engine_args(ap)
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    check_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device, dtype = resolve_device_dtype(args)
    folder = model_folder(args, device)
    prompts = shared_prefix_workload(args.num_requests, args.prefix_len, args.suffix_min, args.suffix_max,
                                     vocab_size(folder))
    off = run_mode(folder, prompts, args, device, dtype, caching=False)
    on = run_mode(folder, prompts, args, device, dtype, caching=True)
    result = {
        **run_info(device), "dtype": dtype, "off": off, "on": on,
        "throughput_ratio": on["output_tok_per_s"] / off["output_tok_per_s"],
        "ttft_mean_ratio": off["ttft_ms"]["mean"] / on["ttft_ms"]["mean"],
        "workload": vars(args),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result, args)
    return result


if __name__ == "__main__":
    main()
