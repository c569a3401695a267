"""Block manager: per-sequence block tables on top of the allocator and the prefix cache.

It owns *which* physical block backs each logical block of each sequence.  It never touches
tensors: operations that need data to move (copy-on-write, swap) are returned to the caller as
``(src, dst)`` block pairs, which the KV pool executes before the next forward pass.

Logical block ``i`` of a sequence holds token positions ``[i*block_size, (i+1)*block_size)``.
With a sliding window, blocks that every future query sees as out of the window are released
and their table entries become :data:`NULL_BLOCK`; the attention kernels never read them
because the window masks those positions.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .allocator import BlockAllocator, OutOfBlocksError
from .prefix_cache import BlockKey, Digest, PrefixCache, pack_tokens

NULL_BLOCK = -1
SeqId = Hashable
# A sequence's block table: C ints (32 bits, as the attention kernels read them), so a step's
# tables join into one array with a memory copy per row instead of a Python int per block.
BlockTable = array
assert array("i").itemsize == 4
EventListener = Callable[[str, dict[str, Any]], None]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixMatch:
    """Result of :meth:`BlockManager.match_prefix`: reusable leading blocks of a prompt."""

    num_tokens: int  # prompt tokens whose K/V is already cached (a multiple of block_size)
    blocks: list[int]  # physical ids, NULL_BLOCK where the window makes a block unnecessary
    keys: list[BlockKey]  # keys of every matched logical block (for the hash chain)
    # Keys of every full prompt block looked up (matched or not): what the prompt will publish.
    prompt_keys: list[BlockKey] = field(default_factory=list)


@dataclass(frozen=True)
class Slots:
    """What :meth:`BlockManager.allocate_slots` did that the device must mirror: copy-on-write
    pairs ``(src, dst)``, to run before the next forward pass (the source block may be reused
    after that).  Always true, even with no copies, so ``if not allocate_slots(...)`` tests failure."""

    copies: tuple[tuple[int, int], ...] = ()


_NO_COPIES = Slots()


@dataclass
class _SeqState:
    blocks: BlockTable = field(default_factory=lambda: array("i"))
    keys: list[BlockKey] = field(default_factory=list)  # chain over the leading full blocks
    extra_key: object = None
    on_cpu: bool = False
    num_released: int = 0  # leading blocks released by the sliding window
    # Keys of the prompt's full blocks, made when the prompt was looked up in the prefix cache:
    # commit takes its next keys from here instead of hashing those blocks again.
    prompt_keys: list[BlockKey] = field(default_factory=list)


@dataclass
class BlockManagerStats:
    num_cow_copies: int = 0
    num_swapped_out_blocks: int = 0
    num_swapped_in_blocks: int = 0
    num_window_released: int = 0


class BlockManager:
    """Allocates, shares, copies-on-write, swaps and frees blocks for sequences.

    All mutating methods either succeed completely or raise / return ``False`` with the state
    unchanged.  ``check_integrity()`` asserts every invariant and is cheap enough to call from
    tests after each operation (and from the scheduler in debug mode).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        num_cpu_blocks: int = 0,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
        watermark: float = 0.01,
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {block_size!r}")
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window!r}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * num_blocks)
        self.gpu = BlockAllocator(num_blocks, "gpu")
        self.cpu = BlockAllocator(num_cpu_blocks, "cpu")
        self.cache = PrefixCache()
        self.stats = BlockManagerStats()
        self._seqs: dict[SeqId, _SeqState] = {}
        self.listener: EventListener | None = None

    # ================================================================== queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks obtainable right now: free ones plus evictable cached ones."""
        return self.gpu.num_free + self.cache.num_evictable

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by live sequences (refcount > 0)."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks kept only by the prefix cache (evictable)."""
        return self.cache.num_evictable

    def has_seq(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def is_swapped(self, seq_id: SeqId) -> bool:
        return self._seqs[seq_id].on_cpu

    def block_table(self, seq_id: SeqId) -> BlockTable:
        """The sequence's table itself (not a copy): read it before the manager's next change."""
        st = self._seqs[seq_id]
        if st.on_cpu:
            raise RuntimeError(f"sequence {seq_id!r} is swapped out; swap it in first")
        return st.blocks

    def swapped_block_table(self, seq_id: SeqId) -> BlockTable:
        """CPU block table of a swapped-out sequence (for swap executors, tests and viz)."""
        st = self._seqs[seq_id]
        if not st.on_cpu:
            raise RuntimeError(f"sequence {seq_id!r} is on the gpu; use block_table()")
        return st.blocks

    def num_hashed_blocks(self, seq_id: SeqId) -> int:
        """Leading full blocks of the sequence that :meth:`commit` has hashed (and, with prefix
        caching on, offered to the cache)."""
        return len(self._seqs[seq_id].keys)

    def num_blocks_of(self, seq_id: SeqId) -> int:
        """Live (non-released) blocks held by the sequence, on whichever device it lives."""
        return sum(b != NULL_BLOCK for b in self._seqs[seq_id].blocks)

    def seq_ids(self) -> list[SeqId]:
        return list(self._seqs)

    def can_allocate(self, num_blocks: int) -> bool:
        """Admission check for *new* work: leaves ``watermark`` of the pool free so running
        sequences can keep decoding without immediate preemption."""
        return self.num_free_blocks - num_blocks >= self.watermark_blocks

    def blocks_needed(self, seq_id: SeqId | None, num_computed: int, num_new: int,
                      prefix: PrefixMatch | None = None) -> int:
        """How many blocks :meth:`allocate_slots` would take from the pool (CoW included)."""
        st = self._seqs.get(seq_id) if seq_id is not None else None
        if st is None:
            have = len(prefix.blocks) if prefix else 0
            revived = sum(1 for b in prefix.blocks if b != NULL_BLOCK and self.cache.is_parked(b)) \
                if prefix else 0
            first_live = self._first_live_block(num_computed) if self.sliding_window else 0
            new = max(0, cdiv(num_computed + num_new, self.block_size) - max(have, first_live))
            return new + revived
        need = max(0, cdiv(num_computed + num_new, self.block_size) - len(st.blocks))
        return need + len(self._cow_targets(st, num_computed, num_new))

    # ================================================================== prefix cache
    def block_keys(self, token_ids: Sequence[int], num_blocks: int, extra_key: object = None,
                   start: list[BlockKey] | None = None) -> list[BlockKey]:
        """The hash chain over the first ``num_blocks`` full blocks of ``token_ids``."""
        keys = list(start or [])
        bs, first = self.block_size, len(keys)
        if num_blocks <= first:
            return keys
        parent: Digest | None = keys[-1].digest if keys else None
        packed = pack_tokens(token_ids[first * bs:num_blocks * bs])  # one conversion for the chain
        nbytes = 8 * bs
        for i in range(first, num_blocks):
            j = (i - first) * nbytes
            k = BlockKey.make(parent, token_ids[i * bs:(i + 1) * bs], extra_key, packed[j:j + nbytes])
            keys.append(k)
            parent = k.digest
        return keys

    def match_prefix(self, token_ids: Sequence[int], extra_key: object = None) -> PrefixMatch:
        """Find the longest reusable cached prefix of a prompt.  No state changes but counters.

        At least the last prompt token is always left to compute (its logits are needed), so
        a fully cached prompt matches ``(len-1) // block_size`` blocks.  With a sliding window,
        blocks wholly outside the window of the first computed token need not be cached.
        """
        if not self.enable_prefix_caching or len(token_ids) == 0:
            return PrefixMatch(0, [], [])
        max_blocks = (len(token_ids) - 1) // self.block_size
        keys = self.block_keys(token_ids, max_blocks, extra_key)
        found = [self.cache.lookup(k) for k in keys]
        # none_before[n]: the last block before n that is not cached (-1: none), so each
        # candidate length below is checked in O(1), not by rescanning its blocks.
        none_before, last = [-1], -1
        for j, b in enumerate(found):
            last = j if b is None else last
            none_before.append(last)
        best = 0
        for n in range(max_blocks, 0, -1):
            lo = self._first_live_block(n * self.block_size) if self.sliding_window else 0
            if none_before[n] < lo:  # blocks lo..n-1 are all cached
                best = n
                break
        if best == 0:
            return PrefixMatch(0, [], [], keys)
        lo = self._first_live_block(best * self.block_size) if self.sliding_window else 0
        blocks = [NULL_BLOCK] * lo + [b for b in found[lo:best] if b is not None]  # all found (see above)
        return PrefixMatch(best * self.block_size, blocks, keys[:best], keys)

    # ================================================================== allocation
    def allocate_slots(self, seq_id: SeqId, num_computed: int, num_new: int,
                       prefix: PrefixMatch | None = None, extra_key: object = None) -> Slots | None:
        """Make positions ``[num_computed, num_computed + num_new)`` writable for ``seq_id``.

        For a new sequence this first adopts the blocks of ``prefix`` (then ``num_computed``
        must equal ``prefix.num_tokens``).  Releases blocks that left the sliding window,
        allocates new blocks only when the last one is full, and copies-on-write any shared
        block the new tokens land in: the returned :class:`Slots` lists those copies, which must
        run before the next forward pass.  Returns ``None`` -- with nothing changed -- when the
        pool cannot supply the blocks.
        """
        if num_new < 0 or num_computed < 0:
            raise ValueError(f"negative token counts ({num_computed=}, {num_new=})")
        st = self._seqs.get(seq_id)
        if st is not None and num_new == 1 and not st.on_cpu and self.sliding_window is None:
            # The common decode step: the token lands in a private block that has room.
            i = num_computed // self.block_size
            if i < len(st.blocks) and self.gpu.refcount(st.blocks[i]) == 1:
                return _NO_COPIES
        if st is None:
            pnum = prefix.num_tokens if prefix else 0
            if num_computed != pnum:
                raise ValueError(f"new sequence {seq_id!r}: num_computed={num_computed} but prefix has {pnum}")
            if prefix:
                self._check_prefix_fresh(prefix)
            if self.blocks_needed(None, num_computed, num_new, prefix) > self.num_free_blocks:
                return None
            st = _SeqState(extra_key=extra_key)
            if prefix:
                for b in prefix.blocks:
                    if b != NULL_BLOCK:
                        self._take_ref(b, seq_id)
                st.blocks = array("i", prefix.blocks)
                st.keys = list(prefix.keys)
                st.num_released = sum(b == NULL_BLOCK for b in prefix.blocks)
                if prefix.prompt_keys and prefix.prompt_keys[0].extra_key == extra_key:
                    st.prompt_keys = prefix.prompt_keys
            self._seqs[seq_id] = st
            self._emit("allocate_seq", {"seq": seq_id, "prefix_blocks": [b for b in st.blocks if b != NULL_BLOCK],
                                        "num_released": st.num_released}, seqs=(seq_id,))
        elif st.on_cpu:
            raise RuntimeError(f"sequence {seq_id!r} is swapped out; swap it in first")
        elif self.blocks_needed(seq_id, num_computed, num_new) > self.num_free_blocks:
            return None

        if self.sliding_window:
            self._release_out_of_window(seq_id, st, num_computed)
        # Grow: sliding-window sequences may have released blocks, but logical indexing stays.
        need = cdiv(num_computed + num_new, self.block_size) - len(st.blocks)
        if need > 0:
            first_live = self._first_live_block(num_computed) if self.sliding_window else 0
            pad = max(0, first_live - len(st.blocks))  # prefix skipped past the window edge
            st.blocks.extend([NULL_BLOCK] * pad)
            st.num_released += pad
            new = self._take_fresh(need - pad)
            st.blocks.extend(new)
            self._emit("allocate", {"seq": seq_id, "blocks": new, "pad": pad}, gpu=new, seqs=(seq_id,))
        copies: list[tuple[int, int]] = []
        for i in self._cow_targets(st, num_computed, num_new):
            old = st.blocks[i]
            (new_block,) = self._take_fresh(1)
            self._drop_ref(old)
            st.blocks[i] = new_block
            copies.append((old, new_block))
            self.stats.num_cow_copies += 1
            self._emit("cow", {"seq": seq_id, "src": old, "dst": new_block}, gpu=(old, new_block), seqs=(seq_id,))
        return Slots(tuple(copies)) if copies else _NO_COPIES

    def commit(self, seq_id: SeqId, token_ids: Sequence[int], num_computed: int) -> None:
        """Tell the manager that ``num_computed`` leading tokens now have K/V in their blocks.

        Newly full blocks are hashed (continuing the chain) and published to the prefix cache.
        Nothing for a sequence the manager does not hold or holds swapped out (called for every
        sequence at every step: most calls fill no block).
        """
        st = self._seqs.get(seq_id)
        if st is None or st.on_cpu:
            return
        num_full = min(num_computed // self.block_size, len(st.blocks))
        start = len(st.keys)
        if num_full <= start:
            return
        if len(st.prompt_keys) > start:  # the same chain, made when the prompt was looked up
            st.keys = st.prompt_keys[:num_full]
        st.keys = self.block_keys(token_ids, num_full, st.extra_key, st.keys)
        if not self.enable_prefix_caching:
            return
        inserted = []
        for i in range(start, num_full):
            b = st.blocks[i]
            if b != NULL_BLOCK and not self.cache.is_cached(b) and self.cache.insert(st.keys[i], b):
                inserted.append(b)
        if inserted:
            self._emit("cache_insert", {"seq": seq_id, "blocks": inserted}, gpu=inserted)

    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """The child shares every block of the parent (refcounts go up; writes will CoW)."""
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already exists")
        p = self._seqs[parent_id]
        if p.on_cpu:
            raise RuntimeError(f"cannot fork swapped-out sequence {parent_id!r}")
        for b in p.blocks:
            if b != NULL_BLOCK:
                self.gpu.incref(b)
        self._seqs[child_id] = _SeqState(array("i", p.blocks), list(p.keys), p.extra_key, False, p.num_released)
        shared = [b for b in p.blocks if b != NULL_BLOCK]
        self._emit("fork", {"seq": child_id, "parent": parent_id, "blocks": shared}, gpu=shared, seqs=(child_id,))

    def free(self, seq_id: SeqId) -> None:
        """Drop every block of the sequence.  Tail blocks go first so they are evicted first."""
        st = self._seqs.pop(seq_id)
        alloc = self.cpu if st.on_cpu else self.gpu
        for b in reversed(st.blocks):
            if b == NULL_BLOCK:
                continue
            if st.on_cpu:
                alloc.release(b)
            else:
                self._drop_ref(b)
        held = [b for b in st.blocks if b != NULL_BLOCK]
        self._emit("free", {"seq": seq_id, "blocks": held, "cpu": st.on_cpu}, cpu=held if st.on_cpu else (),
                   gpu=() if st.on_cpu else held, seqs=(seq_id,))

    # ================================================================== swap
    def can_swap_out(self, seq_ids: Sequence[SeqId]) -> bool:
        return len(self._unique_blocks(seq_ids)) <= self.cpu.num_free

    def can_swap_in(self, seq_ids: Sequence[SeqId]) -> bool:
        return self._swap_in_cost(self._unique_blocks(seq_ids), self._cached_twins(seq_ids)) <= self.num_free_blocks

    def _swap_in_cost(self, cpu_blocks: list[int], twins: dict[int, int]) -> int:
        """Blocks a swap-in takes from the pool: a fresh one per CPU block whose contents the
        prefix cache no longer holds, and each parked twin it revives."""
        return sum(b not in twins for b in cpu_blocks) + sum(self.cache.is_parked(t) for t in set(twins.values()))

    def blocks_to_resume(self, seq_ids: Sequence[SeqId], positions: Sequence[int]) -> int:
        """Blocks that swapping this group back in, then making position ``positions[i]``
        writable for sequence ``seq_ids[i]``, takes from the pool: exact, so a group that needs
        the whole pool is not kept waiting for more than it has.

        Fresh blocks for the swapped contents (not for those the prefix cache still holds on the
        GPU, unless parked there), a new block where a position starts one, and a copy-on-write
        copy for each writer of a shared block (the last writer of a block shared only inside
        the group writes in place)."""
        twins = self._cached_twins(seq_ids)
        need = self._swap_in_cost(self._unique_blocks(seq_ids), twins)
        refs: dict[int, int] = {}
        writers: dict[int, int] = {}
        for s, pos in zip(seq_ids, positions):
            blocks = self._seqs[s].blocks
            for b in blocks:
                if b != NULL_BLOCK:
                    refs[b] = refs.get(b, 0) + 1
            i = pos // self.block_size
            if i >= len(blocks):
                need += 1
            elif blocks[i] != NULL_BLOCK:
                writers[blocks[i]] = writers.get(blocks[i], 0) + 1
        for b, w in writers.items():
            held_elsewhere = b in twins and not self.cache.is_parked(twins[b])
            need += w if held_elsewhere or refs[b] > w else w - 1
        return need

    def swap_out(self, seq_ids: Sequence[SeqId]) -> list[tuple[int, int]]:
        """Move a group of sequences (e.g. siblings of one request) to the CPU pool.

        Blocks shared inside the group are copied once and stay shared on the CPU.  Returns
        ``(gpu_block, cpu_block)`` pairs to copy *before* the GPU blocks are written again.
        """
        return self._swap(seq_ids, to_cpu=True)

    def swap_in(self, seq_ids: Sequence[SeqId]) -> list[tuple[int, int]]:
        """Bring a swapped-out group back; returns ``(cpu_block, gpu_block)`` pairs to copy."""
        return self._swap(seq_ids, to_cpu=False)

    def _swap(self, seq_ids: Sequence[SeqId], to_cpu: bool) -> list[tuple[int, int]]:
        for s in seq_ids:
            if self._seqs[s].on_cpu == to_cpu:
                raise RuntimeError(f"sequence {s!r} is already on the {'cpu' if to_cpu else 'gpu'}")
        src_blocks = self._unique_blocks(seq_ids)
        cached = {} if to_cpu else self._cached_twins(seq_ids)
        need = len(src_blocks) if to_cpu else self._swap_in_cost(src_blocks, cached)
        room = self.cpu.num_free if to_cpu else self.num_free_blocks
        if need > room:
            raise OutOfBlocksError(need, room, "cpu" if to_cpu else "gpu")
        mapping: dict[int, int] = {}
        copies: list[tuple[int, int]] = []
        # Identical contents are still on the GPU: share, don't copy.  Pin every twin before
        # taking any fresh block, or _take_fresh could evict a parked twin and hand it out as
        # the copy target of another block.  Two CPU blocks may share one twin (equal blocks
        # computed side by side), so each distinct twin gains one reference here and the
        # per-entry count below adds the rest.
        for twin in dict.fromkeys(cached.values()):
            self._take_ref(twin, seq_ids[0])
        for src in src_blocks:
            if src in cached:
                mapping[src] = cached[src]
                continue
            mapping[src] = self.cpu.allocate(1)[0] if to_cpu else self._take_fresh(1)[0]
            copies.append((src, mapping[src]))
        for s in seq_ids:
            st = self._seqs[s]
            new_blocks = array("i")
            for b in st.blocks:
                if b == NULL_BLOCK:
                    new_blocks.append(b)
                    continue
                dst = mapping[b]
                if to_cpu:
                    self._drop_ref(b)
                else:
                    self.cpu.release(b)
                new_blocks.append(dst)
            st.blocks = new_blocks
            st.on_cpu = to_cpu
        # Each destination was allocated with one reference; add the rest (shared in group).
        counts: dict[int, int] = {}
        for s in seq_ids:
            for b in self._seqs[s].blocks:
                if b != NULL_BLOCK:
                    counts[b] = counts.get(b, 0) + 1
        dst_alloc = self.cpu if to_cpu else self.gpu
        for b, c in counts.items():
            for _ in range(c - 1):
                dst_alloc.incref(b)
        inserted: list[tuple[SeqId, int]] = []
        if to_cpu:
            self.stats.num_swapped_out_blocks += len(copies)
        else:
            self.stats.num_swapped_in_blocks += len(copies)
            if self.enable_prefix_caching:
                for s in seq_ids:  # the contents are the same, so the blocks can be shared again
                    st = self._seqs[s]
                    for b, k in zip(st.blocks, st.keys):
                        if b != NULL_BLOCK and not self.cache.is_cached(b) and self.cache.insert(k, b):
                            inserted.append((s, b))
        # Reported once the whole swap is done, so the state each event carries is the whole pool's.
        dst_blocks = list(mapping.values())
        self._emit("swap_out" if to_cpu else "swap_in",
                   {"seqs": list(seq_ids), "pairs": copies, "shared": [mapping[c] for c in cached if c in mapping]},
                   gpu=src_blocks if to_cpu else dst_blocks, cpu=dst_blocks if to_cpu else src_blocks, seqs=seq_ids)
        for s, b in inserted:
            self._emit("cache_insert", {"seq": s, "blocks": [b]}, gpu=(b,))
        return copies

    def _cached_twins(self, seq_ids: Sequence[SeqId]) -> dict[int, int]:
        """CPU blocks of swapped-out sequences whose contents the prefix cache still holds."""
        twins: dict[int, int] = {}
        if not self.enable_prefix_caching:
            return twins
        for s in seq_ids:
            st = self._seqs[s]
            for b, k in zip(st.blocks, st.keys):
                if b != NULL_BLOCK and b not in twins:
                    g = self.cache.lookup(k, count=False)
                    if g is not None:
                        twins[b] = g
        return twins

    def _unique_blocks(self, seq_ids: Sequence[SeqId]) -> list[int]:
        seen: dict[int, None] = {}
        for s in seq_ids:
            for b in self._seqs[s].blocks:
                if b != NULL_BLOCK:
                    seen[b] = None
        return list(seen)

    # ================================================================== maintenance
    def reset_prefix_cache(self) -> int:
        """Drop every evictable cached block back to the free list.  Returns how many."""
        blocks = self.cache.clear_evictable()
        for b in blocks:
            self.gpu.free(b)
        self._emit("cache_reset", {"blocks": blocks}, gpu=blocks)
        return len(blocks)

    # ================================================================== integrity
    def check_integrity(self) -> None:
        """Assert every invariant of the pool.  Raises ``AssertionError`` naming the first
        violation found."""
        self.gpu.check_integrity()
        self.cpu.check_integrity()
        self.cache.check_integrity()
        for alloc, on_cpu in ((self.gpu, False), (self.cpu, True)):
            holders = [0] * alloc.num_blocks
            for sid, st in self._seqs.items():
                if st.on_cpu != on_cpu:
                    continue
                for b in st.blocks:
                    if b == NULL_BLOCK:
                        continue
                    assert 0 <= b < alloc.num_blocks, f"seq {sid!r} points at unknown {alloc.name} block {b}"
                    assert not alloc.is_free(b), f"seq {sid!r} points at free {alloc.name} block {b}"
                    holders[b] += 1
            for b in range(alloc.num_blocks):
                assert alloc.refcount(b) == holders[b], (
                    f"{alloc.name} block {b}: refcount {alloc.refcount(b)} != {holders[b]} holders"
                )
                parked = not on_cpu and self.cache.is_parked(b)
                if holders[b] == 0 and not alloc.is_free(b):
                    assert parked, f"{alloc.name} block {b} is neither free, held nor cached"
                if parked:
                    assert holders[b] == 0 and not alloc.is_free(b), f"parked block {b} is in use or free"
        used = sum(1 for b in range(self.num_blocks) if self.gpu.refcount(b) > 0)
        assert self.gpu.num_free + used + self.cache.num_evictable == self.num_blocks, (
            f"free {self.gpu.num_free} + used {used} + cached {self.cache.num_evictable} != {self.num_blocks}"
        )
        for b in range(self.num_blocks):
            if self.cache.is_cached(b):
                assert not self.gpu.is_free(b), f"cached block {b} is on the free list"
        for sid, st in self._seqs.items():
            assert len(st.keys) <= len(st.blocks), f"seq {sid!r} has more hashes than blocks"
            assert st.num_released == sum(b == NULL_BLOCK for b in st.blocks), f"seq {sid!r} release count"
            assert all(b == NULL_BLOCK for b in st.blocks[: st.num_released]), f"seq {sid!r} holes"

    # ================================================================== internals
    def _check_prefix_fresh(self, prefix: PrefixMatch) -> None:
        """A match is only valid until its blocks are evicted (e.g. by another admission in
        the same step); adopting an evicted block would read someone else's K/V."""
        for b, k in zip(prefix.blocks, prefix.keys):
            if b == NULL_BLOCK:
                continue
            cur = self.cache.key_of(b)
            if cur is None or cur.digest != k.digest or not cur.same_contents(k):
                raise ValueError(f"stale prefix match: block {b} no longer holds the matched tokens; "
                                 "call match_prefix() again")

    def _first_live_block(self, first_query_pos: int) -> int:
        """Index of the first logical block some query at ``>= first_query_pos`` can still see."""
        assert self.sliding_window is not None
        lowest_visible = first_query_pos - self.sliding_window + 1
        return max(0, lowest_visible // self.block_size)

    def _release_out_of_window(self, seq_id: SeqId, st: _SeqState, num_computed: int) -> None:
        upto = min(self._first_live_block(num_computed), len(st.blocks))
        released = []
        for i in range(st.num_released, upto):
            b = st.blocks[i]
            if b != NULL_BLOCK:
                self._drop_ref(b)
                released.append(b)
            st.blocks[i] = NULL_BLOCK
        if upto > st.num_released:
            st.num_released = upto
            self.stats.num_window_released += len(released)
            self._emit("window_release", {"seq": seq_id, "blocks": released}, gpu=released, seqs=(seq_id,))

    def _cow_targets(self, st: _SeqState, num_computed: int, num_new: int) -> list[int]:
        if num_new == 0:
            return []
        first = num_computed // self.block_size
        last = min(cdiv(num_computed + num_new, self.block_size), len(st.blocks))
        return [i for i in range(first, last)
                if st.blocks[i] != NULL_BLOCK and self.gpu.refcount(st.blocks[i]) > 1]

    def _take_fresh(self, n: int) -> list[int]:
        """n blocks for new contents: free ones first, then evict least-recently-used cached."""
        if n > self.num_free_blocks:
            raise OutOfBlocksError(n, self.num_free_blocks)
        while self.gpu.num_free < n:
            victim = self.cache.evict_lru()
            self.gpu.free(victim)
            self._emit("evict", {"block": victim}, gpu=(victim,))
        return self.gpu.allocate(n)

    def _take_ref(self, b: int, seq_id: SeqId) -> None:
        """A new holder for a cached block (reviving it if it was parked)."""
        if self.cache.is_parked(b):
            self.cache.unpark(b)
        self.gpu.incref(b)
        if self.listener is not None:  # (once per block of every prefix hit: no event built for nobody)
            self._emit("share", {"seq": seq_id, "block": b, "refcount": self.gpu.refcount(b)}, gpu=(b,))

    def _drop_ref(self, b: int) -> None:
        if self.gpu.decref(b) == 0:
            if self.cache.is_cached(b):
                self.cache.park(b)
            else:
                self.gpu.free(b)

    def _emit(self, kind: str, fields: dict[str, Any], *, gpu: Iterable[int] = (), cpu: Iterable[int] = (),
              seqs: Iterable[SeqId] = ()) -> None:
        """Report a change to the listener (a trace recorder) together with the state it left: for
        every GPU / CPU block and sequence the change touched, what the allocators, the prefix cache
        and the tables now hold.  A viewer then shows the manager's own state and never has to
        re-derive it from the event (so it cannot drift when these rules change)."""
        if self.listener is not None:
            fields["state"] = self._state_of(gpu, cpu, seqs)
            self.listener(kind, fields)

    def _state_of(self, gpu: Iterable[int], cpu: Iterable[int], seqs: Iterable[SeqId]) -> dict[str, list[Any]]:
        """``gpu``: ``[block, refcount, in_prefix_cache, evictable]``; ``cpu``: ``[block, refcount]``;
        ``seqs``: ``[seq, table, on_cpu]``, with table ``None`` once the sequence is gone."""
        cache = self.cache
        out_seqs: list[list[Any]] = []
        for s in dict.fromkeys(seqs):
            st = self._seqs.get(s)
            out_seqs.append([s, None, False] if st is None else [s, list(st.blocks), st.on_cpu])
        return {
            "gpu": [[b, self.gpu.refcount(b), cache.is_cached(b), cache.is_parked(b)] for b in dict.fromkeys(gpu)],
            "cpu": [[b, self.cpu.refcount(b)] for b in dict.fromkeys(cpu)],
            "seqs": out_seqs,
        }
