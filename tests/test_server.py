"""The OpenAI-compatible server, driven through the official ``openai`` client.

A real uvicorn server runs on 127.0.0.1 (a free port) in a background thread, serving a tiny
random Llama that has the default model's real tokenizer and chat template.  Its answers are
checked against the offline engine on the same weights, so the HTTP layer is tested for
faithfulness, not just for shape.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedattn import LLM, SamplingParams
from pagedattn.engine import async_engine
from pagedattn.engine.async_engine import AsyncLLMEngine, EngineDeadError

from .server_harness import TINY_CONTEXT, TINY_MODEL_NAME, make_async_engine, start_server, tiny_chat_model

MODEL = TINY_MODEL_NAME
WORDS = ("river", "stone", "light", "garden", "winter", "paper", "window", "music", "yellow", "quiet", "mountain",
         "letter", "morning", "silver", "bridge", "forest", "candle", "ocean", "market", "story", "little", "north")
GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}


# ====================================================================== fixtures
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return tiny_chat_model(tmp_path_factory, default_model_dir)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    srv = start_server(make_async_engine(tiny_model_dir))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> LLM:
    """The offline engine on the same weights: the reference for the server's answers."""
    return LLM(str(tiny_model_dir), device="cpu", block_size=16, num_kv_blocks=512, swap_space_gib=0.05)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    return random.Random(f"{request.node.name}-{time.time_ns()}")


def _prompt(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def _metrics(base_url: str) -> dict[str, float]:
    """Unlabelled samples of ``/metrics`` by name (histograms as ``_count``/``_sum``)."""
    r = httpx.get(f"{base_url}/metrics", timeout=30)
    assert r.status_code == 200
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if not s.labels:
                out.setdefault(s.name, s.value)
    return out


def _wait_idle(base_url: str, timeout: float = 15.0) -> dict[str, float]:
    """Poll until no request holds blocks (aborts land on the engine's next pass)."""
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(base_url)
        busy = m["pagedattn_kv_blocks_used"] + m["pagedattn_requests_running"] + m["pagedattn_requests_waiting"]
        if busy + m["pagedattn_requests_swapped"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def _expected(llm: LLM, prompt: Any, max_tokens: int, **kw: Any) -> Any:
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, **kw), use_tqdm=False)[0]


# ====================================================================== models, health
def test_models_and_health(client: openai.OpenAI, server) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("no-such-model")
    assert ei.value.status_code == 404
    r = httpx.get(f"{server.base_url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


# ====================================================================== completions
def test_completion_matches_offline_engine(client: openai.OpenAI, llm: LLM, rng: random.Random) -> None:
    prompt = _prompt(rng)
    n_tok = rng.randint(6, 14)
    want = _expected(llm, prompt, n_tok, **GREEDY, **NO_EOS)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n_tok, extra_body=NO_EOS, **GREEDY)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.text == want.outputs[0].text and choice.text
    assert choice.finish_reason == "length" and choice.index == 0 and choice.logprobs is None
    n_prompt = len(llm.get_tokenizer().encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_tok)
    assert r.usage.total_tokens == n_prompt + n_tok
    # Token-id prompts take the same path.
    ids = want.prompt_token_ids
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=n_tok, extra_body=NO_EOS, **GREEDY)
    assert r2.choices[0].text == choice.text


def _collect_stream(stream: Any) -> tuple[dict[int, str], dict[int, list[Any]], list[Any]]:
    """Concatenated text per choice, each choice's chunks, and every chunk."""
    texts: dict[int, str] = {}
    per_choice: dict[int, list[Any]] = {}
    chunks = list(stream)
    for ch in chunks:
        for c in ch.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            per_choice.setdefault(c.index, []).append(c)
    return texts, per_choice, chunks


def test_completion_streaming_matches_non_streaming(client: openai.OpenAI, rng: random.Random) -> None:
    prompt, seed = _prompt(rng), rng.randrange(1 << 30)
    kw: dict[str, Any] = dict(model=MODEL, prompt=prompt, max_tokens=10, n=2, temperature=0.9, seed=seed,
                              extra_body=NO_EOS)
    full = client.completions.create(**kw)
    texts, per_choice, chunks = _collect_stream(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert texts == {c.index: c.text for c in full.choices}
    for cs in per_choice.values():  # exactly one finish_reason per choice, on its last chunk
        assert [c.finish_reason for c in cs].count("length") == 1 and cs[-1].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1
    # With continuous_usage_stats every chunk has the output tokens so far, both choices together.
    texts2, per_choice, chunks = _collect_stream(client.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))
    assert texts2 == texts
    counts = [ch.usage.completion_tokens for ch in chunks]
    assert counts == sorted(counts) and counts[-1] == 20 and 0 < counts[0] <= 2
    assert all(ch.usage.prompt_tokens == full.usage.prompt_tokens for ch in chunks)


def test_n_seed_and_prompt_batches(client: openai.OpenAI, rng: random.Random) -> None:
    p0, p1 = _prompt(rng), _prompt(rng)
    seed = rng.randrange(1 << 30)

    def texts(prompt: Any, s: int, n: int = 3) -> list[str]:
        # 32 tokens: some prompts lead the tiny model into a near-certain loop, where three
        # 8-token samples came out identical in about one run of twelve.
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, n=n, temperature=1.0, seed=s,
                                      extra_body=NO_EOS)
        assert [c.index for c in r.choices] == list(range(len(r.choices)))
        return [c.text for c in r.choices]

    first = texts(p0, seed)
    assert len(first) == 3 and len(set(first)) > 1  # independent samples
    assert texts(p0, seed) == first  # the seed reproduces them
    assert texts(p0, seed + 1) != first
    # Several prompts: choice index = prompt index * n + sample index.
    both = texts([p0, p1], seed, n=2)
    assert both[:2] == first[:2] and both[2:] == texts(p1, seed, n=2)


def test_stop_strings(client: openai.OpenAI, rng: random.Random) -> None:
    prompt = _prompt(rng)
    base = dict(model=MODEL, prompt=prompt, max_tokens=24, extra_body=NO_EOS, **GREEDY)
    full = client.completions.create(**base).choices[0].text
    k = rng.randint(len(full) // 3, len(full) // 2)
    stop = full[k:k + 3]
    cut = full.find(stop)
    r = client.completions.create(stop=[stop, "\x00never"], **base)
    (c,) = r.choices
    assert (c.text, c.finish_reason, c.stop_reason) == (full[:cut], "stop", stop)
    assert r.usage.completion_tokens < 24
    # Streaming never leaks the stop string, even when it spans chunks.
    texts, per_choice, _ = _collect_stream(client.completions.create(stop=stop, stream=True, **base))
    assert texts[0] == full[:cut] and per_choice[0][-1].finish_reason == "stop"
    kept = client.completions.create(stop=stop, **{**base, "extra_body": {**NO_EOS,
                                                                          "include_stop_str_in_output": True}})
    assert kept.choices[0].text == full[:cut + len(stop)]


def test_completion_logprobs(client: openai.OpenAI, rng: random.Random) -> None:
    kw = dict(model=MODEL, prompt=_prompt(rng), max_tokens=8, logprobs=3, extra_body=NO_EOS, **GREEDY)
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and tlp <= 0
        assert tlp == pytest.approx(max(top.values()))  # greedy: the chosen token is the likeliest
        assert top.get(tok, tlp) == pytest.approx(tlp)
    assert lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    # The streamed pieces add up to the same lists.
    tokens: list[str] = []
    offsets: list[int] = []
    for ch in client.completions.create(stream=True, **kw):
        for c in ch.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                offsets += c.logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset


# ====================================================================== chat
def test_chat_matches_template_and_streams(client: openai.OpenAI, llm: LLM, rng: random.Random) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": _prompt(rng)}]
    ids = llm.apply_chat_template(messages)
    want = _expected(llm, {"prompt_token_ids": ids}, 9, **GREEDY, **NO_EOS).outputs[0].text
    kw: dict[str, Any] = dict(model=MODEL, messages=messages, max_completion_tokens=9, max_tokens=50,
                              extra_body=NO_EOS, **GREEDY)
    r = client.chat.completions.create(**kw)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (c,) = r.choices
    assert c.message.role == "assistant" and c.message.content == want
    assert c.finish_reason == "length" and c.logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 9)

    texts, per_choice, chunks = _collect_stream(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert texts == {0: want}
    first = per_choice[0][0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    assert all(c.delta.role is None for c in per_choice[0][1:])
    assert per_choice[0][-1].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    # vLLM's continuous_usage_stats: every chunk (the role's too) carries the usage so far.
    _, _, chunks = _collect_stream(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))
    counts = [ch.usage.completion_tokens for ch in chunks]
    assert chunks[0].usage.prompt_tokens == len(ids) and counts[0] == 0 and counts[-1] == counts[-2] == 9
    assert counts == sorted(counts) and all(ch.usage.total_tokens == len(ids) + ch.usage.completion_tokens
                                            for ch in chunks)


def test_chat_n_and_logprobs(client: openai.OpenAI, rng: random.Random) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": _prompt(rng)}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=2,
                                       extra_body=NO_EOS, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    joined = "".join(t.token for t in content)
    if "\ufffd" not in joined:  # a token holding part of a character has no text of its own
        assert joined == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.bytes == list(t.token.encode())
    seed = rng.randrange(1 << 30)
    rs = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, n=2, seed=seed,
                                         temperature=1.0, extra_body=NO_EOS) for _ in range(2)]
    assert [c.index for c in rs[0].choices] == [0, 1]
    assert [c.message.content for c in rs[0].choices] == [c.message.content for c in rs[1].choices]


# ====================================================================== bad input
_LONG = "word " * (TINY_CONTEXT + 50)
_BAD_COMPLETIONS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1.5}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt"),
    ({"prompt": _LONG}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": 99}, "logprobs"),
    ({"stream": "yes"}, "stream"),
    ({"seed": "abc"}, "seed"),
    ({"suffix": "x"}, "suffix"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"extra_body": {"top_k": -7}}, "top_k"),
    ({"extra_body": {"min_p": 2.0}}, "min_p"),
    ({"extra_body": {"top_k": 2**63}}, "top_k"),  # JSON ints are unbounded; tensors are not
    ({"seed": 2**64}, "seed"),
]
_BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": _LONG}]}, "messages"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"n": 0}, "n"),
    # tool_choice defaults to "auto" with tools, which needs a server with a tool-call parser.
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
]


def _bad_request(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as ei:
        call()
    assert ei.value.status_code == 400
    body = ei.value.body
    assert body["type"] == "invalid_request_error" and body["message"]
    return body


@pytest.mark.parametrize(("override", "param"), _BAD_COMPLETIONS, ids=[p for _, p in _BAD_COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_completion_requests_are_400(client: openai.OpenAI, override: dict, param: str, stream: bool) -> None:
    kw = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": stream, **override}
    assert _bad_request(lambda: client.completions.create(**kw))["param"] == param


@pytest.mark.parametrize(("override", "param"), _BAD_CHAT, ids=[p for _, p in _BAD_CHAT])
def test_bad_chat_requests_are_400(client: openai.OpenAI, override: dict, param: str) -> None:
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **override}
    assert _bad_request(lambda: client.chat.completions.create(**kw))["param"] == param


def test_malformed_bodies_and_unknown_model(client: openai.OpenAI, server, rng: random.Random) -> None:
    url = f"{server.base_url}/v1/completions"
    ok = b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": 2}'
    for body, ctype in ((b"{not json", "application/json"), (b"[1, 2]", "application/json"),
                        (b'{"model": "tiny-chat"}', "application/json"), (b'{"prompt": "hi"}', "application/json"),
                        (b"", "application/json"), (ok.replace(b"2}", b"NaN}"), "application/json"),
                        (ok.replace(b"2}", b"1e400}"), "application/json"), (ok, "text/plain")):
        r = httpx.post(url, content=body, headers={"content-type": ctype})
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"
    for call in (lambda: client.completions.create(model="gpt-4", prompt="hi", max_tokens=2),
                 lambda: client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])):
        with pytest.raises(openai.NotFoundError) as ei:
            call()
        assert ei.value.status_code == 404
        assert ei.value.body["code"] == "model_not_found" and ei.value.body["param"] == "model"
    assert httpx.get(f"{server.base_url}/v1/nowhere").json()["error"]["type"] == "invalid_request_error"
    # None of it disturbed the engine.
    r = client.completions.create(model=MODEL, prompt=_prompt(rng), max_tokens=3, extra_body=NO_EOS)
    assert r.usage.completion_tokens == 3
    assert _wait_idle(server.base_url)["pagedattn_kv_blocks_used"] == 0


_SURROGATES = [  # JSON may spell lone surrogates, which are no Unicode text
    ("completions", {"prompt": "\ud800 hi"}, "prompt"),
    ("completions", {"prompt": ["fine", "hi \udfff"]}, "prompt"),
    ("chat/completions", {"messages": [{"role": "user", "content": "\ud800 hi"}]}, "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "system", "content": "ok"},
                                       {"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]},
     "messages.1.content"),
]


@pytest.mark.parametrize(("path", "fields", "param"), _SURROGATES, ids=[p for *_, p in _SURROGATES])
@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogates_are_400(server, path: str, fields: dict[str, Any], param: str, stream: bool) -> None:
    body = json.dumps({"model": MODEL, "max_tokens": 2, "stream": stream, **fields})  # ASCII: escapes kept
    assert "\\ud" in body or "\\udc" in body
    r = httpx.post(f"{server.base_url}/v1/{path}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "not valid Unicode" in err["message"]


def test_lone_surrogate_in_model_name_is_404(server) -> None:
    body = json.dumps({"model": "x\udc80", "prompt": "hi"})
    r = httpx.post(f"{server.base_url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_offline_engine_refuses_lone_surrogates(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"^prompt: not valid Unicode text .*character 3"):
        llm.engine.inputs.tokenize("ok \ud800")
    with pytest.raises(ValueError, match="not valid Unicode text"):
        llm.generate(["fine", "ok \ud800"], SamplingParams(max_tokens=2), use_tqdm=False)


# ====================================================================== disconnects, metrics
@pytest.mark.parametrize("stream", [False, True])
def test_samples_ending_on_their_first_token_keep_the_server_up(client: openai.OpenAI, server, stream: bool) -> None:
    """n=2 with max_tokens=1 (every sample ends on its first token) used to stop the engine."""
    bodies = ({"prompt": "Hello there", "n": 2, "max_tokens": 1}, {"prompt": "Hi", "n": 3, "max_tokens": 1, **GREEDY})
    for body in bodies:
        r = client.completions.create(model=MODEL, stream=stream, **body)  # type: ignore[call-overload]
        choices = [c for chunk in r for c in chunk.choices] if stream else r.choices
        assert {c.index for c in choices} == set(range(body["n"]))
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert _wait_idle(server.base_url)["pagedattn_kv_blocks_used"] == 0


def test_a_request_failing_alone_is_a_500_and_the_others_are_served(client: openai.OpenAI, server,
                                                                   rng: random.Random, monkeypatch) -> None:
    """A failure inside one request (here its stop check) ends that request with an OpenAI-style
    500, internal details only in the log; requests beside it and after it are served."""
    eng = server.engine.engine
    check = type(eng.outputs)._check_stop
    poison = _prompt(rng) + " poison"

    def failing_check(self, req, seq, tok):  # type: ignore[no-untyped-def]
        if req.prompt == poison and seq.num_output_tokens == 2:
            raise RuntimeError("secret internal detail")
        return check(self, req, seq, tok)

    monkeypatch.setattr(type(eng.outputs), "_check_stop", failing_check)
    good = _prompt(rng)

    async def both() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        return await asyncio.gather(
            aclient.completions.create(model=MODEL, prompt=poison, max_tokens=8, extra_body=NO_EOS),
            aclient.completions.create(model=MODEL, prompt=good, max_tokens=8, extra_body=NO_EOS),
            return_exceptions=True)

    bad, ok = asyncio.run(both())
    assert isinstance(bad, openai.InternalServerError) and bad.status_code == 500
    assert "secret" not in str(bad.body) and bad.body["type"] == "server_error"
    assert not isinstance(ok, BaseException) and ok.choices[0].finish_reason == "length"
    with httpx.stream("POST", f"{server.base_url}/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": poison, "max_tokens": 8, "stream": True, **NO_EOS}) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and '"server_error"' in events[-2]
    assert client.completions.create(model=MODEL, prompt=good, max_tokens=3).choices[0].text is not None
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert _wait_idle(server.base_url)["pagedattn_kv_blocks_used"] == 0


def test_client_disconnect_aborts_the_request(server, rng: random.Random) -> None:
    url = f"{server.base_url}/v1/completions"
    body = {"model": MODEL, "prompt": _prompt(rng), "max_tokens": TINY_CONTEXT - 64, "ignore_eos": True}
    before = _wait_idle(server.base_url)["pagedattn_generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up waiting
        httpx.post(url, json=body, timeout=httpx.Timeout(30, read=0.5))
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as r:  # streaming: read a bit, hang up
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
    assert got[0].startswith("data: {")
    m = _wait_idle(server.base_url)
    assert m["pagedattn_kv_blocks_used"] == 0 and m["pagedattn_requests_running"] == 0
    # Both stopped long before their max_tokens.
    assert m["pagedattn_generation_tokens_total"] - before < 2 * body["max_tokens"] * 0.75


def test_metrics_endpoint(client: openai.OpenAI, server, rng: random.Random) -> None:
    client.completions.create(model=MODEL, prompt=_prompt(rng), max_tokens=5, extra_body=NO_EOS)
    r = httpx.get(f"{server.base_url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("kv_blocks_used", "kv_blocks_total", "prefix_cache_hit_rate", "requests_running",
                 "requests_waiting", "requests_swapped", "preemptions", "generation_tokens",
                 "time_to_first_token_seconds", "time_per_output_token_seconds"):
        assert f"pagedattn_{name}" in families, name
    for name in ("pagedattn_preemptions_total", "pagedattn_generation_tokens_total"):
        assert f"\n{name} " in r.text
    m = _wait_idle(server.base_url)
    assert m["pagedattn_kv_blocks_total"] == 512 and m["pagedattn_kv_blocks_used"] == 0
    assert m["pagedattn_generation_tokens_total"] >= 5
    assert m["pagedattn_time_to_first_token_seconds_count"] >= 1
    assert m["pagedattn_time_per_output_token_seconds_count"] >= 1
    assert 0 <= m["pagedattn_prefix_cache_hit_rate"] <= 1


# ====================================================================== the async engine itself
def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def test_async_engine_streams_and_validates_before_queueing(tiny_model_dir: Path, rng: random.Random) -> None:
    engine = make_async_engine(tiny_model_dir)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        with pytest.raises(ValueError, match="prompt"):
            await engine.generate("w " * (TINY_CONTEXT + 5), params)
        with pytest.raises(ValueError, match="prompt"):
            await engine.generate("", params)
        stream = await engine.generate(_prompt(rng), params)
        prev_ids: list[int] = []
        outs = [o async for o in stream]
        for o in outs:  # cumulative: every output extends the previous one
            ids = o.outputs[0].token_ids
            assert ids[: len(prev_ids)] == prev_ids
            prev_ids = ids
        assert outs[-1].finished and len(prev_ids) == 12 and not any(o.finished for o in outs[:-1])
        # Closing a stream early aborts its request and frees its blocks.
        stream = await engine.generate(_prompt(rng), SamplingParams(max_tokens=1500, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            m = await engine.get_metrics()
            if m["kv_blocks_used"] == 0 and m["num_requests_running"] == 0:
                break
            await asyncio.sleep(0.02)
        assert m["kv_blocks_used"] == 0 and m["num_generated_tokens"] < 1000
        # So does dropping one without closing it.
        stream = await engine.generate(_prompt(rng), SamplingParams(max_tokens=1500, ignore_eos=True))
        await stream.__anext__()
        del stream
        gc.collect()
        for _ in range(200):
            m = await engine.get_metrics()
            if m["kv_blocks_used"] == 0 and m["num_requests_running"] == 0:
                break
            await asyncio.sleep(0.02)
        assert m["kv_blocks_used"] == 0 and m["num_generated_tokens"] < 2000
        await engine.run_in_engine(lambda e: e.check_integrity())

    try:
        _run(main())
    finally:
        engine.shutdown()
    assert not engine.is_running


def test_async_engine_hands_a_steps_outputs_over_in_one_wake_up(tiny_model_dir: Path, rng: random.Random) -> None:
    """All streams' outputs of a step reach the event loop with one ``call_soon_threadsafe`` (a
    pipe write and a wake-up each), not one per stream; every stream still gets every output."""
    engine = make_async_engine(tiny_model_dir)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)

    async def collect(stream: Any) -> list[Any]:
        return [o async for o in stream]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        batches: list[int] = []
        real = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any, **kw: Any) -> Any:
            if callback is async_engine._put_all:
                batches.append(len(args[0]))
            return real(callback, *args, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        streams = await asyncio.gather(*(engine.generate(_prompt(rng), params) for _ in range(6)))
        outs = await asyncio.gather(*(collect(s) for s in streams))
        steps = (await engine.get_metrics())["num_steps"]
        for o in outs:
            assert o[-1].finished and len(o[-1].outputs[0].token_ids) == 30
        assert len(batches) <= steps and max(batches) > 1
        assert sum(batches) >= sum(len(o) for o in outs)  # a consumer may skip, never gain, an output

    try:
        _run(main())
    finally:
        engine.shutdown()


def test_async_engine_factory_errors_reach_the_caller(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        AsyncLLMEngine.from_factory(lambda: LLM(str(tmp_path / "missing"), device="cpu").engine)


def test_async_engine_failure_fails_pending_requests(tiny_model_dir: Path, rng: random.Random) -> None:
    engine = make_async_engine(tiny_model_dir)
    real_step = engine.engine.step
    calls = {"n": 0}

    def failing_step() -> Any:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("device lost")
        return real_step()

    engine.engine.step = failing_step  # type: ignore[method-assign]

    async def main() -> None:
        stream = await engine.generate(_prompt(rng), SamplingParams(max_tokens=50, ignore_eos=True))
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.generate(_prompt(rng), SamplingParams(max_tokens=5))
        assert (await engine.get_metrics())["num_steps"] == 3  # still readable, from this thread

    try:
        _run(main())
    finally:
        engine.shutdown()
    assert isinstance(engine.error, RuntimeError) and not engine.is_running


def test_async_engine_shutdown_ends_streams_and_idles_quietly(tiny_model_dir: Path, rng: random.Random) -> None:
    engine = make_async_engine(tiny_model_dir)

    async def main() -> None:
        engine.start()
        await asyncio.sleep(0.2)
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(0.6)  # nothing to do: the loop must sleep, not spin
        assert time.process_time() - cpu0 < 0.5 * (time.monotonic() - wall0)
        stream = await engine.generate(_prompt(rng), SamplingParams(max_tokens=1500, ignore_eos=True))
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.generate("x", SamplingParams())
        assert (await engine.get_metrics())["kv_blocks_used"] == 0

    _run(main())
    assert engine._thread is not None and not engine._thread.is_alive()


# ====================================================================== the real default model
def test_default_model_answers_paris(default_model_dir: Path) -> None:
    from pagedattn.entrypoints.server import default_model_name

    llm = LLM(None, device="cpu", num_kv_blocks=64, swap_space_gib=0.01)  # the fixture converted it already
    name = default_model_name(None, llm.engine.source)
    assert name == "SmolLM2-135M-Instruct"  # the name the README's examples use
    srv = start_server(AsyncLLMEngine(llm.engine), name)
    try:
        c = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.completions.create(model=name, prompt="The capital of France is", max_tokens=3, temperature=0)
        assert r.choices[0].text.startswith(" Paris.")
    finally:
        srv.stop()
