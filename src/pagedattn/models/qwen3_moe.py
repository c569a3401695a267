"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm, ``attention_bias`` on q/k/v and o_proj)
with a sparse mixture-of-experts block in every ``decoder_sparse_step``-th layer not listed in
``mlp_only_layers`` (the others keep a dense MLP of ``intermediate_size``).  Each token goes to
``num_experts_per_tok`` of ``num_experts`` experts of ``moe_intermediate_size`` features; their
softmax weights are renormalised over the chosen ones only with ``norm_topk_prob``.  Unlike
dense Qwen3, the head size defaults to ``hidden_size / num_attention_heads``, and with
``use_sliding_window`` every layer attends through ``sliding_window``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .base import DecoderForCausalLM
from .layers import Attention, DecoderLayer, GatedMLP, MoEArchConfig, Shard, SparseMoEBlock, per_expert_weights


def sparse_layers(d: Mapping[str, Any], num_layers: int, num_experts: int) -> list[bool]:
    """Which layers are sparse, as ``Qwen3MoeDecoderLayer`` decides."""
    step = d.get("decoder_sparse_step", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"decoder_sparse_step must be a positive int, got {step!r}")
    dense = set(d.get("mlp_only_layers") or ())
    return [i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    model_type = "qwen3_moe"
    default_max_position = 32768
    config_class = MoEArchConfig

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        bias = bool(d.get("attention_bias", False))
        # Hub configs say num_experts; transformers 5 writes its attribute alias num_local_experts.
        num_experts = d.get("num_experts")
        if num_experts is None:
            num_experts = d.get("num_local_experts", 128)
        window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
        return {"attention_bias": bias, "o_proj_bias": bias, "qk_norm": True,
                "layer_sliding_windows": [window] * num_layers,
                "num_experts": num_experts, "num_experts_per_tok": d.get("num_experts_per_tok", 8),
                "moe_intermediate_size": d.get("moe_intermediate_size", 768),
                "norm_topk_prob": bool(d.get("norm_topk_prob", False)),
                "sparse_layers": sparse_layers(d, num_layers, num_experts)}

    def make_layer(self, cfg: MoEArchConfig, layer_idx: int, shard: Shard) -> nn.Module:  # type: ignore[override]
        attn = Attention(cfg, layer_idx, shard, qkv_bias=cfg.attention_bias, o_bias=cfg.o_proj_bias, qk_norm=True)
        mlp: nn.Module
        if cfg.sparse_layers[layer_idx]:
            mlp = SparseMoEBlock.from_config(cfg, shard)
        else:
            mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, shard)
        return DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps, shard)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(per_expert_weights(weights))
