"""Model runner: turns a scheduled batch into one forward pass on the paged cache.

The work is split in two so that tensor parallelism shares everything but the bookkeeping:

* the engine's ``StepBuilder`` (its rank only) reads the scheduler's output and the block
  manager's tables and writes them down as a :class:`StepInput`: plain lists and ints, the same
  for every rank, cheap to pickle and broadcast.
* :class:`ModelRunner` (every rank) executes a :class:`StepInput` on its own model shard and KV
  pool: the block moves (swap-out, copy-on-write, swap-in, in the order the scheduler decided
  them), the flattened ragged batch (one :class:`HostBatch` of positions, slots and block
  tables, uploaded as :class:`AttentionMetadata` for an eager step or copied into the decode
  graphs' static buffers for a replay), the forward pass, and the output of the rows that sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata, HostBatch
from ..cache.kv_pool import KVCachePool
from ..models.context import ForwardContext
from ..models.interface import CausalLM
from ..transfer import to_device, upload
from .cuda_graphs import DecodeGraphs

KVOp = tuple[str, list[tuple[int, int]]]  # ("swap_out" | "copy" | "swap_in", block pairs)


@dataclass
class StepInput:
    """Everything a rank needs to run one step, decided once by the engine.

    Sequences are in scheduled order (decodes first).  With overlapped scheduling some input
    ids exist only on the device, as samples of the previous step: ``from_prev`` says which, and
    the caller passes that step's samples.  When the previous step was greedy (``prev_greedy``)
    every rank computed them itself, so nothing travels between ranks; otherwise rank 0 sends
    its ``num_prev`` samples.
    """

    kv_ops: list[KVOp] = field(default_factory=list)  # block moves to run first, in order
    query_lens: list[int] = field(default_factory=list)  # new tokens per sequence
    seq_lens: list[int] = field(default_factory=list)  # tokens with K/V per sequence after the step
    # Physical blocks (-1: window-released); the block manager's int32 arrays, or lists.
    block_tables: list[Sequence[int]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the new tokens, flattened [sum(query_lens)]
    sample_rows: list[int] = field(default_factory=list)  # rows of the flattened batch whose logits return
    # Per sequence, the tokens it holds (prompt and generated so far, pending ones included; None:
    # not given); the runner hands them per token to a model that uses them
    # (CausalLM.uses_total_lens).
    total_lens: list[int] | None = None
    # Rows of the flattened batch whose full logits also return, in StepOutput.prompt_logits
    # (prompt positions of requests that want prompt logprobs; never a decode-graph step).
    prompt_rows: list[int] = field(default_factory=list)
    # Every sampled row is greedy and wants no log-probabilities: return their argmax token ids
    # instead of the logits (with tensor parallelism, from each rank's vocabulary slice, without
    # gathering the logits).
    greedy: bool = False
    # (row of the flattened batch, row of the previous step's samples): the ids that row takes
    # from the device instead of ``token_ids`` (which holds a placeholder there).
    from_prev: list[tuple[int, int]] = field(default_factory=list)
    prev_greedy: bool = False
    num_prev: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_empty(self) -> bool:
        return not self.query_lens

    @property
    def is_decode(self) -> bool:
        """One new token per sequence, every one sampling: a step the decode graphs can run."""
        return bool(self.query_lens) and max(self.query_lens) == 1 and len(self.sample_rows) == len(self.query_lens)


@dataclass
class StepOutput:
    """What a step gives back, on every rank, for the rows of ``StepInput.sample_rows`` (in that
    order): their argmax token ids when the step is greedy (``StepInput.greedy``), else their
    logits over the whole vocabulary."""

    tokens: torch.Tensor | None = None  # int64 [n] on the device
    logits: torch.Tensor | None = None  # [n, V]
    prompt_logits: torch.Tensor | None = None  # [len(StepInput.prompt_rows), V], when there are such rows

    @classmethod
    def empty(cls, step: StepInput, device: torch.device) -> StepOutput:
        """The output of a step in which no row samples."""
        none = torch.empty(0, device=device)
        return cls(tokens=none) if step.greedy else cls(logits=none)

    @property
    def rows(self) -> torch.Tensor:
        """Whichever of the two the step produced."""
        out = self.tokens if self.tokens is not None else self.logits
        assert out is not None
        return out


class ModelRunner:
    """Runs :class:`StepInput` on one rank's model (shard) and KV pool."""

    def __init__(self, model: CausalLM, kv_pool: KVCachePool, backend: AttentionBackend) -> None:
        self.model = model
        self.pool = kv_pool
        self.backend = backend
        self.device = kv_pool.device
        self.block_size = kv_pool.spec.block_size
        self.kv_caches = [kv_pool.layer(i) for i in range(kv_pool.spec.num_layers)]
        self.graphs: DecodeGraphs | None = None

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Record decode steps as CUDA graphs (needs a backend that supports capture)."""
        if self.device.type != "cuda" or not self.backend.supports_cuda_graphs():
            return
        width = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.backend, self.kv_caches, max_batch, width, max_model_len,
                                   self.device)
        self.graphs.capture()

    def run_kv_ops(self, ops: list[KVOp]) -> None:
        for kind, pairs in ops:
            if kind == "swap_out":
                self.pool.swap_out(pairs)
            elif kind == "copy":
                self.pool.copy_blocks(pairs)
            elif kind == "swap_in":
                self.pool.swap_in(pairs)
            else:  # pragma: no cover - scheduler bug
                raise ValueError(f"unknown KV op {kind!r}")

    @torch.inference_mode()
    def execute(self, step: StepInput, prev: torch.Tensor | None = None) -> StepOutput:
        """Run one step (see :class:`StepOutput` for what comes back).

        ``prev`` (int64 ``[step.num_prev]`` on the device): the previous step's samples, needed
        exactly when ``step.from_prev`` is not empty."""
        if bool(step.from_prev) != (prev is not None):
            raise ValueError("prev must be given exactly when step.from_prev is not empty")
        self.run_kv_ops(step.kv_ops)
        if step.is_empty:
            return StepOutput.empty(step, self.device)
        batch = self.host_batch(step)
        ids = self.input_ids(step, prev)
        if self.graphs is not None and step.is_decode and not step.prompt_rows and self.graphs.fits(batch):
            return self._replay(step, batch, ids)
        return self._forward(step, batch, ids)

    def input_ids(self, step: StepInput, prev: torch.Tensor | None) -> list[int] | torch.Tensor:
        """The step's input ids: ``step.token_ids``, with the rows of ``from_prev`` gathered from
        ``prev`` on the device (nothing here waits for the device)."""
        if prev is None:
            return step.token_ids
        dst, src = (list(col) for col in zip(*step.from_prev))
        if len(dst) == len(step.token_ids) == prev.shape[0] and dst == src == list(range(len(dst))):
            return prev  # the same rows as the previous step, in the same order
        ids = to_device(step.token_ids, torch.long, self.device)
        ids[to_device(dst, torch.long, self.device)] = prev.index_select(0, to_device(src, torch.long, self.device))
        return ids

    def host_batch(self, step: StepInput) -> HostBatch:
        """The step's positions, slots and block tables on the host (eager and graph steps alike)."""
        return HostBatch.build(step.query_lens, step.seq_lens, step.block_tables, self.block_size)

    def _replay(self, step: StepInput, batch: HostBatch, ids: list[int] | torch.Tensor) -> StepOutput:
        """A pure-decode step through the captured graphs (with ``step.greedy``, the graphs' argmax)."""
        assert self.graphs is not None
        out = self.graphs.run(batch, ids, greedy=step.greedy)
        return StepOutput(tokens=out) if step.greedy else StepOutput(logits=self.model.gather_logits(out))

    def _forward(self, step: StepInput, batch: HostBatch, ids: list[int] | torch.Tensor) -> StepOutput:
        input_ids, positions, meta, sample_idx = self.prepare(step, ids, batch)
        ctx = ForwardContext(meta=meta, kv_caches=self.kv_caches, backend=self.backend,
                             total_lens=self.token_total_lens(step, batch))
        hidden = self.model(input_ids, positions, ctx)
        prompt_logits = self._prompt_logits(step, hidden)
        if not step.sample_rows:
            out = StepOutput.empty(step, self.device)
        else:
            if sample_idx is not None:
                hidden = hidden.index_select(0, sample_idx)
            out = self._output(step, self.model.compute_logits(hidden, gather=False))
        out.prompt_logits = prompt_logits
        return out

    def _prompt_logits(self, step: StepInput, hidden: torch.Tensor) -> torch.Tensor | None:
        """The full logits of ``step.prompt_rows`` (collective under tensor parallelism, like
        every rank's step)."""
        if not step.prompt_rows:
            return None
        idx = to_device(step.prompt_rows, torch.long, self.device)
        return self.model.gather_logits(self.model.compute_logits(hidden.index_select(0, idx), gather=False))

    def token_total_lens(self, step: StepInput, batch: HostBatch) -> torch.Tensor | None:
        """Each new token's sequence length (``StepInput.total_lens``) on the device, for a model
        that uses it (else None)."""
        if step.total_lens is None or not self.model.uses_total_lens:
            return None
        lens = np.repeat(np.asarray(step.total_lens, dtype=np.int64), batch.query_lens)
        return upload(torch.from_numpy(lens), self.device)

    def _output(self, step: StepInput, logits: torch.Tensor) -> StepOutput:
        """This rank's vocabulary slice of the sampled rows' logits -> the step's output; every
        rank runs the same collectives here."""
        if not step.greedy:
            return StepOutput(logits=self.model.gather_logits(logits))
        return StepOutput(tokens=self.model.greedy_tokens(logits))

    def prepare(self, step: StepInput, ids: list[int] | torch.Tensor | None = None, batch: HostBatch | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]:
        """``(input_ids, positions, metadata, sample_idx)`` of an eager step (``ids``: its
        :meth:`input_ids`, default ``step.token_ids``; ``batch``: its :meth:`host_batch`, if
        already made); ``sample_idx`` is None when every token samples (a decode batch)."""
        if batch is None:
            batch = self.host_batch(step)
        meta = AttentionMetadata.from_host(batch, self.device)
        if ids is None:
            ids = step.token_ids
        input_ids = ids if isinstance(ids, torch.Tensor) else \
            torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        positions = torch.from_numpy(batch.positions).to(self.device, non_blocking=True)
        if len(step.sample_rows) == batch.num_tokens:
            return input_ids, positions, meta, None
        sample_idx = torch.from_numpy(np.asarray(step.sample_rows, dtype=np.int64)).to(self.device, non_blocking=True)
        return input_ids, positions, meta, sample_idx
