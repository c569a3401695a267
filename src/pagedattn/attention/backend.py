"""The attention-backend interface every implementation (torch reference, Triton) follows.

A model's attention layer calls :meth:`AttentionBackend.forward` with this step's projected
q/k/v, its layer of the paged KV pool and the step's :class:`AttentionMetadata`.  The backend
stores the new K/V into their slots, then attends through the block tables.  Graph-capture
hooks let a GPU runner record a decode step once and replay it with fresh metadata.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
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
    #
    # Contract for a runner that captures decode steps:
    # 1. Once, outside any capture: ``prepare_graph_capture(max_batch_size, max_seq_len, layer,
    #    device)``; the backend allocates the buffers captured steps will use (e.g. split-KV
    #    partials), sized for the largest bucket and shared by all layers and buckets.
    # 2. Per batch-size bucket ``B`` and variant ``v < graph_variants()``: capture the forward
    #    inside ``with graph_capture(B, v):``, with metadata built on the runner's static
    #    tensors: decode-only (``num_decodes == num_seqs == B``, ``query_start_loc =
    #    arange(B + 1)``) and a block table of fixed width.  Inside, ``attend`` allocates nothing
    #    but its output and its launch configuration depends only on ``B``, ``v`` and the
    #    prepared ``max_seq_len``, never on the metadata's values.  Run the step once inside the
    #    context before capturing it, so kernels are compiled and loaded.  (Variants are
    #    alternative launch sequences for the same step, e.g. with and without cascade decode:
    #    any variant computes the step correctly given the inputs ``prepare_decode_inputs``
    #    wrote for it.)
    # 3. Replay after writing the next step's values into the same metadata tensors in place,
    #    and calling ``prepare_decode_inputs`` with the step's host-side tables and lengths (the
    #    backend fills device buffers of its own that the captured step reads, e.g. the shared-
    #    prefix groups of cascade decode); replay the variant it returns.  Any ``seq_lens`` up
    #    to what the block-table width holds are valid.  Padding rows use slot -1 (not stored)
    #    and seq_len 0 (their output is zeros).
    # 4. Replays and eager steps must run in stream order: the prepared buffers are shared.
    def supports_cuda_graphs(self) -> bool:
        return False

    def prepare_graph_capture(self, max_batch_size: int, max_seq_len: int,  # noqa: B027 - optional hook
                              layer: AttentionLayerSpec, device: torch.device | str) -> None:
        """Allocate what captured decode steps need (step 1 above); nothing by default."""

    def graph_variants(self) -> int:
        """How many variants of each bucket's step to capture (after ``prepare_graph_capture``)."""
        return 1

    def graph_capture(self, batch_size: int, variant: int = 0) -> AbstractContextManager[None]:
        """Context inside which a decode step of ``batch_size`` sequences is captured (step 2)."""
        return nullcontext()

    def prepare_decode_inputs(self, block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int,
                              batch_size: int) -> int:
        """Before replaying a captured step of bucket ``batch_size`` (step 3): the step's ``n``
        live rows as host arrays, ``block_tables [n, >= blocks]`` (row ``i``'s first
        ``ceil(seq_lens[i] / block_size)`` entries are its blocks; later ones may be stale, and
        window-released entries may hold any id: only layers without a sliding window may use
        them, and blocks are released only when every layer has one) and ``seq_lens [n]``.
        Enqueue whatever device copies the captured step needs on the current stream and return
        the variant to replay; nothing and 0 by default."""
        return 0
