"""The FP8 Triton kernels: the block-scaled GEMM against the torch reference (dequantize,
multiply in fp32), the per-token activation quantization against its torch form (bit for bit).

Without CUDA it runs under the Triton interpreter on small shapes (partial tiles of M, N and K,
a last block of input features shorter than the others, bias, one-row decode); with CUDA the
same tests run at full size.  The kernel rounds each dequantized weight to the activation dtype
(as a dense model of the dequantization holds it) and the output once: fp32 within 1e-4 of the
output's largest magnitude (summation order only), bf16 within 2e-2, fp16 within 4e-3 (the
W4A16 kernels' tolerances).
"""

from __future__ import annotations

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

from pagedattn.kernels import fp8

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# Small under the interpreter (it runs programs one by one in Python); K with a partial last block.
N, K = (4096, 4000) if CUDA else (80, 200)


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_kernels_in_fresh_interpreter_process")


def test_kernels_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


def _weights(g: torch.Generator, n: int, k: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    groups = -(-k // group_size)
    scale = torch.rand(n, groups, generator=g) * 1e-3 + 1e-5
    return w.to(DEVICE), scale.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 20, 70])
# The last: per-row scales (one scale column), as the layers run them on CUDA.
@pytest.mark.parametrize(("group_size", "bias"), [(64, False), (128, True), (32, True), (fp8.row_group(K), True)])
def test_block_gemm_matches_reference(dtype: torch.dtype, m: int, group_size: int, bias: bool) -> None:
    g = seeded_generator("fp8-block", dtype, m, group_size, bias)
    w, scale = _weights(g, N, K, group_size)
    x = torch.randn(m, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    got = fp8.fp8_block_linear(x, w, scale, group_size, b, use_triton=True)
    ref = x.float() @ fp8.dequantize(w, scale, group_size).t() + (b.float() if b is not None else 0)
    assert got.dtype == dtype and got.shape == (m, N)
    err = (got.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), err


@pytest.mark.parametrize(("split", "group_size"), [(2, 64), (3, 32), (4, fp8.row_group(K))])
def test_gemv_split_k_matches_reference(split: int, group_size: int) -> None:
    """The one-row GEMV with K split in slices (uneven: the last is shorter or empty), summed by
    the fixed-order reduction with the bias."""
    g = seeded_generator("fp8-gemv", split, group_size)
    w, scale = _weights(g, N, K, group_size)
    x = torch.randn(1, K, generator=g).to(DEVICE, torch.bfloat16)
    b = torch.randn(N, generator=g).to(DEVICE, torch.bfloat16)
    out = torch.empty(1, N, device=DEVICE, dtype=torch.bfloat16)
    got = fp8._fp8_gemv(x, w, scale.float().contiguous(), group_size, b, out, block_n=32, split=split)
    ref = x.float() @ fp8.dequantize(w, scale, group_size).t() + b.float()
    err = (got.float() - ref).abs().max().item()
    assert err <= TOL[torch.bfloat16] * ref.abs().max().item(), err


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 90), k=st.integers(1, 40).map(lambda v: 16 * v), group=st.sampled_from([16, 32, 64, 128, 0]),
       m=st.integers(1, 2), block_n=st.sampled_from([16, 32, 64]), split=st.sampled_from([1, 2, 3, 5]),
       with_bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_gemv_on_any_shape_and_launch(n: int, k: int, group: int, m: int, block_n: int, split: int, with_bias: bool,
                                      dtype: torch.dtype, seed: int) -> None:
    """The GEMV against the dequantized weight on drawn shapes and launches: N off or below the
    tile, K not a multiple of the block (a partial last block) or of the tile, per-row scales
    (``group`` 0: ``row_group``), more slices than tiles, two rows, bias, each dtype.  The error
    is held against ``sum |x w|`` (one output may be a near-cancelling sum)."""
    group_size = group or fp8.row_group(k)
    g = seeded_generator("fp8-gemv-any-shape", seed)
    w, scale = _weights(g, n, k, group_size)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if with_bias else None
    out = torch.empty(m, n, device=DEVICE, dtype=dtype)
    got = fp8._fp8_gemv(x, w, scale.float().contiguous(), group_size, b, out, block_n=block_n, split=split)
    wd = fp8.dequantize(w, scale, group_size)
    ref = x.float() @ wd.t() + (b.float() if b is not None else 0)
    err = (got.float() - ref).abs().max().item()
    assert got.dtype == dtype and err <= TOL[dtype] * dot_terms_max(x, wd, b), err


@pytest.mark.parametrize(("m", "k"), [(1, 200), (9, 2500), (33, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amax_ub", [None, 3.0])
def test_per_token_quantization_kernel_is_the_torch_form(m: int, k: int, dtype: torch.dtype,
                                                         amax_ub: float | None) -> None:
    """Rows of any length (several loads of QUANT_BLOCK, a partial last one), an all-zero row,
    fbgemm's clamp of the maximum: the same e4m3 bits and scales as the torch ops."""
    g = seeded_generator("fp8-quant", m, k, dtype, amax_ub)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 8).to(DEVICE, dtype)
    x[m // 2] = 0
    q, s = fp8.quantize_per_token(x, amax_ub, use_triton=True)
    q_ref, s_ref = fp8.quantize_per_token(x, amax_ub, use_triton=False)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (m, 1) and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_block_k_lies_in_one_block() -> None:
    assert [fp8.block_k(gs) for gs in (128, 64, 96, 48, 8)] == [64, 64, 32, 16, 0]


@pytest.mark.parametrize("fmt", ["block", "channel"])
def test_fp8_model_through_the_kernels(tmp_path, fmt: str) -> None:
    """A tiny FP8 Llama kept in FP8, every linear through the Triton kernels: a prefill chunk
    then one-row decodes.  FineGrainedFP8 64x64 blocks: the dequantized dense checkpoint's logits
    (fp32: 1e-4 of their scale, the same argmax).  compressed-tensors per-channel (per-token
    activations through the quantization kernel, then ``_scaled_mm``): the logits of the same
    model quantizing its activations with torch ops, bit for bit."""
    import json

    from pagedattn.models.config import ModelArchConfig
    from pagedattn.models.layers import Fp8Linear
    from pagedattn.models.layers.quant import checkpoint_to_internal
    from pagedattn.models.loader import iter_safetensors, load_model
    from pagedattn.models.registry import build_model
    from pagedattn.models.testing import PagedHarness

    from .fp8_checkpoints import Fp8Fmt, make_fp8_model

    spec = Fp8Fmt("fp8", "block", (64, 64)) if fmt == "block" else Fp8Fmt("ct", "channel")
    path, ref_path, _ = make_fp8_model(tmp_path, spec, seed=9)
    cfg = ModelArchConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    assert cfg.quant is not None

    def fp8_model(kernels: bool) -> torch.nn.Module:
        model = build_model(cfg, torch.float32, DEVICE)
        model.load_weights(checkpoint_to_internal(iter_safetensors([path / "model.safetensors"]), cfg.quant))
        for m in model.modules():
            if isinstance(m, Fp8Linear):
                m.finish_loading(dequantize=False)
                m.cpu_kernels = kernels and not CUDA  # the interpreter, on CPU tensors
        return model

    ref_model = load_model(ref_path, torch.float32, DEVICE)[0] if fmt == "block" else fp8_model(False)
    ids = torch.randint(3, 320, (11,), generator=seeded_generator("fp8-model", fmt)).tolist()
    logits = []
    for net in (fp8_model(True), ref_model):
        h = PagedHarness(net, num_blocks=16, block_size=8, device=DEVICE)
        logits.append(torch.cat([h.step([("s", ids[:9])])[0]] + [h.step([("s", [t])])[0] for t in ids[9:]]))
    got, ref = (t.float().cpu() for t in logits)
    if fmt == "block" or CUDA:
        assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    else:
        assert torch.equal(got, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_llama8b_shapes(m: int, n: int, k: int) -> None:
    """Llama-3-8B's projections with per-row scales, as the layers run them on CUDA: the GEMV
    (split K or not, by the heuristics) at one row, the GEMM at more."""
    g = seeded_generator("fp8-8b", m, n, k)
    group = fp8.row_group(k)
    w, scale = _weights(g, n, k, group)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
    got = fp8.fp8_block_linear(x, w, scale, group, None, use_triton=True)
    ref = x.float() @ fp8.dequantize(w, scale, group).t()
    err = (got.float() - ref).abs().max().item()
    assert err <= TOL[torch.bfloat16] * ref.abs().max().item(), err
