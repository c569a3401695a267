"""All-reduce latency on the GPUs of one host: NCCL against the P2P all-reduce.

For each size (bf16 by default), each variant runs as the engine runs it in decode steps:
``--calls`` back-to-back calls captured in one CUDA graph, replayed ``--replays`` times; the
time per call is the median replay time divided by the number of calls.

* Plain sums: NCCL against the one-shot P2P all-reduce, with the algorithm bandwidth (bytes of
  the tensor / time per call) and whether the two sums agree bitwise (last call of the graph
  against an eager NCCL sum).
* What follows a row-parallel layer, the sum plus the residual add and RMSNorm over rows of
  ``--hidden`` (a chain of calls, each one's residual output the next one's input): NCCL then
  the add + RMSNorm kernel; the one-shot sum then that kernel; the fused P2P reduction (the
  partial sums already in the shared buffer, as the row-parallel GEMM leaves them), which
  waits for the other ranks inside its kernel, and the same reduction after torch's
  symmetric-memory barrier kernel instead ("torch barrier").

One process per GPU (started here), NVLink multicast off.

    python benchmarks/bench_all_reduce.py [--gpus 2] [--sizes-kib 16,64,...] [--out ar.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_var, "0" if _var == "NCCL_NVLS_ENABLE" else "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_common import git_commit  # noqa: E402

SIZES_KIB = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)


def _median_replay_s(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Median seconds of one replay of ``graph``, the ranks lined up before each."""
    times = []
    for _ in range(replays):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _time_graph(fn: Any, xs: list[torch.Tensor], replays: int) -> tuple[float, list[torch.Tensor]]:
    """Median seconds per call of ``fn`` over ``xs`` captured in one graph, and the outputs."""
    for x in xs[:2]:  # warm up outside the capture (lazy init, kernel loading)
        fn(x.clone())
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(x) for x in xs]
    return _median_replay_s(graph, replays) / len(xs), outs


def _time_add_norm(step: Any, rows: int, cols: int, dtype: torch.dtype, calls: int, replays: int,
                   device: torch.device) -> float:
    """Median seconds per call of ``step(i, residual) -> (normed, residual)`` chained ``calls``
    times in one graph."""
    res0 = torch.randn(rows, cols, device=device).to(dtype)
    step(0, res0.clone())  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        residual = res0
        for i in range(calls):
            _, residual = step(i, residual)
    return _median_replay_s(graph, replays) / calls


def _experiment_all_reduce() -> Any:
    """The engine's P2P all-reduce with two experiment switches (it has none itself): the fused
    reduction's ``num_warps`` (None: the engine's), and ``torch_barrier``, torch's
    symmetric-memory barrier kernel in front of the reduction instead of the kernel's own wait."""
    from pagedattn.distributed.all_reduce import P2PAllReduce, launch_reduce_add_rms_norm, reduce_add_rms_norm_triton

    class ExperimentP2PAllReduce(P2PAllReduce):
        num_warps: int | None = None
        torch_barrier = False

        def _reduce(self, slot: int, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
            parts = self._fused_tables[slot]
            if self.torch_barrier:
                self.handle.barrier(channel=0)  # type: ignore[attr-defined]  # every rank's partial sums are in place
                return reduce_add_rms_norm_triton(parts, residual, weight, eps)
            if self.num_warps is None:
                return super()._reduce(slot, residual, weight, eps)
            out, res_out = torch.empty_like(residual), torch.empty_like(residual)
            launch_reduce_add_rms_norm(parts, residual, weight, eps, out, res_out, self._barrier, self.num_warps)
            return out, res_out

    return ExperimentP2PAllReduce


def _add_norm_row(p2p: Any, kib: int, args: argparse.Namespace, dtype: torch.dtype,
                  device: torch.device) -> dict[str, Any]:
    from pagedattn.models.fused_ops import fused_add_rms_norm
    from pagedattn.models.layers import process_group_all_reduce

    cols = args.hidden
    rows = max(1, (kib << 10) // (dtype.itemsize * cols))
    gen = torch.Generator(device=device).manual_seed(1000 + dist.get_rank())
    weight = (torch.rand(cols, device=device) + 0.5).to(dtype)
    xs = [torch.randn(rows, cols, generator=gen, device=device).to(dtype) for _ in range(args.calls)]
    eps = 1e-6
    row: dict[str, Any] = {"rows": rows}
    row["nccl_norm_us"] = 1e6 * _time_add_norm(
        lambda i, r: fused_add_rms_norm(process_group_all_reduce(xs[i]), r, weight, eps),
        rows, cols, dtype, args.calls, args.replays, device)
    if p2p is not None:
        row["p2p_norm_us"] = 1e6 * _time_add_norm(
            lambda i, r: fused_add_rms_norm(p2p(xs[i]), r, weight, eps), rows, cols, dtype, args.calls, args.replays,
            device)
        # One buffer per call, in the slots' turns (where the row-parallel GEMMs would leave them).
        bufs = [p2p.partials_buffer(rows, cols, dtype) for _ in range(args.calls)]
        if all(b is not None for b in bufs):
            xs = [b.copy_(x) for b, x in zip(bufs, xs, strict=True)]  # type: ignore[union-attr]
            for warps in [None, *args.fused_warps]:
                p2p.num_warps = warps
                row["fused_us" if warps is None else f"fused_us_w{warps}"] = 1e6 * _time_add_norm(
                    lambda i, r: p2p.add_rms_norm(xs[i], r, weight, eps), rows, cols, dtype, args.calls,
                    args.replays, device)
            p2p.num_warps = None
            p2p.torch_barrier = True  # torch's barrier kernel, then the reduction
            row["fused_torch_barrier_us"] = 1e6 * _time_add_norm(
                lambda i, r: p2p.add_rms_norm(xs[i], r, weight, eps), rows, cols, dtype, args.calls, args.replays,
                device)
            p2p.torch_barrier = False
    return row


def _rank(rank: int, world: int, rdzv: str, args: argparse.Namespace, result: str) -> None:
    from pagedattn.models.layers import process_group_all_reduce

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{rdzv}", rank=rank, world_size=world, device_id=device)
    dtype = getattr(torch, args.dtype)
    max_bytes = max(args.sizes_kib) << 10
    p2p = _experiment_all_reduce().create(device, dtype, max_bytes=max_bytes)
    rows = []
    gen = torch.Generator(device=device).manual_seed(rank)
    for kib in args.sizes_kib:
        numel = (kib << 10) // dtype.itemsize
        xs = [torch.randn(numel, generator=gen, device=device).to(dtype) for _ in range(args.calls)]
        # NCCL sums in place (its inputs grow replay after replay); P2P leaves its inputs alone
        nccl_s, _ = _time_graph(process_group_all_reduce, [x.clone() for x in xs], args.replays)
        row: dict[str, Any] = {"kib": kib, "nccl_us": nccl_s * 1e6}
        if p2p is not None:
            p2p_s, p2p_out = _time_graph(p2p, xs, args.replays)
            want = process_group_all_reduce(xs[-1].clone())
            row.update(p2p_us=p2p_s * 1e6, bitwise_equal=bool(torch.equal(p2p_out[-1], want)))
        row["add_norm"] = _add_norm_row(p2p, kib, args, dtype, device)
        rows.append(row)
    if rank == 0:
        Path(result).write_text(json.dumps({"rows": rows, "p2p_available": p2p is not None,
                                            "device": torch.cuda.get_device_name(device)}))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--sizes-kib", default=",".join(map(str, SIZES_KIB)))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--calls", type=int, default=32, help="all-reduces captured in one graph")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=4096, help="row width of the add + RMSNorm variants")
    ap.add_argument("--fused-warps", default="", help="also time the fused kernel with these num_warps (tuning)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.sizes_kib = [int(s) for s in args.sizes_kib.split(",")]
    args.fused_warps = [int(w) for w in args.fused_warps.split(",") if w]
    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"needs {args.gpus} CUDA GPUs, found {torch.cuda.device_count()}")
    work = Path(tempfile.mkdtemp(prefix="ar-bench-"))
    result = work / "result.json"
    torch.multiprocessing.spawn(_rank, args=(args.gpus, str(work / "rdzv"), args, str(result)), nprocs=args.gpus,
                                join=True)
    data = json.loads(result.read_text())
    data.update(date=time.strftime("%Y-%m-%d"), commit=git_commit(), gpus=args.gpus,
                dtype=args.dtype, torch=torch.__version__, nccl=".".join(map(str, torch.cuda.nccl.version())))
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=2))
    print(f"\nAll-reduce per call, {args.gpus}x {data['device']}, {args.dtype}, {args.calls} calls per CUDA graph "
          f"(torch {data['torch']}, NCCL {data['nccl']})")
    print(f"{'KiB':>6s} {'NCCL us':>8s} {'GB/s':>6s} {'P2P us':>8s} {'GB/s':>6s} {'NCCL/P2P':>8s} {'bitwise':>7s}")
    for r in data["rows"]:
        gb = r["kib"] * 1024 / 1e9
        p2p = r.get("p2p_us")
        print(f"{r['kib']:6d} {r['nccl_us']:8.1f} {gb / (r['nccl_us'] * 1e-6):6.0f} "
              + (f"{p2p:8.1f} {gb / (p2p * 1e-6):6.0f} {r['nccl_us'] / p2p:7.2f}x {r['bitwise_equal']!s:>7s}"
                 if p2p is not None else "     n/a"))
    print(f"\nAll-reduce + residual add + RMSNorm per call, rows of {args.hidden}")
    print(f"{'KiB':>6s} {'rows':>5s} {'NCCL+norm':>9s} {'P2P+norm':>9s} {'fused':>7s} {'NCCL+norm/fused':>15s} "
          f"{'torch barrier':>13s}")
    for r in data["rows"]:
        a = r["add_norm"]
        fused = a.get("fused_us")
        cells = [f"{a.get(k, float('nan')):9.1f}" for k in ("nccl_norm_us", "p2p_norm_us")]
        print(f"{r['kib']:6d} {a['rows']:5d} " + " ".join(cells)
              + (f" {fused:7.1f} {a['nccl_norm_us'] / fused:14.2f}x {a['fused_torch_barrier_us']:13.1f}"
                 if fused else "     n/a")
              + "".join(f"  w{w}: {a[f'fused_us_w{w}']:.1f}" for w in args.fused_warps if f"fused_us_w{w}" in a))
    return data


if __name__ == "__main__":
    main()
    sys.exit(0)
