"""Decode attention: the paged Triton kernel against PyTorch SDPA (cuDNN, flash) and gather+SDPA.

Shapes (batch, context): 64/4096, 256/1024, 32/16384; 16 query heads, 8 KV heads, head_dim 128,
bf16, pages of 16 tokens with randomly permuted block ids.  The SDPA baselines read the same
K/V laid out contiguously ``[B, Hkv, L, D]``; gather+SDPA gathers the pages into that layout on
every call first.  Each SDPA backend is tried both with ``enable_gqa=True`` and with the G query
heads of a KV head folded into G query rows (which reads every K/V row once); the faster counts.

Times are medians of ``triton.testing.do_bench``; GB/s counts the K/V bytes read plus q and
out; "% copy" compares with a device-to-device copy measured in the same run (read + write).

    python benchmarks/bench_decode_attention.py --out results.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_common import git_commit

from pagedattn.attention import AttentionLayerSpec, AttentionMetadata
from pagedattn.attention import triton_ops as ops
from pagedattn.attention.triton_backend import TritonBackend

SHAPES = [(64, 4096), (256, 1024), (32, 16384)]
HQ, HKV, D, PAGE = 16, 8, 128, 16
DTYPE = torch.bfloat16


@dataclass
class Problem:
    batch: int
    ctx: int
    q: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor  # [N, PAGE, Hkv, D]
    v_cache: torch.Tensor
    meta: AttentionMetadata
    k: torch.Tensor  # [B, Hkv, L, D] contiguous copy of the same keys
    v: torch.Tensor
    layer: AttentionLayerSpec

    @property
    def bytes_moved(self) -> int:
        kv = 2 * self.batch * self.ctx * HKV * D * self.k.element_size()
        return kv + 2 * self.q.numel() * self.q.element_size()


def build(batch: int, ctx: int, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    per_seq = ctx // PAGE
    n_blocks = batch * per_seq
    tables = torch.randperm(n_blocks, generator=g).view(batch, per_seq).tolist()
    meta = AttentionMetadata.build([1] * batch, [ctx] * batch, tables, PAGE, device="cuda")
    k_cache = torch.randn(n_blocks, PAGE, HKV, D, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(n_blocks, PAGE, HKV, D, dtype=DTYPE, device="cuda")
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")
    k, v = (gather(c, meta.block_tables, batch, ctx).contiguous() for c in (k_cache, v_cache))
    return Problem(batch, ctx, q, k_cache, v_cache, meta, k, v, AttentionLayerSpec(HQ, HKV, D, D**-0.5))


def gather(cache: torch.Tensor, block_tables: torch.Tensor, batch: int, ctx: int) -> torch.Tensor:
    """Pages -> ``[B, Hkv, L, D]`` (a strided view of one gathered copy)."""
    return cache[block_tables.long()].view(batch, ctx, HKV, D).transpose(1, 2)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend, folded: bool) -> torch.Tensor:
    b = q.shape[0]
    with sdpa_kernel(backend):
        if folded:  # [B, Hkv, G, D]: a KV head's G query heads as G query rows
            return F.scaled_dot_product_attention(q.view(b, HKV, HQ // HKV, D), k, v).view(b, HQ, D)
        return F.scaled_dot_product_attention(q.view(b, HQ, 1, D), k, v, enable_gqa=True).view(b, HQ, D)


def bench(fn: Callable[[], object], quick: bool = False) -> float:
    """Median time in microseconds."""
    ms = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 200, return_mode="median")
    return ms * 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (GB/s)."""
    x = torch.randn(1 << 29, device="cuda")
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / us / 1e3


def best_sdpa(p: Problem, backend: SDPBackend, ref: torch.Tensor, gather_first: bool) -> dict:
    """Fastest working variant (gqa / folded) of one SDPA backend, with its error vs ours."""
    results = []
    for folded in (True, False):
        def run(folded: bool = folded) -> torch.Tensor:
            if gather_first:
                k = gather(p.k_cache, p.meta.block_tables, p.batch, p.ctx)
                v = gather(p.v_cache, p.meta.block_tables, p.batch, p.ctx)
                return sdpa(p.q, k, v, backend, folded)
            return sdpa(p.q, p.k, p.v, backend, folded)
        try:
            err = (run().float() - ref.float()).abs().max().item()
            results.append({"us": bench(run), "variant": "folded" if folded else "enable_gqa", "max_err": err})
        except RuntimeError as e:  # backend does not support this layout / card
            results.append({"us": math.inf, "variant": "folded" if folded else "enable_gqa",
                            "error": str(e).splitlines()[0][:200]})
    return min(results, key=lambda r: r["us"])


def run_shape(p: Problem, bw: float) -> dict:
    backend = TritonBackend()
    ours = backend.attend(p.q, p.k_cache, p.v_cache, p.meta, p.layer)
    ref = sdpa(p.q.float(), p.k.float(), p.v.float(), SDPBackend.MATH, folded=True)
    splits = ops.choose_num_splits(p.batch, HKV, p.ctx, torch.cuda.get_device_properties(0).multi_processor_count)
    row = {"batch": p.batch, "ctx": p.ctx, "splits": splits,
           "ours": {"us": bench(lambda: backend.attend(p.q, p.k_cache, p.v_cache, p.meta, p.layer)),
                    "max_err": (ours.float() - ref).abs().max().item()}}
    row["cudnn"] = best_sdpa(p, SDPBackend.CUDNN_ATTENTION, ours, gather_first=False)
    row["flash"] = best_sdpa(p, SDPBackend.FLASH_ATTENTION, ours, gather_first=False)
    gathered = [best_sdpa(p, b, ours, gather_first=True)
                for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)]
    row["gather_sdpa"] = min(gathered, key=lambda r: r["us"])
    for name in ("ours", "cudnn", "flash", "gather_sdpa"):
        r = row[name]
        r["gbps"] = p.bytes_moved / r["us"] / 1e3 if math.isfinite(r["us"]) else 0.0
        r["pct_copy"] = 100 * r["gbps"] / bw
    return row


def sweep(p: Problem, quick: bool = True) -> list[dict]:
    """Tile configs x split counts for the decode kernel alone (tuning aid)."""
    out = torch.empty_like(p.q)
    rows = []
    for block_n in (32, 64, 128):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                cfg = ops.DecodeConfig(block_n, warps, stages)
                for splits in (1, 2, 3, 4, 8):
                    def run(cfg: ops.DecodeConfig = cfg, splits: int = splits) -> None:
                        ops.decode_attention(p.q, p.k_cache, p.v_cache, p.meta.block_tables, p.meta.seq_lens,
                                             p.layer.scale, None, out, splits, config=cfg)
                    try:
                        us = bench(run, quick)
                    except Exception as e:  # out of shared memory etc.
                        rows.append({**asdict(cfg), "splits": splits, "error": str(e)[:120]})
                        continue
                    rows.append({**asdict(cfg), "splits": splits, "us": us,
                                 "gbps": p.bytes_moved / us / 1e3})
    return rows


def kernel_resources() -> list[dict]:
    """Registers / spills / shared memory of every compiled decode-kernel variant."""
    found = []
    for cache in ops.decode._decode_kernel.device_caches.values():
        for key, k in cache[0].items():
            found.append({"key": str(key)[:300], "n_regs": getattr(k, "n_regs", None),
                          "n_spills": getattr(k, "n_spills", None), "shared": getattr(k, "metadata", None)
                          and getattr(k.metadata, "shared", None)})
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write all numbers as JSON here")
    ap.add_argument("--sweep", action="store_true", help="also sweep tile configs and split counts")
    ap.add_argument("--shapes", default=",".join(f"{b}x{c}" for b, c in SHAPES), help="BxL,BxL,...")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False

    bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "copy_gbps": bw, "shapes": [], "sweep": {}}
    result["commit"] = git_commit()
    for b, c in shapes:
        p = build(b, c)
        result["shapes"].append(run_shape(p, bw))
        if args.sweep:
            rows = sweep(p)
            result["sweep"][f"{b}x{c}"] = rows
            ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
            print(f"sweep {b}x{c}: best " + "; ".join(
                f"bn{r['block_n']} w{r['num_warps']} s{r['num_stages']} sp{r['splits']} {r['us']:.0f}us"
                for r in ok[:6]), flush=True)
        del p
        torch.cuda.empty_cache()
    result["decode_kernel_resources"] = kernel_resources()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))

    print(f"\n{result['device']}  copy {bw:.0f} GB/s  torch {torch.__version__}  triton {triton.__version__}")
    hdr = f"{'B':>4} {'L':>6} {'sp':>3} | " + " | ".join(f"{n:>22}" for n in ("ours", "cudnn", "flash", "gather+sdpa"))
    print(hdr + " | ours/cudnn ours/flash  max|ours-ref|")
    for r in result["shapes"]:
        cells = [f"{r[n]['us']:7.1f}us {r[n]['gbps']:5.0f}GB/s {r[n]['pct_copy']:3.0f}%"
                 for n in ("ours", "cudnn", "flash", "gather_sdpa")]
        print(f"{r['batch']:>4} {r['ctx']:>6} {r['splits']:>3} | " + " | ".join(cells)
              + f" | {r['ours']['us'] / r['cudnn']['us']:9.3f} {r['ours']['us'] / r['flash']['us']:10.3f}"
              + f"  {r['ours']['max_err']:.1e}")


if __name__ == "__main__":
    main()
