"""Triton kernels for the GPU attention backend (importing this module imports triton).

On a machine without CUDA they run under the Triton interpreter when ``TRITON_INTERPRET=1``
is set before this package is imported (the kernel tests do that).
"""

from .cascade import CascadeInputs, PrefixConfig, default_prefix_config, prefix_attention
from .decode import (
    DecodeConfig,
    cascade_slot_offset,
    cascade_slots,
    choose_num_splits,
    decode_attention,
    default_decode_config,
    longest_first,
)
from .extend import ExtendConfig, default_extend_config, extend_attention
from .store import store_kv

__all__ = [
    "CascadeInputs",
    "DecodeConfig",
    "ExtendConfig",
    "PrefixConfig",
    "cascade_slot_offset",
    "cascade_slots",
    "choose_num_splits",
    "decode_attention",
    "default_decode_config",
    "default_extend_config",
    "default_prefix_config",
    "extend_attention",
    "longest_first",
    "prefix_attention",
    "store_kv",
]
