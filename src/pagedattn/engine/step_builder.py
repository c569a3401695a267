"""Turns the scheduler's decisions into the plain record every rank runs (:class:`StepInput`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..runtime.model_runner import StepInput
from .prompt_logprobs import prompt_positions
from .scheduler import SchedulerOutput

# A sequence's pending token (overlapped scheduling) in ``StepInput.token_ids``: the runner
# replaces it with the previous step's sample on the device.
_PLACEHOLDER = 0


class StepBuilder:
    """Turns the scheduler's decisions into :class:`StepInput` (reads block tables only)."""

    def __init__(self, block_table: Callable[[str], Sequence[int]]) -> None:
        self.block_table = block_table

    def build(self, sched: SchedulerOutput, prev_rows: Mapping[str, int] | None = None,
              prev_greedy: bool = False) -> StepInput:
        """``prev_rows``: the rows of the step still in flight, by sequence id, whose samples are
        pending tokens of this step's sequences (see :class:`StepInput`)."""
        rows = sched.scheduled
        step = StepInput(
            kv_ops=list(sched.kv_ops), prev_greedy=prev_greedy, num_prev=len(prev_rows or ()),
            greedy=all(s.request.plain_greedy for s in rows if s.samples),
            query_lens=[s.num_new_tokens for s in rows],
            seq_lens=[s.start + s.num_new_tokens for s in rows],
            total_lens=[s.seq.num_tokens + s.seq.num_pending for s in rows],
            block_tables=[self.block_table(s.seq.seq_id) for s in rows])
        tokens = step.token_ids
        for s in rows:
            seq, c, n = s.seq, s.start, s.num_new_tokens
            if s.request.prompt_logprobs is not None:
                step.prompt_rows.extend(len(tokens) + p - c for p in prompt_positions(s.request, seq, c, n))
            known = seq.token_ids[c:c + n]
            tokens.extend(known)
            if len(known) < n:  # the last one is pending: it comes from the step in flight
                assert prev_rows is not None and len(known) == n - 1, "only the last token can be pending"
                step.from_prev.append((len(tokens), prev_rows[seq.seq_id]))
                tokens.append(_PLACEHOLDER)
            if s.samples:
                step.sample_rows.append(len(tokens) - 1)
        if not step.from_prev:
            step.num_prev = 0
        return step
