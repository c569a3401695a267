"""Gemma 2: rotary grouped-query attention and a GELU-gated MLP, each between a pre-norm and a
post-norm (four Gemma RMSNorms a layer, ``x * (1 + weight)``), sliding-window and global layers
(``layer_types``; every other layer slides when the config has none), attention-logit and
final-logit soft-capping (``cap * tanh(x / cap)``), a softmax scale from
``query_pre_attn_scalar``, and the embeddings scaled by ``sqrt(hidden_size)`` in the model dtype.

Gemma 3 (:mod:`.gemma3`) is this decoder with q/k norms and a second rotary table for its
sliding layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .base import DecoderForCausalLM
from .config import ModelArchConfig, layer_type_windows, parse_token_ids
from .context import ForwardContext
from .layers import Attention, DecoderModel, GatedMLP, GeluAndMul, GemmaRMSNorm, RotaryEmbedding, Shard

# config.json's activation -> F.gelu's ``approximate`` (transformers' ACT2FN computes these with F.gelu).
_GELU_APPROXIMATE = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}
_HEAD_DIM_DEFAULT = 256  # Gemma2Config / Gemma3TextConfig.head_dim, independent of hidden size and heads
_WINDOW_DEFAULT = 4096


@dataclass(frozen=True)
class GemmaArchConfig(ModelArchConfig):
    """Gemma's knobs besides the shared fields."""

    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256  # the softmax scale is its inverse square root
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # The sliding-window layers' rotary table (Gemma 3's local base); None: the global one.
    local_rope_theta: float | None = None
    local_rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_activation not in _GELU_APPROXIMATE:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported "
                             f"(only {' or '.join(map(repr, _GELU_APPROXIMATE))})")
        if not _positive_finite(self.query_pre_attn_scalar):
            raise ValueError(f"query_pre_attn_scalar must be a positive number, got {self.query_pre_attn_scalar!r}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "local_rope_theta"):
            v = getattr(self, name)
            if v is not None and not _positive_finite(v):
                raise ValueError(f"{name} must be a positive number or null, got {v!r}")

    @property
    def softmax_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5


def _positive_finite(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < math.inf


class GemmaDecoderLayer(nn.Module):
    """``x + post_norm(attn(pre_norm(x)))``, then the same around the MLP (``Gemma2DecoderLayer``),
    in :class:`~.layers.DecoderLayer`'s layout: the residual stream is carried beside the
    sublayer output, each add fused into the pre-norm that follows it (the sums equal HF's bit
    for bit).  With tensor parallelism the post-norms take the row-parallel projections'
    partial sums and reduce them first; the pre-norms see reduced values."""

    def __init__(self, self_attn: Attention, mlp: nn.Module, hidden_size: int, eps: float, shard: Shard) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        tp = shard.size > 1
        self.input_layernorm = GemmaRMSNorm(hidden_size, eps, shard.dtype)
        self.post_attention_layernorm = GemmaRMSNorm(hidden_size, eps, shard.dtype, reduce_input=tp)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden_size, eps, shard.dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden_size, eps, shard.dtype, reduce_input=tp)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, cos, sin, ctx))
        hidden, residual = self.pre_feedforward_layernorm.add_and_norm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(DecoderModel):
    """The decoder stack with Gemma's embedding scale (``sqrt(hidden_size)`` rounded to the model
    dtype, as ``Gemma2TextScaledWordEmbedding`` multiplies), its final norm (over values the last
    post-norm already reduced across ranks) and, when the config has one, a second rotary table
    for the sliding-window layers."""

    embed_scale: torch.Tensor

    def __init__(self, cfg: GemmaArchConfig, shard: Shard, layers: Iterable[nn.Module]) -> None:
        super().__init__(cfg, shard, layers)
        dtype = shard.dtype or torch.get_default_dtype()
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, shard.dtype)
        self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size**0.5).to(dtype), persistent=False)
        self.local_rotary_emb: RotaryEmbedding | None = None
        if cfg.local_rope_theta is not None:
            self.local_rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.local_rope_theta, cfg.local_rope_scaling,
                                                    cfg.max_position_embeddings, dtype)
        self.sliding = [w is not None for w in cfg.layer_sliding_windows]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.embed_scale
        rope = self.rotary_emb(positions)
        local = self.local_rotary_emb(positions) if self.local_rotary_emb is not None else rope
        residual: torch.Tensor | None = None
        for layer, sliding in zip(self.layers, self.sliding, strict=True):
            cos, sin = local if sliding else rope
            hidden, residual = layer(hidden, residual, cos, sin, ctx)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm.add_and_norm(hidden, residual)[0]


class Gemma2ForCausalLM(DecoderForCausalLM):
    model_type = "gemma2"
    default_max_position = 8192
    config_class = GemmaArchConfig
    activation_key = "hidden_activation"
    activations = tuple(_GELU_APPROXIMATE)
    # Gemma2Config's defaults: soft-capping on, every other layer sliding.
    default_attn_softcap: float | None = 50.0
    default_final_softcap: float | None = 30.0
    default_sliding_pattern = 2

    @classmethod
    def default_head_dim(cls, d: Mapping[str, Any]) -> int:
        return _HEAD_DIM_DEFAULT

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        if d.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention is not supported (only causal attention)")
        bias = bool(d.get("attention_bias", False))
        return {
            "attention_bias": bias,
            "o_proj_bias": bias,
            "tie_word_embeddings": bool(d.get("tie_word_embeddings", True)),  # Gemma's configs tie by default
            "bos_token_id": d.get("bos_token_id", 2),
            "eos_token_ids": parse_token_ids(d.get("eos_token_id", 1)),
            "layer_sliding_windows": gemma_windows(d, num_layers, cls.default_sliding_pattern),
            "hidden_activation": d.get("hidden_activation", "gelu_pytorch_tanh"),
            "query_pre_attn_scalar": d.get("query_pre_attn_scalar", 256),
            "attn_logit_softcapping": d.get("attn_logit_softcapping", cls.default_attn_softcap),
            "final_logit_softcapping": d.get("final_logit_softcapping", cls.default_final_softcap),
        }

    def make_model(self, cfg: ModelArchConfig, shard: Shard) -> DecoderModel:
        assert isinstance(cfg, GemmaArchConfig)
        return GemmaModel(cfg, shard, (self.make_layer(cfg, i, shard) for i in range(cfg.num_layers)))

    def make_layer(self, cfg: ModelArchConfig, layer_idx: int, shard: Shard) -> nn.Module:
        assert isinstance(cfg, GemmaArchConfig)
        attn = Attention(cfg, layer_idx, shard, qkv_bias=cfg.attention_bias, o_bias=cfg.o_proj_bias,
                         qk_norm=cfg.qk_norm, norm=GemmaRMSNorm, scale=cfg.softmax_scale,
                         logit_softcap=cfg.attn_logit_softcapping)
        mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, shard,
                       act=GeluAndMul(_GELU_APPROXIMATE[cfg.hidden_activation]))
        return GemmaDecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps, shard)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """The LM head's logits, soft-capped (``cap * tanh(logits / cap)``, transformers' order)
        when the config says so; greedy ids and sampling both see the capped values."""
        logits = super().compute_logits(hidden, gather)
        cap = cast(GemmaArchConfig, self.config).final_logit_softcapping
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap


def gemma_windows(d: Mapping[str, Any], num_layers: int, default_pattern: int) -> list[int | None]:
    """Each layer's window: ``sliding_window`` on the layers ``layer_types`` names sliding; a
    config without ``layer_types`` slides on all but every ``sliding_window_pattern``-th layer
    (as transformers fills it in)."""
    window = d.get("sliding_window", _WINDOW_DEFAULT)
    if d.get("layer_types") is None:
        pattern = d.get("sliding_window_pattern", default_pattern)
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise ValueError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        d = {**d, "layer_types": types}
    if window is None:
        return [None] * num_layers
    return layer_type_windows(d, window, num_layers)
