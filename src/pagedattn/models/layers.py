"""Building blocks of the decoder: RMSNorm, rotary embeddings, SiLU-and-mul and linear layers
laid out for tensor parallelism.

Numerics follow transformers exactly where it matters for fp32 token parity: RMSNorm does its
math in fp32 and casts back before the weight multiply; inverse RoPE frequencies are computed
with the same formulas, dtypes and operation order as ``transformers.modeling_rope_utils``.
The elementwise ops (RMSNorm, residual add + RMSNorm, SiLU-and-mul, rotary) are in
:mod:`.fused_ops`: the torch code on the CPU, fused Triton kernels on CUDA.

Tensor-parallel layout (Megatron/vLLM style).  Every linear layer takes ``tp_rank``/``tp_size``
and holds only its shard:

* :class:`ColumnParallelLinear` splits the output features (rows of ``weight``);
  :class:`MergedColumnParallelLinear` (gate/up) and :class:`QKVParallelLinear` (q/k/v) fuse
  several column-parallel projections into one matmul, each rank holding its slice of each part;
* :class:`RowParallelLinear` splits the input features; partial outputs are summed across ranks
  (the bias is added by rank 0 only, so the sum carries it once);
* :class:`VocabParallelEmbedding` / :class:`ParallelLMHead` split the vocabulary.

Each layer owns ``weight_loader(param, loaded_weight, shard_id=None)`` that takes the *full*
checkpoint tensor (one part of a fused weight when ``shard_id`` is given) and copies this rank's
slice into ``param``.  With ``tp_size == 1`` no collective is ever called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

# The elementwise math lives with its fused GPU kernels; apply_rotary is re-exported from here.
from .fused_ops import apply_rotary as apply_rotary
from .fused_ops import fused_add_rms_norm, rms_norm, silu_and_mul

ShardId = int | str | None


class WeightLoading(Protocol):
    """A module that copies a checkpoint tensor into (its shard of) one of its parameters."""

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None: ...


# ---------------------------------------------------------------------- helpers
def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tp_size ({denominator})")
    return numerator // denominator


def _check_tp(tp_rank: int, tp_size: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"need 0 <= tp_rank < tp_size, got tp_rank={tp_rank} tp_size={tp_size}")


def _check_shape(loaded: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"shape mismatch: checkpoint tensor {tuple(loaded.shape)}, expected {tuple(expected)}")


def _param(shape: Sequence[int], dtype: torch.dtype | None) -> nn.Parameter:
    # Inference only: no autograd bookkeeping, and no init work (the checkpoint overwrites it).
    return nn.Parameter(torch.empty(tuple(shape), dtype=dtype), requires_grad=False)


class AllReduce:
    """The cross-rank sum of the row-parallel layers and the vocabulary-parallel embedding: the
    default process group's all-reduce (NCCL on CUDA, gloo on the CPU).

    Swappable per layer (:func:`set_all_reduce`) so a process can plug in a faster one for its
    links.  Besides the plain sum it offers the sum fused with what always follows a row-parallel
    layer in a pre-norm decoder, the residual add and the next RMSNorm (:meth:`add_rms_norm`),
    and a place for the row-parallel GEMM to write its partial sums (:meth:`partials_buffer`),
    so a subclass can do all three without copying the activations around.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("tp_size > 1 needs an initialised torch.distributed process group")
        dist.all_reduce(x)
        return x

    def partials_buffer(self, rows: int, cols: int, dtype: torch.dtype, slot: int) -> torch.Tensor | None:
        """A ``[rows, cols]`` tensor for a row-parallel layer to write partial sums into, which
        :meth:`add_rms_norm` then reduces where they lie; None: write them anywhere.  ``slot``
        (0 or 1) tells apart the two reductions of a decoder layer: consecutive reductions use
        different slots, so a rank writing the next partial sums never overwrites ones a peer is
        still reading."""
        return None

    def add_rms_norm(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rms_norm(s + residual), s + residual)`` where ``s`` is ``partial`` summed over ranks."""
        return fused_add_rms_norm(self(partial), residual, weight, eps)


process_group_all_reduce = AllReduce()


def set_all_reduce(model: nn.Module, all_reduce: AllReduce) -> int:
    """Make every layer of ``model`` that sums across ranks use ``all_reduce``; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, (RowParallelLinear, VocabParallelEmbedding, RMSNorm)):
            m.all_reduce = all_reduce
            n += 1
    return n


def _all_gather_last_dim(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tp_size > 1 needs an initialised torch.distributed process group")
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
    """Copy a replicated tensor as is (casting to the parameter's dtype/device)."""
    if shard_id is not None:
        raise ValueError(f"unexpected shard_id {shard_id!r} for a replicated parameter")
    _check_shape(loaded_weight, param.shape)
    param.data.copy_(loaded_weight)


# ---------------------------------------------------------------------- norm / activation

def _onednn_linear_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise") \
        and hasattr(ops, "_reorder_linear_weight")


# Below this many rows a CPU matmul is a skinny GEMM, where computing ``(W @ x^T)^T`` runs
# ~25% faster in MKL than ``x @ W^T`` (measured on the 2-core CI machine, SmolLM2 shapes).
_CPU_SKINNY_ROWS = 64
_CPU_ONEDNN = _onednn_linear_available()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


# The op overload itself rather than the op packet, which resolves it again on every call (a
# CPU decode step makes 121 of them).  Weights are packed only where it exists.
_ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default if _CPU_ONEDNN else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; ``weight`` may be a oneDNN-packed CPU weight (see :func:`pack_linear_weights_for_cpu`)."""
    if weight.is_mkldnn:
        assert _ONEDNN_LINEAR is not None
        if x.dim() == 2:  # the model's activations: no reshaping on the way in or out
            return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
        lead = x.shape[:-1]
        y = _ONEDNN_LINEAR(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
        return y.view(*lead, y.shape[-1])
    if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= _CPU_SKINNY_ROWS:
        y = torch.mm(weight, x.t()).t().contiguous()
        return y.add_(bias) if bias is not None else y
    return F.linear(x, weight, bias)


def pack_linear_weights_for_cpu(model: nn.Module) -> int:
    """Give every linear layer of ``model`` on the CPU its weight in oneDNN's packed layout.

    The runtime layout, not the checkpoint's: call it after loading.  A decode step on the CPU is
    GEMM-bound, and oneDNN's GEMM on pre-packed weights runs the decoder's linears about 2x faster
    than BLAS on the dense ones (2-core AVX-512 CI machine, SmolLM2 at 16 rows: 30 distinct
    576x3072 weights in 11-13 ms vs 27-31 ms; unpacked oneDNN is slower than both, because it
    re-packs the weight on every call).  The dense weight is replaced, so memory stays the same;
    a tied LM head gets its own packed copy (the embedding keeps the dense table it indexes).
    Returns the number of layers packed (0 where oneDNN is unavailable or the dtype unsupported).
    """
    if not _CPU_ONEDNN:
        return 0
    packed = 0
    for module in model.modules():
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear | ParallelLMHead):
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype not in _ONEDNN_DTYPES or w.is_mkldnn:
            continue
        module.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(w.detach()), requires_grad=False)
        packed += 1
    return packed


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))`` with the normalisation in fp32, cast back before the weight
    multiply (exactly like ``LlamaRMSNorm``).  Normalises over the last dim, so it also serves
    as the per-head q/k norm of Qwen3 on ``[T, H, D]``."""

    def __init__(self, hidden_size: int, eps: float, params_dtype: torch.dtype | None = None, *,
                 reduce_input: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        # add_and_norm's x arrives as per-rank partial sums (a row-parallel layer's output) and is
        # summed across ranks first, by the all-reduce, fused with the add and the norm when it can.
        self.reduce_input = reduce_input
        self.all_reduce: AllReduce = process_group_all_reduce

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``: one kernel on the GPU, where the decoder
        carries the residual stream beside the sublayer outputs.  With ``reduce_input``, ``x`` is
        first summed across ranks."""
        if self.reduce_input:
            return self.all_reduce.add_rms_norm(x, residual, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class SiluAndMul(nn.Module):
    """``silu(x[:, :I]) * x[:, I:]`` for the fused gate/up output ``[T, 2I]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


# ---------------------------------------------------------------------- rotary
def rope_inv_freq(
    head_dim: int, rope_theta: float, rope_scaling: Mapping[str, Any] | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim // 2]`` (fp32, CPU) and the cos/sin scale of a RoPE variant.

    Mirrors ``transformers`` (``compute_default_rope_parameters`` and ``ROPE_INIT_FUNCTIONS``)
    line by line, so the result is bit-identical.  ``dynamic`` is evaluated at init length,
    as transformers does for sequences within ``max_position_embeddings`` (where it equals plain
    RoPE); the engine must not exceed ``max_position_embeddings`` for it.
    """
    rope_type = "default" if rope_scaling is None else rope_scaling["rope_type"]
    dim = head_dim
    base = rope_theta
    if rope_type == "default":
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    assert rope_scaling is not None
    if rope_type == "linear":
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
        inv_freq /= rope_scaling["factor"]
        return inv_freq, 1.0
    if rope_type == "dynamic":
        factor = rope_scaling["factor"]
        seq_len = max_position_embeddings
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim)), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(dim, base, rope_scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, base, rope_scaling, max_position_embeddings)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _llama3_inv_freq(dim: int, base: float, s: Mapping[str, Any]) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    factor = s["factor"]
    low_freq_factor = s["low_freq_factor"]
    high_freq_factor = s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def _yarn_inv_freq(dim: int, base: float, s: Mapping[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = s.get("factor")
    original = s["original_max_position_embeddings"]
    if factor is None:
        factor = max_pos / original
    attention_factor = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp.to(dtype=torch.float)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin for a step's positions, computed once per forward and shared by all layers.

    Computing from ``positions`` on the fly (``[T, D/2]`` multiplies and cos/sin) costs far less
    than one projection and needs no ``[max_positions, D]`` cache.  The values equal
    transformers' ``LlamaRotaryEmbedding`` (same fp32 product, then cast to the model dtype).
    """

    inv_freq: torch.Tensor  # [D/2] fp32, a non-persistent buffer

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        rope_scaling: Mapping[str, Any] | None,
        max_position_embeddings: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        # Computed on the CPU explicitly (whatever device context the model is built under) so
        # the frequencies are the same numbers on every device.
        with torch.device("cpu"):
            inv_freq, scaling = rope_inv_freq(head_dim, rope_theta, rope_scaling, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)
        self.attention_scaling = scaling
        self.dtype = dtype

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` int64 ``[T]`` -> ``(cos, sin)``, each ``[T, 1, D/2]`` in the model dtype."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(self.dtype).unsqueeze(1), sin.to(self.dtype).unsqueeze(1)


# ---------------------------------------------------------------------- linear layers
class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W [output_size, input_size]`` split along the output features."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        gather_output: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_tp(tp_rank, tp_size)
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, tp_size, "output_size")
        self.weight = _param((self.output_size_per_partition, input_size), params_dtype)
        self.bias = _param((self.output_size_per_partition,), params_dtype) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is not None:
            raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__}")
        _check_shape(loaded_weight, (self.output_size, *param.shape[1:]))
        n = self.output_size_per_partition
        param.data.copy_(loaded_weight.narrow(0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.gather_output and self.tp_size > 1:
            y = _all_gather_last_dim(y, self.tp_size)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size_per_partition}/{self.output_size}, "
            f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}"
        )


class _FusedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stored as one weight; each rank holds its slice of
    every part, concatenated in part order.  Subclasses define the parts."""

    def _layout(self, shard_id: ShardId) -> tuple[int, int, int, int]:
        """``(full_rows, param_offset, local_rows, src_offset)`` of one part."""
        raise NotImplementedError

    def _shard_ids(self) -> Sequence[ShardId]:
        raise NotImplementedError

    def _full_sizes(self) -> list[int]:
        return [self._layout(s)[0] for s in self._shard_ids()]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is None:
            # An already-fused checkpoint tensor: split it into its parts.
            sizes = self._full_sizes()
            _check_shape(loaded_weight, (sum(sizes), *param.shape[1:]))
            for sid, part in zip(self._shard_ids(), loaded_weight.split(sizes, dim=0), strict=True):
                self.weight_loader(param, part, sid)
            return
        if shard_id not in self._shard_ids():
            raise ValueError(
                f"unknown shard_id {shard_id!r} for {type(self).__name__}; expected one of {list(self._shard_ids())}"
            )
        full, offset, local, src = self._layout(shard_id)
        _check_shape(loaded_weight, (full, *param.shape[1:]))
        param.data.narrow(0, offset, local).copy_(loaded_weight.narrow(0, src, local))


class MergedColumnParallelLinear(_FusedColumnParallelLinear):
    """Column-parallel projections of the same input fused into one matmul (gate_proj and
    up_proj -> ``gate_up_proj``); parts are addressed by index (``shard_id`` 0, 1, ...)."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        *,
        gather_output: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        for i, n in enumerate(self.output_sizes):
            divide(n, tp_size, f"output_sizes[{i}]")
        super().__init__(
            input_size,
            sum(self.output_sizes),
            bias,
            gather_output=gather_output,
            tp_rank=tp_rank,
            tp_size=tp_size,
            params_dtype=params_dtype,
        )

    def _shard_ids(self) -> Sequence[ShardId]:
        return range(len(self.output_sizes))

    def _layout(self, shard_id: ShardId) -> tuple[int, int, int, int]:
        assert isinstance(shard_id, int)
        full = self.output_sizes[shard_id]
        local = full // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return full, offset, local, self.tp_rank * local


class QKVParallelLinear(_FusedColumnParallelLinear):
    """q, k and v projections fused into one matmul (``qkv_proj``), parts ``"q"``, ``"k"``, ``"v"``.

    Query heads are split across ranks.  KV heads too when there are at least ``tp_size`` of
    them; otherwise each rank holds one KV head, replicated ``tp_size / num_kv_heads`` times.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        _check_tp(tp_rank, tp_size)
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, "num_heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, total_num_kv_heads, "tp_size over num_kv_heads")
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, "num_kv_heads")
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size  # per rank
        self.kv_size = self.num_kv_heads * head_size  # per rank
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, tp_rank=tp_rank, tp_size=tp_size, params_dtype=params_dtype)

    def _shard_ids(self) -> Sequence[ShardId]:
        return ("q", "k", "v")

    def _layout(self, shard_id: ShardId) -> tuple[int, int, int, int]:
        if shard_id == "q":
            return self.total_num_heads * self.head_size, 0, self.q_size, self.tp_rank * self.q_size
        kv_rank = self.tp_rank // self.num_kv_head_replicas
        offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
        return self.total_num_kv_heads * self.head_size, offset, self.kv_size, kv_rank * self.kv_size


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W [output_size, input_size]`` split along the input features.

    Each rank's input is its slice of the features (the output of a column-parallel layer), so
    the full result is the sum over ranks; ``reduce_results`` does that sum with an all-reduce.
    Without it the layer returns this rank's partial sums, written where the all-reduce asks
    (:meth:`AllReduce.partials_buffer` with ``buffer_slot``) for whoever reduces them later.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        reduce_results: bool = True,
        buffer_slot: int = 0,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_tp(tp_rank, tp_size)
        if buffer_slot not in (0, 1):
            raise ValueError(f"buffer_slot must be 0 or 1, got {buffer_slot}")
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.reduce_results = reduce_results
        self.buffer_slot = buffer_slot
        self.all_reduce: AllReduce = process_group_all_reduce
        self.input_size_per_partition = divide(input_size, tp_size, "input_size")
        self.weight = _param((output_size, self.input_size_per_partition), params_dtype)
        self.bias = _param((output_size,), params_dtype) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is not None:
            raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__}")
        if param.dim() == 1:  # the bias is replicated
            default_weight_loader(param, loaded_weight)
            return
        _check_shape(loaded_weight, (self.output_size, self.input_size))
        n = self.input_size_per_partition
        param.data.copy_(loaded_weight.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only rank 0 adds the bias, so the cross-rank sum contains it exactly once.
        bias = self.bias if self.tp_rank == 0 else None
        if self.tp_size == 1:
            return linear(x, self.weight, bias)
        if self.reduce_results:
            return self.all_reduce(linear(x, self.weight, bias))
        out = None if x.dim() != 2 else self.all_reduce.partials_buffer(x.shape[0], self.output_size, x.dtype,
                                                                          self.buffer_slot)
        if out is None:
            return linear(x, self.weight, bias)
        # The same GEMM as F.linear, its result written straight into the buffer.
        if bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(bias, x, self.weight.t(), out=out)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size_per_partition}/{self.input_size}, out={self.output_size}, "
            f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows: rank ``r`` holds ids
    ``[r * ceil(V / tp), (r + 1) * ceil(V / tp))`` (the last shard zero-padded)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        reduce_results: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_tp(tp_rank, tp_size)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.reduce_results = reduce_results
        self.all_reduce: AllReduce = process_group_all_reduce
        self.num_embeddings_per_partition = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = _param((self.num_embeddings_per_partition, embedding_dim), params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is not None:
            raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__}")
        _check_shape(loaded_weight, (self.num_embeddings, self.embedding_dim))
        n = max(0, self.vocab_end - self.vocab_start)
        param.data[:n].copy_(loaded_weight[self.vocab_start : self.vocab_start + n])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start) * in_shard
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(~in_shard.unsqueeze(-1), 0)
        return self.all_reduce(out) if self.reduce_results else out

    def extra_repr(self) -> str:
        return (
            f"vocab={self.num_embeddings_per_partition}/{self.num_embeddings}, dim={self.embedding_dim}, "
            f"tp={self.tp_rank}/{self.tp_size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded like the embedding (so it can share its weight)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        gather_output: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, tp_rank=tp_rank, tp_size=tp_size, params_dtype=params_dtype)
        self.gather_output = gather_output

    def forward(self, hidden: torch.Tensor, gather: bool | None = None) -> torch.Tensor:
        """``hidden [n, dim]`` -> logits ``[n, vocab]``, or this rank's padded slice
        ``[n, vocab / tp]`` when not gathering (``gather`` None: ``gather_output``)."""
        logits = linear(hidden, self.weight)
        return self.gather(logits) if (self.gather_output if gather is None else gather) else logits

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's slice ``[n, vocab / tp]`` -> the full logits ``[n, vocab]`` (collective)."""
        if self.tp_size == 1:
            return logits
        return _all_gather_last_dim(logits, self.tp_size)[..., : self.num_embeddings]

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """The argmax over the whole vocabulary, int64 ``[n]``, from every rank's slice ``[n, vocab / tp]``
        (collective), exchanging two numbers per row instead of the logits: each rank takes its
        slice's first maximum, then every rank picks the first rank holding the largest.  The
        same index as ``gather(logits).argmax(-1)``: the first maximum, NaN counting as largest.
        """
        if self.tp_size == 1:
            return logits.argmax(dim=-1)
        valid = self.vocab_end - self.vocab_start  # the last slice's tail pads the vocabulary
        n = logits.shape[0]
        if valid > 0:
            idx = logits[:, :valid].argmax(dim=-1)
            val = logits.gather(1, idx[:, None]).squeeze(1).float()
        else:
            idx = torch.zeros(n, dtype=torch.long, device=logits.device)
            val = torch.full((n,), float("-inf"), device=logits.device)
        # ids as fp32 are exact below 2^24 (vocabularies are far smaller).
        mine = torch.stack([val, (idx + self.vocab_start).float()], dim=-1)  # [n, 2]
        parts = _all_gather_last_dim(mine, self.tp_size).view(n, self.tp_size, 2)
        best = parts[..., 0].argmax(dim=-1, keepdim=True)  # [n, 1]: ties -> the lower rank (lower ids)
        return parts[..., 1].gather(1, best).squeeze(1).long()
