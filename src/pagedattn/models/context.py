"""What a model's forward pass needs besides token ids and positions, passed explicitly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    meta: AttentionMetadata
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_cache, v_cache) [N, bs, Hkv, D]
    backend: AttentionBackend
    # Per new token, the number of tokens its sequence holds, prompt and generated so far (int64
    # [T]); given by the runner to a model that asks for it (``uses_total_lens``: LongRoPE picks
    # its table by it), else None.
    total_lens: torch.Tensor | None = None
