"""What happens to sampled tokens on the host: samples fan out, tokens are appended and
detokenized, stop conditions are checked, finished sequences give their blocks back, and each
request touched by a step is reported as a :class:`RequestOutput`."""

from __future__ import annotations

import logging
import time
from typing import Any

from .detokenizer import detokenize_incrementally, finish_detokenizing
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams
from .scheduler import Scheduler
from .sequence import Request, Sequence
from .structured import accept_token

logger = logging.getLogger(__name__)

Target = tuple[Sequence, Request]


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, tokenizer: Any, eos_token_ids: set[int], max_model_len: int) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids  # the engine's set, shared with the sampler
        self.max_model_len = max_model_len
        self.num_generated_tokens = 0

    def apply(self, targets: list[Target], token_ids: list[int], logprobs: list[dict[int, float] | None] | None = None,
              sampled_logprobs: list[float | None] | None = None) -> list[Request]:
        """Append one sampled token per target, check stop conditions; the requests touched.

        What goes wrong with one sequence (its detokenizer, its stop check) fails its request
        alone: the request finishes with ``finish_reason="error"``, its blocks are freed and the
        other requests of the step go on."""
        n = len(targets)
        rows = [(t, tok, lp, slp) for t, tok, lp, slp in zip(targets, token_ids, logprobs or [None] * n,
                                                             sampled_logprobs or [None] * n)
                if not t[0].finished and t[1].error is None]  # aborted, or stopped after the step's launch
        for req in {id(r): r for (s, r), *_ in rows if s.index > 0 and s.num_output_tokens == 0}.values():
            self.scheduler.fork(req)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for (seq, req), tok, lp, slp in rows:
            touched[req.request_id] = req
            if req.error is not None:  # failed on an earlier row of this step
                continue
            try:
                self._append(req, seq, tok, lp, slp, now)
            except Exception as e:
                self.fail(req, e)
            if seq.finish_reason is not None:
                self.scheduler.free_seq(seq)
        self.num_generated_tokens += len(rows)
        for req in touched.values():
            if req.finished:
                self.scheduler.finish(req)
        return list(touched.values())

    def fail(self, req: Request, error: BaseException) -> None:
        """Finish ``req`` now with ``finish_reason="error"`` and free its blocks."""
        logger.error("request %s failed", req.request_id, exc_info=(type(error), error, error.__traceback__))
        req.error = f"{type(error).__name__}: {error}"
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "error"
                self._text_so_far(req, s)
        self.scheduler.finish(req)

    def _text_so_far(self, req: Request, seq: Sequence) -> None:
        """A failed sequence reports the text of the tokens it got; where that text is made
        only at the end, make it now (best effort: the detokenizer may be what failed)."""
        if self.tokenizer is None or _text_grows(req):
            return
        try:
            finish_detokenizing(self.tokenizer, seq, req.params.skip_special_tokens)
        except Exception:
            logger.exception("request %s: no text for its failed sample %d", req.request_id, seq.index)

    def _append(self, req: Request, seq: Sequence, tok: int, lp: dict[int, float] | None, slp: float | None,
                now: float) -> None:
        seq.token_ids.append(tok)
        if seq.grammar is not None:  # structured output: advance the sample's grammar
            accept_token(seq, tok)
        # A token the device computes already (the overlapped loop launched the next step before
        # this one's tokens came back): its block was left uncommitted until the token was known.
        # Otherwise the launch of the step that computed the sequence committed all there is.
        if seq.num_computed_tokens >= len(seq.token_ids):
            self.scheduler.commit(seq)
        if lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += slp or 0.0
        if req.first_token_time is None:
            req.first_token_time = now
        self._check_stop(req, seq, tok)
        if seq.finish_reason is not None:
            self._finish_text(req, seq)

    def _check_stop(self, req: Request, seq: Sequence, tok: int) -> None:
        p = req.params
        n_out = seq.num_output_tokens
        if self.tokenizer is not None and _text_grows(req):
            detokenize_incrementally(self.tokenizer, seq, p.skip_special_tokens)
        if n_out < p.min_tokens:  # before min_tokens nothing but the length limits stops
            # and the text so far is never searched for stop strings: later checks look only at
            # text that ends past it (vLLM's rule; a stream may have sent this text already).
            seq.stop_checked_len = len(seq.text)
        else:
            if not p.ignore_eos and tok in self.eos_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", None
                return
            if p.stop_token_ids and tok in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", tok
                return
            if p.stop_list and check_stop_strings(seq, p):
                return
        if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def _finish_text(self, req: Request, seq: Sequence) -> None:
        """A finished sequence gets the text its detokenizer still held back (a character or byte
        run cut off at the end), which may hold a stop string; one whose text is made only at the
        end (see _check_stop) gets all of it, from one decode."""
        p = req.params
        if self.tokenizer is None or isinstance(seq.stop_reason, str):  # a stop string already cut the text
            return
        finish_detokenizing(self.tokenizer, seq, p.skip_special_tokens)
        if p.stop_list and seq.num_output_tokens >= p.min_tokens:
            check_stop_strings(seq, p)


def _text_grows(req: Request) -> bool:
    """Whether ``req``'s text is made as its tokens come (what a streaming request reports at
    each step, and what stop strings are found in); any other sequence's text is made once,
    when it finishes (one decode instead of one per token)."""
    return req.stream or bool(req.params.stop_list)


def check_stop_strings(seq: Sequence, p: SamplingParams) -> bool:
    longest = max(len(s) for s in p.stop_list)
    start = max(0, seq.stop_checked_len - longest + 1)
    hit_at, hit = -1, None
    for s in p.stop_list:
        i = seq.text.find(s, start)
        if i != -1 and (hit_at == -1 or i < hit_at):
            hit_at, hit = i, s
    seq.stop_checked_len = len(seq.text)
    if hit is None:
        return False
    seq.text = seq.text[: hit_at + (len(hit) if p.include_stop_str_in_output else 0)]
    seq.finish_reason, seq.stop_reason = "stop", hit
    return True


def request_output(req: Request) -> RequestOutput:
    """What the user sees of ``req`` now, as ``req.params.output_kind`` says: everything so far,
    or only what is new since its previous output (DELTA).  Made for every streaming request at
    every step, so its records are built with positional arguments (in their fields' order:
    half the cost of keywords, ~2 us less a request and step)."""
    want_lp = req.params.logprobs is not None
    delta = req.params.output_kind == RequestOutputKind.DELTA
    outs = []
    for s in req.seqs:
        if delta:
            c = _delta_output(s, want_lp, req.params)
            if c is not None:
                outs.append(c)
        elif s.num_output_tokens > 0 or s.finish_reason is not None:
            # index, text, token_ids (a fresh slice), cumulative_logprob, logprobs, finish_reason, stop_reason
            outs.append(CompletionOutput(s.index, s.text, s.output_token_ids,
                                         s.cumulative_logprob if want_lp else None,
                                         list(s.logprobs) if want_lp else None, s.finish_reason, s.stop_reason))
    m = {"arrival_time": req.arrival_time}
    if req.first_token_time is not None:
        m["first_token_time"] = req.first_token_time
    plp = req.prompt_logprobs
    if plp is not None and delta and req.reported:
        plp = None  # a delta stream carries them once, in its first output
    req.reported = True
    # request_id, prompt, prompt_token_ids, outputs, finished, num_cached_tokens, metrics, error, prompt_logprobs
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                         req.num_cached_tokens or 0, m, req.error, list(plp) if plp is not None else None)


def _delta_output(s: Sequence, want_lp: bool, p: SamplingParams) -> CompletionOutput | None:
    """What of sample ``s`` its previous outputs did not carry; None when nothing is new.

    While it runs, the text's last ``len(longest stop string) - 1`` characters are held back: a
    stop string completed by a later token is cut from the text, and a part of it already sent
    could not be taken back.  (Text before that point never changes: the detokenizer only
    appends, and a stop string is cut where it starts, which is past what was sent.)"""
    if s.sent_finish:
        return None
    done = s.finish_reason is not None
    n0, n1 = s.sent_tokens, s.num_output_tokens
    end = len(s.text)
    if not done and p.stop_list:
        end = max(s.sent_text, end - (max(map(len, p.stop_list)) - 1))
    if n1 == n0 and end == s.sent_text and not done:
        return None
    text = s.text[s.sent_text:end]
    toks = s.token_ids[s.prompt_len + n0:]
    s.sent_tokens, s.sent_text, s.sent_finish = n1, end, done
    # index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason
    return CompletionOutput(s.index, text, toks, s.cumulative_logprob if want_lp else None,
                            s.logprobs[n0:n1] if want_lp else None, s.finish_reason, s.stop_reason)
