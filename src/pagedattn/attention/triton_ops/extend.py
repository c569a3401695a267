"""Paged prefill/extend attention: ragged new tokens attend causally to their paged context.

Each sequence's new tokens are the last ``query_len`` of its ``seq_len`` tokens, and their K/V
are already in the pages (the store kernel ran first), so one loop over the block table
covers both the cached prefix and the new tokens.  This serves plain prefill (prefix 0),
chunked prefill and prefix-cache hits alike.

A program handles ``BLOCK_M`` consecutive new tokens of one sequence for one query head.
The grid's second axis is sized from the host-side longest query, so launching never reads
device memory; programs past their sequence's end do no work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (
    as_operand,
    dot_dtype,
    dot_precision,
    fp8_kv_scales,
    kv_scale_args,
    operand_dtype,
    paged_kv_rows,
    score_args,
    scores_log2,
)


@dataclass(frozen=True)
class ExtendConfig:
    block_m: int = 64  # query tokens per program
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    num_stages: int = 2


def default_extend_config(dtype: torch.dtype, head_dim: int) -> ExtendConfig:
    if dtype == torch.float32 or head_dim > 128:
        return ExtendConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    return ExtendConfig()


# The first sequence's index (the step's decode count) and the block table's width change from
# step to step: unspecialised, so one compile serves every step (see decode.py).
@triton.jit(do_not_specialize=("seq_offset", "stride_bt"))
def _extend_kernel(
    Q, K, V, Out, BlockTables, SeqLens, QueryStartLoc,
    KScale, VScale,  # KV_FP8 only: the layer's K and V scales
    scale_log2,
    softcap,  # attention-logit soft-cap (SOFTCAP only)
    seq_offset,  # index of the first sequence this launch covers (after the decodes)
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,  # soft-cap the scores: cap * tanh(score / cap)
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,  # tl.dot operand type and fp32 precision
    KV_FP8: tl.constexpr,  # e4m3 pages: dequantized with KScale / VScale
):
    seq = tl.program_id(0) + seq_offset
    scale_log2, v_scale = fp8_kv_scales(scale_log2, KScale, VScale, KV_FP8)
    m_blk = tl.program_id(1)
    head = tl.program_id(2)
    kvh = head // GROUP

    q_start = tl.load(QueryStartLoc + seq)
    q_len = tl.load(QueryStartLoc + seq + 1) - q_start
    seq_len = tl.load(SeqLens + seq)
    ctx = seq_len - q_len  # cached prefix length

    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    pos = ctx + offs_m  # absolute position of each query token

    tok = (q_start + offs_m).to(tl.int64)
    q = as_operand(tl.load(Q + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                           mask=m_mask[:, None] & d_mask[None, :], other=0.0), DOT_DTYPE)

    # Keys this tile of queries can see: causal up to its last row, window from its first.
    hi = tl.minimum(seq_len, ctx + (m_blk + 1) * BLOCK_M)
    lo = tl.maximum(ctx + m_blk * BLOCK_M - WINDOW + 1, 0) if WINDOW > 0 else 0
    hi = tl.where(m_blk * BLOCK_M < q_len, hi, lo)  # programs past the sequence's end: no work

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = BlockTables + seq.to(tl.int64) * stride_bt
    k_head = K + kvh * stride_kh
    v_head = V + kvh * stride_vh
    for start in range(lo, hi, BLOCK_N):
        offs = start + offs_n
        n_mask = offs < hi
        k_rows, v_rows = paged_kv_rows(bt_row, offs, n_mask, PAGE, stride_kb, stride_kt, stride_vb, stride_vt)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        visible = n_mask[None, :] & (offs[None, :] <= pos[:, None])
        if WINDOW > 0:
            visible &= (pos[:, None] - offs[None, :]) < WINDOW
        s = tl.where(visible, scores_log2(s, scale_log2, softcap, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may see nothing in this tile (window edge) and nothing before: keep it finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    if KV_FP8:
        acc = acc * v_scale
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dst = Out + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(dst, o.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def extend_attention(
    q: torch.Tensor,  # [T, Hq, D]: all of the step's tokens (decodes included)
    k_cache: torch.Tensor,  # [N, page, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B+1] int32
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,  # [T, Hq, D]
    seq_offset: int,
    num_seqs: int,
    max_query_len: int,
    config: ExtendConfig | None = None,
    softcap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Attention for sequences ``seq_offset .. seq_offset + num_seqs - 1`` of the batch.

    ``max_query_len`` (their longest new-token count, from host-side metadata) sizes the grid.
    ``softcap``: attention-logit soft-capping (None compiles the kernel without it).  An fp8
    (e4m3) cache is read as ``page * k_scale`` / ``page * v_scale`` (None: 1.0).
    """
    if num_seqs == 0:
        return
    _, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    kv_dtype = operand_dtype(k_cache.dtype, q.dtype)
    cfg = config or default_extend_config(kv_dtype, d)
    k_sc, v_sc, fp8 = kv_scale_args(k_cache, q, k_scale, v_scale)
    grid = (num_seqs, triton.cdiv(max_query_len, cfg.block_m), hq)
    _extend_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, k_sc, v_sc,
        *score_args(scale, softcap), seq_offset,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), GROUP=hq // hkv,
        PAGE=page, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        WINDOW=sliding_window or 0, SOFTCAP=softcap is not None,
        DOT_DTYPE=dot_dtype(kv_dtype), DOT_PRECISION=dot_precision(kv_dtype), KV_FP8=fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
