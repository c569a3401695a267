"""The pre-norm decoder layer and the decoder stack (embedding, layers, final norm, rotary)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..config import ModelArchConfig
from ..context import ForwardContext
from .attention import Attention
from .norm import RMSNorm
from .parallel import Shard
from .rotary import RotaryEmbedding
from .vocab import VocabParallelEmbedding


class DecoderLayer(nn.Module):
    """``x + attn(norm(x))``, then ``+ mlp(norm(.))``: Llama's pre-norm residual block, over any
    attention and MLP blocks that return (per-rank partial sums of) their output."""

    def __init__(self, self_attn: Attention, mlp: nn.Module, hidden_size: int, eps: float, shard: Shard) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        # With tensor parallelism both blocks return partial sums: the norm after each reduces them.
        tp = shard.size > 1
        self.input_layernorm = RMSNorm(hidden_size, eps, shard.dtype, reduce_input=tp)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, shard.dtype, reduce_input=tp)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried beside the sublayer output (vLLM's layout):
        ``(mlp_out, residual)`` in, ``(mlp_out, residual)`` out, where the layer's true output
        is their sum.  Each add is fused into the RMSNorm that follows it; the sums equal HF's
        ``residual + sublayer_out`` bit for bit (addition commutes), so the numbers match the
        plain layout exactly.  ``residual`` is None for the first layer.

        With tensor parallelism the row-parallel o_proj and down_proj return per-rank partial
        sums and the norm after each sums them across ranks (``reduce_input``), so the
        all-reduce, the residual add and the RMSNorm can be one fused step."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, ctx)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """The decoder stack: the vocabulary-parallel embedding (summed across ranks), ``layers``
    (any modules with :class:`DecoderLayer`'s ``forward``), the final norm (which reduces the
    last layer's partial sums), and the rotary cos/sin, computed once per step for every layer."""

    def __init__(self, cfg: ModelArchConfig, shard: Shard, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, **shard.kw)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, shard.dtype, reduce_input=shard.size > 1)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                                          shard.dtype or torch.get_default_dtype())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, ctx)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm.add_and_norm(hidden, residual)[0]
