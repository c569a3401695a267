"""Qwen3: Qwen2's decoder with a per-head RMSNorm of q and k before rotary, ``attention_bias``
on q/k/v and o_proj alike, and a head size of its own (``head_dim``, 128 by default)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .qwen2 import Qwen2ForCausalLM, qwen_windows

_HEAD_DIM_DEFAULT = 128  # Qwen3Config.head_dim is independent of hidden size and heads


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    model_type = "qwen3"

    @classmethod
    def default_head_dim(cls, d: Mapping[str, Any]) -> int:
        return _HEAD_DIM_DEFAULT

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        bias = bool(d.get("attention_bias", False))
        return {"attention_bias": bias, "o_proj_bias": bias, "qk_norm": True,
                "layer_sliding_windows": qwen_windows(d, num_layers)}
