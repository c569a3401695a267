"""What each output of a request holds (``SamplingParams.output_kind``): everything so far
(CUMULATIVE), only what is new (DELTA: the server's streams), or one final output (FINAL_ONLY).

The model is the byte-fallback tiny Llama of ``test_detokenizer_engine`` (about two tokens in
three are byte tokens, so text arrives in uneven runs and characters are split across tokens):
the joined deltas of every sample must be exactly its cumulative text, token ids and logprobs,
and no delta may carry text that a stop string later cuts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedattn import LLM, RequestOutputKind, SamplingParams
from pagedattn.engine.outputs import CompletionOutput, RequestOutput

from .server_harness import make_async_engine

KW: dict[str, Any] = dict(device="cpu", block_size=4, num_kv_blocks=96, swap_space_gib=0.05)
PROMPTS = ["I like ☕ and", "Tell me something:", "日本"]
C, D, F = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY


@pytest.fixture(scope="module")
def llm(byte_model: Path) -> LLM:
    return LLM(str(byte_model), **KW)


def _run(llm: LLM, prompts: list[str], params: SamplingParams) -> list[list[RequestOutput]]:
    """Every output ``LLM.stream`` yields, by request, in the order of ``prompts``."""
    got: dict[str, list[RequestOutput]] = {}
    for out in llm.stream(prompts, params):
        got.setdefault(out.request_id, []).append(out)
    assert llm.get_metrics()["kv_blocks_used"] == 0
    llm.engine.check_integrity()
    return [got[k] for k in sorted(got, key=int)]


def _joined(outs: list[RequestOutput]) -> dict[int, CompletionOutput]:
    """Each sample's deltas joined; checks that a sample reports its finish once, last."""
    joined: dict[int, CompletionOutput] = {}
    for out in outs:
        for c in out.outputs:
            j = joined.setdefault(c.index, CompletionOutput(c.index, "", [], logprobs=[] if c.logprobs is not None
                                                            else None))
            assert j.finish_reason is None, f"sample {c.index} reported after its finish"
            j.text += c.text
            j.token_ids += c.token_ids
            if c.logprobs is not None:
                assert len(c.logprobs) == len(c.token_ids)
                j.logprobs = (j.logprobs or []) + c.logprobs
            j.cumulative_logprob, j.finish_reason, j.stop_reason = c.cumulative_logprob, c.finish_reason, c.stop_reason
    return joined


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_deltas_join_into_the_cumulative_output(llm: LLM, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 3), label="n")
    base = dict(n=n, temperature=data.draw(st.sampled_from([0.0, 1.0])), seed=data.draw(st.integers(0, 1 << 20)),
                max_tokens=data.draw(st.integers(1, 14), label="max_tokens"),
                logprobs=data.draw(st.sampled_from([None, 0, 2])), ignore_eos=data.draw(st.booleans()),
                prompt_logprobs=data.draw(st.sampled_from([None, 1])))
    prompts = data.draw(st.lists(st.sampled_from(PROMPTS), min_size=1, max_size=3), label="prompts")
    # Stop strings taken from a first run's text, so that they are found (in a split character,
    # on the first token, ...), with others that never occur.
    first = _run(llm, prompts, SamplingParams(**base))
    texts = [c.text for outs in first for c in outs[-1].outputs if c.text]
    stops = []
    for _ in range(data.draw(st.integers(0, 2), label="stops")):
        if texts:
            t = data.draw(st.sampled_from(texts))
            i = data.draw(st.integers(0, len(t) - 1))
            stops.append(t[i:i + data.draw(st.integers(1, 3))])
    if stops and data.draw(st.booleans()):
        stops.append("never-in-the-output")
    base.update(stop=stops or None, include_stop_str_in_output=data.draw(st.booleans()),
                min_tokens=data.draw(st.integers(0, 2)) if base["max_tokens"] >= 2 else 0)

    cumulative = _run(llm, prompts, SamplingParams(**base, output_kind=C))
    deltas = _run(llm, prompts, SamplingParams(**base, output_kind=D))
    finals = _run(llm, prompts, SamplingParams(**base, output_kind=F))
    assert len(cumulative) == len(deltas) == len(finals) == len(prompts)
    for cs, ds, fs in zip(cumulative, deltas, finals):
        last = cs[-1]
        assert len(fs) == 1 and fs[0].finished and fs[0].outputs == last.outputs
        assert ds[-1].finished and not any(o.finished for o in ds[:-1])
        joined = _joined(ds)
        assert [joined[c.index] for c in last.outputs] == last.outputs
        assert len(joined) == n
        # The prompt's logprobs come once, in the first delta.
        assert ds[0].prompt_logprobs == last.prompt_logprobs
        assert all(o.prompt_logprobs is None for o in ds[1:])
        # Every delta holds something new (a token, text, or the finish).
        for o in ds:
            for c in o.outputs:
                assert c.token_ids or c.text or c.finished


def test_a_delta_holds_back_what_may_begin_a_stop_string(llm: LLM) -> None:
    """While a sample runs, the text its deltas carried ends ``len(longest stop) - 1``
    characters short of its text so far (they may begin a stop string); the finish brings the
    rest.  The same seeded request run cumulative gives the text so far at each step."""
    stops = ["never-here", "zz"]  # not in the output: nothing is cut, only held back
    params = dict(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True, stop=stops)
    cs = list(llm.stream(PROMPTS[1], SamplingParams(**params)))
    ds = list(llm.stream(PROMPTS[1], SamplingParams(**params, output_kind=D)))
    assert len(cs) == len(ds) and all(s not in cs[-1].outputs[0].text for s in stops)
    hold, sent = len("never-here") - 1, ""
    for c, d in zip(cs, ds):
        so_far = c.outputs[0].text
        sent += d.outputs[0].text
        assert sent == (so_far if c.finished else so_far[:max(len(sent) - len(d.outputs[0].text),
                                                               len(so_far) - hold)])
    assert sent == cs[-1].outputs[0].text and len(sent) > hold


def test_generate_returns_whole_outputs_whatever_the_kind(llm: LLM) -> None:
    """``LLM.generate`` reports each request once, when it finishes: a DELTA request's only
    output is then everything."""
    params = dict(n=2, temperature=1.0, seed=9, max_tokens=9, logprobs=1)
    want = llm.generate(PROMPTS, SamplingParams(**params), use_tqdm=False)
    for kind in (D, F, 1):
        got = llm.generate(PROMPTS, SamplingParams(**params, output_kind=kind), use_tqdm=False)
        assert [o.outputs for o in got] == [o.outputs for o in want]


def test_output_kind_is_checked() -> None:
    assert SamplingParams(output_kind=2).output_kind is F
    for bad in (3, -1, "delta", 1.0, True, None):
        with pytest.raises(ValueError, match="output_kind"):
            SamplingParams(output_kind=bad)


def test_a_slow_consumer_gets_the_deltas_that_piled_up_joined(byte_model: Path) -> None:
    """``AsyncLLMEngine``: a consumer that reads late gets the DELTA outputs that waited as one
    output (a cumulative stream skips to the newest); joined, they equal the whole output."""
    engine = make_async_engine(byte_model, **KW)
    params = dict(n=2, temperature=1.0, seed=11, max_tokens=16, ignore_eos=True, logprobs=1, stop=["zz"])

    async def read(kind: RequestOutputKind) -> list[RequestOutput]:
        stream = await engine.generate(PROMPTS[0], SamplingParams(**params, output_kind=kind))
        outs = []
        async for out in stream:
            outs.append(out)
            await asyncio.sleep(0.05)  # several steps' outputs queue up meanwhile
        return outs

    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        return await read(C), await read(D)

    try:
        cumulative, deltas = asyncio.run(main())
    finally:
        engine.shutdown()
    assert len(deltas) < 16  # some were joined
    joined = _joined(deltas)
    assert [joined[c.index] for c in cumulative[-1].outputs] == cumulative[-1].outputs


def test_request_output_add_joins_deltas() -> None:
    def out(*choices: CompletionOutput, finished: bool = False, plp: Any = None) -> RequestOutput:
        return RequestOutput("r", "p", [1, 2], list(choices), finished, 1, {"arrival_time": 0.0}, None, plp)

    a = out(CompletionOutput(0, "ab", [5, 6], -1.0, [{5: -0.5}, {6: -0.5}]), plp=[None, {2: -0.1}])
    a.add(out(CompletionOutput(1, "x", [7], -0.2, [{7: -0.2}])))
    a.add(out(CompletionOutput(0, "c", [8], -1.5, [{8: -0.5}], "stop", "c"),
              CompletionOutput(1, "", [9], -0.3, [{9: -0.1}], "length"), finished=True))
    assert a.finished and a.prompt_logprobs == [None, {2: -0.1}]
    assert a.outputs == [CompletionOutput(0, "abc", [5, 6, 8], -1.5, [{5: -0.5}, {6: -0.5}, {8: -0.5}], "stop", "c"),
                         CompletionOutput(1, "x", [7, 9], -0.3, [{7: -0.2}, {9: -0.1}], "length")]


def test_server_timer_counts_each_choice_once_from_deltas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's latency metrics fed with DELTA outputs: a choice that finished in an earlier
    output than the request's last is counted once, and the time per output token divides by
    the longest choice's whole length, not by its last delta's."""
    from pagedattn.entrypoints import metrics

    clock = iter([1.0, 2.0, 5.0])  # the times the three outputs arrive
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    m = metrics.ServerMetrics()
    t = m.timer(arrival=0.5)

    def out(*choices: CompletionOutput, finished: bool = False) -> RequestOutput:
        return RequestOutput("r", "p", [1], list(choices), finished, 0, {"arrival_time": 0.5, "first_token_time": 0.9})

    t.on_output(out(CompletionOutput(0, "a", [5]), CompletionOutput(1, "b", [6])))
    t.on_output(out(CompletionOutput(0, "c", [7, 8], finish_reason="stop")))
    t.on_output(out(CompletionOutput(1, "d", [9, 10, 11, 12], finish_reason="length"), finished=True))

    def samples(metric: Any, suffix: str) -> dict[str, float]:
        return {s.labels.get("finish_reason", ""): s.value for s in metric.collect()[0].samples
                if s.name.endswith(suffix)}

    assert samples(m.finished, "_total") == {"stop": 1.0, "length": 1.0}
    assert samples(m.ttft, "_sum") == {"": 0.5}  # arrival 0.5, first streamed token at 1.0
    # Choice 1 has 5 tokens: 4 gaps from its first (at 1.0) to the end (at 5.0).
    assert samples(m.tpot, "_count") == {"": 1.0} and samples(m.tpot, "_sum") == {"": 1.0}


def test_server_timer_takes_a_single_final_outputs_first_token_from_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A response made once (FINAL_ONLY) has no earlier output to time its first token by: the
    engine's time of it is used, not the end's."""
    from pagedattn.entrypoints import metrics

    monkeypatch.setattr(metrics.time, "monotonic", lambda: 3.0)
    m = metrics.ServerMetrics()
    final = CompletionOutput(0, "abc", [5, 6, 7], finish_reason="length")
    m.timer(arrival=0.5).on_output(RequestOutput("r", "p", [1], [final], True, 0,
                                                 {"arrival_time": 0.5, "first_token_time": 1.0}))
    (ttft,) = [s.value for s in m.ttft.collect()[0].samples if s.name.endswith("_sum")]
    (tpot,) = [s.value for s in m.tpot.collect()[0].samples if s.name.endswith("_sum")]
    assert ttft == 0.5 and tpot == 1.0  # (3.0 - 1.0) / 2



@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_deltas_survive_preemption_and_aborts(byte_model: Path, mode: str) -> None:
    """A pool of a few blocks preempts requests mid-output (swapped out, or recomputed from their
    tokens): their deltas still join into the cumulative outputs; closing a delta stream early
    aborts what runs and leaves the pool empty."""
    llm = LLM(str(byte_model), **{**KW, "num_kv_blocks": 20}, preemption_mode=mode)
    params = dict(n=2, temperature=1.0, seed=13, max_tokens=14, ignore_eos=True, logprobs=1, stop=["zz"])
    prompts = PROMPTS * 2
    cumulative = _run(llm, prompts, SamplingParams(**params))
    deltas = _run(llm, prompts, SamplingParams(**params, output_kind=D))
    assert llm.get_metrics()["num_preemptions"] > 0
    for cs, ds in zip(cumulative, deltas):
        joined = _joined(ds)
        assert [joined[c.index] for c in cs[-1].outputs] == cs[-1].outputs
    it = llm.stream(prompts, SamplingParams(**params, output_kind=D))
    next(it)
    it.close()
    assert llm.get_metrics()["kv_blocks_used"] == 0 and not llm.engine.has_unfinished_requests()
    llm.engine.check_integrity()
