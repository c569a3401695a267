"""FP8 (W8A8) checkpoints: compressed-tensors float-quantized, fbgemm_fp8 and FineGrainedFP8 tensors, made here
in each tool's layout, load into e4m3 weights with float32 scales.  On the CPU the weights are
dequantized at load and equal the checkpoint's dequantization exactly, so the greedy tokens are
the dequantized dense checkpoint's (and HF's); the FP8 runtime form (``torch._scaled_mm`` with
per-token activation scales, or block scales dequantized per call) computes the dense model's
logits within the stated tolerances; tensor-parallel shards are slices; bad tensors and configs
are refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import transformers
from safetensors.torch import save_file

from pagedattn.kernels import fp8
from pagedattn.models.config import ModelArchConfig
from pagedattn.models.layers import Fp8Linear, finish_loading
from pagedattn.models.layers.quant import checkpoint_to_internal
from pagedattn.models.loader import dummy_weights, iter_safetensors, load_model
from pagedattn.models.quant_config import parse_quant_config
from pagedattn.models.registry import build_model
from pagedattn.models.testing import PagedHarness

from .fp8_checkpoints import Fp8Fmt, make_fp8_model
from .quant_checkpoints import TINY_LLAMA, tiny_ids

FORMATS = [
    Fp8Fmt("ct", "tensor", static=True), Fp8Fmt("ct", "channel"), Fp8Fmt("ct", "block", (64, 64)),
    Fp8Fmt("fbgemm", "channel"), Fp8Fmt("fp8", "block", (128, 128)), Fp8Fmt("fp8", "tensor", static=True),
]
Made = tuple[Path, Path, transformers.PreTrainedModel]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Fp8Fmt], Made]:
    root = tmp_path_factory.mktemp("fp8")
    cache: dict[Fp8Fmt, Made] = {}

    def get(fmt: Fp8Fmt) -> Made:
        if fmt not in cache:
            cache[fmt] = make_fp8_model(root, fmt, seed=len(cache))
        return cache[fmt]

    return get


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def _load_raw(path: Path, rank: int = 0, tp: int = 1, dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> torch.nn.Module:
    """The FP8 model with its checkpoint loaded, before its runtime form."""
    cfg = ModelArchConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    assert cfg.quant is not None and cfg.quant.is_fp8
    model = build_model(cfg, dtype, device, tp_rank=rank, tp_size=tp)
    model.load_weights(checkpoint_to_internal(iter_safetensors([path / "model.safetensors"]), cfg.quant))
    return model


# ---------------------------------------------------------------------- the CPU: dequantized at load
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.id)
def test_loaded_weights_equal_the_dequantized_checkpoint(made, fmt: Fp8Fmt) -> None:
    path, ref_path, _ = made(fmt)
    model, source = load_model(path, torch.float32, "cpu")
    dense, _ = load_model(ref_path, torch.float32, "cpu")
    assert source.config.quant is not None and source.config.quant.fp8_strategy == fmt.strategy
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 4 * TINY_LLAMA["num_hidden_layers"] and all(m.is_dense for m in layers)
    got, want = _params(model), _params(dense)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[4]], ids=lambda f: f.id)
def test_greedy_tokens_equal_the_dequantized_model_and_hf(made, fmt: Fp8Fmt) -> None:
    path, ref_path, hf = made(fmt)
    prompt = tiny_ids(1, 11)
    runs = [PagedHarness(load_model(p, torch.float32, "cpu")[0], num_blocks=32, block_size=8).greedy(
        prompt, max_new_tokens=12) for p in (path, ref_path)]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert runs[0] == runs[1] == want


def test_engine_serves_an_fbgemm_fp8_checkpoint_like_the_dequantized_one(made) -> None:
    from pagedattn import LLM, SamplingParams

    path, ref_path, _ = made(Fp8Fmt("fbgemm", "channel"))
    prompts = [tiny_ids(2, 9), tiny_ids(3, 5)]
    outs = []
    for p in (path, ref_path):
        llm = LLM(str(p), dtype="float32", device="cpu", num_kv_blocks=32, block_size=8)
        try:
            res = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        finally:
            llm.shutdown()
        outs.append([list(r.outputs[0].token_ids) for r in res])
    assert outs[0] == outs[1]


# ---------------------------------------------------------------------- the FP8 runtime form
def _round_activations_per_token(model: torch.nn.Module, min_rows: int = 1) -> None:
    """The W8A8 arithmetic on a dense model: every decoder linear's input of at least
    ``min_rows`` rows rounded to e4m3 row by row (scale: the row's absolute maximum over 448)."""
    from pagedattn.models.layers import ColumnParallelLinear, RowParallelLinear

    def hook(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        if x.reshape(-1, x.shape[-1]).shape[0] < min_rows:
            return args
        s = x.float().abs().amax(dim=-1, keepdim=True) / 448.0
        return ((x.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * s).to(x.dtype),

    for m in model.modules():
        if isinstance(m, ColumnParallelLinear | RowParallelLinear):
            m.register_forward_pre_hook(hook)


# The FP8 GEMM multiplies exact e4m3 products in float32, as the oracle does: float32 rounding
# (summation order) only, for per-row scales (against the dense model with e4m3-rounded
# activations) and block scales (against the dense model: their activations are not rounded).
RUNTIME_TOL = 1e-4


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.id)
def test_fp8_runtime_form_computes_the_dequantized_model(made, fmt: Fp8Fmt) -> None:
    """What an sm89+ GPU keeps (e4m3 weights; per-row scales through ``torch._scaled_mm`` with
    per-token activation scales, block scales dequantized per call), run on the CPU, whose torch
    has ``_scaled_mm`` too: the logits of the dequantized dense model (with its activations
    rounded to e4m3 per token where the FP8 GEMM rounds them); weight memory within 10% of the
    checkpoint's bytes."""
    path, ref_path, _ = made(fmt)
    model = _load_raw(path)
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.finish_loading(dequantize=False)
            assert not m.is_dense and m.weight.dtype == torch.float8_e4m3fn
    dense, _ = load_model(ref_path, torch.float32, "cpu")
    prompt = tiny_ids(4, 14)
    logits = PagedHarness(model, num_blocks=32, block_size=8).step([("s", prompt)])[0]
    plain = PagedHarness(dense, num_blocks=32, block_size=8).step([("s", prompt)])[0]
    if fmt.strategy != "block":
        _round_activations_per_token(dense)
    ref = PagedHarness(dense, num_blocks=32, block_size=8).step([("s", prompt)])[0]
    scale = ref.abs().max().item()
    assert (logits - ref).abs().max().item() < RUNTIME_TOL * scale
    if fmt.strategy != "block":  # the activations really were rounded
        assert (logits - plain).abs().max().item() > 10 * RUNTIME_TOL * scale
    on_disk = (path / "model.safetensors").stat().st_size
    in_memory = sum(p.numel() * p.element_size() for p in model.parameters())
    assert abs(in_memory - on_disk) < 0.1 * on_disk, (in_memory, on_disk)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[3], FORMATS[5]], ids=lambda f: f.id)
def test_fp8_layers_in_bfloat16_compute_their_forms_products(made, fmt: Fp8Fmt, device: str) -> None:
    """The FP8 forms in bfloat16 on the CPU and on a GPU, a prefill chunk then one-row decodes:
    every FP8 layer's output is, within bfloat16's rounding, its input times the dequantized
    weight in float32 (plus the bias), the input rounded to e4m3 per token where the layer takes
    the W8A8 form (``torch._scaled_mm``; on CUDA every call of more than one row) and as it is
    where it takes the W8A16 GEMV (one row on CUDA).  Layer by layer, because the model as a
    whole cannot tell: on these random tiny models rounding the activations alone moves the
    float32 logits by ~15% of their largest magnitude, and in bfloat16 a last-bit change of an
    input flips its e4m3 rounding, so a bfloat16 run lands ~20% from the float32 one either way."""
    if device == "cuda" and not (torch.cuda.is_available() and fp8.fp8_gemm_supported(torch.device("cuda"))):
        pytest.skip("needs a CUDA GPU with compute capability >= 8.9")
    path, _, _ = made(fmt)
    model = _load_raw(path, dtype=torch.bfloat16, device=device)
    seen: list[tuple[Fp8Linear, torch.Tensor, torch.Tensor]] = []
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.finish_loading(dequantize=False)
            cast_m = cast(torch.nn.Module, m)
            cast_m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0].detach(), out.detach())))
    ids = tiny_ids(5, 20)
    h = PagedHarness(model, num_blocks=32, block_size=8, device=device)
    h.step([("s", ids[:14])])
    for t in ids[14:]:
        h.step([("s", [t])])
    assert len(seen) >= 2 * 7 and {x.reshape(-1, x.shape[-1]).shape[0] for _, x, _ in seen} == {14, 1}
    forms = set()
    for m, x, y in seen:
        x2 = x.reshape(-1, x.shape[-1])
        forms.add((x2.shape[0], m.uses_w8a8(x2)))
        if m.uses_w8a8(x2):
            q, s = fp8.quantize_per_token(x2, m.quant.act_amax_ub, use_triton=False)
            xr = q.float() * s
        else:
            xr = x2.float()
        w = fp8.dequantize(cast(Any, m).weight, cast(Any, m).weight_scale, m.group_size)
        ref = xr @ w.t()
        if m.bias is not None:
            ref += m.bias.float()
        err = (y.reshape(ref.shape).float() - ref).abs().max().item()
        assert err <= 2**-7 * ref.abs().max().item(), (type(m).__name__, x2.shape[0], err, ref.abs().max().item())
    assert forms == ({(14, True), (1, True)} if device == "cpu" else {(14, True), (1, False)})


def test_per_token_activation_scales() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 64, generator=g) * torch.rand(5, 1, generator=g) * 10
    x[2] = 0  # an all-zero row quantizes to zeros, not NaNs
    q, s = fp8.quantize_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 3, 4]], torch.full((4,), fp8.FP8_MAX))
    back = q.float() * s
    assert torch.equal(back[2], torch.zeros(64))
    assert bool(((back - x).abs() <= x.abs() * 2**-4 + s * 2**-9).all())
    _, clamped = fp8.quantize_per_token(x, amax_ub=1.0)
    assert torch.equal(clamped[[0, 1, 3, 4]], torch.full((4, 1), 1.0 / fp8.FP8_MAX))


# ---------------------------------------------------------------------- tensor parallelism
@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[2]], ids=lambda f: f.id)
def test_tensor_parallel_shards_are_slices_of_the_dequantized_weights(made, fmt: Fp8Fmt) -> None:
    """q, k and v keep their own per-tensor scales in the fused layer; block scales follow their
    rows (column-parallel) or their input features (row-parallel)."""
    path, ref_path, _ = made(fmt)
    dense = _params(load_model(ref_path, torch.float32, "cpu")[0])
    tp = 2
    for rank in range(tp):
        model = _load_raw(path, rank, tp)
        finish_loading(model)
        got = _params(model)
        for layer in range(TINY_LLAMA["num_hidden_layers"]):
            base = f"model.layers.{layer}."
            qkv, gu = dense[base + "self_attn.qkv_proj.weight"], dense[base + "mlp.gate_up_proj.weight"]
            q, kv, inter = 128 // tp, 64 // tp, 256 // tp
            want_qkv = torch.cat([qkv[rank * q:(rank + 1) * q], qkv[128 + rank * kv:128 + (rank + 1) * kv],
                                  qkv[192 + rank * kv:192 + (rank + 1) * kv]])
            want_gu = torch.cat([gu[rank * inter:(rank + 1) * inter], gu[256 + rank * inter:256 + (rank + 1) * inter]])
            assert torch.equal(got[base + "self_attn.qkv_proj.weight"], want_qkv)
            assert torch.equal(got[base + "mlp.gate_up_proj.weight"], want_gu)
            assert torch.equal(got[base + "self_attn.o_proj.weight"],
                               dense[base + "self_attn.o_proj.weight"][:, rank * 64:(rank + 1) * 64])
            assert torch.equal(got[base + "mlp.down_proj.weight"],
                               dense[base + "mlp.down_proj.weight"][:, rank * inter:(rank + 1) * inter])


def test_a_block_split_between_ranks_is_refused(made) -> None:
    path, _, _ = made(Fp8Fmt("fp8", "block", (128, 128)))
    with pytest.raises(ValueError, match=r"FP8 block size 128 does not divide this rank's 64 input features"):
        _load_raw(path, 0, 2)


# ---------------------------------------------------------------------- dummy weights
def test_dummy_fp8_model_is_the_rounded_dense_model(tmp_path: Path) -> None:
    """``load_format="dummy"`` of an FP8 config draws the dense model's weights and rounds them
    to e4m3 in the checkpoint's layout: FP8 tensors, each weight within e4m3's rounding of the
    dense one."""
    cfg = transformers.LlamaConfig(**TINY_LLAMA).to_dict()
    dense_dir, q_dir = tmp_path / "dense", tmp_path / "fp8"
    quant = {"quant_method": "fp8", "weight_block_size": [64, 64]}
    for d, extra in ((dense_dir, {}), (q_dir, {"quantization_config": quant})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
    qcfg = ModelArchConfig.from_hf_config(json.loads((q_dir / "config.json").read_text()))
    raw = dict(dummy_weights(build_model(qcfg, torch.float32, "cpu"), seed=3))
    assert raw["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert raw["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (1, 2)
    dense = _params(load_model(dense_dir, torch.float32, "cpu", load_format="dummy", seed=3)[0])
    got = _params(load_model(q_dir, torch.float32, "cpu", load_format="dummy", seed=3)[0])
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w, wq = dense[name], got[name]
        step = w.abs().amax() / fp8.FP8_MAX
        assert bool(((wq - w).abs() <= w.abs() * 2**-4 + step * 2**-9).all())
        assert not torch.equal(w, wq)
    assert torch.equal(got["model.norm.weight"], dense["model.norm.weight"])


# ---------------------------------------------------------------------- refusals
def test_zero_zero_points_are_accepted(made, tmp_path: Path) -> None:
    """compressed-tensors may write (zero) zero points of symmetric FP8: they load as nothing."""
    path, ref_path, _ = made(FORMATS[1])
    zp = torch.zeros(256, 1, dtype=torch.bfloat16)
    model, _ = load_model(_corrupt(path, tmp_path, "model.layers.0.mlp.gate_proj.weight_zero_point", zp),
                          torch.float32, "cpu")
    want = _params(load_model(ref_path, torch.float32, "cpu")[0])
    assert all(torch.equal(p, want[n]) for n, p in _params(model).items())


def _corrupt(path: Path, tmp: Path, name: str, tensor: torch.Tensor | None) -> Path:
    tensors = dict(iter_safetensors([path / "model.safetensors"]))
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    save_file(tensors, str(bad / "model.safetensors"))
    return bad


@pytest.mark.parametrize(("fmt", "name", "tensor", "match"), [
    (FORMATS[1], "model.layers.0.self_attn.k_proj.weight_scale", torch.ones(64, 2),
     r"k_proj.weight_scale'.*per-channel weight_scale must be \[64, 1\], got \(64, 2\)"),
    (FORMATS[4], "model.layers.1.mlp.down_proj.weight_scale_inv", torch.ones(2, 2),
     r"down_proj.weight_scale'.*weight_scale_inv of a \[128, 256\] weight in blocks of \[128, 128\] must be "
     r"\[1, 2\], got \[2, 2\]"),
    (FORMATS[0], "model.layers.0.mlp.up_proj.weight_scale", torch.ones(2),
     r"up_proj.weight_scale'.*per-tensor weight_scale must hold one value"),
    (FORMATS[3], "model.layers.0.self_attn.o_proj.weight_scale", -torch.ones(128, 1),
     r"o_proj.weight_scale'.*finite non-negative"),
    (FORMATS[3], "model.layers.0.self_attn.o_proj.weight", torch.ones(128, 128, dtype=torch.bfloat16),
     r"o_proj.weight'.*must be float8_e4m3fn, got torch.bfloat16"),
    (FORMATS[0], "model.layers.1.self_attn.v_proj.input_scale", torch.ones(2),
     r"v_proj.input_scale'.*one scale per tensor"),
    (FORMATS[2], "model.layers.0.mlp.gate_proj.weight_scale", None, r"missing weights: .*gate_proj.weight_scale"),
    (FORMATS[1], "model.layers.0.mlp.gate_proj.weight_zero_point", torch.ones(256, 1, dtype=torch.bfloat16),
     r"gate_proj.weight_zero_point'.*must be all zeros"),
], ids=["channel-shape", "block-shape", "tensor-shape", "negative", "not-fp8", "input-scale", "missing", "zero-point"])
def test_malformed_fp8_tensors_are_refused(made, tmp_path: Path, fmt: Fp8Fmt, name: str,
                                           tensor: torch.Tensor | None, match: str) -> None:
    path, _, _ = made(fmt)
    with pytest.raises(ValueError, match=match):
        load_model(_corrupt(path, tmp_path, name, tensor), torch.float32, "cpu")


def _ct(weights: dict | None = None, acts: dict | None = None) -> dict:
    cfg = Fp8Fmt("ct", "channel").config()
    group = cfg["config_groups"]["group_0"]
    group["weights"].update(weights or {})
    if acts is not None:
        group["input_activations"] = acts or None
    return cfg


@pytest.mark.parametrize(("cfg", "match"), [
    (_ct(acts={}), "weight-only FP8"),
    (_ct({"num_bits": 4}), "are not supported"),
    (_ct({"strategy": "group", "group_size": 128}), "weight strategy 'group'"),
    (_ct({"strategy": "block", "block_structure": [128]}), "block_structure must be two positive integers"),
    (_ct(acts={"num_bits": 8, "type": "float", "dynamic": True, "strategy": "tensor"}), "strategy 'tensor'"),
    (_ct(acts={"num_bits": 8, "type": "int", "dynamic": True, "strategy": "token"}), "input activations"),
    ({**_ct(), "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}}, "kv_cache_scheme"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, "scale_fmt 'ue8m0'"),
    ({"quant_method": "fp8", "activation_scheme": "mx"}, "activation_scheme 'mx'"),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "weight_block_size"),
    ({"quant_method": "fbgemm_fp8", "activation_scale_ub": -1}, "activation_scale_ub"),
    ({"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["model.layers.0.mlp"]}, "modules_to_not_convert"),
])
def test_unsupported_fp8_configs_are_refused(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_quant_config(cfg)


def test_fp8_config_fields() -> None:
    q = parse_quant_config(Fp8Fmt("fp8", "block", (128, 64)).config())
    assert q is not None and q.is_fp8 and q.fp8_strategy == "block" and q.block_size == (128, 64)
    q = parse_quant_config(Fp8Fmt("fbgemm", "channel").config())
    assert q is not None and q.fp8_strategy == "channel" and q.act_amax_ub == 1200.0
    q = parse_quant_config(Fp8Fmt("ct", "tensor", static=True).config())
    assert q is not None and q.method == "compressed-tensors" and q.fp8_strategy == "tensor" and q.act_amax_ub is None


def test_fp8_tensors_without_a_quantization_config_are_refused(made, tmp_path: Path) -> None:
    path, _, _ = made(FORMATS[3])
    bare = tmp_path / "bare"
    bare.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (bare / "config.json").write_text(json.dumps(cfg))
    (bare / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"is quantized, but config\.json has no quantization_config"):
        load_model(bare, torch.float32, "cpu")


# ---------------------------------------------------------------------- the GPU
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[0], FORMATS[4]], ids=lambda f: f.id)
def test_cuda_fp8_path_computes_the_dequantized_model(made, fmt: Fp8Fmt) -> None:
    """On an sm89+ GPU the weights stay FP8 (W8A8 ``torch._scaled_mm`` for a prefill chunk, the
    W8A16 GEMV for one-row decodes, block scales through the Triton GEMM) under the Triton
    attention in bfloat16: the logits land about as close to the exact arithmetic of those forms
    (the dequantized dense model in float32 on the CPU, its inputs rounded to e4m3 per token where
    the W8A8 form rounds them) as the dense model in bfloat16 with the same rounding does on the
    GPU.  bfloat16 is the noise floor: on random tiny models a last-bit change of an input flips
    its e4m3 rounding (see the layer test above), so no fixed tolerance against float32 holds."""
    if not torch.cuda.is_available() or not fp8.fp8_gemm_supported(torch.device("cuda")):
        pytest.skip("needs a CUDA GPU with compute capability >= 8.9")
    from pagedattn.attention.selector import get_attention_backend

    path, ref_path, _ = made(fmt)
    ids = tiny_ids(5, 20)
    min_rows = 2 if fmt.strategy != "block" else 1 << 30  # the rows the W8A8 form takes on CUDA

    def run(p: Path, dtype: torch.dtype, device: str, rounded: bool) -> torch.Tensor:
        model, _ = load_model(p, dtype, device)
        if rounded:
            _round_activations_per_token(model, min_rows)
        backend = get_attention_backend(device, "triton" if device == "cuda" else "torch")
        h = PagedHarness(model, num_blocks=32, block_size=8, device=device, backend=backend)
        out = torch.cat([h.step([("s", ids[:14])])[0]] + [h.step([("s", [t])])[0] for t in ids[14:]])
        if p == path:
            layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
            assert layers and all(not m.is_dense and m.weight.dtype == torch.float8_e4m3fn for m in layers)
        return out.float().cpu()

    got = run(path, torch.bfloat16, "cuda", rounded=False)
    floor = run(ref_path, torch.bfloat16, "cuda", rounded=True)
    exact = run(ref_path, torch.float32, "cpu", rounded=True)
    scale = exact.abs().max().item()
    err, noise = ((t - exact).abs().mean().item() for t in (got, floor))
    assert err <= 2 * noise + 1e-3 * scale, (err, noise, scale)
    agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
    floor_agree = (floor.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert agree >= floor_agree - 0.25, (agree, floor_agree)
