"""Shared-prefix decode: cascade attention against the plain paged kernel and cuDNN SDPA.

Shapes (batch, shared prefix, own tail): 128 / 2048 / 64 (the prefix-caching benchmark's
decode), 32 / 4096 / 64 (a small batch: the split-KV path), 256 / 512 / 64, 128 / 0 / 2048
(nothing shared: cascade must cost nothing there), and ``256x992+30..900/2``, a chat service's
decode (``bench_prefix_family.py`` at 1000 shared tokens): own tails drawn uniformly from
30..900 tokens, the rows spread round robin over 2 system prompts.  16 query heads, 8 KV
heads, head_dim 128, bf16, pages of 16 tokens with randomly permuted block ids.  Every row's
table starts with its group's prefix blocks, then blocks of its own.  Where the rows' lengths
differ cuDNN, which takes one length, is not run.

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

    python benchmarks/bench_cascade_decode.py --out results.json [--shapes 128x2048+64,256x992+30..900/2,...]
    python benchmarks/bench_cascade_decode.py --sweep --shapes 256x992+30..900/2   # the cascade plans
"""

from __future__ import annotations

import argparse
import itertools
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

SHAPES = ["128x2048+64", "32x4096+64", "256x512+64", "128x0+2048", "256x992+30..900/2"]
HQ, HKV, D, PAGE = 16, 8, 128, 16
DTYPE = torch.bfloat16


@dataclass
class Problem:
    prefix: int  # shared tokens of each group
    groups: int  # system prompts the rows share, round robin
    tails: np.ndarray  # [B] each row's own tokens
    q: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor  # [N, PAGE, Hkv, D]
    v_cache: torch.Tensor
    tables: np.ndarray  # [B, blocks] int32
    layer: AttentionLayerSpec

    @property
    def batch(self) -> int:
        return int(self.tails.shape[0])

    @property
    def lens(self) -> list[int]:
        return (self.prefix + self.tails).tolist()

    @property
    def uniform(self) -> bool:
        return bool((self.tails == self.tails[0]).all())

    @property
    def bytes_attended(self) -> int:
        return 2 * sum(self.lens) * HKV * D * self.k_cache.element_size()

    @property
    def bytes_unique(self) -> int:
        return 2 * (self.groups * self.prefix + int(self.tails.sum())) * HKV * D * self.k_cache.element_size()


def build(batch: int, prefix: int, tail: tuple[int, int], groups: int = 1, seed: int = 0,
          device: str = "cuda") -> Problem:
    """``batch`` rows spread round robin over ``groups`` shared prefixes of ``prefix`` tokens,
    each with its own tail of ``tail[0]..tail[1]`` tokens (uniform)."""
    if prefix % PAGE or tail[0] < 1 or tail[1] < tail[0] or groups < 1:
        raise ValueError(f"prefix must be a multiple of {PAGE}, tails >= 1 and groups >= 1, got {prefix}, {tail}, "
                         f"{groups}")
    g = torch.Generator().manual_seed(seed)
    tails = torch.randint(tail[0], tail[1] + 1, (batch,), generator=g).numpy()
    shared = prefix // PAGE
    own = -(-tails // PAGE)
    ids = torch.randperm(groups * shared + int(own.sum()), generator=g).numpy().astype(np.int32)
    tables = np.zeros((batch, shared + int(own.max())), dtype=np.int32)
    pos = groups * shared
    for r in range(batch):
        grp = r % groups
        tables[r, :shared] = ids[grp * shared:(grp + 1) * shared]
        tables[r, shared:shared + own[r]] = ids[pos:pos + own[r]]
        pos += own[r]
    k_cache = torch.randn(ids.size, PAGE, HKV, D, dtype=DTYPE, device=device)
    v_cache = torch.randn(ids.size, PAGE, HKV, D, dtype=DTYPE, device=device)
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device=device)
    return Problem(prefix, groups, tails, q, k_cache, v_cache, tables, AttentionLayerSpec(HQ, HKV, D, D**-0.5))


def row_kv(p: Problem, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, Hkv, L, D]`` copies of one row's keys and values."""
    bt = torch.from_numpy(p.tables[row]).long().to(p.k_cache.device)
    k, v = (c[bt].reshape(-1, HKV, D)[:p.lens[row]].transpose(0, 1).unsqueeze(0).contiguous()
            for c in (p.k_cache, p.v_cache))
    return k, v


def contiguous_kv(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Hkv, L, D]`` copies of every row's keys and values (prefix repeated per row; rows of
    one length)."""
    k, v = zip(*(row_kv(p, r) for r in range(p.batch)))
    return torch.cat(k), torch.cat(v)


def reference(p: Problem) -> torch.Tensor:
    """The float32 attention of every row (SDPA's math backend, row by row)."""
    outs = []
    for r in range(p.batch):
        k, v = row_kv(p, r)
        outs.append(sdpa(p.q[r:r + 1].float(), k.float(), v.float(), SDPBackend.MATH, folded=True))
    return torch.cat(outs)


def fresh_meta(p: Problem) -> AttentionMetadata:
    return AttentionMetadata.build([1] * p.batch, p.lens, p.tables.tolist(), PAGE, device="cuda")


def graph_of(p: Problem, backend: TritonBackend) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, object]:
    """A captured decode step over static copies of the problem's metadata (as DecodeGraphs
    does).  The third value holds what the graph reads (metadata, the backend's buffers): keep
    it alive while replaying."""
    static = fresh_meta(p)
    backend.init_cuda_graphs(p.batch, max(p.lens), PAGE, p.layer, "cuda")
    step = HostBatch.build([1] * p.batch, p.lens, p.tables.tolist(), PAGE)
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
    lens = np.asarray(p.lens, dtype=np.int32)
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


def cudnn(p: Problem, ref: torch.Tensor) -> dict:
    """SDPA's cuDNN backend on contiguous copies (rows of one length), the faster layout."""
    k, v = contiguous_kv(p)
    results = []
    for folded in (True, False):
        def run(folded: bool = folded) -> torch.Tensor:
            return sdpa(p.q, k, v, SDPBackend.CUDNN_ATTENTION, folded)
        try:
            r = {"us": bench(run), "max_err": (run().float() - ref).abs().max().item(),
                 "variant": "folded" if folded else "enable_gqa"}
        except RuntimeError as e:  # not supported on this card / layout
            r = {"us": math.inf, "variant": "folded" if folded else "enable_gqa", "error": str(e).splitlines()[0][:200]}
        results.append(r)
    return min(results, key=lambda r: r["us"])


def parse_shape(spec: str) -> tuple[int, int, tuple[int, int], int]:
    """``BxPREFIX+TAIL`` or ``BxPREFIX+LO..HI[/GROUPS]`` -> (batch, prefix, (lo, hi), groups)."""
    b, rest = spec.split("x")
    pre, tail = rest.split("+")
    tail, _, groups = tail.partition("/")
    lo, _, hi = tail.partition("..")
    return int(b), int(pre), (int(lo), int(hi or lo)), int(groups or 1)


def run_shape(p: Problem, spec: str) -> dict:
    ref = reference(p)
    plan_us, reuse_us = plan_time_us(p)
    row: dict = {"shape": spec, "batch": p.batch, "prefix": p.prefix, "groups": p.groups,
                 "tail_min": int(p.tails.min()), "tail_max": int(p.tails.max()), "tail_mean": float(p.tails.mean()),
                 "plan_us": plan_us, "plan_reuse_us": reuse_us}

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
    row["cudnn"] = cudnn(p, ref) if p.uniform else {"us": math.inf, "error": "rows of different lengths"}
    for name in ("cascade", "plain", "cascade_graph", "plain_graph", "cudnn"):
        r = row[name]
        r["gbps_attended"] = p.bytes_attended / r["us"] / 1e3 if math.isfinite(r["us"]) else 0.0
    row["unique_gb"] = p.bytes_unique / 1e9
    row["attended_gb"] = p.bytes_attended / 1e9
    return row


def sweep_configs() -> list[CascadeConfig]:
    """The cascade plans ``--sweep`` times: programs per SM, the shortest key chunk and the
    (row, head) pairs of a prefix program (its ``tl.dot``'s M) around the defaults, which are
    among them."""
    return [CascadeConfig(programs_per_sm=pps, min_chunk_tokens=chunk, block_m=bm)
            for pps, chunk, bm in itertools.product((1, 2, 4, 8), (64, 128, 256, 512), (16, 32, 64, 128))]


def print_sweep(result: dict) -> None:
    default = vars(CascadeConfig())
    print(f"\n{result['device']}  copy {result['copy_gbps']:.0f} GB/s: captured cascade step per plan, fastest first")
    for shape in result["shapes"]:
        rows = shape["sweep"]
        base = next(r["us"] for r in rows if r["config"] == default)
        print(f"{shape['shape']}: default plan {base:.1f} us")
        for r in rows[:8]:
            c = r["config"]
            print(f"  programs/SM {c['programs_per_sm']}, chunks >= {c['min_chunk_tokens']}, pairs {c['block_m']}: "
                  f"{r['us']:.1f} us ({base / r['us']:.2f}x the default's speed), max err {r['max_err']:.1e}")


def sweep(p: Problem) -> list[dict]:
    """The captured cascade step of ``p`` under every :func:`sweep_configs` plan, fastest first,
    each with its largest error against the float32 reference."""
    ref = reference(p)
    rows = []
    for cfg in sweep_configs():
        graph, out, keep = graph_of(p, TritonBackend(cascade=cfg))
        graph.replay()
        torch.cuda.synchronize()
        rows.append({"config": vars(cfg), "us": bench(graph.replay), "max_err": (out.float() - ref).abs().max().item()})
        del graph, keep
    return sorted(rows, key=lambda r: r["us"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write all numbers as JSON here")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="BxPREFIX+TAIL or BxPREFIX+LO..HI/GROUPS, comma-separated (prefix a multiple of 16)")
    ap.add_argument("--sweep", action="store_true", help="time the captured cascade step of each shape under "
                    "every plan of sweep_configs() instead (a compile per pairs-per-program value)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    shapes = args.shapes.split(",")
    for spec in shapes:
        parse_shape(spec)  # a malformed shape fails before any work
    torch.backends.cuda.matmul.allow_tf32 = False

    bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "copy_gbps": bw, "cascade_config": vars(CascadeConfig()),
              "shapes": []}
    for spec in shapes:
        b, pre, tail, groups = parse_shape(spec)
        p = build(b, pre, tail, groups)
        result["shapes"].append({"shape": spec, "sweep": sweep(p)} if args.sweep else run_shape(p, spec))
        del p
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    if args.sweep:
        print_sweep(result)
        return result

    print(f"\n{result['device']}  copy {bw:.0f} GB/s  torch {torch.__version__}  triton {triton.__version__}")
    names = ("cascade", "plain", "cascade_graph", "plain_graph", "cudnn")
    print(f"{'shape':>18} | " + " | ".join(f"{n:>20}" for n in names)
          + " | plain/casc cudnn/casc (graph)  uniqueGB  plan/reuse us  max err")
    for r in result["shapes"]:
        cells = [f"{r[n]['us']:8.1f}us {r[n]['gbps_attended']:6.0f}GB/s" for n in names]
        errs = max(r[n]["max_err"] for n in names if "max_err" in r[n])
        print(f"{r['shape']:>18} | " + " | ".join(cells)
              + f" | {r['plain_graph']['us'] / r['cascade_graph']['us']:10.2f}"
              + f" {r['cudnn']['us'] / r['cascade_graph']['us']:10.2f}        "
              + f"{r['unique_gb']:8.3f} {r['plan_us']:6.0f}/{r['plan_reuse_us']:<5.0f}  {errs:.1e}")
    return result


if __name__ == "__main__":
    main()
