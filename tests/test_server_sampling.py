"""Sampling controls, echo, prompt logprobs and cached tokens through the server, with the
official ``openai`` client, checked against the offline ``LLM`` on the same weights."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from pagedattn import LLM, SamplingParams

from .server_harness import TINY_CONTEXT, TINY_MODEL_NAME, make_async_engine, start_server, tiny_chat_model

PROMPT = "A quiet garden under the winter light, where the river meets the stone wall and"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return tiny_chat_model(tmp_path_factory, default_model_dir)


@pytest.fixture(scope="module")
def server(model_dir: Path):
    srv = start_server(make_async_engine(model_dir, enable_prefix_caching=True))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), device="cpu", block_size=16, num_kv_blocks=512, swap_space_gib=0.05)


def _offline(llm: LLM, **kw: object) -> object:
    return llm.generate(PROMPT, SamplingParams(**{"temperature": 0, "ignore_eos": True, **kw}), use_tqdm=False)[0]


def test_penalties_bias_and_masks_are_the_engine_s(client: openai.OpenAI, llm: LLM) -> None:
    base = dict(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    r = client.completions.create(**base, presence_penalty=1.0, frequency_penalty=0.5,
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    want = _offline(llm, max_tokens=10, presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.3)
    assert r.choices[0].text == want.outputs[0].text
    tok = llm.get_tokenizer()
    forced = client.completions.create(**base, logit_bias={"1000": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tok.decode([1000] * 10)
    allowed = [1000, 1001, 1002]
    r = client.completions.create(**{**base, "temperature": 1.0}, logprobs=0,
                                  extra_body={"ignore_eos": True, "allowed_token_ids": allowed})
    assert r.choices[0].text == tok.decode(_ids(tok, r.choices[0].logprobs.tokens, allowed))
    plain = _offline(llm, max_tokens=10).outputs[0]
    word = tok.decode(plain.token_ids[:1])
    chat = client.chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=6, temperature=0, presence_penalty=-1.0,
                                          extra_body={"ignore_eos": True, "bad_words": [word]})
    want = llm.chat([{"role": "user", "content": PROMPT}], SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, presence_penalty=-1.0, bad_words=[word]))[0]
    assert chat.choices[0].message.content == want.outputs[0].text


def _ids(tok: object, texts: list[str], allowed: list[int]) -> list[int]:
    """The allowed ids whose texts the response's logprobs name, in order."""
    by_text = {tok.decode([t]): t for t in allowed}  # type: ignore[attr-defined]
    assert set(texts) <= set(by_text), texts
    return [by_text[s] for s in texts]


def test_echo_prepends_the_prompt_and_its_logprobs(client: openai.OpenAI, llm: LLM) -> None:
    base = dict(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**base)
    echoed = client.completions.create(**base, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**base, echo=True, stream=True)
                       if c.choices)
    assert streamed == echoed.choices[0].text
    r = client.completions.create(**base, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    want = _offline(llm, max_tokens=5, logprobs=2, prompt_logprobs=2)
    n_prompt = len(want.prompt_token_ids)
    assert len(lp.tokens) == n_prompt + 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, n_prompt):
        tid = want.prompt_token_ids[i]
        assert lp.token_logprobs[i] == pytest.approx(want.prompt_logprobs[i][tid], abs=1e-4)
        assert lp.tokens[i] == llm.get_tokenizer().decode([tid])
        assert 2 <= len(lp.top_logprobs[i]) <= 3
    for j, tid in enumerate(want.outputs[0].token_ids):
        assert lp.token_logprobs[n_prompt + j] == pytest.approx(want.outputs[0].logprobs[j][tid], abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chunks = [c for c in client.completions.create(**base, echo=True, logprobs=2, stream=True) if c.choices]
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == n_prompt + 5
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    # Two choices (and two prompts): each choice's first chunk carries its prompt's echo.
    chunks = [c for c in client.completions.create(**{**base, "prompt": [PROMPT, PROMPT]}, n=2, echo=True,
                                                   logprobs=2, stream=True) if c.choices]
    for index in range(4):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert sum(len(c.logprobs.tokens) for c in mine) == n_prompt + 5
        assert "".join(c.text for c in mine) == echoed.choices[0].text
        assert mine[0].logprobs.token_logprobs[0] is None and mine[-1].finish_reason == "length"


def test_prompt_logprobs_field(client: openai.OpenAI, llm: LLM) -> None:
    want = _offline(llm, max_tokens=2, prompt_logprobs=1)
    r = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 1})
    got = r.choices[0].prompt_logprobs  # type: ignore[attr-defined]
    assert got[0] is None and len(got) == len(want.prompt_token_ids)
    tok = llm.get_tokenizer()
    for d, w in zip(got[1:], want.prompt_logprobs[1:]):
        assert {int(t) for t in d} == set(w)
        for t, entry in d.items():
            assert entry["logprob"] == pytest.approx(w[int(t)], abs=1e-4)
            assert entry["decoded_token"] == tok.decode([int(t)])
    chat = client.chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=2, extra_body={"prompt_logprobs": 0})
    assert chat.prompt_logprobs[0] is None  # type: ignore[attr-defined]
    assert all(len(d) == 1 for d in chat.prompt_logprobs[1:])  # type: ignore[attr-defined]
    assert client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=2).choices[0].model_extra[
        "prompt_logprobs"] is None


def test_cached_tokens_on_a_repeated_prompt(client: openai.OpenAI) -> None:
    prompt = PROMPT * 3  # several blocks of 16 tokens
    first = client.completions.create(model=TINY_MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=TINY_MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    n = second.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    assert first.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens_details.cached_tokens
    assert second.choices[0].text == first.choices[0].text
    # vLLM's cache_salt: only requests with the same salt share cached blocks.
    def cached(**salt: str) -> int:
        r = client.completions.create(model=TINY_MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body=salt)
        assert r.choices[0].text == first.choices[0].text
        return r.usage.prompt_tokens_details.cached_tokens
    assert cached(cache_salt="tenant-a") == 0
    assert cached(cache_salt="tenant-a") == cached() == second.usage.prompt_tokens_details.cached_tokens
    assert cached(cache_salt="tenant-b") == 0
    chat = dict(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=2)
    fresh = client.chat.completions.create(**chat, extra_body={"cache_salt": "tenant-c"})
    again = client.chat.completions.create(**chat, extra_body={"cache_salt": "tenant-c"})
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0 < again.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize(("body", "param"), [
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"cache_salt": ""}, "cache_salt"),
    ({"cache_salt": 5}, "cache_salt"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"10000000": 1}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [10**7]}, "allowed_token_ids"),
    ({"bad_words": [" "]}, "bad_words"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_bad_values_are_400_naming_the_field(server, body: dict, param: str) -> None:
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=30,
                   json={"model": TINY_MODEL_NAME, "prompt": "hi", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_return_token_ids(client: openai.OpenAI, llm: LLM) -> None:
    """vLLM's return_token_ids: the prompt's ids and each choice's, whole or a stream's pieces."""
    want = _offline(llm, max_tokens=6, n=2, seed=4, temperature=0.9)
    base = dict(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=6, n=2, seed=4, temperature=0.9,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    r = client.completions.create(**base)
    for c in r.choices:
        extra = c.model_extra or {}
        assert extra["token_ids"] == want.outputs[c.index].token_ids
        assert extra["prompt_token_ids"] == want.prompt_token_ids
    got: dict[int, list[int]] = {}
    firsts: dict[int, int] = {}
    for chunk in client.completions.create(stream=True, **base):
        for c in chunk.choices:
            extra = c.model_extra or {}
            got.setdefault(c.index, []).extend(extra["token_ids"])
            if extra.get("prompt_token_ids") is not None:
                assert extra["prompt_token_ids"] == want.prompt_token_ids and c.index not in firsts
                firsts[c.index] = len(got[c.index])
    assert got == {c.index: c.token_ids for c in want.outputs} and sorted(firsts) == [0, 1]
    assert not client.completions.create(**{**base, "extra_body": {"ignore_eos": True}}).choices[0].model_extra[
        "token_ids"]  # off by default

    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": PROMPT}]
    chat = dict(model=TINY_MODEL_NAME, messages=messages, max_tokens=5, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    prompt_ids = llm.apply_chat_template(messages)
    whole = client.chat.completions.create(**chat)
    assert (whole.model_extra or {})["prompt_token_ids"] == prompt_ids
    (c,) = whole.choices
    assert tok.decode((c.model_extra or {})["token_ids"]) == c.message.content
    streamed: list[int] = []
    prompts = []
    for chunk in client.chat.completions.create(stream=True, **chat):
        prompts.append((chunk.model_extra or {}).get("prompt_token_ids"))
        for ch in chunk.choices:
            streamed.extend((ch.model_extra or {}).get("token_ids") or [])
    assert streamed == (c.model_extra or {})["token_ids"] and len(streamed) == 5
    assert prompts[0] == prompt_ids and all(p is None for p in prompts[1:])


def test_truncate_prompt_tokens(client: openai.OpenAI, llm: LLM) -> None:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens run (and are what the usage
    counts); -1 keeps what the context holds with one token to generate, so a prompt too long
    for it runs instead of being a 400."""
    ids = llm.get_tokenizer().encode(PROMPT * 3)
    (want,) = llm.generate({"prompt_token_ids": ids[-20:]}, SamplingParams(temperature=0, max_tokens=4,
                                                                           ignore_eos=True), use_tqdm=False)
    for prompt in (PROMPT * 3, ids):
        r = client.completions.create(model=TINY_MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True, "truncate_prompt_tokens": 20})
        assert r.usage.prompt_tokens == 20 and r.choices[0].text == want.outputs[0].text
    (offline,) = llm.generate(PROMPT * 3, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                         truncate_prompt_tokens=20), use_tqdm=False)
    assert offline.prompt_token_ids == ids[-20:] and offline.prompt is None
    assert offline.outputs[0].token_ids == want.outputs[0].token_ids
    huge = PROMPT * 200  # past the 2048-token context
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=TINY_MODEL_NAME, prompt=huge, max_tokens=2)
    r = client.completions.create(model=TINY_MODEL_NAME, prompt=huge, max_tokens=2,
                                  extra_body={"truncate_prompt_tokens": -1})
    assert r.usage.prompt_tokens == TINY_CONTEXT - 1 and r.choices[0].finish_reason == "length"
    short = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                      extra_body={"truncate_prompt_tokens": 1000})
    assert short.usage.prompt_tokens == len(llm.get_tokenizer().encode(PROMPT))  # shorter: as it is
    for bad, param in (({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                       ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
                       ({"truncate_prompt_tokens": 5, "truncation_side": "right"}, "truncation_side")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=2, extra_body=bad)
        assert e.value.body["param"] == param  # type: ignore[index]
    for bad_value in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad_value)
