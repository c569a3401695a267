"""What the engine returns (vLLM's offline-API shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)
    # Why the request failed (finish_reason "error"): something went wrong with it alone, e.g.
    # in its detokenizer or its sampling row; the engine and the other requests went on.
    error: str | None = None
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then per token a dict
    # id -> logprob holding the token itself and the top-k (vLLM's shape).
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def add(self, later: RequestOutput) -> None:
        """Append ``later``, the next DELTA output of the same request, to this one (a consumer
        that fell behind reads several deltas as one): each sample's text, token ids and
        logprobs are joined; its finish and running logprob, and the request's state, are the
        later output's."""
        by_index = {c.index: c for c in self.outputs}
        for c in later.outputs:
            mine = by_index.get(c.index)
            if mine is None:
                self.outputs.append(c)
                by_index[c.index] = c
                continue
            mine.text += c.text
            mine.token_ids = mine.token_ids + c.token_ids
            if c.logprobs is not None:
                mine.logprobs = (mine.logprobs or []) + c.logprobs
            mine.cumulative_logprob, mine.finish_reason, mine.stop_reason = \
                c.cumulative_logprob, c.finish_reason, c.stop_reason
        self.outputs.sort(key=lambda c: c.index)
        self.finished, self.metrics, self.error = later.finished, later.metrics, later.error
        self.num_cached_tokens = later.num_cached_tokens
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
