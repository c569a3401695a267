"""Llama 1-3: pre-norm decoder layers of rotary grouped-query attention and a SiLU-gated MLP.

``attention_bias`` gives q/k/v and o_proj a bias, ``mlp_bias`` the MLP's projections.  Mistral
and the Qwen families are this decoder with other config defaults (their files subclass this one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .base import DecoderForCausalLM
from .config import ModelArchConfig
from .layers import Attention, DecoderLayer, GatedMLP, Shard


class LlamaForCausalLM(DecoderForCausalLM):
    model_type = "llama"
    default_max_position = 2048

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        bias = bool(d.get("attention_bias", False))
        return {"attention_bias": bias, "o_proj_bias": bias, "mlp_bias": bool(d.get("mlp_bias", False))}

    def make_layer(self, cfg: ModelArchConfig, layer_idx: int, shard: Shard) -> nn.Module:
        attn = Attention(cfg, layer_idx, shard, qkv_bias=cfg.attention_bias, o_bias=cfg.o_proj_bias,
                         qk_norm=cfg.qk_norm)
        mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, shard, bias=cfg.mlp_bias)
        return DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps, shard)
