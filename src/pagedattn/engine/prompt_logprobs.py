"""Prompt logprobs (``SamplingParams.prompt_logprobs``): the logprob of every prompt token after
the first given the tokens before it, with the top-k alternatives, as vLLM returns them.

The logits at position ``p`` give the distribution of token ``p + 1``, so a prompt of ``P``
tokens needs the logits of positions ``0 .. P-2``; position ``P-1`` is the sampling row of the
first generated token.  Each prefill chunk asks the model runner for the full logits of its
positions in that range (``StepInput.prompt_rows``) that no earlier chunk computed (a request
preempted by recomputation computes its prompt again, but its logprobs once).  The scheduler
gives such a request no prefix-cache hit until they are all done: a cached position has K/V,
not logits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .sequence import Request, Sequence

_ROWS_AT_ONCE = 512


def prompt_positions(req: Request, seq: Sequence, start: int, num_new: int) -> range:
    """The positions of the chunk ``[start, start + num_new)`` of ``seq`` whose logits give prompt
    logprobs not computed yet."""
    if req.prompt_logprobs is None or seq.index != 0:
        return range(0)
    lo = max(start, len(req.prompt_logprobs) - 1)
    hi = min(start + num_new, seq.prompt_len - 1)
    return range(lo, max(lo, hi))


def record_prompt_logprobs(chunks: Iterable[tuple[Request, Sequence, int, int]], logits: torch.Tensor) -> None:
    """Append to each request's ``prompt_logprobs`` the entries of its chunk's rows of ``logits``
    (the step's ``prompt_logits``, rows in the order of ``chunks``: ``(request, sequence, start,
    new tokens)`` as scheduled)."""
    spans = [(req, prompt_positions(req, seq, c, n)) for req, seq, c, n in chunks]
    spans = [(req, r) for req, r in spans if len(r)]
    targets = [req.prompt_token_ids[p + 1] for req, r in spans for p in r]
    assert len(targets) == logits.shape[0], "prompt rows and scheduled chunks disagree"
    k = max(req.params.prompt_logprobs or 0 for req, _ in spans)
    ids = torch.tensor(targets, device=logits.device)
    chosen: list[float] = []
    top_v: list[list[float]] = []
    top_i: list[list[int]] = []
    for lo in range(0, len(targets), _ROWS_AT_ONCE):  # bounds the fp32 copy of a long chunk's logits
        lp = torch.log_softmax(logits[lo:lo + _ROWS_AT_ONCE].float(), dim=-1)
        chosen += lp.gather(1, ids[lo:lo + _ROWS_AT_ONCE, None]).squeeze(1).tolist()
        if k:
            values, indices = lp.topk(min(k, lp.shape[1]), dim=-1)
            top_v += values.tolist()
            top_i += indices.tolist()
    row = 0
    for req, r in spans:
        assert req.prompt_logprobs is not None
        kk = req.params.prompt_logprobs or 0
        for _ in r:
            d = {targets[row]: chosen[row]}
            if kk:
                for t, v in zip(top_i[row][:kk], top_v[row][:kk]):
                    d.setdefault(t, v)
            req.prompt_logprobs.append(d)
            row += 1
