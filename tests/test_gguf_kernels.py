"""The GGUF Triton matmuls against gguf's own dequantizer (dequantize, multiply in fp32).

Without CUDA they run under the Triton interpreter on small shapes: every type, the GEMV
(with and without split-K), the tensor-core GEMM (with and without split-K), K not a multiple
of the tile, bias, and writing into a column slice of a wider buffer.  Blocks are random:
``gguf.quants.quantize`` of random weights where gguf-py can quantize the type (Q4_0, Q4_1,
Q8_0), else random bytes with finite half-precision scale fields (the K-quants).

Tolerances as the W4A16 kernels' (see tests/test_w4a16_kernels.py): fp32 summation order only,
16-bit activations one rounding of the weight (GEMM) and of the output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
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

from pagedattn.kernels import gguf_matmul as gm

gguf = pytest.importorskip("gguf")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
TYPES = list(gm.GGUF_BLOCKS)
# Small under the interpreter; K a multiple of every type's block (768 = 3 super-blocks).
N, K = (4096, 4096) if CUDA else (40, 768)


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_kernels_in_fresh_interpreter_process")


def test_kernels_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


def random_blocks(kind: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[n, row bytes]`` of type ``kind``: gguf's quantization of random weights, or
    (types gguf-py cannot quantize) random bytes with half-precision scales of a weight's size."""
    gtype = gguf.GGMLQuantizationType[kind]
    try:
        return np.asarray(gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, gtype))
    except NotImplementedError:
        pass
    elems, nbytes = gm.GGUF_BLOCKS[kind]
    count = n * k // elems
    raw = rng.integers(0, 256, (count, nbytes), dtype=np.uint8)
    for at in {"Q6_K": (208,)}.get(kind, (0, 2)):  # d (and dmin)
        raw[:, at:at + 2] = (rng.uniform(0.5, 2.0, count) * 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def _case(kind: str, m: int, n: int, k: int, dtype: torch.dtype, *key: Any) -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded_generator(kind, m, n, k, dtype, *key)
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g)))
    blocks = torch.from_numpy(random_blocks(kind, n, k, rng)).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(dtype=dtype, device=DEVICE)
    return x, blocks


def _check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> None:
    """``got`` within ``TOL`` of ``ref``, relative to ``scale`` (default: the largest output)."""
    assert got.dtype == dtype and got.shape == ref.shape
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item() if scale is None else scale
    assert scale > 0 and err <= TOL[dtype] * scale, f"max err {err:.3g} vs scale {scale:.3g}"


def _ref(x: torch.Tensor, blocks: torch.Tensor, kind: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    return gm.gguf_linear_ref(x.float(), blocks, kind, bias)


# Decode (the GEMV, split K or not) and the GEMM (split or not); block_k 512 leaves a partial
# last tile of K = 768 (and of 1024 + 256), 64 splits it in whole tiles.
CONFIGS = {
    "gemv": (1, gm.GGUFMatmulConfig(1, 32, 512, 1, gemv=True)),
    "gemv_split": (1, gm.GGUFMatmulConfig(1, 32, 128, 3, gemv=True)),
    "gemm": (5, gm.GGUFMatmulConfig(16, 32, 512, 1)),
    "gemm_split": (19, gm.GGUFMatmulConfig(16, 32, 64, 2)),
}


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("path", sorted(CONFIGS))
def test_kernel_matches_gguf_dequantize(kind: str, path: str) -> None:
    m, cfg = CONFIGS[path]
    x, blocks = _case(kind, m, N, K, torch.float32, path)
    _check(gm.gguf_linear(x, blocks, kind, config=cfg), _ref(x, blocks, kind), torch.float32)


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 24])
def test_16_bit_activations_and_automatic_configs(kind: str, dtype: torch.dtype, m: int) -> None:
    x, blocks = _case(kind, m, N, K, dtype)
    _check(gm.gguf_linear(x, blocks, kind), _ref(x, blocks, kind), dtype)


def test_q4k_gemv_reads_bf16_rows_at_any_offset() -> None:
    """The Q4_K GEMV reads bf16 activations four to an 8-byte load: rows of a view that starts 2
    or 4 bytes into its storage are copied to aligned memory first (on a GPU an unaligned 8-byte
    load faults), and the result is the aligned row's."""
    x, blocks = _case("Q4_K", 1, N, K, torch.bfloat16, "offset")
    cfg = None if CUDA else CONFIGS["gemv_split"][1]
    wide = torch.empty(1, K + 2, dtype=torch.bfloat16, device=DEVICE)
    for start in (1, 2):
        view = wide[:, start:start + K]
        view.copy_(x)
        assert view.data_ptr() % 8
        aligned = gm.gemv_activations(view)
        assert aligned.data_ptr() % 8 == 0 and torch.equal(aligned, x)
        _check(gm.gguf_linear(view, blocks, "Q4_K", config=cfg), _ref(x, blocks, "Q4_K"), torch.bfloat16)


@pytest.mark.parametrize("kind", TYPES)
def test_gemv_reads_blocks_at_any_offset(kind: str) -> None:
    """The GEMVs read their blocks as 16- or 32-bit words: a weight that starts 1, 2 or 3 bytes
    into its storage (never a model's) is read from an aligned copy, with the same result."""
    x, blocks = _case(kind, 1, N, K, torch.float32, "blocks-offset")
    cfg = None if CUDA else CONFIGS["gemv_split"][1]
    want = _ref(x, blocks, kind)
    flat = torch.empty(blocks.numel() + 3, dtype=torch.uint8, device=DEVICE)
    for start in (1, 2, 3):
        view = flat[start:start + blocks.numel()].view(blocks.shape)
        view.copy_(blocks)
        _check(gm.gguf_linear(x, view, kind, config=cfg), want, torch.float32)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(kind=st.sampled_from(TYPES), n=st.integers(1, 70), k_blocks=st.integers(1, 5), m=st.integers(1, 2),
       block_n=st.sampled_from([16, 32, 64]), block_k=st.sampled_from([64, 128, 256]),
       split=st.sampled_from([1, 2, 3, 5]), with_bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_gemv_on_any_shape_and_launch(kind: str, n: int, k_blocks: int, m: int, block_n: int, block_k: int,
                                      split: int, with_bias: bool, dtype: torch.dtype, seed: int) -> None:
    """Every GEMV against gguf's dequantizer on shapes the model tests do not reach: N not a
    multiple of the tile (or below it), K of one block up to a few (so a tile or a slice runs
    past K, or slices outnumber the steps), more than one activation row, with and without bias,
    in each activation dtype (16-bit: one rounding of the output).  The error is held against
    ``sum |x w|``, as a floating-point dot product's error is bounded: with one or two outputs
    the largest one may be a near-cancelling sum, far smaller than its terms.  (The GEMVs read
    codes with an offset, ``16 + q/64`` for some of Q6_K's, that the sums take off again; in fp32
    their errors measured 0.3-3e-7 of ``sum |x w|`` at K = 2048, every type.)"""
    k = k_blocks * gm.GGUF_BLOCKS[kind][0]
    x, blocks = _case(kind, m, n, k, dtype, "any-shape", seed)
    bias = torch.randn(n, generator=seeded_generator("any-shape-bias", seed)).to(DEVICE, dtype) if with_bias else None
    cfg = gm.GGUFMatmulConfig(1, block_n, block_k, split, gemv=True)
    _check(gm.gguf_linear(x, blocks, kind, bias, config=cfg), _ref(x, blocks, kind, bias), dtype,
           scale=dot_terms_max(x, gm.dequantize_ref(blocks, kind), bias))


def test_gemv_with_more_k_slices_than_steps() -> None:
    """A split asked for beyond the K steps there are (one super-block, three slices) is cut to them."""
    for kind in ("Q4_K", "Q6_K", "Q8_0"):
        x, blocks = _case(kind, 1, 24, 256, torch.float32, "one-step")
        got = gm.gguf_linear(x, blocks, kind, config=gm.GGUFMatmulConfig(1, 32, 256, 3, gemv=True))
        _check(got, _ref(x, blocks, kind), torch.float32)


@pytest.mark.parametrize("path", ["gemv_split", "gemm"])
def test_bias_and_a_column_slice_of_the_output(path: str) -> None:
    """Written into a slice of a wider buffer (a fused layer's part), the rest untouched; K of
    1280, not a multiple of the 512-wide tile."""
    m, cfg = CONFIGS[path]
    x, blocks = _case("Q5_K", m, 24, 1280, torch.float32, path)
    bias = torch.randn(24, generator=seeded_generator(path)).to(DEVICE)
    wide = torch.full((m, 40), 7.0, device=DEVICE)
    gm.gguf_linear(x, blocks, "Q5_K", bias, out=wide[:, 8:32], config=cfg)
    _check(wide[:, 8:32], _ref(x, blocks, "Q5_K", bias), torch.float32)
    assert bool((wide[:, :8] == 7).all()) and bool((wide[:, 32:] == 7).all())


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0"])
def test_prefill_rows_dequantize_then_multiply_densely(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """From ``DEQUANT_MIN_ROWS`` rows the call writes the whole weight in the activation dtype
    and multiplies it densely: the same product, with the bias, into a column slice."""
    monkeypatch.setattr(gm, "DEQUANT_MIN_ROWS", 6)
    real = gm.dequantize
    seen = []
    monkeypatch.setattr(gm, "dequantize", lambda *a: seen.append(a[1]) or real(*a))
    x, blocks = _case(kind, 7, 24, 1280, torch.float32, "dense")
    bias = torch.randn(24, generator=seeded_generator(kind, "dense-bias")).to(DEVICE)
    wide = torch.full((7, 40), 7.0, device=DEVICE)
    gm.gguf_linear(x, blocks, kind, bias, out=wide[:, 8:32])
    assert seen == [kind]
    _check(wide[:, 8:32], _ref(x, blocks, kind, bias), torch.float32)
    assert bool((wide[:, :8] == 7).all()) and bool((wide[:, 32:] == 7).all())
    assert len(seen) == 1 and gm.gguf_linear(x[:5], blocks, kind).shape == (5, 24) and len(seen) == 1


@pytest.mark.parametrize("kind", TYPES)
def test_embedding_rows_are_gguf_dequantize_rows(kind: str) -> None:
    _, table = _case(kind, 1, N, K, torch.float32, "embedding")
    ids = torch.randint(0, N, (3, 5), generator=seeded_generator(kind, "ids")).to(DEVICE)
    want = gm.dequantize_ref(table, kind)[ids]
    assert torch.equal(gm.gguf_embedding(ids, table, kind, torch.float32), want)  # one product, as gguf's
    got = gm.gguf_embedding(ids, table, kind, torch.bfloat16)
    assert got.dtype == torch.bfloat16  # one rounding (the interpreter's may not be to nearest)
    torch.testing.assert_close(got.float(), want, rtol=2.0**-7, atol=0.0)


def test_the_gemm_splits_k_below_the_dequantize_threshold() -> None:
    """Unsplit 64-row tiles of 65-127 rows leave most of a GPU idle: every row count the GEMM
    serves splits a narrow layer's K; from DEQUANT_MIN_ROWS rows the call goes to cuBLAS."""
    dev, sms = torch.device("cpu"), 132  # an H100's SMs
    for m in (2, 64, 65, gm.DEQUANT_MIN_ROWS - 1):
        cfg = gm.choose_config(m, 4096, 14336, dev, sms)
        assert not cfg.gemv and cfg.split_k > 1 and m <= gm.SPLIT_K_MAX_ROWS


def test_gemv_launch_by_block_type() -> None:
    """One row: Q4_0/Q4_1/Q8_0's GEMV takes 16 outputs a program (its 16-bit loads want more
    programs in flight) and splits K while the grid is small; the K-quants' takes 64 and slices
    of at least four super-blocks, as many as that allows (the 8B shapes' sweep: four for K =
    4096, eight for the down projection's 14336)."""
    dev, sms = torch.device("cpu"), 132  # an H100's SMs
    for kind in TYPES:
        for n, k in ((6144, 4096), (28672, 4096), (4096, 14336)):
            cfg = gm.choose_config(1, n, k, dev, sms, kind=kind)
            steps = -(-k // gm.gemv_step(kind, cfg))
            assert cfg.gemv and 1 <= cfg.split_k <= steps
            if gm.GGUF_BLOCKS[kind][0] == 32:
                assert cfg.block_n == 16
            else:
                assert cfg.block_n == 64 and cfg.split_k == {4096: 4, 14336: 8}[k]
                assert steps // cfg.split_k >= 4 > steps // (2 * cfg.split_k)
    assert gm.choose_config(1, 28672, 4096, dev, sms).block_n == 32  # no type given
    assert gm.choose_config(1, 64, 512, dev, sms, kind="Q6_K").split_k == 1  # two super-blocks: no split


def test_other_types_and_shapes_are_refused() -> None:
    x = torch.randn(1, 256, device=DEVICE)
    with pytest.raises(ValueError, match="GGUF type Q3_K has no GPU kernel"):
        gm.gguf_linear(x, torch.zeros(4, 110, dtype=torch.uint8, device=DEVICE), "Q3_K")
    with pytest.raises(ValueError, match=r"Q4_K weight for 256 input features must be uint8 \[N, 144\]"):
        gm.gguf_linear(x, torch.zeros(4, 140, dtype=torch.uint8, device=DEVICE), "Q4_K")
    with pytest.raises(ValueError, match="Q4_K rows hold whole blocks of 256 elements, not 96"):
        gm.row_bytes("Q4_K", 96)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("m", [1, 16, 256])
def test_8b_shapes_on_the_gpu(kind: str, m: int) -> None:
    """An 8B-class MLP shape (down projection: 4096 x 14336) with the automatic configs."""
    x, blocks = _case(kind, m, 4096, 14336, torch.bfloat16)
    _check(gm.gguf_linear(x, blocks, kind), _ref(x, blocks, kind), torch.bfloat16)
