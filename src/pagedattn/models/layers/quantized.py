"""Quantized linear weights: on the CPU exact low-bit weights in torch's packed kernels; on a GPU a
GGUF file's own blocks in Triton kernels.

A weight format is a small module that takes a linear layer's place of ``weight`` (see
:func:`set_quantized_weight`); :func:`~.linear.linear` hands it the activations, so the layers
and the model do not change.  The loader makes the formats (:mod:`..gguf_quant` from a GGUF
file's blocks); here is only the runtime side: packing and the kernel call.

:class:`Int4GroupWeight` -- int4 codes in groups along the input features, one ``scale`` and
``zero`` per group: ``w = (code - 8) * scale + zero``, the layout of
``torch.ops.aten._weight_int4pack_mm_for_cpu`` (which computes exactly that, with one FMA, in
float32).  GGUF's Q4_0, Q4_1 and Q4_K blocks are this layout with other names for the numbers.

:class:`Int8GroupWeight` -- int8 codes in groups, one ``scale`` per group: ``w = code * scale``
(GGUF's Q8_0).  torch has no grouped int8 kernel for float activations (``_weight_int8pack_mm``
scales whole rows), so the codes are split into two int4 halves, ``code = 16 * hi + lo`` with
``hi`` in [-8, 7] and ``lo`` in [0, 15], each run through the int4 kernel (scales ``16 * scale``
and ``scale``): the same bytes as int8 and exact weights, two kernel calls.

The kernel computes in the model's dtype:

* float32: ``scale`` and ``zero`` are float32, which holds GGUF's half-precision factors and
  their sums exactly, so the weights are GGUF's to the bit.  In torch 2.13 this is the kernel's
  scalar path on x86 (no AVX-512 code for float32 activations): correct, but slower than the
  dense float32 GEMM, hence not the default (see ``benchmarks/bench_cpu_llamacpp.py``).
* bfloat16: the kernel's vectorised path.  ``scale`` and ``zero`` are rounded to bfloat16 and
  the kernel rounds each dequantized weight to bfloat16 before its dot products, as a bfloat16
  model's dense weights are rounded: a precision change (about 3 significant digits per weight),
  the same as running the dense model in bfloat16.

:class:`GGUFBlockWeight` -- the GPU's form: a GGUF file's blocks as stored (Q4_0, Q4_1, Q8_0,
Q4_K, Q5_K, Q6_K), uint8 rows, dequantized in registers by :mod:`pagedattn.kernels.gguf_matmul`,
so the weight takes the file's bytes.  A fused layer (q/k/v, gate/up) may mix types (a Q4_K_M
file stores some ``v`` projections in Q6_K): its output rows are then runs of one type each,
one kernel per run, each writing its columns of one output buffer.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ...kernels import gguf_matmul

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
INT4_KERNEL_ROWS = 16  # _convert_weight_to_int4pack_for_cpu wants the output features in multiples of 16
PACK_ROWS = 4096  # rows packed (and split into int4 halves) at a time: a multiple of the packing's 64-row blocks
# The op overload itself (as linear.py's oneDNN op): the packet would resolve it on every call.
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_INT4_MM = _INT4_MM.default if _INT4_MM is not None else None


def cpu_int4_kernel_available() -> bool:
    return _INT4_MM is not None and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class QuantizedWeight(nn.Module):
    """A linear layer's weight ``[out_features, in_features]`` kept quantized; :meth:`linear`
    is ``x @ W^T + bias`` with it."""

    out_features: int
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the kernel computes with, ``[out_features, in_features]``."""
        raise NotImplementedError


class _Int4Packed(nn.Module):
    """One int4 groupwise weight in the CPU kernel's packed layout (rows padded to a multiple of 16)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        n, k = codes.shape
        _check_groups(codes, scales, zeros, group_size)
        if dtype not in KERNEL_DTYPES:
            raise ValueError(f"the int4 CPU kernel computes in float32 or bfloat16, not {dtype}")
        pad = -n % INT4_KERNEL_ROWS
        if pad:  # zero rows: code 8, scale 0, zero 0 -> weight 0 exactly; their outputs are dropped
            codes = torch.cat([codes, codes.new_full((pad, k), 8)])
            scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
        self.out_features, self.group_size = n, group_size
        self.register_buffer("packed", _pack_int4(codes))
        # The kernel's layout: [in_features / group_size, out_features, (scale, zero)].
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_zeros", sz.to(dtype))
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm(x)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel on ``x [M, in_features]`` in ``dtype``.  Called directly rather than through
        ``nn.Module.__call__``, whose hook checks a CPU decode step would pay on each of its ~120
        calls."""
        assert _INT4_MM is not None
        y = _INT4_MM(x, self.packed, self.group_size, self.scales_zeros)
        return y if y.shape[-1] == self.out_features else y[..., : self.out_features]


class Int4GroupWeight(QuantizedWeight):
    """int4 codes (0..15, uint8 ``[out, in]``) with per-group float32 ``scales`` and ``zeros``
    ``[out, in / group_size]``: ``w = (code - 8) * scale + zero``, computed in ``dtype``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if codes.dtype != torch.uint8 or int(codes.max()) > 15:
            raise ValueError("int4 codes must be uint8 values in [0, 15]")
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.kernel = _Int4Packed(codes, scales, zeros, group_size, dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = _int4_linear(x, self.kernel)
        return y.add_(bias) if bias is not None else y

    def dequantize(self) -> torch.Tensor:
        return _dequantize(self.kernel, self.in_features)

    def extra_repr(self) -> str:
        return f"int4, group={self.group_size}, out={self.out_features}, in={self.in_features}, {self.kernel.dtype}"


class Int8GroupWeight(QuantizedWeight):
    """int8 codes (``[out, in]``) with per-group float32 ``scales`` ``[out, in / group_size]``:
    ``w = code * scale``, run as two int4 halves (see the module's docstring), computed in ``dtype``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if codes.dtype != torch.int8:
            raise ValueError("int8 codes must be int8")
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        hi, lo = torch.empty_like(codes, dtype=torch.uint8), torch.empty_like(codes, dtype=torch.uint8)
        for at in range(0, codes.shape[0], PACK_ROWS):  # a slice at a time: no int16 copies of the whole weight
            wide = codes[at: at + PACK_ROWS].to(torch.int16)
            hi[at: at + PACK_ROWS] = torch.div(wide, 16, rounding_mode="floor") + 8  # code = 16 * hi + lo
            lo[at: at + PACK_ROWS] = wide.remainder(16)
        zeros = torch.zeros_like(scales)
        # hi: (hi + 8 - 8) * 16 scale; lo: (lo - 8) * scale + 8 scale.  Products of a half-precision
        # scale and a 4-bit integer are exact in float32, and so is their sum, the code times the scale.
        scales = scales.to(dtype).float()  # one rounding, shared by both halves
        self.hi = _Int4Packed(hi, scales * 16, zeros, group_size, dtype)
        self.lo = _Int4Packed(lo, scales, scales * 8, group_size, dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = _int4_linear(x, self.hi).add_(_int4_linear(x, self.lo))
        return y.add_(bias) if bias is not None else y

    def dequantize(self) -> torch.Tensor:
        return _dequantize(self.hi, self.in_features) + _dequantize(self.lo, self.in_features)

    def extra_repr(self) -> str:
        return (f"int8 (two int4 halves), group={self.group_size}, out={self.out_features}, in={self.in_features}, "
                f"{self.hi.dtype}")


class GGUFBlockWeight(QuantizedWeight):
    """A weight ``[out, in]`` as runs of output rows, each GGUF blocks of one type: ``parts`` are
    ``(type, uint8 [rows, row bytes])`` in row order.  Computes in the activations' dtype."""

    def __init__(self, parts: list[tuple[str, torch.Tensor]], in_features: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype  # of an embedding's rows (a matmul computes in the activations' dtype)
        if not parts:
            raise ValueError("a GGUF block weight needs at least one run of rows")
        self.kinds = [kind for kind, _ in parts]
        for i, (kind, blocks) in enumerate(parts):
            if blocks.dtype != torch.uint8 or blocks.dim() != 2 or \
                    blocks.shape[1] != gguf_matmul.row_bytes(kind, in_features):
                raise ValueError(f"{kind} blocks for {in_features} input features must be uint8 "
                                 f"[rows, {gguf_matmul.row_bytes(kind, in_features)}], got {blocks.dtype} "
                                 f"{tuple(blocks.shape)}")
            self.register_buffer(f"blocks{i}", blocks.contiguous())
        self.bounds = [0]
        for _, blocks in parts:
            self.bounds.append(self.bounds[-1] + blocks.shape[0])
        self.out_features, self.in_features = self.bounds[-1], in_features

    def _parts(self) -> list[tuple[str, torch.Tensor]]:
        return [(kind, cast(torch.Tensor, getattr(self, f"blocks{i}"))) for i, kind in enumerate(self.kinds)]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        parts = self._parts()
        if len(parts) == 1:
            y = gguf_matmul.gguf_linear(x2, parts[0][1], parts[0][0], bias)
        else:  # each run writes its columns of one buffer: no concatenation
            y = torch.empty((x2.shape[0], self.out_features), device=x.device, dtype=x.dtype)
            for (kind, blocks), lo, hi in zip(parts, self.bounds, self.bounds[1:], strict=False):
                gguf_matmul.gguf_linear(x2, blocks, kind, bias[lo:hi] if bias is not None else None, out=y[:, lo:hi])
        return y.view(*lead, self.out_features)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` as an embedding table's, in ``dtype`` (a table is one run: one tensor)."""
        if len(self.kinds) != 1:
            raise ValueError("an embedding table of GGUF blocks is one tensor of one type")
        kind, blocks = self._parts()[0]
        return gguf_matmul.gguf_embedding(ids, blocks, kind, self.dtype)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([gguf_matmul.dequantize_ref(blocks, kind) for kind, blocks in self._parts()])

    @property
    def nbytes(self) -> int:
        """The blocks' bytes: the file's, for this layer (or shard)."""
        return sum(blocks.numel() for _, blocks in self._parts())

    def extra_repr(self) -> str:
        runs = ", ".join(f"{kind} x{hi - lo}" for kind, lo, hi in zip(self.kinds, self.bounds, self.bounds[1:],
                                                                     strict=False))
        return f"GGUF blocks [{runs}], in={self.in_features}"


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` codes (``n`` a multiple of 16) in the CPU kernel's layout, uint8 ``[n, k / 2]``,
    :data:`PACK_ROWS` rows at a time: the kernel packs blocks of 64 rows on their own, so the
    bytes are those of one call on the whole weight, without an int32 copy of all of it."""
    n, k = codes.shape
    packed = torch.empty((n, k // 2), dtype=torch.uint8)
    for at in range(0, n, PACK_ROWS):
        packed[at: at + PACK_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes[at: at + PACK_ROWS].to(torch.int32), 1)
    return packed


def _int4_linear(x: torch.Tensor, kernel: _Int4Packed) -> torch.Tensor:
    if x.dtype == kernel.dtype and x.dim() == 2:
        return kernel.mm(x)
    lead = x.shape[:-1]
    y = kernel.mm(x.reshape(-1, x.shape[-1]).to(kernel.dtype))
    return y.view(*lead, y.shape[-1]).to(x.dtype)


def _dequantize(kernel: _Int4Packed, in_features: int) -> torch.Tensor:
    # The kernel itself on the identity: each output is one weight times 1 plus zeros, exact.
    return kernel(torch.eye(in_features, dtype=kernel.dtype)).t().float().contiguous()


def _check_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
    n, k = codes.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"in_features ({k}) must be a multiple of the group size ({group_size})")
    expected = (n, k // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != expected or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 {expected}, got {t.dtype} {tuple(t.shape)}")


def set_quantized_weight(module: nn.Module, weight: QuantizedWeight) -> None:
    """Put ``weight`` in ``module.weight``'s place (its dense parameter is dropped)."""
    dense = cast(torch.Tensor, module.weight)
    if weight.shape != dense.shape:
        raise ValueError(f"quantized weight {tuple(weight.shape)} for a {tuple(dense.shape)} layer")
    if "weight" in module._parameters:
        del module._parameters["weight"]
    module.weight = weight
