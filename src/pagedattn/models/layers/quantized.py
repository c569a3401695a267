"""Quantized linear weights on the CPU: exact low-bit weights, float activations, torch's packed kernels.

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

Activations are computed in float32 (``scale`` and ``zero`` are float32, which holds GGUF's
half-precision factors and their products exactly); a bfloat16 model's activations are cast in
and out.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

INT4_KERNEL_ROWS = 16  # _convert_weight_to_int4pack_for_cpu wants the output features in multiples of 16
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

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
        super().__init__()
        n, k = codes.shape
        _check_groups(codes, scales, zeros, group_size)
        pad = -n % INT4_KERNEL_ROWS
        if pad:  # zero rows: code 8, scale 0, zero 0 -> weight 0 exactly; their outputs are dropped
            codes = torch.cat([codes, codes.new_full((pad, k), 8)])
            scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
        self.out_features, self.group_size = n, group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        # The kernel's layout: [in_features / group_size, out_features, (scale, zero)].
        self.register_buffer("scales_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert _INT4_MM is not None
        y = _INT4_MM(x, self.packed, self.group_size, self.scales_zeros)
        return y if y.shape[-1] == self.out_features else y[..., : self.out_features]


class Int4GroupWeight(QuantizedWeight):
    """int4 codes (0..15, uint8 ``[out, in]``) with per-group float32 ``scales`` and ``zeros``
    ``[out, in / group_size]``: ``w = (code - 8) * scale + zero``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
        super().__init__()
        if codes.dtype != torch.uint8 or int(codes.max()) > 15:
            raise ValueError("int4 codes must be uint8 values in [0, 15]")
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.kernel = _Int4Packed(codes, scales, zeros, group_size)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = _int4_linear(x, self.kernel)
        return y.add_(bias) if bias is not None else y

    def dequantize(self) -> torch.Tensor:
        return _dequantize(self.kernel, self.in_features)

    def extra_repr(self) -> str:
        return f"int4, group={self.group_size}, out={self.out_features}, in={self.in_features}"


class Int8GroupWeight(QuantizedWeight):
    """int8 codes (``[out, in]``) with per-group float32 ``scales`` ``[out, in / group_size]``:
    ``w = code * scale``, run as two exact int4 halves (see the module's docstring)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
        super().__init__()
        if codes.dtype != torch.int8:
            raise ValueError("int8 codes must be int8")
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        wide = codes.to(torch.int16)
        hi, lo = torch.div(wide, 16, rounding_mode="floor"), wide.remainder(16)  # code = 16 * hi + lo
        zeros = torch.zeros_like(scales)
        # hi: (hi + 8 - 8) * 16 scale; lo: (lo - 8) * scale + 8 scale.  Products of a half-precision
        # scale and a 4-bit integer are exact in float32, and so is their sum, the code times the scale.
        self.hi = _Int4Packed((hi + 8).to(torch.uint8), scales * 16, zeros, group_size)
        self.lo = _Int4Packed(lo.to(torch.uint8), scales, scales * 8, group_size)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = _int4_linear(x, self.hi).add_(_int4_linear(x, self.lo))
        return y.add_(bias) if bias is not None else y

    def dequantize(self) -> torch.Tensor:
        return _dequantize(self.hi, self.in_features) + _dequantize(self.lo, self.in_features)

    def extra_repr(self) -> str:
        return f"int8 (two int4 halves), group={self.group_size}, out={self.out_features}, in={self.in_features}"


def _int4_linear(x: torch.Tensor, kernel: _Int4Packed) -> torch.Tensor:
    if x.dtype == torch.float32 and x.dim() == 2:
        return kernel(x)
    lead = x.shape[:-1]
    y = kernel(x.reshape(-1, x.shape[-1]).float())
    return y.view(*lead, y.shape[-1]).to(x.dtype)


def _dequantize(kernel: _Int4Packed, in_features: int) -> torch.Tensor:
    # The kernel itself on the identity: each output is one weight times 1 plus zeros, exact.
    return kernel(torch.eye(in_features)).t().contiguous()


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
