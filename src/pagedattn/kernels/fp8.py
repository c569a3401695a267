"""W8A8 FP8 GEMMs: ``y = x W^T`` with ``W`` held in float8_e4m3fn and the activations quantized per token.

The weight is ``weight [N, K]`` e4m3 with float32 ``scale [N, G]``: ``W[n, k] = q[n, k] *
scale[n, k // group_size]``, ``G == 1`` for per-channel (and per-tensor, expanded to every row)
scales, ``G == ceil(K / group_size)`` for block scales (see ``models/quant_formats.py``).

* **Per-row scales** (:func:`fp8_linear`): each row of ``x`` is scaled into e4m3's range by its own
  absolute maximum (``amax / 448``, kept away from zero), rounded to e4m3, and multiplied by
  ``torch._scaled_mm`` with ``scale_a = [M, 1]`` (per token) and ``scale_b = [1, N]`` (per output
  channel); the bias is added after.  Everything stays on the device (no host sync), so CUDA
  graphs capture it.  ``_scaled_mm`` wants K and N multiples of 16 (:func:`scaled_mm_shape_ok`)
  and, for row-wise scales on CUDA, a bfloat16 output: other model dtypes are cast from it.
* **Block scales** (:func:`fp8_block_linear`): the weight is dequantized to the activation dtype
  on every call and multiplied densely (no per-token activation rounding).  The weight stays in
  FP8 in memory; the GEMM streams it twice, so it is slower than the bfloat16 model.

The CPU build of torch runs ``_scaled_mm`` too (float32 output), which the tests use to run the
GPU's arithmetic on the CPU.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# The smallest per-token scale: an all-zero row then quantizes to zeros instead of NaNs.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
SCALED_MM_ALIGN = 16  # _scaled_mm's K and N must be multiples of this
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores


def scaled_mm_supported(device: torch.device) -> bool:
    """The device multiplies FP8 on tensor cores (CUDA compute capability 8.9 or newer)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def scaled_mm_shape_ok(n: int, k: int) -> bool:
    return n % SCALED_MM_ALIGN == 0 and k % SCALED_MM_ALIGN == 0


def quantize_per_token(x: torch.Tensor, amax_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(e4m3 [M, K], float32 scale [M, 1])`` with ``x ~ q * scale`` row by row;
    ``amax_ub`` clamps each row's absolute maximum first (fbgemm's ``activation_scale_ub``)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    if amax_ub is not None:
        amax = amax.clamp(max=amax_ub)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.contiguous(), scale  # _scaled_mm wants a row-major left operand (a strided x keeps its strides)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_row: torch.Tensor, bias: torch.Tensor | None,
               amax_ub: float | None = None) -> torch.Tensor:
    """``x [M, K] @ (weight * scale_row)^T + bias`` in ``x.dtype``; ``weight [N, K]`` e4m3,
    ``scale_row [1, N]`` float32."""
    xq, xs = quantize_per_token(x, amax_ub)
    out_dtype = x.dtype if x.device.type == "cpu" or x.dtype == torch.bfloat16 else torch.bfloat16
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale_row, out_dtype=out_dtype)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.add_(bias) if bias is not None else y


def dequantize(weight: torch.Tensor, scale: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight [N, K]`` e4m3 times ``scale [N, G]`` (one column per ``group_size`` input features)
    in float32 (one rounding per weight), then cast to ``dtype``."""
    k = weight.shape[1]
    s = scale.float()
    if s.shape[1] > 1:
        s = s.repeat_interleave(group_size, dim=1)[:, :k]
    return (weight.float() * s).to(dtype)


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T + bias`` with the block-scaled ``W`` dequantized to ``x.dtype`` for this call."""
    k = weight.shape[1]
    # In the activation dtype throughout: two weight-sized temporaries of it, not float32 ones.
    w = weight.to(x.dtype).mul_(scale.to(x.dtype).repeat_interleave(group_size, dim=1)[:, :k])
    return torch.nn.functional.linear(x, w, bias)
