"""Bad input is refused up front with the field named; one request's failure is its own.

Every refusal is a ``ValueError`` raised before the engine holds any state for the request,
and the engine serves the next request as if nothing happened.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from pagedattn import LLM, SamplingParams

from .engine_models import make_model_dir

VOCAB = 320


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = make_model_dir(tmp_path_factory.mktemp("models"), "llama_mqa_tied")
    return LLM(str(path), device="cpu", block_size=4, num_kv_blocks=64, swap_space_gib=0.001)


def _prompt(seed: int, n: int = 6) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _assert_idle(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests
    assert llm.get_metrics()["kv_blocks_used"] == 0
    llm.engine.check_integrity()


# ====================================================================== SamplingParams
@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature="0.5"), "temperature"), (dict(temperature=True), "temperature"),
    (dict(top_p=math.nan), "top_p"), (dict(min_p=math.inf), "min_p"),
    (dict(n=True), "n"), (dict(n=2.0), "n"), (dict(max_tokens=True), "max_tokens"), (dict(max_tokens=0), "max_tokens"),
    (dict(seed=True), "seed"), (dict(seed=2**63), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(seed=1.0), "seed"),
    (dict(ignore_eos=1), "ignore_eos"), (dict(skip_special_tokens="no"), "skip_special_tokens"),
    (dict(include_stop_str_in_output=None), "include_stop_str_in_output"),
    (dict(logprobs=True), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(top_k=True), "top_k"),
    (dict(top_k=-2), "top_k"), (dict(stop=123), "stop"), (dict(stop=[""]), "stop"), (dict(stop=["a", 1]), "stop"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(stop_token_ids="12"), "stop_token_ids"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=5, max_tokens=4), "min_tokens"),
])
def test_sampling_params_refuse_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}:"):
        SamplingParams(**kwargs)


def test_sampling_params_take_the_edges_of_their_ranges() -> None:
    for kwargs in (dict(seed=-(2**63)), dict(seed=2**63 - 1), dict(temperature=0.0), dict(top_p=1.0), dict(min_p=1.0),
                   dict(stop=("a", "b")), dict(stop_token_ids=(1, 2)), dict(min_tokens=4, max_tokens=4),
                   dict(min_tokens=100, max_tokens=None), dict(top_k=0), dict(logprobs=0)):
        SamplingParams(**kwargs)
    assert SamplingParams(stop_token_ids=(1, 2)).stop_token_ids == [1, 2]


# ====================================================================== requests
@pytest.mark.parametrize(("prompt", "params", "needle"), [
    ({"prompt_token_ids": [1.0, 2.0]}, SamplingParams(), "prompt_token_ids: must be a list of integer token ids"),
    ({"prompt_token_ids": "abc"}, SamplingParams(), "prompt_token_ids: must be a list"),
    ({"prompt_token_ids": None}, SamplingParams(), "prompt_token_ids: must be a list"),
    ({"prompt_token_ids": [True, 4]}, SamplingParams(), "prompt_token_ids"),
    ({"prompt_token_ids": [4], "prompt": 7}, SamplingParams(), "prompt: must be a string"),
    ({"text": "x"}, SamplingParams(), "prompt: a prompt dict needs"),
    (None, SamplingParams(), "prompt: must be"),
    (3.5, SamplingParams(), "prompt: must be"),
    ([4, "5"], SamplingParams(), "prompt: must be a list of integer token ids"),
    ([4, 5], SamplingParams(stop_token_ids=[VOCAB]), "stop_token_ids: ids .* outside the vocabulary"),
    ([4, 5], SamplingParams(logprobs=VOCAB + 1), "logprobs"),
    ([4, 5], "not params", "sampling_params: must be a SamplingParams"),
    ([4, 5], [SamplingParams(), "x"], "sampling_params: must be a SamplingParams"),
])
def test_bad_requests_are_refused_before_any_work(llm: LLM, prompt: object, params: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        llm.generate([_prompt(1), prompt], params, use_tqdm=False)  # type: ignore[list-item,arg-type]
    _assert_idle(llm)
    assert len(llm.generate(_prompt(2), SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_logprobs_up_to_the_vocabulary_size(llm: LLM) -> None:
    out = llm.generate(_prompt(3), SamplingParams(logprobs=VOCAB, max_tokens=2), use_tqdm=False)[0].outputs[0]
    assert all(len(d) == VOCAB for d in out.logprobs or [])


# ====================================================================== min_tokens
def test_min_tokens_masks_eos_and_stop_ids(llm: LLM) -> None:
    """Until min_tokens were generated EOS and stop ids are not sampled at all (not merely
    ignored): the text holds no EOS and no invented turn after it."""
    prompt = _prompt(4)
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    first = free[0]
    eng = llm.engine
    saved = set(eng.eos_token_ids)
    eng.eos_token_ids.clear()  # the one set the sampler and the stop checks read
    eng.eos_token_ids.add(first)  # EOS is the greedy first token
    try:
        out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == [first] and out.finish_reason == "stop"
        for params in (SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3),
                       SamplingParams(temperature=1.0, seed=5, max_tokens=6, min_tokens=3, n=3),
                       SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, ignore_eos=True,
                                      stop_token_ids=[first])):
            for c in llm.generate(prompt, params, use_tqdm=False)[0].outputs:
                assert first not in c.token_ids[:3], c
                assert len(c.token_ids) >= 3
    finally:
        eng.eos_token_ids.clear()
        eng.eos_token_ids.update(saved)
    _assert_idle(llm)


# ====================================================================== isolation
def test_a_request_that_fails_alone_frees_its_blocks_and_the_others_go_on(llm: LLM, monkeypatch) -> None:
    """An exception in one request's stop check (as in its detokenizer) finishes that request
    with finish_reason "error"; the other requests of the same steps are untouched."""
    eng = llm.engine
    prompts = [_prompt(10 + i) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    check = type(eng.outputs)._check_stop
    poisoned = {}

    def failing_check(self, req, seq, tok):  # type: ignore[no-untyped-def]
        if req.prompt_token_ids == prompts[1] and seq.num_output_tokens == 3:
            poisoned[req.request_id] = True
            raise RuntimeError("broken detokenizer")
        return check(self, req, seq, tok)

    monkeypatch.setattr(type(eng.outputs), "_check_stop", failing_check)
    outs = llm.generate(prompts, [params, SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True), params],
                        use_tqdm=False)
    assert poisoned
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == [expected[0], expected[2]]
    bad = outs[1]
    assert bad.finished and bad.error is not None and "broken detokenizer" in bad.error
    assert [c.finish_reason for c in bad.outputs] == ["error", "error"]
    _assert_idle(llm)


def test_a_sampling_row_that_fails_alone_fails_its_request(llm: LLM, monkeypatch) -> None:
    """The batched sampler raising for one row: the rows are sampled one by one and only the
    row that raises fails."""
    eng = llm.engine
    sampler = eng.sampler
    real = type(sampler).__call__

    def picky(self, logits, rows):  # type: ignore[no-untyped-def]
        if any(r.params.top_k == 7 for r in rows):
            raise RuntimeError("bad row")
        return real(self, logits, rows)

    monkeypatch.setattr(type(sampler), "__call__", picky)
    good = SamplingParams(temperature=1.0, seed=1, max_tokens=5)
    outs = llm.generate([_prompt(20), _prompt(21)], [good, SamplingParams(temperature=1.0, top_k=7, max_tokens=5)],
                        use_tqdm=False)
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 5
    assert outs[1].error is not None and outs[1].outputs[0].finish_reason == "error"
    _assert_idle(llm)


def test_nan_logits_rows_do_not_break_the_batch(llm: LLM) -> None:
    """A row of NaN logits (a numerically broken model) samples some token without raising."""
    sampler = llm.engine.sampler
    logits = torch.randn(3, VOCAB)
    logits[1] = float("nan")
    from pagedattn.engine.sampler import SamplingRow

    rows = [SamplingRow(SamplingParams(temperature=t), None) for t in (0.0, 0.7, 1.0)]
    out = sampler(logits, rows)
    assert len(out.token_ids) == 3 and all(0 <= t < VOCAB for t in out.token_ids)
