"""The attention-backend interface every implementation (torch reference, Triton) follows.

A model's attention layer calls :meth:`AttentionBackend.forward` with this step's projected
q/k/v, its layer of the paged KV pool and the step's :class:`AttentionMetadata`.  The backend
stores the new K/V into their slots, then attends through the block tables.  Graph-capture
hooks let a GPU runner record a decode step once and replay it with fresh metadata.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .metadata import AttentionMetadata


@dataclass(frozen=True)
class AttentionLayerSpec:
    """Per-layer constants the kernels need."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None  # a query at p sees keys at p - window + 1 .. p

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")


class AttentionBackend(ABC):
    name: str = "abstract"

    @abstractmethod
    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Write k/v ``[T, Hkv, D]`` into ``k_cache``/``v_cache`` ``[N, block_size, Hkv, D]``."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, layer: AttentionLayerSpec) -> torch.Tensor:
        """``q [T, Hq, D]`` attends through the block tables; returns ``[T, Hq, D]``."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, layer: AttentionLayerSpec) -> torch.Tensor:
        self.store_kv(k, v, k_cache, v_cache, meta)
        return self.attend(q, k_cache, v_cache, meta, layer)

    # ---- hooks for CUDA-graph capture (no-ops for backends that do not use graphs)
    def supports_cuda_graphs(self) -> bool:
        return False
