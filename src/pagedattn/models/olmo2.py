"""OLMo 2 (``Olmo2ForCausalLM``): a post-norm decoder.  Each sublayer's output is normalised
before it joins the residual stream (``x + norm(attn(x))``, then ``h + norm(mlp(h))``: no
pre-norms), q and k are RMS-normalised over their whole projections (all heads at once) before
rotary, and every norm multiplies by its weight before casting back (``Olmo2RMSNorm``).

With tensor parallelism the sublayers sum their row-parallel outputs themselves (the norm
follows the sum, not the residual add), and the q/k norms sum the ranks' squares
(:class:`~.layers.WeightFirstRMSNorm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import DecoderForCausalLM
from .config import ModelArchConfig
from .context import ForwardContext
from .layers import Attention, DecoderModel, GatedMLP, Shard, WeightFirstRMSNorm

_RMS_NORM_EPS = 1e-5  # Olmo2Config.rms_norm_eps


class Olmo2DecoderLayer(nn.Module):
    """``h = x + norm(attn(x))``, ``out = h + norm(mlp(h))``, with :class:`~.layers.DecoderLayer`'s
    ``forward`` signature.  It returns ``(out, None)``: the whole layer output, no residual
    carried beside it (so the final norm gets one reduced tensor)."""

    def __init__(self, cfg: ModelArchConfig, layer_idx: int, shard: Shard) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, shard, qkv_bias=cfg.attention_bias, o_bias=cfg.o_proj_bias,
                                   projection_qk_norm=True, reduce_output=True)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, shard, reduce_output=True)
        self.post_attention_layernorm = WeightFirstRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, shard.dtype)
        self.post_feedforward_layernorm = WeightFirstRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, shard.dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                ctx: ForwardContext) -> tuple[torch.Tensor, None]:
        x = hidden if residual is None else hidden + residual
        h = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, ctx))
        return h + self.post_feedforward_layernorm(self.mlp(h)), None


class Olmo2Model(DecoderModel):
    """The stack with OLMo 2's final norm (weight before the cast), over whole layer outputs."""

    def __init__(self, cfg: ModelArchConfig, shard: Shard, layers: Any) -> None:
        super().__init__(cfg, shard, layers)
        self.norm = WeightFirstRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, shard.dtype)  # type: ignore[assignment]


class Olmo2ForCausalLM(DecoderForCausalLM):
    model_type = "olmo2"
    default_max_position = 2048

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        bias = bool(d.get("attention_bias", False))
        return {"rms_norm_eps": float(d.get("rms_norm_eps", _RMS_NORM_EPS)), "attention_bias": bias,
                "o_proj_bias": bias}

    def make_model(self, cfg: ModelArchConfig, shard: Shard) -> DecoderModel:
        return Olmo2Model(cfg, shard, (self.make_layer(cfg, i, shard) for i in range(cfg.num_layers)))

    def make_layer(self, cfg: ModelArchConfig, layer_idx: int, shard: Shard) -> nn.Module:
        return Olmo2DecoderLayer(cfg, layer_idx, shard)
