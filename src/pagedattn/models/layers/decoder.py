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
from .rotary import LongRopeRotaryEmbedding, make_rotary
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
    last layer's partial sums), and the rotary cos/sin, computed once per step for every layer.
    A family that scales its embeddings overrides :meth:`embed`."""

    def __init__(self, cfg: ModelArchConfig, shard: Shard, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, **shard.kw)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, shard.dtype, reduce_input=shard.size > 1)
        self.rotary_emb = make_rotary(cfg, shard.dtype or torch.get_default_dtype())

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first layer's input: the tokens' embeddings (summed across ranks)."""
        return self.embed_tokens(input_ids)

    def rotary(self, positions: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the step's tokens (LongRoPE's table depends on each token's sequence length)."""
        if isinstance(self.rotary_emb, LongRopeRotaryEmbedding):
            return self.rotary_emb(positions, forward_lengths(positions, ctx))
        return self.rotary_emb(positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(positions, ctx)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, ctx)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm.add_and_norm(hidden, residual)[0]


def forward_lengths(positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """Per new token, the length of the sequence it belongs to, as one transformers forward pass
    over the whole sequence sees it: ``ctx.total_lens`` (the tokens the sequence holds, also
    while a prompt is computed in chunks), at least ``position + 1`` (an overlapped decode whose
    input token is not appended yet).  Without them (a decode graph), each token's sequence
    length after the step: the same for decodes."""
    if ctx.total_lens is not None:
        return torch.maximum(ctx.total_lens, positions + 1)
    seq_lens = ctx.meta.seq_lens.to(torch.int64)
    if seq_lens.shape[0] == positions.shape[0]:  # one token per sequence
        return seq_lens
    return torch.repeat_interleave(seq_lens, torch.diff(ctx.meta.query_start_loc), output_size=positions.shape[0])
