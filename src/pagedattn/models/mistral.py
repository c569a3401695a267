"""Mistral: Llama's decoder without biases, every layer attending through one sliding window."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .llama import LlamaForCausalLM

_WINDOW_DEFAULT = 4096  # MistralConfig.sliding_window when the key is absent (an explicit null: none)


class MistralForCausalLM(LlamaForCausalLM):
    model_type = "mistral"
    default_max_position = 4096 * 32

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        return {"layer_sliding_windows": [d.get("sliding_window", _WINDOW_DEFAULT)] * num_layers}
