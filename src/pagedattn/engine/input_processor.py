"""Requests in: a prompt (text, token ids or a dict) and its sampling parameters become a
:class:`Request`, after every check it must pass and before it touches any engine state."""

from __future__ import annotations

from typing import Any

import torch

from ..cache.block_manager import cdiv
from .logits_processors import check_token_fields
from .sampling_params import RequestOutputKind, SamplingParams
from .sequence import Request, SeedStream, Sequence
from .structured import GrammarCompilerCache

PromptInput = str | list[int] | dict[str, Any]


class InputProcessor:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int, block_size: int, num_blocks: int,
                 device: torch.device, grammars: GrammarCompilerCache) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device

    def make_request(self, request_id: str, prompt: PromptInput, params: SamplingParams, extra_key: object = None,
                     stream: bool = True) -> Request:
        text, ids = self.prepare(prompt, params)
        stream = stream and params.output_kind != RequestOutputKind.FINAL_ONLY
        req = Request(request_id, text, ids, params, extra_key=extra_key, stream=stream,
                      bad_words_ids=check_token_fields(params, self.vocab_size, self._encode_words))
        for i in range(1, params.n):
            req.seqs.append(Sequence(f"{request_id}#{i}", i, list(ids), len(ids)))
        for s, grammar in zip(req.seqs, self.grammars.new_matchers(params.structured_outputs, params.n)):
            s.grammar = grammar  # structured output: each sample its own matcher
            if params.seed is not None:
                s.seed = SeedStream(hash((params.seed, s.index)) & 0x7FFF_FFFF_FFFF_FFFF)
        return req

    @property
    def _encode_words(self) -> Any:
        """The tokenizer's encoding of a text without special tokens (None: no tokenizer)."""
        tok = self.tokenizer
        return None if tok is None else (lambda text: tok.encode(text, add_special_tokens=False))

    def prepare(self, prompt: PromptInput, params: SamplingParams) -> tuple[str | None, list[int]]:
        """The prompt's text and token ids as the request will run them (tokenized, truncated as
        ``params.truncate_prompt_tokens`` asks), checked by :meth:`validate`.  A truncated
        prompt has no text: its ids are what it is."""
        text, ids = self.tokenize(prompt)
        keep = params.truncate_prompt_tokens if isinstance(params, SamplingParams) else None
        if keep is not None:
            keep = self.max_model_len - 1 if keep == -1 else keep
            if len(ids) > keep:
                text, ids = None, ids[len(ids) - keep:]
        self.validate(ids, params)
        return text, ids

    def tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt")
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"prompt: must be a string, got {type(text).__name__}")
                return text, _token_ids(prompt["prompt_token_ids"], "prompt_token_ids")
            if "prompt" not in prompt:
                raise ValueError("prompt: a prompt dict needs 'prompt_token_ids' or 'prompt'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: empty string")
            _check_unicode(prompt, "prompt")
            if self.tokenizer is None:
                raise ValueError("prompt: this model folder has no tokenizer; pass token ids instead")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, _token_ids(prompt, "prompt")
        raise ValueError(f"prompt: must be a string, a list of token ids or a dict; got {type(prompt).__name__}")

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Every check a request must pass, before it touches any engine state."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise ValueError("prompt: empty (no tokens)")
        vocab = self.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids: ids {bad[:5]} outside the vocabulary [0, {vocab})")
        bad = [t for t in params.stop_token_ids or () if t >= vocab]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids: ids {bad[:5]} outside the vocabulary [0, {vocab})")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"SamplingParams.logprobs: {params.logprobs} is more than the vocabulary's {vocab} tokens")
        check_token_fields(params, vocab, self._encode_words)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(prompt_ids)} tokens does not fit the model's context of {self.max_model_len} "
                "(at least one token must be generated)"
            )
        total = min(len(prompt_ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        need = cdiv(total, self.block_size) * params.n
        if need > self.num_blocks:
            raise ValueError(
                f"num_kv_blocks: the KV pool ({self.num_blocks} blocks of {self.block_size}) is too small for "
                f"this request ({need} blocks for {total} tokens x n={params.n}); use a larger pool or a "
                "smaller max_tokens"
            )
        if params.structured_outputs is not None:  # compiled (and cached) now: a bad schema fails here
            self.grammars.compile(params.structured_outputs)


def _token_ids(ids: object, name: str) -> list[int]:
    """A prompt's token ids as a list of ints; a ValueError naming ``name`` for anything else."""
    if isinstance(ids, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return list(ids)
    what = type(ids).__name__ if not isinstance(ids, (list, tuple)) else \
        f"a list holding {next(type(t).__name__ for t in ids if not isinstance(t, int) or isinstance(t, bool))}"
    raise ValueError(f"{name}: must be a list of integer token ids, got {what}")


def _check_unicode(text: str, name: str) -> None:
    """Text the tokenizer can take: no lone surrogates (JSON's "\\ud800" or Python's "\\udc80")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: not valid Unicode text ({e.reason} at character {e.start})") from None
