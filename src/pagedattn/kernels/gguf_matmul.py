"""GGUF matmuls: ``y = x W^T`` with ``W`` in a GGUF file's own blocks, dequantized in registers.

The weight is uint8 ``[N, K / QK * block bytes]``: each output row is the row's blocks exactly
as the file stores them, so the GPU holds the file's bytes.  Six types, each read by the
layouts of ggml (``gguf.quants`` is the reference the tests hold the kernels to):

=====  =====  =====  ==========================================================
type   QK     bytes  weight of element ``j`` of a block
=====  =====  =====  ==========================================================
Q4_0   32     18     ``d (q - 8)``, ``q`` a nibble
Q4_1   32     20     ``d q + m``
Q8_0   32     34     ``d q``, ``q`` int8
Q4_K   256    144    ``(d sc_s) q - dmin mn_s``, 8 sub-blocks of 32, 6-bit ``sc``/``mn``
Q5_K   256    176    as Q4_K with a fifth bit of ``q`` from ``qh``
Q6_K   256    210    ``(d sc_s) (q - 32)``, 16 sub-blocks of 16, int8 ``sc``, 6-bit ``q``
=====  =====  =====  ==========================================================

Every type is a sequence of groups of 32 elements (a block, or a sub-block of a K-quant
super-block; Q6_K's scales cover half a group each), so a tile is ``[groups, 32]`` along K and
one helper (:func:`_dequant`) turns a group index ``g`` and a position ``l`` in it into the
weight: scales are loaded once per group, codes once per element.  The fp16 fields (``d``,
``dmin``, ``m``) are read through a float16 view of the same bytes (every field lies at an even
offset: all block sizes are even).

Three forms, as :mod:`.w4a16`:

* **decode** (one activation row): a kernel per block shape reads the blocks as 16- or 32-bit
  words and makes each code a float with bit operations, no conversion instruction
  (:func:`_q32_gemv_kernel`: Q4_0, Q4_1, Q8_0; :func:`_q4k_gemv_kernel`: Q4_K, Q5_K, whole
  super-blocks; :func:`_q6k_gemv_kernel`); the block and sub-block scales apply to sums of
  ``x q``, not to each weight.  K is split over ``split_k`` programs whose fp32 partials the
  last of them adds in a fixed order.
* **GEMM** (:func:`_gguf_gemm_kernel`, any M): each K step dequantizes a ``[BLOCK_K, BLOCK_N]``
  tile, rounds it to the activation dtype (the weight a dense model of that dtype holds) and
  feeds ``tl.dot``, splitting K below ``DEQUANT_MIN_ROWS`` rows.
* **dequantize, then cuBLAS** (:func:`dequantize`, ``DEQUANT_MIN_ROWS`` rows and more: a
  large decode batch or a prefill chunk): the weight written once in the activation dtype, then the dense GEMM.

K is a multiple of 32 (every type's group); a tile past K is masked by whole groups, so K
need not be a multiple of the tile.  No host synchronisation: the launches are CUDA-graph safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .w4a16 import (
    NIBBLE_MASK,
    _gemv_finish,
    _gemv_tile,
    _nibble_pair,
    dense_matmul,
    dot_types,
    finish_split_k,
    gemv_split_args,
    split_k_for,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: only the reference runs
    triton = None
    tl = None

# type -> (elements, bytes) of one block: ggml's (gguf.GGML_QUANT_SIZES), for the types here.
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
_KIND_IDS = {name: i for i, name in enumerate(GGUF_BLOCKS)}  # the kernels' constexpr
GROUP = 32  # every type's weights come in groups of 32 along K
GEMV_MAX_ROWS = 1
# From this many rows (a large decode batch, a prefill chunk) a call dequantizes its weight into
# the activation dtype and multiplies it densely (cuBLAS), as :mod:`.w4a16` does (Q4_K on the 8B
# shapes: gate_up equal at 128 rows and 1.6x faster at 256, down 2-2.3x faster at both).  See
# docs/benchmarks.md.
DEQUANT_MIN_ROWS = 128
SPLIT_K_MAX_ROWS = DEQUANT_MIN_ROWS - 1  # below it the GEMM splits K, as in .w4a16


@dataclass(frozen=True)
class GGUFMatmulConfig:
    """Launch parameters of one call (``block_k``: a multiple of 32)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False


def row_bytes(kind: str, k: int) -> int:
    """Bytes of one row of ``k`` elements of type ``kind``."""
    elems, nbytes = _layout(kind)
    if k % elems:
        raise ValueError(f"{kind} rows hold whole blocks of {elems} elements, not {k}")
    return k // elems * nbytes


def _layout(kind: str) -> tuple[int, int]:
    if kind not in GGUF_BLOCKS:
        raise ValueError(f"GGUF type {kind} has no GPU kernel (supported: {', '.join(GGUF_BLOCKS)})")
    return GGUF_BLOCKS[kind]


# ---------------------------------------------------------------------- reference
def dequantize_ref(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """``W [N, K]`` in float32, by gguf's own dequantizer (on the CPU)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w = dequantize(blocks.cpu().numpy(), GGMLQuantizationType[kind])
    return torch.from_numpy(w.copy()).to(blocks.device)


def gguf_linear_ref(x: torch.Tensor, blocks: torch.Tensor, kind: str, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``x W^T + b`` with the weight dequantized by gguf, in fp32, cast to ``x``'s dtype."""
    y = x.float() @ dequantize_ref(blocks, kind).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------- configs
def choose_config(m: int, n: int, k: int, device: torch.device, sms: int | None = None,
                  kind: str | None = None) -> GGUFMatmulConfig:
    """Heuristic launch parameters (not autotuned): split K until the grid has about four
    programs per SM (``sms``: the device's), each still covering at least four K tiles.  The
    GEMV of the 32-element block types (``kind``) takes 16 outputs a program, not 32: its
    16-bit loads want more programs in flight (1.1-1.5x faster on an H100's 8B shapes:
    docs/benchmarks.md); the K-quants' GEMV 64, with K in slices of four or more super-blocks
    (:data:`K_QUANT_GEMV_OUTPUTS`)."""
    if device.type != "cuda" and sms is None:  # the interpreter runs programs one by one: few, large ones
        return GGUFMatmulConfig(1, 64, 256, 1, gemv=True) if m <= GEMV_MAX_ROWS else GGUFMatmulConfig(32, 64, 64, 1)
    if m <= GEMV_MAX_ROWS and kind in _K_QUANTS:
        return GGUFMatmulConfig(1, K_QUANT_GEMV_OUTPUTS, 256, _k_quant_split(-(-k // 256)), 4, 3, gemv=True)
    if m <= GEMV_MAX_ROWS:
        bm, bn, bk, warps = 1, _GEMV_OUTPUTS.get(kind or "", 32), 256, 4
    elif m <= SPLIT_K_MAX_ROWS:
        bm, bn, bk, warps = (16 if m <= 16 else 32 if m <= 32 else 64), 64, 64, 4
    else:
        bm, bn, bk, warps = (64, 128, 64, 4) if m <= 256 else (128, 128, 64, 8)
        return GGUFMatmulConfig(bm, bn, bk, 1, warps, 3)
    split = split_k_for(-(-n // bn) * -(-m // bm), -(-k // bk), device, sms)
    return GGUFMatmulConfig(bm, bn, bk, split, warps, 3, gemv=m <= GEMV_MAX_ROWS)


def _k_quant_split(super_blocks: int) -> int:
    """K slices of a K-quant GEMV: as many as leave each slice at least four super-blocks."""
    split = 1
    while super_blocks // (split * 2) >= 4:
        split *= 2
    return split


# The K-quants' GEMVs (Q4_K, Q5_K through the Q4_K kernel, Q6_K) at one row take 64 outputs a
# program and split K into slices of at least four super-blocks, whatever the grid's size: on an
# H100's 8B shapes 18-20% less time a layer than 32 outputs with the slices of the grid-size
# rule (Q6_K gate_up 93.8 -> 70.0 us, Q4_K qkv 12.9 -> 9.9 us; docs/benchmarks.md).
K_QUANT_GEMV_OUTPUTS = 64
_K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


# The Q6_K GEMV's masks (:func:`_split_code_pair`), run-time arguments as :data:`NIBBLE_MASK` is: a
# code's 4 low bits at mantissa bits 17-20, its 2 high bits at 21-22.
Q6K_NIBBLE_MASK = 0x1E0000
Q6K_TOP_MASK = 0x600000
# The Q5_K GEMV's (:func:`_q4k_gemv_kernel`): a code's 4 low bits at mantissa bits 18-21, its
# fifth at 22.
Q5K_NIBBLE_MASK = 0x3C0000
Q5K_TOP_MASK = 0x400000
# The byte of a Q8_0 code at mantissa bits 15-22 (:func:`_q8_pair`).
Q8_BYTE_MASK = 0x7F8000
# The GEMV's outputs a program where not 32 (:func:`choose_config`).
_GEMV_OUTPUTS = {"Q4_0": 16, "Q4_1": 16, "Q8_0": 16}
# The 32-element block types read by :func:`_q32_gemv_kernel`: (KIND, words of codes a block,
# byte offset of the codes in the block).
_Q32_LAYOUT = {"Q4_0": (0, 8, 2), "Q4_1": (1, 8, 4), "Q8_0": (2, 16, 2)}


def gemv_step(kind: str, cfg: GGUFMatmulConfig) -> int:
    """Elements of K that one loop turn of ``kind``'s GEMV covers: a super-block for the
    K-quants; for the 32-element types as many 16-bit words of codes as ``block_k`` elements of
    Q4 (8 words a block), so Q8_0 (16 words a block) covers half of it with as many registers."""
    elems, _ = _layout(kind)
    if elems == 256:
        return elems
    return cfg.block_k * 8 // _Q32_LAYOUT[kind][1]


def gemv_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` (unit column stride) as the Q4_K GEMV reads it: in bf16, rows that start on 8 bytes
    (:func:`_x_of` reads four values at a time); a row that does not is copied."""
    if x.dtype == torch.bfloat16 and (x.data_ptr() % 8 or x.stride(0) % 4):
        return x.clone(memory_format=torch.contiguous_format)
    return x


# ---------------------------------------------------------------------- entry point
def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, kind: str, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None, config: GGUFMatmulConfig | None = None) -> torch.Tensor:
    """``x [M, K] W^T + b`` -> ``[M, N]`` in ``x``'s dtype (written into ``out`` when given; it
    may be a column slice of a wider buffer) through the Triton kernels; ``blocks``: uint8
    ``[N, row_bytes(kind, K)]``."""
    if triton is None:
        raise RuntimeError("the GGUF kernels need triton")
    m, k = x.shape
    n = blocks.shape[0]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes(kind, k):
        raise ValueError(f"{kind} weight for {k} input features must be uint8 [N, {row_bytes(kind, k)}], "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")
    cfg = config or choose_config(m, n, k, x.device, kind=kind)
    if cfg.block_k % GROUP:
        raise ValueError(f"block_k {cfg.block_k} must be a multiple of {GROUP}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    blocks = blocks if blocks.is_contiguous() else blocks.contiguous()
    if config is None and m >= DEQUANT_MIN_ROWS:  # dequantize, then the dense GEMM
        return dense_matmul(x, dequantize(blocks, kind, x.dtype).t(), bias, out)
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    if cfg.gemv:
        return _gemv(x, blocks, kind, bias, out, cfg)
    split = cfg.split_k
    k_tiles = -(-k // cfg.block_k)
    common = dict(KIND=_KIND_IDS[kind], BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    dst = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    dot_dtype, precision = dot_types(x.dtype)
    _gguf_gemm_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)](
        x, blocks, blocks.view(torch.float16), dst, m, n, k, blocks.shape[1], x.stride(0), dst.stride(-2),
        m * n if split > 1 else 0, triton.cdiv(k_tiles, split), BLOCK_M=cfg.block_m, DOT_DTYPE=dot_dtype,
        DOT_PRECISION=precision, **common)
    return finish_split_k(dst, out, bias, split)


def _gemv(x: torch.Tensor, blocks: torch.Tensor, kind: str, bias: torch.Tensor | None, out: torch.Tensor,
          cfg: GGUFMatmulConfig) -> torch.Tensor:
    """``kind``'s GEMV kernel into ``out``: each reads its blocks as 16- or 32-bit words."""
    m, k = x.shape
    n = blocks.shape[0]
    if blocks.data_ptr() % 4:  # not an allocation or a row slice of one (never a model's weight)
        blocks = blocks.clone()
    if kind in ("Q4_K", "Q5_K"):
        x = gemv_activations(x)
    step = gemv_step(kind, cfg)
    steps = -(-k // step)
    split = min(cfg.split_k, steps)
    grid = (triton.cdiv(n, cfg.block_n), m, split)
    part, counters = gemv_split_args(out, grid[0], split)
    args = (x, blocks, out, part, counters, bias if bias is not None else out, n, k, blocks.shape[1], x.stride(0),
            out.stride(0), m * n, triton.cdiv(steps, split), split)
    launch = dict(HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    if kind in ("Q4_K", "Q5_K"):
        five = kind == "Q5_K"
        _q4k_gemv_kernel[grid](*args, Q5K_NIBBLE_MASK if five else NIBBLE_MASK, Q5K_TOP_MASK, FIVE_BITS=five,
                               **launch)
    elif kind == "Q6_K":
        _q6k_gemv_kernel[grid](*args, Q6K_NIBBLE_MASK, Q6K_TOP_MASK, **launch)
    else:
        kind_id, words, code_off = _Q32_LAYOUT[kind]
        _q32_gemv_kernel[grid](*args, Q8_BYTE_MASK if kind == "Q8_0" else NIBBLE_MASK, KIND=kind_id, WORDS=words,
                               CODE_OFF=code_off, BLOCK_BYTES=GGUF_BLOCKS[kind][1], GROUPS=step // GROUP, **launch)
    return out


def gguf_embedding(ids: torch.Tensor, blocks: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` (int ``[T]``) of the table ``blocks`` (uint8 ``[V, row bytes]``), dequantized
    -> ``[T, K]`` in ``dtype``.  Ids must be in ``[0, V)`` (not checked: no host sync)."""
    if triton is None:
        raise RuntimeError("the GGUF kernels need triton")
    elems, nbytes = _layout(kind)
    k = blocks.shape[1] // nbytes * elems
    flat = ids.reshape(-1)
    out = torch.empty((flat.shape[0], k), device=blocks.device, dtype=dtype)
    if flat.numel():
        block = 256
        _gguf_embedding_kernel[(flat.shape[0], triton.cdiv(k, block))](
            flat, blocks, blocks.view(torch.float16), out, k, blocks.shape[1], KIND=_KIND_IDS[kind], BLOCK=block)
    return out.view(*ids.shape, k)


def dequantize(blocks: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight ``W [N, K]`` in ``dtype`` (every row through :func:`gguf_embedding`)."""
    return gguf_embedding(torch.arange(blocks.shape[0], device=blocks.device), blocks, kind, dtype)


# ---------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _byte(w_ptr, offs, mask):
        return tl.load(w_ptr + offs, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _half(h_ptr, byte_offs, mask):
        return tl.load(h_ptr + byte_offs // 2, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _k_scale_min_of(a, b, c, s):
        """Sub-block ``s``'s 6-bit scale and min of a Q4_K/Q5_K super-block (ggml's
        ``get_scale_min_k4``) from its scale bytes ``t = s % 4``, ``t + 4`` and ``t + 8`` (``a``,
        ``b``, ``c``; 12 bytes from offset 4): the last four sub-blocks split their bits."""
        sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 6) << 4))
        mn = tl.where(s < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    @triton.jit
    def _k_scale_min(w_ptr, blk, s, mask):
        """:func:`_k_scale_min_of` for the super-block at byte ``blk``, its scale bytes loaded."""
        t = s % 4
        return _k_scale_min_of(_byte(w_ptr, blk + 4 + t, mask), _byte(w_ptr, blk + 8 + t, mask),
                               _byte(w_ptr, blk + 12 + t, mask), s)

    @triton.jit
    def _byte_of(words, i):
        """Byte ``i`` of little-endian int32 ``words`` (broadcast shapes)."""
        return (words >> (8 * i)) & 255

    @triton.jit
    def _k_scale_min_words(w1, w2, w3, s):
        """:func:`_k_scale_min_of` from the scale bytes already in registers as three words
        (``w1``: bytes 4-7 of the super-block, ``w2``: 8-11, ``w3``: 12-15)."""
        t = s % 4
        return _k_scale_min_of(_byte_of(w1, t), _byte_of(w2, t), _byte_of(w3, t), s)

    @triton.jit
    def _half_of(word, high: tl.constexpr):
        """The float16 in the low (or high) half of int32 ``word``, as fp32."""
        bits = (word >> 16) if high else word
        return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _dequant(w_ptr, h_ptr, row_off, g, l, mask, KIND: tl.constexpr):
        """The fp32 weights of group ``g`` (of 32 along K), position ``l``, in the rows starting
        at byte ``row_off`` (broadcast shapes; ``mask``: the valid rows and groups)."""
        if KIND == 0:  # Q4_0
            blk = row_off + g * 18
            d = _half(h_ptr, blk, mask)
            q = (_byte(w_ptr, blk + 2 + (l % 16), mask) >> (4 * (l // 16))) & 15
            w = d * (q - 8).to(tl.float32)
        elif KIND == 1:  # Q4_1
            blk = row_off + g * 20
            d = _half(h_ptr, blk, mask)
            mn = _half(h_ptr, blk + 2, mask)
            q = (_byte(w_ptr, blk + 4 + (l % 16), mask) >> (4 * (l // 16))) & 15
            w = d * q.to(tl.float32) + mn
        elif KIND == 2:  # Q8_0
            blk = row_off + g * 34
            d = _half(h_ptr, blk, mask)
            q = tl.load(w_ptr + blk + 2 + l, mask=mask, other=0).to(tl.int8, bitcast=True)
            w = d * q.to(tl.float32)
        elif KIND == 3:  # Q4_K
            blk = row_off + (g // 8) * 144
            s = g % 8
            sc, mn = _k_scale_min(w_ptr, blk, s, mask)
            scale = _half(h_ptr, blk, mask) * sc
            shift = _half(h_ptr, blk + 2, mask) * mn
            q = (_byte(w_ptr, blk + 16 + (s // 2) * 32 + l, mask) >> (4 * (s % 2))) & 15
            w = scale * q.to(tl.float32) - shift
        elif KIND == 4:  # Q5_K
            blk = row_off + (g // 8) * 176
            s = g % 8
            sc, mn = _k_scale_min(w_ptr, blk, s, mask)
            scale = _half(h_ptr, blk, mask) * sc
            shift = _half(h_ptr, blk + 2, mask) * mn
            lo = (_byte(w_ptr, blk + 48 + (s // 2) * 32 + l, mask) >> (4 * (s % 2))) & 15
            hi = (_byte(w_ptr, blk + 16 + l, mask) >> s) & 1
            w = scale * (lo | (hi << 4)).to(tl.float32) - shift
        else:  # Q6_K: ql (128 bytes), qh (64), int8 scales (16), d
            blk = row_off + (g // 8) * 210
            s = g % 8
            half = s // 4
            c = s % 4
            lo = (_byte(w_ptr, blk + half * 64 + 32 * (c % 2) + l, mask) >> (4 * (c // 2))) & 15
            hi = (_byte(w_ptr, blk + 128 + half * 32 + l, mask) >> (2 * c)) & 3
            sc = tl.load(w_ptr + blk + 192 + half * 8 + 2 * c + l // 16, mask=mask, other=0)
            scale = _half(h_ptr, blk + 208, mask) * sc.to(tl.int8, bitcast=True).to(tl.float32)
            w = scale * ((lo | (hi << 4)) - 32).to(tl.float32)
        return w

    @triton.jit
    def _gguf_embedding_kernel(ids_ptr, w_ptr, h_ptr, out_ptr, K, row_bytes, KIND: tl.constexpr,
                               BLOCK: tl.constexpr):
        """``out[t, cols] = W[ids[t], cols]`` for one token (axis 0) and BLOCK columns (axis 1)."""
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < K
        row_off = tl.load(ids_ptr + t).to(tl.int64) * row_bytes
        w = _dequant(w_ptr, h_ptr, row_off, cols // 32, cols % 32, mask, KIND)
        tl.store(out_ptr + t.to(tl.int64) * K + cols, w.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _x_of(x_row, quad, b: tl.constexpr):
        """``x[4 quad + b]`` in fp32.  bf16 activations are read four to a 64-bit load (the loads
        of one ``quad`` for several ``b`` are one) and each becomes a float by moving its bits to
        the top of a word: a quarter of the loads and no conversions.  The wrapper checks the
        8-byte alignment this needs (:func:`gemv_activations`)."""
        if x_row.dtype.element_ty == tl.bfloat16:
            word = (tl.load(x_row.to(tl.pointer_type(tl.uint64)) + quad) >> (32 * (b // 2))).to(tl.uint32)
            if b % 2 == 0:
                word = word << 16
            else:
                word = word & 0xFFFF0000
            return word.to(tl.float32, bitcast=True)
        else:
            return tl.load(x_row + 4 * quad + b).to(tl.float32)

    @triton.jit
    def _shift_left(v, by: tl.constexpr):
        """``v << by`` for a ``by`` of either sign."""
        if by >= 0:
            return v << by
        else:
            return v >> -by

    @triton.jit
    def _split_code_pair(lo_word, hi_word, b: tl.constexpr, lo_shift: tl.constexpr, hi_shift: tl.constexpr,
                         nib_mask, top_mask):
        """Two 5- or 6-bit codes (Q5_K, Q6_K) of byte ``b`` as fp32s without a conversion: the 4
        low bits of each come from ``lo_word``'s byte ``b`` (its high and low nibble), their high
        bits from ``hi_word``, the lower code's 4 bits below the upper one's.  The shifts put the
        upper code's bits where ``nib_mask`` and ``top_mask`` select them; the lower code's, 4
        bits down, then sit in the masks shifted by 4.  With ``c`` bits a code, the upper one reads
        ``1 + q / 2^c`` (exponent 0), the lower ``16 + q / 2^c`` (exponent 4): Q6_K's masks
        (:data:`Q6K_NIBBLE_MASK`) put the upper code at mantissa bits 17-22, Q5_K's at 18-22."""
        lo = _shift_left(lo_word, lo_shift - 8 * b)
        hi = _shift_left(hi_word, hi_shift - 8 * b)
        upper = ((lo & nib_mask) | 0x3F800000) | (hi & top_mask)
        lower = ((lo & (nib_mask >> 4)) | 0x41800000) | (hi & (top_mask >> 4))
        return upper.to(tl.float32, bitcast=True), lower.to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=("num_splits", "nib_mask", "top_mask"))
    def _q6k_gemv_kernel(x_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, bias_ptr, N, K, row_bytes, stride_xm,
                         stride_om, stride_split, tiles_per_split, num_splits, nib_mask, top_mask,
                         HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
        """The Q6_K GEMV, one super-block of ``BLOCK_N`` rows per step, read as 16-bit words (a
        block is 210 bytes: 2-byte aligned).  Element ``128 n + 32 k + l`` (half ``n``, quarter
        ``k``) has its 4 low bits in ql byte ``64 n + 32 (k % 2) + l`` (the high nibble for ``k >=
        2``), its 2 high bits in qh byte ``32 n + l`` (bits ``2 k``) and its int8 scale at byte
        ``8 n + 2 k + l // 16``.  A ql word and the qh word of the same ``l`` give the codes of
        quarters ``k`` and ``k + 2`` with two shifts (:func:`_split_code_pair`).  Each quarter's FMA sums
        ``x (offset + q / 64)`` are made ``sum x q - 32 sum x`` a word and scaled by ``d sc`` into
        one accumulator, summed once at the end: ``d sc (sum x q - 32 sum x)``."""
        row, pid_k, offs_n, n_mask = _gemv_tile(N, BLOCK_N)
        halves = w_ptr.to(tl.pointer_type(tl.uint16))
        row_byte = offs_n.to(tl.int64) * row_bytes
        # [rows, half n, run r (l // 16), word w of the run]: word w holds l = 16 r + 2 w and + 1
        n2 = tl.arange(0, 2)[None, :, None, None]
        r2 = tl.arange(0, 2)[None, None, :, None]
        w8 = tl.arange(0, 8)[None, None, None, :]
        mask4 = n_mask[:, None, None, None]
        x_row = x_ptr + row * stride_xm
        x_at = 128 * tl.arange(0, 2)[:, None, None] + 16 * tl.arange(0, 2)[None, :, None] \
            + 2 * tl.arange(0, 8)[None, None, :]
        acc = tl.zeros((BLOCK_N, 2, 2, 8), dtype=tl.float32)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, K // 256)
        for j in range(t0, t1):
            blk = row_byte + j * 210
            word = (blk // 2)[:, None, None, None] + 32 * n2 + 8 * r2 + w8  # ql words of quarters 0 and 2
            ql02 = tl.load(halves + word, mask=mask4, other=0).to(tl.uint32)
            ql13 = tl.load(halves + word + 16, mask=mask4, other=0).to(tl.uint32)
            qh = tl.load(halves + (word + 64 - 16 * n2), mask=mask4, other=0).to(tl.uint32)
            sc_at = (blk + 192)[:, None, None, None] + 8 * n2 + r2  # quarter 0's scale of each run
            d = tl.load(halves + (blk // 2 + 104), mask=n_mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
            xs = j * 256 + x_at  # [n, r, w]: quarter 0's x of byte 0
            for k in tl.static_range(4):
                part = tl.zeros((BLOCK_N, 2, 2, 8), dtype=tl.float32)
                xsum = tl.zeros((2, 2, 8), dtype=tl.float32)
                for b in tl.static_range(2):
                    xk = tl.load(x_row + xs + 32 * k + b).to(tl.float32)
                    xsum += xk
                    if k % 2 == 0:
                        upper, lower = _split_code_pair(ql02, qh, b, 13, 17, nib_mask, top_mask)
                    else:
                        upper, lower = _split_code_pair(ql13, qh, b, 13, 15, nib_mask, top_mask)
                    part += xk[None, :, :, :] * (upper if k >= 2 else lower)
                # codes read 16 + q/64 (k < 2) or 1 + q/64: sum x q - 32 sum x = 64 part - c sum x
                off = 1056.0 if k < 2 else 96.0
                sc = tl.load(w_ptr + sc_at + 2 * k, mask=mask4, other=0).to(tl.int8, bitcast=True).to(tl.float32)
                acc += (d[:, None, None, None] * sc) * (64.0 * part - off * xsum[None, :, :, :])
        total = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
        _gemv_finish(total, offs_n, N, out_ptr, stride_om, part_ptr, stride_split, cnt_ptr, bias_ptr, num_splits,
                     HAS_BIAS)

    @triton.jit
    def _q8_pair(words, byte_mask):
        """The two int8 codes of each 16-bit word (``uint32``, zero-extended) as fp32s ``1.5 + q /
        256`` without a conversion: each byte moved to mantissa bits 15-22 and its sign bit
        flipped (``q + 128``, offset binary) as the exponent is set, by one xor."""
        lo = ((words << 15) & byte_mask) ^ 0x3FC00000
        hi = ((words << 7) & byte_mask) ^ 0x3FC00000
        return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=("num_splits", "code_mask"))
    def _q32_gemv_kernel(x_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, bias_ptr, N, K, row_bytes, stride_xm,
                         stride_om, stride_split, tiles_per_split, num_splits, code_mask, HAS_BIAS: tl.constexpr,
                         KIND: tl.constexpr, WORDS: tl.constexpr, CODE_OFF: tl.constexpr,
                         BLOCK_BYTES: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        """The GEMV of the 32-element block types (Q4_0, Q4_1, Q8_0), ``GROUPS`` blocks of
        ``BLOCK_N`` rows a step, read as 16-bit words (the blocks are 18, 20 and 34 bytes: 2-byte
        aligned).  A Q4 word holds elements ``2 w`` and ``2 w + 1`` in its low nibbles, ``+ 16``
        in its high ones (:func:`~.w4a16._nibble_pair`: ``16 + q / 16`` and ``1 + q / 16``); a
        Q8_0 word holds ``2 w`` and ``2 w + 1`` (:func:`_q8_pair`: ``1.5 + q / 256``).  Each word's
        FMAs start from minus what the offsets add (the sums of its ``x``, shared by all rows), so
        they sum ``x q`` over the word's codes (over 16 or 256); one FMA a word scales that by the
        block's ``d`` into an accumulator that is reduced once, after the loop (Q4_1 adds ``m sum
        x`` there too)."""
        row, pid_k, offs_n, n_mask = _gemv_tile(N, BLOCK_N)
        code_mask = code_mask.to(tl.uint32)
        halves = w_ptr.to(tl.pointer_type(tl.uint16))
        row_word = (offs_n.to(tl.int64) * (row_bytes // 2))[:, None, None]
        gi = tl.arange(0, GROUPS)[None, :, None]
        wi = tl.arange(0, WORDS)[None, None, :]
        n_groups = K // 32
        x_row = x_ptr + row * stride_xm
        acc = tl.zeros((BLOCK_N, GROUPS, WORDS), dtype=tl.float32)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(n_groups, GROUPS))
        for t in range(t0, t1):
            g = t * GROUPS + gi  # [1, groups, 1]
            g_mask = g < n_groups
            mask = n_mask[:, None, None] & g_mask
            blk = row_word + g * (BLOCK_BYTES // 2)  # [rows, groups, 1]: the blocks' first words
            words = tl.load(halves + blk + (CODE_OFF // 2) + wi, mask=mask, other=0).to(tl.uint32)
            d = tl.load(halves + blk, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
            xs = x_row + g * 32 + 2 * wi  # [1, groups, words]: x of each word's element 2 w
            x0 = tl.load(xs, mask=g_mask, other=0.0).to(tl.float32)
            x1 = tl.load(xs + 1, mask=g_mask, other=0.0).to(tl.float32)
            if KIND == 2:  # Q8_0: sum x (1.5 + q / 256) - 1.5 sum x = sum x q / 256
                q0, q1 = _q8_pair(words, code_mask)
                dot = x0 * q0 + (-1.5 * (x0 + x1))
                dot = x1 * q1 + dot
                acc += (256.0 * d) * dot
            else:  # Q4: low nibbles read 16 + q / 16, high ones 1 + q / 16
                x16 = tl.load(xs + 16, mask=g_mask, other=0.0).to(tl.float32)
                x17 = tl.load(xs + 17, mask=g_mask, other=0.0).to(tl.float32)
                offset = 16.0 * (x0 + x1) + (x16 + x17)
                x_sum = (x0 + x1) + (x16 + x17)
                if KIND == 0:  # Q4_0: d (q - 8): the offset takes 8 sum x / 16 more
                    offset += 0.5 * x_sum
                hi0, lo0 = _nibble_pair(words, 4, code_mask)
                hi1, lo1 = _nibble_pair(words, 12, code_mask)
                dot = x0 * lo0 - offset
                dot = x1 * lo1 + dot
                dot = x16 * hi0 + dot
                dot = x17 * hi1 + dot
                acc += (16.0 * d) * dot
                if KIND == 1:  # Q4_1: d q + m
                    mn = tl.load(halves + blk + 1, mask=mask, other=0).to(tl.float16, bitcast=True)
                    acc += mn.to(tl.float32) * x_sum
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
        _gemv_finish(total, offs_n, N, out_ptr, stride_om, part_ptr, stride_split, cnt_ptr, bias_ptr, num_splits,
                     HAS_BIAS)

    # The row count varies step by step: no variants for its value or alignment.
    @triton.jit(do_not_specialize=("num_splits", "nibble_mask", "top_mask"))
    def _q4k_gemv_kernel(x_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, bias_ptr, N, K, row_bytes, stride_xm,
                         stride_om, stride_split, tiles_per_split, num_splits, nibble_mask, top_mask,
                         HAS_BIAS: tl.constexpr, FIVE_BITS: tl.constexpr, BLOCK_N: tl.constexpr):
        """The Q4_K GEMV (and Q5_K's: ``FIVE_BITS``), one super-block of ``BLOCK_N`` rows per step.
        Its 16 header bytes (``d``, ``dmin``, 12 bytes of 6-bit scales and mins) are read as 4
        words per row in one load, its 128 code bytes as 32 words ``[rows, pair p, word w]``:
        byte ``b`` of word ``w`` of pair ``p`` holds element ``64 p + 4 w + b`` (low nibble,
        sub-block ``2 p``) and ``64 p + 32 + 4 w + b`` (high nibble, sub-block ``2 p + 1``).  A
        byte's nibbles become ``1 + q / 16`` (high) and ``16 + q / 16`` (low) (:func:`_nibble_pair`)
        and one FMA adds ``x q / 16`` plus ``x`` or ``16 x``; per sub-block these come off and
        its scale and min apply once: ``sum_s d sc_s (sum x q) - dmin mn_s (sum x)``.  Q5_K's
        fifth bits (32 bytes before the codes: bit ``s`` of byte ``l`` is element ``32 s + l``'s)
        are read as 8 words, spread for each pair so that sub-block ``2 p + 1``'s bit sits 4
        above ``2 p``'s, and joined to the nibbles by :func:`_split_code_pair` (``1 + q / 32``,
        ``16 + q / 32``)."""
        row, pid_k, offs_n, n_mask = _gemv_tile(N, BLOCK_N)
        row_off = offs_n.to(tl.int64) * row_bytes
        pair = tl.arange(0, 4)
        word = tl.arange(0, 8)
        words_ptr = w_ptr.to(tl.pointer_type(tl.int32))
        x_row = x_ptr + row * stride_xm
        x_quads = 16 * pair[:, None] + word[None, :]  # [4, 8]: x[4 quad] is byte 0's low nibble's
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, K // 256)
        BLOCK_BYTES: tl.constexpr = 176 if FIVE_BITS else 144
        CODES: tl.constexpr = 48 if FIVE_BITS else 16  # byte offset of the codes
        SCALE: tl.constexpr = 32.0 if FIVE_BITS else 16.0  # codes read in 32nds or 16ths
        for j in range(t0, t1):
            blk = row_off + j * BLOCK_BYTES
            words = tl.load(words_ptr + ((blk + CODES)[:, None, None] // 4 + 8 * pair[None, :, None]
                                         + word[None, None, :]), mask=n_mask[:, None, None], other=0)
            uwords = words.to(tl.uint32, bitcast=True)
            if FIVE_BITS:
                qh = tl.load(words_ptr + ((blk + 16)[:, None] // 4 + word[None, :]), mask=n_mask[:, None],
                             other=0).to(tl.uint32, bitcast=True)
                qh = qh[:, None, :] >> (2 * pair)[None, :, None].to(tl.uint32)  # pair p's bits at 0, 1
                qh = (qh & 0x01010101) | ((qh & 0x02020202) << 3)  # ... at 0, 4 of each byte
            lo = tl.zeros((BLOCK_N, 4, 8), dtype=tl.float32)
            hi = tl.zeros((BLOCK_N, 4, 8), dtype=tl.float32)
            x_lo = tl.zeros((4, 8), dtype=tl.float32)
            x_hi = tl.zeros((4, 8), dtype=tl.float32)
            for b in tl.static_range(4):
                xl = _x_of(x_row, x_quads + j * 64, b)
                xh = _x_of(x_row, x_quads + j * 64 + 8, b)
                x_lo += xl
                x_hi += xh
                if FIVE_BITS:
                    q_hi, q_lo = _split_code_pair(uwords, qh, b, 14, 18, nibble_mask.to(tl.uint32),
                                                  top_mask.to(tl.uint32))
                else:
                    q_hi, q_lo = _nibble_pair(uwords, 8 * b + 4, nibble_mask.to(tl.uint32))
                lo += xl[None, :, :] * q_lo
                hi += xh[None, :, :] * q_hi
            sum_lo = tl.sum(x_lo, axis=1)  # [4]: sum of x over sub-block 2 p
            sum_hi = tl.sum(x_hi, axis=1)
            dot_lo = tl.sum(lo, axis=2) - 16.0 * sum_lo[None, :]  # [rows, 4]: sum x q / SCALE over sub-block 2 p
            dot_hi = tl.sum(hi, axis=2) - sum_hi[None, :]
            head = tl.load(words_ptr + (blk // 4)[:, None] + pair[None, :], mask=n_mask[:, None], other=0)
            w02, w13 = tl.split(tl.reshape(head, (BLOCK_N, 2, 2)))  # words (0, 2) and (1, 3)
            w0, w2 = tl.split(w02)
            w1, w3 = tl.split(w13)
            sc_lo, mn_lo = _k_scale_min_words(w1[:, None], w2[:, None], w3[:, None], 2 * pair[None, :])
            sc_hi, mn_hi = _k_scale_min_words(w1[:, None], w2[:, None], w3[:, None], 2 * pair[None, :] + 1)
            d = _half_of(w0, False)
            dmin = _half_of(w0, True)
            acc += (SCALE * d) * tl.sum(sc_lo * dot_lo + sc_hi * dot_hi, axis=1)
            acc -= dmin * tl.sum(mn_lo * sum_lo[None, :] + mn_hi * sum_hi[None, :], axis=1)
        _gemv_finish(acc, offs_n, N, out_ptr, stride_om, part_ptr, stride_split, cnt_ptr, bias_ptr, num_splits,
                     HAS_BIAS)

    @triton.jit(do_not_specialize=("M",))
    def _gguf_gemm_kernel(x_ptr, w_ptr, h_ptr, out_ptr, M, N, K, row_bytes, stride_xm, stride_om, stride_split,
                          tiles_per_split, KIND: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """A ``[BLOCK_M, BLOCK_N]`` tile of the output over one K slice (grid axis 2)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        row_off = offs_n.to(tl.int64)[None, None, :] * row_bytes
        l = tl.arange(0, 32)[None, :, None]
        n_groups = K // 32
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BLOCK_K))
        for t in range(t0, t1):
            offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
            # The [groups, 32, BLOCK_N] tile is the [BLOCK_K, BLOCK_N] one.
            g = t * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)[:, None, None]
            mask = (g < n_groups) & n_mask[None, None, :]
            w = _dequant(w_ptr, h_ptr, row_off, g, l, mask, KIND)
            # The weight rounded to the activation dtype, as a dense model of it holds it.
            w = tl.reshape(w, (BLOCK_K, BLOCK_N)).to(x_ptr.dtype.element_ty)
            acc += tl.dot(xv.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        dst = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
