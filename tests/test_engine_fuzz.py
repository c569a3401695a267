"""Random request mixes thrown at ``LLMEngine``: nothing crashes, nothing leaks, nothing changes.

Hypothesis draws an engine (tiny pools with swap or recompute preemption, prefix caching on and
off, chunked prefill, overlapped scheduling, a sliding-window model) and a mix of requests off
the happy path: n up to 6, max_tokens from 1, min_tokens, stop ids and stop strings placed on
the first tokens a request will produce, EOS on the first token (the tiny models' EOS is made
likely), prompts that fill the context, arrivals and aborts at
random steps, and structured output (a JSON object, a small schema, a regex, a choice: the tiny
tokenizer has the pieces of JSON).  After every step the block manager's invariants hold and
every constrained sample's grammar is where its output tokens put it; at the end no block is
held, every greedy request's samples equal that request run alone on a large pool, and every
constrained output is one its grammar allows (its text satisfies the constraint where the
grammar ended it).  Targeted tests below: an abort, swap and recompute preemption, and n
samples ending on their first token, while constrained steps are in flight.

``-m slow`` runs a longer profile.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import transformers
import xgrammar as xgr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models

from pagedattn import LLM, SamplingParams
from pagedattn.engine.llm_engine import LLMEngine
from pagedattn.engine.outputs import RequestOutput
from pagedattn.engine.structured import StructuredOutputsParams

from .engine_models import make_model_dir

VOCAB = 320
MAX_LEN = 40  # the engines' context: prompts near it leave room for one or two tokens
BLOCK = 4
FAMILIES = ("llama_mqa_tied", "mistral_window")  # the second has a sliding window of 12

S = StructuredOutputsParams
# A small schema with a bounded string: dropping characters from the text breaks its minLength.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
          "properties": {"a": {"type": "boolean"}, "b": {"type": "string", "minLength": 2, "maxLength": 3}}}
REGEX = r"(ab|c)[de]{1,3}( f)?"
CHOICES = ["ab", "c f", "dead"]
# The constraints a request of the mixes may carry, and what a complete output's text must satisfy.
CONSTRAINTS: tuple[tuple[StructuredOutputsParams, Callable[[str], object]], ...] = (
    (S(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    (S(json=SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    (S(regex=REGEX), lambda t: re.fullmatch(REGEX, t)),
    (S(choice=CHOICES), lambda t: t in CHOICES),
)


# ====================================================================== the models
# Pieces of JSON, so that structured output has tokens to build it from (single characters and
# a few longer runs, so a constrained output has more than one way to spell the same text).
JSON_PIECES = ('{', '}', '"', ':', ',', '[', ']', '0', '1', '2', '7', '-', 'true', 'false', 'null',
               '{"', '"}', '":', '": ', '", "', ', "', 't', 'r', 'u', 'l', 's', 'n')


def _token_strings() -> list[str]:
    """Distinct short strings over a small alphabet, so texts repeat and stop strings can
    span token boundaries, and the pieces of JSON."""
    alphabet = "abcde f"
    words = list(alphabet) + [a + b for a in alphabet for b in alphabet]
    words += [a + b + c for a in alphabet for b in alphabet for c in alphabet]
    words = [*JSON_PIECES, *(w for w in words if w not in JSON_PIECES)]
    return ["<unk>", "<s>", "</s>", *words[: VOCAB - 3]]


def _save_tokenizer(folder: Path) -> None:
    vocab = {s: i for i, s in enumerate(_token_strings())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", clean_up_tokenization_spaces=False)
    fast.save_pretrained(folder)


def _make_eos_frequent(folder: Path, eos: int = 2) -> None:
    """Scale the output embedding row of ``eos`` until greedy decoding picks it after about one
    in six random prompts, so many requests end on EOS, often on their first token."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = random.Random(0)
    prompts = [torch.tensor([[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 12))]]) for _ in range(48)]
    row = model.get_output_embeddings().weight[eos]
    with torch.no_grad():
        for _ in range(40):
            hits = sum(int(model(p).logits[0, -1].argmax()) == eos for p in prompts)
            if hits >= len(prompts) // 6:
                break
            row.mul_(1.1)
    assert hits >= len(prompts) // 6
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def fuzz_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-models")
    out = {}
    for family in FAMILIES:
        folder = make_model_dir(root, family, seed=3)
        _make_eos_frequent(folder)
        _save_tokenizer(folder)
        out[family] = folder
    return out


# ====================================================================== engines
@dataclass(frozen=True)
class EngineShape:
    family: str
    num_kv_blocks: int
    cpu_blocks: int
    preemption_mode: str
    enable_prefix_caching: bool
    max_num_batched_tokens: int
    max_num_seqs: int
    async_scheduling: bool


engine_shapes = st.builds(
    EngineShape,
    family=st.sampled_from(FAMILIES),
    num_kv_blocks=st.sampled_from([MAX_LEN // BLOCK, 12, 16, 64]),  # the smallest holds one full-length sequence
    cpu_blocks=st.sampled_from([4, 64]),
    preemption_mode=st.sampled_from(["swap", "recompute"]),
    enable_prefix_caching=st.booleans(),
    max_num_batched_tokens=st.sampled_from([7, 64]),
    max_num_seqs=st.sampled_from([3, 16]),
    async_scheduling=st.booleans(),
)

_REFERENCE: dict[tuple[str, int], LLMEngine] = {}


def _reference(models: dict[str, Path], family: str) -> LLMEngine:
    """The engine a request runs alone on: a large pool, no caching, no overlap (built once)."""
    key = (family, id(models))
    if key not in _REFERENCE:
        _REFERENCE[key] = LLM(str(models[family]), device="cpu", block_size=BLOCK, max_model_len=MAX_LEN,
                              num_kv_blocks=512, swap_space_gib=0.001, enable_prefix_caching=False,
                              async_scheduling=False).engine
    return _REFERENCE[key]


def _engine(models: dict[str, Path], shape: EngineShape) -> LLMEngine:
    """A fresh engine per mix, so that every failing mix replays alone (and shrinks)."""
    kv_heads = 1 if shape.family == "llama_mqa_tied" else 2
    bytes_per_block = 2 * 2 * kv_heads * 16 * BLOCK * 4  # K and V, 2 layers, head_dim 16, fp32
    return LLM(str(models[shape.family]), device="cpu", block_size=BLOCK, max_model_len=MAX_LEN,
               num_kv_blocks=shape.num_kv_blocks, swap_space_gib=shape.cpu_blocks * bytes_per_block / 2**30,
               preemption_mode=shape.preemption_mode, enable_prefix_caching=shape.enable_prefix_caching,
               max_num_batched_tokens=shape.max_num_batched_tokens, max_num_seqs=shape.max_num_seqs,
               async_scheduling=shape.async_scheduling).engine


# ====================================================================== requests
@dataclass(frozen=True)
class Spec:
    prompt: tuple[int, ...]
    n: int
    greedy: bool
    max_tokens: int
    min_tokens: int
    stop_id_at: int | None  # a stop id: the reference's token at this position
    stop_str_at: int | None  # a stop string: the text around the reference's token at this position
    ignore_eos: bool
    arrive: int  # the step it is added at
    abort: int | None  # the step it is aborted at (if it is still running)
    constraint: int | None = None  # structured output: an index into CONSTRAINTS


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    rng = random.Random(draw(st.integers(0, 2**32)))
    length = draw(st.one_of(st.integers(1, 14), st.integers(MAX_LEN - 3, MAX_LEN - 1)))
    shared = draw(st.booleans())  # starts with one of two common prefixes (prefix caching)
    head = [7, 8, 9, 10, 11, 12, 13, 14, 15][: length] if shared and rng.random() < 0.5 else \
        [20, 21, 22, 23, 24, 25, 26][: length] if shared else []
    prompt = tuple(head + [rng.randrange(3, VOCAB) for _ in range(length - len(head))])
    constraint = draw(st.sampled_from([None, None, *range(len(CONSTRAINTS))]))
    if draw(st.booleans()):  # a long request: it grows until the pool runs dry (preemption)
        return Spec(prompt=prompt, n=draw(st.integers(1, 3)), greedy=draw(st.booleans()),
                    max_tokens=draw(st.integers(10, 24)), min_tokens=0, stop_id_at=None, stop_str_at=None,
                    ignore_eos=True, arrive=draw(st.integers(0, 2)), abort=None, constraint=constraint)
    max_tokens = draw(st.integers(1, 8))
    return Spec(
        prompt=prompt, n=draw(st.integers(1, 6)), greedy=draw(st.booleans()), max_tokens=max_tokens,
        min_tokens=draw(st.integers(0, min(3, max_tokens))),
        stop_id_at=draw(st.none() | st.integers(0, 2)), stop_str_at=draw(st.none() | st.integers(0, 2)),
        ignore_eos=draw(st.booleans()), arrive=draw(st.integers(0, 3)),
        abort=draw(st.sampled_from([None, None, 0, 1, 2, 4, 7])), constraint=constraint,
    )


def _constraint(spec: Spec) -> StructuredOutputsParams | None:
    return None if spec.constraint is None else CONSTRAINTS[spec.constraint][0]


def _reference_tokens(models: dict[str, Path], family: str, prompt: tuple[int, ...],
                      constraint: StructuredOutputsParams | None = None) -> list[int]:
    """The prompt's greedy continuation (under its constraint) with nothing else stopping it
    early (stops are placed on it)."""
    eng = _reference(models, family)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, structured_outputs=constraint)
    return _run_alone(eng, list(prompt), params).outputs[0].token_ids


def _params(models: dict[str, Path], family: str, spec: Spec, tokenizer: Any) -> SamplingParams:
    ref = _reference_tokens(models, family, spec.prompt, _constraint(spec))
    stop_ids = [ref[spec.stop_id_at]] if spec.stop_id_at is not None and spec.stop_id_at < len(ref) else None
    stop = None
    if spec.stop_str_at is not None and spec.stop_str_at < len(ref):
        k = spec.stop_str_at
        text = tokenizer.decode(ref[k:k + 2])
        stop = text[1:3] if len(text) > 2 else text  # often across the boundary of two tokens
    return SamplingParams(
        n=spec.n, temperature=0.0 if spec.greedy else 1.0, max_tokens=spec.max_tokens, min_tokens=spec.min_tokens,
        stop_token_ids=stop_ids, stop=stop or None, ignore_eos=spec.ignore_eos, structured_outputs=_constraint(spec),
    )


def _run_alone(eng: LLMEngine, prompt: list[int], params: SamplingParams) -> RequestOutput:
    rid = eng.add_request(prompt, params)
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == rid and out.finished:
                final = out
    assert final is not None
    return final


# ====================================================================== the run
def _run_mix(eng: LLMEngine, reqs: list[tuple[Spec, SamplingParams]]) -> dict[int, RequestOutput]:
    """Add, step and abort as the specs say; check the pool after every step."""
    ids: dict[int, str] = {}
    finals: dict[str, RequestOutput] = {}
    aborted: set[int] = set()
    step = 0
    while True:
        for i, (spec, params) in enumerate(reqs):
            if spec.arrive == step:
                ids[i] = eng.add_request(list(spec.prompt), params)
            if spec.abort == step and i in ids and ids[i] not in finals:
                assert eng.abort_request(ids[i])
                aborted.add(i)
        if len(ids) == len(reqs) and not eng.has_unfinished_requests():
            break
        _checked_step(eng, finals)
        step += 1
        assert step < 400, "the mix did not finish"
    m = eng.get_metrics()
    assert m["kv_blocks_used"] == 0 and m["cpu_blocks_used"] == 0, m
    assert not eng.requests, "finished requests must not stay registered"
    return {i: finals[rid] for i, rid in ids.items() if i not in aborted}


def _mask(matcher: xgr.GrammarMatcher) -> torch.Tensor:
    mask = xgr.allocate_token_bitmask(1, VOCAB)
    matcher.fill_next_token_bitmask(mask)
    return mask


def _check_grammars(eng: LLMEngine) -> None:
    """Every live constrained sample's matcher is where a fresh one is after that sample's output
    tokens: none was skipped or taken twice (a token still in flight is not taken yet)."""
    for req in eng.requests.values():
        constraint = req.params.structured_outputs
        for seq in req.seqs if constraint is not None else ():
            if seq.finished:
                continue
            fresh = xgr.GrammarMatcher(eng.grammars.compile(constraint))
            assert all(fresh.accept_token(t) for t in seq.output_token_ids), seq
            assert torch.equal(_mask(fresh), _mask(seq.grammar.matcher)), seq


def _check_output(eng: LLMEngine, params: SamplingParams, out: RequestOutput) -> None:
    assert out.error is None, out.error
    assert sorted(c.index for c in out.outputs) == list(range(params.n))
    banned = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else eng.eos_token_ids)
    for c in out.outputs:
        assert c.finish_reason in ("stop", "length"), c
        assert 1 <= len(c.token_ids) <= (params.max_tokens or MAX_LEN)
        assert len(out.prompt_token_ids) + len(c.token_ids) <= MAX_LEN
        if params.structured_outputs is None:  # (a grammar may leave nothing else: checked below)
            assert not banned & set(c.token_ids[: params.min_tokens]), "EOS or a stop id sampled before min_tokens"
        if isinstance(c.stop_reason, int):
            assert c.token_ids[-1] == c.stop_reason
        if isinstance(c.stop_reason, str):
            # The first occurrence ended it, but the text of the first min_tokens tokens is never
            # searched: one may lie there (decoded alone, that prefix is at least as long as the
            # text the engine had made of it, so the check below never reaches into it).
            lo = max(0, len(eng.tokenizer.decode(c.token_ids[:params.min_tokens])) - len(c.stop_reason) + 1) \
                if params.min_tokens else 0
            assert c.text.endswith(c.stop_reason) if params.include_stop_str_in_output \
                else c.stop_reason not in c.text[lo:]
        if params.structured_outputs is not None:
            _check_constrained(eng, params.structured_outputs, c, banned, params.min_tokens)


def _allowed(matcher: xgr.GrammarMatcher) -> set[int]:
    mask = _mask(matcher)[0].tolist()
    return {i for i in range(VOCAB) if (mask[i // 32] >> (i % 32)) & 1}


def _check_constrained(eng: LLMEngine, constraint: StructuredOutputsParams, c: Any,
                       banned: frozenset[int] | set[int] = frozenset(), min_tokens: int = 0) -> None:
    """Every token of a constrained sample is one its grammar allowed, in order (a fresh matcher
    takes them all: none was skipped or taken twice), and before ``min_tokens`` not a banned one
    unless the grammar allowed nothing else; a sample its grammar ended is complete, and its text
    satisfies the constraint."""
    matcher = xgr.GrammarMatcher(eng.grammars.compile(constraint))
    for i, tok in enumerate(c.token_ids):
        if i < min_tokens and tok in banned:
            assert _allowed(matcher) <= banned, ("a banned token sampled before min_tokens", c, i)
        assert matcher.accept_token(tok), (c, i)
    if c.finish_reason == "stop" and c.stop_reason is None:  # the grammar's own end, not a stop id or string
        assert matcher.is_terminated(), c
        check = next(ok for k, ok in CONSTRAINTS if k == constraint)
        assert check(c.text), c


def _check_mix(models: dict[str, Path], shape: EngineShape, raw: list[Spec]) -> None:
    eng = _engine(models, shape)
    reqs = [(s, _params(models, shape.family, s, eng.tokenizer)) for s in raw]
    # Requests the pool cannot hold even alone are refused up front, and take no part.
    accepted = []
    for spec, params in reqs:
        try:
            eng.inputs.validate(list(spec.prompt), params)
        except ValueError as e:
            assert "num_kv_blocks" in str(e)
            continue
        accepted.append((spec, params))
    outs = _run_mix(eng, accepted)
    ref = _reference(models, shape.family)
    for i, out in outs.items():
        spec, params = accepted[i]
        _check_output(eng, params, out)
        if spec.greedy:
            alone = _run_alone(ref, list(spec.prompt), params)
            got = [(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in out.outputs]
            assert got == [(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in alone.outputs], spec


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                 derandomize=True)


@settings(max_examples=150, **_SETTINGS)  # type: ignore[arg-type]
@given(shape=engine_shapes, mix=st.lists(specs(), min_size=1, max_size=8))
def test_random_mixes_keep_the_pool_sound_and_outputs_unchanged(fuzz_models: dict[str, Path], shape: EngineShape,
                                                                mix: list[Spec]) -> None:
    _check_mix(fuzz_models, shape, mix)


@pytest.mark.slow
@settings(max_examples=3000, **_SETTINGS)  # type: ignore[arg-type]
@given(shape=engine_shapes, mix=st.lists(specs(), min_size=1, max_size=10))
def test_random_mixes_long_profile(fuzz_models: dict[str, Path], shape: EngineShape, mix: list[Spec]) -> None:
    _check_mix(fuzz_models, shape, mix)


def test_n_samples_finishing_on_their_first_token(fuzz_models: dict[str, Path]) -> None:
    """The case that used to crash the engine: sample 0 ends on its first token (max_tokens=1,
    a stop id, EOS) and is freed before its siblings fork from it."""
    eng = _reference(fuzz_models, "llama_mqa_tied")
    prompt = [5, 6, 7]
    first = _reference_tokens(fuzz_models, "llama_mqa_tied", tuple(prompt))[0]
    for params in (SamplingParams(n=2, max_tokens=1), SamplingParams(n=3, temperature=0.0, stop_token_ids=[first]),
                   SamplingParams(n=4, max_tokens=1, temperature=0.0)):
        out = _run_alone(eng, prompt, params)
        assert len(out.outputs) == params.n and all(c.finished for c in out.outputs)
        assert eng.get_metrics()["kv_blocks_used"] == 0
        eng.check_integrity()


# ====================================================================== structured output in flight
def _checked_step(eng: LLMEngine, finals: dict[str, RequestOutput]) -> None:
    """One step: its finished outputs recorded (each once), then the pool's and the grammars'
    invariants checked."""
    for out in eng.step():
        if out.finished:
            assert out.request_id not in finals, "a request finished twice"
            finals[out.request_id] = out
    eng.check_integrity()
    _check_grammars(eng)


def _drain(eng: LLMEngine) -> dict[str, RequestOutput]:
    """Step until idle, checking the pool and the grammars after every step; the final outputs."""
    finals: dict[str, RequestOutput] = {}
    for _ in range(400):
        if not eng.has_unfinished_requests():
            break
        _checked_step(eng, finals)
    assert not eng.has_unfinished_requests(), "the engine did not finish"
    m = eng.get_metrics()
    assert m["kv_blocks_used"] == 0 and m["cpu_blocks_used"] == 0, m
    return finals


def _same_as_alone(models: dict[str, Path], family: str, prompt: list[int], params: SamplingParams,
                   out: RequestOutput) -> None:
    alone = _run_alone(_reference(models, family), prompt, params)
    assert out.error is None, out.error
    assert [(c.token_ids, c.finish_reason, c.text) for c in out.outputs] == \
        [(c.token_ids, c.finish_reason, c.text) for c in alone.outputs]


def _shape(num_kv_blocks: int = 64, mode: str = "swap", async_scheduling: bool = True) -> EngineShape:
    return EngineShape("llama_mqa_tied", num_kv_blocks, 64, mode, False, 64, 16, async_scheduling)


@pytest.mark.parametrize("kind", [0, 1])  # json_object, a schema
def test_abort_of_a_constrained_request_while_its_step_is_in_flight(fuzz_models: dict[str, Path], kind: int) -> None:
    """Async scheduling: a constrained request is aborted while a step sampling its next token
    is in flight.  That token is dropped (its matcher does not take it), the other requests of
    the step -- constrained and not -- go on unchanged, and the engine serves the same request
    again as if nothing had happened."""
    eng = _engine(fuzz_models, _shape())
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, structured_outputs=CONSTRAINTS[kind][0]),
              SamplingParams(temperature=0.0, max_tokens=16, structured_outputs=CONSTRAINTS[1][0]),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)]
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    doomed = eng.requests[ids[0]]
    seq = doomed.seqs[0]
    for _ in range(40):
        eng.step()
        eng.check_integrity()
        inflight = eng._inflight
        if inflight is not None and inflight.masked and seq.num_pending and seq.num_output_tokens >= 3:
            break
    else:
        pytest.fail("no constrained step in flight")
    assert any(s is seq for s, _ in inflight.targets)
    taken = list(seq.output_token_ids)
    assert eng.abort_request(ids[0])
    finals = _drain(eng)
    assert ids[0] not in finals and seq.finish_reason == "abort"
    assert seq.output_token_ids == taken  # the token in flight was dropped ...
    fresh = xgr.GrammarMatcher(eng.grammars.compile(params[0].structured_outputs))
    assert all(fresh.accept_token(t) for t in taken)
    assert torch.equal(_mask(fresh), _mask(seq.grammar.matcher))  # ... and never reached the matcher
    for i in (1, 2):
        _same_as_alone(fuzz_models, "llama_mqa_tied", prompts[i], params[i], finals[ids[i]])
    again = _run_alone(eng, prompts[0], params[0])
    _same_as_alone(fuzz_models, "llama_mqa_tied", prompts[0], params[0], again)


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_constrained_requests_preempted_mid_output(fuzz_models: dict[str, Path], mode: str,
                                                   async_scheduling: bool) -> None:
    """A pool that holds one full-length sequence: constrained requests (one of them with n=2)
    are preempted while they write their output (under async scheduling with their next token in
    flight), swapped out or dropped and computed again.  On resumption each matcher is where its
    output left it (checked after every step), and every output is the one it has alone."""
    eng = _engine(fuzz_models, _shape(MAX_LEN // BLOCK, mode, async_scheduling))
    preempt = type(eng.scheduler)._preempt
    pending_at_preemption = []

    def recording(self: Any, req: Any, out: Any) -> None:
        pending_at_preemption.append(sum(s.num_pending for s in req.seqs))
        preempt(self, req, out)

    eng.scheduler._preempt = recording.__get__(eng.scheduler)  # type: ignore[method-assign]
    prompts = [[5, 6, 7, 8, 9, 10], [20, 21, 22, 23], [30, 31, 32], [40, 41, 42, 43, 44]]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, structured_outputs=CONSTRAINTS[0][0]),
              SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=CONSTRAINTS[1][0]),
              SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True,
                             structured_outputs=CONSTRAINTS[0][0]),
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)]
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    finals = _drain(eng)
    m = eng.get_metrics()
    assert m["num_swap_preemptions" if mode == "swap" else "num_recompute_preemptions"] > 0, m
    if async_scheduling:
        assert any(pending_at_preemption), "no request was preempted with its next token in flight"
    for rid, prompt, sp in zip(ids, prompts, params):
        _same_as_alone(fuzz_models, "llama_mqa_tied", prompt, sp, finals[rid])
        for c in finals[rid].outputs:
            if sp.structured_outputs is not None:
                _check_constrained(eng, sp.structured_outputs, c)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_n_constrained_samples_one_finishing_on_its_first_token(fuzz_models: dict[str, Path],
                                                                async_scheduling: bool) -> None:
    """n=4 sampled choices whose first token may be a stop id: sample 0 ends on its first token
    (and is freed before its siblings fork from it) while others go on to a valid choice."""
    eng = _engine(fuzz_models, _shape(async_scheduling=async_scheduling))
    stop = _token_strings().index("a")
    prompt = [5, 6, 7]
    for seed in range(40):
        params = SamplingParams(n=4, temperature=1.0, seed=seed, max_tokens=8, stop_token_ids=[stop],
                                structured_outputs=CONSTRAINTS[3][0])
        rid = eng.add_request(prompt, params)
        out = _drain(eng)[rid]
        _check_output(eng, params, out)
        first = out.outputs[0]
        if first.token_ids == [stop] and any(len(c.token_ids) > 1 for c in out.outputs):
            break
    else:
        pytest.fail("no seed made sample 0 stop on its first token while a sibling went on")
    assert first.stop_reason == stop and first.text == "a"
    assert any(c.stop_reason is None and c.text in CHOICES for c in out.outputs)
    greedy = SamplingParams(n=3, temperature=0.0, max_tokens=1, structured_outputs=CONSTRAINTS[3][0])
    out = _run_alone(eng, prompt, greedy)
    assert [len(c.token_ids) for c in out.outputs] == [1, 1, 1] and {c.finish_reason for c in out.outputs} == {"length"}
    _check_output(eng, greedy, out)
    _same_as_alone(fuzz_models, "llama_mqa_tied", prompt, greedy, out)
    assert eng.get_metrics()["kv_blocks_used"] == 0


def test_min_tokens_give_way_to_a_grammar_that_can_only_end(fuzz_models: dict[str, Path]) -> None:
    """Before min_tokens EOS and stop ids are banned; where the grammar allows nothing else (it is
    complete, or its one next token is a stop id) the grammar wins: the request is not failed
    with a token its grammar rejects, it ends where its grammar ends."""
    eng = _engine(fuzz_models, _shape())
    brace = _token_strings().index("{")
    cases = [(SamplingParams(temperature=0.0, max_tokens=20, min_tokens=6, structured_outputs=CONSTRAINTS[3][0]),
              lambda t: t in CHOICES),
             (SamplingParams(temperature=1.0, seed=1, max_tokens=20, min_tokens=3, stop_token_ids=[brace],
                             structured_outputs=S(regex=r"\{")), lambda t: t == "{")]
    for params, ok in cases:
        out = _run_alone(eng, [5, 6, 7], params)
        c = out.outputs[0]
        assert out.error is None and c.finish_reason == "stop" and c.stop_reason is None and ok(c.text), out
        assert c.token_ids[-1] == 2 and len(c.token_ids) < params.min_tokens
    eng.check_integrity()


def test_min_tokens_hold_for_a_constrained_step_sampled_after_its_launch(fuzz_models: dict[str, Path]) -> None:
    """Async scheduling samples a constrained step after its launch, when its own token already
    counts as pending: the ban until min_tokens must still cover the token being sampled (it
    used to end one token early, letting EOS through).  Same outputs as the synchronous engine."""
    engines = [_engine(fuzz_models, _shape(async_scheduling=a)) for a in (False, True)]
    params = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=2, structured_outputs=S(regex=r"[a-e]{1,6}"))
    ends_at_min = 0
    for prompt in ([172, 244, 289, 54, 184, 225, 164], [34, 283, 10], [157], [99, 98], [60, 61, 62]):
        sync, overlapped = (_run_alone(e, prompt, params).outputs[0] for e in engines)
        assert overlapped.token_ids == sync.token_ids and overlapped.text == sync.text, prompt
        assert 2 not in sync.token_ids[:params.min_tokens]
        ends_at_min += sync.token_ids[params.min_tokens:] == [2]
    assert ends_at_min >= 3  # EOS was wanted as early as min_tokens allows


def test_special_tokens_are_never_part_of_a_constrained_output(fuzz_models: dict[str, Path]) -> None:
    """``<unk>`` and ``<s>`` read as text would fit in a JSON string, but the detokenizer skips
    them: the text would lose characters its grammar counted.  No grammar allows them; the end
    token (EOS) stays allowed where the grammar is complete."""
    eng = _engine(fuzz_models, _shape())
    grammar = eng.grammars.new_matchers(S(json=SCHEMA), 1)[0]
    assert grammar is not None
    m = grammar.matcher
    vocab = _token_strings()
    for piece in ('{"', "a", '": ', "true", ', "', "b", '": ', '"'):
        assert m.accept_token(vocab.index(piece)), piece

    def allowed(i: int) -> bool:
        return bool((int(_mask(m)[0, i // 32]) >> (i % 32)) & 1)

    assert allowed(vocab.index("ab")) and not allowed(0) and not allowed(1) and not allowed(2)
    for piece in ("ab", '"}'):
        assert m.accept_token(vocab.index(piece))
    assert allowed(2) and not allowed(0) and not allowed(1)
