"""The shared building blocks every model family is made of.

* linear layers laid out for tensor parallelism (:mod:`.linear`), the vocabulary-parallel
  embedding and LM head (:mod:`.vocab`), RMSNorm and Gemma's variant (:mod:`.norm`), rotary
  embeddings (:mod:`.rotary`);
* the blocks of a decoder layer: :class:`Attention` (q/k/v, optional q/k norm, rotary, paged
  attention, output projection) and :class:`GatedMLP` (SiLU or GELU gated); :class:`DecoderLayer`,
  the pre-norm residual block over them; :class:`DecoderModel`, the stack; :class:`SparseMoEBlock`,
  the mixture-of-experts block (router and :class:`FusedMoE` experts) of the MoE families;
* int4 weight-only twins of the linear layers (:mod:`.quant`), which the blocks build through
  :func:`parallel_linear` when the checkpoint is quantized;
* the tensor-parallel plumbing (:mod:`.parallel`: :class:`Shard`, :class:`AllReduce`) and the
  weight-loading hooks (:mod:`.weights`).

Tensor-parallel layout (Megatron/vLLM style): q/k/v and gate/up projections split their output
features (column-parallel), o_proj and down_proj their input features (row-parallel: each rank
returns partial sums, which the RMSNorm after the block reduces), the embedding and LM head the
vocabulary.  Each layer's ``weight_loader`` takes the full checkpoint tensor and keeps this
rank's slice.  The elementwise math is in :mod:`..fused_ops` (torch on the CPU, Triton on CUDA).
"""

# The rotary op itself lives with its fused GPU kernel.
from ..fused_ops import apply_rotary
from .attention import Attention
from .decoder import DecoderLayer, DecoderModel
from .linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    linear,
    pack_linear_weights_for_cpu,
)
from .mlp import GatedMLP, GeluAndMul, SiluAndMul
from .moe import FusedMoE, MoEArchConfig, MoERouter, SparseMoEBlock, per_expert_weights
from .norm import GemmaRMSNorm, RMSNorm, WeightFirstRMSNorm
from .parallel import AllReduce, Shard, all_gather_last_dim, divide, process_group_all_reduce, set_all_reduce
from .quant import Fp8Linear, QuantLinear, finish_loading, is_quantized, parallel_linear
from .rotary import LongRopeRotaryEmbedding, RotaryEmbedding, longrope_inv_freqs, make_rotary, rope_inv_freq
from .vocab import ParallelLMHead, VocabParallelEmbedding, argmax_rows
from .weights import ShardId, WeightLoading, default_weight_loader, deferred_params, materialize_params

__all__ = [
    "AllReduce",
    "Attention",
    "ColumnParallelLinear",
    "DecoderLayer",
    "DecoderModel",
    "Fp8Linear",
    "FusedMoE",
    "GatedMLP",
    "GeluAndMul",
    "GemmaRMSNorm",
    "LongRopeRotaryEmbedding",
    "MergedColumnParallelLinear",
    "MoEArchConfig",
    "MoERouter",
    "ParallelLMHead",
    "QKVParallelLinear",
    "QuantLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "Shard",
    "ShardId",
    "SiluAndMul",
    "SparseMoEBlock",
    "VocabParallelEmbedding",
    "WeightFirstRMSNorm",
    "WeightLoading",
    "all_gather_last_dim",
    "apply_rotary",
    "argmax_rows",
    "default_weight_loader",
    "deferred_params",
    "divide",
    "finish_loading",
    "is_quantized",
    "linear",
    "longrope_inv_freqs",
    "make_rotary",
    "materialize_params",
    "pack_linear_weights_for_cpu",
    "parallel_linear",
    "per_expert_weights",
    "process_group_all_reduce",
    "rope_inv_freq",
    "set_all_reduce",
]
