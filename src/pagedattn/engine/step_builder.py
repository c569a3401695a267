"""Turns the scheduler's decisions into the plain record every rank runs (:class:`StepInput`)."""

from __future__ import annotations

from ..cache.block_manager import BlockManager
from ..runtime.model_runner import KVOp, StepInput
from .prompt_logprobs import prompt_positions
from .scheduler import SchedulerOutput
from .sequence import Sequence


class StepBuilder:
    """Turns the scheduler's decisions into :class:`StepInput` (reads the block manager only)."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.bm = block_manager

    def build(self, sched: SchedulerOutput) -> StepInput:
        step = StepInput(kv_ops=list(sched.kv_ops))
        step.greedy = all(s.request.params.plain_greedy for s in sched.scheduled if s.samples)
        tokens: list[int] = []
        assert step.token_ids is not None
        table_of = self.bm.block_table
        end = 0
        for s in sched.scheduled:
            c, n = s.seq.num_computed_tokens, s.num_new_tokens
            tokens.extend(s.seq.token_ids[c:c + n])
            step.query_lens.append(n)
            step.seq_lens.append(c + n)
            step.block_tables.append(table_of(s.seq.seq_id))
            step.prompt_rows.extend(end + p - c for p in prompt_positions(s.request, s.seq, c, n))
            end += n
            if s.samples:
                step.sample_rows.append(end - 1)
        step.token_ids = tokens
        return step

    def lookahead(self, seqs: list[Sequence], kv_ops: list[KVOp], greedy: bool = False,
                  prev_rows: list[int] | None = None) -> StepInput:
        """Decode one position past each sequence's in-flight token, whose id exists only on the
        device (overlapped scheduling): its position is ``num_computed_tokens + 1``.
        ``prev_rows``: see :class:`StepInput` (only when the in-flight step was greedy)."""
        n = len(seqs)
        table_of = self.bm.block_table
        return StepInput(
            kv_ops=kv_ops, query_lens=[1] * n, seq_lens=[q.num_computed_tokens + 2 for q in seqs],
            block_tables=[table_of(q.seq_id) for q in seqs], token_ids=None, sample_rows=list(range(n)),
            greedy=greedy, prev_rows=prev_rows,
        )
