"""Linear layers laid out for tensor parallelism (Megatron/vLLM style), and the CPU's GEMM layout.

Every layer takes ``tp_rank``/``tp_size`` and holds only its shard:

* :class:`ColumnParallelLinear` splits the output features (rows of ``weight``);
  :class:`MergedColumnParallelLinear` (gate/up) and :class:`QKVParallelLinear` (q/k/v) fuse
  several column-parallel projections into one matmul, each rank holding its slice of each part;
* :class:`RowParallelLinear` splits the input features; partial outputs are summed across ranks
  (the bias is added by rank 0 only, so the sum carries it once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import AllReduce, all_gather_last_dim, check_tp, divide, process_group_all_reduce
from .quantized import QuantizedWeight
from .weights import ShardId, check_shape, default_weight_loader, new_param


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


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; ``weight`` may be a oneDNN-packed CPU weight (see :func:`pack_linear_weights_for_cpu`)
    or a quantized one (:mod:`.quantized`)."""
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x, bias)
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
    from .vocab import ParallelLMHead  # the LM head computes through linear() too (and imports this module)

    if not _CPU_ONEDNN:
        return 0
    packed = 0
    for module in model.modules():
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear | ParallelLMHead):
            continue
        w = module.weight
        if not isinstance(w, torch.Tensor) or w.device.type != "cpu" or w.dtype not in _ONEDNN_DTYPES or w.is_mkldnn:
            continue
        module.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(w.detach()), requires_grad=False)
        packed += 1
    return packed


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
        check_tp(tp_rank, tp_size)
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, tp_size, "output_size")
        self.weight = new_param((self.output_size_per_partition, input_size), params_dtype)
        self.bias = new_param((self.output_size_per_partition,), params_dtype) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is not None:
            raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__}")
        check_shape(loaded_weight, (self.output_size, *param.shape[1:]))
        n = self.output_size_per_partition
        param.data.copy_(loaded_weight.narrow(0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.gather_output and self.tp_size > 1:
            y = all_gather_last_dim(y, self.tp_size)
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
            check_shape(loaded_weight, (sum(sizes), *param.shape[1:]))
            for sid, part in zip(self._shard_ids(), loaded_weight.split(sizes, dim=0), strict=True):
                self.weight_loader(param, part, sid)
            return
        if shard_id not in self._shard_ids():
            raise ValueError(
                f"unknown shard_id {shard_id!r} for {type(self).__name__}; expected one of {list(self._shard_ids())}"
            )
        full, offset, local, src = self._layout(shard_id)
        check_shape(loaded_weight, (full, *param.shape[1:]))
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
        check_tp(tp_rank, tp_size)
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
    (:meth:`AllReduce.partials_buffer`) for whoever reduces them later.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        reduce_results: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.reduce_results = reduce_results
        self.all_reduce: AllReduce = process_group_all_reduce
        self.input_size_per_partition = divide(input_size, tp_size, "input_size")
        self.weight = new_param((output_size, self.input_size_per_partition), params_dtype)
        self.bias = new_param((output_size,), params_dtype) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is not None:
            raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__}")
        if param.dim() == 1:  # the bias is replicated
            default_weight_loader(param, loaded_weight)
            return
        check_shape(loaded_weight, (self.output_size, self.input_size))
        n = self.input_size_per_partition
        param.data.copy_(loaded_weight.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only rank 0 adds the bias, so the cross-rank sum contains it exactly once.
        bias = self.bias if self.tp_rank == 0 else None
        if self.tp_size == 1:
            return linear(x, self.weight, bias)
        if self.reduce_results:
            return self.all_reduce(linear(x, self.weight, bias))
        out = None if x.dim() != 2 else self.all_reduce.partials_buffer(x.shape[0], self.output_size, x.dtype)
        if out is None:
            return linear(x, self.weight, bias)
        if isinstance(self.weight, QuantizedWeight):  # its kernel has no out=: copy the partial sums there
            return out.copy_(self.weight.linear(x, bias))
        # The same GEMM as F.linear, its result written straight into the buffer.
        if bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(bias, x, self.weight.t(), out=out)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size_per_partition}/{self.input_size}, out={self.output_size}, "
            f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}"
        )
