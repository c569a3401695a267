"""The sampler's time per step on the device: one call of ``Sampler.sample`` on a batch of
logits (the LM head's dtype), for several batch sizes and sampling modes, against reading the
logits once at the copy bandwidth measured in the same run.

Modes: ``greedy`` (temperature 0), ``temperature`` (0.6, as in ``bench_throughput.py``),
``seeded`` (the same with a seed on every row), ``top_p`` (0.9: the filtering path).  Logits are
normal with standard deviation ``--logit-std``: 1 is flat (top-p keeps ~70% of the vocabulary at
temperature 0.6: the CPU's partial sort cannot decide it), 4 is peaked as a trained model's
usually are (a few hundred tokens hold 0.9).  The rows'
tensors are prepared once, as a decode step that reuses its batch has them; times are medians of
``triton.testing.do_bench`` (CUDA) or of wall-clock repetitions (CPU).

    python benchmarks/bench_sampler.py [--vocab 151936] [--batches 1,8,64,256] [--dtype bfloat16]
                                       [--logit-std 1.0] [--device cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_common import copy_bandwidth, git_commit, median_us

from pagedattn.engine.sampler import Sampler, SamplingRow
from pagedattn.engine.sampling_params import SamplingParams
from pagedattn.engine.sequence import SeedStream

MODES = {
    "greedy": lambda i: SamplingRow(SamplingParams(temperature=0.0), None),
    "temperature": lambda i: SamplingRow(SamplingParams(temperature=0.6), None),
    "seeded": lambda i: SamplingRow(SamplingParams(temperature=0.6, seed=i), SeedStream(i)),
    "top_p": lambda i: SamplingRow(SamplingParams(temperature=0.6, top_p=0.9), None),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--logit-std", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    reps = 300 if device.type == "cuda" else 10  # do_bench's milliseconds on CUDA, repetitions elsewhere
    gbps = copy_bandwidth(device, 1 << 28, reps)  # 256 MiB: beyond any cache
    sampler = Sampler(device, seed=0)
    sampler.warm_up(args.vocab, dtype)
    rows_out = []
    for n in (int(b) for b in args.batches.split(",")):
        logits = (torch.randn(n, args.vocab, device=device) * args.logit_std).to(dtype)
        bound_us = logits.numel() * logits.element_size() / (gbps / 2) / 1e3  # one read at the copy rate
        for mode, make in MODES.items():
            batch = sampler.prepare([make(i) for i in range(n)])
            us = median_us(lambda logits=logits, batch=batch: sampler.sample(logits, batch), device, reps)
            rows_out.append(dict(batch=n, mode=mode, us=us, bound_us=bound_us))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, commit {git_commit()}, vocab {args.vocab}, {args.dtype} logits of std {args.logit_std}, "
          f"copy {gbps:.0f} GB/s")
    print(f"| batch | {' | '.join(MODES)} | logits read once |")
    print(f"| --- | {' | '.join('---' for _ in MODES)} | --- |")
    for n in sorted({r["batch"] for r in rows_out}):
        cells = [f"{r['us']:.1f} us" for r in rows_out if r["batch"] == n]
        bound = next(r["bound_us"] for r in rows_out if r["batch"] == n)
        print(f"| {n} | {' | '.join(cells)} | {bound:.1f} us |")
    result = dict(device=name, commit=git_commit(), copy_gbps=gbps, rows=rows_out)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
