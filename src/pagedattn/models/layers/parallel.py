"""Tensor-parallel plumbing of the layers: where a shard lives, size checks, and the collectives.

The layers never call ``torch.distributed`` for a sum themselves: each layer that sums across
ranks holds an :class:`AllReduce` in its ``all_reduce`` attribute (the process group's by
default), so a process can install a faster one for its links (:func:`set_all_reduce`).
With ``tp_size == 1`` no collective is ever called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..fused_ops import fused_add_rms_norm
from ..quant_config import QuantConfig


@dataclass(frozen=True)
class Shard:
    """Where a block's parameters live: rank ``rank`` of ``size`` tensor-parallel ranks, in ``dtype``
    (None: torch's default); ``quant``: the linear layers' int4 or FP8 weights, if quantized (see
    ``quant.parallel_linear``)."""

    rank: int = 0
    size: int = 1
    dtype: torch.dtype | None = None
    quant: QuantConfig | None = None

    def __post_init__(self) -> None:
        check_tp(self.rank, self.size)

    @property
    def kw(self) -> dict[str, Any]:
        """The keyword arguments of the parallel linear and vocabulary layers."""
        return {"tp_rank": self.rank, "tp_size": self.size, "params_dtype": self.dtype}


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tp_size ({denominator})")
    return numerator // denominator


def check_tp(tp_rank: int, tp_size: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"need 0 <= tp_rank < tp_size, got tp_rank={tp_rank} tp_size={tp_size}")


def _require_process_group() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tp_size > 1 needs an initialised torch.distributed process group")


class AllReduce:
    """The cross-rank sum of the row-parallel layers and the vocabulary-parallel embedding: the
    default process group's all-reduce (NCCL on CUDA, gloo on the CPU).

    Besides the plain sum it offers the sum fused with what always follows a row-parallel layer
    in a pre-norm decoder, the residual add and the next RMSNorm (:meth:`add_rms_norm`), and a
    place for the row-parallel GEMM to write its partial sums (:meth:`partials_buffer`), so a
    subclass can do all three without copying the activations around.  Which buffers it hands
    out, and how it keeps ranks from overwriting what a peer still reads, is its own business.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place."""
        import torch.distributed as dist

        _require_process_group()
        dist.all_reduce(x)
        return x

    def partials_buffer(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A ``[rows, cols]`` tensor for a row-parallel layer to write its partial sums into,
        which the next :meth:`add_rms_norm` then reduces where they lie; None: write them
        anywhere.  One buffer per reduction: ask for the next one after reducing this one."""
        return None

    def add_rms_norm(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rms_norm(s + residual), s + residual)`` where ``s`` is ``partial`` summed over ranks."""
        return fused_add_rms_norm(self(partial), residual, weight, eps)


process_group_all_reduce = AllReduce()


def set_all_reduce(model: nn.Module, all_reduce: AllReduce) -> int:
    """Make every layer of ``model`` that sums across ranks (those holding an ``all_reduce``)
    use ``all_reduce``; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "all_reduce", None), AllReduce):
            cast(Any, m).all_reduce = all_reduce  # nn.Module's typed __setattr__ takes tensors and modules
            n += 1
    return n


def all_gather_last_dim(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along the last dim, in rank order (collective)."""
    import torch.distributed as dist

    _require_process_group()
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
