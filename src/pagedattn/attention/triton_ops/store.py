"""KV store: scatter this step's new K and V into their paged slots, one launch for both.

Into an fp8 cache it stores ``clamp(x / scale, -448, 448)`` as e4m3 (rounded to nearest even),
with the layer's K and V scales read from device memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...cache.kv_pool import FP8_KV_MAX
from .common import interpreting, kv_scale_args

FP8_MAX_CONST: tl.constexpr = tl.constexpr(FP8_KV_MAX)


@triton.jit
def _round_to_e4m3(x):
    """fp32 ``x`` (|x| <= 448) rounded to the nearest e4m3 value, ties to even, in fp32
    arithmetic.  Only under the interpreter: its fp32 -> e4m3 cast (triton 3.9) rounds ties up
    and loses the carry into the exponent (31.1 -> 16), while it casts e4m3 values exactly.
    The step between e4m3 neighbours is 2^(e - 3) for |x| in [2^e, 2^(e+1)), and 2^-9 below
    the smallest normal 2^-6; adding and subtracting 1.5 * 2^23 rounds to an integer, ties to
    even.  The magnitude is rounded, so a tiny negative value (or -0) becomes -0 as in a real cast."""
    bits = x.to(tl.int32, bitcast=True)
    step = ((tl.maximum((bits >> 23) & 0xFF, 127 - 6) - 3) << 23).to(tl.float32, bitcast=True)
    r = ((tl.abs(x) / step + 12582912.0) - 12582912.0) * step
    return tl.where(bits < 0, -r, r)  # the sign bit: -0 stays -0


@triton.jit
def _quantize(x, scale, KV_FP8: tl.constexpr, ROUND: tl.constexpr):
    """What an fp8 page holds of ``x``: ``clamp(x / scale, -448, 448)`` (then cast by the
    store); other caches: ``x``."""
    if KV_FP8:
        x = tl.clamp(x.to(tl.float32) / scale, -FP8_MAX_CONST, FP8_MAX_CONST)
        if ROUND:
            x = _round_to_e4m3(x)
    return x


@triton.jit
def _store_kv_kernel(
    K, V, KCache, VCache, Slots, KScale, VScale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KV_FP8: tl.constexpr,  # quantize into e4m3 pages with KScale / VScale
    ROUND: tl.constexpr,  # round to e4m3 before the cast (the interpreter's cast is wrong)
):
    # One program per token moves its [Hkv, D] rows of K and of V.
    tok = tl.program_id(0)
    slot = tl.load(Slots + tok)
    # Negative slots are padding (CUDA-graph batches): no head row is valid, nothing is moved.
    num_rows = tl.where(slot >= 0, NUM_HEADS, 0)
    slot = tl.maximum(slot, 0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM)
    src_k = K + tok.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = V + tok.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst_k = KCache + blk * stride_kcb + off * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :]
    dst_v = VCache + blk * stride_vcb + off * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    if KV_FP8:
        k = _quantize(k, tl.load(KScale), KV_FP8, ROUND)
        v = _quantize(v, tl.load(VScale), KV_FP8, ROUND)
    tl.store(dst_k, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(dst_v, v.to(VCache.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """``k_cache.view(N*bs, Hkv, D)[slot] = k`` for every token whose slot is >= 0 (fp8 caches:
    ``k / k_scale`` clamped and rounded to e4m3; scales None: 1.0).

    ``k``/``v`` ``[T, Hkv, D]`` may be strided views (e.g. slices of a fused QKV projection)
    as long as the last dim is contiguous.  Shapes are checked by the caller.
    """
    t, h, d = k.shape
    if t == 0:
        return
    k_sc, v_sc, fp8 = kv_scale_args(k_cache, k, k_scale, v_scale)
    _store_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping, k_sc, v_sc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=h, HEAD_DIM=d,
        BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d),
        BLOCK_SIZE=k_cache.shape[1],
        KV_FP8=fp8, ROUND=fp8 and interpreting(),
        num_warps=4,
    )
