"""W4A16 GEMMs: ``y = x W^T`` with ``W`` held as packed int4 and dequantized inside the kernel.

The weight is in the internal layout of ``models/quant_formats.py``: ``qweight`` int32
``[K/8, N]`` (input feature ``8 j + i`` in nibble ``i`` of row ``j``), ``scales`` and ``zeros``
``[groups, N]``, and ``W[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n]``.  ``g(k)`` is
``k // group_size``, or ``g_idx[k]`` (act-order rows whose groups are not uniform).  ``zeros``
may be None: every zero point is ``zero_point`` (symmetric checkpoints, 8).

Three forms, one dequantization:

* **decode** (:func:`_w4a16_gemv_kernel`, one activation row): a GEMV, memory-bound, so the
  whole GPU must stream the weight.  The grid splits N in tiles *and* K in ``split_k`` slices
  (split-K); each program reads its ``[K/split_k, BLOCK_N]`` block of words once, multiplies on
  the CUDA cores in fp32 nibble plane by nibble plane (no unpacking into a K-ordered tile),
  with the scale and zero point factored out of each group's sum, and writes fp32 partial
  sums; the last slice of a tile to finish adds them in slice order, with the bias, cast to
  the output (:func:`_gemv_finish`: one launch, the same bits whichever slice is last).
* **GEMM** (:func:`_w4a16_gemm_kernel`, any M): tensor-core tiles of the output's transpose
  ``W x^T``; each K step loads a ``[BLOCK_K/8, BLOCK_N]`` block of words, dequantizes it in
  registers (in bf16/fp16 two weights an instruction, no integer-to-float conversion), rounds
  to the activation dtype (the same weight a dense model holds after dequantization) and hands
  it to ``tl.dot`` as its first operand, which the tensor core reads from registers.  Up to
  ``SPLIT_K_MAX_ROWS`` rows it splits K in tiles of at most 64 rows; up to
  ``WIDE_MAX_ROWS`` it takes 128-row tiles (each weight tile dequantized once per 128 rows) and
  splits K only while the grid is smaller than the GPU.
* **dequantize, then cuBLAS** (:func:`dequantize`, past ``WIDE_MAX_ROWS`` rows -- a large
  decode batch or a prefill chunk -- and where a wide GEMM's split partials would outweigh
  its weight): one pass writes ``W^T`` in the activation dtype, rounded as the GEMM rounds
  it, and the dense GEMM multiplies; its memory is transient (the warm-up's memory profile,
  at the largest chunk, sees it).

The torch reference (:func:`w4a16_linear_ref`) dequantizes and multiplies in fp32: the oracle
of every test.  Block sizes and split-K choices are heuristics (:func:`choose_config`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..envs import triton_interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: only the reference runs
    triton = None
    tl = None

GEMV_MAX_ROWS = 1  # rows served by the CUDA-core GEMV; more go through the tensor-core kernel
# Up to this many rows the GEMM splits K to fill the GPU in 16/32/64-row tiles: unsplit, 64-row
# tiles of 65-127 rows left most SMs idle (the down projection at 128 rows ran at 0.24x bf16's
# time against 0.94x at 64, split).
SPLIT_K_MAX_ROWS = 127
# Those tiles take 128 outputs (the weight as the dot's register operand wants them: at 64 they
# ran 2-3x slower) and K slices of at least 8 tiles: on the 8B shapes at 16 and 64 rows (H100)
# that picked the fastest split of each (qkv and o 8, gate_up 4, down 16), where 4 tiles a slice
# made qkv 1.36x slower at 64 rows (docs/benchmarks.md, "The int4 GEMM's weight in registers").
NARROW_MIN_K_TILES = 8
# From 128 rows to WIDE_MAX_ROWS the GEMM takes one 128-row tile a program, so each weight tile is
# dequantized once for every 128 rows, and splits K only while the grid has fewer programs than
# SMs.  On the 8B shapes (H100, docs/benchmarks.md, "W4A16 at 128-256 rows"): 1.6-1.9x faster
# than dequantizing first on down and gate_up at 128 rows, 1.0-1.3x at 192-256, slower from 320.
WIDE_MAX_ROWS = 256
# A split wide GEMM writes fp32 partials of split x M x N: once they outweigh the weight by this
# factor the dequantize-first path is faster (qkv and o at 128 rows: 4.0x their int4 bytes and
# 0.80-0.86x its speed; down: 1.1x and 1.6x faster).
WIDE_MAX_PARTIALS = 1.5


@dataclass(frozen=True)
class W4A16Config:
    """Launch parameters of one call."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int  # K slices, each summed into its own fp32 partials
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False  # the CUDA-core kernel (one row per program row of the grid)


# ---------------------------------------------------------------------- reference
def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                   g_idx: torch.Tensor | None = None, zero_point: float = 8.0) -> torch.Tensor:
    """``W^T [K, N]`` in float32."""
    k8, n = qweight.shape
    shifts = torch.arange(8, device=qweight.device, dtype=torch.int32) * 4
    q = ((qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(k8 * 8, n).float()
    g = (torch.arange(k8 * 8, device=q.device) // group_size) if g_idx is None else g_idx.long()
    z = zero_point if zeros is None else zeros.float()[g]
    return (q - z) * scales.float()[g]


def w4a16_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     group_size: int, g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     zero_point: float = 8.0) -> torch.Tensor:
    """``x W^T + b`` with the weight dequantized, in fp32, cast to ``x``'s dtype."""
    y = x.float() @ dequantize_ref(qweight, scales, zeros, group_size, g_idx, zero_point)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------- configs
@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _num_sms(device.index or 0)


def pow2_tile(cap: int, *extents: int) -> int:
    """The largest power of two <= ``cap`` dividing every extent (``n & -n`` is the largest
    dividing ``n``): a K tile that lies in one quantization group or block needs one scale per
    row and tile, and a K that it divides needs no mask."""
    return min(cap, *(e & -e for e in extents))


def _block_k(k: int, group_size: int, cap: int) -> int:
    # Packed int4 K is a multiple of 8 (a word of codes): no tile below it.
    return max(8, pow2_tile(cap, k, group_size))


def choose_config(m: int, n: int, k: int, group_size: int, device: torch.device,
                  sms: int | None = None) -> W4A16Config:
    """Heuristic launch parameters (not autotuned), fitted to H100 sweeps of the 8B shapes
    (``sms``: the device's SMs).  One row: the GEMV, K split for ~16 programs an SM.  2-127
    rows: 16/32/64-row tiles of 128 outputs, K split for ~4 programs an SM but each slice at
    least :data:`NARROW_MIN_K_TILES` tiles.  128-:data:`WIDE_MAX_ROWS` rows: 128-row tiles, K
    split only while the grid is smaller than the GPU (:func:`dequantizes_first` may send the
    call to cuBLAS instead)."""
    if device.type != "cuda" and sms is None:  # the interpreter runs programs one by one: few, large ones
        bk = _block_k(k, group_size, 128)
        return W4A16Config(1, 128, bk, 1, gemv=True) if m <= GEMV_MAX_ROWS else W4A16Config(32, 128, bk, 1)
    if m <= GEMV_MAX_ROWS:
        bk = _block_k(k, group_size, 128)
        split = split_k_for(-(-n // GEMV_BLOCK_N), k // bk, device, sms, programs_per_sm=GEMV_PROGRAMS_PER_SM,
                            min_k_tiles=2, max_split=GEMV_MAX_SPLIT)
        return W4A16Config(1, GEMV_BLOCK_N, bk, split, 4, 4, gemv=True)
    if m <= SPLIT_K_MAX_ROWS:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        bn, bk, warps = 128, _block_k(k, group_size, 64), 4
        tiles = -(-n // bn) * -(-m // bm)
        return W4A16Config(bm, bn, bk, split_k_for(tiles, k // bk, device, sms, min_k_tiles=NARROW_MIN_K_TILES),
                           warps, 3)
    bk = _block_k(k, group_size, 64)
    if m <= WIDE_MAX_ROWS:
        tiles = -(-n // 128) * -(-m // 128)
        small = tiles < (sms or _sm_count(device))
        split = split_k_for(tiles, k // bk, device, sms, programs_per_sm=3) if small else 1
        return W4A16Config(128, 128, bk, split, 4, 3)
    return W4A16Config(128, 128, bk, 1, 8, 3)  # launched by tests and sweeps: calls this large dequantize


def dequantizes_first(m: int, n: int, k: int, cfg: W4A16Config) -> bool:
    """Whether a call of ``m`` rows without a given config dequantizes its weight and multiplies
    densely rather than running the GEMM ``cfg``: past :data:`WIDE_MAX_ROWS` rows, or where a
    wide GEMM's fp32 partials would outweigh its int4 weight (:data:`WIDE_MAX_PARTIALS`)."""
    if m > WIDE_MAX_ROWS:
        return True
    return m > SPLIT_K_MAX_ROWS and cfg.split_k > 1 and cfg.split_k * m * n * 4 > WIDE_MAX_PARTIALS * n * k / 2


# The GEMV's launch, from a sweep of the 8B layer shapes at one row on an H100 (block_n 64-256,
# 2-16 K slices, 4/8 warps, 1/3 stages; docs/benchmarks.md, "W4A16 GEMV launch"): 256 outputs a
# program and many K slices (each of at least two K tiles), about 16 programs an SM, gave
# 16-21% less time than 128 outputs and ~4 programs an SM on every shape.
GEMV_BLOCK_N = 256
GEMV_MAX_SPLIT = 16
GEMV_PROGRAMS_PER_SM = 16
# The GEMM's dequantization without a conversion (:func:`_w4a16_gemm_kernel`): per arithmetic
# dtype, the bits of a float whose mantissa's last place is 1, and its value; a code or-ed into
# its low bits reads as ``value + code``.  bf16/fp16 for activations of those dtypes on a GPU.
MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0), torch.float32: (0x4B000000, 8388608.0)}
# The mask of mantissa bits 19-22 (:func:`_nibble_pair`), passed to the GEMVs as a run-time
# argument: written as a literal, ptxas re-creates it in a register before nearly every bitwise
# and/or (which takes one immediate, the exponent), ~0.7 instructions a weight; an argument
# stays in one register.
NIBBLE_MASK = 0x780000


def split_k_for(tiles: int, k_tiles: int, device: torch.device, sms: int | None = None, *,
                programs_per_sm: int = 4, min_k_tiles: int = 4, max_split: int | None = None) -> int:
    """K slices for a grid of ``tiles`` output tiles: doubled (up to ``max_split``) until the grid
    has about ``programs_per_sm`` programs per SM (``sms``: the device's), each slice still
    covering at least ``min_k_tiles`` K tiles."""
    sms = sms or _sm_count(device)
    split = 1
    while (max_split is None or split < max_split) and tiles * split < programs_per_sm * sms \
            and k_tiles // (split * 2) >= min_k_tiles:
        split *= 2
    return split


def dot_types(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """``tl.dot``'s operand type and precision for activations of ``dtype`` (the Triton GEMMs'
    ``DOT_DTYPE`` and ``DOT_PRECISION``): the activation dtype, except bf16 under the interpreter,
    whose bf16 dot returns garbage (triton 3.9): there the (bf16-rounded) operands go up to fp32.
    fp32 operands multiply exactly ("ieee": tf32 would cost ~3e-4 relative error)."""
    if dtype == torch.bfloat16 and triton_interpreted():
        return tl.float32, "ieee"
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
    return dot, "ieee" if dot == tl.float32 else "tf32"


def finish_split_k(dst: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, split: int) -> torch.Tensor:
    """``out`` from a GEMM's float32 ``dst [split, M, N]`` slices (one launch: summed in a fixed
    order, the same bits every run, bias added, cast), or with ``split == 1`` (``dst`` is ``out``)
    the bias added."""
    if split > 1:
        m, n = out.shape
        block = 1024
        _splitk_reduce_kernel[(m, triton.cdiv(n, block))](
            dst, out, bias if bias is not None else dst, n, m * n, out.stride(0), SPLIT=split,
            HAS_BIAS=bias is not None, BLOCK=block)
    elif bias is not None:
        out += bias
    return out


TILE_COUNTERS = 1 << 16  # output tiles one GEMV launch may split (a [rows * N-tiles] int32 buffer)


@functools.cache
def _tile_counters(device: torch.device) -> torch.Tensor:
    return torch.zeros(TILE_COUNTERS, dtype=torch.int32, device=device)


def device_counters(device: torch.device) -> torch.Tensor:
    """The device's ``TILE_COUNTERS`` int32 counters, zero between launches: a kernel whose
    programs count themselves done on one (a split GEMV's tile, a split argmax's row) lets the
    last reset it, so launches on one stream share them, inside CUDA graphs too."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _tile_counters(device)


def gemv_split_args(out: torch.Tensor, n_tiles: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partials, counters)`` of a GEMV launch whose K slices finish in the kernel
    (:func:`_gemv_finish`): fp32 partials ``[split, M, N]`` (``out`` when unsplit) and the
    device's int32 tile counters, which every launch leaves at zero (so launches on one stream
    share them, inside CUDA graphs too).  The counters are passed unsplit too: the kernel's
    split branch is compiled whatever the launch's split count, and an atomic needs them."""
    counters = device_counters(out.device)
    if split == 1:
        return out, counters
    m, n = out.shape
    if m * n_tiles > TILE_COUNTERS:
        raise ValueError(f"{m} rows x {n_tiles} tiles exceed the {TILE_COUNTERS} tile counters")
    return torch.empty((split, m, n), device=out.device, dtype=torch.float32), counters


# ---------------------------------------------------------------------- entry point
def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 zero_point: float = 8.0, out: torch.Tensor | None = None,
                 config: W4A16Config | None = None, silu_gated: bool = False) -> torch.Tensor:
    """``x [M, K] W^T + b`` -> ``[M, N]`` in ``x``'s dtype (written into ``out`` when given)
    through the Triton kernels.  K must be a multiple of 16 (32 for the GEMM).

    ``silu_gated``: ``x`` is a gated MLP's ``[M, 2K]`` gate and up halves and the product
    runs on ``silu(gate) * up``, rounded to ``x``'s dtype as :func:`silu_and_mul` rounds it (the
    same bits in bf16 and fp16), computed as the GEMV loads it: one row (the GEMV), no ``g_idx``."""
    if triton is None:
        raise RuntimeError("the W4A16 kernels need triton")
    m, k = x.shape
    n = qweight.shape[1]
    if silu_gated:
        k //= 2
        if m > GEMV_MAX_ROWS or g_idx is not None or (config is not None and not config.gemv):
            raise ValueError("silu_gated takes one row through the GEMV, without g_idx")
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"x has {k} features, the weight {qweight.shape[0] * 8}")
    cfg = config or choose_config(m, n, k, group_size, x.device)
    if k % cfg.block_k or (g_idx is None and group_size % cfg.block_k):
        raise ValueError(f"block_k {cfg.block_k} must divide K ({k}) and the group size ({group_size})")
    x = x if x.stride(-1) == 1 else x.contiguous()
    if config is None and dequantizes_first(m, n, k, cfg):
        return dense_matmul(x, dequantize(qweight, scales, zeros, group_size, x.dtype, g_idx, zero_point), bias, out)
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    split = cfg.split_k
    k_tiles = k // cfg.block_k
    tiles_per_split = triton.cdiv(k_tiles, split)
    has_zeros = zeros is not None
    common = dict(
        HAS_ZEROS=has_zeros, HAS_G_IDX=g_idx is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    weights = (x, qweight, scales, zeros if has_zeros else scales, g_idx if g_idx is not None else qweight)
    if cfg.gemv:
        grid = (triton.cdiv(n, cfg.block_n), m, split)
        part, counters = gemv_split_args(out, grid[0], split)
        _w4a16_gemv_kernel[grid](*weights, out, part, counters, bias if bias is not None else out, m, n, k,
                                 x.stride(0), out.stride(0), m * n, group_size, tiles_per_split,
                                 float(zero_point), split, NIBBLE_MASK, HAS_BIAS=bias is not None,
                                 SILU_GATED=silu_gated, **common)
        return out
    dst = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    args = (*weights, dst, m, n, k, x.stride(0), dst.stride(-2), m * n if split > 1 else 0, group_size,
            tiles_per_split, float(zero_point))
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    dot_dtype, precision = dot_types(x.dtype)
    half_math = x.dtype in (torch.bfloat16, torch.float16) and scales.dtype == x.dtype and not triton_interpreted()
    magic_bits, magic = MAGIC[x.dtype if half_math else torch.float32]
    _w4a16_gemm_kernel[grid](*args, BLOCK_M=cfg.block_m, HALF_MATH=half_math, MAGIC_BITS=magic_bits, MAGIC=magic,
                             DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, **common)
    return finish_split_k(dst, out, bias, split)


def dense_matmul(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ w_t [K, N] + bias`` through the dense GEMM, written into ``out`` when given."""
    y = torch.addmm(bias, x, w_t) if bias is not None else torch.mm(x, w_t)
    return out.copy_(y) if out is not None else y


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               dtype: torch.dtype, g_idx: torch.Tensor | None = None, zero_point: float = 8.0) -> torch.Tensor:
    """``W^T [K, N]`` in ``dtype`` through one Triton kernel: each weight rounded to ``dtype``
    as the GEMM kernel rounds it before its ``tl.dot``, so a dense GEMM on the result computes
    what that kernel computes (up to the order of its float32 sums)."""
    if triton is None:
        raise RuntimeError("the W4A16 kernels need triton")
    k8, n = qweight.shape
    out = torch.empty((k8 * 8, n), device=qweight.device, dtype=dtype)
    block_r, block_n = 8, 128  # 64 input features x 128 outputs a program
    grid = (triton.cdiv(k8, block_r), triton.cdiv(n, block_n))
    _w4a16_dequant_kernel[grid](qweight, scales, zeros if zeros is not None else scales,
                                g_idx if g_idx is not None else qweight, out, k8, n, group_size, float(zero_point),
                                HAS_ZEROS=zeros is not None, HAS_G_IDX=g_idx is not None, BLOCK_R=block_r,
                                BLOCK_N=block_n)
    return out


# ---------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _nibble_pair(words, hi_bit: tl.constexpr, mask):
        """The nibbles at bits ``hi_bit`` and ``hi_bit - 4`` of each word (``uint32``) as fp32s,
        without a conversion: ``(1 + q_hi / 16, 16 + q_lo / 16)``.  One shift brings the pair to
        mantissa bits 19-22 and 15-18; one bitwise and/or a nibble (``mask``:
        :data:`NIBBLE_MASK`) keeps its bits and sets the exponent (0 for the high nibble, 4 for
        the low one, so both read in sixteenths).  With the FMA that uses it, 2.5 instructions a
        weight; the FMA adds ``x q / 16`` plus ``x`` or ``16 x``, which come off once per tile."""
        if hi_bit <= 19:
            moved = words << (19 - hi_bit)
        else:
            moved = words >> (hi_bit - 19)
        hi = ((moved & mask) | 0x3F800000).to(tl.float32, bitcast=True)
        lo = ((moved & (mask >> 4)) | 0x41800000).to(tl.float32, bitcast=True)
        return hi, lo

    @triton.jit
    def silu_mul(gate, up, DTYPE: tl.constexpr):
        """``silu(gate) * up`` of fp32 ``gate`` and ``up`` in ``DTYPE``, the SiLU rounded to it
        before the multiply as ``F.silu(gate) * up`` stores it: the one formula of the fused
        activation kernel (``models/fused_ops.py``) and the gated GEMV, so the two give the
        same bits in bf16 and fp16 (in fp32 the compiler may round the quotient differently in
        the two contexts: an ulp)."""
        act = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)
        return (act * up).to(DTYPE)

    @triton.jit
    def _columns4(t):
        """The four columns of a ``[R, 4]`` tensor as ``[R]`` tensors, in order."""
        c02, c13 = tl.split(tl.reshape(t, (t.shape[0], 2, 2)))
        c0, c2 = tl.split(c02)
        c1, c3 = tl.split(c13)
        return c0, c1, c2, c3

    @triton.jit
    def _gemv_tile(N, BLOCK_N: tl.constexpr):
        """A GEMV program's place in the grid every GEMV shares, (N tiles, rows, K slices): its
        row, its K slice, its ``BLOCK_N`` outputs and their mask."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        return tl.program_id(1), tl.program_id(2), offs_n, offs_n < N

    @triton.jit
    def _gemv_finish(acc, offs_n, N, out_ptr, stride_om, part_ptr, stride_split, cnt_ptr, bias_ptr, num_splits,
                     HAS_BIAS: tl.constexpr):
        """Write a GEMV program's fp32 sums ``acc`` (outputs ``offs_n`` of one row over one K
        slice; every GEMV's grid is (N tiles, rows, K slices)).  Unsplit: bias added, cast,
        stored.  Split: each slice stores its partials (``[slices, rows, N]``) and counts itself
        done on its tile's counter; the slice that finds all others done adds the partials in
        slice order (the same bits whichever finishes last), adds the bias, stores the output and
        zeroes the counter for the next launch -- no second kernel to launch and wait for."""
        row = tl.program_id(1)
        pid_k = tl.program_id(2)
        n_mask = offs_n < N
        out_row = out_ptr + row * stride_om
        part_row = part_ptr + row * N
        counter = cnt_ptr + row * tl.num_programs(0) + tl.program_id(0)
        if num_splits == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_row + offs_n, acc.to(out_row.dtype.element_ty), mask=n_mask)
        else:
            tl.store(part_row + pid_k * stride_split + offs_n, acc, mask=n_mask)
            tl.debug_barrier()  # every thread's partials are written before the count says so
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
                total = tl.load(part_row + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
                for s in range(1, num_splits):
                    total += tl.load(part_row + s * stride_split + offs_n, mask=n_mask, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                tl.store(out_row + offs_n, total.to(out_row.dtype.element_ty), mask=n_mask)
                tl.atomic_xchg(counter, 0)

    @triton.jit(do_not_specialize=("num_splits", "nibble_mask"))
    def _w4a16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, part_ptr, cnt_ptr, bias_ptr, M, N, K,
                           stride_xm, stride_om, stride_split, group_size, tiles_per_split, zero_point, num_splits,
                           nibble_mask,
                           HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
                           SILU_GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One row of x (grid axis 1) times a BLOCK_N slice of W over one K slice (axis 2);
        ``SILU_GATED``: x is ``silu(gate) * up`` of the row's halves (see :func:`w4a16_linear`).

        The words are never unpacked into a K-ordered tile: nibble plane ``i`` of a
        ``[BLOCK_K/8, BLOCK_N]`` block of words multiplies the activations ``8 j + i``.  In a tile
        of one group the scale and zero point factor out of the sum,
        ``s (sum_k x_k q_k - z sum_k x_k)``: per weight half a shift, a bitwise and/or and a
        multiply-add (``nibble_mask``: :data:`NIBBLE_MASK`)."""
        row, pid_k, offs_n, n_mask = _gemv_tile(N, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        x_row = x_ptr + row * stride_xm
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, K // BLOCK_K)
        for t in range(t0, t1):
            rows = t * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
            words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            if HAS_G_IDX:  # act-order rows: a scale and zero point per row
                part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
                for i in tl.static_range(8):
                    xi = tl.load(x_row + rows * 8 + i).to(tl.float32)
                    g = tl.load(g_ptr + rows * 8 + i)
                    sz = g[:, None] * N + offs_n[None, :]
                    si = tl.load(s_ptr + sz, mask=n_mask[None, :], other=0.0).to(tl.float32)
                    if HAS_ZEROS:
                        zi = tl.load(z_ptr + sz, mask=n_mask[None, :], other=0.0).to(tl.float32)
                    else:
                        zi = zero_point
                    # Nibble i as fp32 without an int-to-float conversion: the 4 bits become the
                    # low mantissa bits of 2^23 (a bitwise or), and 2^23 is subtracted exactly.
                    plane = (((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    part += xi[:, None] * ((plane - zi) * si)
                acc += tl.sum(part, axis=0)
            else:
                # Nibbles 2p+1 and 2p as 1 + q/16 and 16 + q/16 (_nibble_pair): one FMA a weight adds
                # x q/16 plus x (odd) or 16 x (even), which come off once per tile.
                uwords = words.to(tl.uint32, bitcast=True)
                part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
                # The tile's activations in one vector load a row (the compiler hands them on to the
                # threads that need them through shared memory), then its columns 2p and 2p+1.
                cols = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
                if SILU_GATED:
                    gate = tl.load(x_row + cols).to(tl.float32)
                    up = tl.load(x_row + K + cols).to(tl.float32)
                    xt = silu_mul(gate, up, x_ptr.dtype.element_ty).to(tl.float32)
                else:
                    xt = tl.load(x_row + cols).to(tl.float32)
                x_even4, x_odd4 = tl.split(tl.reshape(xt, (BLOCK_K // 8, 4, 2)))
                x_evens = _columns4(x_even4)
                x_odds = _columns4(x_odd4)
                for p in tl.static_range(4):
                    hi, lo = _nibble_pair(uwords, 8 * p + 4, nibble_mask.to(tl.uint32))
                    part += x_evens[p][:, None] * lo  # one FMA a weight: separate statements
                    part += x_odds[p][:, None] * hi
                g = (t * BLOCK_K) // group_size  # the tile lies in one group
                s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                else:
                    z = zero_point
                xoff = tl.sum(tl.sum(16.0 * x_even4 + x_odd4, axis=1), axis=0)
                xsum = tl.sum(tl.sum(x_even4 + x_odd4, axis=1), axis=0)
                acc += s * (16.0 * (tl.sum(part, axis=0) - xoff) - z * xsum)  # s (sum x q - z sum x)
        _gemv_finish(acc, offs_n, N, out_ptr, stride_om, part_ptr, stride_split, cnt_ptr, bias_ptr, num_splits,
                     HAS_BIAS)

    @triton.jit
    def _w4a16_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                           stride_split, group_size, tiles_per_split, zero_point,
                           HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HALF_MATH: tl.constexpr,
                           MAGIC_BITS: tl.constexpr, MAGIC: tl.constexpr, DOT_DTYPE: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        """A ``[BLOCK_M, BLOCK_N]`` tile of the output over one K slice (grid axis 2), computed as
        its transpose ``W x^T``: the dequantized weight is the dot's first operand, which a Hopper
        tensor core reads from registers, so it never goes through shared memory.

        A code becomes a float without a conversion: or-ed into the mantissa of ``MAGIC`` (128 in
        bf16, 1024 in fp16, 2^23 in fp32, each with unit last place) it reads as ``MAGIC + q``;
        minus ``MAGIC + z`` that is ``q - z`` exactly, and one multiply by the scale rounds it
        once, as :func:`dequantize` rounds it.  ``HALF_MATH`` (bf16/fp16 activations and scales
        on a GPU) does both in the activation dtype, two weights an instruction."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        R: tl.constexpr = BLOCK_K // 8  # word rows a K tile
        act = x_ptr.dtype.element_ty
        math = act if HALF_MATH else tl.float32
        zq = (tl.zeros((BLOCK_N,), dtype=tl.float32) + (MAGIC + zero_point)).to(math)  # without zeros
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, K // BLOCK_K)
        for t in range(t0, t1):
            k0 = t * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
            # Word row r's nibble i is input feature k0 + 8 r + i: [R, 8, BLOCK_N] codes.
            # (Inline, not jit helpers: the interpreter pays per call.)
            words = tl.load(qw_ptr + (k0 // 8 + tl.arange(0, R))[:, None] * N + offs_n[None, :],
                            mask=n_mask[None, :], other=0)
            q = ((words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF) | MAGIC_BITS
            if HALF_MATH:
                qm = q.to(tl.int16).to(act, bitcast=True)
            else:
                qm = q.to(tl.float32, bitcast=True)
            if HAS_G_IDX:  # act-order rows: one scale row per input feature
                kk = k0 + tl.arange(0, R)[:, None] * 8 + tl.arange(0, 8)[None, :]
                sz = tl.load(g_ptr + kk)[:, :, None] * N + offs_n[None, None, :]
                s = tl.load(s_ptr + sz, mask=n_mask[None, None, :], other=0.0).to(math)
                if HAS_ZEROS:
                    z = tl.load(z_ptr + sz, mask=n_mask[None, None, :], other=0.0).to(tl.float32)
                    w = (qm - (MAGIC + z).to(math)) * s
                else:
                    w = (qm - zq[None, None, :]) * s
            else:  # the tile lies in one group: one scale row
                g = k0 // group_size
                s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(math)
                if HAS_ZEROS:
                    z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    w = (qm - (MAGIC + z).to(math)[None, None, :]) * s[None, None, :]
                else:
                    w = (qm - zq[None, None, :]) * s[None, None, :]
            # The weight rounded to the activation dtype, as a dense model of it holds it.
            wt = tl.reshape(tl.permute(w.to(act), (2, 0, 1)), (BLOCK_N, BLOCK_K))
            acc = tl.dot(wt.to(DOT_DTYPE), tl.trans(xv.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
        dst = out_ptr + pid_k * stride_split + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])

    @triton.jit
    def _w4a16_dequant_kernel(qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, K8, N, group_size, zero_point,
                              HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_N: tl.constexpr):
        """``out[8 j + i, n] = (nibble i of qweight[j, n] - z) * s`` for ``BLOCK_R`` word rows
        (axis 0) and ``BLOCK_N`` outputs (axis 1), in the output's dtype."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < K8)[:, None] & (offs_n < N)[None, :]
        words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
        q = (words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF
        q = tl.reshape(q, (BLOCK_R * 8, BLOCK_N)).to(tl.float32)
        ks = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
        ks = tl.reshape(ks, (BLOCK_R * 8,))
        k_mask = tl.reshape(tl.broadcast_to((rows < K8)[:, None], (BLOCK_R, 8)), (BLOCK_R * 8,))
        full = k_mask[:, None] & (offs_n < N)[None, :]
        if HAS_G_IDX:
            g = tl.load(g_ptr + ks, mask=k_mask, other=0)
        else:
            g = ks // group_size
        sz = g[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + sz, mask=full, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            w = (q - tl.load(z_ptr + sz, mask=full, other=0.0).to(tl.float32)) * s
        else:
            w = (q - zero_point) * s
        tl.store(out_ptr + ks[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=full)

    @triton.jit
    def _splitk_reduce_kernel(partials_ptr, out_ptr, bias_ptr, N, stride_split, stride_om, SPLIT: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """``out[row] = sum_s partials[s, row] (+ bias)`` in slice order, cast to the output dtype."""
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        src = partials_ptr + row * N + offs
        acc = tl.load(src, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT):
            acc += tl.load(src + s * stride_split, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
