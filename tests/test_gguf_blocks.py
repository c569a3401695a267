"""GGUF weights kept in their blocks (the GPU's form): which rows each layer holds, the bytes it
takes, the refusals, and the model's outputs against the dequantized model.

The layers' weights must be the dense model's to the bit (both come from gguf's dequantizer);
the forward passes run the Triton kernels (under the interpreter without CUDA), so the logits
differ from the dense model's only by the kernels' summation order (fp32) or their rounding of
the weights to the activation dtype (the ``gpu`` test, fp16 and bf16).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from .triton_interpreter import CUDA, DEVICE, rerun_in_fresh_process, skip_unless_runnable

pytest.importorskip("triton")

from pagedattn.models.gguf_quant import gpu_uncovered_tensors, keep_gguf_blocks
from pagedattn.models.layers.quantized import GGUFBlockWeight
from pagedattn.models.loader import load_model
from pagedattn.models.testing import PagedHarness
from pagedattn.runtime.worker import _gpu_blocks_cover, quantized_gguf
from tests.test_gguf_kernels import random_blocks
from tests.test_loader import _gguf_sizes, _random_hf, add_hf_tensors, close_gguf

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

SIZES: dict[str, Any] = dict(vocab_size=200, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_blocks_in_fresh_interpreter_process")


def test_blocks_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


def _q4_k_m(name: str) -> str:
    """A Q4_K_M-like mix: Q6_K for v and down, Q5_K for up (to cover it), Q8_0 for the embedding."""
    if "embed_tokens" in name:
        return "Q8_0"
    if "lm_head" in name or "v_proj" in name or "down_proj" in name:
        return "Q6_K"
    return "Q5_K" if "up_proj" in name else "Q4_K"


def _phi3(name: str) -> str:
    """Phi-3's fused tensors (attn_qkv, ffn_up as gate/up) in one type each."""
    return "Q6_K" if "qkv_proj" in name or "down_proj" in name else "Q4_K"


def _legacy(name: str) -> str:
    """The 32-element types: Q4_1 embedding, Q8_0 attention, Q4_0 MLP."""
    if "embed_tokens" in name:
        return "Q4_1"
    return "Q8_0" if "self_attn" in name or "lm_head" in name else "Q4_0"


def _blocks(kind: str, a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "Q3_K":  # random codes; d (the last two bytes of 110) a weight's size
        raw = rng.integers(0, 256, (a.size // 256, 110), dtype=np.uint8)
        raw[:, 108:] = (rng.uniform(0.5, 2.0, len(raw)) * 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
        return raw.reshape(a.shape[0], -1)
    try:
        return np.asarray(gguf.quants.quantize(a.astype(np.float32), T[kind]))
    except NotImplementedError:
        return random_blocks(kind, *a.shape, rng)


def write_mixed_gguf(path: Path, hf: transformers.PreTrainedModel, arch: str, types: Callable[[str], str],
                     seed: int = 0) -> Path:
    """A GGUF of ``hf``'s config, each 2-D weight of type ``types(hf_name)`` (gguf's quantization
    of ``hf``'s weight where gguf-py has one, else random blocks); norms and biases F32."""
    c = hf.config
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    _gguf_sizes(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "phi3":  # full rotary, no window
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        w.add_sliding_window(0)
    add_hf_tensors(w, hf, arch, lambda name, a: (_blocks(types(name), a, rng), T[types(name)]))
    return close_gguf(w, path)


CASES: dict[str, tuple[str, str, dict[str, Any], Callable[[str], str]]] = {
    "llama_q4_k_m_tied": ("llama", "LlamaConfig", dict(tie_word_embeddings=True), _q4_k_m),
    "qwen2_legacy_bias": ("qwen2", "Qwen2Config", dict(tie_word_embeddings=False), _legacy),
    "phi3_fused_tensors": ("phi3", "Phi3Config", dict(tie_word_embeddings=False, pad_token_id=0), _phi3),
}


def _case_gguf(case: str, tmp_path: Path, **sizes: Any) -> Path:
    arch, cls_name, extra, types = CASES[case]
    hf = _random_hf(cls_name, 11, **{**SIZES, **extra, **sizes})
    return write_mixed_gguf(tmp_path / f"{case}.gguf", hf, arch, types)


def _kept(model: torch.nn.Module) -> dict[str, GGUFBlockWeight]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(getattr(m, "weight", None),
                                                                             GGUFBlockWeight)}


def _matrix_bytes(path: Path) -> int:
    """The bytes of the file's 2-D tensors (all but norms and biases)."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2)


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_blocks_are_the_dense_weights_and_the_files_bytes(case: str, tmp_path: Path) -> None:
    path = _case_gguf(case, tmp_path)
    dense, _ = load_model(path, torch.float32, "cpu")
    model, source = load_model(path, torch.float32, "cpu")
    n_linear = 4 * model.config.num_layers + 1  # qkv, o, gate_up, down per layer, and the LM head
    assert keep_gguf_blocks(model, source.model_dir) == n_linear
    kept = _kept(model)
    assert len(kept) == n_linear + 1 and "model.embed_tokens" in kept  # the embedding's table too
    for name, w in kept.items():
        assert torch.equal(w.dequantize(), dense.get_submodule(name).weight), name
    if case == "llama_q4_k_m_tied":  # q/k Q4_K, v Q6_K: one weight, two runs
        assert kept["model.layers.0.self_attn.qkv_proj"].kinds == ["Q4_K", "Q6_K"]
        assert kept["model.layers.1.mlp.gate_up_proj"].kinds == ["Q4_K", "Q5_K"]
    if model.config.tie_word_embeddings:  # one table for both
        assert kept["lm_head"] is kept["model.embed_tokens"]
    held = {id(w): w.nbytes for w in kept.values()}
    assert sum(held.values()) == _matrix_bytes(path)  # the file's bytes, no more
    ids = torch.randint(3, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    want = PagedHarness(dense, num_blocks=16, block_size=4).step([("s", ids)])[0]
    got = PagedHarness(model, num_blocks=16, block_size=4).step([("s", ids)])[0]
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # same weights: summation order only


@torch.no_grad()
def test_tensor_parallel_ranks_hold_their_slices(tmp_path: Path) -> None:
    """Two ranks: q/k/v and gate/up split by rows, o and down by whole blocks of inputs."""
    path = _case_gguf("llama_q4_k_m_tied", tmp_path, hidden_size=512, intermediate_size=1024)
    for rank in range(2):
        dense, _ = load_model(path, torch.float32, "cpu", tp_rank=rank, tp_size=2)
        model, source = load_model(path, torch.float32, "cpu", tp_rank=rank, tp_size=2)
        assert keep_gguf_blocks(model, source.model_dir) == 4 * model.config.num_layers + 1
        for name, w in _kept(model).items():
            assert torch.equal(w.dequantize(), dense.get_submodule(name).weight), (rank, name)


def test_a_slice_cutting_through_blocks_is_refused(tmp_path: Path) -> None:
    # o: 256 inputs per rank; down: 384, 1.5 blocks of 256
    path = _case_gguf("llama_q4_k_m_tied", tmp_path, hidden_size=512, intermediate_size=768)
    model, source = load_model(path, torch.float32, "cpu", tp_rank=1, tp_size=2)
    with pytest.raises(ValueError, match=r"input features per rank are not whole Q6_K blocks of 256.*"
                                         r"gguf_quantized=False"):
        keep_gguf_blocks(model, source.model_dir)


def test_a_type_without_a_kernel_is_named(tmp_path: Path) -> None:
    hf = _random_hf("LlamaConfig", 12, **{**SIZES, "tie_word_embeddings": False})
    types = {"model.layers.1.mlp.down_proj.weight": "Q3_K", "model.embed_tokens.weight": "Q3_K"}
    path = write_mixed_gguf(tmp_path / "m.gguf", hf, "llama", lambda name: types.get(name, "Q4_K"))
    model, source = load_model(path, torch.float32, "cpu")
    # The untied embedding is no linear: only the down projection has no kernel.
    assert gpu_uncovered_tensors(source.model_dir) == {"model.layers.1.mlp.down_proj.weight": "Q3_K"}
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight is Q3_K, a GGUF type without a "
                                         r"GPU kernel \(supported: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K\)"):
        keep_gguf_blocks(model, source.model_dir)
    with pytest.raises(ValueError, match=r"GGUF types without a GPU kernel: model.layers.1.mlp.down_proj.weight "
                                         r"\(Q3_K\).*gguf_quantized=False"):
        _gpu_blocks_cover(SimpleNamespace(gguf_quantized=True), source.model_dir)  # type: ignore[arg-type]
    # The engine's choice on a GPU: off by default for this file, on for one the kernels cover.
    cuda = dict(torch_device=torch.device("cuda"), load_format="auto", gguf_quantized=None)
    assert not quantized_gguf(SimpleNamespace(**cuda), path, torch.float16, source.model_dir)  # type: ignore[arg-type]
    covered = load_model(_case_gguf("qwen2_legacy_bias", tmp_path), torch.float32, "cpu")[1].model_dir
    assert quantized_gguf(SimpleNamespace(**cuda), path, torch.float16, covered)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_gpu_logits_match_the_dequantized_model(dtype: torch.dtype, tmp_path: Path) -> None:
    """On CUDA, through the engine's default: the linears in blocks, logits close to the dense
    model's in the same dtype (each kernel rounds the weight to it, as the dense model holds it)."""
    from pagedattn import LLM, SamplingParams

    path = _case_gguf("llama_q4_k_m_tied", tmp_path)
    name = str(dtype).removeprefix("torch.")
    prompts = [torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17)]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    firsts = []
    for quantized in (None, False):  # the default (blocks), then dense; decode through CUDA graphs
        llm = LLM(str(path), dtype=name, num_kv_blocks=32, block_size=4, gguf_quantized=quantized)
        assert len(_kept(llm.engine.executor.worker.model)) == (10 if quantized is None else 0)  # type: ignore
        outs = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
        assert all(len(o) == 8 for o in outs)
        firsts.append([o[0] for o in outs])
        llm.shutdown()
        del llm
    assert firsts[0] == firsts[1]  # prefill's argmax: logits within a 16-bit rounding of each other
    if dtype == torch.float16:
        # This random model's activations overflow float16 (its dense logits are NaN in float16
        # on the CPU too); the kernels' float16 arithmetic is compared in test_gguf_kernels.
        return
    dense, _ = load_model(path, dtype, DEVICE)
    model, source = load_model(path, dtype, DEVICE)
    assert keep_gguf_blocks(model, source.model_dir) == 9
    assert _kept(model)["model.embed_tokens"].blocks0.device.type == "cuda"
    ids = torch.randint(3, 200, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    want = PagedHarness(dense, num_blocks=16, block_size=4, device=DEVICE).step([("s", ids)])[0].float()
    got = PagedHarness(model, num_blocks=16, block_size=4, device=DEVICE).step([("s", ids)])[0].float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
