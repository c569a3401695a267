"""The contract between a model and the runtime: what the model runner, the CUDA graphs, the worker
and the tensor-parallel start-up call, and nothing else.  Every family implements it through
:class:`~.base.DecoderForCausalLM`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch

from ..attention.backend import AttentionLayerSpec
from ..cache.kv_pool import KVCacheSpec
from .config import ModelArchConfig
from .context import ForwardContext
from .layers.parallel import AllReduce


@runtime_checkable
class CausalLM(Protocol):
    """A causal LM over the paged KV cache, possibly one tensor-parallel rank's shard of it.

    Methods marked *collective* must be called by every rank at the same point of a step."""

    config: ModelArchConfig
    # The forward pass wants each token's sequence length (ForwardContext.total_lens).
    uses_total_lens: bool

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The new tokens of a ragged batch, ``input_ids``/``positions`` int64 ``[T]``, through
        the decoder (storing their K/V in ``ctx.kv_caches``) -> final-norm hidden states
        ``[T, hidden_size]``.  Collective."""
        ...

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Logits of the rows of ``hidden [n, hidden_size]`` that sample: ``[n, vocab_size]``, or
        with ``gather=False`` this rank's vocabulary slice ``[n, vocab / tp]`` (collective when
        gathering)."""
        ...

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary slice -> the full logits ``[n, vocab_size]``.  Collective."""
        ...

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """The argmax ids, int64 ``[n]``, over the whole vocabulary of every rank's slice, without
        gathering the logits; the first maximum, as ``gather_logits(logits).argmax(-1)``.  Collective."""
        ...

    def attention_specs(self) -> list[AttentionLayerSpec]:
        """Each attention layer's heads, scale and window on this rank, in layer order."""
        ...

    def kv_cache_spec(self, block_size: int, dtype: torch.dtype | None = None) -> KVCacheSpec:
        """The shape of this rank's KV pool (``dtype`` None: the model's)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream HF-named checkpoint tensors into this rank's (sharded) parameters."""
        ...

    def set_all_reduce(self, all_reduce: AllReduce) -> int:
        """Sum across ranks with ``all_reduce`` from now on; returns how many layers use it."""
        ...
