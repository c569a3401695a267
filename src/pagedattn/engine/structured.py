"""Structured output: generation constrained to a JSON schema, a regex, a choice or a grammar.

xgrammar does the work.  A request's constraint (:class:`StructuredOutputsParams`, vLLM's
name) is compiled once against the model's tokenizer (``GrammarCompiler``, which caches by the
grammar's text) when the request is validated, so a bad schema is a ``ValueError`` naming it
before anything is queued.  Each sample then gets its own ``GrammarMatcher``
(:func:`new_matchers`); every step the sampler fills one token bitmask per constrained row on
the host (:func:`fill_bitmask`), uploads it once for the whole batch and sets the logits of the
tokens the grammar forbids to -inf on the device (:func:`apply_bitmask`); the engine feeds the
sampled token back to the matcher (:func:`accept_token`).  The matcher allows the
end-of-sequence token only where the grammar is complete, and the sample stops when the
matcher terminates.

The engine calls this module from four places (validation, request creation, the sampling row
and the token append).  The next bitmask needs the token just sampled, so under async
scheduling a step with constrained rows samples only after the previous step's tokens have
advanced the matchers, while its own forward runs.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from ..transfer import upload

if TYPE_CHECKING:  # xgrammar loads only when a request asks for structured output
    import xgrammar

# The one constraint a request may carry, in the order they are checked.
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_OFFLINE = "SamplingParams.structured_outputs"


class StructuredOutputError(ValueError):
    """A constraint that does not compile; ``param`` names where it came from (the server's request field)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint (vLLM's ``StructuredOutputsParams``):

    * ``json``: a JSON schema (a dict, or its JSON text);
    * ``regex``: a regular expression the whole output matches;
    * ``choice``: a list of strings, the output is one of them;
    * ``grammar``: an EBNF grammar (GBNF style, rule ``root``);
    * ``json_object``: any JSON object (OpenAI's ``response_format: {"type": "json_object"}``).

    ``origin`` is the name a compile error starts with (the server puts the request field there)."""

    json: dict[str, Any] | bool | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    origin: str = field(default=_OFFLINE, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"{self.origin}: give exactly one of {', '.join(_KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json" and not isinstance(value, (dict, bool, str)):
            raise ValueError(f"{self.origin}.json: must be a JSON schema (an object, or its JSON text)")
        if kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise ValueError(f"{self.origin}.{kind}: must be a non-empty string")
        if kind == "choice" and (isinstance(value, str) or not isinstance(value, Sequence) or not value
                                 or any(not isinstance(c, str) or not c for c in value)):
            raise ValueError(f"{self.origin}.choice: must be a non-empty list of non-empty strings")
        if kind == "json_object" and value is not True:
            raise ValueError(f"{self.origin}.json_object: must be true")
        if kind == "choice":
            self.choice = list(value)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def where(self) -> str:
        """What an error names: the field of SamplingParams offline, the request field in the server."""
        return f"{self.origin}.{self.kind}" if self.origin == _OFFLINE else self.origin


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (JSON string escapes are xgrammar's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ", re.MULTILINE)


def _reason(e: Exception) -> str:
    """xgrammar's message without its C++ log prefix (time, source file and line)."""
    text = _LOG_PREFIX.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


class GrammarCompilerCache:
    """The engine's compiler: xgrammar's ``TokenizerInfo`` of the model's tokenizer and a
    caching ``GrammarCompiler``, both built on first use (thread-safe: the server validates
    requests on worker threads).

    ``vocab_size`` is the width of the model's logits, which may be more than the tokenizer's
    tokens (padded embeddings): the ids beyond are never allowed."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(self._without_special_tokens(info), cache_enabled=True)
            return self._compiler

    def _without_special_tokens(self, info: xgrammar.TokenizerInfo) -> xgrammar.TokenizerInfo:
        """``info`` with the tokenizer's special tokens (control tokens such as ``<|im_start|>``,
        ``<s>``) as xgrammar's special tokens, which no grammar allows: xgrammar reads them as
        their literal text (e.g. inside a JSON string), but the detokenizer skips them, so the
        output's text would lose characters the grammar counted.  Stop tokens stay: the grammar's
        end is one of them."""
        import xgrammar as xgr

        tok = self.tokenizer
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        special -= set(self.stop_token_ids)
        vocab: list[bytes | str] = [""] * self.vocab_size
        for text, i in tok.get_vocab().items():
            if i < self.vocab_size and i not in special:
                vocab[i] = text
        return xgr.TokenizerInfo.from_vocab_and_metadata(vocab, info.dump_metadata())

    def compile(self, p: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """The compiled grammar of ``p`` (cached); a ``ValueError`` naming ``p.origin`` if it is invalid."""
        if self.tokenizer is None:
            raise ValueError(f"{p.origin}: structured output needs the model's tokenizer, and this model has none")
        kind = p.kind
        c = self.compiler
        try:
            if kind == "json":
                return c.compile_json_schema(_schema_text(p), any_whitespace=False)
            if kind == "json_object":  # compact, as the schemas' JSON: no runs of blanks to wander into
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                assert p.regex is not None
                return c.compile_regex(p.regex)
            if kind == "choice":
                assert p.choice is not None
                return c.compile_grammar(choice_grammar(p.choice))
            assert p.grammar is not None
            return c.compile_grammar(p.grammar)
        except ValueError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError (and its own errors) for bad input
            raise StructuredOutputError(p.origin, f"{p.where}: invalid {_WHAT[kind]}: {_reason(e)}") from None

    def new_matchers(self, p: StructuredOutputsParams | None, n: int) -> list[SampleGrammar | None]:
        """One fresh matcher per sample (None each without a constraint)."""
        if p is None:
            return [None] * n
        import xgrammar as xgr

        compiled = self.compile(p)
        return [SampleGrammar(xgr.GrammarMatcher(compiled), self.vocab_size) for _ in range(n)]


@dataclass
class SampleGrammar:
    """One sample's place in its grammar, and the width of the logits it masks."""

    matcher: xgrammar.GrammarMatcher
    vocab_size: int


_WHAT = {"json": "JSON schema", "regex": "regular expression", "grammar": "EBNF grammar", "choice": "choice",
         "json_object": "JSON grammar"}


def _schema_text(p: StructuredOutputsParams) -> str:
    schema = p.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(p.origin, f"{p.where}: not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError(p.origin, f"{p.where}: a JSON schema is an object (or true/false), got "
                                    f"{type(schema).__name__}")
    return json.dumps(_strict_bounded_strings(schema))


def _strict_bounded_strings(node: Any) -> Any:
    """``node`` with each length-bounded string given a pattern of the characters JSON allows
    unescaped: xgrammar (0.2.9) compiles ``minLength``/``maxLength`` into a character class that
    admits raw control characters, which makes the output invalid JSON.  The pattern keeps the
    bounds and also leaves out quotes and backslashes (such a string cannot hold escapes)."""
    if isinstance(node, list):
        return [_strict_bounded_strings(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_bounded_strings(v) for k, v in node.items()}
    bounds = [out[k] for k in ("minLength", "maxLength") if k in out]
    if out.get("type") == "string" and bounds and all(type(b) is int and b >= 0 for b in bounds) and \
            not {"pattern", "format", "enum", "const"} & out.keys():
        lo, hi = out.get("minLength", 0), out.get("maxLength", "")
        out["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{lo},{hi}}}$'
    return out


# ====================================================================== per step
@dataclass
class TokenBitmask:
    """One step's masks: ``bitmask [n, ceil(V/32)]`` on the device, applied to ``rows`` only."""

    bitmask: torch.Tensor
    rows: list[int]


def fill_bitmask(grammars: Sequence[SampleGrammar | None], device: torch.device) -> TokenBitmask | None:
    """The allowed tokens of every constrained row (``grammars[i]`` None: unconstrained), filled
    on the host and uploaded at once; None when no row is constrained."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return None
    import xgrammar as xgr

    matchers = [g.matcher for g in grammars if g is not None]
    bitmask = xgr.allocate_token_bitmask(len(grammars), cast(SampleGrammar, grammars[rows[0]]).vocab_size)
    _batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, rows)
    return TokenBitmask(upload(bitmask, device), rows)


@functools.cache
def _batch_matcher() -> xgrammar.BatchGrammarMatcher:
    """xgrammar's batch filler: the rows' masks on a pool of threads (half the cores), which
    matters with hundreds of constrained rows a step (docs/benchmarks.md, structured output)."""
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher(max_threads="auto")


def allows_only(grammar: SampleGrammar, tokens: Sequence[int]) -> bool:
    """Whether ``grammar`` allows no next token outside ``tokens`` (e.g. it is complete and can
    only end, with its end token among them).  Fills one mask on the host: for the rare rows that
    ban tokens (before ``min_tokens``), not for every row."""
    import xgrammar as xgr

    mask = xgr.allocate_token_bitmask(1, grammar.vocab_size)
    grammar.matcher.fill_next_token_bitmask(mask)
    words = mask[0].to(torch.int64) & 0xFFFFFFFF
    allowed = ((words[:, None] >> torch.arange(32)) & 1).flatten()[:grammar.vocab_size].bool()
    allowed[list(tokens)] = False
    return not bool(allowed.any())


def apply_bitmask(logits: torch.Tensor, mask: TokenBitmask, inplace: bool = False) -> torch.Tensor:
    """``logits`` with the forbidden tokens of the constrained rows at -inf: the same tensor with
    ``inplace``, else a copy (the caller's logits stay as they were, e.g. for log-probabilities).
    Ids beyond the bitmask (a model vocabulary wider than the grammar's) are forbidden too."""
    import xgrammar as xgr

    cpu = logits.device.type == "cpu"
    out = logits.float() if cpu else logits  # xgrammar's CPU kernel takes float32
    if out is logits and not inplace:
        out = logits.clone()
    covered = mask.bitmask.shape[1] * 32
    if out.shape[1] > covered:
        out[mask.rows, covered:] = float("-inf")
    # vocab_size only when it differs from the logits' width: with it, "auto" picks a slower kernel.
    vocab = covered if out.shape[1] > covered else None
    xgr.apply_token_bitmask_inplace(out, mask.bitmask, vocab_size=vocab, indices=mask.rows,
                                    backend="cpu" if cpu else "auto")
    return out


def accept_token(seq: Any, token_id: int) -> None:
    """Advance ``seq``'s matcher by the token it just sampled (no-op without one).  A token the
    grammar rejects is an error of this sample's request; a terminated matcher (the grammar is
    complete and its end token was sampled) finishes the sample."""
    if seq.grammar is None:
        return
    m = seq.grammar.matcher
    if m.is_terminated():
        return
    if not m.accept_token(token_id):
        raise ValueError(f"structured output: the grammar rejected token {token_id}")
    if m.is_terminated() and seq.finish_reason is None:
        seq.finish_reason = "stop"
