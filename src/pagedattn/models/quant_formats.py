"""Checkpoint layouts of int4 weights, and the one layout they all load into.

A linear layer ``y = x W^T`` with ``W [N, K]`` (N output, K input features) quantized in
groups of ``gs`` input features is ``W[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n]`` with
4-bit ``q``, and ``g(k) = k // gs`` unless the checkpoint gives ``g_idx``.  The formats differ
only in how ``q`` and ``z`` are packed into int32 words:

* **AWQ** (AutoAWQ ``WQLinear_GEMM``): ``qweight`` int32 ``[K, N/8]``, packed along the output
  features in the interleaved order :data:`AWQ_ORDER` (nibble ``i`` of word ``j`` holds column
  ``8 j + AWQ_ORDER[i]``); ``qzeros`` int32 ``[K/gs, N/8]`` packed the same way; ``scales``
  ``[K/gs, N]``.
* **GPTQ** (AutoGPTQ / GPTQModel ``QuantLinear``): ``qweight`` int32 ``[K/8, N]``, packed along
  the input features in order (nibble ``i`` of row ``j`` is input feature ``8 j + i``);
  ``qzeros`` int32 ``[K/gs, N/8]`` packed along the output features in order, each zero one less
  than the real one in v1 checkpoints (``QuantConfig.zero_offset``); ``scales`` ``[K/gs, N]``;
  ``g_idx`` int32 ``[K]``, the group of each input feature (act-order checkpoints permute it).
* **compressed-tensors** ``pack-quantized`` (``pack_to_int32``): ``weight_packed`` int32
  ``[N, K/8]``, packed along the input features in order (GPTQ's ``qweight`` transposed), each
  value stored as the signed int4 plus 8; ``weight_scale [N, K/gs]``; asymmetric:
  ``weight_zero_point`` int32 ``[N/8, K/gs]`` packed along the *output* features, plus 8;
  symmetric: no zero points (8 in the unsigned domain); ``weight_g_idx`` with group act-order;
  ``weight_shape`` (``[N, K]``, nothing to load).

FP8 checkpoints keep the dense ``weight [N, K]`` in float8_e4m3fn, with ``W = q * s``:

* **compressed-tensors** ``float-quantized``: ``weight_scale`` float ``[1]`` (per tensor),
  ``[N, 1]`` (per channel) or ``[ceil(N/bn), ceil(K/bk)]`` (blocks); static activations add an
  ``input_scale [1]``; zero points, if written, must be zeros (symmetric);
* **fbgemm_fp8**: ``weight_scale`` float32 ``[N, 1]``;
* **fp8** (FineGrainedFP8): ``weight_scale_inv`` float32 ``[ceil(N/bn), ceil(K/bk)]``, or a scalar
  without blocks (the name is DeepSeek's: it multiplies, as the others' scales do); static
  activations add a scalar ``activation_scale``.

Their internal layout is ``weight`` as stored and ``weight_scale`` float32 ``[N, G]``: one column
(``G == 1``) for per-tensor and per-channel scales, a per-tensor scale repeated on every row (so
the fused q/k/v and gate/up parts keep their own scales), or one column per block of input
features, each block row repeated on its ``bn`` rows (:func:`fp8_scale_rows`).

**The internal int4 layout** (what every int4 layer holds after loading, whatever the checkpoint):
``qweight`` int32 ``[K/8, N]`` packed along the input features in order (GPTQ's), ``scales`` and
``zeros`` ``[groups, N]`` in the scales' dtype (zero points as exact small integers), and
optionally ``g_idx``.  Converting to it is lossless: only the bits move.  Input features in
whole words make a K tile of the kernels one load of ``[BLOCK_K/8, BLOCK_N]`` words, coalesced
along N, with one scale row per tile.
"""

from __future__ import annotations

import torch

from ..kernels.fp8 import FP8_MAX
from .quant_config import QuantConfig

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: nibble i holds column AWQ_ORDER[i]
PACK = 8  # 4-bit values per int32 word
_SHIFTS = torch.arange(PACK, dtype=torch.int32) * 4
# The checkpoint tensors of a quantized linear layer, by name suffix.
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx",
                  "weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")
SYMMETRIC_ZERO = 8  # the zero point of symmetric int4 in the unsigned domain
# The checkpoint tensors of an FP8 layer besides its ``weight``, by name suffix.
FP8_SUFFIXES = ("weight_scale", "weight_scale_inv", "input_scale", "activation_scale", "weight_zero_point",
                "input_zero_point")


# ---------------------------------------------------------------------- bit packing
def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C]`` packed along dim 0 in order -> int32 values ``[8 R, C]`` in ``0..15``."""
    r, c = packed.shape
    q = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device).view(1, PACK, 1)) & 0xF
    return q.reshape(r * PACK, c)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """Values ``[K, C]`` in ``0..15`` -> int32 ``[K/8, C]``, input feature ``8 j + i`` in nibble ``i``."""
    k, c = q.shape
    if k % PACK:
        raise ValueError(f"{k} rows are not a whole number of int32 words of 8 nibbles")
    words = q.to(torch.int32).reshape(k // PACK, PACK, c) << _SHIFTS.to(q.device).view(1, PACK, 1)
    return words.sum(dim=1, dtype=torch.int32)  # disjoint nibbles: the sum is the bitwise or


def unpack_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 ``[R, C]`` packed along dim 1 -> values ``[R, 8 C]``; nibble ``i`` of word ``j`` is
    column ``8 j + order[i]`` (in order when ``order`` is None)."""
    r, c = packed.shape
    q = (packed.unsqueeze(2) >> _SHIFTS.to(packed.device).view(1, 1, PACK)) & 0xF  # [R, C, nibble]
    if order is not None:
        q = q[:, :, torch.tensor(order).argsort()]  # column t of a word sits in nibble argsort(order)[t]
    return q.reshape(r, c * PACK)


def pack_cols(q: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of :func:`unpack_cols`."""
    r, n = q.shape
    if n % PACK:
        raise ValueError(f"{n} columns are not a whole number of int32 words of 8 nibbles")
    q = q.to(torch.int32).reshape(r, n // PACK, PACK)
    if order is not None:
        q = q[:, :, list(order)]  # nibble i holds column order[i]
    return (q << _SHIFTS.to(q.device).view(1, 1, PACK)).sum(dim=2, dtype=torch.int32)


# ---------------------------------------------------------------------- checkpoint -> internal
def to_internal(quant: QuantConfig, kind: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One checkpoint tensor of a quantized layer (``kind``: one of :data:`QUANT_SUFFIXES`, or of
    :data:`FP8_SUFFIXES` for FP8) as ``(internal name, tensor)`` pairs in the internal layout,
    still unsharded (none for ``weight_shape`` and static activation scales; a symmetric
    compressed-tensors scale brings its constant zero points)."""
    if quant.is_fp8:
        return _fp8_to_internal(kind, tensor)
    if quant.method == "compressed-tensors":
        return _compressed_tensors_to_internal(quant, kind, tensor)
    if kind in ("scales", "g_idx"):
        return [(kind, tensor.to(torch.int32) if kind == "g_idx" else tensor)]
    if kind not in ("qweight", "qzeros"):
        raise ValueError(f"{kind} is not a tensor of {quant.method} checkpoints")
    _check_int32_2d(kind, tensor)
    order = AWQ_ORDER if quant.method == "awq" else None
    if kind == "qzeros":
        return [("zeros", unpack_cols(tensor, order) + quant.zero_offset)]
    if quant.method == "awq":  # [K, N/8] along N, interleaved -> [K/8, N] along K
        return [("qweight", pack_rows(unpack_cols(tensor, AWQ_ORDER)))]
    return [("qweight", tensor)]  # GPTQ's qweight is the internal layout already


def _compressed_tensors_to_internal(quant: QuantConfig, kind: str,
                                    tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    if kind == "weight_shape":
        return []
    if kind == "weight_g_idx":
        return [("g_idx", tensor.to(torch.int32))]
    if kind == "weight_scale":
        scales = tensor.t().contiguous()  # [N, groups] -> [groups, N]
        if not quant.sym:
            return [("scales", scales)]
        return [("scales", scales), ("zeros", torch.full_like(scales, SYMMETRIC_ZERO))]
    if kind not in ("weight_packed", "weight_zero_point"):
        raise ValueError(f"{kind} is not a tensor of compressed-tensors pack-quantized checkpoints")
    _check_int32_2d(kind, tensor)
    if kind == "weight_packed":  # [N, K/8] along K -> [K/8, N]
        return [("qweight", tensor.t().contiguous())]
    return [("zeros", unpack_rows(tensor).t().contiguous())]  # [N/8, groups] along N -> [groups, N]


def _fp8_to_internal(kind: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Scales as float32 (their shapes are checked by the layer, which knows N and K); static
    activation scales are checked and dropped: the activations are scaled per token instead."""
    if kind not in FP8_SUFFIXES:
        raise ValueError(f"{kind} is not a tensor of FP8 checkpoints")
    if kind.endswith("zero_point"):  # symmetric FP8: zeros, if the tool wrote them at all
        if bool(tensor.ne(0).any()):
            raise ValueError(f"{kind} must be all zeros (only symmetric FP8 is supported)")
        return []
    _check_scales(kind, tensor)
    if kind in ("input_scale", "activation_scale"):
        if tensor.numel() != 1:
            raise ValueError(f"{kind} must be one scale per tensor, got shape {tuple(tensor.shape)}")
        return []
    return [("weight_scale", tensor.float())]


def _check_scales(kind: str, tensor: torch.Tensor) -> None:
    if not tensor.dtype.is_floating_point or tensor.dtype.itemsize < 2:
        raise ValueError(f"{kind} must be a float tensor of 16 bits or more, got {tensor.dtype}")
    if tensor.numel() == 0 or not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ValueError(f"{kind} must hold finite non-negative scales")


def fp8_groups(quant: QuantConfig, in_features: int) -> tuple[int, int]:
    """``(G, group_size)``: the scale columns of an FP8 weight of ``in_features`` input features,
    and the input features each one covers."""
    if quant.block_size is None:
        return 1, in_features
    bk = quant.block_size[1]
    return -(-in_features // bk), bk


def fp8_scale_rows(quant: QuantConfig, scale: torch.Tensor, rows: int, in_features: int) -> torch.Tensor:
    """A checkpoint's FP8 ``weight_scale`` (float32) of a weight ``[rows, in_features]`` as the
    internal ``[rows, G]`` (see the module docstring); a ValueError for any other shape."""
    strategy = quant.fp8_strategy
    what = "weight_scale_inv" if quant.method == "fp8" else "weight_scale"  # the checkpoint's name
    if strategy == "tensor":
        if scale.numel() != 1:
            raise ValueError(f"a per-tensor {what} must hold one value, got shape {tuple(scale.shape)}")
        return scale.reshape(1, 1).expand(rows, 1)
    if strategy == "channel":
        if tuple(scale.shape) not in ((rows, 1), (rows,)):
            raise ValueError(f"a per-channel {what} must be [{rows}, 1], got {tuple(scale.shape)}")
        return scale.reshape(rows, 1)
    assert quant.block_size is not None
    bn = quant.block_size[0]
    want = (-(-rows // bn), fp8_groups(quant, in_features)[0])
    if tuple(scale.shape) != want:
        raise ValueError(f"{what} of a [{rows}, {in_features}] weight in blocks of {list(quant.block_size)} "
                         f"must be {list(want)}, got {list(scale.shape)}")
    return scale.repeat_interleave(bn, dim=0)[:rows]


def quantize_fp8(quant: QuantConfig, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``weight [N, K]`` rounded to e4m3 with absolute-maximum scales in ``quant``'s strategy, as
    the checkpoint tensors of ``quant.method`` (for dummy-weight benchmarks)."""
    n, k = weight.shape
    w = weight.float()
    if quant.fp8_strategy == "tensor":
        scale = w.abs().amax().reshape(1)
        full = scale.reshape(1, 1)
    elif quant.fp8_strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True)
        full = scale
    else:
        assert quant.block_size is not None
        bn, bk = quant.block_size
        padded = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk, device=w.device)
        padded[:n, :k] = w.abs()
        scale = padded.reshape(padded.shape[0] // bn, bn, -1, bk).amax(dim=(1, 3))
        full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    scale = (scale / FP8_MAX).clamp(min=1e-12)
    full = (full / FP8_MAX).clamp(min=1e-12)
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if quant.method == "fp8":
        return {"weight": q, "weight_scale_inv": scale.reshape(()) if quant.fp8_strategy == "tensor" else scale}
    return {"weight": q, "weight_scale": scale}


def _check_int32_2d(kind: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.int32 or tensor.dim() != 2:
        raise ValueError(f"{kind} must be a 2-D int32 tensor, got {tensor.dtype} {tuple(tensor.shape)}")


def group_index(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The group of each input feature without act-order: ``k // group_size``."""
    return torch.arange(in_features, device=device, dtype=torch.int32) // group_size


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
               group_size: int) -> torch.Tensor:
    """The reference dequantization of the internal layout: ``W^T [K, N]`` in float32
    (exact: a 4-bit difference times a 16-bit scale fits float32's mantissa)."""
    q = unpack_rows(qweight)
    g = group_index(q.shape[0], group_size, q.device) if g_idx is None else g_idx
    g = g.long()
    return (q.float() - zeros.float()[g]) * scales.float()[g]


# ---------------------------------------------------------------------- round-to-nearest
def quantize_rtn(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16,
                 sym: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` rounded to nearest, on AutoAWQ's asymmetric grid or (``sym``) the
    symmetric one (zero point 8, scale ``max |w| / 7.5``), without activation-aware scaling:
    ``(q [K, N], zeros [groups, N], scales [groups, N])``, ints in ``0..15``.  For dummy-weight
    benchmarks, whose int4 model is then the round-to-nearest twin of the dense one."""
    n, k = weight.shape
    gs = k if group_size == -1 else group_size
    w = weight.float().reshape(n, k // gs, gs)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    if sym:
        scales = (torch.maximum(lo.abs(), hi).clamp(min=1e-5) / 7.5).to(scale_dtype)
        s = scales.float()
        zeros = torch.full_like(s, SYMMETRIC_ZERO)
    else:
        scales = ((hi - lo).clamp(min=1e-5) / 15).to(scale_dtype)
        s = scales.float()
        zeros = (-torch.round(lo / s)).clamp(0, 15)
    q = (torch.round(w / s.unsqueeze(2)) + zeros.unsqueeze(2)).clamp(0, 15).reshape(n, k)
    return q.t().to(torch.int32), zeros.t().to(torch.int32), scales.t().contiguous()


def checkpoint_tensors(quant: QuantConfig, q: torch.Tensor, zeros: torch.Tensor,
                       scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """``q [K, N]``, ``zeros`` and ``scales`` ``[groups, N]`` packed as ``quant.method``'s
    checkpoint tensors (GPTQ v1 stores ``zero - 1``, kept to 4 bits)."""
    if quant.method == "awq":
        return {"qweight": pack_cols(q, AWQ_ORDER), "qzeros": pack_cols(zeros, AWQ_ORDER), "scales": scales}
    g_idx = group_index(q.shape[0], quant.group_size_for(q.shape[0]), q.device)
    if quant.method == "gptq":
        return {"qweight": pack_rows(q), "qzeros": pack_cols((zeros - quant.zero_offset) & 0xF), "scales": scales,
                "g_idx": g_idx}
    out = {"weight_packed": pack_rows(q).t().contiguous(), "weight_scale": scales.t().contiguous(),
           "weight_shape": torch.tensor([q.shape[1], q.shape[0]], dtype=torch.int32)}
    if not quant.sym:
        out["weight_zero_point"] = pack_rows(zeros.t())
    if quant.desc_act:
        out["weight_g_idx"] = g_idx
    return out
