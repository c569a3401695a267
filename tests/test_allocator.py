"""BlockAllocator: O(1) bookkeeping, refcounts, and misuse that must fail loudly and cleanly."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest

from pagedattn.cache.allocator import BlockAllocator, BlockError, OutOfBlocksError


def snapshot(a: BlockAllocator) -> tuple[list[int], list[int], list[bool]]:
    """Everything observable about the allocator, to prove a failed call changed nothing."""
    n = a.num_blocks
    return a.free_blocks(), [a.refcount(b) for b in range(n)], [a.is_free(b) for b in range(n)]


def test_fresh_pool_is_all_free() -> None:
    a = BlockAllocator(5)
    assert a.num_free == 5
    assert all(a.is_free(b) and a.refcount(b) == 0 for b in range(5))
    a.check_integrity()


def test_allocate_hands_out_distinct_blocks_low_ids_first() -> None:
    a = BlockAllocator(6)
    got = a.allocate(3) + a.allocate(2)
    assert got == [0, 1, 2, 3, 4]
    assert a.num_free == 1
    assert all(a.refcount(b) == 1 and not a.is_free(b) for b in got)
    a.check_integrity()


def test_allocate_zero_is_a_no_op() -> None:
    a = BlockAllocator(3)
    before = snapshot(a)
    assert a.allocate(0) == []
    assert snapshot(a) == before


def test_refcounts_incref_decref_release() -> None:
    a = BlockAllocator(4)
    (b,) = a.allocate(1)
    assert a.incref(b) == 2
    assert a.incref(b) == 3
    assert a.release(b) is False
    assert a.decref(b) == 1
    assert a.release(b) is True  # last holder: back on the free list
    assert a.is_free(b) and a.refcount(b) == 0 and a.num_free == 4
    a.check_integrity()


def test_decref_to_zero_parks_until_freed() -> None:
    a = BlockAllocator(2)
    (b,) = a.allocate(1)
    assert a.decref(b) == 0
    # Parked: refcount 0 but not on the free list, and it can be revived.
    assert not a.is_free(b) and a.num_free == 1
    a.check_integrity()
    assert a.incref(b) == 1
    a.decref(b)
    a.free(b)
    assert a.is_free(b) and a.num_free == 2
    a.check_integrity()


def test_freed_block_is_reused() -> None:
    a = BlockAllocator(2)
    x, _ = a.allocate(2)
    a.release(x)
    assert a.allocate(1) == [x]
    a.check_integrity()


def test_exhaustion_raises_out_of_blocks_with_counts_and_changes_nothing() -> None:
    a = BlockAllocator(4)
    a.allocate(3)
    before = snapshot(a)
    with pytest.raises(OutOfBlocksError) as info:
        a.allocate(2)
    assert info.value.requested == 2
    assert info.value.free == 1
    assert "requested 2" in str(info.value) and "1 free" in str(info.value)
    assert isinstance(info.value, BlockError)
    assert not isinstance(info.value, IndexError)
    assert snapshot(a) == before
    a.check_integrity()


def test_empty_pool_raises_out_of_blocks_not_index_error() -> None:
    a = BlockAllocator(0)
    with pytest.raises(OutOfBlocksError):
        a.allocate(1)


@pytest.mark.parametrize("n", [-1, 1.5, "2", None])
def test_allocate_bad_count_is_value_error(n: object) -> None:
    a = BlockAllocator(4)
    before = snapshot(a)
    with pytest.raises(ValueError, match="blocks"):
        a.allocate(n)  # type: ignore[arg-type]
    assert snapshot(a) == before


@pytest.mark.parametrize("n", [-1, 2.0, "3", True])
def test_constructor_rejects_bad_sizes(n: object) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(n)  # type: ignore[arg-type]


def _misuse_cases() -> list[tuple[str, object]]:
    return [
        ("double free", lambda a, held, parked: a.free(a.free_blocks()[0])),
        ("free of a held block", lambda a, held, parked: a.free(held)),
        ("decref of a free block", lambda a, held, parked: a.decref(a.free_blocks()[0])),
        ("decref of a parked block", lambda a, held, parked: a.decref(parked)),
        ("release of a free block", lambda a, held, parked: a.release(a.free_blocks()[0])),
        ("incref of a free block", lambda a, held, parked: a.incref(a.free_blocks()[0])),
        ("unknown id", lambda a, held, parked: a.incref(99)),
        ("negative id", lambda a, held, parked: a.decref(-1)),
        ("float id", lambda a, held, parked: a.incref(1.0)),
        ("string id", lambda a, held, parked: a.free("0")),
        ("bool id", lambda a, held, parked: a.incref(True)),
        ("None id", lambda a, held, parked: a.refcount(None)),
        ("release_all with one bad id", lambda a, held, parked: a.release_all([held, 99])),
        ("release_all over-releasing", lambda a, held, parked: a.release_all([held, held, held])),
    ]


@pytest.mark.parametrize(("what", "call"), _misuse_cases(), ids=[c[0] for c in _misuse_cases()])
def test_misuse_raises_block_error_and_changes_nothing(what: str, call) -> None:
    a = BlockAllocator(6)
    held, parked, _ = a.allocate(3)
    a.incref(held)  # refcount 2
    a.decref(parked)  # refcount 0, not free
    before = snapshot(a)
    with pytest.raises(BlockError):
        call(a, held, parked)
    assert snapshot(a) == before, what
    a.check_integrity()


def test_release_all_handles_repeats_within_refcount() -> None:
    a = BlockAllocator(3)
    (b,) = a.allocate(1)
    a.incref(b)
    a.release_all([b, b])
    assert a.is_free(b) and a.num_free == 3
    a.check_integrity()


def test_random_operations_keep_integrity_and_match_a_model() -> None:
    rng = random.Random(1234)
    n = 32
    a = BlockAllocator(n)
    model: dict[int, int] = {}  # held block -> refcount
    for _ in range(3000):
        op = rng.random()
        if op < 0.35:
            k = rng.randint(0, 4)
            if k <= n - len(model):
                for b in a.allocate(k):
                    assert b not in model
                    model[b] = 1
            else:
                with pytest.raises(OutOfBlocksError):
                    a.allocate(k)
        elif op < 0.55 and model:
            b = rng.choice(sorted(model))
            model[b] += 1
            assert a.incref(b) == model[b]
        elif model:
            b = rng.choice(sorted(model))
            model[b] -= 1
            freed = a.release(b)
            assert freed == (model[b] == 0)
            if model[b] == 0:
                del model[b]
        assert a.num_free == n - len(model)
        a.check_integrity()
    assert all(a.refcount(b) == model.get(b, 0) for b in range(n))


def test_operations_are_constant_time() -> None:
    """allocate/free of one block must not scale with the pool size (no list scans)."""

    def cost(num_blocks: int) -> float:
        a = BlockAllocator(num_blocks)
        t0 = time.perf_counter()
        for _ in range(20_000):
            (b,) = a.allocate(1)
            a.incref(b)
            a.decref(b)
            a.release(b)
        return time.perf_counter() - t0

    small = min(cost(64) for _ in range(3))
    large = min(cost(1 << 20) for _ in range(3))
    # An O(n) scan would make the large pool ~16000x slower; allow generous noise.
    assert large < 5 * small


def test_allocator_and_cache_bookkeeping_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import pagedattn.cache.allocator, pagedattn.cache.prefix_cache, pagedattn.cache.block_manager\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
