"""Self-attention over the paged KV cache, the attention block of every decoder layer."""

from __future__ import annotations

import torch
from torch import nn

from ...attention.backend import AttentionLayerSpec
from ..config import ModelArchConfig
from ..context import ForwardContext
from ..fused_ops import qk_norm_rope
from .linear import QKVParallelLinear, RowParallelLinear
from .norm import RMSNorm
from .parallel import Shard
from .quant import parallel_linear


class Attention(nn.Module):
    """q/k/v in one column-parallel projection (``qkv_proj``), then per-head q/k RMSNorm (with
    ``qk_norm``) and rotary in one kernel on the GPU, the backend's paged attention (which
    stores this step's k/v first), and the row-parallel output projection (``o_proj``).

    Sizes and the layer's sliding window come from ``cfg``, what differs between families from
    the keywords: q/k/v and o_proj biases, the q/k norm, the softmax scale (default
    ``head_dim ** -0.5``).  Returns this rank's partial sums of the output (its query heads'
    share); the norm after the block reduces them across ranks, fused with its add."""

    def __init__(self, cfg: ModelArchConfig, layer_idx: int, shard: Shard, *, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm: bool = False, scale: float | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.qkv_proj: QKVParallelLinear = parallel_linear(
            QKVParallelLinear, shard, cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, bias=qkv_bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj: RowParallelLinear = parallel_linear(RowParallelLinear, shard, cfg.q_size, cfg.hidden_size,
                                                         bias=o_bias, reduce_results=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, shard.dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, shard.dtype)
        self.spec = AttentionLayerSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=cfg.head_dim,
            scale=cfg.head_dim**-0.5 if scale is None else scale,
            sliding_window=cfg.layer_sliding_windows[layer_idx],
        )

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, q + 2 kv]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        q_w, k_w = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
        eps = self.q_norm.eps if self.qk_norm else 0.0
        q, k = qk_norm_rope(qkv, cos, sin, self.num_heads, self.num_kv_heads, q_w, k_w, eps)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        out = ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.meta, self.spec)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.q_size))
