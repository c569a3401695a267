"""Block allocator: a fixed pool of block ids with reference counts.

Pure Python on purpose (no torch import): it is the piece every other part of the cache
trusts, so it must be cheap to reason about and to test exhaustively.

A block is in exactly one of three states:

* **free**    -- on the free list, refcount 0;
* **held**    -- refcount >= 1 (owned by one or more sequences);
* **parked**  -- refcount 0 but *not* on the free list.  The prefix cache parks blocks whose
  contents are still worth keeping; it either revives them (:meth:`incref`) or gives them
  back with :meth:`free`.

Every operation is O(1) per block and validates its arguments before touching any state, so a
bad call raises and leaves the allocator exactly as it was (the tutorial's allocator silently
double-frees and raises ``IndexError`` when it runs dry).
"""

from __future__ import annotations

from collections.abc import Iterable


class BlockError(RuntimeError):
    """Base class for misuse of the block pool (double free, bad id, ...)."""


class OutOfBlocksError(BlockError):
    """Raised when more blocks are requested than are free."""

    def __init__(self, requested: int, free: int, pool: str = "gpu") -> None:
        super().__init__(f"out of {pool} KV blocks: requested {requested}, only {free} free")
        self.requested = requested
        self.free = free
        self.pool = pool


class BlockAllocator:
    """O(1) allocate / free of integer block ids ``0 .. num_blocks-1`` with refcounts."""

    def __init__(self, num_blocks: int, name: str = "gpu") -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.name = name
        # Popping from the end hands out low ids first, which keeps pictures of the pool tidy.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._is_free: list[bool] = [True] * num_blocks
        self._ref: list[int] = [0] * num_blocks

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref[block_id]

    def is_free(self, block_id: int) -> bool:
        self._check_id(block_id)
        return self._is_free[block_id]

    def free_blocks(self) -> list[int]:
        return list(self._free)

    # ------------------------------------------------------------------ mutations
    def allocate(self, n: int = 1) -> list[int]:
        """Take ``n`` free blocks, each with refcount 1.  All or nothing."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"number of blocks to allocate must be a non-negative int, got {n!r}")
        if n > len(self._free):
            raise OutOfBlocksError(n, len(self._free), self.name)
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._is_free[b] = False
            self._ref[b] = 1
        return out

    def incref(self, block_id: int) -> int:
        """Add a holder.  Works on held and parked blocks, never on free ones."""
        self._check_id(block_id)
        if self._is_free[block_id]:
            raise BlockError(f"{self.name} block {block_id} is free; it cannot gain a reference")
        self._ref[block_id] += 1
        return self._ref[block_id]

    def decref(self, block_id: int) -> int:
        """Drop a holder and return the new count.  At 0 the block is *parked*: the caller
        decides whether to :meth:`free` it or keep it for reuse."""
        self._check_id(block_id)
        if self._ref[block_id] <= 0:
            raise BlockError(f"{self.name} block {block_id} has refcount 0; decref would go below zero")
        self._ref[block_id] -= 1
        return self._ref[block_id]

    def free(self, block_id: int) -> None:
        """Return a parked block (refcount 0) to the free list."""
        self._check_id(block_id)
        if self._is_free[block_id]:
            raise BlockError(f"double free of {self.name} block {block_id}")
        if self._ref[block_id] != 0:
            raise BlockError(
                f"{self.name} block {block_id} still has {self._ref[block_id]} reference(s); cannot free"
            )
        self._is_free[block_id] = True
        self._free.append(block_id)

    def release(self, block_id: int) -> bool:
        """decref, and free the block if that was the last reference.  True if freed."""
        if self.decref(block_id) == 0:
            self.free(block_id)
            return True
        return False

    def release_all(self, block_ids: Iterable[int]) -> None:
        """:meth:`release` each id (repeats allowed).  All or nothing: every id is checked first."""
        counts: dict[int, int] = {}
        for b in block_ids:
            self._check_id(b)
            counts[b] = counts.get(b, 0) + 1
        for b, c in counts.items():
            if self._ref[b] < c:
                raise BlockError(f"{self.name} block {b} has {self._ref[b]} reference(s); cannot release {c}")
        for b, c in counts.items():
            for _ in range(c):
                self.release(b)

    # ------------------------------------------------------------------ checks
    def check_integrity(self) -> None:
        """Assert the allocator's own invariants (the block manager checks the rest)."""
        assert len(set(self._free)) == len(self._free), "free list holds a block twice"
        for b in range(self.num_blocks):
            on_list = self._is_free[b]
            if on_list:
                assert self._ref[b] == 0, f"free block {b} has refcount {self._ref[b]}"
            assert self._ref[b] >= 0, f"block {b} has negative refcount"
        assert sum(self._is_free) == len(self._free), "free flags disagree with free list"
        assert all(self._is_free[b] for b in self._free), "free list holds a used block"

    def _check_id(self, block_id: int) -> None:
        # Exactly int: bool is an int subclass, but True/False as a block id is always a caller bug.
        if type(block_id) is not int or not 0 <= block_id < self.num_blocks:
            raise BlockError(f"unknown {self.name} block id {block_id!r} (pool has {self.num_blocks})")
