"""Shared-prefix decode: cascade attention against the plain paged kernel and cuDNN SDPA.

Shapes (batch, shared prefix, own tail): 128 / 2048 / 64 (the prefix-caching benchmark's
decode), 32 / 4096 / 64 (a small batch: the split-KV path), 256 / 512 / 64, and 128 / 0 / 2048
(nothing shared: cascade must cost nothing there); 16 query heads, 8 KV heads, head_dim 128,
bf16, pages of 16 tokens with randomly permuted block ids.  Every row's table starts with the
same prefix blocks, then blocks of its own.

* ``cascade`` / ``plain``: our backend's eager ``attend`` with cascade decode on / off (the plan
  is made once per step and cached, as every layer after the first sees it);
* ``cascade graph`` / ``plain graph``: the same captured in a CUDA graph the way the engine's
  decode graphs do (fixed grids, cascade inputs refilled through ``prepare_for_replay``,
  which also picks the variant the engine would replay: the plain one when nothing is shared);
* ``cudnn``: SDPA's cuDNN backend on the same keys laid out contiguously ``[B, Hkv, L, D]``
  (it reads the prefix once per row, as any kernel without sharing must); the faster of the
  GQA and the folded-heads layouts (see ``bench_decode_attention.py``).

Times are medians of ``triton.testing.do_bench``.  GB/s counts the K/V bytes each row attends
(prefix included, as if read per row): the rate the plain kernel would need to match.
``unique GB`` is what cascade must read at least (the prefix once plus the tails).
``plan/reuse us``: host time of finding the groups and planning a step, and of checking that
the previous step's plan still holds (all a steady decode batch pays per step).

    python benchmarks/bench_cascade_decode.py --out results.json [--shapes 128x2048+64,...]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import triton
from bench_decode_attention import bench, copy_bandwidth, sdpa
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pagedattn.attention import AttentionLayerSpec, AttentionMetadata
from pagedattn.attention.cascade import CascadeConfig, build_plan, max_work_items, plan_signature, plan_still_holds
from pagedattn.attention.metadata import HostBatch
from pagedattn.attention.triton_backend import DecodeLaunch, TritonBackend

SHAPES = [(128, 2048, 64), (32, 4096, 64), (256, 512, 64), (128, 0, 2048)]
HQ, HKV, D, PAGE = 16, 8, 128, 16
DTYPE = torch.bfloat16


@dataclass
class Problem:
    batch: int
    prefix: int
    tail: int
    q: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor  # [N, PAGE, Hkv, D]
    v_cache: torch.Tensor
    tables: np.ndarray  # [B, blocks] int32
    meta: AttentionMetadata
    layer: AttentionLayerSpec

    @property
    def ctx(self) -> int:
        return self.prefix + self.tail

    @property
    def bytes_attended(self) -> int:
        return 2 * self.batch * self.ctx * HKV * D * self.k_cache.element_size()

    @property
    def bytes_unique(self) -> int:
        return 2 * (self.prefix + self.batch * self.tail) * HKV * D * self.k_cache.element_size()


def build(batch: int, prefix: int, tail: int, seed: int = 0) -> Problem:
    if prefix % PAGE or tail < 1:
        raise ValueError(f"prefix must be a multiple of {PAGE} and tail >= 1, got {prefix}, {tail}")
    g = torch.Generator().manual_seed(seed)
    shared = prefix // PAGE
    own = -(-tail // PAGE)
    n_blocks = shared + batch * own
    ids = torch.randperm(n_blocks, generator=g)
    tables = torch.cat([ids[:shared].expand(batch, shared), ids[shared:].view(batch, own)], dim=1)
    tables_np = tables.numpy().astype(np.int32)
    meta = AttentionMetadata.build([1] * batch, [prefix + tail] * batch, tables.tolist(), PAGE, device="cuda")
    k_cache = torch.randn(n_blocks, PAGE, HKV, D, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(n_blocks, PAGE, HKV, D, dtype=DTYPE, device="cuda")
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")
    return Problem(batch, prefix, tail, q, k_cache, v_cache, tables_np, meta, AttentionLayerSpec(HQ, HKV, D, D**-0.5))


def contiguous_kv(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Hkv, L, D]`` copies of every row's keys and values (prefix repeated per row)."""
    bt = p.meta.block_tables.long()
    k, v = (c[bt].reshape(p.batch, -1, HKV, D)[:, :p.ctx].transpose(1, 2).contiguous()
            for c in (p.k_cache, p.v_cache))
    return k, v


def fresh_meta(p: Problem) -> AttentionMetadata:
    return AttentionMetadata.build([1] * p.batch, [p.ctx] * p.batch, p.tables.tolist(), PAGE, device="cuda")


def graph_of(p: Problem, backend: TritonBackend) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, object]:
    """A captured decode step over static copies of the problem's metadata (as DecodeGraphs
    does).  The third value holds what the graph reads (metadata, the backend's buffers): keep
    it alive while replaying."""
    static = fresh_meta(p)
    backend.init_cuda_graphs(p.batch, p.ctx, PAGE, p.layer, "cuda")
    step = HostBatch.build([1] * p.batch, [p.ctx] * p.batch, p.tables.tolist(), PAGE)
    backend.prepare_for_capture(static, backend.prepare_for_replay(step, p.batch))
    backend.attend(p.q, p.k_cache, p.v_cache, static, p.layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.attend(p.q, p.k_cache, p.v_cache, static, p.layer)
    return graph, out, (static, backend)


def plan_time_us(p: Problem) -> tuple[float, float]:
    """Host microseconds to plan a step from scratch, and to check that the previous step's
    plan still holds (what a steady decode batch pays per step)."""
    cfg = CascadeConfig()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    items = max_work_items(p.batch, HQ // HKV, HKV, sms, cfg)
    lens = np.full(p.batch, p.ctx, dtype=np.int32)
    plan = build_plan(p.tables, lens, PAGE, HQ // HKV, items, cfg)
    sig = plan_signature(plan, p.tables, lens, PAGE)
    times = []
    for fn in (lambda: build_plan(p.tables, lens, PAGE, HQ // HKV, items, cfg),
               lambda: plan_still_holds(plan, sig, p.tables, lens + 1)):
        reps = 200
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps * 1e6)
    return times[0], times[1]


def run_shape(p: Problem) -> dict:
    k, v = contiguous_kv(p)
    ref = sdpa(p.q.float(), k.float(), v.float(), SDPBackend.MATH, folded=True)
    plan_us, reuse_us = plan_time_us(p)
    row: dict = {"batch": p.batch, "prefix": p.prefix, "tail": p.tail, "plan_us": plan_us, "plan_reuse_us": reuse_us}

    def record(name: str, fn, out_fn) -> None:
        fn()
        torch.cuda.synchronize()
        err = (out_fn().float() - ref).abs().max().item()
        row[name] = {"us": bench(fn), "max_err": err}

    for name, cascade in (("cascade", True), ("plain", False)):
        backend = TritonBackend(cascade=cascade)
        meta = fresh_meta(p)
        holder: dict[str, torch.Tensor] = {}

        def eager(backend: TritonBackend = backend, meta: AttentionMetadata = meta,
                  holder: dict[str, torch.Tensor] = holder) -> None:
            holder["out"] = backend.attend(p.q, p.k_cache, p.v_cache, meta, p.layer)

        record(name, eager, lambda holder=holder: holder["out"])
        row[name]["grouped"] = isinstance(meta.state, DecodeLaunch) and meta.state.cascade is not None
        graph, out, keep = graph_of(p, TritonBackend(cascade=cascade))
        record(f"{name}_graph", graph.replay, lambda out=out: out)
        del graph, keep
    cudnn = []
    for folded in (True, False):
        def run(folded: bool = folded, k: torch.Tensor = k, v: torch.Tensor = v) -> torch.Tensor:
            return sdpa(p.q, k, v, SDPBackend.CUDNN_ATTENTION, folded)
        try:
            r = {"us": bench(run), "max_err": (run().float() - ref).abs().max().item(),
                 "variant": "folded" if folded else "enable_gqa"}
        except RuntimeError as e:  # not supported on this card / layout
            r = {"us": math.inf, "variant": "folded" if folded else "enable_gqa", "error": str(e).splitlines()[0][:200]}
        cudnn.append(r)
    row["cudnn"] = min(cudnn, key=lambda r: r["us"])
    for name in ("cascade", "plain", "cascade_graph", "plain_graph", "cudnn"):
        r = row[name]
        r["gbps_attended"] = p.bytes_attended / r["us"] / 1e3 if math.isfinite(r["us"]) else 0.0
    row["unique_gb"] = p.bytes_unique / 1e9
    row["attended_gb"] = p.bytes_attended / 1e9
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write all numbers as JSON here")
    ap.add_argument("--shapes", default=",".join(f"{b}x{p}+{t}" for b, p, t in SHAPES),
                    help="BxPREFIX+TAIL,... (prefix a multiple of 16)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    shapes = []
    for s in args.shapes.split(","):
        b, rest = s.split("x")
        pre, tail = rest.split("+")
        shapes.append((int(b), int(pre), int(tail)))
    torch.backends.cuda.matmul.allow_tf32 = False

    bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "copy_gbps": bw, "cascade_config": vars(CascadeConfig()),
              "shapes": []}
    for b, pre, tail in shapes:
        p = build(b, pre, tail)
        result["shapes"].append(run_shape(p))
        del p
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))

    print(f"\n{result['device']}  copy {bw:.0f} GB/s  torch {torch.__version__}  triton {triton.__version__}")
    names = ("cascade", "plain", "cascade_graph", "plain_graph", "cudnn")
    print(f"{'B':>4} {'prefix':>6} {'tail':>4} | " + " | ".join(f"{n:>20}" for n in names)
          + " | plain/casc cudnn/casc (graph)  uniqueGB  plan/reuse us  max err")
    for r in result["shapes"]:
        cells = [f"{r[n]['us']:8.1f}us {r[n]['gbps_attended']:6.0f}GB/s" for n in names]
        errs = max(r[n]["max_err"] for n in names if "max_err" in r[n])
        print(f"{r['batch']:>4} {r['prefix']:>6} {r['tail']:>4} | " + " | ".join(cells)
              + f" | {r['plain_graph']['us'] / r['cascade_graph']['us']:10.2f}"
              + f" {r['cudnn']['us'] / r['cascade_graph']['us']:10.2f}        "
              + f"{r['unique_gb']:8.3f} {r['plan_us']:6.0f}/{r['plan_reuse_us']:<5.0f}  {errs:.1e}")
    return result


if __name__ == "__main__":
    main()
