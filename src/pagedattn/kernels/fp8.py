"""W8A8 FP8 GEMMs: ``y = x W^T`` with ``W`` held in float8_e4m3fn and the activations quantized per token.

The weight is ``weight [N, K]`` e4m3 with float32 ``scale [N, G]``: ``W[n, k] = q[n, k] *
scale[n, k // group_size]``, ``G == 1`` for per-channel (and per-tensor, expanded to every row)
scales, ``G == ceil(K / group_size)`` for block scales (see ``models/quant_formats.py``).

* **Per-row scales** (:func:`fp8_linear`): each row of ``x`` is scaled into e4m3's range by its own
  absolute maximum (``amax / 448``, kept away from zero) and rounded to e4m3, in one Triton
  kernel on CUDA (:func:`_quantize_per_token_kernel`, one program per row), then multiplied by
  ``torch._scaled_mm`` with ``scale_a = [M, 1]`` (per token) and ``scale_b = [1, N]`` (per output
  channel); the bias is added after.  Everything stays on the device (no host sync), so CUDA
  graphs capture it.  ``_scaled_mm`` wants K and N multiples of 16 and, for row-wise scales on
  CUDA, a bfloat16 output: other model dtypes are cast from it.  The model layers take this form
  for every call except one row on CUDA (see ``Fp8Linear.uses_w8a8``), which the GEMV below
  serves faster, per-row scales as one block of every input feature (W8A16).
* **Block scales** (:func:`fp8_block_linear`): a Triton GEMM (:func:`_fp8_block_gemm_kernel`)
  that loads a ``[BLOCK_K, BLOCK_N]`` tile of e4m3 weights, multiplies it by its block's scales
  in fp32, rounds it to the activation dtype (the weight a dense model of the dequantization
  holds) and feeds ``tl.dot``: the activations are not rounded to FP8 (W8A16 arithmetic on FP8
  storage; the tile lies in one block of input features).  Without triton, the weight is
  dequantized on each call and multiplied densely.  The launch parameters are heuristics, not
  tuned on a GPU.

The CPU build of torch runs ``_scaled_mm`` too (float32 output), which the tests use to run the
GPU's arithmetic on the CPU; the Triton kernel runs under the Triton interpreter there.
"""

from __future__ import annotations

import logging

import torch

from ..envs import triton_interpreted
from .w4a16 import _gemv_finish, _gemv_tile, dot_types, gemv_split_args, pow2_tile, split_k_for

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: only the torch forms run
    triton = None
    tl = None

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# The smallest per-token scale: an all-zero row then quantizes to zeros instead of NaNs.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores


def fp8_gemm_supported(device: torch.device) -> bool:
    """The device runs the FP8 GEMM of :func:`fp8_block_linear`: CUDA with e4m3 loads in Triton
    (compute capability 8.9 or newer)."""
    if device.type != "cuda" or triton is None or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def row_group(k: int) -> int:
    """The block size :func:`fp8_block_linear` takes for per-row scales (one scale column): ``k``
    rounded up to the kernel's widest K tile, so every tile lies in the one block."""
    return -(-k // 64) * 64


def quantize_per_token(x: torch.Tensor, amax_ub: float | None = None,
                       use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(e4m3 [M, K], float32 scale [M, 1])`` with ``x ~ q * scale`` row by row;
    ``amax_ub`` clamps each row's absolute maximum first (fbgemm's ``activation_scale_ub``).
    One Triton kernel (``use_triton``; default: on CUDA), else the same arithmetic in torch ops
    (six kernels on a GPU: a decode step of an 8B model would launch ~800 more)."""
    if use_triton is None:
        use_triton = x.is_cuda
    if use_triton and triton is not None and x.shape[0] > 0:
        return _quantize_per_token_triton(x, amax_ub)
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    if amax_ub is not None:
        amax = amax.clamp(max=amax_ub)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.contiguous(), scale  # _scaled_mm wants a row-major left operand (a strided x keeps its strides)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_row: torch.Tensor, bias: torch.Tensor | None,
               amax_ub: float | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """``x [M, K] @ (weight * scale_row)^T + bias`` in ``x.dtype``; ``weight [N, K]`` e4m3,
    ``scale_row [1, N]`` float32; ``use_triton``: the activations' quantization kernel."""
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[0]))
    xq, xs = quantize_per_token(x, amax_ub, use_triton)
    out_dtype = x.dtype if x.device.type == "cpu" or x.dtype == torch.bfloat16 else torch.bfloat16
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale_row, out_dtype=out_dtype)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.add_(bias) if bias is not None else y


def dequantize(weight: torch.Tensor, scale: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight [N, K]`` e4m3 times ``scale [N, G]`` (one column per ``group_size`` input features)
    in float32 (one rounding per weight), then cast to ``dtype``."""
    k = weight.shape[1]
    s = scale.float()
    if s.shape[1] > 1:
        s = s.repeat_interleave(group_size, dim=1)[:, :k]
    return (weight.float() * s).to(dtype)


def block_k(group_size: int) -> int:
    """The Triton kernel's K tile: the largest power of two <= 64 dividing the block's input
    features (a tile then lies in one block); below 16 (``tl.dot``'s least) there is none."""
    bk = pow2_tile(64, group_size)
    return bk if bk >= 16 else 0


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int,
                     bias: torch.Tensor | None, use_triton: bool | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias`` with the block-scaled ``W`` (``weight [N, K]`` e4m3, ``scale
    [N, G]``): the Triton kernel (``use_triton``; default: on CUDA), else dequantized to
    ``x.dtype`` for this call."""
    if use_triton is None:
        use_triton = x.is_cuda
    if use_triton and triton is not None and block_k(group_size):
        return _fp8_block_gemm(x, weight, scale, group_size, bias)
    return _dequantized_linear(x, weight, scale, group_size, bias)


def _dequantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int,
                        bias: torch.Tensor | None) -> torch.Tensor:
    k = weight.shape[1]
    # In the activation dtype throughout: two weight-sized temporaries of it, not float32 ones.
    w = weight.to(x.dtype).mul_(scale.to(x.dtype).repeat_interleave(group_size, dim=1)[:, :k])
    return torch.nn.functional.linear(x, w, bias)


GEMV_MAX_ROWS = 1  # rows served by the CUDA-core GEMV; more go through the tensor-core GEMM
GEMV_BLOCK_N = 64  # output rows per GEMV program: K-contiguous rows of e4m3 bytes, 128 per load


def _fp8_block_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.stride(1) != 1 or scale.shape[0] != n:
        raise ValueError(f"x [{m}, {k}] does not fit the weight {list(weight.shape)} and scales {list(scale.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    scale = scale if scale.dtype == torch.float32 and scale.is_contiguous() else scale.float().contiguous()
    if m <= GEMV_MAX_ROWS:
        return _fp8_gemv(x, weight, scale, group_size, bias, out)
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = 64 if m <= 64 else 128
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    dot_dtype, precision = dot_types(x.dtype)
    _fp8_block_gemm_kernel[grid](
        x, weight, scale, bias if bias is not None else scale, out, m, n, k, scale.shape[1], x.stride(0),
        weight.stride(0), out.stride(0), group_size, HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype,
        DOT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=block_k(group_size), num_warps=4, num_stages=3)
    return out


def _fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int,
              bias: torch.Tensor | None, out: torch.Tensor, block_n: int = GEMV_BLOCK_N, split: int | None = None,
              num_warps: int = 4) -> torch.Tensor:
    """Decode rows: memory-bound, so the grid splits K too (split-K) until the whole GPU streams
    the weight; the slices' fp32 partials are summed in a fixed order in the kernel."""
    m, k = x.shape
    n = weight.shape[0]
    bk = gemv_block_k(group_size)
    k_tiles = triton.cdiv(k, bk)
    tiles = triton.cdiv(n, block_n) * m
    if split is None:  # the interpreter runs programs one by one: one slice
        split = split_k_for(tiles, k_tiles, x.device) if x.is_cuda else 1
    grid = (triton.cdiv(n, block_n), m, split)
    part, counters = gemv_split_args(out, grid[0], split)
    _fp8_gemv_kernel[grid](
        x, weight, scale, out, part, counters, bias if bias is not None else out, n, k, scale.shape[1], x.stride(0),
        weight.stride(0), out.stride(0), m * n, group_size, triton.cdiv(k_tiles, split), split,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=bk, num_warps=num_warps)
    return out


def gemv_block_k(group_size: int) -> int:
    """The GEMV's K tile: the largest power of two <= 128 dividing the block (a tile lies in one
    block, so one scale per row and tile)."""
    return pow2_tile(128, group_size)


QUANT_BLOCK = 1024  # activations per load of the quantization kernel


def _quantize_per_token_triton(x: torch.Tensor, amax_ub: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    # The interpreter (triton 3.9) rounds float32 to e4m3 wrongly where rounding up crosses a
    # power of two (125.9 -> 64): there the kernel stores the scaled float32 values and torch rounds them.
    interpreted = triton_interpreted()
    q = torch.empty((m, k), device=x.device, dtype=torch.float32 if interpreted else FP8_DTYPE)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    block = min(QUANT_BLOCK, triton.next_power_of_2(k))
    _quantize_per_token_kernel[(m,)](x, q, scale, k, x.stride(0), -1.0 if amax_ub is None else float(amax_ub),
                                     FP8_MAX, MIN_SCALE, HAS_UB=amax_ub is not None, BLOCK=block, num_warps=4)
    return (q.to(FP8_DTYPE) if interpreted else q), scale


if triton is not None:

    @triton.jit
    def _quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, amax_ub, fp8_max, min_scale,
                                   HAS_UB: tl.constexpr, BLOCK: tl.constexpr):
        """One row: its absolute maximum (one pass), then the row divided by its scale, clamped
        and rounded to e4m3 (a second pass, mostly from L2)."""
        row = tl.program_id(0)
        x_row = x_ptr + row * stride_xm
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            xv = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(xv))
        a = tl.max(amax, axis=0)
        if HAS_UB:
            a = tl.minimum(a, amax_ub)
        s = tl.maximum(a / fp8_max, min_scale)
        tl.store(s_ptr + row, s)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            xv = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            qv = tl.minimum(tl.maximum(xv / s, -fp8_max), fp8_max)
            tl.store(q_ptr + row * K + offs, qv.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=("num_splits",))
    def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, cnt_ptr, bias_ptr, N, K, G, stride_xm, stride_wn,
                         stride_om, stride_split, group_size, tiles_per_split, num_splits, HAS_BIAS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One row of x (grid axis 1) times ``BLOCK_N`` rows of W over one K slice (axis 2), in
        fp32 on the CUDA cores: each weight is read once, converted and multiplied in registers."""
        row, pid_k, offs_n, n_mask = _gemv_tile(N, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BLOCK_K))
        for t in range(t0, t1):
            offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(x_ptr + row * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            s = tl.load(s_ptr + offs_n * G + (t * BLOCK_K) // group_size, mask=n_mask, other=0.0)
            acc += s * tl.sum(q.to(tl.float32) * xv[None, :], axis=1)
        _gemv_finish(acc, offs_n, N, out_ptr, stride_om, part_ptr, stride_split, cnt_ptr, bias_ptr, num_splits,
                     HAS_BIAS)

    @triton.jit
    def _fp8_block_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, G, stride_xm, stride_wn, stride_om,
                               group_size, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
        """A ``[BLOCK_M, BLOCK_N]`` tile of ``x W^T (+ bias)``, W dequantized tile by tile."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            q = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                        mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            s = tl.load(s_ptr + offs_n * G + k0 // group_size, mask=n_mask, other=0.0)
            w = (q.to(tl.float32) * s[None, :]).to(x_ptr.dtype.element_ty)
            acc += tl.dot(xv.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
