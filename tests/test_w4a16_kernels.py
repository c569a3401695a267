"""The W4A16 Triton kernels against the torch reference (dequantize, multiply in fp32).

Without CUDA they run under the Triton interpreter on small shapes (every path: the GEMV, the
tensor-core GEMM, split-K, act-order ``g_idx`` gathers, constant zero points, bias, writing
into a given buffer); with CUDA the same tests run at full size, plus the ``gpu``-marked
8B-class shapes and the automatic configs.

The reference multiplies the same activations by the exact dequantized weight in fp32, and
the error is measured against the output's scale (its largest magnitude).  fp32: 1e-4
(summation order only).  16-bit activations: the tensor-core kernel rounds the dequantized
weight to the activation dtype (as a dense model of it holds it) and the output once, the
GEMV the output only: within 2e-2 (bf16) / 4e-3 (fp16), the attention kernels' tolerances.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from .triton_interpreter import (
    CUDA,
    DEVICE,
    dot_terms_max,
    rerun_in_fresh_process,
    seeded_generator,
    skip_unless_runnable,
)

pytest.importorskip("triton")

from pagedattn.kernels import w4a16

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# Small under the interpreter (it runs programs one by one in Python).
N, K = (4096, 4096) if CUDA else (80, 256)


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_kernels_in_fresh_interpreter_process")


def test_kernels_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


def _weights(g: torch.Generator, n: int, k: int, group_size: int, *, zeros: bool, act_order: bool,
             scale_dtype: torch.dtype = torch.float16) -> dict:
    groups = k // group_size
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).to(scale_dtype)
    z = torch.randint(0, 16, (groups, n), generator=g).to(scale_dtype) if zeros else None
    # Act-order rows sorted by group: groups of uneven sizes (what a row-parallel shard holds).
    g_idx = torch.sort(torch.randint(0, groups, (k,), generator=g, dtype=torch.int32)).values if act_order else None
    return {"qweight": qweight.to(DEVICE), "scales": scales.to(DEVICE), "zeros": None if z is None else z.to(DEVICE),
            "group_size": group_size, "g_idx": None if g_idx is None else g_idx.to(DEVICE)}


def _check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == ref.shape and ref.dtype == torch.float32
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOL[dtype] * scale, f"max err {err:.3g} vs scale {scale:.3g}"


def _config(m: int, split: int, gemv: bool, group_size: int) -> w4a16.W4A16Config | None:
    if CUDA:
        return None  # the heuristics' own configs at full size
    bk = min(32, group_size)
    return w4a16.W4A16Config(1 if gemv else 16, 32, bk, split, gemv=gemv)


PATHS = [(1, True, 1), (1, True, 4), (5, False, 2), (19, False, 1)]  # (rows, GEMV?, split-K)
WEIGHTS = [(32, True, False), (64, False, False), (128, True, True)]  # (group size, zeros?, act-order g_idx?)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every path with every weight form, the activation dtype rotating (each pair of the three met).
CASES = [(DTYPES[(i + j) % 3], *p, *w) for i, p in enumerate(PATHS) for j, w in enumerate(WEIGHTS)]


@pytest.mark.parametrize(("dtype", "m", "gemv", "split", "group_size", "zeros", "act_order"), CASES)
def test_w4a16_matches_reference(dtype: torch.dtype, m: int, gemv: bool, split: int, group_size: int,
                                 zeros: bool, act_order: bool) -> None:
    g = seeded_generator("w4a16", dtype, m, gemv, split, group_size, zeros, act_order)
    w = _weights(g, N, K, group_size, zeros=zeros, act_order=act_order)
    x = torch.randn(m, K, generator=g).to(dtype=dtype, device=DEVICE)
    bias = torch.randn(N, generator=g).to(dtype=dtype, device=DEVICE) if m == 5 else None
    got = w4a16.w4a16_linear(x, **w, bias=bias, config=_config(m, split, gemv, group_size))
    _check(got, w4a16.w4a16_linear_ref(x.float(), **w, bias=bias), dtype)


@pytest.mark.parametrize(("group_size", "zeros", "act_order"), WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_the_reference_weight_rounded_to_the_dtype(group_size: int, zeros: bool, act_order: bool,
                                                                 dtype: torch.dtype) -> None:
    """The Triton dequantization equals the reference's float32 weights rounded to ``dtype``,
    element for element, on a ragged N (a partial tile of outputs).  The interpreter casts
    float32 to bfloat16 by truncation, not to nearest as a GPU does: there within one bfloat16
    step."""
    g = seeded_generator("w4a16-dequant", group_size, zeros, act_order, dtype)
    n, k = N - 3, K - 64 if K > 256 else K + 64
    w = _weights(g, n, k, group_size, zeros=zeros, act_order=act_order)
    got = w4a16.dequantize(w["qweight"], w["scales"], w["zeros"], group_size, dtype, w["g_idx"])
    ref = w4a16.dequantize_ref(w["qweight"], w["scales"], w["zeros"], group_size, w["g_idx"])
    assert got.dtype == dtype
    if CUDA or dtype == torch.float32:
        assert torch.equal(got, ref.to(dtype))
    else:
        assert ((got.float() - ref).abs() <= ref.abs() * 2**-7).all()


def test_prefill_rows_dequantize_then_multiply_densely(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``WIDE_MAX_ROWS`` rows the call writes ``W^T`` in the activation dtype and
    multiplies it densely (act-order weights, a bias, a given buffer); fewer rows take the GEMM."""
    monkeypatch.setattr(w4a16, "WIDE_MAX_ROWS", 5)
    real = w4a16.dequantize
    seen = []
    monkeypatch.setattr(w4a16, "dequantize", lambda *a, **kw: seen.append(a[4]) or real(*a, **kw))
    g = seeded_generator("w4a16-dense")
    w = _weights(g, N, K, 32, zeros=True, act_order=True)
    for m, calls in ((7, [torch.float32]), (5, [torch.float32])):
        x = torch.randn(m, K, generator=g).to(DEVICE)
        bias = torch.randn(N, generator=g).to(DEVICE)
        out = torch.empty(m, N, device=DEVICE)
        got = w4a16.w4a16_linear(x, **w, bias=bias, out=out)
        assert got.data_ptr() == out.data_ptr() and seen == calls
        _check(got, w4a16.w4a16_linear_ref(x, **w, bias=bias), torch.float32)


def test_wide_tiles_dequantize_first_only_where_their_partials_outweigh_the_weight() -> None:
    """128-256 rows run the GEMM in 128-row tiles, K split only while the grid is smaller than
    the GPU; a split whose fp32 partials would outweigh the int4 weight (1.5x) dequantizes first,
    as does every call past 256 rows.  The 8B shapes on an H100's 132 SMs: what was measured."""
    dev, sms = torch.device("cpu"), 132

    def first(m: int, n: int, k: int) -> bool:
        return w4a16.dequantizes_first(m, n, k, w4a16.choose_config(m, n, k, 128, dev, sms))

    for m in (128, 200, 256):
        down, gate_up = (w4a16.choose_config(m, n, k, 128, dev, sms) for n, k in ((4096, 14336), (28672, 4096)))
        assert down.block_m == gate_up.block_m == 128 and down.split_k > 1 and gate_up.split_k == 1
        assert not first(m, 4096, 14336) and not first(m, 28672, 4096)
        assert first(m, 6144, 4096) and first(m, 4096, 4096)  # qkv, o: 48 and 32 tiles split 8-16 ways
    assert not first(127, 6144, 4096) and not first(64, 4096, 4096)  # the narrow tiles' split is never refused
    assert first(257, 28672, 4096) and first(2048, 4096, 14336)


@pytest.mark.parametrize(("dtype", "magic_bits", "magic"), [(torch.bfloat16, 0x4300, 128.0),
                                                            (torch.float16, 0x6400, 1024.0)])
def test_half_math_dequantization_rounds_once(dtype: torch.dtype, magic_bits: int, magic: float) -> None:
    """The GEMM's dequantization in bf16/fp16 on a GPU, redone with torch's CPU half arithmetic
    (each operation rounded to nearest, as the GPU's): a code or-ed into ``magic``'s mantissa
    reads as ``magic + q``; minus ``magic + z`` it is ``q - z`` exactly, and the multiply by the
    scale rounds once -- the bits of ``(q - z) * s`` in fp32 rounded to the dtype, which the
    dequantize-first path and the interpreter's fp32 path give.  Every code and zero point, with
    random scales of every magnitude the dtype holds for weights."""
    g = seeded_generator("half-math", dtype)
    q = torch.arange(16, dtype=torch.int16)[:, None, None]
    z = torch.arange(16)[None, :, None]
    s = (torch.randn(1, 1, 4096, generator=g) * torch.exp2(torch.randint(-14, 4, (1, 1, 4096), generator=g))).to(dtype)
    qm = (q | magic_bits).view(dtype)
    assert torch.equal(qm.float(), magic + q.float())
    got = (qm - (magic + z).to(dtype)) * s
    want = ((q.float() - z.float()) * s.float()).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("hi_bit", [4, 12, 20, 28])
def test_nibble_pair_reads_both_nibbles_exactly(hi_bit: int) -> None:
    """The GEMVs' dequantization without a conversion: one shifted word gives nibble ``hi_bit``
    as exactly ``1 + q/16`` and nibble ``hi_bit - 4`` as exactly ``16 + q/16``, for every value
    of both (and whatever the other nibbles and the sign bit hold)."""
    import triton
    import triton.language as tl

    @triton.jit
    def planes(words_ptr, hi_ptr, lo_ptr, mask, BLOCK: tl.constexpr, HI_BIT: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        words = tl.load(words_ptr + offs).to(tl.uint32, bitcast=True)
        hi, lo = w4a16._nibble_pair(words, HI_BIT, mask.to(tl.uint32))
        tl.store(hi_ptr + offs, hi)
        tl.store(lo_ptr + offs, lo)

    g = seeded_generator("nibble pair")
    q_hi, q_lo = torch.arange(16).repeat_interleave(16), torch.arange(16).repeat(16)  # every pair of values
    noise = torch.randint(-(2**31), 2**31 - 1, (256,), generator=g, dtype=torch.int64)
    keep = ~((0xF << hi_bit) | (0xF << (hi_bit - 4)))
    words = ((noise & keep) | (q_hi << hi_bit) | (q_lo << (hi_bit - 4)))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(DEVICE)
    hi, lo = (torch.empty(256, device=DEVICE) for _ in range(2))
    planes[(1,)](words, hi, lo, w4a16.NIBBLE_MASK, BLOCK=256, HI_BIT=hi_bit)
    assert torch.equal(hi.cpu(), 1 + q_hi.float() / 16)
    assert torch.equal(lo.cpu(), 16 + q_lo.float() / 16)


def test_gemv_tile_of_a_whole_group() -> None:
    """BLOCK_K equal to the group size (what the heuristics pick for the GEMV), split K."""
    g = seeded_generator("whole-group")
    w = _weights(g, N, K, 64, zeros=True, act_order=False)
    x = torch.randn(1, K, generator=g).to(dtype=torch.bfloat16, device=DEVICE)
    cfg = None if CUDA else w4a16.W4A16Config(1, 32, 64, 2, gemv=True)
    _check(w4a16.w4a16_linear(x, **w, config=cfg), w4a16.w4a16_linear_ref(x.float(), **w), torch.bfloat16)


def test_split_gemv_is_bitwise_repeatable_and_leaves_its_counters_at_zero() -> None:
    """The GEMV's K slices finish in the kernel: the last slice of a tile sums the partials in
    slice order, so a call gives the same bits as the two-kernel reduction and as itself, and the
    tile counters are back at zero for the next launch (the bias joins in the same place)."""
    g = seeded_generator("split-finish")
    w = _weights(g, N, K, 64, zeros=True, act_order=False)
    x = torch.randn(1, K, generator=g).to(dtype=torch.bfloat16, device=DEVICE)
    bias = torch.randn(N, generator=g).to(dtype=torch.bfloat16, device=DEVICE)
    cfg = w4a16.W4A16Config(1, 32 if not CUDA else 128, 64, 4, gemv=True)
    first = w4a16.w4a16_linear(x, **w, bias=bias, config=cfg)
    assert torch.equal(first, w4a16.w4a16_linear(x, **w, bias=bias, config=cfg))
    assert int(w4a16._tile_counters(first.device).count_nonzero()) == 0
    _check(first, w4a16.w4a16_linear_ref(x.float(), **w, bias=bias), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_gated_gemv_is_the_gemv_of_the_fused_activation(dtype: torch.dtype) -> None:
    """The GEMV on a gated MLP's gate and up halves gives the activation kernel's output through
    the GEMV (split or not): the same bits in bf16 and fp16, where each product is rounded; in
    fp32 the GPU's compiler may round the SiLU's quotient differently in the two kernels (one
    ulp).  More than one row, or act-order, is refused."""
    from pagedattn.models.fused_ops import silu_and_mul_triton

    g = seeded_generator("silu-gated", dtype)
    w = _weights(g, N, K, 64, zeros=True, act_order=False)
    h = (torch.randn(1, 2 * K, generator=g) * 3).to(dtype=dtype, device=DEVICE)
    for split in (1, 3):
        cfg = w4a16.W4A16Config(1, 32 if not CUDA else 128, 32, split, gemv=True)
        fused = w4a16.w4a16_linear(h, **w, config=cfg, silu_gated=True)
        separate = w4a16.w4a16_linear(silu_and_mul_triton(h), **w, config=cfg)
        if dtype == torch.float32 and CUDA:
            torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5 * separate.abs().max().item())
        else:
            assert torch.equal(fused, separate)
    with pytest.raises(ValueError, match="one row"):
        w4a16.w4a16_linear(h.expand(2, -1).contiguous(), **w, silu_gated=True)
    act = _weights(g, N, K, 64, zeros=True, act_order=True)
    with pytest.raises(ValueError, match="g_idx"):
        w4a16.w4a16_linear(h, **act, silu_gated=True)


def test_writes_into_a_given_buffer_and_ragged_n() -> None:
    """The row-parallel layers hand the all-reduce's buffer in; N not a multiple of the tile."""
    g = seeded_generator("out")
    n = N - 24
    w = _weights(g, n, K, 64, zeros=True, act_order=False)
    x = torch.randn(3, K, generator=g).to(dtype=torch.float32, device=DEVICE)
    out = torch.full((3, n), float("nan"), device=DEVICE)
    got = w4a16.w4a16_linear(x, **w, out=out, config=_config(3, 2, False, 64))
    assert got.data_ptr() == out.data_ptr()
    _check(out, w4a16.w4a16_linear_ref(x.float(), **w), torch.float32)


def test_prefill_tiles_cover_ragged_m() -> None:
    g = seeded_generator("prefill")
    w = _weights(g, N, K, 32, zeros=True, act_order=False)
    m = 70 if not CUDA else 1000
    x = torch.randn(m, K, generator=g).to(dtype=torch.bfloat16, device=DEVICE)
    cfg = None if CUDA else w4a16.W4A16Config(32, 32, 32, 1)
    _check(w4a16.w4a16_linear(x, **w, config=cfg), w4a16.w4a16_linear_ref(x.float(), **w), torch.bfloat16)


def test_wide_tiles_cover_ragged_m_with_k_split() -> None:
    """The 128-row tile of 128-256 rows, two M tiles (the second ragged) and K split."""
    g = seeded_generator("wide")
    w = _weights(g, N, K, 64, zeros=True, act_order=False)
    x = torch.randn(130, K, generator=g).to(dtype=torch.bfloat16, device=DEVICE)
    cfg = None if CUDA else w4a16.W4A16Config(128, 32, 32, 2)
    _check(w4a16.w4a16_linear(x, **w, config=cfg), w4a16.w4a16_linear_ref(x.float(), **w), torch.bfloat16)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 90), groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128]), m=st.integers(1, 2),
       block_n=st.sampled_from([32, 64, 128]), block_k=st.sampled_from([16, 32, 64]),
       split=st.sampled_from([1, 2, 3, 5]), zeros=st.booleans(), act_order=st.booleans(), with_bias=st.booleans(),
       gated=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_gemv_on_any_shape_and_launch(n: int, groups: int, group_size: int, m: int, block_n: int, block_k: int,
                                      split: int, zeros: bool, act_order: bool, with_bias: bool, gated: bool,
                                      dtype: torch.dtype, seed: int) -> None:
    """The GEMV against the reference on drawn shapes and launches: N off or below the tile, K of
    one to four groups (slices past K, more slices than tiles), two rows, zero points or not,
    act-order ``g_idx``, bias, each activation dtype, a gated MLP's halves (one row, no
    act-order) against the reference on ``silu(gate) * up``.  The error is held against
    ``sum |x w|`` (one output may be a near-cancelling sum)."""
    from pagedattn.models.fused_ops import silu_and_mul_ref

    assume(group_size % block_k == 0 and (not gated or (m == 1 and not act_order)))
    k = groups * group_size
    g = seeded_generator("w4a16-any-shape", seed)
    w = _weights(g, n, k, group_size, zeros=zeros, act_order=act_order)
    h = torch.randn(m, 2 * k if gated else k, generator=g).to(dtype=dtype, device=DEVICE)
    x = silu_and_mul_ref(h) if gated else h
    bias = torch.randn(n, generator=g).to(dtype=dtype, device=DEVICE) if with_bias else None
    got = w4a16.w4a16_linear(h, **w, bias=bias, config=w4a16.W4A16Config(1, block_n, block_k, split, gemv=True),
                             silu_gated=gated)
    w_t = w4a16.dequantize_ref(w["qweight"], w["scales"], w["zeros"], group_size, w["g_idx"])  # [K, N]
    err = (got.float() - w4a16.w4a16_linear_ref(x.float(), **w, bias=bias).float()).abs().max().item()
    assert got.dtype == dtype and err <= TOL[dtype] * dot_terms_max(x, w_t.t(), bias), err


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 90), groups=st.integers(1, 3), group_size=st.sampled_from([32, 64]), m=st.integers(2, 40),
       block_m=st.sampled_from([16, 32]), block_n=st.sampled_from([32, 64]), block_k=st.sampled_from([16, 32]),
       split=st.sampled_from([1, 2, 3]), zeros=st.booleans(), act_order=st.booleans(), with_bias=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_gemm_on_any_shape_and_launch(n: int, groups: int, group_size: int, m: int, block_m: int, block_n: int,
                                      block_k: int, split: int, zeros: bool, act_order: bool, with_bias: bool,
                                      dtype: torch.dtype, seed: int) -> None:
    """The tensor-core GEMM (its transposed tiles, ragged in M and N, K split past the tiles
    there are, act-order scale rows, bias, each dtype: on a GPU bf16/fp16 in half math) against
    the reference on drawn shapes and launches; the error held against ``sum |x w|``."""
    assume(group_size % block_k == 0)
    k = groups * group_size
    g = seeded_generator("w4a16-gemm-any-shape", seed)
    w = _weights(g, n, k, group_size, zeros=zeros, act_order=act_order)
    x = torch.randn(m, k, generator=g).to(dtype=dtype, device=DEVICE)
    bias = torch.randn(n, generator=g).to(dtype=dtype, device=DEVICE) if with_bias else None
    got = w4a16.w4a16_linear(x, **w, bias=bias, config=w4a16.W4A16Config(block_m, block_n, block_k, split))
    w_t = w4a16.dequantize_ref(w["qweight"], w["scales"], w["zeros"], group_size, w["g_idx"])  # [K, N]
    err = (got.float() - w4a16.w4a16_linear_ref(x.float(), **w, bias=bias).float()).abs().max().item()
    assert got.dtype == dtype and got.shape == (m, n) and err <= TOL[dtype] * dot_terms_max(x, w_t.t(), bias), err


@given(cap=st.sampled_from([1, 8, 16, 64, 128]), extents=st.lists(st.integers(1, 1 << 20), min_size=1, max_size=3))
def test_pow2_tile_is_the_largest_power_of_two_dividing_every_extent(cap: int, extents: list[int]) -> None:
    t = w4a16.pow2_tile(cap, *extents)
    assert t >= 1 and t & (t - 1) == 0 and t <= cap and all(e % t == 0 for e in extents)
    assert t == cap or any(e % (2 * t) for e in extents)


def test_configs_split_k_only_while_the_grid_is_small() -> None:
    dev, sms = torch.device("cpu"), 132  # an H100's SMs
    dec = w4a16.choose_config(1, 4096, 4096, 128, dev, sms)
    assert dec.gemv and dec.split_k > 1 and 4096 % (dec.block_k * dec.split_k) == 0
    assert 4096 // (dec.block_k * dec.split_k) >= 2  # every slice streams at least two tiles
    for n, k in ((6144, 4096), (28672, 4096), (4096, 14336)):  # the sweep's best on every 8B shape
        assert w4a16.choose_config(1, n, k, 128, dev, sms).split_k == 16
    wide = w4a16.choose_config(1, 128256, 4096, 128, dev, sms)  # enough programs with fewer slices
    assert wide.split_k < dec.split_k and -(-128256 // wide.block_n) * wide.split_k >= 16 * sms
    pre = w4a16.choose_config(2048, 4096, 4096, 128, dev, sms)
    assert not pre.gemv and pre.split_k == 1
    # Every row count the narrow tiles serve splits a narrow layer's K.
    for m in (2, 64, 65, w4a16.SPLIT_K_MAX_ROWS):
        assert w4a16.choose_config(m, 4096, 14336, 128, dev, sms).split_k > 1
    # The narrow tiles' 128 outputs and slices of at least 8 K tiles: each 8B shape's fastest
    # split at 16 and 64 rows on an H100.
    for m in (16, 64):
        got = [w4a16.choose_config(m, n, k, 128, dev, sms) for n, k in ((6144, 4096), (4096, 4096), (28672, 4096),
                                                                         (4096, 14336))]
        assert [c.split_k for c in got] == [8, 8, 4, 16] and {c.block_n for c in got} == {128}
    assert w4a16.choose_config(16, 4096, 4096, 32, dev, sms).block_k <= 32


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 128, 200, 256, 2048])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_llama8b_shapes(m: int, n: int, k: int) -> None:
    """Llama-3-8B's projections (qkv, o, gate/up, down) at decode and prefill batch sizes."""
    g = seeded_generator("8b", m, n, k)
    w = _weights(g, n, k, 128, zeros=True, act_order=False)
    x = torch.randn(m, k, generator=g).to(dtype=torch.bfloat16, device=DEVICE)
    _check(w4a16.w4a16_linear(x, **w), w4a16.w4a16_linear_ref(x.float(), **w), torch.bfloat16)


@pytest.mark.parametrize("fmt_args", [("gptq", 32, False, True), ("awq", 32, False, False)], ids=["gptq-act", "awq"])
def test_int4_model_logits_through_the_kernels(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                               fmt_args: tuple[str, int, bool, bool]) -> None:
    """A tiny int4 Llama in its packed form (act-order GPTQ: rows sorted by group, input
    permuted; AWQ: the one-row MLP's SiLU-and-mul inside the down projection's GEMV), every
    linear through the kernels: a prefill chunk (GEMM) then one-row decodes (GEMV), against HF
    on the dequantized weights (fp32: 1e-4 of the logits' scale, the same argmax)."""
    import json

    from pagedattn.models.config import ModelArchConfig
    from pagedattn.models.layers import QuantLinear
    from pagedattn.models.layers.quant import QuantRowParallelLinear, checkpoint_to_internal
    from pagedattn.models.loader import iter_safetensors
    from pagedattn.models.registry import build_model
    from pagedattn.models.testing import PagedHarness

    from .quant_checkpoints import Fmt, make_quantized_model

    method, group_size, sym, act = fmt_args
    path, hf = make_quantized_model(tmp_path, Fmt(method, group_size, sym=sym, desc_act=act), seed=9,
                                    overrides={"num_hidden_layers": 1})
    fused = []
    plain = QuantRowParallelLinear.forward_silu
    monkeypatch.setattr(QuantRowParallelLinear, "forward_silu", lambda self, h: fused.append(1) or plain(self, h))
    cfg = ModelArchConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    assert cfg.quant is not None
    model = build_model(cfg, torch.float32, DEVICE)
    model.load_weights(checkpoint_to_internal(iter_safetensors([path / "model.safetensors"]), cfg.quant))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.finish_loading(dequantize=False)
        m.cpu_kernels = not CUDA  # the interpreter, on CPU tensors
    assert all((m.perm is not None) == act for m in layers)
    ids = torch.randint(3, 320, (11,), generator=seeded_generator("model", method)).tolist()
    h = PagedHarness(model, num_blocks=16, block_size=8, device=DEVICE)
    got = torch.cat([h.step([("s", ids[:9])])[0]] + [h.step([("s", [t])])[0] for t in ids[9:]]).float().cpu()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert len(fused) == (0 if act else 2)  # the two one-row decodes (act-order: permuted, never fused)
