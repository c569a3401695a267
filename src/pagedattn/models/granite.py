"""Granite 3 (``GraniteForCausalLM``): Llama's decoder with four scalars of its own
(transformers' ``GraniteConfig``): the embeddings are multiplied by ``embedding_multiplier``,
each sublayer's output by ``residual_multiplier`` before it joins the residual stream, the
attention logits by ``attention_multiplier`` (the softmax scale, instead of
``head_dim ** -0.5``), and the LM logits are divided by ``logits_scaling``.

The residual multiplier scales each rank's partial sums before they are summed (the same value
up to rounding with tensor parallelism, the same bits on one rank).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .config import ModelArchConfig
from .context import ForwardContext
from .layers import Attention, DecoderLayer, DecoderModel, GatedMLP, Shard
from .llama import LlamaForCausalLM


@dataclass(frozen=True)
class GraniteArchConfig(ModelArchConfig):
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0


class GraniteAttention(Attention):
    """Attention whose output is scaled by the residual multiplier."""

    residual_multiplier: float

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return super().forward(hidden, cos, sin, ctx).mul_(self.residual_multiplier)


class GraniteMLP(GatedMLP):
    """The gated MLP, its output scaled by the residual multiplier."""

    residual_multiplier: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).mul_(self.residual_multiplier)


class GraniteModel(DecoderModel):
    embedding_multiplier: float

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids) * self.embedding_multiplier


class GraniteForCausalLM(LlamaForCausalLM):
    model_type = "granite"
    config_class = GraniteArchConfig

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        fields = super().config_fields(d, num_layers)
        for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
            v = d.get(key, 1.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{key} must be a positive number, got {v!r}")
            fields[key] = float(v)
        return fields

    @property
    def granite(self) -> GraniteArchConfig:
        return cast(GraniteArchConfig, self.config)

    def make_model(self, cfg: ModelArchConfig, shard: Shard) -> DecoderModel:
        model = GraniteModel(cfg, shard, (self.make_layer(cfg, i, shard) for i in range(cfg.num_layers)))
        model.embedding_multiplier = cast(GraniteArchConfig, cfg).embedding_multiplier
        return model

    def make_layer(self, cfg: ModelArchConfig, layer_idx: int, shard: Shard) -> nn.Module:
        g = cast(GraniteArchConfig, cfg)
        attn = GraniteAttention(cfg, layer_idx, shard, qkv_bias=cfg.attention_bias, o_bias=cfg.o_proj_bias,
                                scale=g.attention_multiplier)
        mlp = GraniteMLP(cfg.hidden_size, cfg.intermediate_size, shard, bias=cfg.mlp_bias)
        attn.residual_multiplier = mlp.residual_multiplier = g.residual_multiplier
        return DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps, shard)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        return super().compute_logits(hidden, gather) / self.granite.logits_scaling
