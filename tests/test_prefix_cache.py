"""PrefixCache: chained content hashes, collision safety, LRU eviction and counters."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedattn.cache import BlockManager, prefix_cache
from pagedattn.cache.prefix_cache import BlockKey, PrefixCache, hash_block


def rand_tokens(rng: random.Random, n: int, vocab: int = 50_000) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def chain(blocks: list[list[int]], extra_key: object = None) -> list[BlockKey]:
    keys: list[BlockKey] = []
    for toks in blocks:
        keys.append(BlockKey.make(keys[-1].digest if keys else None, toks, extra_key))
    return keys


# ---------------------------------------------------------------------------------- hashing
def test_hash_is_deterministic_and_content_sensitive() -> None:
    rng = random.Random(0)
    toks = rand_tokens(rng, 16)
    assert hash_block(None, toks) == hash_block(None, list(toks)) == hash_block(None, tuple(toks))
    changed = list(toks)
    changed[7] += 1
    assert hash_block(None, changed) != hash_block(None, toks)
    assert hash_block(None, toks[:-1]) != hash_block(None, toks)


def test_same_tokens_under_different_parents_hash_differently() -> None:
    rng = random.Random(1)
    a, b, tail = rand_tokens(rng, 4), rand_tokens(rng, 4), rand_tokens(rng, 4)
    ka = chain([a, tail])
    kb = chain([b, tail])
    assert ka[1].token_ids == kb[1].token_ids
    assert ka[1].digest != kb[1].digest
    # The first block with no parent differs from the same tokens with a parent.
    assert chain([tail])[0].digest != ka[1].digest


def test_extra_key_changes_the_digest() -> None:
    rng = random.Random(2)
    toks = rand_tokens(rng, 8)
    plain = hash_block(None, toks)
    assert hash_block(None, toks, "lora-1") != plain
    assert hash_block(None, toks, "lora-1") != hash_block(None, toks, "lora-2")
    assert hash_block(None, toks, "lora-1") == hash_block(None, toks, "lora-1")


def test_negative_and_large_token_ids_hash() -> None:
    assert hash_block(None, [-1, 2**40]) != hash_block(None, [2**40, -1])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.integers(0, 60), st.integers(0, 8), st.sampled_from([None, "salt", ("v", 2)]),
       st.randoms(use_true_random=False))
def test_block_manager_chain_is_the_block_by_block_chain(bs: int, n: int, start: int, extra: object,
                                                         rng: random.Random) -> None:
    """block_keys packs a chain's tokens once and hashes slices of it: the same keys as hashing
    each block's tokens on its own, from the first block or continuing a chain."""
    toks = [rng.randrange(-5, 2**40) for _ in range(n)]
    full = n // bs
    want = chain([toks[i * bs:(i + 1) * bs] for i in range(full)], extra)
    bm = BlockManager(4, bs)
    assert bm.block_keys(toks, full, extra) == want
    begun = want[:min(start, full)]
    assert bm.block_keys(toks, full, extra, start=begun) == want


# ---------------------------------------------------------------------------------- match / insert
def test_lookup_insert_roundtrip_and_first_writer_wins() -> None:
    rng = random.Random(3)
    c = PrefixCache()
    k0, k1 = chain([rand_tokens(rng, 4), rand_tokens(rng, 4)])
    assert c.lookup(k0) is None
    assert c.insert(k0, 7)
    assert c.lookup(k0) == 7
    assert not c.insert(k0, 8), "the key is taken: the second block stays private"
    assert not c.insert(k1, 7), "a block is filed under one key only"
    assert c.lookup(BlockKey.make(None, list(k0.token_ids))) == 7, "a rebuilt key finds it"
    assert c.key_of(7) == k0 and c.key_of(8) is None
    assert c.is_cached(7) and not c.is_cached(8)
    c.check_integrity()


def test_forced_digest_collision_never_returns_the_wrong_block(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(4)
    monkeypatch.setattr(prefix_cache, "hash_block", lambda *args, **kw: b"\x01" * 32)
    c = PrefixCache()
    a, b = rand_tokens(rng, 4), rand_tokens(rng, 4)
    ka, kb = BlockKey.make(None, a), BlockKey.make(None, b)
    assert ka.digest == kb.digest, "the patch forces a collision"
    assert c.insert(ka, 3)
    assert c.lookup(kb) is None
    assert c.stats.collisions == 1
    assert c.lookup(ka) == 3
    # Same tokens, different parent or extra key: still a miss.
    assert c.lookup(BlockKey.make(b"\x02" * 32, a)) is None
    assert c.lookup(BlockKey.make(None, a, "salt")) is None
    assert not c.insert(kb, 4), "a colliding key cannot displace the stored one"
    c.check_integrity()


def test_forced_collision_through_the_block_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with every block hashing alike, a prompt only matches blocks with its own tokens."""
    rng = random.Random(5)
    monkeypatch.setattr(prefix_cache, "hash_block", lambda *args, **kw: b"\x07" * 32)
    bm = BlockManager(16, 4)
    p1 = rand_tokens(rng, 9)
    assert bm.allocate_slots("a", 0, len(p1))
    bm.commit("a", p1, len(p1))
    other = rand_tokens(rng, 9)
    assert bm.match_prefix(other).num_tokens == 0
    again = bm.match_prefix(p1)
    # Block 0 matches (real contents); block 1 collides with block 0's digest and is refused.
    assert again.num_tokens == 4 and again.blocks == list(bm.block_table("a"))[:1]
    bm.check_integrity()


# ---------------------------------------------------------------------------------- LRU / counters
def test_evicts_least_recently_parked_first() -> None:
    rng = random.Random(6)
    c = PrefixCache()
    keys = [BlockKey.make(None, rand_tokens(rng, 4)) for _ in range(4)]
    for b, k in enumerate(keys):
        c.insert(k, b)
    for b in (2, 0, 3, 1):
        c.park(b)
    c.unpark(0)  # revived: no longer evictable
    c.park(0)  # parked again, now the most recent
    assert c.evictable_blocks() == [2, 3, 1, 0]
    assert [c.evict_lru() for _ in range(4)] == [2, 3, 1, 0]
    assert c.num_cached == 0 and c.num_evictable == 0
    assert all(c.lookup(k) is None for k in keys)
    assert c.stats.evictions == 4
    c.check_integrity()


def test_held_cached_blocks_are_not_evictable() -> None:
    rng = random.Random(7)
    c = PrefixCache()
    k0, k1 = (BlockKey.make(None, rand_tokens(rng, 4)) for _ in range(2))
    c.insert(k0, 0)
    c.insert(k1, 1)
    c.park(1)
    assert c.num_evictable == 1 and not c.is_parked(0) and c.is_parked(1)
    assert c.evict_lru() == 1
    assert c.lookup(k0) == 0


def test_clear_evictable_keeps_held_blocks() -> None:
    rng = random.Random(8)
    c = PrefixCache()
    keys = [BlockKey.make(None, rand_tokens(rng, 4)) for _ in range(3)]
    for b, k in enumerate(keys):
        c.insert(k, b)
    c.park(0)
    c.park(2)
    assert sorted(c.clear_evictable()) == [0, 2]
    assert c.num_cached == 1 and c.lookup(keys[1]) == 1
    c.check_integrity()


def test_counters_queries_hits_hit_rate() -> None:
    rng = random.Random(9)
    c = PrefixCache()
    assert c.stats.hit_rate == 0.0
    k = BlockKey.make(None, rand_tokens(rng, 4))
    c.insert(k, 5)
    miss = BlockKey.make(None, rand_tokens(rng, 4))
    for key in (k, miss, k, k):
        c.lookup(key)
    c.lookup(k, count=False)  # internal probes do not count
    assert (c.stats.queries, c.stats.hits) == (4, 3)
    assert c.stats.hit_rate == pytest.approx(0.75)


def test_block_manager_counts_prefix_hits_and_evictions() -> None:
    rng = random.Random(10)
    bm = BlockManager(6, 4, watermark=0.0)
    prompt = rand_tokens(rng, 13)  # 3 full blocks + 1 token
    assert bm.allocate_slots("a", 0, len(prompt))
    bm.commit("a", prompt, len(prompt))
    bm.free("a")  # 3 full blocks parked in the cache, the partial one freed
    assert bm.num_cached_blocks == 3 and bm.num_used_blocks == 0
    m = bm.match_prefix(prompt)
    assert m.num_tokens == 12
    assert (bm.cache.stats.queries, bm.cache.stats.hits) == (3, 3)
    # A 6-block prompt with new tokens must evict all three cached blocks (free list has 3).
    assert bm.allocate_slots("b", 0, 24)
    assert bm.cache.stats.evictions == 3 and bm.num_cached_blocks == 0
    assert bm.match_prefix(prompt).num_tokens == 0
    assert bm.cache.stats.hit_rate == pytest.approx(3 / 6)
    bm.check_integrity()
