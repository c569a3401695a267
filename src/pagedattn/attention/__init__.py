"""Attention: typed metadata, the backend interface, the torch reference and Triton kernels."""

from .backend import AttentionBackend, AttentionLayerSpec
from .metadata import AttentionMetadata, BackendState, HostBatch, token_positions
from .selector import get_attention_backend
from .torch_ref import TorchReferenceBackend, paged_attention_ref, store_kv_ref

__all__ = [
    "AttentionBackend",
    "AttentionLayerSpec",
    "AttentionMetadata",
    "BackendState",
    "HostBatch",
    "TorchReferenceBackend",
    "get_attention_backend",
    "paged_attention_ref",
    "store_kv_ref",
    "token_positions",
]
