"""Mixtral: Mistral's decoder (no biases, an optional ``sliding_window`` on every layer) with a
sparse mixture-of-experts block in every layer: each token goes to ``num_experts_per_tok`` of
``num_local_experts`` experts of ``intermediate_size`` features, their softmax weights always
renormalised over the chosen ones and kept in fp32.  Checkpoints name the block
``block_sparse_moe`` and an expert's gate, down and up projections ``w1``, ``w2``, ``w3``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .layers import Attention, DecoderLayer, MoEArchConfig, Shard, ShardId, SparseMoEBlock, per_expert_weights
from .layers.moe import MIXTRAL_EXPERT_NAMES
from .llama import LlamaForCausalLM

_RMS_EPS_DEFAULT = 1e-5  # MixtralConfig's defaults where config.json omits the key
_ROPE_THETA_DEFAULT = 1e6


class MixtralForCausalLM(LlamaForCausalLM):
    model_type = "mixtral"
    default_max_position = 4096 * 32
    config_class = MoEArchConfig

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        num_experts = d.get("num_local_experts")
        if num_experts is None:
            num_experts = d.get("num_experts", 8)
        fields: dict[str, Any] = {
            "layer_sliding_windows": [d.get("sliding_window")] * num_layers,
            "num_experts": num_experts, "num_experts_per_tok": d.get("num_experts_per_tok", 2),
            "moe_intermediate_size": d["intermediate_size"], "norm_topk_prob": True, "router_fp32_weights": True,
            "sparse_layers": [True] * num_layers,
        }
        if "rms_norm_eps" not in d:
            fields["rms_norm_eps"] = _RMS_EPS_DEFAULT
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" not in d and not (isinstance(rope, Mapping) and "rope_theta" in rope):
            fields["rope_theta"] = _ROPE_THETA_DEFAULT
        return fields

    def make_layer(self, cfg: MoEArchConfig, layer_idx: int, shard: Shard) -> nn.Module:  # type: ignore[override]
        attn = Attention(cfg, layer_idx, shard)
        moe = SparseMoEBlock.from_config(cfg, shard, expert_names=MIXTRAL_EXPERT_NAMES)
        return DecoderLayer(attn, moe, cfg.hidden_size, cfg.rms_norm_eps, shard)

    def checkpoint_names(self) -> dict[str, tuple[str, ShardId]]:
        # The runtime calls the block ``mlp`` (the decoder layer's slot); the checkpoint ``block_sparse_moe``.
        return {k.replace(".mlp.", ".block_sparse_moe.", 1): v for k, v in super().checkpoint_names().items()}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # transformers' own layout calls the block ``mlp`` and fuses the experts.
        renamed = ((k.replace(".mlp.", ".block_sparse_moe.", 1), t) for k, t in weights)
        super().load_weights(per_expert_weights(renamed, MIXTRAL_EXPERT_NAMES))
