"""The decode-graph path of the model runner against its eager path, without a GPU.

Everything a CUDA-graph step does but the capture itself runs here: the step's host arrays
staged into the static buffers, the backend's captured-step state, cascade groups refilled for
the replay and the variant chosen, the step recorded over the static buffers, the greedy tail.
A stand-in replaces each captured graph: its ``replay`` runs the step the graph would have
recorded.  The Triton kernels run under the interpreter on a tiny model (two layers, the
first with a sliding window), in fp32, with rows sharing prefix blocks as prefix-cache hits
make them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from .triton_interpreter import DEVICE, rerun_in_fresh_process, seeded_generator, skip_unless_runnable

pytest.importorskip("triton")

from pagedattn.attention import triton_ops as ops
from pagedattn.attention.cascade import CascadeConfig
from pagedattn.attention.metadata import HostBatch
from pagedattn.attention.triton_backend import CASCADE_VARIANT, PLAIN_VARIANT, TritonBackend
from pagedattn.cache.kv_pool import KVCachePool
from pagedattn.models.config import ModelArchConfig
from pagedattn.models.llama import LlamaForCausalLM
from pagedattn.runtime.cuda_graphs import DecodeGraphs, DecodeStaging
from pagedattn.runtime.model_runner import ModelRunner, StepInput

BS, VOCAB = 4, 96
# Interpreter-sized cascade thresholds: a group shares at least 2 pages.
CFG = CascadeConfig(min_prefix_tokens=8, min_chunk_tokens=8, chunk_align=4, block_m=16, max_chunks=4)


@pytest.fixture
def interpreter(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_decode_graphs_in_fresh_interpreter_process")


def test_decode_graphs_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


def test_staging_pads_to_the_bucket() -> None:
    """Rows past the step are padding (slot -1, length 0, id 0); released table entries read
    block 0; token ids stay as they were when they come from the device."""
    batch = HostBatch.build([1, 1, 1], [5, 9, 2], [[7, 3], [-1, 4, 6], [8]], BS)
    staging = DecodeStaging(max_batch=8, width=4, pin=False)
    stale = HostBatch.build([1] * 8, [16] * 8, [[1, 2, 3, 4]] * 8, BS)
    for _ in range(2):  # both sets hold an earlier, larger step
        staging.fill(stale, list(range(8)), 8)
    packed, lens, tables = staging.fill(batch, [11, 12, 13], 4)
    assert packed[:, :4].tolist() == [[11, 12, 13, 0], [4, 8, 1, 0], [3 * 4 + 0, 6 * 4 + 0, 8 * 4 + 1, -1]]
    assert lens[:4].tolist() == [5, 9, 2, 0]
    assert tables[:3, :3].tolist() == [[7, 3, 0], [0, 4, 6], [8, 0, 0]]
    staging.fill(batch, [0, 0, 0], 4)  # the other set
    again, _, _ = staging.fill(batch, None, 4)
    assert again is packed and again[0, :3].tolist() == [11, 12, 13], "ids from the device: the row is left alone"


class _Replay:
    """Stands in for a captured graph on a CPU: ``replay`` runs what the graph recorded."""

    def __init__(self, run: Callable[[], object], log: list[tuple[int, int]], key: tuple[int, int]) -> None:
        self.run, self.log, self.key = run, log, key

    def replay(self) -> None:
        self.log.append(self.key)
        self.run()


def _emulate_capture(graphs: DecodeGraphs, log: list[tuple[int, int]]) -> None:
    """What ``DecodeGraphs.capture`` sets up, with stand-ins for the graphs."""
    variants = graphs.init_backend()
    for b in graphs.buckets:
        graphs.logits[b] = logits = torch.empty(b, VOCAB, device=DEVICE)
        graphs.graphs[b] = []
        for v in range(variants):
            def step(b: int = b, ctx: object = graphs.context(b, v), out: torch.Tensor = logits) -> None:
                out.copy_(graphs.step_logits(b, ctx))  # type: ignore[arg-type]
            graphs.graphs[b].append(_Replay(step, log, (b, v)))  # type: ignore[arg-type]
        ids = torch.empty(b, dtype=torch.long, device=DEVICE)
        tail = _Replay(lambda ids=ids, out=logits: ids.copy_(graphs.model.lm_head.greedy_tokens(out)), log, (b, -1))
        graphs.greedy[b] = (tail, ids)  # type: ignore[assignment]


@dataclass
class _Seq:
    tokens: list[int]
    table: list[int]
    computed: int = 0  # tokens with K/V in the cache
    shared: list[int] = field(default_factory=list)


def _tiny_runner(g: torch.Generator) -> ModelRunner:
    cfg = ModelArchConfig("LlamaForCausalLM", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, layer_sliding_windows=[6, None])
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))  # norms near 1
    model.to(DEVICE)
    pool = KVCachePool(model.kv_cache_spec(BS), 40, DEVICE)
    return ModelRunner(model, pool, TritonBackend(cascade=CFG))


def _decode_step(seqs: list[_Seq], free: list[int], greedy: bool) -> StepInput:
    """One more token for every sequence (a new page when the last one is full)."""
    for s in seqs:
        if len(s.tokens) > len(s.table) * BS:
            s.table.append(free.pop())
    return StepInput(query_lens=[1] * len(seqs), seq_lens=[len(s.tokens) for s in seqs],
                     block_tables=[list(s.table) for s in seqs], token_ids=[s.tokens[-1] for s in seqs],
                     sample_rows=list(range(len(seqs))), greedy=greedy)


def test_graph_steps_match_eager_steps(interpreter: None, monkeypatch: pytest.MonkeyPatch) -> None:
    grouped: list[bool] = []  # per decode launch: whether it attended shared prefixes once per group
    launch = ops.decode_attention

    def spy(*args: object, **kw: object) -> None:
        cascade = kw.get("cascade")
        grouped.append(isinstance(cascade, ops.CascadeInputs) and bool(cascade.num_prefix_parts.any()))
        launch(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ops, "decode_attention", spy)
    g = seeded_generator("decode-graphs")
    runner = _tiny_runner(g)
    graphs = DecodeGraphs(runner.model, runner.backend, runner.kv_caches, max_batch=8, max_blocks_per_seq=8,
                          max_seq_len=32, device=DEVICE)
    log: list[tuple[int, int]] = []
    _emulate_capture(graphs, log)
    assert runner.backend._prepared().layer.sliding_window is None  # type: ignore[attr-defined]  # the widest
    free = torch.randperm(40, generator=g).tolist()
    prefix = torch.randint(0, VOCAB, (12,), generator=g).tolist()
    shared = [free.pop() for _ in range(3)]  # three full pages of a common prompt

    def seq(own: int, share: bool) -> _Seq:
        tokens = (prefix if share else []) + torch.randint(0, VOCAB, (own,), generator=g).tolist()
        table = (list(shared) if share else []) + [free.pop() for _ in range(-(-len(tokens) // BS) - 3 * share)]
        return _Seq(tokens, table, computed=12 if share else 0)

    # The first holder of the prefix computes it; the others hit the prefix cache.
    first = seq(2, True)
    first.computed = 0
    seqs = [first, seq(5, True), seq(7, False), seq(1, True)]
    prefill = StepInput(query_lens=[len(s.tokens) - s.computed for s in seqs], seq_lens=[len(s.tokens) for s in seqs],
                        block_tables=[s.table for s in seqs],
                        token_ids=[t for s in seqs for t in s.tokens[s.computed:]])
    prefill.sample_rows = (np.cumsum(prefill.query_lens) - 1).tolist()
    out = runner.execute(prefill).rows
    for s, row in zip(seqs, out):
        s.tokens.append(int(row.argmax()))

    # Decode steps: the shared rows group (cascade variant); the unrelated row alone does not.
    plans = [(seqs, False, CASCADE_VARIANT), (seqs, True, CASCADE_VARIANT), ([seqs[2]], True, PLAIN_VARIANT),
             (seqs[:2], False, CASCADE_VARIANT)]
    for i, (rows, greedy, variant) in enumerate(plans):
        step = _decode_step(rows, free, greedy)
        runner.graphs = None
        eager = runner.execute(step).rows
        runner.graphs = graphs
        # Steps 1 and 3 take their ids from the previous step's samples, never seen by the host:
        # in another order (gathered on the device), and in the same order (taken as they are).
        prev = None
        if i in (1, 3):
            n = len(step.token_ids)
            order = list(range(n))[::-1] if i == 1 else list(range(n))  # prev[k] is row order[k]'s id
            prev = torch.tensor([step.token_ids[j] for j in order], device=DEVICE)
            step.from_prev, step.num_prev = [(j, order.index(j)) for j in range(n)], n
            step.token_ids = [0] * n
        log.clear()
        grouped.clear()
        replayed = runner.execute(step, prev).rows
        # Layer 0 has a sliding window: only layer 1 may use the groups.
        assert grouped == [False, variant == CASCADE_VARIANT]
        bucket = next(b for b in graphs.buckets if b >= len(rows))
        assert log == [(bucket, variant)] + ([(bucket, -1)] if greedy else [])
        if greedy:
            assert torch.equal(replayed, eager)
        else:
            torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)
        for s, row in zip(rows, eager):
            s.tokens.append(int(row) if greedy else int(row.argmax()))
