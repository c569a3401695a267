"""A step's sampling rows: their parameters, a device path that never waits for the device (for
steps left in flight), and a host path that isolates a row whose sampling fails."""

from __future__ import annotations

import torch

from .output_processor import Target
from .sampler import Sampler, SamplerOutput, SamplingBatch, SamplingRow, sampling_row
from .sequence import Request, Sequence


class StepSampler:
    def __init__(self, sampler: Sampler, eos_token_ids: set[int]) -> None:
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids  # the engine's set, shared with the stop checks

    def row(self, seq: Sequence, req: Request, launched: bool = False) -> SamplingRow:
        return sampling_row(seq, req, self.eos_token_ids, launched)

    def batch(self, targets: list[Target], prev: list[Target] | None, prev_batch: SamplingBatch | None,
              launched: bool = False) -> SamplingBatch:
        """The rows' device tensors; the previous step's when its rows were the same and neither
        it nor this step changes the logits (a ban until min_tokens, made for the previous step,
        may no longer hold now).  ``launched``: the rows' step is already counted as pending (see
        :func:`sampling_row`)."""
        if prev_batch is not None and prev is not None and prev_batch.stages is None and \
                prev_batch.grammar_mask is None and [s for s, _ in prev] == [s for s, _ in targets] and \
                all(s.num_output_tokens + s.num_pending >= r.params.min_tokens for s, r in targets):
            return prev_batch
        return self.sampler.prepare([self.row(seq, req, launched) for seq, req in targets])

    def on_host(self, targets: list[Target], out: torch.Tensor
                ) -> tuple[list[Target], SamplerOutput, list[tuple[Request, Exception]]]:
        """Sample every row (with log-probabilities where asked): the rows that sampled, their
        tokens, and the requests whose row raised (alone: the others still sample)."""
        rows = [self.row(seq, req) for seq, req in targets]
        try:
            return targets, self.sampler(out, rows), []
        except Exception:  # find the row at fault: sample each alone
            pass
        ok: list[Target] = []
        res = SamplerOutput([], [], [])
        failed: list[tuple[Request, Exception]] = []
        for i, ((seq, req), row) in enumerate(zip(targets, rows)):
            try:
                one = self.sampler(out[i:i + 1], [row])
            except Exception as e:
                failed.append((req, e))
                continue
            ok.append((seq, req))
            res.token_ids.append(one.token_ids[0])
            res.logprobs.append(one.logprobs[0])
            res.sampled_logprobs.append(one.sampled_logprobs[0])
        return ok, res, failed
