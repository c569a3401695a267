"""Architecture name -> model family, and what goes through it: reading a config.json, building a model.

A family is a module of this package holding a class named after the HF architecture it serves
(a :class:`~.base.DecoderForCausalLM`); it is imported the first time a config names it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

from .base import DecoderForCausalLM
from .config import ModelArchConfig

# One line per family: architecture -> module.
ARCHITECTURES: dict[str, str] = {
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Phi3ForCausalLM": "phi3",
    "Olmo2ForCausalLM": "olmo2",
    "GraniteForCausalLM": "granite",
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)


def _unsupported(arch: str) -> ValueError:
    return ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def model_class(architecture: str) -> type[DecoderForCausalLM]:
    """The class serving ``architecture`` (ValueError naming the supported ones if none does)."""
    module = ARCHITECTURES.get(architecture)
    if module is None:
        raise _unsupported(architecture)
    cls = getattr(importlib.import_module(f"{__package__}.{module}"), architecture)
    assert issubclass(cls, DecoderForCausalLM), f"{module}.{architecture} is not a DecoderForCausalLM"
    return cls


def architecture_of(d: Mapping[str, Any]) -> str:
    """The architecture a ``config.json`` names: its first ``architectures`` entry, else the one of
    its ``model_type``."""
    archs = d.get("architectures")
    if archs:
        arch = archs if isinstance(archs, str) else archs[0]
        if arch not in ARCHITECTURES:
            raise _unsupported(arch)
        return str(arch)
    by_type = {model_class(a).model_type: a for a in ARCHITECTURES}
    if d.get("model_type") in by_type:
        return by_type[d["model_type"]]
    raise ValueError("config.json is missing required key 'architectures' (and has no known 'model_type'); "
                     f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def parse_hf_config(d: Mapping[str, Any]) -> ModelArchConfig:
    """A ``config.json`` dict (transformers 4.x or 5.x) as the family it names reads it."""
    if not isinstance(d, Mapping):
        raise ValueError(f"config must be a dict, got {type(d).__name__}")
    return model_class(architecture_of(d)).config_from_hf(d)


def build_model(
    cfg: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> DecoderForCausalLM:
    """An uninitialised model (parameters allocated on ``device`` in ``dtype``, values
    undefined until :meth:`~.base.DecoderForCausalLM.load_weights`), in eval mode."""
    cls = model_class(cfg.architecture)
    with torch.device(device):
        model = cls(cfg, dtype, tp_rank=tp_rank, tp_size=tp_size)
    return model.eval()
