"""Cascade (shared-prefix) decode against the torch reference.

Without CUDA the kernels run under the Triton interpreter on small shapes (pages of 4 tokens,
prefixes of a few pages, key tiles of 16, 16-pair prefix tiles, chunks not aligned to tiles);
with CUDA the same tests run, plus the ``gpu``-marked full-size test.  Batches are built as
the engine makes them: groups of rows point at the same physical prefix blocks (shuffled ids),
then continue in blocks of their own; every cache slot no kernel may read holds NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from .triton_interpreter import (
    CUDA,
    DEVICE,
    attention_tolerance,
    randn,
    rerun_in_fresh_process,
    seeded_generator,
    skip_unless_runnable,
)

pytest.importorskip("triton")

from pagedattn import envs
from pagedattn.attention import (
    AttentionLayerSpec,
    AttentionMetadata,
    TorchReferenceBackend,
    paged_attention_ref,
    store_kv_ref,
    triton_backend,
)
from pagedattn.attention import triton_ops as ops
from pagedattn.attention.cascade import CascadeConfig, PackedLayout, build_plan, pack_plan
from pagedattn.attention.metadata import HostBatch
from pagedattn.attention.triton_backend import TritonBackend

HKV, D = (8, 128) if CUDA else (2, 32)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Thresholds small enough for interpreter-sized prefixes; chunk_align 4 puts chunk edges
# inside the kernels' 16-key tiles.
CFG = CascadeConfig(min_prefix_tokens=8, min_chunk_tokens=8, chunk_align=4, block_m=16, max_chunks=4)
PREFIX_CFG = None if CUDA else ops.PrefixConfig(block_n=16, num_warps=4, num_stages=1)
DEC_CFG = None if CUDA else ops.DecodeConfig(block_n=16)


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_cascade_in_fresh_interpreter_process")


def test_cascade_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


@dataclass
class SharedBatch:
    tables: list[list[int]]
    seq_lens: list[int]
    k_cache: torch.Tensor  # NaN wherever no kernel may read
    v_cache: torch.Tensor
    block_size: int

    def meta(self, pad_blocks_to: int | None = None) -> AttentionMetadata:
        return AttentionMetadata.build([1] * len(self.seq_lens), self.seq_lens, self.tables, self.block_size,
                                       device=DEVICE, pad_blocks_to=pad_blocks_to)

    def host(self) -> HostBatch:
        return HostBatch.build([1] * len(self.seq_lens), self.seq_lens, self.tables, self.block_size)

    def reference(self, q: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
        m = self.meta()
        k, v = torch.nan_to_num(self.k_cache, nan=0.0), torch.nan_to_num(self.v_cache, nan=0.0)
        return paged_attention_ref(q, k, v, m.block_tables, m.query_lens_cpu, m.seq_lens_cpu, scale, softcap=softcap)


def _shared_batch(g: torch.Generator, rows: list[tuple[int | None, int]], prefix_blocks: list[int], block_size: int,
                  dtype: torch.dtype) -> SharedBatch:
    """``rows[i] = (group, tail)``: row i shares group's ``prefix_blocks[group]`` blocks (None:
    no group) and has ``tail >= 1`` tokens of its own after them."""
    bs = block_size
    n_blocks = sum(prefix_blocks) + sum(-(-tail // bs) for _, tail in rows) + 3  # spare blocks stay NaN
    perm = torch.randperm(n_blocks, generator=g).tolist()
    prefixes, i = [], 0
    for nb in prefix_blocks:
        prefixes.append(perm[i:i + nb])
        i += nb
    tables, lens = [], []
    for grp, tail in rows:
        own = -(-tail // bs)
        shared = prefixes[grp] if grp is not None else []
        tables.append(shared + perm[i:i + own])
        i += own
        lens.append(len(shared) * bs + tail)
    shape = (n_blocks, bs, HKV, D)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    for bt, sl in zip(tables, lens):
        pos = torch.arange(sl)
        slots = (torch.tensor(bt)[pos // bs] * bs + pos % bs).to(DEVICE)
        kv = randn(g, 2, sl, HKV, D, dtype=dtype)  # shared slots: the last row's values stay
        store_kv_ref(kv[0], kv[1], k_cache, v_cache, slots)
    return SharedBatch(tables, lens, k_cache, v_cache, bs)


def _assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "output has NaN: an element was never written or poison was read"
    torch.testing.assert_close(out.float(), ref.float(), **attention_tolerance(out.dtype))


def _bucket_arrays(batch: SharedBatch, bucket: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch's tables and lengths padded to a graph bucket, as DecodeGraphs holds them:
    padding rows have no blocks and length 0."""
    tables = np.zeros((bucket, width), dtype=np.int32)
    for i, t in enumerate(batch.tables):
        tables[i, :len(t)] = t
    lens = np.zeros(bucket, dtype=np.int32)
    lens[:len(batch.seq_lens)] = batch.seq_lens
    return tables, lens


def _cascade_inputs(batch: SharedBatch, gqa: int, max_items: int = 64) -> tuple[ops.CascadeInputs, int]:
    m = batch.meta()
    plan = build_plan(m.block_tables_cpu, np.asarray(batch.seq_lens), batch.block_size, gqa, max_items, CFG)
    layout = PackedLayout(len(batch.seq_lens), plan.num_items)
    packed = torch.from_numpy(pack_plan(plan, layout)).to(DEVICE)
    tail, parts, members, work = layout.views(packed)
    return ops.CascadeInputs(tail, parts, members, work, max(1, plan.max_parts), CFG.block_m), len(plan.groups)


# --------------------------------------------------------------------------- kernels

# (rows, prefix blocks per group): one group covering all rows; two groups, group rows not
# contiguous in the batch, ungrouped rows; tails of 1 token (prefix ends right before the
# last token) and tails ending exactly at a block boundary (own last block full).
_ONE_GROUP = ([(0, 1), (0, 3), (0, 4), (0, 9)], [5])
_MIXED = ([(0, 1), (None, 11), (1, 4), (0, 8), (None, 3), (1, 1), (0, 5)], [6, 3])
_CASES = [
    (*_ONE_GROUP, 1, torch.float32, 1, None),
    (*_ONE_GROUP, 4, torch.bfloat16, 3, None),
    (*_MIXED, 2, torch.float16, 1, None),
    (*_MIXED, 4, torch.float32, 2, None),
    (*_MIXED, 1, torch.bfloat16, 4, None),
    (*_ONE_GROUP, 2, torch.float16, 2, None),
    # Attention-logit soft-capping (Gemma 2) in the prefix kernel and the tails, unsplit and split.
    (*_MIXED, 2, torch.float32, 1, 0.6),
    (*_ONE_GROUP, 4, torch.bfloat16, 2, 1.2),
]


@pytest.mark.parametrize(("rows", "prefix_blocks", "gqa", "dtype", "splits", "softcap"), _CASES)
def test_cascade_decode_matches_reference(rows: list[tuple[int | None, int]], prefix_blocks: list[int], gqa: int,
                                          dtype: torch.dtype, splits: int, softcap: float | None) -> None:
    g = seeded_generator("cascade", tuple(rows), tuple(prefix_blocks), gqa, dtype, splits, softcap)
    batch = _shared_batch(g, rows, prefix_blocks, 4, dtype)
    cascade, n_groups = _cascade_inputs(batch, gqa)
    assert n_groups == len(prefix_blocks)
    assert cascade.max_parts > 1, "the prefix should be cut into several chunks"
    q = randn(g, len(rows), HKV * gqa, D, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    m = batch.meta()
    ops.decode_attention(q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, D**-0.5, None, out, splits,
                         config=DEC_CFG, cascade=cascade, prefix_config=PREFIX_CFG, softcap=softcap)
    _assert_matches(out, batch.reference(q, D**-0.5, softcap))


def test_cascade_unused_work_items_and_rows_without_groups() -> None:
    """A work list longer than the plan (zeroed items, as in a CUDA graph) and an all-zero plan
    (no group this step) both give plain decode results."""
    g = seeded_generator("cascade-unused")
    dtype, gqa = torch.float32, 2
    batch = _shared_batch(g, _MIXED[0], _MIXED[1], 4, dtype)
    m = batch.meta()
    plan = build_plan(m.block_tables_cpu, np.asarray(batch.seq_lens), 4, gqa, 64, CFG)
    q = randn(g, len(batch.seq_lens), HKV * gqa, D, dtype=dtype)
    ref = batch.reference(q, 0.3)
    layout = PackedLayout(len(batch.seq_lens) + 2, plan.num_items + 5)
    for active in (True, False):
        packed = pack_plan(plan, layout) if active else np.zeros(layout.size, dtype=np.int32)
        tail, parts, members, work = layout.views(torch.from_numpy(packed).to(DEVICE))
        cascade = ops.CascadeInputs(tail, parts, members, work, CFG.max_chunks, CFG.block_m)
        for splits in (1, 2):
            out = torch.full_like(q, float("nan"))
            ops.decode_attention(q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, 0.3, None, out,
                                 splits, config=DEC_CFG, cascade=cascade, prefix_config=PREFIX_CFG)
            _assert_matches(out, ref)


def test_cascade_rejects_sliding_window_and_small_workspace() -> None:
    g = seeded_generator("cascade-bad")
    batch = _shared_batch(g, _ONE_GROUP[0], _ONE_GROUP[1], 4, torch.float32)
    cascade, _ = _cascade_inputs(batch, 1)
    q = randn(g, 4, HKV, D, dtype=torch.float32)
    m = batch.meta()
    with pytest.raises(ValueError, match="sliding_window"):
        ops.decode_attention(q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, 0.3, 8, q.clone(), 1,
                             cascade=cascade)
    small = (torch.empty(4, HKV, 1, D, device=DEVICE), torch.empty(4, HKV, 1, device=DEVICE))
    with pytest.raises(ValueError, match="workspace"):
        ops.decode_attention(q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, 0.3, None, q.clone(), 1,
                             workspace=small, cascade=cascade)
    with pytest.raises(ValueError, match="int32"):
        ops.CascadeInputs(cascade.tail_start.long(), cascade.num_prefix_parts, cascade.members, cascade.work, 1, 16)


# --------------------------------------------------------------------------- backend


@pytest.mark.parametrize(("gqa", "dtype", "window", "softcap"),
                         [(2, torch.float32, None, None), (4, torch.bfloat16, None, None),
                          (1, torch.float16, None, None), (2, torch.float32, 6, None), (2, torch.float32, None, 0.9)])
def test_backend_eager_cascade_in_a_mixed_batch(gqa: int, dtype: torch.dtype, window: int | None,
                                                softcap: float | None) -> None:
    """Decodes (two groups, ungrouped rows) then a prefill: the backend plans from the host
    tables; a sliding-window layer ignores the groups."""
    g = seeded_generator("backend-eager", gqa, dtype, window, softcap)
    rows, prefix_blocks = _MIXED
    bs = 4
    batch = _shared_batch(g, [*rows, (None, 7)], prefix_blocks, bs, dtype)
    query_lens = [1] * len(rows) + [5]
    m = AttentionMetadata.build(query_lens, batch.seq_lens, batch.tables, bs, device=DEVICE)
    layer = AttentionLayerSpec(HKV * gqa, HKV, D, D**-0.5, window, logit_softcap=softcap)
    q = randn(g, sum(query_lens), HKV * gqa, D, dtype=dtype)
    backend = TritonBackend(cascade=CFG)
    out = backend.attend(q, batch.k_cache, batch.v_cache, m, layer)
    launch = m.state
    assert isinstance(launch, triton_backend.DecodeLaunch)
    # A sliding-window layer leaves the plan to a later layer without a window.
    assert launch.unplanned == bool(window) and (launch.cascade is None) == bool(window)
    k, v = torch.nan_to_num(batch.k_cache, nan=0.0), torch.nan_to_num(batch.v_cache, nan=0.0)
    ref = paged_attention_ref(q, k, v, m.block_tables, m.query_lens_cpu, m.seq_lens_cpu, layer.scale, window,
                              softcap=softcap)
    _assert_matches(out, ref)
    # The same step with cascade off gives the same result.
    m_off = AttentionMetadata.build(query_lens, batch.seq_lens, batch.tables, bs, device=DEVICE)
    _assert_matches(TritonBackend(cascade=False).attend(q, batch.k_cache, batch.v_cache, m_off, layer), ref)


def test_backend_cascade_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TritonBackend().cascade == CascadeConfig()
    assert TritonBackend(cascade=False).cascade is None
    monkeypatch.setenv("PAGEDATTN_DISABLE_CASCADE", "1")
    envs.reload()
    assert TritonBackend().cascade is None
    assert TritonBackend(cascade=CFG).cascade is CFG
    with pytest.raises(ValueError, match="cascade"):
        TritonBackend(cascade="yes")  # type: ignore[arg-type]


def test_backend_eager_cascade_is_planned_once_per_step_and_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers of a step share its plan (one planning, one upload); another backend handed
    the same metadata plans for itself (here: cascade off, so no groups)."""
    g = seeded_generator("backend-eager-once")
    batch = _shared_batch(g, *_ONE_GROUP, 4, torch.float32)
    layer = AttentionLayerSpec(HKV * 2, HKV, D, D**-0.5)
    q = randn(g, len(batch.seq_lens), HKV * 2, D, dtype=torch.float32)
    m = batch.meta()
    plans: list[int] = []
    build_plan_counted = triton_backend.build_plan
    monkeypatch.setattr(triton_backend, "build_plan", lambda *a, **kw: plans.append(1) or build_plan_counted(*a, **kw))
    on = TritonBackend(cascade=CFG)
    outs = [on.attend(q, batch.k_cache, batch.v_cache, m, layer) for _ in range(3)]
    assert len(plans) == 1 and isinstance(m.state, triton_backend.DecodeLaunch) and m.state.cascade is not None
    assert m.state.order is not None and m.state.order.tolist() == [3, 2, 1, 0]  # by own tails: 9, 4, 3, 1
    off = TritonBackend(cascade=False)
    outs.append(off.attend(q, batch.k_cache, batch.v_cache, m, layer))
    assert m.state.backend is off and m.state.cascade is None and len(plans) == 1
    ref = batch.reference(q, layer.scale)
    for out in outs:
        _assert_matches(out, ref)


def _static_meta(tables: np.ndarray, lens: np.ndarray, block_size: int) -> AttentionMetadata:
    """A bucket's metadata as DecodeGraphs holds it: static device tensors, decodes only."""
    bucket = lens.shape[0]
    return AttentionMetadata(
        slot_mapping=torch.full((bucket,), -1, dtype=torch.long, device=DEVICE),
        query_start_loc=torch.arange(bucket + 1, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.from_numpy(lens).to(DEVICE), block_tables=torch.from_numpy(tables).to(DEVICE),
        max_query_len=1, max_seq_len=tables.shape[1] * block_size, num_decodes=bucket, query_lens_cpu=[1] * bucket,
        seq_lens_cpu=[tables.shape[1] * block_size] * bucket, block_size=block_size)


@pytest.mark.parametrize(("gqa", "dtype", "num_sms"), [(2, torch.bfloat16, 4), (4, torch.float32, 64)])
def test_backend_captured_steps_read_the_groups_prepared_for_replay(gqa: int, dtype: torch.dtype, num_sms: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph path on fixed buffers: per step ``prepare_for_replay`` refills the groups
    and picks the cascade variant, or the plain one for a step without groups; padding rows
    (seq_len 0) give zeros; a repeated step reuses its plan.  With many SMs the bucket's decode
    is split (for its 2048-token prepared context): the prefix partials then go through the
    merge kernel, and most work items are unused."""
    monkeypatch.setattr(triton_backend, "_num_sms", lambda device: num_sms)
    g = seeded_generator("backend-graph", gqa, dtype, num_sms)
    bs, bucket, width = 4, 8, 12
    layer = AttentionLayerSpec(HKV * gqa, HKV, D, D**-0.5)
    backend = TritonBackend(cascade=CFG)
    assert backend.init_cuda_graphs(max_batch_size=bucket, max_seq_len=2048, block_size=bs, layer=layer,
                                    device=DEVICE) == 2
    plans: list[int] = []
    build_plan_counted = triton_backend.build_plan
    monkeypatch.setattr(triton_backend, "build_plan", lambda *a, **kw: plans.append(1) or build_plan_counted(*a, **kw))
    # The second step repeats the first (its plan still holds: no replanning, no upload).
    steps = [_MIXED, _MIXED, ([(0, 2), (0, 6), (0, 1)], [7]), ([(None, 5), (None, 2)], [])]
    batch = None
    for step, (rows, prefix_blocks) in enumerate(steps):
        if step != 1:
            batch = _shared_batch(g, rows, prefix_blocks, bs, dtype)
        assert batch is not None
        n = len(rows)
        variant = backend.prepare_for_replay(batch.host(), bucket)
        assert variant == (1 if prefix_blocks else 0)  # no group: the plain decode's graph
        # Rows start longest first: grouped rows by their own tails, the padding rows last.
        keys = [tail if grp is not None else length for (grp, tail), length in zip(rows, batch.seq_lens)]
        order = backend._prepared().order.device[:bucket].tolist()
        assert order == sorted(range(n), key=lambda r: -keys[r]) + list(range(n, bucket))
        static = _static_meta(*_bucket_arrays(batch, bucket, width), bs)
        backend.prepare_for_capture(static, variant)
        assert isinstance(static.state, triton_backend.DecodeLaunch)
        assert (static.state.splits(layer, static.state.cascade, num_sms) > 1) == (num_sms == 64)
        q = randn(g, bucket, HKV * gqa, D, dtype=dtype)
        out = backend.attend(q, batch.k_cache, batch.v_cache, static, layer)
        _assert_matches(out[:n], batch.reference(q[:n], layer.scale))
        assert torch.equal(out[n:], torch.zeros_like(out[n:])), "padding rows"
    assert len(plans) == len(steps) - 1
    assert batch is not None
    with pytest.raises(ValueError, match="bucket"):
        backend.prepare_for_replay(batch.host(), 1)
    with pytest.raises(ValueError, match="block_size"):
        backend.prepare_for_replay(HostBatch.build([1], [3], [[0]], 8), bucket)
    with pytest.raises(ValueError, match="decodes only"):
        backend.prepare_for_replay(HostBatch.build([2], [3], [[0]], bs), bucket)


def test_torch_backend_shares_plans_per_window_and_captures_nothing() -> None:
    """The reference backend's layers share the step's gather plans, one per sliding window, and
    give what the stateless function gives; it has no CUDA-graph support."""
    g = seeded_generator("torch-state")
    batch = _shared_batch(g, *_MIXED, 4, torch.float32)
    m = batch.meta()
    k, v = torch.nan_to_num(batch.k_cache, nan=0.0), torch.nan_to_num(batch.v_cache, nan=0.0)
    q = randn(g, len(batch.seq_lens), HKV, D, dtype=torch.float32)
    backend = TorchReferenceBackend()
    for window in (None, 6, None, 6):
        layer = AttentionLayerSpec(HKV, HKV, D, 0.3, window)
        out = backend.attend(q, k, v, m, layer)
        ref = paged_attention_ref(q, k, v, m.block_tables, m.query_lens_cpu, m.seq_lens_cpu, 0.3, window)
        assert torch.equal(out, ref)
    assert m.state is not None and m.state.backend is backend
    assert sorted(m.state.by_window, key=str) == [6, None]  # type: ignore[attr-defined]
    assert not backend.supports_cuda_graphs()
    with pytest.raises(NotImplementedError, match="torch"):
        backend.init_cuda_graphs(1, 16, 4, AttentionLayerSpec(HKV, HKV, D, 0.3), DEVICE)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_full_size_cascade_and_cuda_graph(dtype: torch.dtype) -> None:
    """The benchmark's shape: 128 rows sharing 2048 tokens (plus 8 rows of another prompt and
    8 unrelated rows), own tails of 1..80 tokens, 16/8 heads, head_dim 128, pages of 16: eager
    and a captured graph replayed with new groups, against the reference."""
    g = seeded_generator("gpu-cascade", dtype)
    bs, gqa = 16, 2
    tails = torch.randint(1, 81, (144,), generator=g).tolist()
    groups = [0] * 128 + [1] * 8 + [None] * 8
    order = torch.randperm(144, generator=g).tolist()
    rows = [(groups[i], tails[i]) for i in order]
    batch = _shared_batch(g, rows, [128, 40], bs, dtype)
    layer = AttentionLayerSpec(HKV * gqa, HKV, D, D**-0.5)
    q = randn(g, len(rows), HKV * gqa, D, dtype=dtype)
    ref = batch.reference(q, layer.scale)
    backend = TritonBackend()
    m = batch.meta()
    _assert_matches(backend.attend(q, batch.k_cache, batch.v_cache, m, layer), ref)
    assert isinstance(m.state, triton_backend.DecodeLaunch) and m.state.cascade is not None

    bucket, width = 160, 140
    variants = backend.init_cuda_graphs(bucket, width * bs, bs, layer, DEVICE)
    q_static = torch.zeros(bucket, HKV * gqa, D, dtype=dtype, device=DEVICE)
    static = AttentionMetadata.build([1] * bucket, [1] * bucket, [[0]] * bucket, bs, device=DEVICE,
                                     pad_blocks_to=width)
    graphs, outs = [], []
    for variant in range(variants):
        backend.prepare_for_capture(static, variant)  # the graph keeps the launch, not the metadata
        backend.attend(q_static, batch.k_cache, batch.v_cache, static, layer)
        torch.cuda.synchronize()
        graphs.append(torch.cuda.CUDAGraph())
        with torch.cuda.graph(graphs[-1]):
            outs.append(backend.attend(q_static, batch.k_cache, batch.v_cache, static, layer))
    n = len(rows)
    tables, lens = _bucket_arrays(batch, bucket, width)
    static.block_tables.copy_(torch.from_numpy(tables))
    static.seq_lens.copy_(torch.from_numpy(lens))
    q_static.zero_()
    q_static[:n].copy_(q)
    variant = backend.prepare_for_replay(batch.host(), bucket)
    assert variant == 1
    graphs[variant].replay()
    _assert_matches(outs[variant][:n], ref)
    assert torch.equal(outs[variant][n:], torch.zeros_like(outs[variant][n:]))
    graphs[0].replay()  # the plain variant computes the same step
    _assert_matches(outs[0][:n], ref)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("eager", [False, True])
def test_gpu_engine_shared_prompt_matches_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eager: bool) -> None:
    """End to end: requests sharing a 320-token prompt (prefix-cache hits) decode through cascade
    decode (the cascade CUDA-graph variant, or eager) and match HF greedy in fp32."""
    from pagedattn import LLM, SamplingParams

    from .engine_models import hf_greedy, make_model_dir
    from .test_engine import _prompts

    variants: list[int] = []
    planned: list[bool] = []
    replay, plan_eager = TritonBackend.prepare_for_replay, TritonBackend._plan_eager

    def spy_replay(self: TritonBackend, *args: object) -> int:
        variants.append(replay(self, *args))  # type: ignore[arg-type]
        return variants[-1]

    def spy_plan(self: TritonBackend, *args: object) -> object:
        result = plan_eager(self, *args)  # type: ignore[arg-type]
        planned.append(result is not None)
        return result

    monkeypatch.setattr(TritonBackend, "prepare_for_replay", spy_replay)
    monkeypatch.setattr(TritonBackend, "_plan_eager", spy_plan)
    path = make_model_dir(tmp_path, "qwen3_qknorm")
    shared = _prompts(11, lens=(320,))[0]
    prompts = [shared + p for p in _prompts(12, lens=(3, 9, 1, 14, 20, 5))]
    expected = hf_greedy(path, prompts, 24)
    llm = LLM(str(path), device="cuda", dtype="float32", block_size=16, num_kv_blocks=256, max_num_seqs=16,
              swap_space_gib=0.01, enforce_eager=eager)
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert got == expected
    assert (any(planned) if eager else 1 in variants), "no step went through cascade decode"
