"""The GPU attention backend: Triton kernels for KV store, paged decode and paged extend.

``attend`` runs the decode kernel on the leading ``meta.num_decodes`` sequences (one new token
each) and the extend kernel on the rest.  Launch sizes come from host-side values only, so a
step never synchronises with the device.

How the decode rows launch (split count, workspace, cascade inputs) is a :class:`DecodeLaunch`
in the metadata, decided once per step: for an eager step from its lengths and tables, for a
captured CUDA-graph step from its bucket and the prepared bounds alone.

Decode rows that share prefix blocks (prefix caching) go through cascade decode (see
``cascade.py``): the groups are found on the host from the step's block tables, their shared
prefix is attended once per group, and each row's own tail by the decode kernel.  Eager steps
plan from ``meta.block_tables_cpu``; captured steps read fixed device buffers that
``prepare_for_replay`` refills before every replay.  Sliding-window layers never use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from ..envs import switches
from ..transfer import upload
from . import triton_ops as ops
from .backend import AttentionBackend, AttentionLayerSpec, KVScales
from .cascade import (
    CascadeConfig,
    CascadePlan,
    PackedLayout,
    build_plan,
    max_work_items,
    pack_plan,
    plan_signature,
    plan_still_holds,
)
from .metadata import AttentionMetadata, BackendState, HostBatch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CACHE_DTYPES = (*_DTYPES, torch.float8_e4m3fn)  # fp8: e4m3 pages with per-layer scales
# Split heuristic's SM count where there is no CUDA device (the interpreter on a CPU).
_CPU_NUM_SMS = 4


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Hkv, D], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match "
                         f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}")
    if k_cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"k_cache dtype must be one of {_CACHE_DTYPES}, got {k_cache.dtype}")
    bs = k_cache.shape[1]
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"k_cache block_size must be a power of two, got {bs}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache must be contiguous in head_dim")


# Captured-step variants (see AttentionBackend's graph contract).
PLAIN_VARIANT, CASCADE_VARIANT = 0, 1

_Heads = tuple[int, int, int]  # (Hq, Hkv, D)


def _heads(layer: AttentionLayerSpec) -> _Heads:
    return layer.num_heads, layer.num_kv_heads, layer.head_dim


@dataclass(frozen=True)
class StepCascade:
    """A step's cascade-decode inputs on the device."""

    inputs: ops.CascadeInputs
    tail_context: int  # keys of the longest own tail: what the split count is chosen for
    tail_start: np.ndarray | None = None  # eager: the plan's first own key of each row (host)


@dataclass
class DecodeLaunch(BackendState):
    """How every layer launches a step's decode rows, decided on the host once per step: by
    ``prepare`` for an eager step (from its lengths), by ``prepare_for_capture`` for a captured
    one (from its bucket and the prepared bounds only, so a replay with any lengths that fit
    runs the kernels it captured)."""

    rows: int  # rows the split heuristic counts: the step's decodes, or the captured bucket
    context: int  # keys the longest decode row attends (captured: the prepared max_seq_len)
    max_splits: int  # split slots of the workspace (eager: the kernel's bound)
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None  # captured: the shared partials; eager: per launch
    # Captured cascade variant: its fixed buffers.  Eager: planned by the step's first layer
    # without a sliding window while ``unplanned`` (None when no group qualifies).
    cascade: StepCascade | None = None
    unplanned: bool = False
    heads: _Heads | None = None  # what the workspace or plan is sized for; eager: the first layer's
    # The order the decode rows' programs start in (ops.longest_first); captured: the graphs'
    # buffer, refilled before each replay; eager: made by the step's first decode launch.
    order: torch.Tensor | None = None

    def check_heads(self, layer: AttentionLayerSpec) -> None:
        if self.heads is None:
            self.heads = _heads(layer)
        elif self.heads != _heads(layer):
            raise ValueError(f"layer heads {_heads(layer)} (Hq, Hkv, D) differ from the {self.heads} "
                             "this step's metadata was prepared for")

    def splits(self, layer: AttentionLayerSpec, cascade: StepCascade | None, num_sms: int) -> int:
        """Split-KV count of ``layer``'s decode launch (with ``cascade``, for the own tails)."""
        ctx = cascade.tail_context if cascade is not None else self.context
        if layer.sliding_window is not None:
            ctx = min(ctx, layer.sliding_window)
        return min(ops.choose_num_splits(self.rows, layer.num_kv_heads, ctx, num_sms), self.max_splits)


@dataclass
class _Staged:
    """An int32 device buffer that captured graphs read, refilled before a replay from two pinned
    host buffers used in turn: the CPU fills one while the previous copy, from the other, may
    still be queued."""

    device: torch.Tensor
    staging: list[torch.Tensor]
    turn: int = 0

    @classmethod
    def of(cls, initial: torch.Tensor, device: torch.device) -> _Staged:
        """A buffer holding ``initial`` (a host int32 tensor) until the first refill."""
        pin = device.type == "cuda"
        return cls(initial.to(device), [initial.clone().pin_memory() if pin else initial.clone() for _ in range(2)])

    def refill(self, fill: Callable[[np.ndarray], object], size: int | None = None) -> None:
        """``fill`` writes the next contents into a host buffer (as numpy); its first ``size``
        elements (None: all) go to the device in one non-blocking copy."""
        host = self.staging[self.turn]
        self.turn ^= 1
        fill(host.numpy())
        end = host.shape[0] if size is None else size
        self.device[:end].copy_(host[:end], non_blocking=True)


@dataclass
class _GraphCascade:
    """Cascade buffers of captured decode steps: the packed plan the cascade variant of the
    graphs reads (``buffer``), refilled before a replay."""

    layout: PackedLayout
    buffer: _Staged  # [layout.size]
    inputs: ops.CascadeInputs  # views of ``buffer.device``
    gqa: int
    cfg: CascadeConfig
    # The active plan the device buffer holds and its signature (reused while it still holds:
    # see cascade.plan_still_holds).
    plan: CascadePlan | None = None
    signature: np.ndarray | None = None

    @classmethod
    def allocate(cls, max_batch_size: int, layer: AttentionLayerSpec, device: torch.device,
                 cfg: CascadeConfig) -> _GraphCascade:
        gqa = layer.num_heads // layer.num_kv_heads
        items = max_work_items(max_batch_size, gqa, layer.num_kv_heads, _num_sms(device), cfg)
        layout = PackedLayout(max_batch_size, items)
        buf = _Staged.of(torch.zeros(layout.size, dtype=torch.int32), device)  # zeros: no groups
        return cls(layout, buf, _cascade_inputs(buf.device, layout, cfg.max_chunks, cfg), gqa, cfg)

    def refill(self, batch: HostBatch) -> int:
        """Plan the step's shared-prefix groups; when some qualify, copy them into the device
        buffer (one non-blocking transfer, none while the previous plan still holds) and return
        the cascade variant, else the plain one (which reads none of these buffers)."""
        tables, lens, page = batch.block_tables, batch.seq_lens, batch.block_size
        if self.plan is not None and self.signature is not None and plan_still_holds(
                self.plan, self.signature, tables, lens):
            return CASCADE_VARIANT
        plan = build_plan(tables, lens, page, self.gqa, self.layout.items, self.cfg)
        self.plan, self.signature = None, None
        if not plan.active:
            return PLAIN_VARIANT
        self.buffer.refill(lambda host: pack_plan(plan, self.layout, host))
        self.plan, self.signature = plan, plan_signature(plan, tables, lens, page)
        return CASCADE_VARIANT


@dataclass(frozen=True)
class _GraphBuffers:
    """What every captured decode step shares (``init_cuda_graphs``)."""

    layer: AttentionLayerSpec
    max_batch: int
    max_seq_len: int
    block_size: int
    tail_slots: int  # workspace slots for the splits' partials
    workspace: tuple[torch.Tensor, torch.Tensor]
    cascade: _GraphCascade | None
    order: _Staged  # [max_batch]: the order decode rows start in (ops.longest_first)

    @property
    def variants(self) -> int:
        """With cascade on, two: the plain decode (replayed when no group qualifies, so steps
        without shared prefixes run exactly the kernels they ran without cascade) and cascade
        decode."""
        return 1 if self.cascade is None else 2


def _cascade_from_env() -> bool:
    """``PAGEDATTN_DISABLE_CASCADE=1`` turns cascade decode off (A/B benchmarks)."""
    return not switches().disable_cascade


def _window_context(max_seq_len: int, layer: AttentionLayerSpec) -> int:
    return min(max_seq_len, layer.sliding_window) if layer.sliding_window is not None else max_seq_len


class TritonBackend(AttentionBackend[DecodeLaunch]):
    """Paged attention through Triton kernels (CUDA, or the Triton interpreter for tests).

    ``cascade``: shared-prefix decode with the default thresholds (True, unless the environment
    sets ``PAGEDATTN_DISABLE_CASCADE=1``), with these (a ``CascadeConfig``), or off (False).
    """

    name = "triton"

    def __init__(self, cascade: bool | CascadeConfig | None = None) -> None:
        if cascade is not None and not isinstance(cascade, (bool, CascadeConfig)):
            raise ValueError(f"cascade must be a bool or a CascadeConfig, got {cascade!r}")
        if cascade is None:
            cascade = _cascade_from_env()
        self.cascade: CascadeConfig | None = (CascadeConfig() if cascade is True else cascade) or None
        self._graphs: _GraphBuffers | None = None

    # ------------------------------------------------------------------ store
    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scales: KVScales | None = None) -> None:
        _check_cache(k_cache, v_cache)
        t = meta.num_tokens
        want = (t, k_cache.shape[2], k_cache.shape[3])
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k/v must be [T, Hkv, D] = {want}, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            raise ValueError("k/v must be contiguous in head_dim")
        if meta.slot_mapping.dtype != torch.int64:
            raise ValueError(f"slot_mapping must be int64, got {meta.slot_mapping.dtype}")
        ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, *(scales or (None, None)))

    # ------------------------------------------------------------------ attend
    def prepare(self, meta: AttentionMetadata) -> DecodeLaunch:
        nd = meta.num_decodes
        return DecodeLaunch(self, rows=nd, context=max(meta.seq_lens_cpu[:nd], default=0),
                            max_splits=ops.decode.MAX_SPLITS,
                            unplanned=self.cascade is not None and meta.block_tables_cpu is not None)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, layer: AttentionLayerSpec, scales: KVScales | None = None) -> torch.Tensor:
        self._check_attend(q, k_cache, v_cache, meta, layer)
        launch = self.step_state(meta)
        launch.check_heads(layer)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        k_scale, v_scale = scales or (None, None)
        if nd:
            self._decode(q, k_cache, v_cache, meta, layer, launch, out, scales)
        if nd < meta.num_seqs:
            ops.extend_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                layer.scale, layer.sliding_window, out,
                seq_offset=nd, num_seqs=meta.num_seqs - nd, max_query_len=max(meta.query_lens_cpu[nd:]),
                softcap=layer.logit_softcap, k_scale=k_scale, v_scale=v_scale,
            )
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                layer: AttentionLayerSpec, launch: DecodeLaunch, out: torch.Tensor, scales: KVScales | None) -> None:
        nd = meta.num_decodes
        cascade = self._step_cascade(launch, meta, layer, q.device)
        if launch.order is None:
            launch.order = self._order_eager(meta, cascade, q.device)
        ops.decode_attention(
            q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
            layer.scale, layer.sliding_window, out[:nd], launch.splits(layer, cascade, _num_sms(q.device)),
            workspace=launch.workspace, cascade=None if cascade is None else cascade.inputs,
            softcap=layer.logit_softcap, k_scale=None if scales is None else scales.k,
            v_scale=None if scales is None else scales.v, order=launch.order,
        )

    def _order_eager(self, meta: AttentionMetadata, cascade: StepCascade | None,
                     device: torch.device) -> torch.Tensor:
        """An eager step's decode rows, longest first (grouped rows by their own tails: their
        prefix is the prefix kernel's)."""
        nd = meta.num_decodes
        keys = np.asarray(meta.seq_lens_cpu[:nd], dtype=np.int64)
        if cascade is not None and cascade.tail_start is not None:
            keys = keys - cascade.tail_start
        return upload(torch.from_numpy(ops.longest_first(keys)), device)

    def _step_cascade(self, launch: DecodeLaunch, meta: AttentionMetadata, layer: AttentionLayerSpec,
                      device: torch.device) -> StepCascade | None:
        """The step's cascade inputs for ``layer`` (None: plain decode); sliding-window layers
        never share, so an eager step is planned by its first layer without a window."""
        if layer.sliding_window is not None:
            return None
        if launch.unplanned:
            launch.cascade, launch.unplanned = self._plan_eager(meta, layer, device), False
        return launch.cascade

    def _plan_eager(self, meta: AttentionMetadata, layer: AttentionLayerSpec,
                    device: torch.device) -> StepCascade | None:
        """An eager step's groups, uploaded; None when no group qualifies."""
        cfg = self.cascade
        assert cfg is not None and meta.block_tables_cpu is not None
        nd = meta.num_decodes
        gqa = layer.num_heads // layer.num_kv_heads
        lens = np.asarray(meta.seq_lens_cpu[:nd], dtype=np.int64)
        max_items = max_work_items(nd, gqa, layer.num_kv_heads, _num_sms(device), cfg)
        plan = build_plan(meta.block_tables_cpu[:nd], lens, meta.block_size, gqa, max_items, cfg)
        if not plan.active:
            return None
        layout = PackedLayout(nd, plan.num_items)
        packed = torch.from_numpy(pack_plan(plan, layout)).to(device, non_blocking=True)
        return StepCascade(_cascade_inputs(packed, layout, plan.max_parts, cfg), int((lens - plan.tail_start).max()),
                           plan.tail_start)

    @staticmethod
    def _check_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      layer: AttentionLayerSpec) -> None:
        _check_cache(k_cache, v_cache)
        want = (meta.num_tokens, layer.num_heads, layer.head_dim)
        if tuple(q.shape) != want:
            raise ValueError(f"q must be [T, Hq, D] = {want}, got {tuple(q.shape)}")
        if q.dtype not in _DTYPES:
            raise ValueError(f"q dtype must be one of {_DTYPES}, got {q.dtype}")
        if q.stride(-1) != 1:
            raise ValueError("q must be contiguous in head_dim")
        if tuple(k_cache.shape[2:]) != (layer.num_kv_heads, layer.head_dim):
            raise ValueError(f"k_cache heads/head_dim {tuple(k_cache.shape[2:])} do not match layer "
                             f"({layer.num_kv_heads}, {layer.head_dim})")
        if k_cache.shape[1] != meta.block_size:
            raise ValueError(f"k_cache pages of {k_cache.shape[1]} tokens, but the metadata's block_size is "
                             f"{meta.block_size}")
        if len(meta.query_lens_cpu) != meta.num_seqs or meta.query_start_loc.shape[0] != meta.num_seqs + 1:
            raise ValueError("query_lens_cpu / query_start_loc do not match seq_lens_cpu")
        if not 0 <= meta.num_decodes <= meta.num_seqs:
            raise ValueError(f"num_decodes {meta.num_decodes} out of range 0..{meta.num_seqs}")

    # ------------------------------------------------------------------ CUDA graphs
    def supports_cuda_graphs(self) -> bool:
        return True

    def init_cuda_graphs(self, max_batch_size: int, max_seq_len: int, block_size: int, layer: AttentionLayerSpec,
                         device: torch.device | str) -> int:
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch_size, max_seq_len must be >= 1, got {max_batch_size}, {max_seq_len}")
        device = torch.device(device)
        # The most splits any bucket uses is the smallest bucket's (batch 1).
        tail_slots = ops.choose_num_splits(1, layer.num_kv_heads, _window_context(max_seq_len, layer),
                                           _num_sms(device))
        cfg = self.cascade
        cascade = None if cfg is None else _GraphCascade.allocate(max_batch_size, layer, device, cfg)
        # The splits' partials, then (cascade) the prefix partials.
        slots = tail_slots if cfg is None else ops.cascade_slots(tail_slots, cfg.max_chunks)
        shape = (max_batch_size, layer.num_heads, slots)
        workspace = (torch.empty(*shape, layer.head_dim, dtype=torch.float32, device=device),
                     torch.empty(*shape, dtype=torch.float32, device=device))
        order = _Staged.of(torch.arange(max_batch_size, dtype=torch.int32), device)  # batch order until a replay
        self._graphs = _GraphBuffers(layer, max_batch_size, max_seq_len, block_size, tail_slots, workspace, cascade,
                                     order)
        return self._graphs.variants

    def prepare_for_capture(self, meta: AttentionMetadata, variant: int) -> None:
        g = self._prepared()
        b = meta.num_seqs
        if meta.num_decodes != b:
            raise ValueError(f"a captured step must be decodes only, got num_decodes={meta.num_decodes} of {b} "
                             "sequences")
        if not 1 <= b <= g.max_batch:
            raise ValueError(f"batch_size {b} outside 1..{g.max_batch} prepared")
        if not 0 <= variant < g.variants:
            raise ValueError(f"variant {variant} outside 0..{g.variants - 1}")
        if meta.block_size != g.block_size:
            raise ValueError(f"block_size {meta.block_size} differs from the prepared {g.block_size}")
        cascade = None
        if variant == CASCADE_VARIANT:
            assert g.cascade is not None
            cascade = StepCascade(g.cascade.inputs, g.max_seq_len)
        meta.state = DecodeLaunch(self, rows=b, context=g.max_seq_len, max_splits=g.tail_slots,
                                  workspace=g.workspace, cascade=cascade, heads=_heads(g.layer),
                                  order=g.order.device[:b])

    def prepare_for_replay(self, batch: HostBatch, bucket: int) -> int:
        g = self._prepared()
        n = batch.num_seqs
        if not n <= bucket <= g.max_batch:
            raise ValueError(f"bucket {bucket} must hold the {n} rows and be <= {g.max_batch} prepared")
        if batch.num_decodes != n:
            raise ValueError(f"a replayed step must be decodes only, got num_decodes={batch.num_decodes} of {n}")
        if batch.block_size != g.block_size:
            raise ValueError(f"block_size {batch.block_size} differs from the prepared {g.block_size}")
        variant = PLAIN_VARIANT if g.cascade is None else g.cascade.refill(batch)
        keys = batch.seq_lens
        if variant == CASCADE_VARIANT:
            assert g.cascade is not None and g.cascade.plan is not None
            keys = keys - g.cascade.plan.tail_start

        def longest_first(host: np.ndarray) -> None:  # the bucket's padding rows last
            host[:bucket] = ops.longest_first(keys, bucket)

        g.order.refill(longest_first, bucket)
        return variant

    def _prepared(self) -> _GraphBuffers:
        if self._graphs is None:
            raise ValueError("init_cuda_graphs first")
        return self._graphs


def _cascade_inputs(packed: torch.Tensor, layout: PackedLayout, max_parts: int,
                    cfg: CascadeConfig) -> ops.CascadeInputs:
    """Device views of a packed plan (``cascade.pack_plan``'s layout)."""
    tail, parts, members, work = layout.views(packed)
    return ops.CascadeInputs(tail, parts, members, work, max(1, max_parts), cfg.block_m)
