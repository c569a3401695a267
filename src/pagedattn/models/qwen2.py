"""Qwen2: Llama's decoder with q/k/v biases (never an o_proj bias), and with
``use_sliding_window`` a window on the layers ``layer_types`` names, or else on the layers from
``max_window_layers`` on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import layer_type_windows
from .llama import LlamaForCausalLM

_MAX_WINDOW_LAYERS_DEFAULT = 28


class Qwen2ForCausalLM(LlamaForCausalLM):
    model_type = "qwen2"
    default_max_position = 32768

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        return {"attention_bias": True, "o_proj_bias": False, "layer_sliding_windows": qwen_windows(d, num_layers)}


def qwen_windows(d: Mapping[str, Any], num_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention) as the Qwen2/3 modeling code sets them."""
    window = d.get("sliding_window")
    if not d.get("use_sliding_window", False) or window is None:
        return [None] * num_layers
    if d.get("layer_types") is not None:
        return layer_type_windows(d, window, num_layers)
    first = d.get("max_window_layers", _MAX_WINDOW_LAYERS_DEFAULT)
    return [window if i >= first else None for i in range(num_layers)]
