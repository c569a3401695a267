"""Constants and small helpers shared by the attention kernels and their launchers.

The ``@triton.jit`` helpers here are inlined into each kernel that calls them, so sharing them
costs nothing at run time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...envs import triton_interpreted

# Scores are kept in the base-2 domain (exp2 is one instruction): scale * log2(e).
LOG2E = 1.4426950408889634
LOG2E_CONST: tl.constexpr = tl.constexpr(LOG2E)  # the same inside kernels


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def interpreting() -> bool:
    """Whether kernels run under the Triton interpreter (``TRITON_INTERPRET`` set)."""
    return triton_interpreted()


def operand_dtype(cache_dtype: torch.dtype, q_dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute K and V in: the cache's dtype; for an fp8 cache float16 under
    16-bit queries (float32 ones stay float32).  Every e4m3 value is exact in float16, and
    e4m3 -> float16 is one conversion instruction per two values on the GPU where -> bfloat16
    goes through float32; the queries lose nothing either (float16 has the finer mantissa;
    :func:`as_operand` clamps the range) and the probabilities gain precision."""
    if cache_dtype != torch.float8_e4m3fn:
        return cache_dtype
    return torch.float32 if q_dtype == torch.float32 else torch.float16


@triton.jit
def as_operand(x, DOT_DTYPE: tl.constexpr):
    """A query tile as a ``tl.dot`` operand: float16 saturates at its largest finite value
    instead of turning a large bfloat16 query into inf."""
    if tl.float16 == DOT_DTYPE:
        return tl.clamp(x.to(tl.float32), -65504.0, 65504.0).to(DOT_DTYPE)
    return x.to(DOT_DTYPE)


def kv_scale_args(k_cache: torch.Tensor, q: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(KScale, VScale, KV_FP8)`` of a launch: an fp8 cache's scales (None: 1.0, a fresh
    device tensor), else any tensor (the kernels' ``KV_FP8`` constexpr compiles the loads out)."""
    if k_cache.dtype != torch.float8_e4m3fn:
        return q, q, False
    if k_scale is None or v_scale is None:
        one = torch.ones(1, device=q.device)
        k_scale, v_scale = (one if k_scale is None else k_scale), (one if v_scale is None else v_scale)
    return k_scale, v_scale, True


def dot_dtype(cache_dtype: torch.dtype) -> tl.dtype:
    """Operand type of the kernels' ``tl.dot``: the cache dtype, except bf16 under the
    interpreter, whose bf16 dot returns garbage (triton 3.9): there operands go up to fp32."""
    if cache_dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPES[cache_dtype]


def dot_precision(cache_dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact for fp32 operands (tf32 would cost ~3e-4 relative
    error), the default otherwise (ignored for 16-bit operands)."""
    return "ieee" if dot_dtype(cache_dtype) == tl.float32 else "tf32"


@triton.jit
def fp8_kv_scales(scale_log2, KScale, VScale, KV_FP8: tl.constexpr):
    """An fp8 cache's pages hold ``k / k_scale`` and ``v / v_scale``: the K scale folds into the
    score scale (``q . (page * s) = (q . page) * s``) and the returned V scale multiplies the
    unnormalised output once (``sum p (page * s) = s * sum p page``), so tiles are dequantized
    by the upcast alone.  Returns ``(scale_log2, v_scale)``; other caches: unchanged and 1."""
    v_scale = 1.0
    if KV_FP8:
        scale_log2 = scale_log2 * tl.load(KScale)
        v_scale = tl.load(VScale)
    return scale_log2, v_scale


def score_args(scale: float, softcap: float | None) -> tuple[float, float]:
    """The score arguments every attention kernel takes, ``(scale_log2, softcap)``: the softmax
    scale in the base-2 domain, and the soft-cap (0.0 when off; the kernel's ``SOFTCAP``
    constexpr, ``softcap is not None``, then compiles it out, so kernels without soft-capping
    are exactly what they were)."""
    return scale * LOG2E, float(softcap or 0.0)


@triton.jit
def scores_log2(s, scale_log2, softcap, SOFTCAP: tl.constexpr):
    """Raw dot products ``s`` -> base-2 scores: ``s * scale * log2(e)``, or with ``SOFTCAP``
    ``cap * tanh(s * scale / cap) * log2(e)``.  tanh is written with exp2 (no libdevice, so the
    interpreter runs it too): ``tanh(|x|) = (1 - e) / (1 + e)`` with ``e = exp(-2 |x|)``, which
    never overflows."""
    y = s * scale_log2
    if SOFTCAP:
        # y / cap = x * log2(e) with x = s * scale / cap, so exp2(-2 |y| / cap) = exp(-2 |x|).
        e = tl.exp2(tl.abs(y) * (-2.0 / softcap))
        t = (1.0 - e) / (1.0 + e)
        y = tl.where(y < 0, -t, t) * (softcap * LOG2E_CONST)
    return y


@triton.jit
def paged_kv_rows(bt_row, offs, n_mask, PAGE: tl.constexpr, stride_kb, stride_kt, stride_vb, stride_vt):
    """Element offsets of key rows ``offs`` (``[BLOCK_N]`` positions of one sequence) in the K
    and V caches: one page lookup per row through the block-table row ``bt_row`` (repeats hit
    L1), so a tile may span several pages of any power-of-two size."""
    page = tl.load(bt_row + offs // PAGE, mask=n_mask, other=0).to(tl.int64)
    in_page = offs % PAGE
    return page * stride_kb + in_page * stride_kt, page * stride_vb + in_page * stride_vt


@triton.jit
def attend_kv_tile(q, k_ptrs, v_ptrs, kv_mask, n_mask, m_i, l_i, acc, scale_log2, softcap,
                   SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step (base 2) of queries ``q [M, D]`` over a key tile whose valid
    columns are ``n_mask``, all of them visible to every query row (decode and shared-prefix
    tiles: no causal edge).  Every tile holds >= 1 valid key, so the new max is finite.
    Returns the updated ``(m, l, acc)``."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    s = tl.where(n_mask[None, :], scores_log2(s, scale_log2, softcap, SOFTCAP), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def attend_paged_keys(q, k_head, v_head, bt_row, lo, hi, offs_d, scale_log2, softcap,
                      stride_kb, stride_kt, stride_vb, stride_vt,
                      ROWS: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Flash-attention of ``q [ROWS, BLOCK_D]`` over keys ``lo .. hi-1`` of one sequence's pages
    (one KV head: ``k_head``/``v_head`` point at it), every key visible to every row.  Returns
    the unnormalised ``(m, l, acc)`` (base-2 max, sum, weighted values) for the caller to
    normalise or to merge with other partials."""
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs = start + offs_n
        n_mask = offs < hi
        k_rows, v_rows = paged_kv_rows(bt_row, offs, n_mask, PAGE, stride_kb, stride_kt, stride_vb, stride_vt)
        kv_mask = n_mask[:, None] if BLOCK_D == HEAD_DIM else n_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        m_i, l_i, acc = attend_kv_tile(q, k_head + k_rows[:, None] + offs_d[None, :],
                                       v_head + v_rows[:, None] + offs_d[None, :], kv_mask, n_mask,
                                       m_i, l_i, acc, scale_log2, softcap, SOFTCAP, DOT_DTYPE, DOT_PRECISION)
    return m_i, l_i, acc
