"""Prefix cache: content-addressed full blocks, kept after their last owner leaves.

Contract (the block manager is the only caller):

* **match**  -- :meth:`lookup` maps a :class:`BlockKey` to a block id.  The key's digest chains the
  parent block's digest, the block's token ids and an optional extra key (e.g. a cache salt or
  LoRA id).  A hit also compares the stored parent digest, token ids and extra key, so even a
  hash collision can never hand out the wrong K/V.
* **insert** -- :meth:`insert` registers a *full*, computed block.  First writer wins: if the
  key is present already the new block stays private to its sequence.
* **lock**   -- a cached block with refcount > 0 is in use; the allocator's refcount is the lock.
  When the refcount drops to 0 the block is :meth:`park`-ed: still addressable, but evictable.
* **evict**  -- :meth:`evict_lru` forgets the least-recently-parked block and returns its id so the
  caller can hand it to the allocator's free list.

Pure Python, no torch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

Digest = bytes
_ROOT = b"\x00" * 32  # the parent digest of a sequence's first block


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as the bytes the digests hash: little-endian int64 each."""
    return np.asarray(token_ids, dtype="<i8").tobytes()


def hash_block(parent: Digest | None, token_ids: Sequence[int], extra_key: object = None,
               packed: bytes | None = None) -> Digest:
    """SHA-256 over (parent digest, token ids, extra key): collision-resistant and stable.
    ``packed``: the token ids already as :func:`pack_tokens` bytes (one packing for a chain)."""
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    h.update(pack_tokens(token_ids) if packed is None else packed)
    if extra_key is not None:
        h.update(b"|extra|")
        h.update(repr(extra_key).encode())
    return h.digest()


class BlockKey(NamedTuple):
    """Everything that identifies the contents of one full block (a tuple: a prompt makes one
    per block when it is admitted, and a tuple is the cheapest record to make)."""

    digest: Digest
    parent: Digest | None
    token_ids: tuple[int, ...]
    extra_key: object = None

    @classmethod
    def make(cls, parent: Digest | None, token_ids: Sequence[int], extra_key: object = None,
             packed: bytes | None = None) -> BlockKey:
        toks = tuple(token_ids)
        return cls(hash_block(parent, toks, extra_key, packed), parent, toks, extra_key)

    def same_contents(self, other: BlockKey) -> bool:
        return (
            self.parent == other.parent
            and self.token_ids == other.token_ids
            and self.extra_key == other.extra_key
        )


@dataclass
class PrefixCacheStats:
    queries: int = 0  # full blocks looked up
    hits: int = 0  # of which found
    evictions: int = 0
    collisions: int = 0  # digest matched but contents differed (should stay 0 in practice)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class PrefixCache:
    def __init__(self) -> None:
        self._by_digest: dict[Digest, int] = {}
        self._key_of: dict[int, BlockKey] = {}
        # Parked blocks (refcount 0), least recently parked first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------ match / insert
    def lookup(self, key: BlockKey, *, count: bool = True) -> int | None:
        block = self._by_digest.get(key.digest)
        if block is not None and not self._key_of[block].same_contents(key):
            self.stats.collisions += 1
            block = None
        if count:
            self.stats.queries += 1
            self.stats.hits += block is not None
        return block

    def insert(self, key: BlockKey, block_id: int) -> bool:
        """Register ``block_id`` under ``key``.  False if the key (or the block) is taken."""
        if key.digest in self._by_digest or block_id in self._key_of:
            return False
        self._by_digest[key.digest] = block_id
        self._key_of[block_id] = key
        return True

    def key_of(self, block_id: int) -> BlockKey | None:
        return self._key_of.get(block_id)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._key_of

    # ------------------------------------------------------------------ lock / evict
    def park(self, block_id: int) -> None:
        """The block's last holder left; keep it addressable but evictable (most recent last)."""
        assert block_id in self._key_of, f"block {block_id} is not cached"
        self._evictable[block_id] = None

    def unpark(self, block_id: int) -> None:
        """A parked block gained a holder again."""
        del self._evictable[block_id]

    def is_parked(self, block_id: int) -> bool:
        return block_id in self._evictable

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def evictable_blocks(self) -> list[int]:
        return list(self._evictable)

    def evict_lru(self) -> int:
        block_id, _ = self._evictable.popitem(last=False)
        self._forget(block_id)
        self.stats.evictions += 1
        return block_id

    def _forget(self, block_id: int) -> None:
        key = self._key_of.pop(block_id)
        del self._by_digest[key.digest]

    def clear_evictable(self) -> list[int]:
        """Forget every parked block (e.g. a cache reset); returns their ids."""
        out = list(self._evictable)
        for b in out:
            self._forget(b)
        self._evictable.clear()
        return out

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    def check_integrity(self) -> None:
        assert len(self._by_digest) == len(self._key_of), "digest map and block map differ in size"
        for digest, block in self._by_digest.items():
            assert self._key_of[block].digest == digest, f"block {block} filed under the wrong digest"
        for block in self._evictable:
            assert block in self._key_of, f"parked block {block} is not cached"
