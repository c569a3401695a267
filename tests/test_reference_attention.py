"""The torch reference paged attention against dense float64 attention, and its metadata.

The oracle below knows nothing about pages beyond reading each position's K/V through the
table: it gathers one sequence at a time in logical order, applies the causal (and window)
mask and runs softmax in float64.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedattn.attention.backend import AttentionLayerSpec
from pagedattn.attention.metadata import AttentionMetadata, HostBatch, token_positions
from pagedattn.attention.torch_ref import TorchReferenceBackend, paged_attention_ref
from pagedattn.cache import NULL_BLOCK

HEAD_DIM = 32
GQA = [(4, 4), (4, 2), (8, 2), (8, 1)]  # (query heads, kv heads): ratios 1, 2, 4, 8 (MQA)


# ---------------------------------------------------------------------------------- oracle
def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: list[list[int]],
                    query_lens: list[int], seq_lens: list[int], scale: float, window: int | None,
                    softcap: float | None = None) -> torch.Tensor:
    """float64 attention per sequence (scores soft-capped with ``softcap``); returns ``[T, Hq, D]`` float64."""
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hkv
    outs = []
    start = 0
    zero = torch.zeros(k_cache.shape[2:], dtype=torch.float64)
    for table, ql, sl in zip(tables, query_lens, seq_lens):
        # Released (NULL) blocks must lie outside every query's window; zeros stand in for them.
        released = [p for p in range(sl) if table[p // bs] == NULL_BLOCK]
        assert window is not None or not released
        assert all(p < sl - ql - window + 1 for p in released), "a visible position was released"
        ks = torch.stack([zero if table[p // bs] == NULL_BLOCK else k_cache[table[p // bs], p % bs].double()
                          for p in range(sl)])
        vs = torch.stack([zero if table[p // bs] == NULL_BLOCK else v_cache[table[p // bs], p % bs].double()
                          for p in range(sl)])
        ks = ks.repeat_interleave(group, dim=1)  # [sl, Hq, D]: query head h reads kv head h // group
        vs = vs.repeat_interleave(group, dim=1)
        qs = q[start:start + ql].double()  # [ql, Hq, D]
        q_pos = torch.arange(sl - ql, sl)[:, None]
        k_pos = torch.arange(sl)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= q_pos - k_pos < window
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vs))
        start += ql
    return torch.cat(outs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------- fixtures
class Batch:
    """Random paged K/V for a batch: every block of every sequence at a random physical id."""

    def __init__(self, seed: int, query_lens: list[int], seq_lens: list[int], hq: int, hkv: int, bs: int,
                 window: int | None = None, dtype: torch.dtype = torch.float32, spare_blocks: int = 3,
                 softcap: float | None = None) -> None:
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        n_logical = [-(-sl // bs) for sl in seq_lens]
        num_blocks = sum(n_logical) + spare_blocks
        # Block 0 is never assigned: it is where NULL and padding entries point, so tests can
        # poison it to prove those entries are never read.
        perm = list(range(1, num_blocks))
        rng.shuffle(perm)
        self.tables: list[list[int]] = []
        it = iter(perm)
        for n, ql, sl in zip(n_logical, query_lens, seq_lens):
            table = [next(it) for _ in range(n)]
            if window is not None:  # release blocks no query of this step can see
                first_visible = max(0, sl - ql - window + 1)
                table = [NULL_BLOCK if (i + 1) * bs <= first_visible else b for i, b in enumerate(table)]
            self.tables.append(table)
        self.k_cache = torch.randn(num_blocks, bs, hkv, HEAD_DIM, generator=g).to(dtype)
        self.v_cache = torch.randn(num_blocks, bs, hkv, HEAD_DIM, generator=g).to(dtype)
        self.q = torch.randn(sum(query_lens), hq, HEAD_DIM, generator=g).to(dtype)
        self.query_lens, self.seq_lens, self.bs, self.window = query_lens, seq_lens, bs, window
        self.scale = 1.0 / math.sqrt(HEAD_DIM)
        self.softcap = softcap
        self.meta = AttentionMetadata.build(query_lens, seq_lens, self.tables, bs)

    def run(self) -> torch.Tensor:
        m = self.meta
        return paged_attention_ref(self.q, self.k_cache, self.v_cache, m.block_tables, m.query_lens_cpu,
                                   m.seq_lens_cpu, self.scale, self.window, softcap=self.softcap)

    def oracle(self) -> torch.Tensor:
        return dense_attention(self.q, self.k_cache, self.v_cache, self.tables, self.query_lens, self.seq_lens,
                               self.scale, self.window, self.softcap)


# ---------------------------------------------------------------------------------- decode / extend
@pytest.mark.parametrize(("hq", "hkv"), GQA)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("bs", [4, 16])
def test_decode_matches_dense(hq: int, hkv: int, window: int | None, bs: int) -> None:
    lens = [1, bs - 1, bs, bs + 1, 300]
    b = Batch(hq * 100 + bs, [1] * len(lens), lens, hq, hkv, bs, window)
    assert b.meta.num_decodes == len(lens)
    out = b.run()
    assert out.shape == b.q.shape and out.dtype == torch.float32
    assert rel_err(out, b.oracle()) < 1e-5


@pytest.mark.parametrize(("hq", "hkv"), GQA)
@pytest.mark.parametrize("window", [None, 5, 64])
def test_extend_over_a_cached_prefix_matches_dense(hq: int, hkv: int, window: int | None) -> None:
    # (new tokens, total context): prefill from scratch, extends across block edges, long ones.
    cases = [(1, 1), (3, 3), (5, 8), (4, 9), (7, 40), (33, 300), (16, 16)]
    b = Batch(hq + 7 * hkv, [c[0] for c in cases], [c[1] for c in cases], hq, hkv, 8, window)
    assert rel_err(b.run(), b.oracle()) < 1e-5


@pytest.mark.parametrize(("hq", "hkv"), GQA)
@pytest.mark.parametrize("window", [None, 6])
def test_mixed_batch_decodes_first_then_extends(hq: int, hkv: int, window: int | None) -> None:
    query_lens = [1, 1, 1, 4, 1, 9]  # a decode after an extend starts a new group
    seq_lens = [5, 17, 300, 4, 9, 70]
    b = Batch(31 * hq + hkv, query_lens, seq_lens, hq, hkv, 4, window)
    assert b.meta.num_decodes == 3
    assert rel_err(b.run(), b.oracle()) < 1e-5


@pytest.mark.parametrize(("hq", "hkv"), [(4, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 9, 700])
def test_whole_sequence_prefills_match_dense(hq: int, hkv: int, window: int | None) -> None:
    """Prompts with no cached context: plain causal attention (no mask) unless the window binds."""
    lens = [1, 2, 9, 40, 257]
    b = Batch(3 * hq + hkv, lens, lens, hq, hkv, 16, window)
    assert rel_err(b.run(), b.oracle()) < 1e-5


@pytest.mark.parametrize(("hq", "hkv"), GQA)
@pytest.mark.parametrize("window", [None, 6])
def test_softcapped_scores_match_dense(hq: int, hkv: int, window: int | None) -> None:
    """Attention-logit soft-capping (Gemma 2) in decodes, extends over a cached prefix and whole
    prefills, with NaN where nothing may be read; a cap of 0.5 bites (scores are ~N(0, 1))."""
    query_lens = [1, 1, 4, 1, 9, 12]
    seq_lens = [5, 300, 4, 9, 70, 12]
    b = Batch(17 * hq + hkv, query_lens, seq_lens, hq, hkv, 4, window, softcap=0.5)
    for table, sl in zip(b.tables, b.seq_lens):
        b.k_cache[table[-1], sl - (len(table) - 1) * 4:] = float("nan")
    out = b.run()
    assert rel_err(out, b.oracle()) < 1e-5
    uncapped = dense_attention(b.q, b.k_cache, b.v_cache, b.tables, b.query_lens, b.seq_lens, b.scale, window)
    assert rel_err(out, uncapped) > 1e-2  # the cap changes the result


def test_softcap_through_the_backend_and_a_huge_cap_changes_nothing() -> None:
    b = Batch(21, [1, 1, 6], [9, 40, 6], 4, 2, 4)
    layer = AttentionLayerSpec(4, 2, HEAD_DIM, b.scale, logit_softcap=1e6)
    got = TorchReferenceBackend().attend(b.q, b.k_cache, b.v_cache, b.meta, layer)
    torch.testing.assert_close(got, b.run(), rtol=1e-5, atol=1e-5)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="logit_softcap"):
            AttentionLayerSpec(4, 2, HEAD_DIM, b.scale, logit_softcap=bad)


def test_permuting_physical_blocks_does_not_change_the_result() -> None:
    b = Batch(5, [1, 6], [37, 23], 4, 2, 4)
    out = b.run()
    perm = torch.randperm(b.k_cache.shape[0], generator=torch.Generator().manual_seed(6))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    k2 = b.k_cache[perm]  # physical block j of the new pool is old block perm[j]
    v2 = b.v_cache[perm]
    tables2 = [[int(inv[x]) for x in t] for t in b.tables]
    m2 = AttentionMetadata.build(b.query_lens, b.seq_lens, tables2, 4)
    out2 = paged_attention_ref(b.q, k2, v2, m2.block_tables, m2.query_lens_cpu, m2.seq_lens_cpu, b.scale)
    assert torch.allclose(out, out2, rtol=1e-6, atol=1e-6)


def test_window_released_blocks_are_never_read() -> None:
    b = Batch(8, [1, 3], [50, 41], 4, 4, 4, window=9)
    assert NULL_BLOCK in b.tables[0] and NULL_BLOCK in b.tables[1]
    out = b.run()
    # Whatever sits in physical block 0 (where released entries point) must not matter.
    b.k_cache[0] = float("nan")
    b.v_cache[0] = float("nan")
    assert torch.equal(b.run(), out)
    assert rel_err(out, b.oracle()) < 1e-5


def test_unwritten_slots_and_padding_are_never_read() -> None:
    """Slots past a sequence's end and padding entries of short tables may hold anything
    (a fresh pool is uninitialised memory), NaN included."""
    b = Batch(15, [1, 1, 3], [5, 30, 7], 4, 2, 4)
    for table, sl in zip(b.tables, b.seq_lens):
        last, used = table[-1], sl - (len(table) - 1) * 4
        b.k_cache[last, used:] = float("nan")
        b.v_cache[last, used:] = float("nan")
    b.k_cache[0] = float("inf")  # where padding entries point
    b.v_cache[0] = float("nan")
    out = b.run()
    assert not out.isnan().any()
    assert rel_err(out, b.oracle()) < 1e-5


def test_window_larger_than_context_equals_no_window() -> None:
    b = Batch(9, [1, 5], [20, 12], 4, 2, 4, window=None)
    with_window = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.meta.block_tables, b.query_lens, b.seq_lens,
                                      b.scale, sliding_window=1000)
    assert torch.equal(with_window, b.run())


def test_window_of_one_returns_own_value() -> None:
    b = Batch(10, [1, 3], [13, 6], 2, 2, 4, window=1)
    out = b.run()
    positions = token_positions(b.query_lens, b.seq_lens)
    seq_of = np.repeat(np.arange(2), b.query_lens)
    for i, (p, s) in enumerate(zip(positions, seq_of)):
        block = b.tables[s][p // 4]
        assert torch.allclose(out[i], b.v_cache[block, p % 4], atol=1e-6)


def test_long_extends_of_different_lengths_match_dense() -> None:
    b = Batch(11, [64, 1, 700, 3], [200, 90, 700, 900], 8, 2, 16)
    assert rel_err(b.run(), b.oracle()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv"), [(8, 2), (4, 4)])
def test_half_precision_inputs_within_tolerance(dtype: torch.dtype, hq: int, hkv: int) -> None:
    b = Batch(12 + hq, [1, 1, 6, 17], [3, 300, 6, 150], hq, hkv, 8, window=None, dtype=dtype)
    out = b.run()
    assert out.dtype == dtype
    ref = b.oracle()  # from the same low-precision K/V, upcast: only output rounding differs
    eps = torch.finfo(dtype).eps
    assert rel_err(out, ref) < 2 * eps
    assert (out.double() - ref).abs().max().item() < 4 * eps * ref.abs().max().item()


def test_backend_forward_stores_then_attends() -> None:
    hq, hkv, bs = 4, 2, 4
    query_lens, seq_lens = [1, 5], [10, 7]
    b = Batch(13, query_lens, seq_lens, hq, hkv, bs)
    g = torch.Generator().manual_seed(14)
    k_new = torch.randn(6, hkv, HEAD_DIM, generator=g)
    v_new = torch.randn(6, hkv, HEAD_DIM, generator=g)
    layer = AttentionLayerSpec(hq, hkv, HEAD_DIM, b.scale)
    out = TorchReferenceBackend().forward(b.q, k_new, v_new, b.k_cache, b.v_cache, b.meta, layer)
    # The new tokens' K/V landed in their slots, and attention saw them.
    flat_k = b.k_cache.view(-1, hkv, HEAD_DIM)
    assert torch.equal(flat_k[b.meta.slot_mapping], k_new)
    assert rel_err(out, b.oracle()) < 1e-5


# ---------------------------------------------------------------------------------- metadata
def test_metadata_build_fields() -> None:
    tables = [[3, NULL_BLOCK, 5], [7], [2, 9, 4, 1]]
    m = AttentionMetadata.build([1, 2, 5], [9, 3, 14], [[3, 8, 5], tables[1], tables[2]], block_size=4)
    assert m.num_seqs == 3 and m.num_tokens == 8 and m.num_decodes == 1 == m.num_decode_tokens
    assert m.query_start_loc.tolist() == [0, 1, 3, 8] and m.query_start_loc.dtype == torch.int32
    assert m.seq_lens.tolist() == [9, 3, 14] and m.seq_lens.dtype == torch.int32
    assert m.slot_mapping.dtype == torch.int64
    # seq 0 pos 8 -> block 5 off 0; seq 1 pos 1,2 -> block 7; seq 2 pos 9..13 -> blocks 4, 4, 4, 1, 1.
    assert m.slot_mapping.tolist() == [20, 29, 30, 17, 18, 19, 4, 5]
    assert m.block_tables.dtype == torch.int32 and m.block_tables.shape == (3, 4)
    assert m.max_query_len == 5 and m.max_seq_len == 14
    m2 = AttentionMetadata.build([1], [9], [tables[0]], 4, pad_blocks_to=6)
    assert m2.block_tables.tolist() == [[3, 0, 5, 0, 0, 0]], "NULL and padding entries read as block 0"


@st.composite
def _steps(draw: st.DrawFn) -> tuple[list[int], list[int], list[list[int]], int]:
    """A step as the engine makes them: decodes first, then longer queries; block ids shuffled,
    some tables longer than needed, window-released (NULL) pages before what the queries store."""
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    query_lens, seq_lens, tables = [], [], []
    for ql in sorted(draw(st.lists(st.integers(1, 9), min_size=1, max_size=6)), key=lambda q: q != 1):
        sl = draw(st.integers(ql, 60))
        pages = -(-sl // bs) + draw(st.integers(0, 2))
        table = draw(st.lists(st.integers(0, 500), min_size=pages, max_size=pages))
        first_stored = (sl - ql) // bs
        released = draw(st.integers(0, first_stored))
        tables.append([NULL_BLOCK] * released + table[released:])
        query_lens.append(ql)
        seq_lens.append(sl)
    return query_lens, seq_lens, tables, bs


@settings(max_examples=100, deadline=None)
@given(_steps(), st.sampled_from(["lists", "arrays", "mixed"]))
def test_host_batch_is_the_per_token_arithmetic(step: tuple[list[int], list[int], list[list[int]], int],
                                                tables_as: str) -> None:
    """Tables given as lists, or as the block manager's int32 arrays (joined as bytes), or both."""
    query_lens, seq_lens, tables, bs = step
    given_tables: list[Sequence[int]] = [
        array("i", t) if tables_as == "arrays" or (tables_as == "mixed" and i % 2) else t for i, t in enumerate(tables)]
    batch = HostBatch.build(query_lens, seq_lens, given_tables, bs)
    positions = [sl - ql + j for ql, sl in zip(query_lens, seq_lens) for j in range(ql)]
    owners = [i for i, ql in enumerate(query_lens) for _ in range(ql)]
    assert batch.positions.tolist() == positions
    assert batch.slots.tolist() == [tables[i][p // bs] * bs + p % bs for i, p in zip(owners, positions)]
    width = max(map(len, tables))
    assert batch.block_tables.tolist() == [t + [-1] * (width - len(t)) for t in tables]
    assert batch.num_decodes == next((i for i, ql in enumerate(query_lens) if ql != 1), len(query_lens))
    meta = AttentionMetadata.from_host(batch)
    assert meta.slot_mapping.tolist() == batch.slots.tolist()
    assert meta.block_tables.tolist() == [[max(b, 0) for b in row] for row in batch.block_tables.tolist()]
    assert meta.query_start_loc.tolist() == [0, *np.cumsum(query_lens).tolist()]
    assert (meta.query_lens_cpu, meta.seq_lens_cpu, meta.block_size) == (query_lens, seq_lens, bs)


def test_token_positions() -> None:
    assert token_positions([1, 3, 2], [5, 3, 9]).tolist() == [4, 0, 1, 2, 7, 8]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1, 1], [2], [[0], [1]]), "one entry per sequence"),
        (([0], [3], [[0]]), "query_len"),
        (([4], [3], [[0]]), "query_len"),
        (([1], [9], [[0, 1]]), "cannot hold"),
        (([2], [9], [[NULL_BLOCK, NULL_BLOCK, 4]]), "released"),
        (([], [], []), "at least one sequence"),
    ],
)
def test_metadata_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttentionMetadata.build(*args, block_size=4)


def test_metadata_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        AttentionMetadata.build([1], [1], [[0]], block_size=0)
