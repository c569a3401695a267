"""Stateful property test: the block manager and a real KV pool, driven as an engine drives them.

Hypothesis runs random programs of admissions (with prefix-cache lookups), appends, writes,
forks, frees, swaps and cache resets against a :class:`BlockManager` and a small CPU
:class:`KVCachePool`, and keeps a shadow model of what each live sequence should see.

Every token's K/V is a deterministic function of the sequence's token ids up to and including
it (and its extra key), so two sequences with the same prefix legitimately hold identical
pages and a prefix-cache hit is checkable.  After every step:

* ``check_integrity()`` holds;
* every readable position of every live sequence (GPU or swapped out) holds exactly its
  shadow K/V -- so copy-on-write really isolates, swaps preserve contents and prefix hits
  hand out the right pages;
* positions about to be written lie in blocks that sequence owns alone (refcount 1, not in
  the prefix cache);
* with a sliding window, every position the next query can see is still backed.

Prompts come from a tiny vocabulary and from prefixes of live sequences, so prefixes collide
and the cache gets hits.  The pool is small, so admissions evict and allocations fail.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedattn.attention.metadata import AttentionMetadata
from pagedattn.cache import NULL_BLOCK, BlockManager, OutOfBlocksError, Slots
from pagedattn.cache.kv_pool import KVCachePool, KVCacheSpec

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 2, 4
NUM_GPU_BLOCKS, NUM_CPU_BLOCKS = 20, 16
VOCAB = 3  # tiny on purpose: random blocks collide, so prefixes are shared

SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@functools.lru_cache(maxsize=1 << 16)
def kv_value(extra_key: object, tokens: tuple[int, ...]) -> torch.Tensor:
    """K/V ``[L, 2, Hkv, D]`` of the last token of ``tokens``: a pure function of the prefix."""
    n = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_DIM
    digest = hashlib.blake2b(repr((extra_key, tokens)).encode(), digest_size=2 * n).digest()
    vals = torch.frombuffer(bytearray(digest), dtype=torch.int16).to(torch.float32) / 4096.0
    return vals.view(NUM_LAYERS, 2, NUM_KV_HEADS, HEAD_DIM)


def expected_kv(extra_key: object, tokens: list[int], positions: range) -> torch.Tensor:
    """``[L, 2, len(positions), Hkv, D]``: what the pool must hold at these positions."""
    return torch.stack([kv_value(extra_key, tuple(tokens[: p + 1])) for p in positions], dim=2)


@dataclass
class Shadow:
    tokens: list[int]  # every token with a slot (written or about to be)
    computed: int  # leading tokens whose K/V is in the pool
    extra_key: object
    on_cpu: bool = False

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed


tokens_st = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=14)


class PagedKVMachine(RuleBasedStateMachine):
    block_size = 4
    window: int | None = None
    prefix_caching = True

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(
            NUM_GPU_BLOCKS, self.block_size, num_cpu_blocks=NUM_CPU_BLOCKS,
            enable_prefix_caching=self.prefix_caching, sliding_window=self.window, watermark=0.0,
        )
        spec = KVCacheSpec(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, self.block_size, torch.float32)
        self.pool = KVCachePool(spec, NUM_GPU_BLOCKS, "cpu", NUM_CPU_BLOCKS)
        # Poison both pools: a read of a never-written slot can never look right by accident.
        self.pool.kv.fill_(float("nan"))
        self.pool.cpu_kv.fill_(float("nan"))
        self.seqs: dict[int, Shadow] = {}
        self.next_id = 0

    # ------------------------------------------------------------------ helpers
    def _ids(self, *, on_cpu: bool | None = None, idle: bool | None = None) -> list[int]:
        return [
            s for s, sh in self.seqs.items()
            if (on_cpu is None or sh.on_cpu == on_cpu) and (idle is None or (sh.pending == 0) == idle)
        ]

    def _snapshot(self) -> tuple:
        bm = self.bm
        tables = tuple(
            (s, bm.is_swapped(s), tuple(bm.swapped_block_table(s) if bm.is_swapped(s) else bm.block_table(s)))
            for s in bm.seq_ids()
        )
        return (
            tuple(bm.gpu.free_blocks()), tuple(bm.gpu.refcount(b) for b in range(bm.num_blocks)),
            tuple(bm.cpu.free_blocks()), tuple(bm.cpu.refcount(b) for b in range(bm.cpu.num_blocks)),
            tuple(bm.cache.evictable_blocks()), bm.cache.num_cached, tables,
        )

    def _run_copies(self, slots: Slots) -> None:
        """Copy-on-write pairs run before anything is written, as the engine does."""
        self.pool.copy_blocks(list(slots.copies))

    def _check_match(self, prompt: list[int], extra_key: object):
        m = self.bm.match_prefix(prompt, extra_key)
        bs = self.block_size
        assert m.num_tokens % bs == 0
        assert m.num_tokens <= len(prompt) - 1 or m.num_tokens == 0, "the last token is always computed"
        assert len(m.blocks) == m.num_tokens // bs
        # A hit hands out pages that hold exactly this prompt's K/V.
        for i, b in enumerate(m.blocks):
            if b == NULL_BLOCK:
                assert self.window is not None
                continue
            got = self.pool.kv[:, :, b]  # [L, 2, bs, H, D]
            assert torch.equal(got, expected_kv(extra_key, prompt, range(i * bs, (i + 1) * bs)))
        return m

    def _prompt(self, data: st.DataObject) -> list[int]:
        """Random tokens, or a prefix of a live sequence plus random tokens (prefix hits)."""
        live = sorted(self.seqs)
        if live and data.draw(st.booleans()):
            src = self.seqs[data.draw(st.sampled_from(live))].tokens
            cut = data.draw(st.integers(1, len(src)))
            return src[:cut] + data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=6))
        return data.draw(tokens_st)

    def _admit(self, prompt: list[int], extra_key: object, run_now: bool) -> None:
        m = self._check_match(prompt, extra_key)
        before = self._snapshot()
        sid = self.next_id
        ok = self.bm.allocate_slots(sid, m.num_tokens, len(prompt) - m.num_tokens, m, extra_key)
        if not ok:
            assert self._snapshot() == before and not self.bm.has_seq(sid)
            return
        self.next_id += 1
        assert ok.copies == (), "a new sequence never copies"
        self.seqs[sid] = Shadow(list(prompt), m.num_tokens, extra_key)
        if run_now:
            self._write(sid, self.seqs[sid].pending)

    def _write(self, sid: int, n: int) -> None:
        """The forward pass: store K/V of the next ``n`` pending tokens, then commit them."""
        sh = self.seqs[sid]
        meta = AttentionMetadata.build([n], [sh.computed + n], [self.bm.block_table(sid)], self.block_size)
        kv = expected_kv(sh.extra_key, sh.tokens, range(sh.computed, sh.computed + n))  # [L, 2, n, H, D]
        for layer in range(NUM_LAYERS):
            self.pool.write(layer, kv[layer, 0], kv[layer, 1], meta.slot_mapping)
        sh.computed += n
        self.bm.commit(sid, sh.tokens, sh.computed)

    def _grow(self, sid: int, new: list[int]) -> bool:
        """Make room for ``new`` more tokens after any still pending (copy-on-write run at once).
        False, with nothing changed, if the pool is dry."""
        sh = self.seqs[sid]
        before = self._snapshot()
        slots = self.bm.allocate_slots(sid, sh.computed, sh.pending + len(new))
        if slots is None:
            assert self._snapshot() == before
            return False
        self._run_copies(slots)
        sh.tokens.extend(new)
        return True

    # ------------------------------------------------------------------ rules
    @rule(data=st.data(), extra_key=st.sampled_from([None, None, "lora"]), run_now=st.booleans())
    def admit(self, data: st.DataObject, extra_key: object, run_now: bool) -> None:
        self._admit(self._prompt(data), extra_key, run_now)

    @rule(n=st.integers(8, 40), seed=st.integers(0, 2**16))
    def admit_large(self, n: int, seed: int) -> None:
        """A long prompt under pressure: evicts cached blocks or fails cleanly."""
        g = torch.Generator().manual_seed(seed)
        self._admit(torch.randint(0, VOCAB, (n,), generator=g).tolist(), None, True)

    @precondition(lambda self: self._ids(on_cpu=False))
    @rule(data=st.data(), new=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3))
    def append(self, data: st.DataObject, new: list[int]) -> None:
        """Room for a few tokens (a chunk or a speculative run), written by a later step."""
        self._grow(data.draw(st.sampled_from(sorted(self._ids(on_cpu=False)))), new)

    @precondition(lambda self: self._ids(on_cpu=False, idle=True))
    @rule(data=st.data(), new=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12))
    def decode(self, data: st.DataObject, new: list[int]) -> None:
        """Several decode steps of one sequence: one slot, write, commit, repeat."""
        sid = data.draw(st.sampled_from(sorted(self._ids(on_cpu=False, idle=True))))
        for tok in new:
            if not self._grow(sid, [tok]):
                return
            self._write(sid, 1)
            self.bm.check_integrity()

    @precondition(lambda self: [s for s in self._ids(on_cpu=False) if self.seqs[s].pending])
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(s for s in self._ids(on_cpu=False) if self.seqs[s].pending)))
        self._write(sid, data.draw(st.integers(1, self.seqs[sid].pending)))

    @precondition(lambda self: self._ids(on_cpu=False, idle=True))
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(sorted(self._ids(on_cpu=False, idle=True))))
        child = self.next_id
        self.next_id += 1
        self.bm.fork(parent, child)
        p = self.seqs[parent]
        self.seqs[child] = Shadow(list(p.tokens), p.computed, p.extra_key)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        del self.seqs[sid]

    @precondition(lambda self: self._ids(on_cpu=False, idle=True))
    @rule(data=st.data())
    def swap_out(self, data: st.DataObject) -> None:
        group = data.draw(st.lists(st.sampled_from(sorted(self._ids(on_cpu=False, idle=True))),
                                   min_size=1, max_size=3, unique=True))
        if not self.bm.can_swap_out(group):
            before = self._snapshot()
            try:
                self.bm.swap_out(group)
            except OutOfBlocksError:
                assert self._snapshot() == before
                return
            raise AssertionError("swap_out succeeded although can_swap_out said no")
        self.pool.swap_out(self.bm.swap_out(group))
        for s in group:
            self.seqs[s].on_cpu = True

    @precondition(lambda self: self._ids(on_cpu=True))
    @rule(data=st.data())
    def swap_in(self, data: st.DataObject) -> None:
        group = data.draw(st.lists(st.sampled_from(sorted(self._ids(on_cpu=True))),
                                   min_size=1, max_size=3, unique=True))
        if not self.bm.can_swap_in(group):
            before = self._snapshot()
            try:
                self.bm.swap_in(group)
            except OutOfBlocksError:
                assert self._snapshot() == before
                return
            raise AssertionError("swap_in succeeded although can_swap_in said no")
        self.pool.swap_in(self.bm.swap_in(group))
        for s in group:
            self.seqs[s].on_cpu = False

    @precondition(lambda self: self._ids(on_cpu=True))
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        """Swap a group back in and give each sequence the slot of one more token: it takes
        the blocks ``blocks_to_resume`` says (the scheduler's admission check), exactly where no
        sliding window releases blocks on the way."""
        group = data.draw(st.lists(st.sampled_from(sorted(self._ids(on_cpu=True))),
                                   min_size=1, max_size=3, unique=True))
        need = self.bm.blocks_to_resume(group, [self.seqs[s].computed for s in group])
        free = self.bm.num_free_blocks
        if need > free:
            return
        self.pool.swap_in(self.bm.swap_in(group))
        for s in group:
            self.seqs[s].on_cpu = False
            assert self._grow(s, [data.draw(st.integers(0, VOCAB - 1))])
        if self.window is None:
            assert free - self.bm.num_free_blocks == need
        else:  # blocks that leave the window on the way may come back to the pool
            assert free - self.bm.num_free_blocks <= need

    @rule(data=st.data(), extra_key=st.sampled_from([None, "lora"]))
    def lookup(self, data: st.DataObject, extra_key: object) -> None:
        self._check_match(self._prompt(data), extra_key)

    @precondition(lambda self: self.bm.num_cached_blocks)
    @rule()
    def reset_prefix_cache(self) -> None:
        parked = self.bm.num_cached_blocks
        assert self.bm.reset_prefix_cache() == parked
        assert self.bm.num_cached_blocks == 0

    # ------------------------------------------------------------------ invariants
    @invariant()
    def integrity(self) -> None:
        self.bm.check_integrity()
        assert sorted(self.bm.seq_ids()) == sorted(self.seqs)

    @invariant()
    def contents_match_shadow(self) -> None:
        bs, w = self.block_size, self.window
        for sid, sh in self.seqs.items():
            assert self.bm.is_swapped(sid) == sh.on_cpu
            table = self.bm.swapped_block_table(sid) if sh.on_cpu else self.bm.block_table(sid)
            data = self.pool.cpu_kv if sh.on_cpu else self.pool.kv
            assert len(table) == -(-len(sh.tokens) // bs)
            # Positions the next query may read must be backed by a block.
            lo = 0 if w is None else max(0, sh.computed - w + 1)
            assert all(table[p // bs] != NULL_BLOCK for p in range(lo, sh.computed))
            readable = [p for p in range(sh.computed) if table[p // bs] != NULL_BLOCK]
            assert readable == list(range(sh.computed - len(readable), sh.computed)), "holes only at the start"
            if readable:
                blocks = torch.tensor([table[p // bs] for p in readable])
                offs = torch.tensor([p % bs for p in readable])
                got = data[:, :, blocks, offs]  # [L, 2, n, H, D]
                assert torch.equal(got, expected_kv(sh.extra_key, sh.tokens, range(readable[0], sh.computed))), (
                    f"seq {sid}: K/V differs from its shadow"
                )
            # Slots about to be written belong to this sequence alone.
            for p in range(sh.computed, len(sh.tokens)):
                b = table[p // bs]
                assert not sh.on_cpu and b != NULL_BLOCK
                assert self.bm.gpu.refcount(b) == 1 and not self.bm.cache.is_cached(b)

    def teardown(self) -> None:
        for sid in list(self.seqs):
            self.bm.free(sid)
        self.bm.check_integrity()
        assert self.bm.num_used_blocks == 0
        assert self.bm.gpu.num_free + self.bm.num_cached_blocks == NUM_GPU_BLOCKS
        assert self.bm.cpu.num_free == NUM_CPU_BLOCKS


class WindowMachine(PagedKVMachine):
    window = 6


class NoCacheMachine(PagedKVMachine):
    prefix_caching = False


class SmallBlockWindowNoCacheMachine(PagedKVMachine):
    block_size = 2
    window = 5
    prefix_caching = False


class SmallBlockWindowMachine(PagedKVMachine):
    block_size = 2
    window = 3


TestPagedKV = PagedKVMachine.TestCase
TestPagedKVWindow = WindowMachine.TestCase
TestPagedKVNoPrefixCache = NoCacheMachine.TestCase
TestPagedKVSmallBlockWindowNoCache = SmallBlockWindowNoCacheMachine.TestCase
TestPagedKVSmallBlockWindow = SmallBlockWindowMachine.TestCase
for _case in (TestPagedKV, TestPagedKVWindow, TestPagedKVNoPrefixCache, TestPagedKVSmallBlockWindowNoCache,
              TestPagedKVSmallBlockWindow):
    _case.settings = SETTINGS
del _case
