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
from .weights import ShardId, check_shape, default_weight_loader


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


class WeightFirstRMSNorm(nn.Module):
    """OLMo 2's RMSNorm, ``(weight * (x / rms(x))).to(x.dtype)`` (the weight multiplies in fp32,
    before the cast back), over ``full_size`` features of which this rank may hold one slice.

    OLMo 2 normalises q and k over the whole projection, all heads at once.  With tensor
    parallelism each rank holds ``local_size`` of those features (its heads: slice ``part`` of
    the checkpoint weight), so the mean square is the sum of every rank's sum of squares (an
    all-reduce of one number per token) over ``local_size * ranks``.  KV heads replicated over
    ``r`` ranks are counted ``r`` times in that sum and in ``local_size * ranks`` alike, so the
    statistic stays the full projection's.  One rank (``ranks == 1``) computes transformers'
    ``mean`` exactly.
    """

    def __init__(self, full_size: int, eps: float, params_dtype: torch.dtype | None = None, *,
                 local_size: int | None = None, part: int = 0, ranks: int = 1) -> None:
        super().__init__()
        self.eps = eps
        self.full_size = full_size
        self.local_size = full_size if local_size is None else local_size
        self.part, self.ranks = part, ranks
        self.weight = nn.Parameter(torch.ones(self.local_size, dtype=params_dtype), requires_grad=False)
        self.all_reduce: AllReduce = process_group_all_reduce

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is not None:
            raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__}")
        check_shape(loaded_weight, (self.full_size,))
        param.data.copy_(loaded_weight.narrow(0, self.part * self.local_size, self.local_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        if self.ranks == 1:
            var = h.pow(2).mean(-1, keepdim=True)
        else:
            var = self.all_reduce(h.pow(2).sum(-1, keepdim=True)) / (self.local_size * self.ranks)
        return (self.weight * (h * torch.rsqrt(var + self.eps))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.local_size}/{self.full_size}, eps={self.eps}, part={self.part}, ranks={self.ranks}"


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
