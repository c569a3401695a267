"""The gated MLP of the decoder layers and its activations (SwiGLU's SiLU, GeGLU's GELU)."""

from __future__ import annotations

import torch
from torch import nn

from ..fused_ops import fused_kernels_enabled, gelu_and_mul, silu_and_mul
from .linear import MergedColumnParallelLinear, RowParallelLinear
from .parallel import Shard
from .quant import QuantRowParallelLinear, parallel_linear


class SiluAndMul(nn.Module):
    """``silu(x[:, :I]) * x[:, I:]`` for the fused gate/up output ``[T, 2I]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


class GeluAndMul(nn.Module):
    """``gelu(x[:, :I]) * x[:, I:]`` (GeGLU), ``approximate`` as ``F.gelu``'s: "tanh" is
    transformers' ``gelu_pytorch_tanh`` (Gemma's), "none" its exact ``gelu``."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_and_mul(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: gate and up fused into one column-parallel matmul
    (``gate_up_proj``), the activation-and-multiply one kernel on the GPU (``act``, SiLU's by
    default), and ``down_proj`` row-parallel.  Returns this rank's partial sums, which the norm
    after the layer reduces across ranks (fused with its add); with ``reduce_output``, the sum
    itself (post-norm layers)."""

    def __init__(self, hidden_size: int, intermediate_size: int, shard: Shard, *, bias: bool = False,
                 act: nn.Module | None = None, reduce_output: bool = False) -> None:
        super().__init__()
        self.gate_up_proj: MergedColumnParallelLinear = parallel_linear(
            MergedColumnParallelLinear, shard, hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj: RowParallelLinear = parallel_linear(RowParallelLinear, shard, intermediate_size, hidden_size,
                                                            bias=bias, reduce_results=reduce_output)
        self.act = act if act is not None else SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        down = self.down_proj
        # One token through an int4 down projection: its GEMV applies SiLU-and-mul as it loads
        # its input, one kernel less a layer (docs/benchmarks.md, "Where a batch-1 int4 step goes").
        if isinstance(down, QuantRowParallelLinear) and isinstance(self.act, SiluAndMul) \
                and fused_kernels_enabled() and down.takes_silu_input(h):
            return down.forward_silu(h)
        return down(self.act(h))
