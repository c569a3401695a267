"""Byte-fallback vocabularies end to end: generation whose tokens land on byte tokens (split
characters, stray bytes that turn a run into U+FFFD) runs to the end, and every finished text is
the tokenizer's decode of the output tokens, cut at the first stop string; through ``LLM``, the
OpenAI server's streaming, and a model read from GGUF.

The model is a tiny random Llama with near-uniform output, so at temperature 1 about two tokens
in three are byte tokens (the vocabulary is the 256 bytes and some 150 pieces).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from pagedattn import LLM, SamplingParams

from .server_harness import make_async_engine, start_server
from .test_detokenizer import expected_text, llama_tokenizer, write_llama_gguf

KW: dict[str, Any] = dict(device="cpu", block_size=16, num_kv_blocks=256, swap_space_gib=0.05)
PROMPTS = ["I like ☕ and", "Tell me something:", "日本"]


@pytest.fixture(scope="module")
def llm(byte_model: Path) -> LLM:
    return LLM(str(byte_model), **KW)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    return random.Random(f"{request.node.name}-{time.time_ns()}").randrange(1 << 30)


def _check_texts(llm: LLM, outs: list[Any]) -> list[tuple[list[int], Any]]:
    tok = llm.engine.tokenizer
    done = []
    for o in outs:
        for c in o.outputs:
            assert c.text == expected_text(tok, o.prompt_token_ids, c.token_ids, True)
            done.append((o.prompt_token_ids, c))
    return done


def test_sampling_onto_byte_tokens_gives_the_full_decode(llm: LLM, seed: int) -> None:
    params = SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=seed, ignore_eos=True)
    done = _check_texts(llm, llm.generate(PROMPTS, params, use_tqdm=False))
    assert sum(c.text.count("\ufffd") for _, c in done) > 0  # stray bytes were sampled
    # Stop strings cut from those texts where they span byte tokens: the rerun ends where the
    # string first occurs, whether it came out while streaming or with the held-back end.
    for prompt, c in done[:12:4]:  # one sample of each prompt
        multi = [i for i, ch in enumerate(c.text) if ord(ch) > 127] or [len(c.text) // 2]
        k = multi[len(multi) // 2]
        stop = c.text[max(0, k - 1):k + 2]
        (o,) = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
            n=4, temperature=1.0, max_tokens=24, seed=seed, ignore_eos=True, stop=[stop]), use_tqdm=False)
        got = o.outputs[c.index]
        assert got.text == c.text[:c.text.find(stop)] and got.stop_reason == stop


def test_generate_makes_its_text_once_streams_make_it_as_they_go(llm: LLM, seed: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """LLM.generate's requests without stop strings are detokenised once, when they finish;
    LLM.stream's as they go.  Same tokens (seeded), same texts."""
    import pagedattn.engine.output_processor as op

    calls = [0]
    incremental = op.detokenize_incrementally

    def counted(*args: Any) -> str:
        calls[0] += 1
        return incremental(*args)

    monkeypatch.setattr(op, "detokenize_incrementally", counted)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=seed, ignore_eos=True)
    once = _check_texts(llm, llm.generate(PROMPTS, params, use_tqdm=False))
    assert calls[0] == 0
    streamed = {}
    for out in llm.stream(PROMPTS, params):
        if out.finished:
            streamed[tuple(out.prompt_token_ids)] = out
    assert calls[0] > 0
    for prompt, c in once:
        assert streamed[tuple(prompt)].outputs[c.index].text == c.text


def test_a_failed_sample_of_generate_keeps_the_text_of_its_tokens(llm: LLM, seed: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample that fails midway (here its stop check raises at its fifth token) finishes with
    finish_reason "error" and the text of the tokens it got, though generate makes its text only
    at the end; the other requests run to the end."""
    outputs = llm.engine.outputs
    check = outputs._check_stop

    def failing(req: Any, seq: Any, tok: int) -> None:
        if req.prompt == PROMPTS[1] and seq.num_output_tokens == 5:
            raise RuntimeError("stop check failed")
        check(req, seq, tok)

    monkeypatch.setattr(outputs, "_check_stop", failing)
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=seed, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    tok = llm.engine.tokenizer
    for o in outs:
        (c,) = o.outputs
        assert c.text == expected_text(tok, o.prompt_token_ids, c.token_ids, True)
        assert (c.finish_reason, len(c.token_ids)) == (("error", 5) if o.prompt == PROMPTS[1] else ("length", 12))
    assert outs[1].error is not None


def test_server_streaming_of_byte_tokens(byte_model: Path, llm: LLM, seed: int) -> None:
    """Streamed choices (the engine's DELTA outputs) join into the non-streamed ones (its
    FINAL_ONLY outputs) and into ``LLM.generate``'s, also where stop strings cut text that a
    stream must have held back, with min_tokens and with the stop string kept."""
    srv = start_server(make_async_engine(byte_model, num_kv_blocks=256), name="byte-llama")
    rng = random.Random(seed)
    try:
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        base: dict[str, Any] = dict(n=3, temperature=1.0, max_tokens=24, seed=seed, ignore_eos=True)
        (want,) = llm.generate(PROMPTS[0], SamplingParams(**base), use_tqdm=False)
        _check_texts(llm, [want])
        texts = [c.text for c in want.outputs if len(c.text) > 4]
        cases: list[dict[str, Any]] = [{}]
        for _ in range(3):
            t = rng.choice(texts)
            i = rng.randrange(1, len(t) - 2)
            cases.append(dict(stop=[t[i:i + rng.randint(1, 3)], "never-in-it"], min_tokens=rng.randint(0, 3),
                              include_stop_str_in_output=rng.random() < 0.5))
        stopped = 0
        for extra in cases:
            params = {**base, **extra}
            kw: dict[str, Any] = dict(model="byte-llama", prompt=PROMPTS[0], max_tokens=24, n=3, temperature=1.0,
                                      seed=seed, extra_body={k: v for k, v in params.items()
                                                             if k not in ("n", "temperature", "max_tokens", "seed")})
            streamed: dict[int, str] = {}
            usage = None
            for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
                for c in chunk.choices:
                    streamed[c.index] = streamed.get(c.index, "") + c.text
                usage = chunk.usage or usage
            whole = client.completions.create(**kw)
            (offline,) = llm.generate(PROMPTS[0], SamplingParams(**params), use_tqdm=False)
            assert streamed == {c.index: c.text for c in whole.choices} == {c.index: c.text for c in offline.outputs}
            assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens \
                == sum(len(c.token_ids) for c in offline.outputs), extra
            stopped += sum(isinstance(c.stop_reason, str) for c in offline.outputs)
        assert stopped >= 3  # the stop strings did cut samples
    finally:
        srv.stop()


def test_gguf_llama_vocabulary_generates_the_full_decode(tmp_path: Path, seed: int) -> None:
    """A GGUF with a SentencePiece vocabulary: the loader builds a byte-fallback tokenizer from
    its metadata, and sampling onto its byte tokens gives the full decode too."""
    llm = LLM(str(write_llama_gguf(tmp_path / "tiny-llama.gguf", llama_tokenizer())), **KW)
    tok = llm.engine.tokenizer
    assert tok.decode(tok.convert_tokens_to_ids(["<0xE2>", "<0x98>", "<0x95>"])) == "☕"
    assert tok.decode(tok.encode("Hi ☕ 日本 there", add_special_tokens=False)) == "Hi ☕ 日本 there"
    params = SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=seed, ignore_eos=True)
    _check_texts(llm, llm.generate(PROMPTS, params, use_tqdm=False))


def test_text_of_the_first_min_tokens_is_never_searched_for_stop_strings(llm: LLM) -> None:
    """A stop string that occurs only in the text made before the last of the first
    ``min_tokens`` tokens does not cut it later (vLLM's rule: a stream may have sent that text
    already); without min_tokens the same string stops the sample."""
    params = dict(temperature=1.0, max_tokens=12, ignore_eos=True)
    tried = 0
    for seed in range(60):
        steps = list(llm.stream(PROMPTS[0], SamplingParams(**params, seed=seed)))
        c = steps[-1].outputs[0]
        # The text made by the time the second token came (the detokenizer may still hold some
        # back): it was there before the third token, the last that min_tokens=3 keeps from stopping.
        assert len(steps[1].outputs[0].token_ids) == 2
        head = steps[1].outputs[0].text
        early = next((ch for ch in head if ch.strip() and c.text.count(ch) == 1), None)
        if early is None:
            continue
        tried += 1
        (got,) = llm.generate(PROMPTS[0], SamplingParams(**params, seed=seed, min_tokens=3, stop=[early]),
                              use_tqdm=False)
        assert got.outputs[0].text == c.text and got.outputs[0].finish_reason == "length"
        (cut,) = llm.generate(PROMPTS[0], SamplingParams(**params, seed=seed, stop=[early]), use_tqdm=False)
        assert cut.outputs[0].stop_reason == early  # without min_tokens it does stop there
    assert tried >= 3
