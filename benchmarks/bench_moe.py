"""MoE decode: the fused Triton MoE against a per-expert loop and against the weight-read roofline.

A stack of Qwen3-30B-A3B-shaped sparse MoE layers (hidden 2048, 128 experts of 768
intermediate features, top-8, renormalised) with random weights and a residual connection
(``x = x + moe(x)``), run as decode steps at batch 1, 64 and 256, bf16:

* ``fused`` -- :func:`fused_moe_triton` (sort by expert, two grouped GEMMs), eager, and
  replayed from a CUDA graph of the whole step (how the engine runs decode);
* ``loop`` -- the per-expert loop (:func:`fused_moe_ref`: one sort, then two GEMMs per expert
  hit, in Python; it reads the expert counts back to the host, so it cannot be captured);
* ``roofline`` -- the bytes of the distinct experts the step's routing hits (each read once),
  plus the routers, divided by a device-to-device copy bandwidth measured in the same run
  (bytes read + written per second).  ``% roof`` is roofline time / measured time.

Times are medians (``triton.testing.do_bench`` on CUDA, wall-clock medians elsewhere); the
fused and loop outputs of one step are compared (``max|diff|``).  Prints a table last and
writes JSON with ``--out``.  ``--device cpu --smoke`` runs a tiny shape through the torch path,
to check the script end to end without a GPU.

    python benchmarks/bench_moe.py --out moe.json [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_common import copy_bandwidth, git_commit, median_us

from pagedattn.models import moe_ops as mo


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    layers: int
    batches: tuple[int, ...]


QWEN3_30B_A3B = Shape(hidden=2048, intermediate=768, experts=128, top_k=8, layers=8, batches=(1, 64, 256))
SMOKE = Shape(hidden=64, intermediate=32, experts=8, top_k=2, layers=2, batches=(1, 4, 8))

MoEFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Stack:
    shape: Shape
    routers: list[torch.Tensor]  # [E, H] per layer
    w13: list[torch.Tensor]  # [E, 2I, H]
    w2: list[torch.Tensor]  # [E, H, I]

    def expert_bytes(self) -> int:
        """Bytes of one expert's three projections."""
        return 3 * self.shape.intermediate * self.shape.hidden * self.w13[0].element_size()

    def router_bytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.routers)


def build_stack(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Stack:
    """Random weights (std 0.02, transformers' default init), made on the device layer by layer."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*size: int) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)

    e, h, i = shape.experts, shape.hidden, shape.intermediate
    return Stack(shape, [rand(e, h) for _ in range(shape.layers)], [rand(e, 2 * i, h) for _ in range(shape.layers)],
                 [rand(e, h, i) for _ in range(shape.layers)])


def decode_step(stack: Stack, x: torch.Tensor, moe: MoEFn, routed: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One decode step through every layer: route, experts, residual add.  ``routed`` collects
    each layer's expert ids."""
    for router, w13, w2 in zip(stack.routers, stack.w13, stack.w2, strict=True):
        weights, ids = mo.route(F.linear(x, router), stack.shape.top_k, renormalize=True, fp32_weights=False)
        if routed is not None:
            routed.append(ids)
        x = x + moe(x, w13, w2, weights, ids)
    return x


def graph_step(stack: Stack, x: torch.Tensor) -> Callable[[], object]:
    """The fused step captured in a CUDA graph (as the engine's decode graphs hold it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_step(stack, x, mo.fused_moe_triton)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step(stack, x, mo.fused_moe_triton)
    return graph.replay


def run_batch(stack: Stack, batch: int, bw_gbps: float, device: torch.device, reps: int) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(batch)
    x = torch.randn(batch, stack.shape.hidden, device=device, generator=gen).to(stack.w13[0].dtype)
    fused: MoEFn = mo.fused_moe_triton if device.type == "cuda" else mo.fused_moe
    routed: list[torch.Tensor] = []
    out_fused = decode_step(stack, x, fused, routed)
    out_loop = decode_step(stack, x, mo.fused_moe_ref)
    distinct = sum(int(ids.unique().numel()) for ids in routed)
    weight_bytes = distinct * stack.expert_bytes() + stack.router_bytes()
    roof_us = weight_bytes / (bw_gbps * 1e3)
    r: dict[str, Any] = {"batch": batch, "distinct_experts_per_layer": distinct / stack.shape.layers,
                         "weight_bytes": weight_bytes, "roofline_us": roof_us,
                         "max_abs_diff": float((out_fused.float() - out_loop.float()).abs().max())}
    timings = {"fused": lambda: decode_step(stack, x, fused), "loop": lambda: decode_step(stack, x, mo.fused_moe_ref)}
    if device.type == "cuda":
        timings["fused_graph"] = graph_step(stack, x)
    for name, fn in timings.items():
        us = median_us(fn, device, reps)
        r[name] = {"us": us, "tok_per_s": batch / us * 1e6, "pct_roofline": 100 * roof_us / us,
                   "gbps": weight_bytes / us / 1e3}
    return r


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="a tiny shape (for the CPU)")
    p.add_argument("--layers", type=int, default=None, help="MoE layers in the stack (default: 8, smoke 2)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="decode batch sizes (default 1 64 256)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 100, smoke 3)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU (use --device cpu --smoke)")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    if args.batches is not None and min(args.batches) < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    if args.reps is not None and args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    base = SMOKE if args.smoke else QWEN3_30B_A3B
    shape = Shape(base.hidden, base.intermediate, base.experts, base.top_k, args.layers or base.layers,
                  tuple(args.batches or base.batches))
    reps = args.reps or (3 if args.smoke else 100)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stack = build_stack(shape, dtype, device)
    bw = copy_bandwidth(device, (1 << 20 if args.smoke else 1 << 31), reps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result: dict[str, Any] = {
        "commit": git_commit(), "device": name, "torch": torch.__version__, "dtype": str(dtype),
        "shape": {**asdict(shape), "batches": list(shape.batches)}, "copy_gbps": bw,
        "expert_mib": stack.expert_bytes() / 2**20, "batches": [run_batch(stack, b, bw, device, reps)
                                                                for b in shape.batches]}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}  {dtype}  copy {bw:.3g} GB/s  {shape.layers} layers of {shape.experts} experts "
          f"({shape.hidden}x{shape.intermediate}, top-{shape.top_k})")
    names = [n for n in ("fused_graph", "fused", "loop") if n in result["batches"][0]]
    print(f"{'batch':>5} {'experts/layer':>13} {'roofline':>10} | " + " | ".join(f"{n:^30}" for n in names)
          + " | max|diff|")
    for r in result["batches"]:
        cells = [f"{r[n]['us']:9.1f}us {r[n]['tok_per_s']:9.0f}tok/s {r[n]['pct_roofline']:4.0f}%" for n in names]
        print(f"{r['batch']:>5} {r['distinct_experts_per_layer']:>13.1f} {r['roofline_us']:>8.1f}us | "
              + " | ".join(cells) + f" | {r['max_abs_diff']:.2g}")
    return result


if __name__ == "__main__":
    main()
