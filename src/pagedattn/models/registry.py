"""Architecture name -> model class, and construction of a model for a config."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch

from ..cache.kv_pool import KVCacheSpec
from .config import SUPPORTED_ARCHITECTURES, ModelArchConfig
from .context import ForwardContext
from .llama import LlamaForCausalLM


@runtime_checkable
class CausalLM(Protocol):
    """What the engine relies on (every class in :data:`ARCHITECTURES` provides it)."""

    config: ModelArchConfig

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def kv_cache_spec(self, block_size: int, dtype: torch.dtype | None = None) -> KVCacheSpec: ...


# One decoder implementation covers all supported families via config flags.
ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = dict.fromkeys(SUPPORTED_ARCHITECTURES, LlamaForCausalLM)


def build_model(
    cfg: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> LlamaForCausalLM:
    """An uninitialised model (parameters allocated on ``device`` in ``dtype``, values
    undefined until :meth:`load_weights`), in eval mode."""
    cls = ARCHITECTURES.get(cfg.architecture)
    if cls is None:
        raise ValueError(
            f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    with torch.device(device):
        model = cls(cfg, dtype, tp_rank=tp_rank, tp_size=tp_size)
    return model.eval()
