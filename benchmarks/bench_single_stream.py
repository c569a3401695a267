"""Single-stream decode, what one chat user feels: one request at a time on a Llama-3-8B shape,
against the weight-read roofline measured in the same run.

The Llama-3-8B architecture with dummy weights (``load_format="dummy"``) in bf16, in a fresh
process: build the engine, a short warm-up of a few tiny requests (not the timed shape), then one
request of ``--prompt-len`` random tokens decoded to ``--t1`` and to ``--t2`` new tokens (greedy,
EOS ignored); decode tok/s = ``(t2 - t1) / (time(t2) - time(t1))`` (prefill cancels).  The first
timed run is reported, and the best of ``--repeat`` more.

The roofline: each decode step reads every weight once (the KV cache of one short sequence is a
rounding error), so tok/s <= bandwidth / weight bytes, with the bandwidth of a device copy
measured in the same run (bytes read + written per second, the figure the issue's 77% was
taken against).  Target: >= 85% of it.  ``--hf`` adds transformers' ``generate`` on the same
shape (after the engine is shut down), a single request, for scale.

    python benchmarks/bench_single_stream.py [--repeat 3] [--hf] [--out result.json]
    python benchmarks/bench_single_stream.py --device cpu --smoke     # a tiny Llama, a CPU check
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import git_commit
from bench_moe import copy_bandwidth
from bench_quant import LLAMA3_8B, TINY, sync, weight_bytes, write_model


def decode_rate(llm: Any, prompt: list[int], t1: int, t2: int, device: str) -> float:
    from pagedattn import SamplingParams

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                     use_tqdm=False)
        sync(device)
        return time.perf_counter() - t

    a, b = run(t1), run(t2)
    return (t2 - t1) / (b - a) if b > a else t2 / b


def hf_rate(folder: Path, prompt: list[int], t1: int, t2: int, device: str, dtype: torch.dtype) -> float:
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    ids = torch.tensor([prompt], device=device)

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    run(4)  # warm-up
    a, b = run(t1), run(t2)
    return (t2 - t1) / (b - a) if b > a else t2 / b


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="a tiny Llama and short runs (a CPU check of the script)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--t1", type=int, default=32)
    ap.add_argument("--t2", type=int, default=288)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs after the first (the best is reported)")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate on the same shape")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompt_len, args.t1, args.t2, args.repeat = 8, 2, 6, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --smoke")
    from pagedattn import LLM, SamplingParams

    shape = TINY if args.smoke else LLAMA3_8B
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    rng = random.Random(0)
    prompt = [rng.randrange(shape["vocab_size"]) for _ in range(args.prompt_len)]
    res: dict[str, Any] = {"commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                           "shape": "tiny llama" if args.smoke else "Llama-3-8B", "dtype": str(dtype)[6:],
                           "prompt_len": args.prompt_len, "t1": args.t1, "t2": args.t2}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp), "dense", shape, None)
        t0 = time.perf_counter()
        llm = LLM(str(folder), load_format="dummy", device=args.device, dtype=res["dtype"], seed=0,
                  max_model_len=args.prompt_len + args.t2 + 16, max_num_seqs=8)
        res["build_seconds"] = time.perf_counter() - t0
        # A short warm-up on other lengths than the timed request's.
        llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], SamplingParams(max_tokens=4), use_tqdm=False)
        res["weight_bytes"] = weight_bytes(llm)
        rates = [decode_rate(llm, prompt, args.t1, args.t2, args.device) for _ in range(1 + args.repeat)]
        res["first_tok_s"], res["best_tok_s"] = rates[0], max(rates)
        llm.shutdown()
        del llm
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        bw = copy_bandwidth(torch.device(args.device), (1 << 20) if args.smoke else (1 << 31), 20)  # GB/s
        res["copy_bandwidth_GBps"] = bw
        res["roofline_tok_s"] = bw * 1e9 / res["weight_bytes"]
        if args.hf:
            res["hf_tok_s"] = hf_rate(folder, prompt, args.t1, args.t2, args.device, dtype)
    roof = res["roofline_tok_s"]
    print(f"single-stream decode, {res['shape']} {res['dtype']} on {res['device']} (commit {res['commit']})")
    print(f"{'':28}{'tok/s':>10}{'of roofline':>13}")
    print(f"{'roofline (copy bandwidth)':28}{roof:>10.1f}{'100.0%':>13}")
    print(f"{'pagedattn, first timed run':28}{res['first_tok_s']:>10.1f}{res['first_tok_s'] / roof:>12.1%}")
    print(f"{'pagedattn, best run':28}{res['best_tok_s']:>10.1f}{res['best_tok_s'] / roof:>12.1%}")
    if "hf_tok_s" in res:
        print(f"{'transformers generate':28}{res['hf_tok_s']:>10.1f}{res['hf_tok_s'] / roof:>12.1%}")
    print(f"weights {res['weight_bytes'] / 2**30:.2f} GiB, copy bandwidth {bw:.0f} GB/s; target >= 85% of the roofline")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
