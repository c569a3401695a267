"""The quantized linear kernels alone, on the Llama-3-8B layer shapes: time per call and the
weight bytes each call reads per second, against the dense bf16 GEMM and the copy bandwidth
measured in the same run.

Shapes (``N x K``): q/k/v fused 6144 x 4096, o 4096 x 4096, gate/up fused 28672 x 4096, down
4096 x 14336, LM head 128256 x 4096; rows ``M`` of activations (default 1, 16, 256: one
decode, a small batch, a full one).  Formats: ``bf16`` (``F.linear``, cuBLAS), ``w4a16``
(int4 with bf16 scales and zeros per group of 128, the AWQ layout), ``fp8`` (e4m3 with one
float32 scale per output row, the Triton GEMM every FP8 layer runs on CUDA), ``fp8-mm``
(the same weights through ``torch._scaled_mm`` with per-token activation scales), ``Q4_K``,
``Q6_K``, ``Q8_0``, ``Q4_0`` (GGUF blocks of random bytes with weight-sized scales); ``-deq``
after ``w4a16`` or a GGUF type: the weight dequantized to bf16 by its Triton kernel on every
call, then multiplied by cuBLAS (the large-batch form vLLM takes).  Each call is
timed in a CUDA graph (``triton.testing.do_bench_cudagraph``), as the engine's decode graphs
replay it; a split-K call includes its reduction.

"weight GB/s" counts the bytes of the weight (and its scales) the call must read, so at M=1 it
says how close a kernel comes to streaming its weight at the copy bandwidth, the decode bound.
``--sweep w4a16:1,Q4_K:256`` also times a kernel at those rows over a grid of launch configs.  The table is printed
a row at a time as it is measured; ``--out`` writes the JSON, again after every row.

    python benchmarks/bench_linear_kernels.py [--rows 1,16,256] [--formats bf16,w4a16,...] [--sweep FMT:M,...]
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_common import git_commit
from bench_quant import random_gguf_blocks

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
FORMATS = ("bf16", "w4a16", "w4a16-deq", "fp8", "fp8-mm", "Q4_K", "Q4_K-deq", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_K")
GROUP = 128


def time_us(fn: Callable[[], object]) -> float:
    import triton

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")) * 1e3


def copy_gbps() -> float:
    x = torch.ones(1 << 29, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / time_us(lambda: y.copy_(x)) / 1e3


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def w4a16_weights(n: int, k: int, dev: torch.device, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed int4 words ``[K/8, N]`` and bf16 scales and zero points per group of 128."""
    qw = torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32).to(dev)
    s = (torch.rand(k // GROUP, n, generator=gen) * 0.01 + 0.001).to(dev, torch.bfloat16)
    z = torch.randint(0, 16, (k // GROUP, n), generator=gen).to(dev, torch.bfloat16)
    return qw, s, z


def make_call(fmt: str, n: int, k: int, x: torch.Tensor, gen: torch.Generator
              ) -> tuple[Callable[[], object], int]:
    """The call of one format on an ``n x k`` weight and the weight bytes it reads."""
    from pagedattn.kernels import fp8, gguf_matmul, w4a16

    dev = x.device
    if fmt == "bf16":
        w = (torch.randn(n, k, generator=gen) * 0.02).to(dev, torch.bfloat16)
        return (lambda: torch.nn.functional.linear(x, w)), nbytes(w)
    if fmt in ("w4a16", "w4a16-deq"):
        qw, s, z = w4a16_weights(n, k, dev, gen)
        if fmt == "w4a16-deq":
            return (lambda: x @ w4a16.dequantize(qw, s, z, GROUP, x.dtype)), nbytes(qw, s, z)
        return (lambda: w4a16.w4a16_linear(x, qw, s, z, GROUP)), nbytes(qw, s, z)
    if fmt in ("fp8", "fp8-mm"):
        w = (torch.randn(n, k, generator=gen) * 0.5).to(dev).to(fp8.FP8_DTYPE)
        s = (torch.rand(n, 1, generator=gen) * 0.01 + 0.001).to(dev)
        if fmt == "fp8":
            group = fp8.row_group(k)
            return (lambda: fp8.fp8_block_linear(x, w, s, group, None)), nbytes(w, s)
        s_row = s.t().contiguous()
        return (lambda: fp8.fp8_linear(x, w, s_row, None, None)), nbytes(w, s)
    kind = fmt.removesuffix("-deq")
    blocks = random_gguf_blocks(kind, n, k, dev, gen)
    if fmt.endswith("-deq"):
        return (lambda: torch.nn.functional.linear(x, gguf_matmul.dequantize(blocks, kind, x.dtype))), nbytes(blocks)
    return (lambda: gguf_matmul.gguf_linear(x, blocks, kind)), nbytes(blocks)


def sweep_configs(fmt: str, m: int) -> list[Any]:
    """The launch configs ``--sweep`` times for ``fmt`` (``w4a16`` or a GGUF type) at ``m`` rows:
    around each kernel's heuristic (a compile each, so a few dozen a point)."""
    from pagedattn.kernels import gguf_matmul, w4a16

    make = (lambda bm, bn, bk, sp, w, st: w4a16.W4A16Config(bm, bn, bk, sp, w, st, gemv=bm == 1)) \
        if fmt == "w4a16" else \
        (lambda bm, bn, bk, sp, w, st: gguf_matmul.GGUFMatmulConfig(bm, bn, bk, sp, w, st, gemv=bm == 1))
    if m == 1 and fmt == "w4a16":
        grid = itertools.product((1,), (128, 256, 512), (64, 128), (4, 8, 16, 32), (2, 4, 8), (2,))
    elif m == 1:  # the K-quants' GEMVs step by super-blocks whatever block_k says
        block_ks = (256, 512) if gguf_matmul.GGUF_BLOCKS[fmt][0] == 32 else (256,)
        grid = itertools.product((1,), (16, 32, 64), block_ks, (1, 2, 4, 8), (4,), (1, 3))
    elif m <= 64 and fmt == "w4a16":  # the register-operand GEMM wants 128 outputs; K slices decide
        grid = itertools.product((16 if m <= 16 else 32 if m <= 32 else 64,), (64, 128), (64,),
                                 (1, 2, 4, 8, 16, 32), (4,), (3,))
    elif m <= 256 and fmt == "w4a16":  # 128-row tiles, split or not, against the 64-row ones
        grid = itertools.product((64, 128), (128,), (64,), (1, 2, 4, 8, 16), (4, 8), (3,))
    elif m <= 64:
        grid = itertools.product((16 if m <= 16 else 32 if m <= 32 else 64,), (32, 64, 128), (64, 128),
                                 (1, 2, 4, 8), (4,), (3,))
    else:
        grid = itertools.chain(  # one M tile of 256 rows dequantizes each weight tile once
            itertools.product((64, 128, 256) if m >= 256 else (64, 128), (64, 128, 256), (64,), (1,), (4, 8), (3, 4)),
            itertools.product((64, 128), (128,), (128,), (1,), (4, 8), (3,)))
    return [make(*c) for c in grid]


def sweep(fmt: str, name: str, m: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """``fmt``'s kernel on shape ``name`` at ``m`` rows over :func:`sweep_configs`, fastest first,
    with each config's largest error against the heuristic's output."""
    from pagedattn.kernels import gguf_matmul, w4a16

    n, k = SHAPES[name]
    x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
    if fmt == "w4a16":
        qw, s, z = w4a16_weights(n, k, x.device, gen)
        wb = nbytes(qw, s, z)
        call = lambda cfg: w4a16.w4a16_linear(x, qw, s, z, GROUP, config=cfg)  # noqa: E731
    else:
        blocks = random_gguf_blocks(fmt, n, k, x.device, gen)
        wb = nbytes(blocks)
        call = lambda cfg: gguf_matmul.gguf_linear(x, blocks, fmt, config=cfg)  # noqa: E731
    ref = call(None).float()
    default_us = time_us(lambda: call(None))
    rows = []
    for cfg in sweep_configs(fmt, m):
        try:
            err = (call(cfg).float() - ref).abs().max().item()
            us = time_us(lambda cfg=cfg: call(cfg))
        except Exception as e:  # a config past the shared memory or register limits
            print(f"  {cfg}: {type(e).__name__}", flush=True)
            continue
        rows.append(dict(config=repr(cfg), us=us, gbps=wb / us / 1e3, err=err, default_us=default_us))
    return sorted(rows, key=lambda r: r["us"])


def save(res: dict[str, Any], out: Path | None) -> None:
    """Write what is measured so far (a run cut short by a time limit keeps its rows)."""
    if out is not None:
        out.write_text(json.dumps(res, indent=1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,256")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", default="", help="also sweep launch configs: comma-separated FORMAT:M points "
                    "(w4a16 or a GGUF type; e.g. w4a16:1,Q4_K:1,w4a16:256) on --sweep-shape")
    ap.add_argument("--sweep-shape", default="gate_up")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    bw = copy_gbps()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "commit": git_commit(),
                           "copy_GBps": bw, "rows": []}
    # Each row is printed as soon as it is timed: a run cut short still shows what it measured.
    print(f"{res['device']}, commit {res['commit']}, copy bandwidth {bw:.0f} GB/s")
    print("| shape | M | format | us | weight GB/s | % copy | vs bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
            base = None
            for fmt in args.formats.split(","):
                fn, wb = make_call(fmt, n, k, x, gen)
                us = time_us(fn)
                base = us if fmt == "bf16" else base
                r = dict(shape=name, n=n, k=k, m=m, format=fmt, us=us, weight_bytes=wb, gbps=wb / us / 1e3,
                         share_of_copy=wb / us / 1e3 / bw, speedup_vs_bf16=(base / us) if base else None)
                res["rows"].append(r)
                save(res, args.out)
                vs = f"{base / us:.2f}x" if base else "-"
                print(f"| {name} | {m} | {fmt} | {us:.1f} | {r['gbps']:.0f} | {100 * r['share_of_copy']:.0f}% | {vs} |",
                      flush=True)
                del fn
                torch.cuda.empty_cache()
    if args.sweep:
        res["sweep"] = {}
        for point in args.sweep.split(","):
            fmt, m = point.split(":")
            rows = res["sweep"][point] = sweep(fmt, args.sweep_shape, int(m), gen)
            save(res, args.out)
            print(f"{fmt} sweep, {args.sweep_shape}, M={m}: heuristic {rows[0]['default_us']:.1f} us; fastest:")
            for r in rows[:6]:
                print(f"  {r['config']}: {r['us']:.1f} us, {r['gbps']:.0f} GB/s, err {r['err']:.1e}", flush=True)
    save(res, args.out)
    return res


if __name__ == "__main__":
    main()
