"""Triton kernels for the GPU attention backend (importing this module imports triton).

On a machine without CUDA they run under the Triton interpreter when ``TRITON_INTERPRET=1``
is set before this package is imported (the kernel tests do that).
"""

from .decode import DecodeConfig, choose_num_splits, decode_attention, default_decode_config
from .extend import ExtendConfig, default_extend_config, extend_attention
from .store import store_kv

__all__ = [
    "DecodeConfig",
    "ExtendConfig",
    "choose_num_splits",
    "decode_attention",
    "default_decode_config",
    "default_extend_config",
    "extend_attention",
    "store_kv",
]
