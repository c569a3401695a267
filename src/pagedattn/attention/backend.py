"""The attention-backend interface every implementation (torch reference, Triton) follows.

A model's attention layer calls :meth:`AttentionBackend.forward` with this step's projected
q/k/v, its layer of the paged KV pool and the step's :class:`AttentionMetadata`.  The backend
stores the new K/V into their slots, then attends through the block tables.

What a backend derives from a step once for all layers (plans, launch sizes) lives in the
metadata (``meta.state``), never in the backend: ``attend`` depends on its arguments alone.
A captured CUDA-graph step differs from an eager one only in the state its metadata carries.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar, cast

import torch

from .metadata import AttentionMetadata, BackendState, HostBatch

S = TypeVar("S", bound=BackendState)


@dataclass(frozen=True)
class AttentionLayerSpec:
    """Per-layer constants the kernels need."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None  # a query at p sees keys at p - window + 1 .. p
    # Attention-logit soft-capping (Gemma 2): each scaled score s becomes cap * tanh(s / cap).
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.logit_softcap is not None and not 0 < self.logit_softcap < math.inf:
            raise ValueError(f"logit_softcap must be a positive finite number or None, got {self.logit_softcap}")


class KVScales(NamedTuple):
    """A layer's scales of an fp8 KV cache: float32 device tensors of one element (read by the
    kernels, never by the host, so a captured CUDA graph sees a checkpoint's values).  Pages
    hold ``x / k`` (``x / v``) and read back as ``page * k`` (``page * v``).  Caches of another
    dtype ignore them."""

    k: torch.Tensor
    v: torch.Tensor


class AttentionBackend(ABC, Generic[S]):
    name: str = "abstract"

    @abstractmethod
    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scales: KVScales | None = None) -> None:
        """Write k/v ``[T, Hkv, D]`` into ``k_cache``/``v_cache`` ``[N, block_size, Hkv, D]``
        (fp8 caches: quantized with ``scales``, None meaning 1.0)."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, layer: AttentionLayerSpec, scales: KVScales | None = None) -> torch.Tensor:
        """``q [T, Hq, D]`` attends through the block tables; returns ``[T, Hq, D]`` (fp8
        caches: dequantized with ``scales``, None meaning 1.0)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, layer: AttentionLayerSpec,
                scales: KVScales | None = None) -> torch.Tensor:
        self.store_kv(k, v, k_cache, v_cache, meta, scales)
        return self.attend(q, k_cache, v_cache, meta, layer, scales)

    # ---- per-step state
    @abstractmethod
    def prepare(self, meta: AttentionMetadata) -> S:
        """This backend's state for an eager step (made by :meth:`step_state`, once per step)."""

    def step_state(self, meta: AttentionMetadata) -> S:
        """``meta``'s state for this backend: the one ``prepare_for_capture`` set, else made now
        by :meth:`prepare`, so the first layer of an eager step makes it and the others reuse it
        (planning then happens while the first layers' kernels already run)."""
        if meta.state is None or meta.state.backend is not self:
            meta.state = self.prepare(meta)
        return cast(S, meta.state)

    # ---- CUDA graphs (backends that capture decode steps)
    #
    # Contract for a runner that captures decode steps:
    # 1. Once: ``variants = init_cuda_graphs(max_batch_size, max_seq_len, block_size, layer,
    #    device)``; the backend allocates what captured steps share (e.g. split-KV partials), sized
    #    for the largest bucket.  Each bucket is captured in ``variants`` alternative launch
    #    sequences of the same step (e.g. with and without cascade decode).
    # 2. Per bucket ``B`` and variant ``v``: build metadata on the runner's static tensors, decodes
    #    only (``num_decodes == num_seqs == B``, ``query_start_loc = arange(B + 1)``, a block table
    #    of fixed width), call ``prepare_for_capture(meta, v)``, run the step once (kernels compile
    #    outside the capture), then capture it.  With that state ``attend`` allocates nothing but
    #    its output and its launches depend only on ``B``, ``v`` and the prepared bounds, never on
    #    the metadata's values.
    # 3. Per replay: write the step's values into the static tensors in place; ``v =
    #    prepare_for_replay(batch, B)`` (the backend refills device buffers of its own that the
    #    captured steps read, e.g. the shared-prefix groups of cascade decode); replay variant
    #    ``v``.  Padding rows use slot -1 (not stored) and seq_len 0 (their output is zeros).
    # 4. Replays and eager steps run in stream order: the prepared buffers are shared.
    def supports_cuda_graphs(self) -> bool:
        return False

    def init_cuda_graphs(self, max_batch_size: int, max_seq_len: int, block_size: int, layer: AttentionLayerSpec,
                         device: torch.device | str) -> int:
        """Allocate what captured decode steps share (step 1 above); returns the variant count."""
        raise NotImplementedError(f"the {self.name} attention backend does not capture CUDA graphs")

    def prepare_for_capture(self, meta: AttentionMetadata, variant: int) -> None:
        """Give ``meta`` (a bucket's static metadata) the state of a captured step (step 2)."""
        raise NotImplementedError(f"the {self.name} attention backend does not capture CUDA graphs")

    def prepare_for_replay(self, batch: HostBatch, bucket: int) -> int:
        """Before replaying bucket ``bucket`` for the live rows of ``batch`` (decodes only, the
        step's host arrays): enqueue the device copies the captured step needs on the current
        stream and return the variant to replay (step 3)."""
        raise NotImplementedError(f"the {self.name} attention backend does not capture CUDA graphs")
