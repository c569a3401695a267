"""Weight-loading hooks shared by the layers.

Each layer owns ``weight_loader(param, loaded_weight, shard_id=None)``, which takes the *full*
checkpoint tensor (one part of a fused weight when ``shard_id`` is given) and copies this rank's
slice into ``param``: the model streams a checkpoint through them tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

ShardId = int | str | tuple[int, int] | None  # a tuple: (expert, part) of an MoE layer's experts


class WeightLoading(Protocol):
    """A module that copies a checkpoint tensor into (its shard of) one of its parameters."""

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None: ...


def check_shape(loaded: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"shape mismatch: checkpoint tensor {tuple(loaded.shape)}, expected {tuple(expected)}")


def new_param(shape: Sequence[int], dtype: torch.dtype | None) -> nn.Parameter:
    # Inference only: no autograd bookkeeping, and no init work (the checkpoint overwrites it).
    return nn.Parameter(torch.empty(tuple(shape), dtype=dtype), requires_grad=False)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
    """Copy a replicated tensor as is (casting to the parameter's dtype/device)."""
    if shard_id is not None:
        raise ValueError(f"unexpected shard_id {shard_id!r} for a replicated parameter")
    check_shape(loaded_weight, param.shape)
    param.data.copy_(loaded_weight)
