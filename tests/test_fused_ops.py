"""Fused elementwise kernels (add + RMSNorm, q/k norm + rotary, SiLU-and-mul, and the
tensor-parallel all-reduce's cross-rank sum + add + RMSNorm) against the torch code they replace.

Without CUDA the kernels run under the Triton interpreter on small shapes; with CUDA the same
tests run at the Qwen3-0.6B decode sizes, plus the ``gpu``-marked rounding and CUDA-graph tests.
The interpreter rounds fp32 -> bf16/fp16 by truncation (the GPU rounds to nearest even), so
there the 16-bit results are compared within a few ulps; on the GPU bf16 must match bit for
bit almost everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from .triton_interpreter import (
    CUDA,
    DEVICE,
    rerun_in_fresh_process,
    seeded_generator,
    skip_unless_runnable,
)

pytest.importorskip("triton")

from pagedattn import envs
from pagedattn.attention.selector import get_attention_backend
from pagedattn.distributed import all_reduce as ar
from pagedattn.models import fused_ops as fo
from pagedattn.models.config import ModelArchConfig
from pagedattn.models.gemma2 import GemmaArchConfig
from pagedattn.models.layers import RotaryEmbedding
from pagedattn.models.registry import build_model
from pagedattn.models.testing import PagedHarness

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Size:
    tokens: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


# Qwen3-0.6B at decode batch 256 on the GPU; tiny (and non-power-of-two where it matters) under
# the interpreter, which runs programs one by one in Python.
SIZE = Size(256, 1024, 3072, 16, 8, 128) if CUDA else Size(5, 48, 40, 3, 1, 12)


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_fused_ops_in_fresh_interpreter_process")


def test_fused_ops_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: {"atol": 1e-5, "rtol": 1e-5},
            torch.float16: {"atol": 4e-3, "rtol": 4e-3},
            torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}[dtype]


_gen = seeded_generator


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0,
           shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype=dtype, device=DEVICE)


def _norm_weight(g: torch.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Around 1, as trained norm weights are, but every entry different."""
    return _randn(g, n, dtype=dtype, scale=0.2, shift=1.0)


def _assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "output has NaN: an element was never written"
    torch.testing.assert_close(out.float(), ref.float(), **_tol(out.dtype))


def _rope(g: torch.Generator, t: int, head_dim: int, dtype: torch.dtype,
          scaling: dict[str, object] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cos/sin ``[T, 1, D/2]`` for random positions."""
    rot = RotaryEmbedding(head_dim, 10000.0, scaling, 4096, dtype).to(DEVICE)
    return rot(torch.randint(0, 4096, (t,), generator=g).to(DEVICE))


# --------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(SIZE.tokens,), (2, 3)])
def test_rms_norm_matches_reference(dtype: torch.dtype, lead: tuple[int, ...]) -> None:
    g = _gen("rms", dtype, lead)
    x = _randn(g, *lead, SIZE.hidden, dtype=dtype, scale=3.0, shift=0.5)
    w = _norm_weight(g, SIZE.hidden, dtype)
    _assert_matches(fo.rms_norm_triton(x, w, 1e-6), fo.rms_norm_ref(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(dtype: torch.dtype) -> None:
    g = _gen("add-rms", dtype)
    x = _randn(g, SIZE.tokens, SIZE.hidden, dtype=dtype, scale=2.0)
    res = _randn(g, SIZE.tokens, SIZE.hidden, dtype=dtype, scale=4.0, shift=-0.3)
    w = _norm_weight(g, SIZE.hidden, dtype)
    x0, res0 = x.clone(), res.clone()
    out, new_res = fo.fused_add_rms_norm_triton(x, res, w, 1e-5)
    ref_out, ref_res = fo.fused_add_rms_norm_ref(x, res, w, 1e-5)
    _assert_matches(new_res, ref_res)
    _assert_matches(out, ref_out)
    assert torch.equal(x, x0) and torch.equal(res, res0), "inputs must not be modified"


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_rms_norm_matches_reference(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma's norm (``1 + weight``, one rounding) through the same kernel, alone and after the add."""
    g = _gen("gemma-rms", dtype)
    x = _randn(g, SIZE.tokens, SIZE.hidden, dtype=dtype, scale=2.0)
    res = _randn(g, SIZE.tokens, SIZE.hidden, dtype=dtype, scale=4.0, shift=-0.3)
    w = _randn(g, SIZE.hidden, dtype=dtype, scale=0.3)  # offsets from one, as Gemma's checkpoints hold them
    ref = fo.gemma_rms_norm_ref(x, w, 1e-6)
    ref_res = x + res
    ref_out = fo.gemma_rms_norm_ref(ref_res, w, 1e-6)
    monkeypatch.setattr(fo, "use_triton", lambda t: True)  # the kernels, also on CPU tensors (interpreter)
    _assert_matches(fo.gemma_rms_norm(x, w, 1e-6), ref)
    out, new_res = fo.fused_add_gemma_rms_norm(x, res, w, 1e-6)
    _assert_matches(new_res, ref_res)
    _assert_matches(out, ref_out)
    # Not Llama's norm: the offset from one matters.
    assert (fo.rms_norm_ref(x, w, 1e-6).float() - ref.float()).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_reduce_add_rms_norm_sums_the_parts_then_adds_and_norms(dtype: torch.dtype, world: int) -> None:
    """The fused cross-rank reduction: the parts (found through their addresses) summed, then
    exactly the add + RMSNorm kernel on that sum; the parts are left as they were."""
    g = _gen("reduce", dtype, world)
    parts = [_randn(g, SIZE.tokens, SIZE.hidden, dtype=dtype) for _ in range(world)]
    before = [p.clone() for p in parts]
    residual = _randn(g, SIZE.tokens, SIZE.hidden, dtype=dtype)
    w = _norm_weight(g, SIZE.hidden, dtype)
    table = torch.tensor([p.data_ptr() for p in parts], dtype=torch.int64, device=DEVICE)
    out, res_out = ar.reduce_add_rms_norm_triton(table, residual, w, 1e-6)
    summed = torch.stack([p.float() for p in parts]).sum(0).to(dtype)
    if dtype == torch.float32 or CUDA:  # the interpreter truncates where the GPU rounds the sum to 16 bits
        want_out, want_res = fo.fused_add_rms_norm_triton(summed, residual, w, 1e-6)
        assert torch.equal(out, want_out) and torch.equal(res_out, want_res)
    want_out, want_res = fo.fused_add_rms_norm_ref(summed, residual, w, 1e-6)
    torch.testing.assert_close(res_out, want_res, **_tol(dtype))
    torch.testing.assert_close(out, want_out, **_tol(dtype))
    assert all(torch.equal(p, b) for p, b in zip(parts, before, strict=True))
    with pytest.raises(ValueError, match="int64"):
        ar.reduce_add_rms_norm_triton(table.int(), residual, w, 1e-6)


@pytest.mark.parametrize("programs", [1, 2, 64])
def test_reduce_with_rank_barrier_announces_waits_and_loops_over_rows(programs: int) -> None:
    """The reduction that waits for its peers itself, seen from rank 0 of two with the peer's
    announcements already in place (a real peer needs a second GPU): the same results as
    without the barrier whatever the grid (each program takes every ``grid``-th row), every
    program that ran announced its epoch in the peer's flags and bumped its own counter, and
    the next call moves on to the next epoch."""
    g = _gen("reduce-barrier", torch.float32, programs)
    world, cap = 2, programs
    parts = [_randn(g, SIZE.tokens, SIZE.hidden, dtype=torch.float32) for _ in range(world)]
    residual = _randn(g, SIZE.tokens, SIZE.hidden, dtype=torch.float32)
    w = _norm_weight(g, SIZE.hidden, torch.float32)
    table = torch.tensor([p.data_ptr() for p in parts], dtype=torch.int64, device=DEVICE)
    flags = [torch.zeros(world, cap, dtype=torch.int64, device=DEVICE) for _ in range(world)]
    flags[0][1] = 2  # rank 1's programs have announced epochs 1 and 2 already
    barrier = ar.RankBarrier(torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64, device=DEVICE), 0, cap)
    want = ar.reduce_add_rms_norm_triton(table, residual, w, 1e-6)
    grid = min(SIZE.tokens, cap)
    for epoch in (1, 2):
        got = ar.reduce_add_rms_norm_triton(table, residual, w, 1e-6, barrier=barrier)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        ran = torch.tensor([epoch] * grid + [0] * (cap - grid), dtype=torch.int64, device=DEVICE)
        assert torch.equal(flags[0][0], ran), "own epoch counters"
        assert torch.equal(flags[1][0], ran), "announcements in the peer's flags"
        assert torch.equal(flags[1][1], torch.zeros_like(ran)) and torch.equal(flags[0][1], torch.full_like(ran, 2))
    with pytest.raises(ValueError, match="match parts"):
        ar.reduce_add_rms_norm_triton(table[:1], residual, w, 1e-6, barrier=barrier)
    with pytest.raises(ValueError, match="rank 2"):
        ar.RankBarrier(barrier.flags, 2, cap)
    with pytest.raises(ValueError, match="max_programs"):
        ar.RankBarrier(barrier.flags, 0, 0)


def test_rms_norm_strided_rows_and_weight_promotion() -> None:
    """Rows with a stride (a column slice) and an fp32 weight on bf16 activations, which
    promotes the output to fp32 as torch's ``weight * h`` does."""
    g = _gen("rms-strided")
    wide = _randn(g, SIZE.tokens, SIZE.hidden + 8, dtype=torch.bfloat16, scale=2.0)
    x = wide[:, 4 : 4 + SIZE.hidden]
    w = _norm_weight(g, SIZE.hidden, torch.float32)
    out, ref = fo.rms_norm_triton(x, w, 1e-6), fo.rms_norm_ref(x, w, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    # The normalised value is rounded to bf16 before the fp32 multiply: bf16 tolerance.
    torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


# --------------------------------------------------------------------------- q/k norm + rotary


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
def test_qk_norm_rope_matches_reference(dtype: torch.dtype, norm: bool) -> None:
    g = _gen("qk-rope", dtype, norm)
    t, hq, hkv, d = SIZE.tokens, SIZE.num_heads, SIZE.num_kv_heads, SIZE.head_dim
    width = (hq + 2 * hkv) * d
    # qkv as a column slice of a wider buffer: rows have a stride larger than their width.
    qkv = _randn(g, t, width + 6, dtype=dtype, scale=2.0, shift=0.2)[:, :width]
    cos, sin = _rope(g, t, d, dtype)
    qw, kw = (_norm_weight(g, d, dtype), _norm_weight(g, d, dtype)) if norm else (None, None)
    q, k = fo.qk_norm_rope_triton(qkv, cos, sin, hq, hkv, qw, kw, 1e-6)
    ref_q, ref_k = fo.qk_norm_rope_ref(qkv, cos, sin, hq, hkv, qw, kw, 1e-6)
    _assert_matches(q, ref_q)
    _assert_matches(k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_with_gemma_norm_matches_reference(dtype: torch.dtype) -> None:
    g = _gen("qk-rope-gemma", dtype)
    t, hq, hkv, d = SIZE.tokens, SIZE.num_heads, SIZE.num_kv_heads, SIZE.head_dim
    qkv = _randn(g, t, (hq + 2 * hkv) * d, dtype=dtype, scale=2.0, shift=0.2)
    cos, sin = _rope(g, t, d, dtype)
    qw, kw = _randn(g, d, dtype=dtype, scale=0.3), _randn(g, d, dtype=dtype, scale=0.3)
    q, k = fo.qk_norm_rope_triton(qkv, cos, sin, hq, hkv, qw, kw, 1e-6, unit_offset=True)
    ref_q, ref_k = fo.qk_norm_rope_ref(qkv, cos, sin, hq, hkv, qw, kw, 1e-6, unit_offset=True)
    _assert_matches(q, ref_q)
    _assert_matches(k, ref_k)
    assert (fo.qk_norm_rope_ref(qkv, cos, sin, hq, hkv, qw, kw, 1e-6)[0].float() - ref_q.float()).abs().max() > 0.1


def test_qk_norm_rope_with_scaled_rotary() -> None:
    """YaRN scales cos/sin (attention factor != 1): the kernel takes them as given."""
    g = _gen("qk-yarn")
    t, hq, hkv, d = SIZE.tokens, SIZE.num_heads, SIZE.num_kv_heads, SIZE.head_dim
    qkv = _randn(g, t, (hq + 2 * hkv) * d, dtype=torch.float32)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    cos, sin = _rope(g, t, d, torch.float32, yarn)
    qw, kw = _norm_weight(g, d, torch.float32), _norm_weight(g, d, torch.float32)
    got = fo.qk_norm_rope_triton(qkv, cos, sin, hq, hkv, qw, kw, 1e-6)
    ref = fo.qk_norm_rope_ref(qkv, cos, sin, hq, hkv, qw, kw, 1e-6)
    for a, b in zip(got, ref, strict=True):
        _assert_matches(a, b)


# --------------------------------------------------------------------------- SiLU-and-mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_and_mul_matches_reference(dtype: torch.dtype, approximate: str) -> None:
    """GeGLU (Gemma's ``gelu_pytorch_tanh``, and the exact GELU) through the gated-activation kernel."""
    g = _gen("gelu-mul", dtype, approximate)
    x = _randn(g, SIZE.tokens, 2 * SIZE.intermediate, dtype=dtype, scale=3.0)  # tanh saturates both ways
    _assert_matches(fo.gelu_and_mul_triton(x, approximate), fo.gelu_and_mul_ref(x, approximate))
    with pytest.raises(ValueError, match="approximate"):
        fo.gelu_and_mul_triton(x, "fast")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    if not CUDA:
        monkeypatch.setattr(fo, "SILU_BLOCK", 16)  # several column blocks, the last one partial
    g = _gen("silu", dtype)
    x = _randn(g, SIZE.tokens, 2 * SIZE.intermediate, dtype=dtype, scale=3.0)
    _assert_matches(fo.silu_and_mul_triton(x), fo.silu_and_mul_ref(x))


# --------------------------------------------------------------------------- edge cases, errors


def test_empty_batch_launches_nothing() -> None:
    g = _gen("empty")
    d = SIZE.head_dim
    w = _norm_weight(g, SIZE.hidden, torch.float32)
    x = torch.empty(0, SIZE.hidden, device=DEVICE)
    assert fo.rms_norm_triton(x, w, 1e-6).shape == (0, SIZE.hidden)
    out, res = fo.fused_add_rms_norm_triton(x, x, w, 1e-6)
    assert out.shape == res.shape == (0, SIZE.hidden)
    assert fo.silu_and_mul_triton(torch.empty(0, 6, device=DEVICE)).shape == (0, 3)
    qkv = torch.empty(0, 4 * d, device=DEVICE)
    cs = torch.empty(0, 1, d // 2, device=DEVICE)
    q, k = fo.qk_norm_rope_triton(qkv, cs, cs, 2, 1, None, None, 1e-6)
    assert q.shape == (0, 2, d) and k.shape == (0, 1, d)


def test_launchers_reject_bad_inputs() -> None:
    g = _gen("errors")
    x = _randn(g, 3, 8, dtype=torch.float32)
    w = _norm_weight(g, 8, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        fo.rms_norm_triton(x, w[:4], 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fo.fused_add_rms_norm_triton(x, x[:2], w, 1e-6)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        fo.rms_norm_triton(x.t(), w[:3], 1e-6)
    with pytest.raises(ValueError, match="even"):
        fo.silu_and_mul_triton(x[:, :7])
    qkv = _randn(g, 3, 4 * 8, dtype=torch.float32)  # 2 q + 1 k + 1 v heads of 8
    cs = _randn(g, 3, 1, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="qkv"):
        fo.qk_norm_rope_triton(qkv, cs, cs, 3, 1, None, None, 1e-6)
    with pytest.raises(ValueError, match="cos"):
        fo.qk_norm_rope_triton(qkv, cs[:2], cs, 2, 1, None, None, 1e-6)
    with pytest.raises(ValueError, match="q_weight and k_weight"):
        fo.qk_norm_rope_triton(qkv, cs, cs, 2, 1, w, None, 1e-6)
    with pytest.raises(ValueError, match="k_weight"):
        fo.qk_norm_rope_triton(qkv, cs, cs, 2, 1, w, w[:5], 1e-6)


def test_dispatch_follows_device_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fo.DISABLE_ENV, raising=False)
    envs.reload()
    assert fo.fused_kernels_enabled()
    assert not fo.use_triton(torch.ones(2))  # CPU tensors always take the torch code
    monkeypatch.setenv(fo.DISABLE_ENV, "1")
    envs.reload()
    assert not fo.fused_kernels_enabled()
    if CUDA:
        assert not fo.use_triton(torch.ones(2, device=DEVICE))
    # The CPU path is the torch code itself, bit for bit.
    g = _gen("dispatch")
    x = torch.randn(4, 16, generator=g)
    w = 1 + 0.2 * torch.randn(16, generator=g)
    assert torch.equal(fo.rms_norm(x.cpu(), w, 1e-6), fo.rms_norm_ref(x, w, 1e-6))


# --------------------------------------------------------------------------- whole model


def _tiny_model(qk_norm: bool, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    d = SIZE.head_dim
    cfg = ModelArchConfig(
        architecture="Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM", vocab_size=97,
        hidden_size=SIZE.hidden, intermediate_size=SIZE.intermediate, num_layers=2, num_heads=SIZE.num_heads,
        num_kv_heads=SIZE.num_kv_heads, head_dim=d, qk_norm=qk_norm, attention_bias=qk_norm,
        max_position_embeddings=256,
    )
    model = build_model(cfg, dtype, DEVICE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise)
    return model


def _run_model(model: torch.nn.Module) -> torch.Tensor:
    """A prefill batch of two sequences, then decode steps: logits of every step."""
    backend = get_attention_backend(DEVICE.type, "torch")
    h = PagedHarness(model, num_blocks=32, block_size=4, device=DEVICE, backend=backend)
    ids = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    parts = [torch.cat(h.step([("a", ids[:9]), ("b", ids[2:6])]))]
    parts += [torch.cat(h.step([("a", [t]), ("b", [t])])) for t in ids[9:]]
    return torch.cat(parts).float()


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_with_fused_kernels_matches_torch_path(qk_norm: bool, dtype: torch.dtype,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's residual layout and every fused kernel in place, against the torch path."""
    model = _tiny_model(qk_norm, dtype, seed=int(qk_norm))
    monkeypatch.setenv(fo.DISABLE_ENV, "1")
    envs.reload()
    ref = _run_model(model)
    monkeypatch.delenv(fo.DISABLE_ENV)
    envs.reload()
    if not CUDA:
        monkeypatch.setattr(fo, "use_triton", lambda x: True)
    got = _run_model(model)
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err < (1e-4 if dtype == torch.float32 else 5e-2) * scale, f"max abs diff {err:.3g}, scale {scale:.3g}"
    if dtype == torch.float32:
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_model_with_fused_kernels_matches_torch_path(dtype: torch.dtype,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma's four norms a layer, its q/k norms and scaled embeddings with the fused kernels in place."""
    d = SIZE.head_dim
    cfg = GemmaArchConfig(
        architecture="Gemma3ForCausalLM", vocab_size=97, hidden_size=SIZE.hidden,
        intermediate_size=SIZE.intermediate, num_layers=2, num_heads=SIZE.num_heads, num_kv_heads=SIZE.num_kv_heads,
        head_dim=d, qk_norm=True, max_position_embeddings=256, layer_sliding_windows=[4, None],
        query_pre_attn_scalar=10, attn_logit_softcapping=2.0, final_logit_softcapping=5.0, local_rope_theta=100.0,
    )
    model = build_model(cfg, dtype, DEVICE)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    monkeypatch.setenv(fo.DISABLE_ENV, "1")
    envs.reload()
    ref = _run_model(model)
    monkeypatch.delenv(fo.DISABLE_ENV)
    envs.reload()
    if not CUDA:
        monkeypatch.setattr(fo, "use_triton", lambda x: True)
    got = _run_model(model)
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err < (1e-4 if dtype == torch.float32 else 5e-2) * scale, f"max abs diff {err:.3g}, scale {scale:.3g}"


# --------------------------------------------------------------------------- GPU only


def _ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 ulps of same-sign values (their bit patterns are ordered)."""
    assert ((a.sign() == b.sign()) | (a == b)).all(), "signs differ"
    return (a.contiguous().view(torch.int16).int() - b.contiguous().view(torch.int16).int()).abs()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_bf16_matches_torch_to_the_last_bit_almost_everywhere() -> None:
    """On the GPU the kernels round exactly where the torch code does: a difference is a
    rounding tipped by fp32 summation order or an rsqrt/exp ulp.  The residual sum is exact;
    norms and SiLU are within 1 ulp; rotary's sums can cancel, so a 1-ulp difference in a
    normalised input may show as more ulps of a small output: there only the count is bounded."""
    g = _gen("gpu-bits")
    s, dt = SIZE, torch.bfloat16
    x = _randn(g, s.tokens, s.hidden, dtype=dt, scale=2.0)
    res = _randn(g, s.tokens, s.hidden, dtype=dt, scale=4.0)
    w = _norm_weight(g, s.hidden, dt)
    qkv = _randn(g, s.tokens, (s.num_heads + 2 * s.num_kv_heads) * s.head_dim, dtype=dt, scale=2.0)
    cos, sin = _rope(g, s.tokens, s.head_dim, dt)
    qw, kw = _norm_weight(g, s.head_dim, dt), _norm_weight(g, s.head_dim, dt)
    gate_up = _randn(g, s.tokens, 2 * s.intermediate, dtype=dt, scale=3.0)

    out, new_res = fo.fused_add_rms_norm_triton(x, res, w, 1e-6)
    ref_out, ref_res = fo.fused_add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(new_res, ref_res)
    for got, ref in ((out, ref_out), (fo.rms_norm_triton(x, w, 1e-6), fo.rms_norm_ref(x, w, 1e-6)),
                     (fo.silu_and_mul_triton(gate_up), fo.silu_and_mul_ref(gate_up))):
        ulps = _ulps_bf16(got, ref)
        assert ulps.max().item() <= 1
        assert (ulps == 0).float().mean().item() > 0.99
    q, k = fo.qk_norm_rope_triton(qkv, cos, sin, s.num_heads, s.num_kv_heads, qw, kw, 1e-6)
    ref_q, ref_k = fo.qk_norm_rope_ref(qkv, cos, sin, s.num_heads, s.num_kv_heads, qw, kw, 1e-6)
    for got, ref in ((q, ref_q), (k, ref_k)):
        _assert_matches(got, ref)
        assert (got == ref).float().mean().item() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_fused_ops_capture_in_a_cuda_graph() -> None:
    """Captured once, replayed on new inputs copied into the static buffers."""
    g = _gen("gpu-graph")
    s, dt = SIZE, torch.bfloat16
    width = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    x = _randn(g, s.tokens, s.hidden, dtype=dt)
    res = _randn(g, s.tokens, s.hidden, dtype=dt)
    qkv = _randn(g, s.tokens, width, dtype=dt)
    gate_up = _randn(g, s.tokens, 2 * s.intermediate, dtype=dt)
    cos, sin = _rope(g, s.tokens, s.head_dim, dt)
    w = _norm_weight(g, s.hidden, dt)
    qw, kw = _norm_weight(g, s.head_dim, dt), _norm_weight(g, s.head_dim, dt)

    def step() -> tuple[torch.Tensor, ...]:
        out, new_res = fo.fused_add_rms_norm_triton(x, res, w, 1e-6)
        q, k = fo.qk_norm_rope_triton(qkv, cos, sin, s.num_heads, s.num_kv_heads, qw, kw, 1e-6)
        return out, new_res, q, k, fo.silu_and_mul_triton(gate_up)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        for buf in (x, res, qkv, gate_up):
            buf.copy_(_randn(g, *buf.shape, dtype=dt))
        graph.replay()
        ref_out, ref_res = fo.fused_add_rms_norm_ref(x, res, w, 1e-6)
        ref_q, ref_k = fo.qk_norm_rope_ref(qkv, cos, sin, s.num_heads, s.num_kv_heads, qw, kw, 1e-6)
        for got, ref in zip(outs, (ref_out, ref_res, ref_q, ref_k, fo.silu_and_mul_ref(gate_up)), strict=True):
            _assert_matches(got, ref)
