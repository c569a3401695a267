"""Rotary position embeddings: the inverse frequencies of each RoPE variant and the per-step cos/sin.

The frequencies are computed with the same formulas, dtypes and operation order as
``transformers.modeling_rope_utils``, so they are bit-identical (fp32 token parity depends on it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import ModelArchConfig


def rope_inv_freq(
    head_dim: int, rope_theta: float, rope_scaling: Mapping[str, Any] | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim // 2]`` (fp32, CPU) and the cos/sin scale of a RoPE variant.

    Mirrors ``transformers`` (``compute_default_rope_parameters`` and ``ROPE_INIT_FUNCTIONS``)
    line by line, so the result is bit-identical.  ``dynamic`` is evaluated at init length,
    as transformers does for sequences within ``max_position_embeddings`` (where it equals plain
    RoPE); the engine must not exceed ``max_position_embeddings`` for it.
    """
    rope_type = "default" if rope_scaling is None else rope_scaling["rope_type"]
    dim = head_dim
    base = rope_theta
    if rope_type == "default":
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    assert rope_scaling is not None
    if rope_type == "linear":
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
        inv_freq /= rope_scaling["factor"]
        return inv_freq, 1.0
    if rope_type == "dynamic":
        factor = rope_scaling["factor"]
        seq_len = max_position_embeddings
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim)), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(dim, base, rope_scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, base, rope_scaling, max_position_embeddings)
    if rope_type == "longrope":  # the short factors: transformers' table at init
        short, _, scale = longrope_inv_freqs(dim, base, rope_scaling, max_position_embeddings)
        return short, scale
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def longrope_inv_freqs(dim: int, base: float, s: Mapping[str, Any], max_pos: int
                       ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LongRoPE's two tables, ``(short, long, attention_factor)``: ``1 / (factor_i * base^(2i/dim))``
    with the short or the long rescale factors (``_compute_longrope_parameters``).  The cos/sin
    scale defaults to ``sqrt(1 + ln(factor) / ln(original))`` with ``factor`` defaulting to
    ``max_position_embeddings / original_max_position_embeddings`` (Phi-3's convention)."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor")
    if factor is None:
        factor = max_pos / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim

    def table(key: str) -> torch.Tensor:
        return 1.0 / (torch.tensor(s[key], dtype=torch.float32) * base**shape)

    return table("short_factor"), table("long_factor"), float(attention_factor)


def _llama3_inv_freq(dim: int, base: float, s: Mapping[str, Any]) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    factor = s["factor"]
    low_freq_factor = s["low_freq_factor"]
    high_freq_factor = s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def _yarn_inv_freq(dim: int, base: float, s: Mapping[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = s.get("factor")
    original = s["original_max_position_embeddings"]
    if factor is None:
        factor = max_pos / original
    attention_factor = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp.to(dtype=torch.float)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin for a step's positions, computed once per forward and shared by all layers.

    Computing from ``positions`` on the fly (``[T, D/2]`` multiplies and cos/sin) costs far less
    than one projection and needs no ``[max_positions, D]`` cache.  The values equal
    transformers' ``LlamaRotaryEmbedding`` (same fp32 product, then cast to the model dtype).
    """

    inv_freq: torch.Tensor  # [D/2] fp32, a non-persistent buffer

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        rope_scaling: Mapping[str, Any] | None,
        max_position_embeddings: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        # Computed on the CPU explicitly (whatever device context the model is built under) so
        # the frequencies are the same numbers on every device.
        with torch.device("cpu"):
            inv_freq, scaling = rope_inv_freq(head_dim, rope_theta, rope_scaling, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)
        self.attention_scaling = scaling
        self.dtype = dtype

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` int64 ``[T]`` -> ``(cos, sin)``, each ``[T, 1, D/2]`` in the model dtype."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(self.dtype).unsqueeze(1), sin.to(self.dtype).unsqueeze(1)


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """LongRoPE (Phi-3): the short-factor table for the tokens of a sequence no longer than
    ``original_max_position_embeddings``, the long one for a longer sequence.

    transformers picks the table per forward call from ``max(position_ids) + 1``, and Phi-3's
    generation drops its cache the first time the sequence grows past the original length, so
    every token is computed again with the long table: at every step all the sequence's K/V
    come from the table its current length picks, as in one forward pass over the whole
    sequence.  :meth:`forward` takes that length per token (``rope_lens``: a prompt computed in
    chunks still gets the table of its whole length); the engine recomputes a sequence that
    crosses (:meth:`~..config.ModelArchConfig.kv_variant`).
    """

    long_inv_freq: torch.Tensor  # [D/2] fp32, a non-persistent buffer

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: Mapping[str, Any],
                 max_position_embeddings: int, dtype: torch.dtype) -> None:
        super().__init__(head_dim, rope_theta, rope_scaling, max_position_embeddings, dtype)
        with torch.device("cpu"):
            _, long, _ = longrope_inv_freqs(head_dim, rope_theta, rope_scaling, max_position_embeddings)
        self.register_buffer("long_inv_freq", long.to(torch.get_default_device()), persistent=False)
        self.original_max_position = int(rope_scaling["original_max_position_embeddings"])

    def forward(self, positions: torch.Tensor, rope_lens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope_lens`` int64 ``[T]``: the length of each token's sequence (None: every token's
        ``position + 1``)."""
        lens = positions + 1 if rope_lens is None else rope_lens
        inv_freq = torch.where((lens > self.original_max_position)[:, None], self.long_inv_freq, self.inv_freq)
        freqs = positions.to(torch.float32)[:, None] * inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(self.dtype).unsqueeze(1), sin.to(self.dtype).unsqueeze(1)



def make_rotary(cfg: ModelArchConfig, dtype: torch.dtype) -> RotaryEmbedding:
    """The rotary embedding a config asks for, over the ``rotary_dim`` leading features of each head."""
    if cfg.rope_scaling is not None and cfg.rope_type == "longrope":
        return LongRopeRotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                                       dtype)
    return RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, dtype)
