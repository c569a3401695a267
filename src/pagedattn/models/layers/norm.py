"""RMSNorm, the decoder's norm, which also sums a row-parallel layer's partial outputs across ranks,
and Gemma's variant.

Numerics follow transformers exactly where it matters for fp32 token parity: the math in fp32,
cast back before the weight multiply (Llama's), or after it (Gemma's).  The kernels are in
:mod:`..fused_ops` (the torch code on the CPU, fused Triton kernels on CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from ..fused_ops import fused_add_gemma_rms_norm, fused_add_rms_norm, gemma_rms_norm, rms_norm
from .parallel import AllReduce, process_group_all_reduce
from .weights import ShardId, default_weight_loader


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))`` with the normalisation in fp32, cast back before the weight
    multiply (exactly like ``LlamaRMSNorm``).  Normalises over the last dim, so it also serves
    as the per-head q/k norm of Qwen3 on ``[T, H, D]``."""

    # The checkpoint's weight is the scale itself (False) or its offset from one (Gemma's).
    unit_offset = False

    def __init__(self, hidden_size: int, eps: float, params_dtype: torch.dtype | None = None, *,
                 reduce_input: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        # add_and_norm's x arrives as per-rank partial sums (a row-parallel layer's output) and is
        # summed across ranks first, by the all-reduce, fused with the add and the norm when it can.
        self.reduce_input = reduce_input
        self.all_reduce: AllReduce = process_group_all_reduce

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``: one kernel on the GPU, where the decoder
        carries the residual stream beside the sublayer outputs.  With ``reduce_input``, ``x`` is
        first summed across ranks."""
        if self.reduce_input:
            return self.all_reduce.add_rms_norm(x, residual, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm (``Gemma2RMSNorm``, ``Gemma3RMSNorm``): ``x / rms(x) * (1 + weight)``, all
    in fp32 and cast back once; the checkpoint's weight is the offset from one.

    Gemma's post-norms follow the row-parallel projections directly, with no add before them,
    so here ``reduce_input`` means that ``x`` arrives as per-rank partial sums in :meth:`forward`
    and :meth:`add_and_norm` alike, and is summed across ranks first."""

    unit_offset = True

    def __init__(self, hidden_size: int, eps: float, params_dtype: torch.dtype | None = None, *,
                 reduce_input: bool = False) -> None:
        super().__init__(hidden_size, eps, params_dtype, reduce_input=reduce_input)
        self.weight.data.zero_()  # the identity, as transformers initialises it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemma_rms_norm(self.all_reduce(x) if self.reduce_input else x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_add_gemma_rms_norm(self.all_reduce(x) if self.reduce_input else x, residual, self.weight,
                                        self.eps)
