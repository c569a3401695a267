"""The paged KV memory system: allocator, prefix cache, block manager and KV pool.

``allocator``, ``prefix_cache`` and ``block_manager`` are pure Python (no torch import), so
the bookkeeping can be tested and reasoned about without tensors.  ``kv_pool`` holds the data.
"""

from .allocator import BlockAllocator, BlockError, OutOfBlocksError
from .block_manager import NULL_BLOCK, BlockManager, PrefixMatch, Slots
from .prefix_cache import BlockKey, PrefixCache, hash_block

__all__ = [
    "NULL_BLOCK",
    "BlockAllocator",
    "BlockError",
    "BlockKey",
    "BlockManager",
    "OutOfBlocksError",
    "PrefixCache",
    "PrefixMatch",
    "Slots",
    "hash_block",
]
