"""Causal LMs on the paged KV cache (one file per family over the shared blocks of :mod:`.layers`),
and loading them from HF folders and GGUF files."""

from .base import DecoderForCausalLM
from .config import ModelArchConfig
from .context import ForwardContext
from .interface import CausalLM
from .loader import ModelSource, load_model, load_tokenizer, resolve_model_source
from .registry import ARCHITECTURES, SUPPORTED_ARCHITECTURES, build_model, model_class

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "DecoderForCausalLM",
    "ForwardContext",
    "ModelArchConfig",
    "ModelSource",
    "build_model",
    "load_model",
    "load_tokenizer",
    "model_class",
    "resolve_model_source",
]
