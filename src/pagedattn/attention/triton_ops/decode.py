"""Paged decode attention (one query per sequence), GQA-aware, with split-KV (flash-decoding).

A program handles one (sequence, KV head, split): the ``G = Hq / Hkv`` query heads sharing
that KV head form the M dimension of a ``tl.dot`` (padded to 16 rows), so every K/V row is
read from memory once for all of them.  K/V rows are addressed straight through the block
table, one page lookup per key row, so any power-of-two page size works (a 64-key tile spans
four 16-token pages or sixty-four 1-token pages) and nothing is gathered into a contiguous copy.

The grid runs a sequence's KV heads side by side and takes the sequences in the order
``order`` gives (the backend passes longest first): the GPU starts programs in grid order, so
when the rows' lengths differ the long ones start first and the short ones fill in at the end,
instead of a long one starting last and running alone.

With ``num_splits > 1`` each sequence's key range is cut into that many tile-aligned chunks;
each program writes a normalised partial output and its log-sum-exp (base 2) to fp32
intermediates, and a second kernel merges the splits.  Splits keep the GPU busy when
``batch * Hkv`` programs alone would not fill it (small batches, long contexts).

Cascade decode (``cascade=``): rows sharing prefix blocks get their prefix attended by the
shared-prefix kernel (``cascade.py``), which writes partials into further workspace slots; the
decode kernel then starts each row at its own tail (``TailStart``) and, unsplit, folds the
row's prefix partials into its result itself (split, the merge kernel takes them with the
splits' partials).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from .cascade import CascadeInputs, PrefixConfig, prefix_attention
from .common import (
    as_operand,
    attend_paged_keys,
    dot_dtype,
    dot_precision,
    fp8_kv_scales,
    kv_scale_args,
    operand_dtype,
    score_args,
)

# Upper bound on splits (the eager workspace's size; the merge takes any number, a tile at a time).
MAX_SPLITS = 64
# Do not cut a context into chunks shorter than this: below it the per-split fixed cost
# (Q load, partial write, merge) outweighs the gain in parallelism.
MIN_TOKENS_PER_SPLIT = 256
# Batches with at least this many (sequence, KV head) programs per SM are not split: on an
# H200 512 programs (3.9 per SM) already stream at 96-98% of copy bandwidth, and splitting
# them only adds partial writes and a merge.
NO_SPLIT_PROGRAMS_PER_SM = 2
# Otherwise aim for this many programs per SM, rounded up to a power-of-two split count:
# a count that leaves the last wave part-filled is slow (32 x 16384 on an H200: 2 splits
# 505 us, 3 splits 575 us, 4 splits 507 us).
TARGET_PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    num_stages: int = 3  # 2 is up to 6% slower on split launches; 4 measured the same as 3


def default_decode_config(dtype: torch.dtype, head_dim: int, cache_dtype: torch.dtype | None = None
                          ) -> DecodeConfig:
    """Tiles for K/V computed in ``dtype`` from pages of ``cache_dtype`` (default: the same)."""
    # fp32 tiles take twice the shared memory: halve the tile.
    if dtype == torch.float32 or head_dim > 128:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=2)
    if cache_dtype == torch.float8_e4m3fn:
        # An e4m3 tile is half the bytes: twice the keys keep as many bytes in flight.  Measured
        # on an H100 (B32/L16384, docs/benchmarks.md#fp8-kv-cache): 552 -> 482-491 us.
        return DecodeConfig(block_n=128, num_warps=4, num_stages=2)
    return DecodeConfig()


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int,
                      max_splits: int = MAX_SPLITS) -> int:
    """Splits per sequence so that ``num_seqs * Hkv * splits`` programs fill the GPU.

    Non-increasing in ``num_seqs`` (a CUDA-graph workspace sized for batch 1 fits every
    bucket).  Never chunks shorter than MIN_TOKENS_PER_SPLIT keys.
    """
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= NO_SPLIT_PROGRAMS_PER_SM * num_sms:
        return 1
    want = triton.next_power_of_2(-(-TARGET_PROGRAMS_PER_SM * num_sms // programs))
    cap = max(1, max_context // MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, cap, max_splits))


# Launch values that change from step to step are plain runtime arguments: Triton specialises an
# int argument on being 1 or a multiple of 16 (and a pointer on 16-byte alignment), so each
# new combination of, say, split count, block-table width and workspace strides would be a new
# compile on the request path.  Only what a model and its configuration fix stays specialised
# (head sizes, page size, the cache's strides) or constexpr.
_STEP_VARYING = ("num_splits", "pre_offset", "stride_mt", "stride_mh", "stride_lt", "stride_lh", "stride_bt")


@triton.jit(do_not_specialize=_STEP_VARYING, do_not_specialize_on_alignment=("TailStart", "NumPre", "Order"))
def _decode_kernel(
    Q, K, V, Out, MidO, MidLse, BlockTables, SeqLens,
    Order,  # ORDERED only: the sequences in the order their programs start
    TailStart, NumPre,  # cascade only: first own key of each row, prefix partials it merges
    KScale, VScale,  # KV_FP8 only: the layer's K and V scales
    scale_log2,  # softmax scale * log2(e): scores live in the base-2 domain
    softcap,  # attention-logit soft-cap (SOFTCAP only)
    num_splits,
    pre_offset,  # cascade only: slot of a row's first prefix partial
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_mt, stride_mh, stride_ms,
    stride_lt, stride_lh,
    stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,  # 0: no sliding window
    SOFTCAP: tl.constexpr,  # soft-cap the scores: cap * tanh(score / cap)
    SPLIT: tl.constexpr,  # write fp32 partials instead of the final output
    CASCADE: tl.constexpr,  # attend keys from TailStart on; unsplit, also merge the prefix partials
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,  # tl.dot operand type and fp32 precision
    KV_FP8: tl.constexpr,  # e4m3 pages: dequantized with KScale / VScale
    ORDERED: tl.constexpr,  # take the sequences in Order's order (else batch order)
):
    # Grid (sequences x KV heads, splits): a sequence's heads are neighbours.
    rank = tl.program_id(0) // NUM_KV_HEADS
    kvh = tl.program_id(0) % NUM_KV_HEADS
    split = tl.program_id(1)
    seq = tl.load(Order + rank) if ORDERED else rank
    scale_log2, v_scale = fp8_kv_scales(scale_log2, KScale, VScale, KV_FP8)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    # Column masks only where head_dim is not a power of two, so full rows stay vectorised.
    hd_mask = h_mask[:, None] if BLOCK_D == HEAD_DIM else h_mask[:, None] & (offs_d[None, :] < HEAD_DIM)

    # Q tile [BLOCK_H, D]: the group's heads, padded rows are zeros (finite scores, never stored).
    q = as_operand(tl.load(Q + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                           mask=hd_mask, other=0.0), DOT_DTYPE)

    # Key range of this split.  With a window the query at p = seq_len - 1 sees p-W+1 .. p.
    seq_len = tl.load(SeqLens + seq)
    lo_all = tl.maximum(seq_len - WINDOW, 0) if WINDOW > 0 else 0
    if CASCADE:  # keys before TailStart are the group's shared prefix, attended by the prefix kernel
        lo_all = tl.maximum(lo_all, tl.load(TailStart + seq))
    per_split = tl.cdiv(tl.cdiv(seq_len - lo_all, num_splits), BLOCK_N) * BLOCK_N
    lo = lo_all + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    m_i, l_i, acc = attend_paged_keys(
        q, K + kvh * stride_kh, V + kvh * stride_vh, BlockTables + seq.to(tl.int64) * stride_bt, lo, hi, offs_d,
        scale_log2, softcap, stride_kb, stride_kt, stride_vb, stride_vt,
        BLOCK_H, PAGE, BLOCK_N, BLOCK_D, HEAD_DIM, SOFTCAP, DOT_DTYPE, DOT_PRECISION)
    if KV_FP8:  # before the prefix partials join: theirs are already scaled
        acc = acc * v_scale

    if CASCADE and not SPLIT:
        # Fold in the prefix partials (written by the prefix kernel, launched first) by their
        # log-sum-exp: acc and l are scaled by 2^-m, partial s is o_s with weight 2^lse_s.
        pre = MidO + seq.to(tl.int64) * stride_mt + heads[:, None] * stride_mh + offs_d[None, :]
        pre_lse = MidLse + seq.to(tl.int64) * stride_lt + heads * stride_lh
        for s_idx in range(pre_offset, pre_offset + tl.load(NumPre + seq)):
            lse_s = tl.load(pre_lse + s_idx, mask=h_mask, other=float("-inf"))
            o_s = tl.load(pre + s_idx * stride_ms, mask=hd_mask, other=0.0)
            m_new = tl.maximum(m_i, lse_s)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty: keep weights 0, not NaN
            alpha = tl.exp2(m_i - m_new)
            beta = tl.exp2(lse_s - m_new)
            acc = acc * alpha[:, None] + o_s * beta[:, None]
            l_i = l_i * alpha + beta
            m_i = tl.maximum(m_i, lse_s)

    # Empty ranges (seq_len 0 padding, or a split past the end) give l = 0: output zeros.
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLIT:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        mid = MidO + seq.to(tl.int64) * stride_mt + heads[:, None] * stride_mh + split * stride_ms
        tl.store(mid + offs_d[None, :], o, mask=hd_mask)
        tl.store(MidLse + seq.to(tl.int64) * stride_lt + heads * stride_lh + split, lse, mask=h_mask)
    else:
        dst = Out + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, o.to(Out.dtype.element_ty), mask=hd_mask)


# Partials merged per tile (splits, then prefix partials); more take more turns of the loop,
# so the merge is one compile whatever a step's split count.
MERGE_TILE = 16


@triton.jit
def _merge_tile(lse_ptrs, o_ptrs, mask, d_mask, m, total, o):
    """Fold one tile of partials (their base-2 log-sum-exps and normalised outputs) into the
    running ``(max, weight sum, weighted output)``."""
    lse = tl.load(lse_ptrs, mask=mask, other=float("-inf"))
    parts = tl.load(o_ptrs, mask=mask[:, None] & d_mask[None, :], other=0.0)
    m_new = tl.maximum(m, tl.max(lse, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: weights stay 0, not NaN
    alpha = tl.exp2(m - m_safe)
    w = tl.exp2(lse - m_safe)
    return m_new, total * alpha + tl.sum(w, 0), o * alpha + tl.sum(parts * w[:, None], 0)


@triton.jit(do_not_specialize=("num_splits", "pre_offset", "stride_mt", "stride_mh", "stride_lt", "stride_lh"),
            do_not_specialize_on_alignment=("NumPre",))
def _merge_splits_kernel(
    MidO, MidLse, Out, NumPre, num_splits, pre_offset,
    stride_mt, stride_mh, stride_ms,
    stride_lt, stride_lh,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    CASCADE: tl.constexpr,  # also merge NumPre[seq] prefix partials from slot pre_offset on
):
    # One program per (sequence, query head): weight each partial by exp2(lse_s - max lse),
    # BLOCK_S partials at a time with a running max.
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse_row = MidLse + seq * stride_lt + head * stride_lh
    mid_row = MidO + seq * stride_mt + head * stride_mh + offs_d[None, :]
    m = tl.full([], float("-inf"), dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    o = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        m, total, o = _merge_tile(lse_row + s, mid_row + s[:, None] * stride_ms, s < num_splits, d_mask, m, total, o)
    if CASCADE:
        num_pre = tl.load(NumPre + seq)
        for p0 in range(0, num_pre, BLOCK_S):
            p = p0 + offs_s
            s = pre_offset + p
            m, total, o = _merge_tile(lse_row + s, mid_row + s[:, None] * stride_ms, p < num_pre, d_mask, m, total, o)
    o = o / tl.where(total > 0, total, 1.0)
    tl.store(Out + seq * stride_ot + head * stride_oh + offs_d, o.to(Out.dtype.element_ty), mask=d_mask)


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]: one query per sequence
    k_cache: torch.Tensor,  # [N, page, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context incl. the query token (0 = padding, output zeros)
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,  # [B, Hq, D]
    num_splits: int,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: DecodeConfig | None = None,
    cascade: CascadeInputs | None = None,
    prefix_config: PrefixConfig | None = None,
    softcap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> None:
    """Launch the decode kernel (and the merge kernel when ``num_splits > 1``).

    ``order`` (int32, a permutation of the ``B`` rows, e.g. :func:`longest_first`): the order in
    which the rows' programs start; None: batch order.  The results do not depend on it.

    An fp8 (e4m3) cache is read as ``page * k_scale`` / ``page * v_scale`` (one-element
    float32 device tensors; None: 1.0), in the shared-prefix kernel too.

    ``softcap``: attention-logit soft-capping (each scaled score ``s`` becomes ``softcap *
    tanh(s / softcap)``), in the shared-prefix kernel too; None compiles the kernels without it.

    ``workspace`` = ``(mid_o [>=B, Hq, >=S, D], mid_lse [>=B, Hq, >=S])`` fp32 buffers for the
    partials; allocated here when not given (CUDA-graph capture passes preallocated ones).
    With ``cascade`` (no sliding window), the shared-prefix kernel runs first and writes each
    grouped row's prefix partials to slots ``cascade_slot_offset(num_splits)`` on; the decode
    kernel attends each row's keys from ``cascade.tail_start`` on and merges those partials
    itself (unsplit) or leaves them to the merge kernel; S must then be at least
    ``cascade_slots(num_splits, cascade.max_parts)``.
    """
    b, hq, d = q.shape
    if b == 0:
        return
    _, page, hkv, _ = k_cache.shape
    group = hq // hkv
    kv_dtype = operand_dtype(k_cache.dtype, q.dtype)
    cfg = config or default_decode_config(kv_dtype, d, k_cache.dtype)
    if cascade is not None and sliding_window is not None:
        raise ValueError("cascade decode does not support sliding_window layers")
    split = num_splits > 1
    slots = num_splits if cascade is None else cascade_slots(num_splits, cascade.max_parts)
    if split or cascade is not None:
        if workspace is None:
            workspace = (torch.empty(b, hq, slots, d, dtype=torch.float32, device=q.device),
                         torch.empty(b, hq, slots, dtype=torch.float32, device=q.device))
        mid_o, mid_lse = workspace
        if mid_o.shape[2] < slots or mid_lse.shape[2] < slots:
            raise ValueError(f"workspace holds {mid_o.shape[2]} slots per head, {slots} needed")
    else:
        mid_o, mid_lse = out, out  # unused: SPLIT is off; any tensor with 3 strides will do
    pre_offset = cascade_slot_offset(num_splits)
    if cascade is not None:
        prefix_attention(q, k_cache, v_cache, block_tables, scale, cascade, mid_o, mid_lse, pre_offset,
                         prefix_config, softcap=softcap, k_scale=k_scale, v_scale=v_scale)
        tail_start, num_pre = cascade.tail_start, cascade.num_prefix_parts
    else:
        tail_start, num_pre = seq_lens, seq_lens  # unused: CASCADE is off
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16
    k_sc, v_sc, fp8 = kv_scale_args(k_cache, q, k_scale, v_scale)
    _decode_kernel[(b * hkv, num_splits)](
        q, k_cache, v_cache, out, mid_o, mid_lse, block_tables, seq_lens, seq_lens if order is None else order,
        tail_start, num_pre, k_sc, v_sc,
        *score_args(scale, softcap), num_splits, pre_offset,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        block_tables.stride(0),
        HEAD_DIM=d, BLOCK_D=block_d,
        NUM_KV_HEADS=hkv, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        PAGE=page, BLOCK_N=cfg.block_n,
        WINDOW=sliding_window or 0, SOFTCAP=softcap is not None, SPLIT=split, CASCADE=cascade is not None,
        DOT_DTYPE=dot_dtype(kv_dtype), DOT_PRECISION=dot_precision(kv_dtype), KV_FP8=fp8, ORDERED=order is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        _merge_splits_kernel[(b, hq)](
            mid_o, mid_lse, out, num_pre, num_splits, pre_offset,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=MERGE_TILE, CASCADE=cascade is not None,
            num_warps=4,
        )


def cascade_slot_offset(num_splits: int) -> int:
    """Workspace slot of a row's first prefix partial: after the splits' partials, or slot 0
    when the decode is unsplit (it writes no partials then)."""
    return num_splits if num_splits > 1 else 0


def cascade_slots(num_splits: int, max_parts: int) -> int:
    """Workspace slots per head a cascade decode with ``num_splits`` splits needs."""
    return cascade_slot_offset(num_splits) + max_parts


def longest_first(keys: np.ndarray, rows: int | None = None) -> np.ndarray:
    """The order (int32) in which to start ``keys``' rows, each row's count of keys its decode
    program attends: the most first (ties in batch order), then ``rows - len(keys)`` padding
    rows (batch order), so the kernel's end never waits on a long row that started last.  The
    kernel alone measured the same in either order on mixed-length batches (its programs share
    the bandwidth: the last few stream faster); the engine with it gained 4.4% on nano-vllm's
    workload (docs/kernel_notes.md, "Rows of different lengths: longest first")."""
    n = keys.shape[0]
    order = np.arange(n if rows is None else rows, dtype=np.int32)
    order[:n] = np.argsort(-np.asarray(keys, dtype=np.int64), kind="stable")
    return order
