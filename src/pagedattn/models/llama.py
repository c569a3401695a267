"""One decoder implementation for Llama, Mistral, Qwen2 and Qwen3 causal LMs on the paged KV cache.

The families differ only in flags of :class:`ModelArchConfig`: q/k/v (and o_proj) biases,
per-head q/k RMSNorm before rotary (Qwen3), per-layer sliding windows (Mistral, Qwen2/3),
grouped/multi-query attention and tied embeddings.

Input is one flattened ragged batch: ``input_ids``/``positions`` ``[T]`` hold the new tokens of
every sequence of the step back to back, and ``ctx.meta`` tells the attention backend which
sequence each token belongs to.  There is no batch dimension and no padding.

Runtime layout differs from the checkpoint: q/k/v live in one ``qkv_proj`` and gate/up in one
``gate_up_proj`` (one matmul each).  :meth:`LlamaForCausalLM.load_weights` maps HF checkpoint
names onto those through each layer's ``weight_loader``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from ..attention.backend import AttentionLayerSpec
from ..cache.kv_pool import KVCacheSpec
from .config import ModelArchConfig
from .context import ForwardContext
from .fused_ops import qk_norm_rope
from .layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    ShardId,
    SiluAndMul,
    VocabParallelEmbedding,
    WeightLoading,
)

# Runtime fused parameter -> the checkpoint projections it holds, with their shard ids.
FUSED_PARAMS: dict[str, tuple[tuple[str, ShardId], ...]] = {
    "qkv_proj": (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")),
    "gate_up_proj": (("gate_proj", 0), ("up_proj", 1)),
}
# Checkpoint entries that are not weights (buffers some exporters save).
_IGNORED_WEIGHTS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelArchConfig,
        layer_idx: int,
        params_dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            bias=cfg.attention_bias,
            tp_rank=tp_rank,
            tp_size=tp_size,
            params_dtype=params_dtype,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        # Partial sums out: post_attention_layernorm reduces them.
        self.o_proj = RowParallelLinear(
            cfg.q_size,
            cfg.hidden_size,
            bias=cfg.o_proj_bias,
            reduce_results=False,
            buffer_slot=0,
            tp_rank=tp_rank,
            tp_size=tp_size,
            params_dtype=params_dtype,
        )
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, params_dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, params_dtype)
        self.spec = AttentionLayerSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=cfg.head_dim,
            scale=cfg.head_dim**-0.5,
            sliding_window=cfg.layer_sliding_windows[layer_idx],
        )

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, q + 2 kv]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        # Per-head q/k RMSNorm (Qwen3) and rotary: one kernel on the GPU.
        q_w, k_w = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
        eps = self.q_norm.eps if self.qk_norm else 0.0
        q, k = qk_norm_rope(qkv, cos, sin, self.num_heads, self.num_kv_heads, q_w, k_w, eps)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        out = ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.meta, self.spec)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig, params_dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size,
            [cfg.intermediate_size] * 2,
            bias=cfg.mlp_bias,
            tp_rank=tp_rank,
            tp_size=tp_size,
            params_dtype=params_dtype,
        )
        # Partial sums out: the next layer's input_layernorm (or the final norm) reduces them.
        self.down_proj = RowParallelLinear(
            cfg.intermediate_size,
            cfg.hidden_size,
            bias=cfg.mlp_bias,
            reduce_results=False,
            buffer_slot=1,
            tp_rank=tp_rank,
            tp_size=tp_size,
            params_dtype=params_dtype,
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelArchConfig,
        layer_idx: int,
        params_dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, params_dtype, tp_rank, tp_size)
        self.mlp = LlamaMLP(cfg, params_dtype, tp_rank, tp_size)
        tp = tp_size > 1
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, params_dtype, reduce_input=tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, params_dtype, reduce_input=tp)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm residual blocks with the residual stream carried beside the sublayer output
        (vLLM's layout): ``(mlp_out, residual)`` in, ``(mlp_out, residual)`` out, where the
        layer's true output is their sum.  Each add is fused into the RMSNorm that follows it;
        the sums equal HF's ``residual + sublayer_out`` bit for bit (addition commutes), so the
        numbers match the plain layout exactly.  ``residual`` is None for the first layer.

        With tensor parallelism the row-parallel o_proj and down_proj return per-rank partial
        sums and the norm after each sums them across ranks (``reduce_input``), so the
        all-reduce, the residual add and the RMSNorm can be one fused step.  The two
        reductions of a layer alternate between buffer slots 0 (o_proj) and 1 (down_proj)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, ctx)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelArchConfig, params_dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, tp_rank=tp_rank, tp_size=tp_size, params_dtype=params_dtype
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, params_dtype, tp_rank, tp_size) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, params_dtype, reduce_input=tp_size > 1)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, params_dtype
        )

    def first_attention(self) -> LlamaAttention:
        """Layer 0's attention (every layer's has the same heads on this rank)."""
        return cast(LlamaDecoderLayer, self.layers[0]).self_attn

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, ctx)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm.add_and_norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Causal LM over the paged KV cache; serves every architecture in :mod:`.registry`."""

    def __init__(
        self,
        cfg: ModelArchConfig,
        params_dtype: torch.dtype = torch.float32,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        if not params_dtype.is_floating_point:
            raise ValueError(f"params_dtype must be a floating type, got {params_dtype}")
        self.config = cfg
        self.dtype = params_dtype
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.model = LlamaModel(cfg, params_dtype, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, tp_rank=tp_rank, tp_size=tp_size, params_dtype=params_dtype
        )
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ inference
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``input_ids``, ``positions`` int64 ``[T]`` -> final-norm hidden states ``[T, hidden_size]``."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be 1-D [T], got {tuple(input_ids.shape)} and "
                f"{tuple(positions.shape)}"
            )
        if len(ctx.kv_caches) != self.config.num_layers:
            raise ValueError(f"ctx.kv_caches has {len(ctx.kv_caches)} layers, the model has {self.config.num_layers}")
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """``hidden [n, hidden_size]`` -> logits ``[n, vocab_size]`` in the model dtype; with
        ``gather=False`` and tensor parallelism, this rank's vocabulary slice ``[n, vocab / tp]``
        (see ``lm_head.gather`` and ``lm_head.greedy_tokens``)."""
        return self.lm_head(hidden, gather)

    def kv_cache_spec(self, block_size: int, dtype: torch.dtype | None = None) -> KVCacheSpec:
        """Shape of this rank's KV pool (its share of the KV heads)."""
        attn = self.model.first_attention()
        return KVCacheSpec(
            num_layers=self.config.num_layers,
            num_kv_heads=attn.num_kv_heads,
            head_dim=self.config.head_dim,
            block_size=block_size,
            dtype=dtype or self.dtype,
        )

    # ------------------------------------------------------------------ weights
    def checkpoint_names(self) -> dict[str, tuple[str, ShardId]]:
        """HF checkpoint name -> (runtime parameter name, shard id) for every expected tensor."""
        names: dict[str, tuple[str, ShardId]] = {}
        for pname, _ in self.named_parameters():  # a tied lm_head is listed once, as the embedding
            module_path, _, leaf = pname.rpartition(".")
            owner, _, attr = module_path.rpartition(".")
            if attr in FUSED_PARAMS:
                for part, shard in FUSED_PARAMS[attr]:
                    names[f"{owner}.{part}.{leaf}"] = (pname, shard)
            else:
                names[pname] = (pname, None)
        return names

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into the runtime (fused, sharded) parameters.

        Tensors are consumed one at a time, so the caller can stream them from disk.  Raises
        ValueError naming any unexpected or missing tensor, or a shape mismatch.
        """
        expected = self.checkpoint_names()
        params = dict(self.named_parameters())
        seen: set[str] = set()
        for name, tensor in weights:
            if _IGNORED_WEIGHTS.search(name):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding is the output projection
            if name not in expected:
                raise ValueError(
                    f"unexpected weight {name!r} in checkpoint for {self.config.architecture} (no matching parameter)"
                )
            pname, shard = expected[name]
            owner = cast(WeightLoading, self.get_submodule(pname.rpartition(".")[0]))
            try:
                owner.weight_loader(params[pname], tensor, shard)
            except ValueError as e:
                raise ValueError(f"cannot load {name!r}: {e}") from None
            seen.add(name)
        missing = sorted(set(expected) - seen)
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing weights: {shown}")
