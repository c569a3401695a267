"""Triton attention kernels against the torch reference.

Without CUDA the kernels run under the Triton interpreter on small shapes; with CUDA the same
tests run at full size, plus the ``gpu``-marked long-context and CUDA-graph tests.

Inputs: shuffled physical block ids, ragged lengths around the page size, GQA ratios 1-8,
sliding windows, poisoned (NaN) outputs and NaN in every cache slot no kernel may read.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from .triton_interpreter import (
    CUDA,
    DEVICE,
    attention_tolerance,
    randn,
    rerun_in_fresh_process,
    seeded_generator,
    skip_unless_runnable,
)

pytest.importorskip("triton")

from pagedattn.attention import (
    AttentionLayerSpec,
    AttentionMetadata,
    TorchReferenceBackend,
    paged_attention_ref,
    store_kv_ref,
    triton_backend,
)
from pagedattn.attention import triton_ops as ops
from pagedattn.attention.metadata import HostBatch
from pagedattn.attention.selector import get_attention_backend
from pagedattn.attention.triton_backend import TritonBackend


@dataclass(frozen=True)
class Size:
    head_dim: int
    num_kv_heads: int
    long_ctx: int  # the longest context in the ragged batches
    long_query: int  # the longest prefill chunk


# The interpreter executes programs one by one in Python: keep grids and loops tiny there.
SIZE = Size(128, 4, long_ctx=700, long_query=300) if CUDA else Size(32, 2, long_ctx=45, long_query=20)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Small tiles under the interpreter so multi-tile and multi-page loops are exercised cheaply.
EXT_CFG = None if CUDA else ops.ExtendConfig(block_m=16, block_n=16)
DEC_CFG = None if CUDA else ops.DecodeConfig(block_n=16)


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_kernels_in_fresh_interpreter_process")


def test_kernels_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


_gen = seeded_generator


def _ragged_lens(block_size: int, long_ctx: int) -> list[int]:
    """Context lengths around page boundaries: 1, bs-1, bs, bs+1, a few pages, long."""
    lens = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, long_ctx]
    return list(dict.fromkeys(n for n in lens if n >= 1))


@dataclass
class PagedBatch:
    meta: AttentionMetadata
    k_cache: torch.Tensor  # NaN wherever no kernel may read
    v_cache: torch.Tensor
    block_size: int

    def clean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Caches with the poison zeroed: what the reference (which reads whole pages) sees."""
        return torch.nan_to_num(self.k_cache, nan=0.0), torch.nan_to_num(self.v_cache, nan=0.0)


def _paged_batch(g: torch.Generator, query_lens: list[int], seq_lens: list[int], block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, window: int | None = None,
                 cached_upto: list[int] | None = None) -> PagedBatch:
    """Shuffled pages holding random K/V at positions ``[lo, cached_upto[i])`` of each sequence.

    ``lo`` is the first position any of the sequence's queries can see (its window start);
    everything else (earlier positions, page tails, unused blocks) is NaN.
    """
    n_blocks = [-(-s // block_size) for s in seq_lens]
    total = sum(n_blocks) + 3  # spare blocks stay NaN
    perm = torch.randperm(total, generator=g).tolist()
    tables, i = [], 0
    for n in n_blocks:
        tables.append(perm[i:i + n])
        i += n
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device=DEVICE)
    shape = (total, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    upto = cached_upto if cached_upto is not None else seq_lens
    for ql, sl, bt, hi in zip(query_lens, seq_lens, tables, upto, strict=True):
        lo = max(0, sl - ql - window + 1) if window is not None else 0
        pos = torch.arange(lo, hi)
        if len(pos) == 0:
            continue
        slots = (torch.tensor(bt)[pos // block_size] * block_size + pos % block_size).to(DEVICE)
        kv = randn(g, 2, len(pos), num_kv_heads, head_dim, dtype=dtype)
        store_kv_ref(kv[0], kv[1], k_cache, v_cache, slots)
    return PagedBatch(meta, k_cache, v_cache, block_size)


def _reference(q: torch.Tensor, batch: PagedBatch, layer: AttentionLayerSpec) -> torch.Tensor:
    k, v = batch.clean()
    return paged_attention_ref(q, k, v, batch.meta.block_tables, batch.meta.query_lens_cpu,
                               batch.meta.seq_lens_cpu, layer.scale, layer.sliding_window, softcap=layer.logit_softcap)


def _assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "output has NaN: an element was never written or poison was read"
    torch.testing.assert_close(out.float(), ref.float(), **attention_tolerance(out.dtype))


# --------------------------------------------------------------------------- store


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_scatters_and_skips_padding(block_size: int, dtype: torch.dtype) -> None:
    g = _gen("store", block_size, dtype)
    h, d, n_blocks, t = SIZE.num_kv_heads, SIZE.head_dim, 13, 9
    k_cache = randn(g, n_blocks, block_size, h, d, dtype=dtype)
    v_cache = randn(g, n_blocks, block_size, h, d, dtype=dtype)
    slots = torch.randperm(n_blocks * block_size, generator=g)[:t]
    slots[[1, 5]] = -1  # CUDA-graph padding
    # k/v as strided views of a fused projection, as a model produces them.
    fused = randn(g, t, 3 * h, d, dtype=dtype)
    k, v = fused[:, h:2 * h], fused[:, 2 * h:]
    want_k, want_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    store_kv_ref(k[keep.to(DEVICE)], v[keep.to(DEVICE)], want_k, want_v, slots[keep].to(DEVICE))

    ops.store_kv(k, v, k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache, want_k)
    assert torch.equal(v_cache, want_v)


# --------------------------------------------------------------------------- decode

# (block_size, gqa) covers every pair; window, dtype and split count rotate across them.
_DECODE_CASES = [
    (bs, gqa, [None, 7][i % 2], DTYPES[i % 3], [1, 3][(i // 2) % 2])
    for i, (bs, gqa) in enumerate(itertools.product([1, 2, 8, 16], [1, 2, 4, 8]))
]


@pytest.mark.parametrize(("block_size", "gqa", "window", "dtype", "splits"), _DECODE_CASES)
def test_decode_matches_reference(block_size: int, gqa: int, window: int | None, dtype: torch.dtype,
                                  splits: int) -> None:
    g = _gen("decode", block_size, gqa, window, dtype, splits)
    hkv, d = SIZE.num_kv_heads, SIZE.head_dim
    seq_lens = _ragged_lens(block_size, SIZE.long_ctx)
    b = len(seq_lens)
    batch = _paged_batch(g, [1] * b, seq_lens, block_size, hkv, d, dtype, window)
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5, window)
    q = randn(g, b, hkv * gqa, d, dtype=dtype)
    out = torch.full_like(q, float("nan"))

    ops.decode_attention(q, batch.k_cache, batch.v_cache, batch.meta.block_tables, batch.meta.seq_lens,
                         layer.scale, window, out, splits, config=DEC_CFG)
    _assert_matches(out, _reference(q, batch, layer))


@pytest.mark.parametrize("splits", [2, 5, 16, 37])
def test_decode_split_counts_agree(splits: int) -> None:
    """More splits than tiles leaves splits empty: the merge must ignore them (37: over two of
    the merge's tiles)."""
    g = _gen("splits", splits)
    hkv, d, gqa, dtype = SIZE.num_kv_heads, SIZE.head_dim, 4, torch.float32
    seq_lens = [3, SIZE.long_ctx, 17]
    batch = _paged_batch(g, [1] * 3, seq_lens, 4, hkv, d, dtype)
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, 0.3)
    q = randn(g, 3, hkv * gqa, d, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    ops.decode_attention(q, batch.k_cache, batch.v_cache, batch.meta.block_tables, batch.meta.seq_lens,
                         layer.scale, None, out, splits, config=DEC_CFG)
    _assert_matches(out, _reference(q, batch, layer))


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_in_any_row_order_gives_the_same_bits(splits: int) -> None:
    """The order the rows' programs start in (``order``: the backend passes longest first)
    changes only the schedule: every row's output is the same bits as in batch order, a padding
    row (length 0) included."""
    g = _gen("order", splits)
    hkv, d = SIZE.num_kv_heads, SIZE.head_dim
    seq_lens = [5, SIZE.long_ctx, 1, 33, 17]
    batch = _paged_batch(g, [1] * 5, seq_lens, 4, hkv, d, torch.float32)
    lens = batch.meta.seq_lens.clone()
    lens[2] = 0
    q = randn(g, 5, hkv * 2, d, dtype=torch.float32)
    outs = []
    for order in (None, ops.longest_first(lens.numpy()), [4, 2, 0, 3, 1]):
        out = torch.full_like(q, float("nan"))
        perm = None if order is None else torch.as_tensor(order, dtype=torch.int32, device=q.device)
        ops.decode_attention(q, batch.k_cache, batch.v_cache, batch.meta.block_tables, lens, 0.2, None, out,
                             splits, config=DEC_CFG, order=perm)
        outs.append(out)
    assert not outs[0][[0, 1, 3, 4]].isnan().any() and torch.equal(outs[0][2], torch.zeros_like(outs[0][2]))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_longest_first_orders_rows_by_their_keys_then_padding() -> None:
    assert ops.longest_first(np.array([3, 9, 9, 1])).tolist() == [1, 2, 0, 3]  # ties in batch order
    assert ops.longest_first(np.array([3, 9, 9, 1]), rows=6).tolist() == [1, 2, 0, 3, 4, 5]
    order = ops.longest_first(np.array([7]), rows=1)
    assert order.dtype == np.int32 and order.tolist() == [0]


def test_backend_starts_the_longest_rows_first() -> None:
    """Eager steps order a step's decode rows once (by length, or by own tail when cascade
    groups them); captured steps read the graphs' order buffer, refilled before each replay
    with the bucket's padding rows last."""
    g = _gen("lpt")
    hkv, d = SIZE.num_kv_heads, SIZE.head_dim
    layer = AttentionLayerSpec(hkv * 2, hkv, d, 0.25)
    lens = [9, SIZE.long_ctx, 2, 30]
    batch = _paged_batch(g, [1] * 4, lens, 4, hkv, d, torch.float32)
    q = randn(g, 4, hkv * 2, d, dtype=torch.float32)
    backend = TritonBackend(cascade=False)
    out = backend.attend(q, batch.k_cache, batch.v_cache, batch.meta, layer)
    launch = batch.meta.state
    assert isinstance(launch, triton_backend.DecodeLaunch) and launch.order is not None
    assert launch.order.tolist() == [1, 3, 0, 2]
    _assert_matches(out, _reference(q, batch, layer))

    assert backend.init_cuda_graphs(max_batch_size=8, max_seq_len=4096, block_size=4, layer=layer,
                                    device=DEVICE) == 1
    buffers = backend._graphs
    assert buffers is not None and buffers.order.device.tolist() == list(range(8))
    host = HostBatch.build([1] * 4, lens, batch.meta.block_tables_cpu.tolist(), 4)
    assert backend.prepare_for_replay(host, 6) == 0
    assert buffers.order.device[:6].tolist() == [1, 3, 0, 2, 4, 5]
    backend.prepare_for_capture(batch.meta, 0)
    assert batch.meta.state.order.data_ptr() == buffers.order.device.data_ptr()


def test_decode_zero_length_padding_rows_are_zero() -> None:
    g = _gen("pad")
    hkv, d = SIZE.num_kv_heads, SIZE.head_dim
    batch = _paged_batch(g, [1, 1], [5, 9], 4, hkv, d, torch.float32)
    seq_lens = batch.meta.seq_lens.clone()
    seq_lens[1] = 0  # a padded row of a CUDA-graph batch
    q = randn(g, 2, hkv * 2, d, dtype=torch.float32)
    for splits in (1, 3):
        out = torch.full_like(q, float("nan"))
        ops.decode_attention(q, batch.k_cache, batch.v_cache, batch.meta.block_tables, seq_lens, 0.2, None,
                             out, splits, config=DEC_CFG)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert not out[0].isnan().any()


# --------------------------------------------------------------------------- extend


def _extend_shapes(block_size: int) -> tuple[list[int], list[int]]:
    """(query_lens, seq_lens) with cached prefixes 0, 1, bs-1, bs, bs+1 and long; chunks of 1 and up."""
    bs = block_size
    pairs = [(0, 7), (0, 1), (1, 3), (bs - 1, 2), (bs, 5), (bs + 1, 19), (3, 1),
             (SIZE.long_ctx, SIZE.long_query)]
    return [q for _, q in pairs], [c + q for c, q in pairs]


# Every (block_size, gqa) pair; window and dtype rotate across them.
_EXTEND_CASES = [
    (bs, gqa, [None, 6][(i + i // 4) % 2], DTYPES[i % 3])
    for i, (bs, gqa) in enumerate(itertools.product([1, 4, 16], [1, 2, 4, 8]))
]


@pytest.mark.parametrize(("block_size", "gqa", "window", "dtype"), _EXTEND_CASES)
def test_extend_matches_reference(block_size: int, gqa: int, window: int | None, dtype: torch.dtype) -> None:
    g = _gen("extend", block_size, gqa, window, dtype)
    # The extend grid has a program per query head: one KV head keeps the interpreter quick.
    hkv, d = (SIZE.num_kv_heads if CUDA else 1), SIZE.head_dim
    query_lens, seq_lens = _extend_shapes(block_size)
    batch = _paged_batch(g, query_lens, seq_lens, block_size, hkv, d, dtype, window)
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5, window)
    q = randn(g, sum(query_lens), hkv * gqa, d, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    m = batch.meta
    ops.extend_attention(q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, m.query_start_loc,
                         layer.scale, window, out, seq_offset=0, num_seqs=m.num_seqs,
                         max_query_len=m.max_query_len, config=EXT_CFG)
    _assert_matches(out, _reference(q, batch, layer))


# --------------------------------------------------------------------------- soft-capping

# (block_size, gqa, window, dtype, decode splits); the cap bites: scores are ~N(0, 1).
_SOFTCAP_CASES = [(4, 2, None, torch.float32, 1), (1, 4, 7, torch.bfloat16, 3), (16, 8, 5, torch.float16, 3)]


@pytest.mark.parametrize(("block_size", "gqa", "window", "dtype", "splits"), _SOFTCAP_CASES)
def test_softcapped_decode_and_extend_match_reference(block_size: int, gqa: int, window: int | None,
                                                      dtype: torch.dtype, splits: int) -> None:
    """Attention-logit soft-capping (Gemma 2) in the decode (split and unsplit) and extend kernels."""
    g = _gen("softcap", block_size, gqa, window, dtype, splits)
    hkv, d, cap = SIZE.num_kv_heads, SIZE.head_dim, 0.7
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5, window, logit_softcap=cap)
    seq_lens = _ragged_lens(block_size, SIZE.long_ctx)
    batch = _paged_batch(g, [1] * len(seq_lens), seq_lens, block_size, hkv, d, dtype, window)
    q = randn(g, len(seq_lens), hkv * gqa, d, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    ops.decode_attention(q, batch.k_cache, batch.v_cache, batch.meta.block_tables, batch.meta.seq_lens,
                         layer.scale, window, out, splits, config=DEC_CFG, softcap=cap)
    ref = _reference(q, batch, layer)
    _assert_matches(out, ref)
    uncapped = _reference(q, batch, AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5, window))
    assert (ref - uncapped).abs().max() > 0.05  # the cap changes the result

    hkv = SIZE.num_kv_heads if CUDA else 1  # one program per query head: keep the interpreter quick
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5, window, logit_softcap=cap)
    query_lens, seq_lens = _extend_shapes(block_size)
    batch = _paged_batch(g, query_lens, seq_lens, block_size, hkv, d, dtype, window)
    q = randn(g, sum(query_lens), hkv * gqa, d, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    m = batch.meta
    ops.extend_attention(q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, m.query_start_loc,
                         layer.scale, window, out, seq_offset=0, num_seqs=m.num_seqs,
                         max_query_len=m.max_query_len, config=EXT_CFG, softcap=cap)
    _assert_matches(out, _reference(q, batch, layer))


# --------------------------------------------------------------------------- backend


@pytest.mark.parametrize(("block_size", "window", "dtype", "softcap"),
                         [(1, None, torch.float32, None), (4, 5, torch.float16, None),
                          (16, None, torch.bfloat16, None), (16, 9, torch.float32, None), (4, None, torch.float32, 0.8),
                          (2, 6, torch.bfloat16, 1.5)])
def test_backend_forward_mixed_batch_matches_reference(block_size: int, window: int | None, dtype: torch.dtype,
                                                       softcap: float | None) -> None:
    """Decodes then prefill / extend chunks, K/V stored by the backend, default launch configs."""
    g = _gen("forward", block_size, window, dtype, softcap)
    hkv, d, gqa = SIZE.num_kv_heads, SIZE.head_dim, 4
    query_lens = [1, 1, 1, 9, 3, 1]
    seq_lens = [1, block_size + 1, SIZE.long_ctx, 9, block_size + 4, 6]
    cached = [s - q for q, s in zip(query_lens, seq_lens, strict=True)]
    batch = _paged_batch(g, query_lens, seq_lens, block_size, hkv, d, dtype, window, cached_upto=cached)
    assert batch.meta.num_decodes == 3
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5, window, logit_softcap=softcap)
    t = sum(query_lens)
    q = randn(g, t, hkv * gqa, d, dtype=dtype)
    k, v = randn(g, 2, t, hkv, d, dtype=dtype)

    ref_k, ref_v = batch.clean()
    ref = TorchReferenceBackend().forward(q, k, v, ref_k, ref_v, batch.meta, layer)
    out = TritonBackend().forward(q, k, v, batch.k_cache, batch.v_cache, batch.meta, layer)
    _assert_matches(out, ref)
    k_now, v_now = batch.clean()
    assert torch.equal(k_now, ref_k) and torch.equal(v_now, ref_v)


def test_backend_captured_step_uses_fixed_splits_and_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A captured step's launch depends only on its bucket and the prepared bounds: the split
    count is the one the prepared 4096-token context asks for (not this batch's short
    contexts), the partials go to the shared workspace, and the results stay correct."""
    g = _gen("graph-mode")
    hkv, d = SIZE.num_kv_heads, SIZE.head_dim
    layer = AttentionLayerSpec(hkv * 2, hkv, d, 0.25)
    batch = _paged_batch(g, [1] * 3, [2, SIZE.long_ctx, 9], 4, hkv, d, torch.float32)
    q = randn(g, 3, hkv * 2, d, dtype=torch.float32)
    backend = TritonBackend(cascade=False)
    assert backend.init_cuda_graphs(max_batch_size=8, max_seq_len=4096, block_size=4, layer=layer,
                                    device=DEVICE) == 1
    backend.prepare_for_capture(batch.meta, 0)
    launch = batch.meta.state
    assert isinstance(launch, triton_backend.DecodeLaunch) and launch.workspace is not None
    sms = triton_backend._num_sms(q.device)
    assert launch.splits(layer, None, sms) == ops.choose_num_splits(3, hkv, 4096, sms) > 1
    launches: list[tuple[int, object]] = []
    real = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a, **kw: launches.append((a[8], kw["workspace"])) or
                        real(*a, **kw))
    out = backend.attend(q, batch.k_cache, batch.v_cache, batch.meta, layer)
    assert launches == [(launch.splits(layer, None, sms), launch.workspace)]
    _assert_matches(out, _reference(q, batch, layer))
    with pytest.raises(ValueError, match="heads"):
        backend.attend(q.repeat(1, 2, 1), batch.k_cache, batch.v_cache, batch.meta,
                       AttentionLayerSpec(hkv * 4, hkv, d, 0.25))
    mixed = _paged_batch(g, [1, 2], [3, 4], 4, hkv, d, torch.float32)
    with pytest.raises(ValueError, match="num_decodes"):
        backend.prepare_for_capture(mixed.meta, 0)
    nine = _paged_batch(g, [1] * 9, [3] * 9, 4, hkv, d, torch.float32)
    with pytest.raises(ValueError, match="batch_size"):
        backend.prepare_for_capture(nine.meta, 0)
    with pytest.raises(ValueError, match="variant"):
        backend.prepare_for_capture(batch.meta, 1)
    with pytest.raises(ValueError, match="init_cuda_graphs"):
        TritonBackend().prepare_for_capture(batch.meta, 0)


def test_backend_rejects_bad_input() -> None:
    g = _gen("bad")
    hkv, d = SIZE.num_kv_heads, SIZE.head_dim
    batch = _paged_batch(g, [1, 2], [3, 4], 4, hkv, d, torch.float32)
    layer = AttentionLayerSpec(hkv * 2, hkv, d, 0.25)
    backend = TritonBackend()
    q = randn(g, 3, hkv * 2, d, dtype=torch.float32)
    with pytest.raises(ValueError, match="q must be"):
        backend.attend(q[:2], batch.k_cache, batch.v_cache, batch.meta, layer)
    with pytest.raises(ValueError, match="v_cache"):
        backend.attend(q, batch.k_cache, batch.v_cache.half(), batch.meta, layer)
    with pytest.raises(ValueError, match="k/v must be"):
        backend.store_kv(q, q, batch.k_cache, batch.v_cache, batch.meta)
    odd = torch.zeros(4, 3, hkv, d, device=DEVICE)
    with pytest.raises(ValueError, match="block_size"):
        backend.attend(q, odd, odd, batch.meta, layer)
    wider = torch.zeros(4, 8, hkv, d, device=DEVICE)
    with pytest.raises(ValueError, match="block_size is 4"):
        backend.attend(q, wider, wider, batch.meta, layer)


def test_choose_num_splits() -> None:
    sms = 132
    # Batches that fill the GPU alone are not split; small batches with long contexts are,
    # by a power of two (no part-filled last wave).
    assert ops.choose_num_splits(256, 8, 1024, sms) == 1
    assert ops.choose_num_splits(64, 8, 4096, sms) == 1
    assert ops.choose_num_splits(32, 8, 16384, sms) == 4
    # Never chunks shorter than MIN_TOKENS_PER_SPLIT, never more than MAX_SPLITS.
    assert ops.choose_num_splits(1, 1, 300, sms) == 1
    assert ops.choose_num_splits(1, 1, 10**7, sms) == ops.decode.MAX_SPLITS
    # Non-increasing in the batch: a graph workspace sized for batch 1 fits every bucket.
    counts = [ops.choose_num_splits(b, 8, 8192, sms) for b in range(1, 300)]
    assert all(a >= b for a, b in itertools.pairwise(counts))


def test_selector(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert get_attention_backend("cpu").name == "torch"
    assert get_attention_backend("cpu", "triton").name == "triton"
    assert get_attention_backend("cuda", "torch").name == "torch"
    with pytest.raises(ValueError, match="name"):
        get_attention_backend("cpu", "flash")
    # CUDA without a working triton: warn and fall back; forcing it is an error.
    monkeypatch.setitem(sys.modules, "pagedattn.attention.triton_backend", None)
    with caplog.at_level("WARNING"):
        assert get_attention_backend("cuda").name == "torch"
    assert "triton is unavailable" in caplog.text
    with pytest.raises(ImportError, match="triton"):
        get_attention_backend("cuda", "triton")


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("gqa", "window", "dtype"),
                         [(2, None, torch.bfloat16), (8, None, torch.float16), (4, 1000, torch.bfloat16),
                          (1, None, torch.float32)])
def test_gpu_long_context_decode_and_extend(gqa: int, window: int | None, dtype: torch.dtype) -> None:
    """Real sizes: head_dim 128, pages of 16, contexts to 5000 (automatic split counts)."""
    g = _gen("gpu-long", gqa, window, dtype)
    hkv, d, bs = 8, 128, 16
    query_lens = [1] * 6 + [300, 1, 77]
    seq_lens = [1, 15, 17, 2049, 4999, 300, 300, 3000, 4100]
    cached = [s - q for q, s in zip(query_lens, seq_lens, strict=True)]
    batch = _paged_batch(g, query_lens, seq_lens, bs, hkv, d, dtype, window, cached_upto=cached)
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5, window)
    t = sum(query_lens)
    q = randn(g, t, hkv * gqa, d, dtype=dtype)
    k, v = randn(g, 2, t, hkv, d, dtype=dtype)
    ref_k, ref_v = batch.clean()
    ref = TorchReferenceBackend().forward(q, k, v, ref_k, ref_v, batch.meta, layer)
    out = TritonBackend().forward(q, k, v, batch.k_cache, batch.v_cache, batch.meta, layer)
    _assert_matches(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_cuda_graph_capture_and_replay_with_new_metadata() -> None:
    g = _gen("gpu-graph")
    hkv, d, bs, gqa, bucket, dtype = 8, 128, 16, 2, 4, torch.bfloat16
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5)
    max_blocks = 256
    n_blocks = 2 * bucket * max_blocks
    k_cache = randn(g, n_blocks, bs, hkv, d, dtype=dtype)
    v_cache = randn(g, n_blocks, bs, hkv, d, dtype=dtype)
    # Static metadata tensors the graph reads; replays copy new values into them.
    static = AttentionMetadata.build([1] * bucket, [1] * bucket, [[0]] * bucket, bs, device=DEVICE,
                                     pad_blocks_to=max_blocks)
    q_static = torch.zeros(bucket, hkv * gqa, d, dtype=dtype, device=DEVICE)
    backend = TritonBackend()
    backend.init_cuda_graphs(bucket, max_blocks * bs, bs, layer, DEVICE)
    backend.prepare_for_capture(static, 0)
    backend.attend(q_static, k_cache, v_cache, static, layer)  # warm-up compiles outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = backend.attend(q_static, k_cache, v_cache, static, layer)

    for step in range(3):
        # The last row is padding (seq_len 0).
        lens = [*torch.randint(1, max_blocks * bs, (bucket - 1,), generator=g).tolist(), 0]
        tables = [torch.randperm(n_blocks, generator=g)[:max_blocks].tolist() for _ in range(bucket)]
        live = AttentionMetadata.build([1] * (bucket - 1), lens[:-1], tables[:-1], bs, device=DEVICE,
                                       pad_blocks_to=max_blocks)
        static.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        static.block_tables.copy_(torch.tensor(tables, dtype=torch.int32))
        q = randn(g, bucket, hkv * gqa, d, dtype=dtype)
        q_static.copy_(q)
        graph.replay()
        ref = paged_attention_ref(q[:-1], k_cache, v_cache, live.block_tables, live.query_lens_cpu,
                                  live.seq_lens_cpu, layer.scale)
        _assert_matches(out_static[:-1], ref)
        assert torch.equal(out_static[-1], torch.zeros_like(out_static[-1])), f"step {step}: padding row"
