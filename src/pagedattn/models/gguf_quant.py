"""A GGUF file's quantized linear weights, kept quantized on the CPU with their exact values.

The converted folder (:mod:`.gguf`) holds every weight dequantized to float32, which a dense
model loads like any checkpoint.  With ``gguf_quantized`` the loader first gives each linear
layer whose GGUF blocks have an exact low-bit form that form (:mod:`.layers.quantized`), read
straight from the file's blocks, while the model's weights are still on the meta device
(:func:`keep_gguf_forms`), and then loads only the other tensors: a kept layer's dense weight is
never allocated, its float32 tensor never read.  On the CPU the forms are:

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
broadcast tensors of row and of column indices (:func:`_row_sources`), and the codes and scales
(on a GPU: whole rows of blocks) are gathered row by row through the result.  The functions
also work on a model already loaded dense (its weights are then dropped).
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
from .gguf import BLOCKS_FILE, PERMUTED_QK, unpermute_qk
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


def keep_gguf_forms(model: DecoderForCausalLM, model_dir: str | Path, device: torch.device | str, *,
                    blocks: bool) -> set[str]:
    """Before any weight is loaded: give the layers kept quantized their form from the blocks
    (``blocks``: the file's own, :func:`keep_gguf_blocks`, on ``device``; else the CPU's exact
    int4/int8 forms, :func:`keep_gguf_quantized`).  Returns the checkpoint names that no
    parameter takes any more, which the loader skips: with ``model`` built under
    :func:`~.layers.deferred_params`, those layers' dense weights are never allocated."""
    before = set(model.checkpoint_names())
    if blocks:
        keep_gguf_blocks(model, model_dir, device)
    else:
        keep_gguf_quantized(model, model_dir)
    return before - set(model.checkpoint_names())


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
    src = _row_sources(model, module, [(name, shard, g.codes.shape) for name, shard, g in parts])
    out_f, in_f = len(src.part), src.in_features
    if in_f % GROUP:
        raise ValueError(f"{_desc(module)}: {in_f} input features per rank are not whole groups of {GROUP}; "
                         "use another tensor_parallel_size or gguf_quantized=False")
    if bool((src.col[src.part >= 0] % GROUP != 0).any()):
        raise ValueError(f"{_desc(module)}: its tensor-parallel slice cuts through groups of {GROUP}; "
                         "use another tensor_parallel_size or gguf_quantized=False")
    pad_code = 8 if groups[0].bits == 4 else 0  # padding rows: code 8 (or 0), scale 0, zero 0: weight 0
    codes = np.full((out_f, in_f), pad_code, dtype=groups[0].codes.dtype)
    scales = np.zeros((out_f, in_f // GROUP), dtype=np.float32)
    zeros = np.zeros_like(scales)
    for rows, p, col in src.stretches():
        g, lo = groups[p], col // GROUP
        codes[rows] = g.codes[src.row[rows], col: col + in_f]
        scales[rows] = g.scales[src.row[rows], lo: lo + in_f // GROUP]
        if g.zeros is not None:
            zeros[rows] = g.zeros[src.row[rows], lo: lo + in_f // GROUP]
    if groups[0].bits == 8:
        return Int8GroupWeight(torch.from_numpy(codes), torch.from_numpy(scales), GROUP, model.dtype)
    return Int4GroupWeight(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zeros), GROUP,
                           model.dtype)


@dataclass(frozen=True)
class RowSources:
    """Where each row of a layer's weight comes from: a stretch of ``in_features`` elements of
    row ``row[r]`` of part ``part[r]`` starting at column ``col[r]`` (``part`` -1: a padding row,
    weight 0).  Numpy int64 ``[out_features]``."""

    part: np.ndarray
    row: np.ndarray
    col: np.ndarray
    in_features: int

    def stretches(self) -> list[tuple[np.ndarray, int, int]]:
        """``(rows, part, col)`` for each (part, first column) the real rows take, rows ascending."""
        real = np.flatnonzero(self.part >= 0)
        keys = np.stack([self.part[real], self.col[real]], axis=1)
        out = []
        for p, col in np.unique(keys, axis=0).tolist():
            out.append((real[(keys[:, 0] == p) & (keys[:, 1] == col)], int(p), int(col)))
        return out


_CHECK_ROWS = 1024  # rows a check compares at once: its temporaries stay small beside the index map


def _row_sources(model: DecoderForCausalLM, module: nn.Module, parts: list[tuple[str, ShardId, tuple[int, ...]]]
                 ) -> RowSources:
    """Where the layer's rows come from in its parts (``(name, shard, [rows, cols])``), found by
    running its ``weight_loader`` twice on broadcast index tensors (no memory of their own): the
    source row of each element (1-based across the parts laid end to end, 0 where the layer
    pads), then its source column.  Every row must be a stretch of one row of a part.  The only
    layer-sized buffer is the int32 map the loader writes into, 4 bytes an element."""
    weight_loader = cast(WeightLoading, module).weight_loader
    shape = cast(torch.Tensor, module.weight).shape
    total_rows = sum(rows for _, _, (rows, _) in parts)
    if total_rows >= 2**31 - 1 or max(cols for _, _, (_, cols) in parts) >= 2**31 - 1:
        raise ValueError(f"{_desc(module)}: too large for an int32 index map")
    target = torch.zeros(shape, dtype=torch.int32)
    permuted = model.config.architecture in PERMUTED_QK
    offset = 1
    for gname, shard, (rows, cols) in parts:
        ids = np.arange(offset, offset + rows, dtype=np.int32)
        if permuted and gname.endswith(".q_proj.weight"):  # the same row order as the converted float weights
            ids = unpermute_qk(ids, model.config.num_heads)
        elif permuted and gname.endswith(".k_proj.weight"):
            ids = unpermute_qk(ids, model.config.num_kv_heads)
        row_ids = torch.from_numpy(np.ascontiguousarray(ids))[:, None].expand(rows, cols)
        weight_loader(cast(nn.Parameter, target), row_ids, shard)
        offset += rows
    first_row = target[:, 0].numpy().astype(np.int64)
    for lo in range(0, shape[0], _CHECK_ROWS):  # each row from one source row (a padding row: all 0)
        chunk = target[lo: lo + _CHECK_ROWS]
        if not torch.equal(chunk, chunk[:, :1].expand_as(chunk)):
            raise ValueError(f"{_desc(module)}: its rows are not stretches of its GGUF tensors' rows")
    target.zero_()
    for _, shard, (rows, cols) in parts:
        col_ids = torch.arange(1, cols + 1, dtype=torch.int32)[None, :].expand(rows, cols)
        weight_loader(cast(nn.Parameter, target), col_ids, shard)
    in_f = shape[1]
    step = torch.arange(in_f, dtype=torch.int32)
    real = torch.from_numpy(first_row > 0)
    for lo in range(0, shape[0], _CHECK_ROWS):  # each real row a run of consecutive source columns
        chunk, real_rows = target[lo: lo + _CHECK_ROWS], real[lo: lo + _CHECK_ROWS]
        if not bool(real_rows.all()):  # (a padding row got no write in either pass: all 0)
            chunk = chunk[real_rows]
        if not torch.equal(chunk, chunk[:, :1] + step):
            raise ValueError(f"{_desc(module)}: its rows are not stretches of its GGUF tensors' rows")
    first_col = target[:, 0].numpy().astype(np.int64) - 1
    del target
    ends = np.cumsum([rows for _, _, (rows, _) in parts])
    global_row = first_row - 1
    part = np.where(first_row > 0, np.searchsorted(ends, global_row, side="right"), -1)
    starts = np.concatenate([[0], ends[:-1]])
    row = np.where(part >= 0, global_row - starts[part.clip(min=0)], 0)
    cols = np.array([c for _, _, (_, c) in parts])[part.clip(min=0)]
    if bool(((first_col + in_f > cols) & (part >= 0)).any()):
        raise ValueError(f"{_desc(module)}: its rows are not stretches of its GGUF tensors' rows")
    return RowSources(part, row, np.where(part >= 0, first_col, 0), in_f)


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


def keep_gguf_blocks(model: DecoderForCausalLM, model_dir: str | Path, device: torch.device | str | None = None
                     ) -> int:
    """Give every linear layer of ``model`` whose GGUF tensors are all of a GPU kernel's type
    (:data:`~pagedattn.kernels.gguf_matmul.GGUF_BLOCKS`) its rows of those blocks, on
    ``device`` (default: the layer's), and the embedding too (a tied LM head shares its
    blocks); returns how many linear layers changed.  A linear with a tensor of another
    quantized type is an error naming it; one with a float tensor stays dense, as does an
    embedding of another type."""
    from safetensors import safe_open

    path = Path(model_dir) / BLOCKS_FILE
    if not path.is_file():
        return 0
    changed = 0
    with safe_open(str(path), framework="pt", device="cpu") as f:
        kinds, stored = f.metadata() or {}, set(f.keys())
        table = _embedding_blocks(model, f, kinds[EMBED] if EMBED in stored else None, device)
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
            set_quantized_weight(module, _block_weight(model, module, parts, device))
            changed += 1
    logger.info("kept %d linear layers (and %s embedding) in their GGUF blocks", changed,
                "the" if table is not None else "no")
    return changed


EMBED = "model.embed_tokens.weight"


def _embedding_blocks(model: DecoderForCausalLM, f: Any, kind: str | None, device: torch.device | str | None
                      ) -> GGUFBlockWeight | None:
    """The embedding table kept in its blocks (``kind``: its type, None where it is a float
    tensor), put in the embedding's place; None if it stays dense."""
    if kind is None or kind not in GGUF_BLOCKS:
        return None
    pname, shard = model.checkpoint_names()[EMBED]
    module = model.get_submodule(pname.rpartition(".")[0])
    table = _block_weight(model, module, [(EMBED, shard, kind, f.get_tensor(EMBED))], device)
    set_quantized_weight(module, table)
    return table


def _block_weight(model: DecoderForCausalLM, module: nn.Module,
                  parts: list[tuple[str, ShardId, str, torch.Tensor]], device: torch.device | str | None
                  ) -> GGUFBlockWeight:
    """The layer's rows of its parts' blocks (``(hf_name, shard_id, type, uint8 [rows, bytes])``)
    on ``device`` (None: the layer's weight's), placed by the layer's own ``weight_loader``: each
    of its rows must be a whole-block stretch of one row of a part (a tensor-parallel slice of
    the inputs starts and ends on a block)."""
    shapes = [(b.shape[0], b.shape[1] // GGUF_BLOCKS[kind][1] * GGUF_BLOCKS[kind][0]) for _, _, kind, b in parts]
    src = _row_sources(model, module, [(name, shard, shape) for (name, shard, _, _), shape
                                       in zip(parts, shapes, strict=True)])
    in_f = src.in_features
    row_kinds = _fill_padding([parts[p][2] if p >= 0 else None for p in src.part.tolist()])
    stretches = src.stretches()
    runs: list[tuple[str, torch.Tensor]] = []
    for lo, hi, kind in _runs(row_kinds):
        qk, nbytes = GGUF_BLOCKS[kind]
        blocks = torch.zeros((hi - lo, in_f // qk * nbytes), dtype=torch.uint8)  # zero bytes: weight 0
        if in_f % qk:
            raise ValueError(f"{_desc(module)}: {in_f} input features per rank are not whole {kind} blocks of "
                             f"{qk}; use another tensor_parallel_size or gguf_quantized=False")
        for all_rows, p, col in stretches:
            rows = all_rows[(all_rows >= lo) & (all_rows < hi)]
            if not len(rows):
                continue
            if col % qk:
                raise ValueError(f"{_desc(module)}: its tensor-parallel slice cuts through {kind} blocks of {qk}; "
                                 "use another tensor_parallel_size or gguf_quantized=False")
            at = col // qk * nbytes
            blocks[torch.from_numpy(rows - lo)] = parts[p][3][torch.from_numpy(src.row[rows]), at: at + blocks.shape[1]]
        runs.append((kind, blocks.to(device if device is not None else cast(torch.Tensor, module.weight).device)))
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

