"""Int4 weight-only (W4A16) and FP8 (W8A8, :class:`Fp8Linear`) twins of the tensor-parallel linear layers.

Each twin is its dense layer (same sizes, sharding rules, fused parts and forward contract)
holding, instead of ``weight``, the internal int4 layout of :mod:`..quant_formats`:
``qweight`` int32 ``[K/8, N]``, ``scales`` and ``zeros`` ``[groups, N]``, and for GPTQ
``g_idx [K]``.  The loader converts every checkpoint format into that layout first
(:func:`checkpoint_to_internal`), so the weight loaders here only shard:

* column-parallel (q/k/v, gate/up): this rank's output features of every tensor; the input
  features and their ``g_idx`` stay whole;
* row-parallel (o_proj, down_proj): this rank's input features, in whole groups (a group split
  between ranks is refused), except with act-order (``desc_act``), where a shard's rows belong
  to any group: every rank keeps all scale/zero groups and its rows' ``g_idx``, as vLLM does.

After the last tensor, :func:`finish_loading` gives each layer its runtime form: on the CPU the
weight is dequantized once into the dense ``weight`` (the CPU then runs the dense layer, oneDNN
packing included); elsewhere act-order rows are sorted by group (the input is permuted the
same way at run time, ``perm``), a ``g_idx`` that is then ``k // group_size`` is dropped, and
zero points that are all 8 (symmetric checkpoints) become a constant.  The GEMMs are the Triton
kernels of :mod:`pagedattn.kernels.w4a16`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

from ...kernels import fp8, w4a16
from .. import quant_formats
from ..quant_config import QuantConfig
from ..quant_formats import (
    FP8_SUFFIXES,
    QUANT_SUFFIXES,
    SYMMETRIC_ZERO,
    group_index,
    pack_rows,
    to_internal,
    unpack_rows,
)
from .linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    _FusedColumnParallelLinear,
)
from .parallel import Shard, all_gather_last_dim
from .weights import ShardId, check_shape, default_weight_loader, new_param


def _dense_skeleton(layer: nn.Module, init: Callable[..., None], args: tuple[Any, ...],
                    kw: dict[str, Any]) -> torch.device:
    """Run the dense layer's ``init`` on the meta device (its sharding arithmetic, no weight
    memory), record the params dtype and drop the dense weight, which the quantized twin replaces;
    returns the device the twin's own parameters go on."""
    device = torch.get_default_device()
    with torch.device("meta"):
        init(*args, **kw)
    cast(Any, layer).params_dtype = kw.get("params_dtype") or torch.get_default_dtype()
    del layer.weight
    return device


# ---------------------------------------------------------------------- the forwards
class QuantColumnForward:
    """The column-parallel forward of a quantized twin (int4 or FP8): its ``_quant_matmul``, the
    output gathered across ranks when asked; the dense forward once dequantized at load."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = cast(Any, self)
        if m.is_dense:
            return cast(torch.Tensor, super().forward(x))  # type: ignore[misc]
        y = m._quant_matmul(x, m.bias)
        if m.gather_output and m.tp_size > 1:
            y = all_gather_last_dim(y, m.tp_size)
        return cast(torch.Tensor, y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {cast(Any, self)._quant_repr()}"  # type: ignore[misc]


class QuantRowForward:
    """The row-parallel forward of a quantized twin: the bias on rank 0 only, the partial sums
    reduced across ranks (or written into the all-reduce's buffer for a later reduction)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = cast(Any, self)
        if m.is_dense:
            return cast(torch.Tensor, super().forward(x))  # type: ignore[misc]
        return self._row_forward(x)

    def _row_forward(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        m = cast(Any, self)
        bias = m.bias if m.tp_rank == 0 else None  # the cross-rank sum carries it once
        if m.tp_size == 1:
            return cast(torch.Tensor, m._quant_matmul(x, bias, **kw))
        if m.reduce_results:
            return cast(torch.Tensor, m.all_reduce(m._quant_matmul(x, bias, **kw)))
        out = None if x.dim() != 2 else m.all_reduce.partials_buffer(x.shape[0], m.output_size, x.dtype)
        return cast(torch.Tensor, m._quant_matmul(x, bias, out, **kw))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {cast(Any, self)._quant_repr()}"  # type: ignore[misc]


class QuantLinear:
    """What the int4 twins share: the packed parameters, their runtime form and the GEMM.

    Mixed in before the dense class: ``__init__`` builds the dense layer on the meta device
    (its sizes and checks, no memory), then allocates the packed tensors where the model lives."""

    quant: QuantConfig
    in_local: int  # input features of this rank
    group_size: int  # input features per group, as this rank's rows see them
    perm: torch.Tensor | None  # act-order: the input permutation the sorted rows expect
    params_dtype: torch.dtype  # the dense layer's dtype (of the bias, and of the CPU's weight)
    zero_point: float
    # Packed weights on the CPU run the torch reference, unless this is set: the Triton kernels
    # on CPU tensors, which only the Triton interpreter can run (tests).
    cpu_kernels: bool = False
    bias: nn.Parameter | None
    tp_rank: int
    tp_size: int

    def _make_packed(self, quant: QuantConfig, in_local: int, n_local: int, groups: int, g_idx_len: int,
                     params_dtype: torch.dtype | None) -> None:
        if in_local % 32:
            raise ValueError(f"int4 layers need input features in multiples of 32, got {in_local}")
        m = cast(Any, self)
        self.quant, self.in_local = quant, in_local
        self.zero_point = float(SYMMETRIC_ZERO)
        m.register_buffer("perm", None, persistent=False)
        m.qweight = new_param((in_local // 8, n_local), torch.int32)
        m.scales = new_param((groups, n_local), quant.scale_dtype)
        m.zeros = new_param((groups, n_local), quant.scale_dtype)
        m.g_idx = new_param((g_idx_len,), torch.int32) if quant.has_g_idx else None
        if self.bias is not None:
            m.bias = new_param(tuple(self.bias.shape), params_dtype)

    # ------------------------------------------------------------------ runtime form
    def finish_loading(self, dequantize: bool | None = None) -> None:
        """The runtime form, once every tensor is loaded (see the module docstring): dense
        (``dequantize``; default: on the CPU) or packed."""
        m = cast(Any, self)
        g = self._nontrivial_g_idx()
        if dequantize is None:
            dequantize = m.qweight.device.type == "cpu"
        if dequantize:
            w = quant_formats.dequantize(m.qweight, m.scales, m.zeros, g, self.group_size)  # [K, N]
            dtype = self.params_dtype
            for name in ("qweight", "scales", "zeros", "g_idx"):
                setattr(m, name, None)
            m.weight = nn.Parameter(self._dense_weight(w.to(dtype)), requires_grad=False)
            return
        if g is not None:  # act-order: rows sorted by group, the input permuted to match
            perm = torch.argsort(g, stable=True)
            m.qweight = nn.Parameter(pack_rows(unpack_rows(m.qweight)[perm]), requires_grad=False)
            g = g[perm].contiguous()
            m.perm = perm
            if m.scales.shape[0] * self.group_size == self.in_local and torch.equal(g, self._trivial_g_idx()):
                g = None
        m.g_idx = None if g is None else nn.Parameter(g, requires_grad=False)
        if bool((m.zeros == SYMMETRIC_ZERO).all()):
            m.zeros = None  # a constant zero point: one load less per tile

    def _trivial_g_idx(self) -> torch.Tensor:
        return group_index(self.in_local, self.group_size, cast(Any, self).qweight.device)

    def _nontrivial_g_idx(self) -> torch.Tensor | None:
        g = cast(Any, self).g_idx
        if g is None or torch.equal(g.data, self._trivial_g_idx()):
            return None
        groups = cast(Any, self).scales.shape[0]
        if int(g.min()) < 0 or int(g.max()) >= groups:
            raise ValueError(f"g_idx holds groups outside 0..{groups - 1}")
        return g.data

    def _dense_weight(self, w_t: torch.Tensor) -> torch.Tensor:
        """``[K, N]`` -> the dense layer's ``weight [N, K]``."""
        return w_t.t().contiguous()

    def _quant_matmul(self, x: torch.Tensor, bias: torch.Tensor | None,
                      out: torch.Tensor | None = None, silu_gated: bool = False) -> torch.Tensor:
        m = cast(Any, self)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        args = (m.qweight, m.scales, m.zeros, self.group_size, m.g_idx, bias, self.zero_point)
        if silu_gated or x2.is_cuda or self.cpu_kernels:
            y = w4a16.w4a16_linear(x2, *args, out=out, silu_gated=silu_gated)
        else:
            y = w4a16.w4a16_linear_ref(x2, *args)
            y = out.copy_(y) if out is not None else y
        return y.view(*lead, y.shape[-1])

    @property
    def is_dense(self) -> bool:
        """Dequantized at load (the CPU): the dense layer's forward serves."""
        return cast(Any, self).qweight is None

    def _quant_repr(self) -> str:
        return f"int4 {self.quant.method} group_size={self.quant.group_size}"


class QuantColumnParallelLinear(QuantLinear, QuantColumnForward, ColumnParallelLinear):
    """:class:`ColumnParallelLinear` over an int4 weight (and the base of the fused twins)."""

    def __init__(self, *args: Any, quant: QuantConfig, **kw: Any) -> None:
        device = _dense_skeleton(self, super().__init__, args, kw)
        self.group_size = quant.group_size_for(self.input_size)
        self._g_idx_parts: set[ShardId] = set()
        with torch.device(device):
            self._make_packed(quant, self.input_size, self.output_size_per_partition, quant.groups(self.input_size),
                              self.input_size, self.params_dtype)

    def _part(self, shard_id: ShardId) -> tuple[int, int, int, int]:
        """``(full, param_offset, local, src_offset)`` of a part along the output features."""
        if isinstance(self, _FusedColumnParallelLinear):
            return self._layout(shard_id)
        if shard_id is not None:
            raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__}")
        n = self.output_size_per_partition
        return self.output_size, 0, n, self.tp_rank * n

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if param is self.bias:
            super().weight_loader(param, loaded_weight, shard_id)
            return
        if param is self.g_idx:  # every part has the same input features: one g_idx for all
            self._load_g_idx(param, loaded_weight, shard_id)
            return
        if shard_id is None and isinstance(self, _FusedColumnParallelLinear):
            sizes = self._full_sizes()  # an already-fused checkpoint tensor
            check_shape(loaded_weight, (param.shape[0], sum(sizes)))
            for sid, part in zip(self._shard_ids(), loaded_weight.split(sizes, dim=1), strict=True):
                self.weight_loader(param, part, sid)
            return
        full, offset, local, src = self._part(shard_id)
        check_shape(loaded_weight, (param.shape[0], full))
        param.data.narrow(1, offset, local).copy_(loaded_weight.narrow(1, src, local))

    def _load_g_idx(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> None:
        check_shape(loaded, param.shape)
        if not self._g_idx_parts:  # whichever part comes first (checkpoints list them in any order)
            param.data.copy_(loaded)
        elif not torch.equal(param.data, loaded.to(param.device, param.dtype)):
            raise ValueError(f"g_idx of part {shard_id!r} differs from the other parts' (a fused layer needs one "
                             "input order)")
        self._g_idx_parts.add(shard_id)



class QuantMergedColumnParallelLinear(QuantColumnParallelLinear, MergedColumnParallelLinear):
    """:class:`MergedColumnParallelLinear` (gate/up) over an int4 weight."""


class QuantQKVParallelLinear(QuantColumnParallelLinear, QKVParallelLinear):
    """:class:`QKVParallelLinear` over an int4 weight."""


class QuantRowParallelLinear(QuantLinear, QuantRowForward, RowParallelLinear):
    """:class:`RowParallelLinear` over an int4 weight: this rank's input features in whole
    groups (all groups with act-order)."""

    def __init__(self, *args: Any, quant: QuantConfig, **kw: Any) -> None:
        device = _dense_skeleton(self, super().__init__, args, kw)
        k_full, k_local = self.input_size, self.input_size_per_partition
        gs = quant.group_size_for(k_full)
        groups = quant.groups(k_full)
        self.keep_all_groups = quant.desc_act and self.tp_size > 1
        if quant.group_size == -1:  # one group over all inputs: every rank keeps it
            gs, groups = k_local, 1
        elif not self.keep_all_groups:
            if k_local % gs:
                raise ValueError(f"group_size {gs} does not divide this rank's {k_local} input features "
                                 f"({k_full} over tp_size {self.tp_size}); use a smaller tp_size")
            groups = k_local // gs
        self.group_size = gs
        with torch.device(device):
            self._make_packed(quant, k_local, self.output_size, groups, k_local, self.params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is not None:
            raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__}")
        if param is self.bias:
            default_weight_loader(param, loaded_weight)
            return
        k_full, k_local, r = self.input_size, self.input_size_per_partition, self.tp_rank
        if param is self.qweight:
            check_shape(loaded_weight, (k_full // 8, self.output_size))
            param.data.copy_(loaded_weight.narrow(0, r * k_local // 8, k_local // 8))
        elif param is self.g_idx:
            check_shape(loaded_weight, (k_full,))
            # This rank's groups are numbered from 0 where it holds only its own.
            first_group = 0 if self._holds_all_groups else r * (k_local // self.group_size)
            param.data.copy_(loaded_weight.narrow(0, r * k_local, k_local) - first_group)
        else:  # scales, zeros
            groups = param.shape[0]
            full = self.quant.groups(k_full)
            check_shape(loaded_weight, (full, self.output_size))
            start = 0 if self._holds_all_groups else r * groups
            param.data.copy_(loaded_weight.narrow(0, start, groups))

    def takes_silu_input(self, h: torch.Tensor) -> bool:
        """Whether :meth:`forward_silu` serves ``h``: one row through the GEMV kernel, whose
        activations need no permutation (no act-order) or group index."""
        return (not self.is_dense and self.perm is None and self.g_idx is None
                and (h.is_cuda or self.cpu_kernels) and h.numel() == h.shape[-1] == 2 * self.in_local)

    def forward_silu(self, h: torch.Tensor) -> torch.Tensor:
        """``forward(silu(gate) * up)`` of a gated MLP's ``[..., 2K]`` halves, the activation
        computed as the GEMV loads it (no kernel of its own; the same bits in bf16): see
        :meth:`takes_silu_input`."""
        return self._row_forward(h, silu_gated=True)

    @property
    def _holds_all_groups(self) -> bool:
        return self.keep_all_groups or self.quant.group_size == -1



# ---------------------------------------------------------------------- FP8 (W8A8)
class Fp8Linear:
    """What the FP8 twins share: ``weight`` in float8_e4m3fn (the dense layer's shape and
    sharding), ``weight_scale`` float32 ``[N, G]`` (see :mod:`..quant_formats`), their runtime
    form and the GEMM.

    Runtime forms (:meth:`finish_loading`): on the CPU and on CUDA before compute capability
    8.9 the weight is dequantized once into the dense ``weight`` in the model's dtype; otherwise
    it stays FP8.  Per-row and per-tensor scales then run the W8A8 form
    (:func:`pagedattn.kernels.fp8.fp8_linear`: activations quantized per token, ``torch._scaled_mm``
    on the FP8 tensor cores), except a single row on CUDA (a batch-1 decode step), which reads the
    weight faster through the Triton GEMV that dequantizes it in registers (W8A16; per-row
    scales as one block of every input feature): :meth:`uses_w8a8` says which.  Block scales
    always run the Triton GEMM (W8A16), as ``_scaled_mm`` takes no block scales."""

    quant: QuantConfig
    params_dtype: torch.dtype
    group_size: int  # input features per scale column
    # On the CPU the activations' quantization and the block-scaled GEMM run in torch ops, unless
    # this is set: the Triton kernels on CPU tensors, which only the Triton interpreter can run (tests).
    cpu_kernels: bool = False
    in_local: int
    bias: nn.Parameter | None
    tp_rank: int
    tp_size: int

    def _make_fp8(self, quant: QuantConfig, n_local: int, in_local: int, in_full: int) -> None:
        m = cast(Any, self)
        groups, gs = quant_formats.fp8_groups(quant, in_full)
        if quant.block_size is not None and in_local != in_full:
            if in_local % gs:
                raise ValueError(f"FP8 block size {gs} does not divide this rank's {in_local} input features "
                                 f"({in_full} over tp_size {self.tp_size}); use a smaller tp_size")
            groups = in_local // gs
        self.quant, self.in_local, self.group_size = quant, in_local, gs
        m.weight = new_param((n_local, in_local), fp8.FP8_DTYPE)
        m.weight_scale = new_param((n_local, groups), torch.float32)
        if self.bias is not None:
            m.bias = new_param(tuple(self.bias.shape), self.params_dtype)

    def _scale_rows(self, loaded: torch.Tensor, rows: int) -> torch.Tensor:
        """A checkpoint scale of ``rows`` output features as ``[rows, G_full]`` float32."""
        return quant_formats.fp8_scale_rows(self.quant, loaded.float(), rows, cast(Any, self).input_size)

    def _check_fp8(self, loaded: torch.Tensor) -> None:
        if loaded.dtype != fp8.FP8_DTYPE:
            raise ValueError(f"an FP8 weight must be float8_e4m3fn, got {loaded.dtype}")

    # ------------------------------------------------------------------ runtime form
    def finish_loading(self, dequantize: bool | None = None) -> None:
        """The runtime form (see the class docstring): dense (``dequantize``; default: where the
        device has no FP8 GEMM) or FP8."""
        m = cast(Any, self)
        w = m.weight
        if dequantize is None:
            dequantize = not fp8.fp8_gemm_supported(w.device)
        if dequantize:
            dense = fp8.dequantize(w.data, m.weight_scale.data, self.group_size, self.params_dtype)
            m.weight_scale = None
            m.weight = nn.Parameter(dense, requires_grad=False)

    @property
    def is_dense(self) -> bool:
        """Dequantized at load: the dense layer's forward serves."""
        return cast(Any, self).weight_scale is None

    def uses_w8a8(self, x2: torch.Tensor) -> bool:
        """Whether the rows ``x2 [M, K]`` go through the W8A8 form (see the class docstring)."""
        return self.quant.block_size is None and (not x2.is_cuda or x2.shape[0] > fp8.GEMV_MAX_ROWS)

    def _quant_matmul(self, x: torch.Tensor, bias: torch.Tensor | None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        m = cast(Any, self)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        scale = m.weight_scale
        use_triton = x2.is_cuda or self.cpu_kernels
        if self.uses_w8a8(x2):
            y = fp8.fp8_linear(x2, m.weight, scale.t().contiguous(), bias, self.quant.act_amax_ub, use_triton)
        else:  # per-row scales are one block of all the input features
            group = self.group_size if self.quant.block_size is not None else fp8.row_group(x2.shape[-1])
            y = fp8.fp8_block_linear(x2, m.weight, scale, group, bias, use_triton=use_triton)
        if out is not None:
            y = out.copy_(y)
        return y.view(*lead, y.shape[-1])

    def _quant_repr(self) -> str:
        return f"fp8 {self.quant.method} {self.quant.fp8_strategy} scales"


class Fp8ColumnParallelLinear(Fp8Linear, QuantColumnForward, ColumnParallelLinear):
    """:class:`ColumnParallelLinear` over an FP8 weight (and the base of the fused twins):
    weight and scale rows sharded alike."""

    def __init__(self, *args: Any, quant: QuantConfig, **kw: Any) -> None:
        device = _dense_skeleton(self, super().__init__, args, kw)
        with torch.device(device):
            self._make_fp8(quant, self.output_size_per_partition, self.input_size, self.input_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if param is self.weight:
            self._check_fp8(loaded_weight)
        elif param is self.weight_scale:
            self._load_scale(param, loaded_weight, shard_id)
            return
        super().weight_loader(param, loaded_weight, shard_id)

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> None:
        """Scales become rows first (one part's, or every part's of an already-fused tensor),
        then shard as the weight's rows do."""
        if not isinstance(self, _FusedColumnParallelLinear):
            ColumnParallelLinear.weight_loader(self, param, self._scale_rows(loaded, self.output_size), shard_id)
            return
        if shard_id is not None:
            part = self._scale_rows(loaded, self._layout(shard_id)[0])
            _FusedColumnParallelLinear.weight_loader(self, param, part, shard_id)
            return
        sizes = self._full_sizes()  # an already-fused checkpoint tensor: its rows, then its parts
        scale = self._scale_rows(loaded, sum(sizes))
        for sid, part in zip(self._shard_ids(), scale.split(sizes, dim=0), strict=True):
            _FusedColumnParallelLinear.weight_loader(self, param, part, sid)



class Fp8MergedColumnParallelLinear(Fp8ColumnParallelLinear, MergedColumnParallelLinear):
    """:class:`MergedColumnParallelLinear` (gate/up) over an FP8 weight."""


class Fp8QKVParallelLinear(Fp8ColumnParallelLinear, QKVParallelLinear):
    """:class:`QKVParallelLinear` over an FP8 weight."""


class Fp8RowParallelLinear(Fp8Linear, QuantRowForward, RowParallelLinear):
    """:class:`RowParallelLinear` over an FP8 weight: this rank's input features, every output
    row's scales (block scales: this rank's blocks of input features)."""

    def __init__(self, *args: Any, quant: QuantConfig, **kw: Any) -> None:
        device = _dense_skeleton(self, super().__init__, args, kw)
        with torch.device(device):
            self._make_fp8(quant, self.output_size, self.input_size_per_partition, self.input_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if param is self.weight_scale:
            if shard_id is not None:
                raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__}")
            scale = self._scale_rows(loaded_weight, self.output_size)
            groups = param.shape[1]
            start = 0 if scale.shape[1] == 1 else self.tp_rank * groups
            param.data.copy_(scale.narrow(1, start, groups))
            return
        if param is self.weight:
            self._check_fp8(loaded_weight)
        super().weight_loader(param, loaded_weight, shard_id)



_FP8_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    ColumnParallelLinear: Fp8ColumnParallelLinear,
    MergedColumnParallelLinear: Fp8MergedColumnParallelLinear,
    QKVParallelLinear: Fp8QKVParallelLinear,
    RowParallelLinear: Fp8RowParallelLinear,
}

_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    ColumnParallelLinear: QuantColumnParallelLinear,
    MergedColumnParallelLinear: QuantMergedColumnParallelLinear,
    QKVParallelLinear: QuantQKVParallelLinear,
    RowParallelLinear: QuantRowParallelLinear,
}


def parallel_linear(cls: type[Any], shard: Shard, *args: Any, **kw: Any) -> Any:
    """``cls(*args, **kw)`` on ``shard``, or its int4 or FP8 twin when the shard's weights are quantized."""
    if shard.quant is None:
        return cls(*args, **kw, **shard.kw)
    twins = _FP8_TWINS if shard.quant.is_fp8 else _TWINS
    return twins[cls](*args, quant=shard.quant, **kw, **shard.kw)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear | Fp8Linear)


def finish_loading(model: nn.Module) -> int:
    """Give every int4 and FP8 layer of ``model`` its runtime form (see the module docstring and
    :class:`Fp8Linear`); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear | Fp8Linear) and not m.is_dense]
    for layer in layers:
        layer.finish_loading()
    return len(layers)


def checkpoint_to_internal(weights: Iterable[tuple[str, torch.Tensor]],
                           quant: QuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's tensors with those of its quantized layers in the internal layout
    (``X.qzeros`` becomes ``X.zeros``, ``X.weight_scale_inv`` ``X.weight_scale``); everything
    else passes through."""
    suffixes = FP8_SUFFIXES if quant.is_fp8 else QUANT_SUFFIXES
    for name, tensor in weights:
        prefix, _, kind = name.rpartition(".")
        if kind in suffixes:
            try:
                converted = to_internal(quant, kind, tensor)
            except ValueError as e:
                raise ValueError(f"cannot load {name!r}: {e}") from None
            yield from ((f"{prefix}.{new_kind}", t) for new_kind, t in converted)
        else:
            yield name, tensor
