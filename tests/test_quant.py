"""Int4 (W4A16) checkpoints: AWQ, GPTQ and compressed-tensors tensors, packed here as the tools pack them, load
into the one internal layout; on the CPU the weights are dequantized at load, and must equal
the reference dequantization exactly; the model's greedy tokens equal HF's on that
dequantized model; tensor-parallel shards are slices of it; bad configs are refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from pagedattn.models.config import ModelArchConfig
from pagedattn.models.layers import QuantLinear, finish_loading
from pagedattn.models.layers.quant import checkpoint_to_internal
from pagedattn.models.loader import iter_safetensors, load_model
from pagedattn.models.quant_config import parse_quant_config
from pagedattn.models.quant_formats import (
    AWQ_ORDER,
    checkpoint_tensors,
    pack_cols,
    pack_rows,
    quantize_rtn,
    unpack_cols,
    unpack_rows,
)
from pagedattn.models.registry import build_model
from pagedattn.models.testing import PagedHarness

from .quant_checkpoints import (
    TINY_LLAMA,
    Fmt,
    _awq_pack,
    _gptq_pack_rows,
    _gptq_pack_zeros,
    make_quantized_model,
    tiny_ids,
)

FORMATS = [
    Fmt("awq", 128), Fmt("gptq", 128, sym=True), Fmt("gptq", 32, sym=False, desc_act=True),
    Fmt("gptq", -1, sym=False, v2=True), Fmt("ct", 128, sym=True), Fmt("ct", 32, sym=False, desc_act=True),
    pytest.param(Fmt("ct", -1, sym=False), marks=pytest.mark.slow),
    pytest.param(Fmt("awq", 32), marks=pytest.mark.slow), pytest.param(Fmt("gptq", 64), marks=pytest.mark.slow),
    pytest.param(Fmt("gptq", 64, sym=True, desc_act=True, v2=True), marks=pytest.mark.slow),
]
PROJ = {"q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
        "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", None),
        "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1), "down_proj": ("mlp.down_proj", None)}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Fmt], tuple[Path, transformers.PreTrainedModel]]:
    root = tmp_path_factory.mktemp("quant")
    made: dict[Fmt, tuple[Path, transformers.PreTrainedModel]] = {}

    def get(fmt: Fmt) -> tuple[Path, transformers.PreTrainedModel]:
        if fmt not in made:
            made[fmt] = make_quantized_model(root, fmt, seed=len(made))
        return made[fmt]

    return get


# ---------------------------------------------------------------------- bit layouts
def test_packing_matches_the_tools_loops() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 48), generator=g, dtype=torch.int32)
    assert torch.equal(pack_cols(q, AWQ_ORDER), _awq_pack(q))
    assert torch.equal(pack_rows(q), _gptq_pack_rows(q))
    assert torch.equal(pack_cols(q), _gptq_pack_zeros(q))
    assert torch.equal(unpack_cols(_awq_pack(q), AWQ_ORDER), q)
    assert torch.equal(unpack_rows(_gptq_pack_rows(q)), q)
    assert torch.equal(unpack_cols(_gptq_pack_zeros(q)), q)


def test_awq_nibble_order_is_the_interleaved_one() -> None:
    """Column c of a word sits in nibble [0, 4, 1, 5, 2, 6, 3, 7][c] (vLLM's reverse order)."""
    q = torch.arange(8, dtype=torch.int32).view(1, 8)
    word = int(pack_cols(q, AWQ_ORDER)) & 0xFFFFFFFF
    assert [(word >> (4 * n)) & 0xF for n in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


# ---------------------------------------------------------------------- loading
def _dense(model: torch.nn.Module, prefix: str) -> torch.Tensor:
    return model.get_submodule(prefix).weight.data


def _expected_parts(hf: transformers.PreTrainedModel, layer: int) -> dict[str, torch.Tensor]:
    """Our fused weights, built from HF's (dequantized) projections."""
    def w(mod: str, proj: str) -> torch.Tensor:
        return hf.get_submodule(f"model.layers.{layer}.{mod}.{proj}").weight.data

    return {"self_attn.qkv_proj": torch.cat([w("self_attn", p) for p in ("q_proj", "k_proj", "v_proj")]),
            "self_attn.o_proj": w("self_attn", "o_proj"),
            "mlp.gate_up_proj": torch.cat([w("mlp", "gate_proj"), w("mlp", "up_proj")]),
            "mlp.down_proj": w("mlp", "down_proj")}


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: getattr(f, "id", None))
def test_loaded_weights_equal_reference_dequantization(quantized, fmt: Fmt) -> None:
    path, hf = quantized(fmt)
    model, source = load_model(path, torch.float32, "cpu")
    assert source.config.quant is not None
    assert source.config.quant.method == {"ct": "compressed-tensors"}.get(fmt.method, fmt.method)
    for layer in range(TINY_LLAMA["num_hidden_layers"]):
        for prefix, ref in _expected_parts(hf, layer).items():
            got = _dense(model, f"model.layers.{layer}.{prefix}")
            assert torch.equal(got, ref), f"{fmt.id} layer {layer} {prefix}"


@pytest.mark.parametrize("fmt", [pytest.param(Fmt("awq", 64), marks=pytest.mark.slow),
                                 Fmt("gptq", 32, sym=False, desc_act=True)], ids=lambda f: getattr(f, "id", None))
def test_greedy_tokens_equal_hf_on_the_dequantized_model(quantized, fmt: Fmt) -> None:
    path, hf = quantized(fmt)
    model, _ = load_model(path, torch.float32, "cpu")
    prompt = tiny_ids(1, 11)
    ours = PagedHarness(model, num_blocks=32, block_size=8).greedy(prompt, max_new_tokens=12)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        logits_ref = hf(torch.tensor([prompt])).logits[0]
    assert ours == ref
    logits = PagedHarness(model, num_blocks=32, block_size=8).step([("s", prompt)])[0]
    err = (logits - logits_ref).abs().max().item()
    assert err < 1e-4 * logits_ref.abs().max().item()


def test_engine_serves_a_gptq_checkpoint_like_hf(quantized) -> None:
    from pagedattn import LLM, SamplingParams

    path, hf = quantized(Fmt("gptq", 128, sym=True))
    prompt = tiny_ids(2, 9)
    llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=32, block_size=8)
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    finally:
        llm.shutdown()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert list(out[0].outputs[0].token_ids) == ref


# ---------------------------------------------------------------------- tensor parallelism
def _load_shard(path: Path, rank: int, tp: int) -> torch.nn.Module:
    cfg = ModelArchConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    assert cfg.quant is not None
    model = build_model(cfg, torch.float32, "cpu", tp_rank=rank, tp_size=tp)
    model.load_weights(checkpoint_to_internal(iter_safetensors([path / "model.safetensors"]), cfg.quant))
    finish_loading(model)
    return model


@pytest.mark.parametrize("fmt", [Fmt("awq", 64), Fmt("gptq", 32, sym=False, desc_act=True),
                                 Fmt("gptq", -1, sym=False, v2=True), Fmt("ct", 32, sym=False, desc_act=True)],
                         ids=lambda f: f.id)
def test_tensor_parallel_shards_are_slices_of_the_dequantized_weights(quantized, fmt: Fmt) -> None:
    """Column-parallel layers keep their output features, row-parallel ones their input
    features, in whole groups (act-order: all groups and this rank's g_idx)."""
    path, hf = quantized(fmt)
    tp = 2
    for rank in range(tp):
        model = _load_shard(path, rank, tp)
        for layer in range(TINY_LLAMA["num_hidden_layers"]):
            ref = _expected_parts(hf, layer)
            q, kv = 128 // tp, 64 // tp
            qkv = ref["self_attn.qkv_proj"]
            want_qkv = torch.cat([qkv[rank * q:(rank + 1) * q], qkv[128 + rank * kv:128 + (rank + 1) * kv],
                                  qkv[192 + rank * kv:192 + (rank + 1) * kv]])
            inter = 256 // tp
            gu = ref["mlp.gate_up_proj"]
            want_gu = torch.cat([gu[rank * inter:(rank + 1) * inter], gu[256 + rank * inter:256 + (rank + 1) * inter]])
            base = f"model.layers.{layer}."
            assert torch.equal(_dense(model, base + "self_attn.qkv_proj"), want_qkv)
            assert torch.equal(_dense(model, base + "mlp.gate_up_proj"), want_gu)
            assert torch.equal(_dense(model, base + "self_attn.o_proj"),
                               ref["self_attn.o_proj"][:, rank * 64:(rank + 1) * 64])
            assert torch.equal(_dense(model, base + "mlp.down_proj"),
                               ref["mlp.down_proj"][:, rank * inter:(rank + 1) * inter])


def _tp_worker(rank: int, world: int, rdzv: str, model_dir: str, ids: list[int], out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, _ = load_model(model_dir, torch.float32, "cpu", tp_rank=rank, tp_size=world)
        logits = PagedHarness(model, num_blocks=32, block_size=8).step([("s", ids)])[0]
        torch.save(logits, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_int4_model_matches_hf(quantized, tmp_path: Path) -> None:
    """The act-order GPTQ model sharded over 2 processes (gloo): every rank's logits are HF's
    on the dequantized model."""
    path, hf = quantized(Fmt("gptq", 32, sym=False, desc_act=True))
    ids = tiny_ids(7, 13)
    torch.multiprocessing.spawn(_tp_worker, args=(2, str(tmp_path / "rdzv"), str(path), ids, str(tmp_path)),
                                nprocs=2, join=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_a_group_split_between_ranks_is_refused(quantized) -> None:
    path, _ = quantized(Fmt("awq", 128))
    with pytest.raises(ValueError, match=r"group_size 128 does not divide this rank's 64 input features"):
        _load_shard(path, 0, 2)


# ---------------------------------------------------------------------- the packed runtime form
@pytest.mark.parametrize("fmt", [Fmt("awq", 64), Fmt("gptq", 32, sym=False, desc_act=True),
                                 Fmt("gptq", 128, sym=True), Fmt("ct", 128, sym=True)], ids=lambda f: f.id)
def test_packed_form_computes_the_dequantized_model(quantized, fmt: Fmt) -> None:
    """What a GPU keeps (act-order rows sorted, the input permuted, constant zero points), run
    on the CPU through the torch reference of the int4 GEMM: the logits of the dense model."""
    path, hf = quantized(fmt)
    cfg = ModelArchConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    assert cfg.quant is not None
    model = build_model(cfg, torch.float32, "cpu")
    model.load_weights(checkpoint_to_internal(iter_safetensors([path / "model.safetensors"]), cfg.quant))
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.finish_loading(dequantize=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(not m.is_dense for m in layers)
    if fmt.desc_act:
        assert all(m.perm is not None and m.g_idx is None for m in layers)  # sorted rows: uniform groups again
    if fmt.sym:
        assert all(m.zeros is None for m in layers)
    prompt = tiny_ids(3, 14)
    logits = PagedHarness(model, num_blocks=32, block_size=8).step([("s", prompt)])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert (logits - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


# ---------------------------------------------------------------------- dummy weights
def test_dummy_int4_model_is_the_rounded_dense_model(tmp_path: Path) -> None:
    """``load_format="dummy"`` of a quantized config draws the dense model's weights and rounds
    them to int4 in the checkpoint's format: every weight within half a step of the dense one."""
    cfg = transformers.LlamaConfig(**TINY_LLAMA).to_dict()
    dense_dir, q_dir = tmp_path / "dense", tmp_path / "awq"
    for d, extra in ((dense_dir, {}), (q_dir, {"quantization_config": Fmt("awq", 64).config()})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
    dense, _ = load_model(dense_dir, torch.float32, "cpu", load_format="dummy", seed=3)
    quant, _ = load_model(q_dir, torch.float32, "cpu", load_format="dummy", seed=3)
    for name in ("model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"):
        w, wq = _dense(dense, name), _dense(quant, name)
        step = (w.reshape(w.shape[0], -1, 64).amax(-1) - w.reshape(w.shape[0], -1, 64).amin(-1)) / 15
        err = (wq - w).abs().reshape(w.shape[0], -1, 64).amax(-1)
        assert bool((err <= step * 0.51 + 1e-6).all())
        assert not torch.equal(w, wq)
    torch.testing.assert_close(_dense(quant, "model.norm"), _dense(dense, "model.norm"))


def test_rtn_checkpoint_tensors_round_trip() -> None:
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(5))
    for fmt in (Fmt("awq", 32), Fmt("gptq", 64, sym=False), Fmt("gptq", 64, sym=False, v2=True),
                Fmt("ct", 32, sym=False), Fmt("ct", 64, sym=True, desc_act=True)):
        quant = parse_quant_config(fmt.config())
        assert quant is not None
        q, z, s = quantize_rtn(w, fmt.group_size, sym=fmt.sym)
        z = z.clamp(min=1)  # v1 cannot store a zero of 0
        packed = checkpoint_tensors(quant, q, z, s)
        tensors = dict(checkpoint_to_internal(((f"x.{k}", t) for k, t in packed.items()), quant))
        assert torch.equal(unpack_rows(tensors["x.qweight"]), q)
        assert torch.equal(tensors["x.zeros"], z)


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("change", "match"), [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ({"bits": 8}, "bits=8 is not supported"),
    ({"group_size": 48}, "group_size 48 is not supported"),
    ({"version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"zero_point": False}, "zero_point: false"),
    ({"modules_to_not_convert": ["model.layers.0.mlp"]}, "modules_to_not_convert"),
])
def test_unsupported_quantization_configs_are_refused(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_quant_config({**Fmt("awq").config(), **change})


@pytest.mark.parametrize(("change", "match"), [
    ({"format": "naive-quantized"}, "format 'naive-quantized' is not supported"),
    ({"input_activations": {"num_bits": 8}}, "activation quantization"),
    ({"targets": ["re:.*mlp.*"]}, "targets"),
    ({"weights": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 128}}, "type 'float'"),
    ({"weights": {"num_bits": 4, "type": "int", "strategy": "tensor"}}, "strategy 'tensor'"),
    ({"weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}, "bits=8"),
])
def test_unsupported_compressed_tensors_configs_are_refused(change: dict, match: str) -> None:
    cfg = Fmt("ct", 128, sym=True).config()
    cfg["config_groups"]["group_0"].update(change)
    with pytest.raises(ValueError, match=match):
        parse_quant_config(cfg)
    with pytest.raises(ValueError, match="ignore"):
        parse_quant_config({**Fmt("ct", 128).config(), "ignore": ["lm_head", "model.layers.0.mlp.down_proj"]})


def test_gptq_config_fields() -> None:
    q = parse_quant_config(Fmt("gptq", 32, sym=False, desc_act=True).config(), torch.bfloat16)
    assert q is not None and q.desc_act and not q.sym and q.zero_offset == 1 and q.scale_dtype == torch.bfloat16
    q2 = parse_quant_config(Fmt("gptq", 32, v2=True).config())
    assert q2 is not None and q2.zero_offset == 0
    with pytest.raises(ValueError, match="checkpoint_format 'marlin'"):
        parse_quant_config({**Fmt("gptq").config(), "checkpoint_format": "marlin"})


def test_quantized_tensors_without_a_quantization_config_are_refused(quantized, tmp_path: Path) -> None:
    path, _ = quantized(Fmt("awq", 128))
    bare = tmp_path / "bare"
    bare.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (bare / "config.json").write_text(json.dumps(cfg))
    (bare / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"is quantized, but config\.json has no quantization_config"):
        load_model(bare, torch.float32, "cpu")


def test_fused_parts_with_different_act_orders_are_refused(quantized, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path, _ = quantized(Fmt("gptq", 32, sym=False, desc_act=True))
    tensors = dict(iter_safetensors([path / "model.safetensors"]))
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"g_idx of part '[qkv]' differs"):
        load_model(bad, torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [Fmt("awq", 64), Fmt("gptq", 32, sym=False, desc_act=True),
                                 Fmt("gptq", 128, sym=True), Fmt("ct", 32, sym=False, desc_act=True)],
                         ids=lambda f: f.id)
def test_cuda_int4_kernels_compute_the_dequantized_model(quantized, fmt: Fmt, dtype: torch.dtype) -> None:
    """On the GPU the packed weights run through the W4A16 kernels (prefill chunk, then
    one-row decodes: GEMM and GEMV) with the Triton attention: HF's logits on the dequantized model."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from pagedattn.attention.selector import get_attention_backend

    path, hf = quantized(fmt)
    model, _ = load_model(path, dtype, "cuda")
    assert all(not m.is_dense for m in model.modules() if isinstance(m, QuantLinear))
    h = PagedHarness(model, num_blocks=32, block_size=8, device="cuda", backend=get_attention_backend("cuda", "triton"))
    ids = tiny_ids(4, 20)
    got = torch.cat([h.step([("s", ids[:14])])[0]] + [h.step([("s", [t])])[0] for t in ids[14:]]).float().cpu()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        assert (got - ref).abs().max().item() < 1e-3 * scale
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    else:
        assert (got - ref).abs().max().item() < 0.1 * scale
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
