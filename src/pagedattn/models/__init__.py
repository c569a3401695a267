"""Llama-family causal LMs on the paged KV cache, and loading them from HF folders and GGUF files."""

from .config import SUPPORTED_ARCHITECTURES, ModelArchConfig
from .context import ForwardContext
from .llama import LlamaForCausalLM
from .loader import ModelSource, load_model, load_tokenizer, resolve_model_source
from .registry import ARCHITECTURES, CausalLM, build_model

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "ForwardContext",
    "LlamaForCausalLM",
    "ModelArchConfig",
    "ModelSource",
    "build_model",
    "load_model",
    "load_tokenizer",
    "resolve_model_source",
]
