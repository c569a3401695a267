"""GGUF weights kept quantized on the CPU: the exact low-bit forms of Q4_0, Q4_1, Q4_K and Q8_0,
the layers that run them, and the engine option.

The oracle is gguf's own ``dequantize`` (through the dense model, which loads it): every kept
layer's weights, as its kernel computes with them, must be the same float32 numbers.  The
outputs then differ from the dense model's only by the order of float32 sums.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from pagedattn import LLM, SamplingParams
from pagedattn.models.gguf_quant import GROUP, block_groups, keep_gguf_quantized
from pagedattn.models.layers.quantized import Int4GroupWeight, Int8GroupWeight, QuantizedWeight
from pagedattn.models.loader import load_model
from pagedattn.models.testing import PagedHarness
from tests.test_loader import _gguf_sizes, _random_hf, add_hf_tensors, close_gguf

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
    pytest.skip("this torch has no int4 CPU kernel", allow_module_level=True)

# Sizes in whole groups (Q4_K: superblocks of 256); output rows not a multiple of 16 in places,
# so the kernel's row padding is exercised.
SIZES: dict[str, Any] = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64)
SIZES_K: dict[str, Any] = {**SIZES, "hidden_size": 256, "intermediate_size": 512}


def _q4_k_blocks(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q4_K blocks (gguf-py cannot quantize to Q4_K): finite half-precision d and dmin of a
    weight's usual size, random 6-bit scales and mins, random codes."""
    n = rows * cols // 256
    d = (rng.uniform(0.5, 2.0, n) * 1e-3).astype(np.float16).view(np.uint8).reshape(n, 2)
    dmin = (rng.uniform(0.5, 2.0, n) * 1e-3).astype(np.float16).view(np.uint8).reshape(n, 2)
    rest = rng.integers(0, 256, (n, 140), dtype=np.uint8)
    return np.concatenate([d, dmin, rest], axis=1).reshape(rows, cols // 256 * 144)


def _quantize(a: np.ndarray, qtype: Any, rng: np.random.Generator) -> np.ndarray:
    if qtype == T.Q4_K:
        return _q4_k_blocks(rng, *a.shape)
    return gguf.quants.quantize(a.astype(np.float32), qtype)


def write_quantized_gguf(path: Path, hf: transformers.PreTrainedModel, arch: str, qtype: Any,
                         embed_qtype: Any = T.Q8_0, seed: int = 0) -> Path:
    """A GGUF of ``hf``'s config whose 2-D weights are quantized: linears ``qtype``, the embedding
    (and an untied output) ``embed_qtype``; norms and biases F32."""
    c = hf.config
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    _gguf_sizes(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def encode(name: str, a: np.ndarray) -> tuple[np.ndarray, Any]:
        q = embed_qtype if name in ("model.embed_tokens.weight", "lm_head.weight") else qtype
        return _quantize(a, q, rng), q

    add_hf_tensors(w, hf, arch, encode)
    return close_gguf(w, path)


def _quantized_layers(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(getattr(m, "weight", None),
                                                                             QuantizedWeight)}


def _dense_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach()


# ---------------------------------------------------------------------- the formats
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
@pytest.mark.parametrize("rows", [48, 40])
def test_kernel_weights_equal_gguf_dequantize(qtype: str, rows: int, tmp_path: Path) -> None:
    """A tensor's kept form, as the kernel computes with it, is gguf's dequantize bit for bit."""
    rng = np.random.default_rng(rows)
    cols = 512 if qtype == "Q4_K" else 96
    a = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 0.1, (rows, 1))).astype(np.float32)
    blocks = _quantize(a, T[qtype], rng)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("t", blocks, raw_dtype=T[qtype])
    close_gguf(w, tmp_path / "t.gguf")
    tensor = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors[0]
    groups = block_groups(np.asarray(tensor.data).reshape(rows, -1), qtype)
    assert groups is not None and groups.codes.shape == (rows, cols)
    if groups.bits == 4:
        kept: QuantizedWeight = Int4GroupWeight(torch.from_numpy(groups.codes), torch.from_numpy(groups.scales),
                                                torch.from_numpy(groups.zeros), GROUP)
    else:
        kept = Int8GroupWeight(torch.from_numpy(groups.codes), torch.from_numpy(groups.scales), GROUP)
    want = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols))
    got = kept.dequantize()
    assert got.dtype == torch.float32 and torch.equal(got, want)
    x = torch.randn(5, cols)
    ref = x.double() @ want.double().t()
    assert (kept.linear(x, None).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_an_inexact_int4_zero_keeps_the_tensor_dense(tmp_path: Path) -> None:
    """Q4_1 with a minimum far larger than its step: ``m + 8d`` has no exact float32, so the
    tensor stays dense rather than change its values."""
    rng = np.random.default_rng(0)
    blocks = gguf.quants.quantize(rng.standard_normal((16, 64)).astype(np.float32), T.Q4_1).reshape(16, 2, 20)
    blocks[..., 0:2] = np.frombuffer(np.float16(2.0**-24).tobytes(), np.uint8)  # the smallest half step
    blocks[..., 2:4] = np.frombuffer(np.float16(1000.0).tobytes(), np.uint8)  # a large minimum
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("t", blocks.reshape(16, 40), raw_dtype=T.Q4_1)
    close_gguf(w, tmp_path / "t.gguf")
    tensor = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors[0]
    assert block_groups(np.asarray(tensor.data).reshape(16, -1), "Q4_1") is None


# ---------------------------------------------------------------------- the model
MODEL_CASES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama_q4_1_tied": ("llama", "LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True), "Q4_1"),
    "llama_q4_0": ("llama", "LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False), "Q4_0"),
    "qwen2_q8_0_bias": ("qwen2", "Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=False), "Q8_0"),
    "llama_q4_k": ("llama", "LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True), "Q4_K"),
}


def _model_gguf(case: str, tmp_path: Path) -> Path:
    arch, cls_name, extra, qtype = MODEL_CASES[case]
    hf = _random_hf(cls_name, 5, **{**(SIZES_K if qtype == "Q4_K" else SIZES), **extra})
    return write_quantized_gguf(tmp_path / f"{case}.gguf", hf, arch, T[qtype])


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
@torch.no_grad()
def test_quantized_model_matches_the_dequantized_one(case: str, tmp_path: Path) -> None:
    path = _model_gguf(case, tmp_path)
    dense, _ = load_model(path, torch.float32, "cpu")
    model, source = load_model(path, torch.float32, "cpu")
    n_linear = 4 * model.config.num_layers + 1  # qkv, o, gate_up, down per layer, and the LM head
    assert keep_gguf_quantized(model, source.model_dir) == n_linear
    kept = _quantized_layers(model)
    assert len(kept) == n_linear and "lm_head" in kept
    for name, w in kept.items():
        assert torch.equal(w.dequantize(), _dense_weight(dense, name)), name
    ids = torch.randint(3, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    want = PagedHarness(dense, num_blocks=16, block_size=4).step([("s", ids)])[0]
    got = PagedHarness(model, num_blocks=16, block_size=4).step([("s", ids)])[0]
    # Same weights; only the kernels' float32 summation order differs.
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize(("tp_size", "kv_heads"), [(2, 2), (3, 3), (2, 1)])
@torch.no_grad()
def test_tensor_parallel_shards_keep_their_slice(tp_size: int, kv_heads: int, tmp_path: Path) -> None:
    """Each rank's kept layers are exactly its slice of the dense model's: q/k/v split by heads
    (or one KV head replicated), the row-parallel inputs in whole groups (hidden 192 and
    intermediate 384 over 2 or 3 ranks), the vocabulary's last slice padded."""
    hf = _random_hf("LlamaConfig", 6, **{**SIZES, "hidden_size": 192, "intermediate_size": 384,
                                         "num_attention_heads": 6, "num_key_value_heads": kv_heads})
    path = write_quantized_gguf(tmp_path / "m.gguf", hf, "llama", T.Q4_1)
    for rank in range(tp_size):
        dense, _ = load_model(path, torch.float32, "cpu", tp_rank=rank, tp_size=tp_size)
        model, source = load_model(path, torch.float32, "cpu", tp_rank=rank, tp_size=tp_size)
        assert keep_gguf_quantized(model, source.model_dir) == 4 * model.config.num_layers + 1
        for name, w in _quantized_layers(model).items():
            assert torch.equal(w.dequantize(), _dense_weight(dense, name)), (rank, name)


def test_a_slice_cutting_through_groups_is_refused(tmp_path: Path) -> None:
    hf = _random_hf("LlamaConfig", 7, **{**SIZES, "num_key_value_heads": 2})  # intermediate 96 over 2 ranks: 48
    path = write_quantized_gguf(tmp_path / "m.gguf", hf, "llama", T.Q4_0)
    model, source = load_model(path, torch.float32, "cpu", tp_rank=1, tp_size=2)
    with pytest.raises(ValueError, match=r"input features per rank are not whole groups of 32.*gguf_quantized=False"):
        keep_gguf_quantized(model, source.model_dir)


# ---------------------------------------------------------------------- the engine
def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]


def _engine_model(llm: LLM) -> torch.nn.Module:
    return llm.engine.executor.worker.model  # type: ignore[return-value]


def test_engine_keeps_a_gguf_quantized_when_asked_and_for_bfloat16(tmp_path: Path) -> None:
    """float32 (exact weights) when asked, with the dense model's greedy tokens; bfloat16 by default."""
    path = _model_gguf("llama_q4_1_tied", tmp_path)
    prompts = [torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17)]
    quantized = LLM(str(path), device="cpu", num_kv_blocks=32, block_size=4, gguf_quantized=True)
    assert len(_quantized_layers(_engine_model(quantized))) == 9
    got = _greedy(quantized, prompts)
    dense = LLM(str(path), device="cpu", num_kv_blocks=32, block_size=4)  # float32: dense by default
    assert not _quantized_layers(_engine_model(dense))
    assert got == _greedy(dense, prompts)
    bf16 = LLM(str(path), device="cpu", dtype="bfloat16", num_kv_blocks=32, block_size=4)
    assert len(_quantized_layers(_engine_model(bf16))) == 9


@torch.no_grad()
def test_bfloat16_kernels_round_the_weights_as_a_bfloat16_model_would(tmp_path: Path) -> None:
    """In bfloat16 the kernel rounds scales, zeros and each dequantized weight to bfloat16: every
    weight within a bfloat16 rounding or two of GGUF's, and logits close to the dense bfloat16 model's."""
    path = _model_gguf("llama_q4_1_tied", tmp_path)
    exact, _ = load_model(path, torch.float32, "cpu")
    dense, _ = load_model(path, torch.bfloat16, "cpu")
    model, source = load_model(path, torch.bfloat16, "cpu")
    assert keep_gguf_quantized(model, source.model_dir) == 9
    for name, w in _quantized_layers(model).items():
        want = _dense_weight(exact, name)
        # scale and zero each rounded (2^-9 of |(q - 8) scale| + |zero|, at most about twice the row's
        # largest weight), then the weight itself (2^-9 of it)
        bound = 2.0**-8 * (want.abs() + 2 * want.abs().amax(dim=1, keepdim=True))
        assert ((w.dequantize() - want).abs() <= bound).all(), name
    ids = torch.randint(3, 200, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    want_logits = PagedHarness(dense, num_blocks=16, block_size=4).step([("s", ids)])[0].float()
    got = PagedHarness(model, num_blocks=16, block_size=4).step([("s", ids)])[0].float()
    assert got.dtype == torch.float32 and (got - want_logits).abs().max() <= 0.05 * want_logits.abs().max()


def test_gguf_quantized_on_a_model_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    hf = _random_hf("LlamaConfig", 8, **SIZES)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gguf_quantized: the model is not a GGUF file"):
        LLM(str(tmp_path), device="cpu", num_kv_blocks=8, gguf_quantized=True)
    with pytest.raises(ValueError, match="gguf_quantized: dummy weights have no GGUF blocks"):
        LLM(str(tmp_path), device="cpu", load_format="dummy", gguf_quantized=True)
    path = _model_gguf("llama_q4_0", tmp_path)
    with pytest.raises(ValueError, match="gguf_quantized: the int4 CPU kernel computes in float32 or bfloat16"):
        LLM(str(path), device="cpu", dtype="float16", num_kv_blocks=8, gguf_quantized=True)
