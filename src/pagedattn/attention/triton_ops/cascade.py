"""Shared-prefix attention of cascade decode: a group's decode queries against its common prefix.

The rows of a group share their first blocks.  Instead of every row's decode program reading
those keys, one program per (work item, KV head) reads a chunk of them once for a tile of
``BLOCK_M`` (row, query head) pairs of the group: the M dimension of its ``tl.dot`` is rows x
GQA heads, N the chunk's keys.  No causal mask is needed: every prefix key precedes every
query of the group.  Each program writes, for each of its pairs, the normalised partial output
and its log-sum-exp (base 2) into a slot of the decode workspace; the decode kernel (or the
split merge) folds those slots into the row's result with its own tail.

The work list (see ``attention/cascade.py``) is built on the host and lives in a device tensor,
so the launch grid is fixed (``(work items, Hkv)``, as a CUDA graph needs): items with zero
pairs do no work and store nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..cascade import WORK_WIDTH
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


@dataclass(frozen=True)
class PrefixConfig:
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    num_stages: int = 3


def default_prefix_config(dtype: torch.dtype, head_dim: int) -> PrefixConfig:
    # fp32 (or wide heads) tiles take twice the shared memory: halve the key tile.
    if dtype == torch.float32 or head_dim > 128:
        return PrefixConfig(block_n=32, num_warps=4, num_stages=2)
    return PrefixConfig()


@dataclass(frozen=True)
class CascadeInputs:
    """Device-side cascade metadata of a decode step (int32 views of one packed buffer)."""

    tail_start: torch.Tensor  # [>=B]: first key each row attends itself (0: the whole context)
    num_prefix_parts: torch.Tensor  # [>=B]: prefix partials each row merges (0: ungrouped)
    members: torch.Tensor  # [>=B]: the groups' rows, group after group
    work: torch.Tensor  # [W, WORK_WIDTH]: the prefix kernel's work items
    max_parts: int  # bound on num_prefix_parts: workspace slots and the merge's tile
    block_m: int  # (row, head) pairs per work item, as the host planned them

    def __post_init__(self) -> None:
        for name in ("tail_start", "num_prefix_parts", "members", "work"):
            t = getattr(self, name)
            if t.dtype != torch.int32:
                raise ValueError(f"{name} must be int32, got {t.dtype}")
        if self.work.dim() != 2 or self.work.shape[1] != WORK_WIDTH or self.work.stride(1) != 1:
            raise ValueError(f"work must be [W, {WORK_WIDTH}] contiguous rows, got {tuple(self.work.shape)}")
        if self.max_parts < 1:
            raise ValueError(f"max_parts must be >= 1, got {self.max_parts}")


# Step-varying launch values stay unspecialised (see decode.py): the workspace's strides, the
# slot offset (the step's split count), the block table's width, and the packed plan's views,
# whose offsets follow the step's row count.
@triton.jit(do_not_specialize=("slot_offset", "stride_mt", "stride_mh", "stride_lt", "stride_lh", "stride_bt"),
            do_not_specialize_on_alignment=("Members", "Work"))
def _prefix_kernel(
    Q, K, V, MidO, MidLse, BlockTables, Members, Work, KScale, VScale,
    scale_log2, softcap, slot_offset,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_mt, stride_mh, stride_ms,
    stride_lt, stride_lh,
    stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, WORK_W: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,  # e4m3 pages: dequantized with KScale / VScale
):
    item = Work + tl.program_id(0) * WORK_W
    scale_log2, v_scale = fp8_kv_scales(scale_log2, KScale, VScale, KV_FP8)
    kvh = tl.program_id(1)
    rep_row = tl.load(item + 0)  # whose block table names the shared blocks
    member_start = tl.load(item + 1)
    num_pairs = tl.load(item + 2)  # 0: an unused item, every mask below is empty
    pair_start = tl.load(item + 3)
    lo = tl.load(item + 4)
    hi = tl.load(item + 5)
    slot = tl.load(item + 6) + slot_offset

    # Pair p of the group is (member p // GROUP, query head kvh * GROUP + p % GROUP).
    offs_m = pair_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < num_pairs
    offs_d = tl.arange(0, BLOCK_D)
    row = tl.load(Members + member_start + offs_m // GROUP, mask=m_mask, other=0).to(tl.int64)
    head = kvh * GROUP + offs_m % GROUP
    md_mask = m_mask[:, None] if BLOCK_D == HEAD_DIM else m_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = as_operand(tl.load(Q + row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                           mask=md_mask, other=0.0), DOT_DTYPE)

    m_i, l_i, acc = attend_paged_keys(
        q, K + kvh * stride_kh, V + kvh * stride_vh, BlockTables + rep_row.to(tl.int64) * stride_bt, lo, hi, offs_d,
        scale_log2, softcap, stride_kb, stride_kt, stride_vb, stride_vt,
        BLOCK_M, PAGE, BLOCK_N, BLOCK_D, HEAD_DIM, SOFTCAP, DOT_DTYPE, DOT_PRECISION)
    if KV_FP8:
        acc = acc * v_scale

    # The host never plans an empty chunk; an unused item stores nothing (m_mask is empty).
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    mid = MidO + row[:, None] * stride_mt + head[:, None] * stride_mh + slot * stride_ms + offs_d[None, :]
    tl.store(mid, o, mask=md_mask)
    tl.store(MidLse + row * stride_lt + head * stride_lh + slot, lse, mask=m_mask)


def prefix_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [N, page, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    cascade: CascadeInputs,
    mid_o: torch.Tensor,  # [B, Hq, S, D] fp32
    mid_lse: torch.Tensor,  # [B, Hq, S] fp32
    slot_offset: int,  # prefix chunk c of a row goes to slot slot_offset + c
    config: PrefixConfig | None = None,
    softcap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Launch the shared-prefix kernel over every work item (unused ones exit at once);
    ``softcap`` soft-caps the scores and an fp8 cache is dequantized with ``k_scale`` /
    ``v_scale`` as the decode kernel does."""
    _, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    kv_dtype = operand_dtype(k_cache.dtype, q.dtype)
    cfg = config or default_prefix_config(kv_dtype, d)
    items = cascade.work.shape[0]
    if items == 0:
        return
    k_sc, v_sc, fp8 = kv_scale_args(k_cache, q, k_scale, v_scale)
    _prefix_kernel[(items, hkv)](
        q, k_cache, v_cache, mid_o, mid_lse, block_tables, cascade.members, cascade.work, k_sc, v_sc,
        *score_args(scale, softcap), slot_offset,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        block_tables.stride(0),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), GROUP=hq // hkv,
        BLOCK_M=cascade.block_m, PAGE=page, BLOCK_N=cfg.block_n, WORK_W=WORK_WIDTH, SOFTCAP=softcap is not None,
        DOT_DTYPE=dot_dtype(kv_dtype), DOT_PRECISION=dot_precision(kv_dtype), KV_FP8=fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
