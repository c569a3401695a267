"""Weight-loading hooks shared by the layers.

Each layer owns ``weight_loader(param, loaded_weight, shard_id=None)``, which takes the *full*
checkpoint tensor (one part of a fused weight when ``shard_id`` is given) and copies this rank's
slice into ``param``: the model streams a checkpoint through them tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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


_DEFERRED: ContextVar[bool] = ContextVar("deferred_params", default=False)


def new_param(shape: Sequence[int], dtype: torch.dtype | None) -> nn.Parameter:
    # Inference only: no autograd bookkeeping, and no init work (the checkpoint overwrites it).
    device = "meta" if _DEFERRED.get() else None
    return nn.Parameter(torch.empty(tuple(shape), dtype=dtype, device=device), requires_grad=False)


@contextmanager
def deferred_params() -> Iterator[None]:
    """Layers built inside get their checkpoint-loaded parameters on the meta device (shape and
    dtype, no storage), so a loader can first give some of them another form (GGUF blocks) and
    then :func:`materialize_params` the rest; buffers and norm weights are made as usual."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def materialize_params(model: nn.Module, device: torch.device | str) -> int:
    """Give every meta parameter of ``model`` uninitialised storage on ``device``, as
    :func:`new_param` would have (a parameter two modules share, a tied LM head, stays shared);
    returns how many."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                made[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                                               requires_grad=False)
            module._parameters[name] = made[id(param)]
    return len(made)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
    """Copy a replicated tensor as is (casting to the parameter's dtype/device)."""
    if shard_id is not None:
        raise ValueError(f"unexpected shard_id {shard_id!r} for a replicated parameter")
    check_shape(loaded_weight, param.shape)
    param.data.copy_(loaded_weight)
