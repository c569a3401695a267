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

On a GPU (:func:`keep_gguf_blocks`) the blocks themselves are the runtime form: the Triton
kernels of :mod:`pagedattn.kernels.gguf_matmul` read Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K
blocks as stored, so each kept layer holds its rows of the file's bytes
(:class:`.layers.quantized.GGUFBlockWeight`).  A tensor of another quantized type (Q2_K, Q3_K,
IQ*, ...) has no kernel: with ``gguf_quantized=True`` that is an error naming it, and by
default such a file stays dense (:func:`gpu_uncovered_tensors`).

Which checkpoint element lands where in a layer (fused q/k/v and gate/up, tensor-parallel
slices, llama's q/k row order) is not re-derived: each layer's own ``weight_loader`` is run on
a tensor of element indices, and the codes and scales (on a GPU: whole rows of blocks) are
gathered through the result.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from ..kernels.gguf_matmul import GGUF_BLOCKS
from .gguf import BLOCKS_FILE, unpermute_qk
from .layers import ColumnParallelLinear, RowParallelLinear, ShardId, WeightLoading
from .layers.quantized import (
    KERNEL_DTYPES,
    GGUFBlockWeight,
    Int4GroupWeight,
    Int8GroupWeight,
    QuantizedWeight,
    set_quantized_weight,
)

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
        kinds, stored = f.metadata() or {}, set(f.keys())
        for module_name, module_parts in _layer_parts(model).items():
            if any(ckpt not in stored for ckpt, _ in module_parts):
                continue
            groups = [block_groups(f.get_tensor(ckpt).numpy(), kinds[ckpt]) for ckpt, _ in module_parts]
            if any(g is None for g in groups) or len({g.bits for g in groups if g is not None}) != 1:
                for (ckpt, _), g in zip(module_parts, groups, strict=True):
                    if g is None:
                        logger.info("%s (%s) stays float32: no exact int4/int8 form (or zero points not exact "
                                    "in float32)", ckpt, kinds[ckpt])
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
    sources = _element_index(model, module, [(name, shard, g.codes.shape) for name, shard, g in parts])
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
    gathered = codes[sources.reshape(-1).long()].view(out_f, in_f)
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


def _element_index(model: DecoderForCausalLM, module: nn.Module, parts: list[tuple[str, ShardId, tuple[int, ...]]]
                   ) -> torch.Tensor:
    """For each element of the layer's weight, 1 + its index in the parts (``(name, shard,
    [rows, cols])``) laid end to end (0 where the layer pads), by running the layer's
    ``weight_loader`` on index tensors (int32 where they fit: an 8B model's LM head has 525M)."""
    total = sum(rows * cols for _, _, (rows, cols) in parts)
    itype, ttype = (np.int32, torch.int32) if total < 2**31 - 1 else (np.int64, torch.int64)
    target = torch.zeros(cast(torch.Tensor, module.weight).shape, dtype=ttype)
    offset = 1
    llama = model.config.architecture == "LlamaForCausalLM"
    for gname, shard, (rows, cols) in parts:
        idx = np.arange(offset, offset + rows * cols, dtype=itype).reshape(rows, cols)
        if llama and gname.endswith(".q_proj.weight"):  # the same row order as the converted float weights
            idx = unpermute_qk(idx, model.config.num_heads)
        elif llama and gname.endswith(".k_proj.weight"):
            idx = unpermute_qk(idx, model.config.num_kv_heads)
        loaded = torch.from_numpy(np.ascontiguousarray(idx))
        cast(WeightLoading, module).weight_loader(cast(nn.Parameter, target), loaded, shard)
        offset += rows * cols
    return target


# ---------------------------------------------------------------------- the GPU's form
def gguf_tensor_types(model_dir: str | Path) -> dict[str, str]:
    """HF name -> GGUF type of every quantized 2-D tensor of the GGUF converted into
    ``model_dir`` (empty for a folder without blocks)."""
    from safetensors import safe_open

    path = Path(model_dir) / BLOCKS_FILE
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def gpu_uncovered_tensors(model_dir: str | Path) -> dict[str, str]:
    """The linear weights (HF name -> type) of the converted GGUF in ``model_dir`` whose type has
    no GPU kernel (an untied embedding is no linear: it is always dense)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    tied = bool(config.get("tie_word_embeddings", False))
    return {name: kind for name, kind in gguf_tensor_types(model_dir).items()
            if kind not in GGUF_BLOCKS and (tied or name != "model.embed_tokens.weight")}


def keep_gguf_blocks(model: DecoderForCausalLM, model_dir: str | Path) -> int:
    """Give every linear layer of ``model`` whose GGUF tensors are all of a GPU kernel's type
    (:data:`~pagedattn.kernels.gguf_matmul.GGUF_BLOCKS`) its rows of those blocks, on the
    layer's device, and the embedding too (a tied LM head shares its blocks); returns how many
    linear layers changed.  A linear with a tensor of another quantized type is an error naming
    it; one with a float tensor stays dense, as does an embedding of another type."""
    from safetensors import safe_open

    path = Path(model_dir) / BLOCKS_FILE
    if not path.is_file():
        return 0
    changed = 0
    with safe_open(str(path), framework="pt", device="cpu") as f:
        kinds, stored = f.metadata() or {}, set(f.keys())
        table = _embedding_blocks(model, f, kinds[EMBED] if EMBED in stored else None)
        for module_name, module_parts in _layer_parts(model).items():
            if module_name == "lm_head" and table is not None and model.config.tie_word_embeddings:
                set_quantized_weight(model.get_submodule(module_name), table)  # the same bytes, held once
                changed += 1
                continue
            for ckpt, _ in module_parts:
                if ckpt in kinds and kinds[ckpt] not in GGUF_BLOCKS:
                    raise ValueError(f"gguf_quantized: {ckpt} is {kinds[ckpt]}, a GGUF type without a GPU kernel "
                                     f"(supported: {', '.join(GGUF_BLOCKS)}); use gguf_quantized=False to run "
                                     "the file dequantized")
            if any(ckpt not in stored for ckpt, _ in module_parts):
                continue  # a float tensor: the layer stays dense
            module = model.get_submodule(module_name)
            parts = [(ckpt, shard, kinds[ckpt], f.get_tensor(ckpt)) for ckpt, shard in module_parts]
            set_quantized_weight(module, _block_weight(model, module, parts))
            changed += 1
    logger.info("kept %d linear layers (and %s embedding) in their GGUF blocks", changed,
                "the" if table is not None else "no")
    return changed


EMBED = "model.embed_tokens.weight"


def _embedding_blocks(model: DecoderForCausalLM, f: Any, kind: str | None) -> GGUFBlockWeight | None:
    """The embedding table kept in its blocks (``kind``: its type, None where it is a float
    tensor), put in the embedding's place; None if it stays dense."""
    if kind is None or kind not in GGUF_BLOCKS:
        return None
    pname, shard = model.checkpoint_names()[EMBED]
    module = model.get_submodule(pname.rpartition(".")[0])
    table = _block_weight(model, module, [(EMBED, shard, kind, f.get_tensor(EMBED))])
    set_quantized_weight(module, table)
    return table


def _block_weight(model: DecoderForCausalLM, module: nn.Module,
                  parts: list[tuple[str, ShardId, str, torch.Tensor]]) -> GGUFBlockWeight:
    """The layer's rows of its parts' blocks (``(hf_name, shard_id, type, uint8 [rows, bytes])``),
    placed by the layer's own ``weight_loader``: each of its rows must be a whole-block stretch of
    one row of a part (a tensor-parallel slice of the inputs starts and ends on a block)."""
    shapes = [(b.shape[0], b.shape[1] // GGUF_BLOCKS[kind][1] * GGUF_BLOCKS[kind][0]) for _, _, kind, b in parts]
    sources = _element_index(model, module, [(name, shard, shape) for (name, shard, _, _), shape
                                             in zip(parts, shapes, strict=True)])
    in_f = sources.shape[1]
    real = sources[:, 0] > 0  # 1-based element index of each row's first weight; 0: a padding row
    contiguous = sources == sources[:, :1] + torch.arange(in_f, dtype=sources.dtype)
    first = sources[:, 0].long()
    if not bool(torch.where(real[:, None], contiguous, sources == 0).all()):
        raise ValueError(f"{_desc(module)}: its rows are not stretches of its GGUF tensors' rows")
    starts = torch.tensor([0] + [rows * cols for rows, cols in shapes]).cumsum(0)
    elem = (first - 1).clamp(min=0)
    part = torch.searchsorted(starts[1:], elem, right=True).clamp(max=len(parts) - 1)
    cols = torch.tensor([c for _, c in shapes])[part]
    local = elem - starts[part]
    src_row, src_col = local // cols, local % cols
    if bool((src_col + in_f > cols)[real].any()):
        raise ValueError(f"{_desc(module)}: its rows are not stretches of its GGUF tensors' rows")
    row_kinds = _fill_padding([parts[p][2] if r else None for p, r in zip(part.tolist(), real.tolist(), strict=True)])
    runs: list[tuple[str, torch.Tensor]] = []
    for lo, hi, kind in _runs(row_kinds):
        qk, nbytes = GGUF_BLOCKS[kind]
        blocks = torch.zeros((hi - lo, in_f // qk * nbytes), dtype=torch.uint8)  # zero bytes: weight 0
        if in_f % qk:
            raise ValueError(f"{_desc(module)}: {in_f} input features per rank are not whole {kind} blocks of "
                             f"{qk}; use another tensor_parallel_size or gguf_quantized=False")
        sel = torch.arange(lo, hi)[real[lo:hi]]
        for p, col in torch.stack([part[sel], src_col[sel]], dim=1).unique(dim=0).tolist():
            if col % qk:
                raise ValueError(f"{_desc(module)}: its tensor-parallel slice cuts through {kind} blocks of {qk}; "
                                 "use another tensor_parallel_size or gguf_quantized=False")
            rows = sel[(part[sel] == p) & (src_col[sel] == col)]
            at = col // qk * nbytes
            blocks[rows - lo] = parts[p][3][src_row[rows], at: at + blocks.shape[1]]
        runs.append((kind, blocks.to(cast(torch.Tensor, module.weight).device)))
    return GGUFBlockWeight(runs, in_f, model.dtype)


def _fill_padding(kinds: list[str | None]) -> list[str]:
    """Padding rows (None) take the type of the row before them (or the first real row's):
    zero bytes are a zero weight in every type."""
    first = next(k for k in kinds if k is not None)
    filled: list[str] = []
    for k in kinds:
        filled.append(k if k is not None else filled[-1] if filled else first)
    return filled


def _runs(kinds: list[str]) -> list[tuple[int, int, str]]:
    """``[lo, hi, type]`` of each maximal run of rows of one type."""
    runs: list[tuple[int, int, str]] = []
    for i, k in enumerate(kinds):
        if runs and runs[-1][2] == k:
            runs[-1] = (runs[-1][0], i + 1, k)
        else:
            runs.append((i, i + 1, k))
    return runs


def _desc(module: nn.Module) -> str:
    return f"{type(module).__name__}({module.extra_repr()})"

