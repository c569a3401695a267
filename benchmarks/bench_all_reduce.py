"""All-reduce latency on the GPUs of one host: NCCL against the one-shot P2P all-reduce.

For each size (bf16 by default), both all-reduces run as the engine runs them in decode steps:
``--calls`` back-to-back calls captured in one CUDA graph, replayed ``--replays`` times; the
time per call is the median replay time divided by the number of calls.  Also reported: the
algorithm bandwidth (bytes of the tensor / time per call) and whether the two sums agree
bitwise (last call of the graph against an eager NCCL sum).  One process per GPU (started here), NVLink multicast off.

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

SIZES_KIB = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)


def _time_graph(fn: Any, xs: list[torch.Tensor], replays: int) -> tuple[float, list[torch.Tensor]]:
    """Median seconds per call of ``fn`` over ``xs`` captured in one graph, and the outputs."""
    for x in xs[:2]:  # warm up outside the capture (lazy init, kernel loading)
        fn(x.clone())
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(x) for x in xs]
    times = []
    for _ in range(replays):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / len(xs), outs


def _rank(rank: int, world: int, rdzv: str, args: argparse.Namespace, result: str) -> None:
    from pagedattn.distributed.all_reduce import P2PAllReduce
    from pagedattn.models.layers import process_group_all_reduce

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{rdzv}", rank=rank, world_size=world, device_id=device)
    dtype = getattr(torch, args.dtype)
    max_bytes = max(args.sizes_kib) << 10
    p2p = P2PAllReduce.create(device, dtype, max_bytes=max_bytes)
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
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.sizes_kib = [int(s) for s in args.sizes_kib.split(",")]
    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"needs {args.gpus} CUDA GPUs, found {torch.cuda.device_count()}")
    work = Path(tempfile.mkdtemp(prefix="ar-bench-"))
    result = work / "result.json"
    torch.multiprocessing.spawn(_rank, args=(args.gpus, str(work / "rdzv"), args, str(result)), nprocs=args.gpus,
                                join=True)
    data = json.loads(result.read_text())
    data.update(date=time.strftime("%Y-%m-%d"), commit=os.environ.get("GIT_COMMIT", "unknown"), gpus=args.gpus,
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
    return data


if __name__ == "__main__":
    main()
    sys.exit(0)
