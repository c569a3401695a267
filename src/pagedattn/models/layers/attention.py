"""Self-attention over the paged KV cache, the attention block of every decoder layer."""

from __future__ import annotations

import torch
from torch import nn

from ...attention.backend import AttentionLayerSpec, KVScales
from ..config import ModelArchConfig
from ..context import ForwardContext
from ..fused_ops import qk_norm_rope
from .linear import QKVParallelLinear, RowParallelLinear
from .norm import RMSNorm, WeightFirstRMSNorm
from .parallel import Shard
from .quant import parallel_linear


class Attention(nn.Module):
    """q/k/v in one column-parallel projection (``qkv_proj``), then per-head q/k RMSNorm (with
    ``qk_norm``) and rotary in one kernel on the GPU, the backend's paged attention (which
    stores this step's k/v first), and the row-parallel output projection (``o_proj``).

    Sizes and the layer's sliding window come from ``cfg``, what differs between families from
    the keywords: q/k/v and o_proj biases, the q/k norm (per head, and its class: Gemma's norms
    take their weight as an offset from one; or with ``projection_qk_norm`` over the whole q and
    k projections, OLMo 2's), the softmax scale (default ``head_dim ** -0.5``), attention-logit
    soft-capping.  Rotary turns the first ``cfg.rotary_dim`` features of each head (the cos/sin
    tables' width).  Returns this rank's partial sums of the output (its query heads' share); the
    norm after the block reduces them across ranks, fused with its add.  With ``reduce_output``
    the block sums them itself (for a norm that follows the sum, not the residual add: post-norm
    layers)."""

    def __init__(self, cfg: ModelArchConfig, layer_idx: int, shard: Shard, *, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm: bool = False, norm: type[RMSNorm] = RMSNorm,
                 scale: float | None = None, logit_softcap: float | None = None,
                 projection_qk_norm: bool = False, reduce_output: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.qkv_proj: QKVParallelLinear = parallel_linear(
            QKVParallelLinear, shard, cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, bias=qkv_bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj: RowParallelLinear = parallel_linear(RowParallelLinear, shard, cfg.q_size, cfg.hidden_size,
                                                         bias=o_bias, reduce_results=reduce_output)
        self.qk_norm = qk_norm
        self.projection_qk_norm = projection_qk_norm
        if qk_norm and projection_qk_norm:
            raise ValueError("qk_norm (per head) and projection_qk_norm exclude each other")
        self.unit_offset_norm = norm.unit_offset
        self.q_norm: RMSNorm | WeightFirstRMSNorm
        self.k_norm: RMSNorm | WeightFirstRMSNorm
        if qk_norm:
            self.q_norm = norm(cfg.head_dim, cfg.rms_norm_eps, shard.dtype)
            self.k_norm = norm(cfg.head_dim, cfg.rms_norm_eps, shard.dtype)
        if projection_qk_norm:
            kv_part = shard.rank // self.qkv_proj.num_kv_head_replicas
            self.q_norm = WeightFirstRMSNorm(cfg.q_size, cfg.rms_norm_eps, shard.dtype, local_size=self.q_size,
                                             part=shard.rank, ranks=shard.size)
            self.k_norm = WeightFirstRMSNorm(cfg.kv_size, cfg.rms_norm_eps, shard.dtype, local_size=self.kv_size,
                                             part=kv_part, ranks=shard.size)
        self.spec = AttentionLayerSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=cfg.head_dim,
            scale=cfg.head_dim**-0.5 if scale is None else scale,
            sliding_window=cfg.layer_sliding_windows[layer_idx],
            logit_softcap=logit_softcap,
        )
        # Scales of an fp8 KV cache (pages hold k / k_scale): 1.0 unless the checkpoint has them
        # (load_kv_scale).  Buffers, so they follow the model to its device and CUDA graphs read
        # whatever was loaded; not persistent, so state_dict-based checks do not expect them.
        self.k_scale: torch.Tensor
        self.v_scale: torch.Tensor
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)

    @property
    def kv_scales(self) -> KVScales:
        return KVScales(self.k_scale, self.v_scale)

    @torch.no_grad()
    def load_kv_scale(self, which: str, value: torch.Tensor) -> None:
        """Set the K (``which="k"``) or V scale from a checkpoint tensor of one element."""
        if value.numel() != 1:
            raise ValueError(f"{which}_scale must be one value (a per-tensor scale), got shape {tuple(value.shape)}")
        scale = float(value.float().item())
        if not 0 < scale < float("inf"):
            raise ValueError(f"{which}_scale must be a positive finite number, got {scale}")
        getattr(self, f"{which}_scale").fill_(scale)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, q + 2 kv]
        if self.projection_qk_norm:  # normalised before rotary, as one tensor for the rotary op
            q_end, k_end = self.q_size, self.q_size + self.kv_size
            qkv = torch.cat([self.q_norm(qkv[:, :q_end]), self.k_norm(qkv[:, q_end:k_end]), qkv[:, k_end:]], -1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        q_w, k_w = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
        eps = self.q_norm.eps if self.qk_norm else 0.0
        q, k = qk_norm_rope(qkv, cos, sin, self.num_heads, self.num_kv_heads, q_w, k_w, eps, self.unit_offset_norm)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        out = ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.meta, self.spec, self.kv_scales)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.q_size))
