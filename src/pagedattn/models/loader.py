"""Resolve a model reference to a HF-style folder and load it into our model classes.

A reference is ``None`` (the embedded default model), a folder with ``config.json`` and
``*.safetensors`` weights (one file, or shards listed in ``model.safetensors.index.json``), or a
``.gguf`` file (converted once into a cached folder, see :mod:`.gguf`), or a Hugging Face Hub id
(a snapshot folder of huggingface_hub's cache, see :mod:`.hub`).  Weights are streamed
tensor by tensor from the safetensors files straight into the parameters in the target dtype;
under tensor parallelism each rank's layers copy only their slice of each tensor, so no rank
ever holds the whole model.  A GGUF model loaded with ``gguf_quantized`` gets its kept linears'
quantized forms from the GGUF's blocks first; their dense weights are never allocated.
``load_format="dummy"`` needs only ``config.json``: it fills the
model with seeded random weights (see :func:`dummy_weights`), for benchmarks of large shapes.
Only :mod:`.hub` may touch the network (to fetch a Hub model missing from the cache).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Collection, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .base import DecoderForCausalLM
from .config import ModelArchConfig, parse_token_ids
from .gguf import convert_gguf, default_gguf_path
from .hub import is_hub_id, snapshot_folder
from .layers import (
    ColumnParallelLinear,
    Fp8Linear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    QuantLinear,
    RMSNorm,
    RowParallelLinear,
    ShardId,
    VocabParallelEmbedding,
    deferred_params,
    materialize_params,
)
from .layers.quant import checkpoint_to_internal, finish_loading
from .quant_formats import checkpoint_tensors, quantize_fp8, quantize_rtn
from .registry import build_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

WEIGHTS_INDEX = "model.safetensors.index.json"
# Any of these makes a folder loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
# generation_config.json keys passed on as request defaults.
GENERATION_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "do_sample",
    "max_new_tokens",
)
LOAD_FORMATS = ("auto", "dummy")
# Standard deviation of dummy weights (transformers' default ``initializer_range``).
DUMMY_STD = 0.02


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from and what the engine needs besides its weights."""

    model_dir: Path  # the HF-style folder the weights were read from
    config: ModelArchConfig
    hf_config: dict[str, Any]  # config.json as written
    weight_files: tuple[Path, ...]
    tokenizer_path: Path | None  # None: the folder has no tokenizer; prompts must be token ids
    eos_token_ids: tuple[int, ...]  # stop ids (generation_config.json first, else config.json)
    bos_token_id: int | None
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    gguf_file: Path | None = None  # the original .gguf when model_dir is its conversion


def resolve_model_source(model: str | Path | None, load_format: str = "auto",
                         download_dir: str | None = None) -> ModelSource:
    """Locate and validate everything for ``model`` without loading weights.

    A reference that is no local path but a Hub id is fetched through huggingface_hub's cache
    (``download_dir``: a cache of its own; see :mod:`.hub`).
    ``load_format="dummy"`` needs no weight files (``weight_files`` is empty)."""
    check_load_format(load_format)
    gguf_file: Path | None = None
    if model is None:
        gguf_file = default_gguf_path()
        folder = convert_gguf(gguf_file)
    else:
        path = Path(model).expanduser()
        if not path.exists() and is_hub_id(str(model)):  # a local path always wins
            path = snapshot_folder(str(model), download_dir, weights=load_format == "auto")
        if not path.exists():
            raise FileNotFoundError(f"model path does not exist: {path} (expected a HF model folder or a .gguf file)")
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(f"model file {path} is not a .gguf file; pass a HF model folder or a .gguf file")
            gguf_file = path.resolve()
            folder = convert_gguf(gguf_file)
        else:
            folder = path.resolve()
    hf_config = _read_json(folder / "config.json", "config.json")
    try:
        config = ModelArchConfig.from_hf_config(hf_config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a value of the wrong type fails deep inside
        raise ValueError(f"{folder / 'config.json'}: {e}") from None
    weight_files = check_weight_files(find_weight_files(folder)) if load_format == "auto" else ()
    gen = _read_generation_config(folder)
    eos = parse_token_ids(gen.get("eos_token_id")) or config.eos_token_ids
    bos = gen.get("bos_token_id", config.bos_token_id)
    tokenizer_path = folder if any((folder / f).is_file() for f in TOKENIZER_FILES) else None
    return ModelSource(
        model_dir=folder,
        config=config,
        hf_config=hf_config,
        weight_files=weight_files,
        tokenizer_path=tokenizer_path,
        eos_token_ids=eos,
        bos_token_id=bos,
        generation_defaults={k: gen[k] for k in GENERATION_KEYS if k in gen},
        gguf_file=gguf_file,
    )


def find_weight_files(folder: Path) -> tuple[Path, ...]:
    """The safetensors files of a folder: the shards of the index if there is one, else every
    ``*.safetensors``."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = _read_json(index, WEIGHTS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = tuple(folder / name for name in sorted(set(weight_map.values())))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"weight shards listed in {index} are missing: {', '.join(missing)}")
        return files
    files = tuple(sorted(folder.glob("*.safetensors")))
    if not files:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(other)}: only safetensors weights are supported)" if other else ""
        raise FileNotFoundError(f"no weight files (*.safetensors) in {folder}{hint}")
    return files


def check_weight_files(files: tuple[Path, ...]) -> tuple[Path, ...]:
    """Open every safetensors file's header (cheap: no tensor is read), so that an empty,
    foreign or truncated file is an error naming it before anything is built."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return files


def iter_safetensors(files: Iterable[Path], skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one tensor at a time (memory-mapped, CPU, stored dtype); the
    tensors named in ``skip`` are not read at all."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if name not in skip:
                    yield name, f.get_tensor(name)


def load_model(
    model: str | Path | None,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    load_format: str = "auto",
    seed: int = 0,
    gguf_quantized: bool = False,
    gguf_blocks: bool | None = None,
) -> tuple[DecoderForCausalLM, ModelSource]:
    """Build the model for ``model`` (see :func:`resolve_model_source`) on ``device`` in ``dtype``
    and stream its weights in.  Returns the model (eval mode) and its :class:`ModelSource`.

    With ``tp_size > 1`` the model is rank ``tp_rank``'s shard: every checkpoint tensor passes
    through its layer's ``weight_loader``, which keeps this rank's slice only.
    ``load_format="dummy"`` fills the weights from :func:`dummy_weights` (``seed``) instead.

    ``gguf_quantized`` (a GGUF model or its converted folder): the linears the GGUF's blocks cover get their
    quantized form first, straight from the blocks (``gguf_blocks``: the file's own blocks,
    default on CUDA; else the CPU's int4/int8 forms, see :mod:`.gguf_quant`), and only the other
    tensors are read: those layers' dense weights are never allocated."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a torch floating dtype, got {dtype!r}")
    source = resolve_model_source(model, load_format)
    if gguf_quantized and load_format != "auto":
        raise ValueError("gguf_quantized: dummy weights have no GGUF blocks; use load_format='auto'")
    t0 = time.perf_counter()
    with deferred_params() if gguf_quantized else nullcontext():
        net = build_model(source.config, dtype, device, tp_rank=tp_rank, tp_size=tp_size)
    skip: set[str] = set()
    if gguf_quantized:
        from .gguf_quant import keep_gguf_forms  # (imports the GGUF kernels: only for such a load)

        blocks = torch.device(device).type == "cuda" if gguf_blocks is None else gguf_blocks
        skip = keep_gguf_forms(net, source.model_dir, device, blocks=blocks)
        materialize_params(net, device)  # the layers that stay dense
    weights = iter_safetensors(source.weight_files, skip) if load_format == "auto" else dummy_weights(net, seed)
    quant = source.config.quant
    if quant is not None:  # quantized tensors into the one layout every format loads into
        weights = checkpoint_to_internal(weights, quant)
    try:
        net.load_weights(weights)
        finish_loading(net)
    except ValueError as e:
        raise ValueError(f"{source.model_dir}: {e}") from None
    logger.info("loaded %s (%s, %s weights, tp rank %d/%d) in %.2f s", source.model_dir, source.config.architecture,
                load_format, tp_rank, tp_size, time.perf_counter() - t0)
    return net, source


def check_load_format(load_format: str) -> None:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")


def dummy_weights(model: DecoderForCausalLM, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random checkpoint tensors for every weight of ``model``, in checkpoint names and shapes.

    Like a fresh transformers model: RMSNorm weights are ones (Gemma's, offsets from one, zeros),
    biases zeros, everything else
    normal with std :data:`DUMMY_STD`.  Each tensor is drawn from its own generator seeded
    with ``seed`` and its name, so every rank and every ``tp_size`` sees the same full tensors
    (made one at a time on the parameter's device) and the shards form one model.
    """
    params = dict(model.named_parameters())
    for name, (pname, shard) in model.checkpoint_names().items():
        param = params[pname]
        owner = model.get_submodule(pname.rpartition(".")[0])
        shape = checkpoint_shape(owner, param, shard)
        if isinstance(owner, QuantLinear):
            if name.endswith(".qweight"):  # the dense draw, rounded to int4 in the checkpoint's format
                prefix = name.removesuffix("qweight")
                w = _dummy_dense(prefix + "weight", shape, owner.params_dtype, param.device, seed)
                q = owner.quant
                tensors = checkpoint_tensors(q, *quantize_rtn(w, q.group_size, q.scale_dtype, q.sym))
                yield from ((prefix + kind, t) for kind, t in tensors.items())
            continue
        if isinstance(owner, Fp8Linear):
            if name.endswith(".weight"):  # the dense draw, rounded to e4m3 in the checkpoint's format
                prefix = name.removesuffix("weight")
                w = _dummy_dense(name, shape, owner.params_dtype, param.device, seed)
                yield from ((prefix + kind, t) for kind, t in quantize_fp8(owner.quant, w).items())
                continue
            if name.endswith(".weight_scale"):
                continue
        if isinstance(owner, RMSNorm):
            yield name, torch.full(shape, 0.0 if owner.unit_offset else 1.0, dtype=param.dtype, device=param.device)
        elif param.dim() == 1:
            yield name, torch.zeros(shape, dtype=param.dtype, device=param.device)
        else:
            yield name, _dummy_dense(name, shape, param.dtype, param.device, seed)


def _dummy_dense(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 seed: int) -> torch.Tensor:
    """A dummy weight: normal with std :data:`DUMMY_STD` from a generator seeded by ``seed`` and ``name``."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, DUMMY_STD, generator=gen)


def checkpoint_shape(owner: torch.nn.Module, param: torch.nn.Parameter, shard: ShardId) -> tuple[int, ...]:
    """Shape of the full (unsharded) checkpoint tensor that ``owner.weight_loader`` expects for
    ``param`` (part ``shard`` of a fused weight)."""
    own_shape = getattr(owner, "checkpoint_shape", None)
    if callable(own_shape):  # a layer that knows its checkpoint shapes (MoE experts)
        return tuple(own_shape(param, shard))
    if isinstance(owner, VocabParallelEmbedding):
        return (owner.num_embeddings, owner.embedding_dim)
    if isinstance(owner, RowParallelLinear):
        return (owner.output_size, owner.input_size) if param.dim() == 2 else (owner.output_size,)
    if isinstance(owner, QKVParallelLinear):
        heads = owner.total_num_heads if shard == "q" else owner.total_num_kv_heads
        rows = heads * owner.head_size
    elif isinstance(owner, MergedColumnParallelLinear):
        assert isinstance(shard, int)
        rows = owner.output_sizes[shard]
    elif isinstance(owner, ColumnParallelLinear):
        rows = owner.output_size
    else:  # replicated (norms)
        return tuple(param.shape)
    return (rows, owner.input_size) if param.dim() == 2 else (rows,)


# tokenizer_config.json classes that are nothing but tokenizer.json: no model-specific code.
_GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer (local files only), or None if it has none.

    ``AutoTokenizer`` by default.  A generic ``tokenizer.json`` tokenizer (as the GGUF
    conversion writes) loads directly: ``AutoTokenizer`` would first import the model's whole
    transformers config machinery, 1.3 s of a 2-core CPU's start-up for the same tokenizer."""
    path = source.tokenizer_path
    if path is None:
        return None
    cfg = path / "tokenizer_config.json"
    generic = (path / "tokenizer.json").is_file() and cfg.is_file() and \
        _read_json(cfg, "tokenizer_config.json").get("tokenizer_class") in _GENERIC_TOKENIZERS
    if generic:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ---------------------------------------------------------------------- helpers
def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no {what} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _read_generation_config(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    return _read_json(path, "generation_config.json") if path.is_file() else {}
