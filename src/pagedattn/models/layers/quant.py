"""Int4 weight-only (W4A16) twins of the tensor-parallel linear layers.

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

from collections.abc import Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

from ...kernels import w4a16
from .. import quant_formats
from ..quant_config import QuantConfig
from ..quant_formats import QUANT_SUFFIXES, SYMMETRIC_ZERO, group_index, pack_rows, to_internal, unpack_rows
from .linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    _FusedColumnParallelLinear,
)
from .parallel import Shard, all_gather_last_dim
from .weights import ShardId, check_shape, default_weight_loader, new_param


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

    def _int4_matmul(self, x: torch.Tensor, bias: torch.Tensor | None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        m = cast(Any, self)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        args = (m.qweight, m.scales, m.zeros, self.group_size, m.g_idx, bias, self.zero_point)
        if x2.is_cuda or self.cpu_kernels:
            y = w4a16.w4a16_linear(x2, *args, out=out)
        else:
            y = w4a16.w4a16_linear_ref(x2, *args)
            y = out.copy_(y) if out is not None else y
        return y.view(*lead, y.shape[-1])

    @property
    def is_dense(self) -> bool:
        """Dequantized at load (the CPU): the dense layer's forward serves."""
        return cast(Any, self).qweight is None


class QuantColumnParallelLinear(QuantLinear, ColumnParallelLinear):
    """:class:`ColumnParallelLinear` over an int4 weight (and the base of the fused twins)."""

    def __init__(self, *args: Any, quant: QuantConfig, **kw: Any) -> None:
        device = torch.get_default_device()
        with torch.device("meta"):
            super().__init__(*args, **kw)
        self.params_dtype = kw.get("params_dtype") or torch.get_default_dtype()
        self.group_size = quant.group_size_for(self.input_size)
        del self.weight
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_dense:
            return super().forward(x)
        y = self._int4_matmul(x, self.bias)
        if self.gather_output and self.tp_size > 1:
            y = all_gather_last_dim(y, self.tp_size)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int4 {self.quant.method} group_size={self.quant.group_size}"


class QuantMergedColumnParallelLinear(QuantColumnParallelLinear, MergedColumnParallelLinear):
    """:class:`MergedColumnParallelLinear` (gate/up) over an int4 weight."""


class QuantQKVParallelLinear(QuantColumnParallelLinear, QKVParallelLinear):
    """:class:`QKVParallelLinear` over an int4 weight."""


class QuantRowParallelLinear(QuantLinear, RowParallelLinear):
    """:class:`RowParallelLinear` over an int4 weight: this rank's input features in whole
    groups (all groups with act-order)."""

    def __init__(self, *args: Any, quant: QuantConfig, **kw: Any) -> None:
        device = torch.get_default_device()
        with torch.device("meta"):
            super().__init__(*args, **kw)
        self.params_dtype = kw.get("params_dtype") or torch.get_default_dtype()
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
        del self.weight
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

    @property
    def _holds_all_groups(self) -> bool:
        return self.keep_all_groups or self.quant.group_size == -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_dense:
            return super().forward(x)
        bias = self.bias if self.tp_rank == 0 else None  # the cross-rank sum carries it once
        if self.tp_size == 1:
            return self._int4_matmul(x, bias)
        if self.reduce_results:
            return self.all_reduce(self._int4_matmul(x, bias))
        out = None if x.dim() != 2 else self.all_reduce.partials_buffer(x.shape[0], self.output_size, x.dtype)
        return self._int4_matmul(x, bias, out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int4 {self.quant.method} group_size={self.quant.group_size}"


_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    ColumnParallelLinear: QuantColumnParallelLinear,
    MergedColumnParallelLinear: QuantMergedColumnParallelLinear,
    QKVParallelLinear: QuantQKVParallelLinear,
    RowParallelLinear: QuantRowParallelLinear,
}


def parallel_linear(cls: type[Any], shard: Shard, *args: Any, **kw: Any) -> Any:
    """``cls(*args, **kw)`` on ``shard``, or its int4 twin when the shard's weights are quantized."""
    if shard.quant is None:
        return cls(*args, **kw, **shard.kw)
    return _TWINS[cls](*args, quant=shard.quant, **kw, **shard.kw)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear)


def finish_loading(model: nn.Module) -> int:
    """Give every int4 layer of ``model`` its runtime form (see the module docstring); returns
    how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and not m.is_dense]
    for layer in layers:
        layer.finish_loading()
    return len(layers)


def checkpoint_to_internal(weights: Iterable[tuple[str, torch.Tensor]],
                           quant: QuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's tensors with those of its quantized layers in the internal layout
    (``X.qzeros`` becomes ``X.zeros``); everything else passes through."""
    for name, tensor in weights:
        prefix, _, kind = name.rpartition(".")
        if kind in QUANT_SUFFIXES:
            try:
                converted = to_internal(quant, kind, tensor)
            except ValueError as e:
                raise ValueError(f"cannot load {name!r}: {e}") from None
            yield from ((f"{prefix}.{new_kind}", t) for new_kind, t in converted)
        else:
            yield name, tensor
