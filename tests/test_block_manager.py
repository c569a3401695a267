"""BlockManager unit tests: block tables, sharing, copy-on-write, prefix reuse, swap, windows.

Every test calls ``check_integrity()`` after each step (through :func:`step`), so a broken
refcount or a leaked block fails at the step that caused it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest

from pagedattn.cache import NULL_BLOCK, BlockManager, OutOfBlocksError, PrefixMatch
from pagedattn.cache.block_manager import cdiv


def rand_tokens(rng: random.Random, n: int, vocab: int = 32_000) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def snapshot(bm: BlockManager) -> dict[str, Any]:
    """Everything observable about the manager's state (pending copies must be drained first)."""
    tables = {}
    for s in bm.seq_ids():
        tables[s] = ("cpu", list(bm.swapped_block_table(s))) if bm.is_swapped(s) else ("gpu", list(bm.block_table(s)))
    return {
        "gpu_free": bm.gpu.free_blocks(),
        "gpu_ref": [bm.gpu.refcount(b) for b in range(bm.gpu.num_blocks)],
        "cpu_free": bm.cpu.free_blocks(),
        "cpu_ref": [bm.cpu.refcount(b) for b in range(bm.cpu.num_blocks)],
        "evictable": bm.cache.evictable_blocks(),
        "cached": {b: bm.cache.key_of(b) for b in range(bm.num_blocks) if bm.cache.is_cached(b)},
        "tables": tables,
    }


def step(bm: BlockManager, fn: Callable[[], Any]) -> Any:
    out = fn()
    bm.check_integrity()
    return out


def prefill(bm: BlockManager, sid: str, prompt: list[int], extra_key: object = None) -> PrefixMatch:
    """Admit a prompt the way the scheduler does: match, allocate the rest, compute, commit."""
    m = bm.match_prefix(prompt, extra_key)
    ok = step(bm, lambda: bm.allocate_slots(sid, m.num_tokens, len(prompt) - m.num_tokens, m, extra_key))
    assert ok
    step(bm, lambda: bm.commit(sid, prompt, len(prompt)))
    return m


def decode(bm: BlockManager, sid: str, tokens: list[int], new_token: int) -> list[tuple[int, int]]:
    """One decode step: room for one token, then commit it.  Returns the copy-on-write pairs."""
    slots = step(bm, lambda: bm.allocate_slots(sid, len(tokens), 1))
    assert slots is not None
    tokens.append(new_token)
    step(bm, lambda: bm.commit(sid, tokens, len(tokens)))
    return list(slots.copies)


# ================================================================== construction / bad input
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": -4}, "block_size"),
        ({"block_size": 3}, "block_size"),
        ({"block_size": 12}, "block_size"),
        ({"block_size": 4.0}, "block_size"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"num_blocks": -2}, "num_blocks"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"sliding_window": -8}, "sliding_window"),
        ({"watermark": -0.01}, "watermark"),
        ({"watermark": 1.0}, "watermark"),
        ({"watermark": 2.5}, "watermark"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"num_blocks": 8, "block_size": 4, **kwargs}
    with pytest.raises(ValueError, match=field):
        BlockManager(**args)


@pytest.mark.parametrize(("num_computed", "num_new"), [(-1, 1), (0, -1), (-3, -3)])
def test_negative_token_counts(num_computed: int, num_new: int) -> None:
    bm = BlockManager(8, 4)
    with pytest.raises(ValueError, match="negative"):
        bm.allocate_slots("a", num_computed, num_new)
    assert not bm.has_seq("a")
    bm.check_integrity()


# ================================================================== allocate / append / free
def test_allocate_prompt_takes_ceil_blocks() -> None:
    rng = random.Random(0)
    bm = BlockManager(16, 4)
    for sid, n in (("a", 1), ("b", 4), ("c", 5), ("d", 12)):
        prefill(bm, sid, rand_tokens(rng, n))
        table = bm.block_table(sid)
        assert len(table) == cdiv(n, 4)
        assert all(bm.gpu.refcount(b) == 1 for b in table)
    all_blocks = [b for s in "abcd" for b in bm.block_table(s)]
    assert len(set(all_blocks)) == len(all_blocks) == 1 + 1 + 2 + 3
    assert bm.num_used_blocks == 7


def test_append_one_token_at_a_time_grows_only_when_full() -> None:
    rng = random.Random(1)
    bs = 4
    bm = BlockManager(16, bs)
    toks = rand_tokens(rng, 3)
    prefill(bm, "a", toks)
    for _ in range(20):
        before = list(bm.block_table("a"))
        last_full = len(toks) % bs == 0
        assert decode(bm, "a", toks, rng.randrange(100)) == []
        after = list(bm.block_table("a"))
        assert after[: len(before)] == before, "existing entries never move"
        assert len(after) == len(before) + (1 if last_full else 0)
        assert len(after) == cdiv(len(toks), bs)


def test_zero_new_tokens_changes_nothing() -> None:
    rng = random.Random(2)
    bm = BlockManager(8, 4)
    toks = rand_tokens(rng, 6)
    prefill(bm, "a", toks)
    before = snapshot(bm)
    assert step(bm, lambda: bm.allocate_slots("a", 6, 0))
    assert snapshot(bm) == before


def test_free_returns_every_block() -> None:
    rng = random.Random(3)
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    prefill(bm, "a", rand_tokens(rng, 10))
    step(bm, lambda: bm.free("a"))
    assert not bm.has_seq("a")
    assert bm.gpu.num_free == 8 and bm.num_used_blocks == 0


def test_free_parks_cached_full_blocks_tail_first() -> None:
    rng = random.Random(4)
    bm = BlockManager(8, 4)
    prefill(bm, "a", rand_tokens(rng, 13))  # 3 full blocks + 1 partial
    table = list(bm.block_table("a"))
    step(bm, lambda: bm.free("a"))
    assert bm.num_used_blocks == 0
    assert bm.num_cached_blocks == 3
    assert bm.gpu.is_free(table[3]), "the partial block is not cached"
    # Tail first: evicting drops the end of a prefix before its beginning.
    assert bm.cache.evictable_blocks() == [table[2], table[1], table[0]]


def test_allocate_slots_out_of_blocks_returns_false_and_changes_nothing() -> None:
    rng = random.Random(5)
    bm = BlockManager(4, 4, watermark=0.0)
    toks = rand_tokens(rng, 12)
    prefill(bm, "a", toks)
    before = snapshot(bm)
    assert step(bm, lambda: bm.allocate_slots("b", 0, 8)) is None
    assert not bm.has_seq("b")
    assert step(bm, lambda: bm.allocate_slots("a", 12, 5)) is None
    assert snapshot(bm) == before
    # Exactly what is left still fits.
    assert step(bm, lambda: bm.allocate_slots("a", 12, 4))


def test_can_allocate_respects_watermark() -> None:
    bm = BlockManager(100, 4, watermark=0.1)
    assert bm.watermark_blocks == 10
    assert bm.can_allocate(90) and not bm.can_allocate(91)
    assert bm.allocate_slots("a", 0, 4 * 50)
    assert bm.can_allocate(40) and not bm.can_allocate(41)
    zero = BlockManager(100, 4, watermark=0.0)
    assert zero.can_allocate(100) and not zero.can_allocate(101)


def test_blocks_needed_matches_what_allocate_takes() -> None:
    rng = random.Random(6)
    bm = BlockManager(32, 4, watermark=0.0)
    toks = rand_tokens(rng, 7)
    need = bm.blocks_needed(None, 0, 7)
    free0 = bm.num_free_blocks
    prefill(bm, "a", toks)
    assert free0 - bm.num_free_blocks == need == 2
    step(bm, lambda: bm.fork("a", "b"))
    need = bm.blocks_needed("b", 7, 6)  # one CoW of the shared partial block + 2 new blocks
    free0 = bm.num_free_blocks
    assert step(bm, lambda: bm.allocate_slots("b", 7, 6))
    assert need == 3 and free0 - bm.num_free_blocks == need


# ================================================================== fork / copy-on-write
def test_fork_shares_every_block() -> None:
    rng = random.Random(7)
    bm = BlockManager(16, 4)
    prefill(bm, "a", rand_tokens(rng, 10))
    step(bm, lambda: bm.fork("a", "b"))
    assert bm.block_table("b") == bm.block_table("a")
    assert bm.block_table("b") is not bm.block_table("a")
    assert all(bm.gpu.refcount(b) == 2 for b in bm.block_table("a"))
    step(bm, lambda: bm.fork("b", "c"))
    assert all(bm.gpu.refcount(b) == 3 for b in bm.block_table("a"))
    with pytest.raises(ValueError, match="exists"):
        bm.fork("a", "c")
    step(bm, lambda: bm.free("a"))
    assert all(bm.gpu.refcount(b) == 2 for b in bm.block_table("b"))


def test_copy_on_write_into_shared_partial_block() -> None:
    rng = random.Random(8)
    bm = BlockManager(16, 4)
    toks = rand_tokens(rng, 6)  # block 1 is partial (2 of 4 slots)
    prefill(bm, "a", toks)
    step(bm, lambda: bm.fork("a", "b"))
    shared_full, shared_partial = bm.block_table("a")
    child_toks = list(toks)
    pairs = decode(bm, "b", child_toks, 11)
    (src, dst), = pairs
    assert src == shared_partial and dst not in (shared_full, shared_partial)
    assert list(bm.block_table("b")) == [shared_full, dst]
    assert list(bm.block_table("a")) == [shared_full, shared_partial], "the parent keeps its block"
    assert bm.gpu.refcount(shared_full) == 2
    assert bm.gpu.refcount(shared_partial) == 1 and bm.gpu.refcount(dst) == 1
    assert bm.stats.num_cow_copies == 1
    # Now private on both sides: no further copies.
    assert decode(bm, "b", child_toks, 12) == []
    assert decode(bm, "a", list(toks), 13) == []


def test_no_copy_when_the_shared_last_block_is_full() -> None:
    rng = random.Random(9)
    bm = BlockManager(16, 4)
    toks = rand_tokens(rng, 8)
    prefill(bm, "a", toks)
    step(bm, lambda: bm.fork("a", "b"))
    assert decode(bm, "b", list(toks), 1) == []
    assert bm.block_table("b")[:2] == bm.block_table("a")
    assert len(bm.block_table("b")) == 3


def test_copy_on_write_with_several_forks() -> None:
    rng = random.Random(10)
    bm = BlockManager(16, 4)
    toks = rand_tokens(rng, 5)
    prefill(bm, "p", toks)
    for c in "xyz":
        step(bm, lambda c=c: bm.fork("p", c))
    shared = bm.block_table("p")[1]
    assert bm.gpu.refcount(shared) == 4
    dsts = []
    for i, c in enumerate("xyz"):
        (src, dst), = decode(bm, c, list(toks), i)
        assert src == shared
        dsts.append(dst)
        assert bm.gpu.refcount(shared) == 3 - i
    assert len(set(dsts)) == 3
    assert decode(bm, "p", list(toks), 9) == [], "the last holder writes in place"


def test_cow_that_cannot_get_a_block_fails_cleanly() -> None:
    rng = random.Random(11)
    bm = BlockManager(2, 4, watermark=0.0)
    toks = rand_tokens(rng, 6)
    prefill(bm, "a", toks)
    step(bm, lambda: bm.fork("a", "b"))
    before = snapshot(bm)
    assert step(bm, lambda: bm.allocate_slots("b", 6, 1)) is None
    assert snapshot(bm) == before


# ================================================================== prefix caching
@pytest.mark.parametrize("lookup_key", ["a", "b", None])
def test_commit_chains_from_the_looked_up_prompt_keys_only_under_the_same_extra_key(lookup_key) -> None:
    """commit continues a sequence's chain with the keys its prompt's lookup made, but only when
    they were made under the sequence's own extra key: its blocks are published under "b"."""
    rng = random.Random(5)
    bm = BlockManager(32, 4)
    prompt = rand_tokens(rng, 4 * 5 + 2)
    m = bm.match_prefix(prompt, lookup_key)
    assert step(bm, lambda: bm.allocate_slots("s", 0, len(prompt), m, "b"))
    step(bm, lambda: bm.commit("s", prompt, len(prompt)))
    assert bm.match_prefix([*prompt, 1], "b").num_tokens == 20
    assert bm.match_prefix([*prompt, 1], "a").num_tokens == 0
    assert bm.match_prefix([*prompt, 1], None).num_tokens == 0


def test_prefix_reuse_across_sequences() -> None:
    rng = random.Random(12)
    bm = BlockManager(32, 4)
    shared = rand_tokens(rng, 8)
    p1 = shared + rand_tokens(rng, 3)
    p2 = shared + rand_tokens(rng, 5)
    prefill(bm, "a", p1)
    m = prefill(bm, "b", p2)
    assert m.num_tokens == 8 and m.blocks == list(bm.block_table("a"))[:2]
    ta, tb = bm.block_table("a"), bm.block_table("b")
    assert tb[:2] == ta[:2] and tb[2] != ta[2]
    assert all(bm.gpu.refcount(b) == 2 for b in ta[:2])
    assert bm.cache.stats.hits == 2


def test_prefix_survives_its_owner_and_is_revived() -> None:
    rng = random.Random(13)
    bm = BlockManager(16, 4)
    prompt = rand_tokens(rng, 10)
    prefill(bm, "a", prompt)
    cached = list(bm.block_table("a"))[:2]
    step(bm, lambda: bm.free("a"))
    assert all(bm.cache.is_parked(b) for b in cached)
    free_before = bm.num_free_blocks
    m = prefill(bm, "b", prompt)
    assert m.blocks == cached and list(bm.block_table("b"))[:2] == cached
    assert not any(bm.cache.is_parked(b) for b in cached)
    assert free_before - bm.num_free_blocks == 3  # 2 revived + 1 new


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    rng = random.Random(14)
    bm = BlockManager(16, 4)
    prompt = rand_tokens(rng, 8)
    prefill(bm, "a", prompt)
    m = bm.match_prefix(prompt)
    assert m.num_tokens == 4, "two blocks are cached, but the last token must be computed"
    assert bm.match_prefix([*prompt, 5]).num_tokens == 8
    assert bm.match_prefix(prompt[:1]).num_tokens == 0
    assert bm.match_prefix([]).num_tokens == 0
    # Admitting the fully cached prompt recomputes the last block privately.
    assert step(bm, lambda: bm.allocate_slots("b", 4, 4, m))
    assert bm.block_table("b")[0] == bm.block_table("a")[0]
    assert bm.block_table("b")[1] != bm.block_table("a")[1]


def test_match_prefix_stops_at_the_first_miss() -> None:
    rng = random.Random(15)
    bm = BlockManager(16, 4)
    a = rand_tokens(rng, 12)
    prefill(bm, "a", [*a, 1])
    b = a[:4] + rand_tokens(rng, 4) + a[8:] + [1]  # block 2 has a's tokens but a different parent
    assert bm.match_prefix(b).num_tokens == 4


def test_extra_key_isolates_prefixes() -> None:
    rng = random.Random(16)
    bm = BlockManager(16, 4)
    prompt = rand_tokens(rng, 9)
    prefill(bm, "a", prompt, extra_key="lora-A")
    assert bm.match_prefix(prompt).num_tokens == 0
    assert bm.match_prefix(prompt, "lora-B").num_tokens == 0
    assert bm.match_prefix(prompt, "lora-A").num_tokens == 8


def test_disabled_prefix_caching_never_matches() -> None:
    rng = random.Random(17)
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    prompt = rand_tokens(rng, 9)
    prefill(bm, "a", prompt)
    assert bm.match_prefix(prompt).num_tokens == 0
    step(bm, lambda: bm.free("a"))
    assert bm.num_cached_blocks == 0 and bm.gpu.num_free == 16


def test_partial_blocks_are_never_cached() -> None:
    rng = random.Random(18)
    bm = BlockManager(16, 4)
    prompt = rand_tokens(rng, 7)
    prefill(bm, "a", prompt)
    t = bm.block_table("a")
    assert bm.cache.is_cached(t[0]) and not bm.cache.is_cached(t[1])


def test_prefix_match_reuses_blocks_evicted_only_under_pressure() -> None:
    rng = random.Random(19)
    bm = BlockManager(4, 4, watermark=0.0)
    p = rand_tokens(rng, 9)
    prefill(bm, "a", p)
    step(bm, lambda: bm.free("a"))  # 2 cached, 2 free
    assert step(bm, lambda: bm.allocate_slots("x", 0, 8))  # takes the 2 free ones
    assert bm.match_prefix(p).num_tokens == 8
    assert step(bm, lambda: bm.allocate_slots("y", 0, 1))  # evicts the LRU cached block
    assert bm.cache.stats.evictions == 1
    # The tail block went first (freed tail first), so the first block still matches.
    assert bm.match_prefix(p).num_tokens == 4


@pytest.mark.parametrize("evictor_alive", [False, True])
def test_stale_prefix_match_is_refused_before_any_change(evictor_alive: bool) -> None:
    rng = random.Random(20)
    bm = BlockManager(5, 4, watermark=0.0)
    p = rand_tokens(rng, 9)
    prefill(bm, "a", p)
    step(bm, lambda: bm.free("a"))
    m = bm.match_prefix(p)
    assert m.num_tokens == 8
    # Another admission evicts the matched blocks (and reuses them for its own, different
    # tokens) before this match is used.
    prefill(bm, "x", rand_tokens(rng, 20))
    assert set(m.blocks) <= set(bm.block_table("x"))
    if not evictor_alive:
        step(bm, lambda: bm.free("x"))
    before = snapshot(bm)
    with pytest.raises(ValueError, match="stale"):
        bm.allocate_slots("b", m.num_tokens, 1, m)
    assert snapshot(bm) == before


def test_reset_prefix_cache_drops_only_parked_blocks() -> None:
    rng = random.Random(21)
    bm = BlockManager(16, 4)
    pa, pb = rand_tokens(rng, 9), rand_tokens(rng, 9)
    prefill(bm, "a", pa)
    prefill(bm, "b", pb)
    step(bm, lambda: bm.free("a"))
    assert step(bm, bm.reset_prefix_cache) == 2
    assert bm.num_cached_blocks == 0
    assert bm.match_prefix(pa).num_tokens == 0
    assert bm.match_prefix(pb).num_tokens == 8, "blocks in use stay cached"


# ================================================================== swap
def _family(bm: BlockManager, rng: random.Random) -> tuple[list[int], list[int]]:
    """A parent and a forked child that diverged: shared full blocks, private tails."""
    toks = rand_tokens(rng, 10)
    prefill(bm, "a", toks)
    step(bm, lambda: bm.fork("a", "b"))
    ta, tb = list(toks), list(toks)
    decode(bm, "a", ta, 1)
    decode(bm, "b", tb, 2)
    return ta, tb


def test_swap_out_and_in_preserves_sharing_within_the_group() -> None:
    rng = random.Random(22)
    bm = BlockManager(16, 4, num_cpu_blocks=8, enable_prefix_caching=False)
    _family(bm, rng)
    ta, tb = list(bm.block_table("a")), list(bm.block_table("b"))
    assert ta[:2] == tb[:2] and ta[2] != tb[2]
    assert bm.can_swap_out(["a", "b"])
    out = step(bm, lambda: bm.swap_out(["a", "b"]))
    assert len(out) == 4, "each unique block copied once"
    assert bm.is_swapped("a") and bm.is_swapped("b")
    assert bm.num_used_blocks == 0
    ca, cb = list(bm.swapped_block_table("a")), list(bm.swapped_block_table("b"))
    gpu_to_cpu = dict(out)
    assert ca == [gpu_to_cpu[b] for b in ta] and cb == [gpu_to_cpu[b] for b in tb]
    assert ca[:2] == cb[:2] and all(bm.cpu.refcount(b) == 2 for b in ca[:2])
    with pytest.raises(RuntimeError, match="swapped out"):
        bm.block_table("a")
    with pytest.raises(RuntimeError, match="swapped out"):
        bm.allocate_slots("a", 11, 1)
    with pytest.raises(RuntimeError, match="fork"):
        bm.fork("a", "c")
    assert bm.num_blocks_of("a") == 3
    back = step(bm, lambda: bm.swap_in(["a", "b"]))
    assert len(back) == 4 and [c for c, _ in back] == [c for _, c in out]
    na, nb = bm.block_table("a"), bm.block_table("b")
    assert na[:2] == nb[:2] and all(bm.gpu.refcount(b) == 2 for b in na[:2])
    assert bm.cpu.num_free == 8
    assert bm.stats.num_swapped_out_blocks == 4 and bm.stats.num_swapped_in_blocks == 4


def test_swap_group_members_separately() -> None:
    rng = random.Random(23)
    bm = BlockManager(16, 4, num_cpu_blocks=8, enable_prefix_caching=False)
    _family(bm, rng)
    shared = bm.block_table("a")[:2]
    out = step(bm, lambda: bm.swap_out(["a"]))
    assert len(out) == 3
    assert all(bm.gpu.refcount(b) == 1 for b in shared), "b still holds the shared blocks"
    step(bm, lambda: bm.swap_in(["a"]))
    # Sharing across the group boundary is not restored without the prefix cache.
    assert bm.block_table("a")[:2] != shared


def test_swap_in_reshares_blocks_the_prefix_cache_still_holds() -> None:
    rng = random.Random(24)
    bm = BlockManager(16, 4, num_cpu_blocks=8)
    toks = rand_tokens(rng, 10)
    prefill(bm, "a", toks)
    table = list(bm.block_table("a"))
    out = step(bm, lambda: bm.swap_out(["a"]))
    assert len(out) == 3
    assert all(bm.cache.is_parked(b) for b in table[:2])
    back = step(bm, lambda: bm.swap_in(["a"]))
    assert len(back) == 1, "only the partial block is copied back"
    assert list(bm.block_table("a"))[:2] == table[:2]
    assert bm.stats.num_swapped_in_blocks == 1


def test_swap_in_reshares_blocks_held_by_another_sequence() -> None:
    rng = random.Random(25)
    bm = BlockManager(16, 4, num_cpu_blocks=8)
    toks = rand_tokens(rng, 10)
    prefill(bm, "a", toks)
    prefill(bm, "b", toks[:8] + rand_tokens(rng, 3))
    shared = bm.block_table("a")[:2]
    step(bm, lambda: bm.swap_out(["a"]))
    assert all(bm.gpu.refcount(b) == 1 for b in shared)
    step(bm, lambda: bm.swap_in(["a"]))
    assert bm.block_table("a")[:2] == shared
    assert all(bm.gpu.refcount(b) == 2 for b in shared)


def test_swap_in_pins_cached_twins_before_evicting() -> None:
    """A fresh block for one CPU block must never be made by evicting the cached twin of
    another block of the same group (that would alias two logical blocks onto one page)."""
    rng = random.Random(26)
    bm = BlockManager(5, 4, num_cpu_blocks=4, watermark=0.0)
    a = rand_tokens(rng, 9)
    prefill(bm, "a", a)
    step(bm, lambda: bm.swap_out(["a"]))  # a's two full blocks stay cached on the GPU
    prefill(bm, "e", rand_tokens(rng, 9))
    step(bm, lambda: bm.free("e"))
    # Two one-token sequences: the second evicts a's first block, so only its second block
    # still has a cached twin -- and it is the least recently used evictable block.
    prefill(bm, "d1", rand_tokens(rng, 1))
    prefill(bm, "d2", rand_tokens(rng, 1))
    assert bm.gpu.num_free == 0 and bm.num_free_blocks == 3
    assert bm.can_swap_in(["a"])
    pairs = step(bm, lambda: bm.swap_in(["a"]))
    table = bm.block_table("a")
    assert len(set(table)) == 3
    assert len(pairs) == 2 and all(dst != table[1] for _, dst in pairs)


def test_swap_in_two_cpu_copies_of_one_cached_block() -> None:
    """Two sequences that computed the same prompt side by side hold equal, unshared blocks;
    swapped back in together, both resolve to the one cached twin with correct refcounts."""
    rng = random.Random(27)
    bm = BlockManager(16, 4, num_cpu_blocks=8)
    p = rand_tokens(rng, 9)
    assert step(bm, lambda: bm.allocate_slots("a", 0, 9))
    assert step(bm, lambda: bm.allocate_slots("b", 0, 9))  # no hit: a is not committed yet
    step(bm, lambda: bm.commit("a", p, 9))
    step(bm, lambda: bm.commit("b", p, 9))
    assert bm.block_table("a")[:2] != bm.block_table("b")[:2]
    twins = bm.block_table("a")[:2]
    step(bm, lambda: bm.swap_out(["a", "b"]))
    pairs = step(bm, lambda: bm.swap_in(["a", "b"]))
    assert len(pairs) == 2, "only the two partial blocks are copied"
    assert bm.block_table("a")[:2] == bm.block_table("b")[:2] == twins
    assert all(bm.gpu.refcount(b) == 2 for b in twins)


def test_swap_errors_change_nothing() -> None:
    rng = random.Random(28)
    bm = BlockManager(16, 4, num_cpu_blocks=2)
    prefill(bm, "a", rand_tokens(rng, 10))
    before = snapshot(bm)
    assert not bm.can_swap_out(["a"])
    with pytest.raises(OutOfBlocksError) as info:
        bm.swap_out(["a"])
    assert info.value.pool == "cpu" and info.value.requested == 3 and info.value.free == 2
    with pytest.raises(RuntimeError, match="already on the gpu"):
        bm.swap_in(["a"])
    assert snapshot(bm) == before
    bm.check_integrity()


def test_swap_in_without_room_raises_and_changes_nothing() -> None:
    rng = random.Random(29)
    bm = BlockManager(4, 4, num_cpu_blocks=4, enable_prefix_caching=False, watermark=0.0)
    prefill(bm, "a", rand_tokens(rng, 10))
    step(bm, lambda: bm.swap_out(["a"]))
    prefill(bm, "b", rand_tokens(rng, 8))
    before = snapshot(bm)
    assert not bm.can_swap_in(["a"])
    with pytest.raises(OutOfBlocksError):
        bm.swap_in(["a"])
    with pytest.raises(RuntimeError, match="already on the cpu"):
        bm.swap_out(["a"])
    assert snapshot(bm) == before


def test_free_a_swapped_out_sequence() -> None:
    rng = random.Random(30)
    bm = BlockManager(8, 4, num_cpu_blocks=8)
    _family(bm, rng)
    step(bm, lambda: bm.swap_out(["a", "b"]))
    step(bm, lambda: bm.free("a"))
    assert bm.cpu.num_free == 5
    step(bm, lambda: bm.free("b"))
    assert bm.cpu.num_free == 8 and bm.num_used_blocks == 0


# ================================================================== sliding window
@pytest.mark.parametrize(("window", "bs"), [(8, 4), (9, 4), (5, 2), (16, 16), (1, 4), (30, 8)])
def test_window_bounds_live_blocks_over_a_long_decode(window: int, bs: int) -> None:
    rng = random.Random(31)
    bm = BlockManager(64, bs, sliding_window=window, watermark=0.0)
    toks = rand_tokens(rng, 3)
    prefill(bm, "a", toks)
    bound = math.ceil(window / bs) + 1
    for _ in range(300):
        decode(bm, "a", toks, rng.randrange(100))
        table = bm.block_table("a")
        assert len(table) == cdiv(len(toks), bs), "the table keeps logical positions"
        assert bm.num_blocks_of("a") <= bound
        assert bm.num_used_blocks <= bound
        # Everything the next query can see is still backed by a block.
        lo = max(0, len(toks) - window + 1)
        assert all(table[p // bs] != NULL_BLOCK for p in range(lo, len(toks)))
        live = [i for i, b in enumerate(table) if b != NULL_BLOCK]
        assert live == list(range(live[0], len(table))), "released blocks form a prefix"
    assert bm.stats.num_window_released > 0


def test_window_decode_fits_a_pool_of_exactly_the_bound() -> None:
    rng = random.Random(32)
    for window in range(1, 20):
        for bs in (1, 2, 4, 8):
            bm = BlockManager(math.ceil(window / bs) + 1, bs, sliding_window=window, watermark=0.0)
            toks = rand_tokens(rng, 1)
            prefill(bm, "a", toks)
            for _ in range(4 * (window + bs)):
                decode(bm, "a", toks, 0)


def test_window_released_full_blocks_stay_cached() -> None:
    rng = random.Random(33)
    bm = BlockManager(32, 4, sliding_window=8)
    toks = rand_tokens(rng, 16)
    prefill(bm, "a", toks)
    first = bm.block_table("a")[:2]
    decode(bm, "a", toks, 1)
    assert list(bm.block_table("a"))[:2] == [NULL_BLOCK, NULL_BLOCK]
    assert all(bm.cache.is_parked(b) for b in first)


def test_window_prefix_match_needs_only_covered_blocks() -> None:
    rng = random.Random(34)
    bm = BlockManager(32, 4, sliding_window=8)
    prompt = rand_tokens(rng, 16)
    prefill(bm, "a", prompt)
    decode(bm, "a", list(prompt), 1)  # releases blocks 0 and 1 (parked)
    step(bm, bm.reset_prefix_cache)  # ... and now they are forgotten
    a2, a3 = bm.block_table("a")[2:4]
    query = [*prompt, 7]
    m = bm.match_prefix(query)
    assert m.num_tokens == 16
    assert m.blocks == [NULL_BLOCK, NULL_BLOCK, a2, a3]
    assert step(bm, lambda: bm.allocate_slots("b", 16, 1, m))
    tb = list(bm.block_table("b"))
    assert tb[:4] == [NULL_BLOCK, NULL_BLOCK, a2, a3] and tb[4] not in (a2, a3)
    assert bm.gpu.refcount(a2) == 2
    # A match made without the prompt's keys (prompt_keys is optional) is adopted alike.
    bare = PrefixMatch(m.num_tokens, m.blocks, m.keys)
    assert step(bm, lambda: bm.allocate_slots("c", 16, 1, bare))
    assert list(bm.block_table("c"))[:4] == [NULL_BLOCK, NULL_BLOCK, a2, a3]
    step(bm, lambda: bm.free("c"))
    # The match really did without blocks 0 and 1: the cache no longer holds them.
    keys = bm.block_keys(query, 4)
    assert bm.cache.lookup(keys[0], count=False) is None
    assert bm.cache.lookup(keys[1], count=False) is None
    # Blocks the window does cover are required: with them gone too, nothing matches.
    step(bm, lambda: bm.free("a"))
    step(bm, lambda: bm.free("b"))
    step(bm, bm.reset_prefix_cache)
    assert bm.match_prefix(query).num_tokens == 0


def test_window_fork_and_swap_keep_null_entries() -> None:
    rng = random.Random(35)
    bm = BlockManager(32, 4, num_cpu_blocks=16, sliding_window=6)
    toks = rand_tokens(rng, 10)
    prefill(bm, "a", toks)
    for _ in range(6):
        decode(bm, "a", toks, 3)
    table = bm.block_table("a")
    assert table[0] == NULL_BLOCK
    step(bm, lambda: bm.fork("a", "b"))
    assert bm.block_table("b") == table
    tb = list(toks)
    decode(bm, "b", tb, 4)
    step(bm, lambda: bm.swap_out(["a", "b"]))
    assert bm.swapped_block_table("a")[0] == NULL_BLOCK
    step(bm, lambda: bm.swap_in(["a", "b"]))
    assert bm.block_table("a")[0] == NULL_BLOCK and bm.block_table("b")[0] == NULL_BLOCK
    decode(bm, "b", tb, 5)
    step(bm, lambda: bm.free("a"))
    step(bm, lambda: bm.free("b"))
    assert bm.num_used_blocks == 0


def test_listener_sees_events() -> None:
    rng = random.Random(36)
    bm = BlockManager(16, 4, sliding_window=4)
    events: list[str] = []
    bm.listener = lambda kind, fields: events.append(kind)
    toks = rand_tokens(rng, 6)
    prefill(bm, "a", toks)
    bm.fork("a", "b")
    decode(bm, "b", list(toks), 1)
    for _ in range(4):
        decode(bm, "a", toks, 2)
    bm.free("a")
    for kind in ("allocate_seq", "allocate", "fork", "cow", "window_release", "free"):
        assert kind in events
