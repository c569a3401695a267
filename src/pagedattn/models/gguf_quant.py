"""A GGUF file's quantized linear weights, kept quantized on the CPU with their exact values.

The converted folder (:mod:`.gguf`) holds every weight dequantized to float32, which the model
loads like any checkpoint.  On the CPU the engine then replaces each linear layer's weight whose
GGUF blocks have an exact low-bit form by that form (:mod:`.layers.quantized`), read straight
from the file's blocks:

=========  ==================================  =====================================
GGUF type  GGUF's value of code ``q``          runtime form (group of 32)
=========  ==================================  =====================================
Q4_0       ``d * (q - 8)``                     int4, scale ``d``, zero ``0``
Q4_1       ``d * q + m``                       int4, scale ``d``, zero ``m + 8d``
Q4_K       ``(d * sc) * q - dmin * mn``        int4, scale ``d * sc``, zero ``8 d sc - dmin mn``
Q8_0       ``d * q``                           int8, scale ``d``
=========  ==================================  =====================================

The int4 kernel computes ``fma(q - 8, scale, zero)``, one rounding of the exact real value, as
gguf's ``dequantize`` does, so the weights are the same float32 numbers, provided ``zero``
itself is exact; that is checked per tensor (half-precision factors of similar size always
are), and a tensor where it is not stays dense.  Other types (Q5_*, Q6_K, ...) have no exact
4- or 8-bit form here and stay dense float32: nothing is re-quantized.

Which checkpoint element lands where in a layer (fused q/k/v and gate/up, tensor-parallel
slices, llama's q/k row order) is not re-derived: each layer's own ``weight_loader`` is run on
a tensor of element indices, and the codes and scales are gathered through the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from .gguf import BLOCKS_FILE, unpermute_qk
from .layers import ColumnParallelLinear, RowParallelLinear, ShardId, WeightLoading
from .layers.quantized import KERNEL_DTYPES, Int4GroupWeight, Int8GroupWeight, QuantizedWeight, set_quantized_weight

if TYPE_CHECKING:
    from .base import DecoderForCausalLM

logger = logging.getLogger(__name__)

GROUP = 32  # every supported type has groups of 32 along the input features


@dataclass(frozen=True)
class Groups:
    """A ``[rows, cols]`` weight as codes ``[rows, cols]`` with one ``scale`` (and for int4 one
    ``zero``) per group of :data:`GROUP` columns, ``[rows, cols / GROUP]`` float32.  ``bits`` 4:
    codes 0..15, weight ``(q - 8) * scale + zero``; ``bits`` 8: int8 codes, weight ``q * scale``."""

    bits: int
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None = None


def _int4(codes: np.ndarray, scale: np.ndarray, shift: np.ndarray | None) -> Groups | None:
    """GGUF's ``scale * q + shift`` as ``(q - 8) * scale + zero``: ``zero = shift + 8 * scale``,
    or None where float32 cannot hold that sum exactly (then the kernel's single rounding would
    not be gguf's)."""
    if shift is None:
        return Groups(4, codes, scale, np.zeros_like(scale))
    zero = shift + 8 * scale
    exact = zero.astype(np.float64) == shift.astype(np.float64) + 8 * scale.astype(np.float64)
    return Groups(4, codes, scale, zero) if bool(exact.all()) else None


# ---------------------------------------------------------------------- GGUF blocks
# type -> (elements, bytes) of one block
_BLOCK_LAYOUT = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q8_0": (32, 34)}


def block_groups(blocks: np.ndarray, kind: str) -> Groups | None:
    """The exact grouped form of a GGUF tensor's blocks (uint8 ``[rows, bytes per row]``, type
    ``kind``), or None (a type without one, or an int4 zero that float32 cannot hold exactly)."""
    if kind not in _BLOCK_LAYOUT or blocks.ndim != 2:
        return None
    elems, nbytes = _BLOCK_LAYOUT[kind]
    rows, row_bytes = blocks.shape
    if row_bytes % nbytes:
        raise ValueError(f"{kind} rows of {row_bytes} bytes are not whole blocks of {nbytes}")
    return _PARSERS[kind](np.ascontiguousarray(blocks, dtype=np.uint8), rows, row_bytes // nbytes * elems)


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., n]`` bytes -> ``[..., 2n]`` codes: the low nibbles first, then the high ones (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(raw: np.ndarray, rows: int, cols: int) -> Groups | None:
    b = raw.reshape(rows, cols // GROUP, 18)  # d (half), 16 bytes of codes
    return _int4(_nibbles(b[..., 2:]).reshape(rows, cols), _half(b, 0), None)


def _q4_1(raw: np.ndarray, rows: int, cols: int) -> Groups | None:
    b = raw.reshape(rows, cols // GROUP, 20)  # d, m (halves), 16 bytes of codes
    return _int4(_nibbles(b[..., 4:]).reshape(rows, cols), _half(b, 0), _half(b, 2))


def _q8_0(raw: np.ndarray, rows: int, cols: int) -> Groups | None:
    b = raw.reshape(rows, cols // GROUP, 34)  # d (half), 32 int8 codes
    return Groups(8, b[..., 2:].copy().view(np.int8).reshape(rows, cols), _half(b, 0))


def _q4_k(raw: np.ndarray, rows: int, cols: int) -> Groups | None:
    b = raw.reshape(rows, cols // 256, 144)  # d, dmin (halves), 12 bytes of 6-bit scales/mins, 128 bytes of codes
    d, dmin = _half(b, 0), _half(b, 2)
    s = b[..., 4:16]
    lo, hi, mix = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)  # 8 sub-blocks of 32
    mn = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    scale = d[..., None] * sc.astype(np.float32)  # exact: a half times a 6-bit integer
    shift = -(dmin[..., None] * mn.astype(np.float32))
    codes = _nibbles(b[..., 16:].reshape(rows, cols // 256, 4, 32))  # 4 pairs of sub-blocks, low nibbles first
    return _int4(codes.reshape(rows, cols), scale.reshape(rows, -1), shift.reshape(rows, -1))


_PARSERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q8_0": _q8_0}


# ---------------------------------------------------------------------- the model
def keep_gguf_quantized(model: DecoderForCausalLM, model_dir: str | Path) -> int:
    """Give every linear layer of ``model`` whose GGUF tensors all have an exact grouped form that
    form, from the blocks a GGUF conversion keeps in ``model_dir`` (:data:`.gguf.BLOCKS_FILE`);
    returns how many layers changed (0 for a folder without blocks).  The kernels compute in the
    model's dtype, float32 (exact weights) or bfloat16 (see :mod:`.layers.quantized`)."""
    from safetensors import safe_open

    if model.dtype not in KERNEL_DTYPES:
        raise ValueError(f"gguf_quantized: the int4 CPU kernel computes in float32 or bfloat16, not {model.dtype}")
    path = Path(model_dir) / BLOCKS_FILE
    if not path.is_file():
        return 0
    changed = 0
    with safe_open(str(path), framework="pt", device="cpu") as f:
        kinds = f.metadata() or {}
        for module_name, module_parts in _layer_parts(model).items():
            if any(ckpt not in kinds for ckpt, _ in module_parts):
                continue
            groups = [block_groups(f.get_tensor(ckpt).numpy(), kinds[ckpt]) for ckpt, _ in module_parts]
            if any(g is None for g in groups) or len({g.bits for g in groups if g is not None}) != 1:
                for (ckpt, _), g in zip(module_parts, groups, strict=True):
                    if g is None:
                        logger.info("%s (%s) stays float32: its zero points are not exact in float32", ckpt,
                                    kinds[ckpt])
                continue
            module = model.get_submodule(module_name)
            parts = [(ckpt, shard, cast(Groups, g)) for (ckpt, shard), g in zip(module_parts, groups, strict=True)]
            set_quantized_weight(module, _layer_weight(model, module, parts))
            changed += 1
    logger.info("kept %d linear layers quantized", changed)
    return changed


def _layer_parts(model: DecoderForCausalLM) -> dict[str, list[tuple[str, ShardId]]]:
    """Linear layer name -> its checkpoint tensors ``(hf_name, shard_id)``, in load order (the
    LM head: the embedding's tensor when tied)."""
    parts: dict[str, list[tuple[str, ShardId]]] = {}
    for ckpt, (pname, shard) in model.checkpoint_names().items():
        owner = pname.rpartition(".")[0]
        linear = isinstance(model.get_submodule(owner), ColumnParallelLinear | RowParallelLinear)
        if linear and pname.endswith(".weight"):
            parts.setdefault(owner, []).append((ckpt, shard))
    parts["lm_head"] = [("model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight", None)]
    return parts


def _layer_weight(model: DecoderForCausalLM, module: nn.Module, parts: list[tuple[str, ShardId, Groups]]
                  ) -> QuantizedWeight:
    """The layer's shard of its parts' groups (``(gguf_name, shard_id, groups)``), placed by the
    layer's own ``weight_loader``."""
    groups = [g for _, _, g in parts]
    sources = _element_index(model, module, parts)  # [out, in], 1-based; 0: padding
    out_f, in_f = sources.shape
    if in_f % GROUP:
        raise ValueError(f"{_desc(module)}: {in_f} input features per rank are not whole groups of {GROUP}; "
                         "use another tensor_parallel_size or gguf_quantized=False")
    firsts = sources[:, ::GROUP]
    in_group = sources.view(out_f, -1, GROUP) - firsts[..., None]  # 0, 1, ..., 31 for a whole group
    whole = (in_group == torch.arange(GROUP)).all(-1) | (sources.view(out_f, -1, GROUP) == 0).all(-1)
    if not bool(whole.all()) or bool(((firsts - 1) % GROUP != 0)[firsts > 0].any()):
        raise ValueError(f"{_desc(module)}: its tensor-parallel slice cuts through groups of {GROUP}; "
                         "use another tensor_parallel_size or gguf_quantized=False")
    codes = torch.cat([torch.from_numpy(np.ascontiguousarray(g.codes)).reshape(-1) for g in groups])
    pad_code = 8 if groups[0].bits == 4 else 0
    codes = torch.cat([codes.new_full((1,), pad_code), codes])  # index 0: padding rows, weight 0
    gathered = codes[sources.reshape(-1)].view(out_f, in_f)
    group_idx = torch.where(firsts > 0, (firsts - 1) // GROUP + 1, 0)

    def per_group(arrays: list[np.ndarray]) -> torch.Tensor:
        flat = torch.cat([torch.zeros(1)] + [torch.from_numpy(np.ascontiguousarray(a, np.float32)).reshape(-1)
                                             for a in arrays])
        return flat[group_idx]

    scales = per_group([g.scales for g in groups])
    if groups[0].bits == 8:
        return Int8GroupWeight(gathered, scales, GROUP, model.dtype)
    return Int4GroupWeight(gathered, scales, per_group([cast(np.ndarray, g.zeros) for g in groups]), GROUP,
                           model.dtype)


def _element_index(model: DecoderForCausalLM, module: nn.Module, parts: list[tuple[str, ShardId, Groups]]
                   ) -> torch.Tensor:
    """For each element of the layer's weight, 1 + its index in the parts' codes laid end to end
    (0 where the layer pads), by running the layer's ``weight_loader`` on index tensors."""
    target = torch.zeros(cast(torch.Tensor, module.weight).shape, dtype=torch.int64)
    offset = 1
    llama = model.config.architecture == "LlamaForCausalLM"
    for gname, shard, g in parts:
        rows, cols = g.codes.shape
        idx = np.arange(offset, offset + rows * cols, dtype=np.int64).reshape(rows, cols)
        if llama and gname.endswith(".q_proj.weight"):  # the same row order as the converted float weights
            idx = unpermute_qk(idx, model.config.num_heads)
        elif llama and gname.endswith(".k_proj.weight"):
            idx = unpermute_qk(idx, model.config.num_kv_heads)
        loaded = torch.from_numpy(np.ascontiguousarray(idx))
        cast(WeightLoading, module).weight_loader(cast(nn.Parameter, target), loaded, shard)
        offset += rows * cols
    return target


def _desc(module: nn.Module) -> str:
    return f"{type(module).__name__}({module.extra_repr()})"

