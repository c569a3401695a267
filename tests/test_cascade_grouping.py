"""Host-side planning of cascade decode: shared-prefix groups, the work plan and its packing.

Pure numpy.  Block tables are generated the way the engine makes them: rows fork from other
rows' prefixes (prefix-cache hits, parallel sampling) and continue in blocks of their own.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedattn.attention.cascade import (
    WORK_FIELDS,
    WORK_WIDTH,
    CascadeConfig,
    PackedLayout,
    PrefixGroup,
    build_plan,
    find_prefix_groups,
    max_work_items,
    pack_plan,
    plan_cascade,
    plan_signature,
    plan_still_holds,
)

F = {name: i for i, name in enumerate(WORK_FIELDS)}


@st.composite
def batches(draw: st.DrawFn, max_rows: int = 12, block_size: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(tables [n, W] with -1 padding, seq_lens [n], block_size)``: each row either starts
    fresh or copies the first blocks of an earlier row, then allocates blocks of its own."""
    bs = block_size or draw(st.sampled_from([1, 2, 4, 16]))
    n = draw(st.integers(1, max_rows))
    next_id = 0
    tables: list[list[int]] = []
    lens: list[int] = []
    for i in range(n):
        shared: list[int] = []
        if i and draw(st.booleans()):
            parent = draw(st.integers(0, i - 1))
            # Only full blocks strictly before the parent's last token can be shared.
            full = max(0, (lens[parent] - 1) // bs)
            shared = tables[parent][:draw(st.integers(0, full))]
        own_len = draw(st.integers(1, 5 * bs))  # tokens after the shared blocks (>= 1)
        seq_len = len(shared) * bs + own_len
        own = list(range(next_id, next_id + -(-own_len // bs)))
        next_id += len(own)
        tables.append(shared + own)
        lens.append(seq_len)
    width = max(map(len, tables))
    bt = np.full((n, width), -1, dtype=np.int64)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = t
    return bt, np.asarray(lens, dtype=np.int64), bs


def _shareable(lens: np.ndarray, bs: int) -> np.ndarray:
    return np.maximum(lens - 1, 0) // bs


def _common_blocks(bt: np.ndarray, lens: np.ndarray, bs: int, rows: list[int]) -> int:
    """Blocks all ``rows`` share, capped at each row's shareable count."""
    cap = int(_shareable(lens, bs)[rows].min())
    ref = bt[rows[0]]
    p = 0
    while p < cap and ref[p] >= 0 and all(bt[r, p] == ref[p] for r in rows):
        p += 1
    return p


def _brute_force_savings(bt: np.ndarray, lens: np.ndarray, bs: int, min_blocks: int) -> int:
    """Best total ``(rows - 1) * blocks`` over every partition of the rows into groups."""
    n = len(lens)

    def partitions(items: list[int]):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            yield [[first], *part]
            for i in range(len(part)):
                yield [*part[:i], [first, *part[i]], *part[i + 1:]]

    best = 0
    for part in partitions(list(range(n))):
        value = 0
        for rows in part:
            if len(rows) >= 2:
                p = _common_blocks(bt, lens, bs, rows)
                if p >= min_blocks:
                    value += (len(rows) - 1) * p
        best = max(best, value)
    return best


# ------------------------------------------------------------------------------------ groups


@settings(max_examples=150, deadline=None)
@given(batch=batches(), min_blocks=st.integers(1, 3), max_groups=st.integers(0, 3))
def test_groups_share_their_prefix_and_no_row_is_left_out(batch: tuple[np.ndarray, np.ndarray, int],
                                                          min_blocks: int, max_groups: int) -> None:
    bt, lens, bs = batch
    groups = find_prefix_groups(bt, lens, bs, min_blocks=min_blocks, max_groups=len(lens))
    seen: set[int] = set()
    prefix_of: dict[int, int] = {}
    for g in groups:
        rows = list(g.rows)
        assert rows == sorted(rows) and len(rows) >= 2 and not seen & set(rows)
        seen |= set(rows)
        assert g.num_blocks >= min_blocks
        # Every member holds the shared blocks, all before its own last token (tail >= 1).
        assert _common_blocks(bt, lens, bs, rows) >= g.num_blocks
        assert (lens[rows] - g.num_blocks * bs >= 1).all()
        prefix_of.update(dict.fromkeys(rows, g.num_blocks))
    assert [g.rows[0] for g in groups] == sorted(g.rows[0] for g in groups)
    # A row holding a group's blocks is grouped at least that deep (else moving it would save more).
    for g in groups:
        for r in range(len(lens)):
            if _common_blocks(bt, lens, bs, [g.rows[0], r]) >= g.num_blocks:
                assert prefix_of.get(r, 0) >= g.num_blocks
    # With fewer groups allowed, the ones saving the most are kept.
    kept = find_prefix_groups(bt, lens, bs, min_blocks=min_blocks, max_groups=max_groups)
    want = sorted(groups, key=lambda g: -g.saved_blocks)[:max_groups]
    assert sorted(g.saved_blocks for g in kept) == sorted(g.saved_blocks for g in want)
    assert set(kept) <= set(groups)


@settings(max_examples=300, deadline=None)
@given(batch=batches(max_rows=6), min_blocks=st.integers(1, 2))
def test_groups_maximise_saved_reads(batch: tuple[np.ndarray, np.ndarray, int], min_blocks: int) -> None:
    """With room for every group, the choice saves as many block reads as the best partition."""
    bt, lens, bs = batch
    groups = find_prefix_groups(bt, lens, bs, min_blocks=min_blocks, max_groups=len(lens))
    assert sum(g.saved_blocks for g in groups) == _brute_force_savings(bt, lens, bs, min_blocks)


def test_nested_groups_leave_the_rest_of_a_prompt_grouped() -> None:
    """Two pairs share 3 blocks each beyond a common first block that two more rows hold: the
    pairs group deep (3 + 3) and the other two group on the first block (1), 7 reads in all;
    all six on the first block would save 5."""
    bt = np.array([[0, 1, 2, 3], [0, 4, 5, 6], [0, 1, 2, 7], [0, 8, 9, 10], [0, 4, 5, 11], [0, 12, 13, 14]])
    lens = np.array([8, 8, 8, 3, 8, 3])
    groups = find_prefix_groups(bt, lens, 2)
    assert [(g.rows, g.num_blocks) for g in groups] == [((0, 2), 3), ((1, 4), 3), ((3, 5), 1)]


def test_groups_prefer_the_larger_saving() -> None:
    """Six rows share 4 blocks; pairs of them share 10.  All six on 4 blocks saves 20 reads,
    three pairs on 10 save 30: the pairs win.  With a 20-block prompt, the six win (100 > 60)."""
    bs = 2
    for shared, want in ((4, [((0, 1), 10), ((2, 3), 10), ((4, 5), 10)]), (20, [((0, 1, 2, 3, 4, 5), 20)])):
        common = list(range(shared))
        tables, nid = [], 1000
        for _ in range(3):
            pair = list(range(nid, nid + 10 - shared)) if shared < 10 else []
            nid += 100
            for _ in range(2):
                tables.append(common + pair + [nid])
                nid += 1
        bt = np.asarray(tables)
        lens = np.full(6, bt.shape[1] * bs)
        groups = find_prefix_groups(bt, lens, bs)
        assert [(g.rows, g.num_blocks) for g in groups] == want


def test_group_rows_need_not_be_contiguous_and_released_blocks_never_match() -> None:
    bs = 4
    bt = np.array([[7, 8, 9, 1], [3, 4, 5, 6], [7, 8, 9, 2], [-1, -1, 9, 10], [-1, -1, 9, 11], [3, 4, 5, 12]])
    lens = np.full(6, 16)
    groups = find_prefix_groups(bt, lens, bs)
    assert [(g.rows, g.num_blocks) for g in groups] == [((0, 2), 3), ((1, 5), 3)]


def test_prefix_stops_before_each_rows_last_token() -> None:
    """Row 1's length ends exactly at a block boundary: its last block holds its newest token,
    so it shares at most the blocks before it; row 2 has a one-token tail."""
    bs = 4
    bt = np.array([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6]])
    groups = find_prefix_groups(bt, np.array([16, 12, 13]), bs)
    assert [(g.rows, g.num_blocks) for g in groups] == [((0, 1, 2), 2)]
    groups = find_prefix_groups(bt, np.array([16, 13, 13]), bs)
    assert [(g.rows, g.num_blocks) for g in groups] == [((0, 1, 2), 3)]


def test_max_groups_keeps_the_largest_savings() -> None:
    bs = 1
    # Group sizes 2, 4, 3 over 5-block prompts: savings 5, 15, 10.
    sizes = [2, 4, 3]
    tables = []
    for gi, size in enumerate(sizes):
        tables += [[100 * gi + b for b in range(5)] + [1000 + len(tables) + i] for i in range(size)]
    bt = np.asarray(tables)
    groups = find_prefix_groups(bt, np.full(len(tables), 6), bs, max_groups=2)
    assert [len(g.rows) for g in groups] == [4, 3]
    assert find_prefix_groups(bt, np.full(len(tables), 6), bs, max_groups=0) == []


def test_unrelated_rows_and_padding_form_no_group() -> None:
    bt = np.arange(40).reshape(8, 5)
    assert find_prefix_groups(bt, np.full(8, 20), 4) == []
    # seq_len 0 rows (CUDA-graph padding) and rows too short to share anything.
    bt = np.zeros((3, 4), dtype=np.int32)
    assert find_prefix_groups(bt, np.array([0, 0, 1]), 4) == []


def test_find_prefix_groups_rejects_bad_input() -> None:
    bt = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="seq_lens"):
        find_prefix_groups(bt, np.array([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="block_size"):
        find_prefix_groups(bt, np.array([1, 2]), 0)
    with pytest.raises(ValueError, match="block_tables"):
        find_prefix_groups(np.zeros(3), np.array([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="narrower"):
        find_prefix_groups(bt, np.array([100, 100]), 4)
    with pytest.raises(ValueError, match="min_blocks"):
        find_prefix_groups(bt, np.array([1, 2]), 4, min_blocks=0)


# ------------------------------------------------------------------------------------ plan


def _cfg(**kw: int) -> CascadeConfig:
    base = dict(min_prefix_tokens=4, min_chunk_tokens=4, chunk_align=4, block_m=16, max_chunks=4, max_groups=8)
    return CascadeConfig(**{**base, **kw})


@settings(max_examples=100, deadline=None)
@given(batch=batches(block_size=4), gqa=st.sampled_from([1, 2, 4, 8]), fill=st.integers(1, 40))
def test_plan_covers_every_pair_and_prefix_key_once(batch: tuple[np.ndarray, np.ndarray, int], gqa: int,
                                                    fill: int) -> None:
    bt, lens, bs = batch
    cfg = _cfg()
    n = len(lens)
    max_items = max(fill, max_work_items(n, gqa, 2, 1, cfg))
    plan = build_plan(bt, lens, bs, gqa, max_items, cfg)
    assert plan.num_items <= max_items
    assert (plan.tail_start <= lens - 1).all()
    grouped = np.zeros(n, dtype=bool)
    for gi, g in enumerate(plan.groups):
        rows = np.asarray(g.rows)
        grouped[rows] = True
        prefix = g.num_blocks * bs
        assert (plan.tail_start[rows] == prefix).all()
        items = plan.work[np.isin(plan.work[:, F["member_start"]], [sum(len(h.rows) for h in plan.groups[:gi])])]
        assert (items[:, F["rep_row"]] == g.rows[0]).all()
        assert list(plan.members[items[0, F["member_start"]]:][:len(rows)]) == list(rows)
        # Chunks tile [0, prefix) without gaps or empty chunks, each covering every pair once.
        chunks = sorted({(int(i[F["key_lo"]]), int(i[F["key_hi"]]), int(i[F["slot"]])) for i in items})
        assert chunks[0][0] == 0 and chunks[-1][1] == prefix
        assert all(a[1] == b[0] for a, b in pairwise(chunks)) and all(lo < hi for lo, hi, _ in chunks)
        assert [c[2] for c in chunks] == list(range(len(chunks)))
        assert (plan.num_prefix_parts[rows] == len(chunks)).all()
        assert len(chunks) <= cfg.max_chunks
        for *_, slot in chunks:
            tiles = items[items[:, F["slot"]] == slot]
            covered = np.concatenate([np.arange(t[F["pair_start"]], t[F["pair_start"]] + cfg.block_m) for t in tiles])
            covered = covered[covered < len(rows) * gqa]
            assert sorted(covered.tolist()) == list(range(len(rows) * gqa))
            assert (tiles[:, F["num_pairs"]] == len(rows) * gqa).all()
    assert (plan.tail_start[~grouped] == 0).all() and (plan.num_prefix_parts[~grouped] == 0).all()


def test_plan_splits_one_long_prefix_to_fill_the_work_list() -> None:
    """128 rows sharing 2048 tokens, GQA 2, 64-pair tiles: 4 tiles; a 33-item list takes 8
    chunks of 256 keys (the benchmark's shape on an H100 with 8 KV heads)."""
    cfg = CascadeConfig()
    bt = np.concatenate([np.tile(np.arange(128), (128, 1)), 1000 + np.arange(128 * 5).reshape(128, 5)], axis=1)
    lens = np.full(128, 2048 + 70)
    items = max_work_items(128, 2, 8, 132, cfg)
    assert items == 33
    plan = build_plan(bt, lens, 16, 2, items, cfg)
    assert [(len(g.rows), g.num_blocks) for g in plan.groups] == [(128, 128)]
    assert plan.num_items == 32 and (plan.num_prefix_parts == 8).all() and (plan.tail_start == 2048).all()
    assert sorted({(lo, hi) for lo, hi in plan.work[:, 4:6].tolist()}) == [(256 * i, 256 * i + 256) for i in range(8)]
    # Below min_prefix_tokens nothing is grouped.
    assert not build_plan(bt[:, :20], np.full(128, 200), 16, 2, items, cfg).active


def test_plan_rejects_groups_that_do_not_fit() -> None:
    cfg = _cfg()
    g = [PrefixGroup((0, 1), 2)]
    with pytest.raises(ValueError, match="max_items"):
        plan_cascade([PrefixGroup(tuple(range(40)), 2)], 40, 4, 8, 2, cfg)
    with pytest.raises(ValueError, match="distinct rows"):
        plan_cascade(g, 1, 4, 1, 8, cfg)
    with pytest.raises(ValueError, match="distinct rows"):
        plan_cascade([*g, PrefixGroup((1, 2), 2)], 3, 4, 1, 8, cfg)
    with pytest.raises(ValueError, match="block_m"):
        CascadeConfig(block_m=24)
    with pytest.raises(ValueError, match="max_chunks"):
        CascadeConfig(max_chunks=0)


def test_pack_plan_round_trips_and_clears_stale_cells() -> None:
    cfg = _cfg()
    bt = np.array([[1, 2, 3, 9], [1, 2, 3, 10], [5, 6, 7, 11], [1, 2, 3, 12]])
    plan = build_plan(bt, np.array([15, 14, 16, 13]), 4, 2, 8, cfg)
    assert [g.rows for g in plan.groups] == [(0, 1, 3)]
    layout = PackedLayout(rows=6, items=8)
    buf = np.full(layout.size + 3, 77, dtype=np.int32)
    pack_plan(plan, layout, buf)
    tail, parts, members, work = layout.views(buf)
    assert tail.tolist() == [12, 12, 0, 12, 0, 0]
    assert parts.tolist() == [*plan.num_prefix_parts.tolist(), 0, 0]
    assert members[:3].tolist() == [0, 1, 3] and (members[3:] == 0).all()
    assert (work[:plan.num_items] == plan.work).all() and (work[plan.num_items:] == 0).all()
    assert (buf[layout.size:] == 77).all()
    # A later empty plan leaves nothing behind.
    pack_plan(build_plan(bt, np.array([1, 1, 1, 1]), 4, 2, 8, cfg), layout, buf)
    assert (buf[:layout.size] == 0).all()
    with pytest.raises(ValueError, match="exceeds"):
        pack_plan(plan, PackedLayout(rows=3, items=8))
    with pytest.raises(ValueError, match="int32"):
        pack_plan(plan, layout, np.zeros(layout.size, dtype=np.int64))
    assert work.shape[1] == WORK_WIDTH


def test_plan_still_holds_only_for_the_same_rows_and_prefixes() -> None:
    cfg = _cfg()
    bt = np.array([[1, 2, 3, 9, 20], [1, 2, 3, 10, 21], [5, 6, 7, 11, 22], [8, 40, 40, 40, 40]])
    lens = np.array([15, 14, 16, 3])  # row 3 holds one block; the rest of its row is stale
    plan = build_plan(bt, lens, 4, 2, 8, cfg)
    sig = plan_signature(plan, bt, lens, 4)
    assert plan.max_prefix_blocks == 3 and sig.shape == (4, 3)
    # Tails grew, later blocks changed, stale cells past row 3's table changed: still holds.
    grown = bt.copy()
    grown[:, 4] = [30, 31, 32, 33]
    grown[3, 1:] = 77
    assert plan_still_holds(plan, sig, grown, lens + 4)
    changed = bt.copy()
    changed[1, 2] = 99  # row 1 no longer holds the shared blocks
    assert not plan_still_holds(plan, sig, changed, lens)
    replaced = bt.copy()
    replaced[2, 0] = 98  # another sequence in row 2
    assert not plan_still_holds(plan, sig, replaced, lens)
    assert not plan_still_holds(plan, sig, bt[:3], lens[:3])  # a row left
    assert not plan_still_holds(plan, sig, bt, np.array([12, 14, 16, 3]))  # no tail left for row 0
    inactive = build_plan(bt, np.array([1, 1, 1, 1]), 4, 2, 8, cfg)
    assert not plan_still_holds(inactive, plan_signature(inactive, bt, lens, 4), bt, lens)
