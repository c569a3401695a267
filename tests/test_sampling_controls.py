"""Sampling controls and prompt logprobs through the engine, on tiny random models.

HF transformers is the oracle: greedy decoding with ``repetition_penalty`` is ``generate``'s,
presence and frequency penalties are a step-by-step loop over HF's logits, prompt logprobs are
the log-softmax of HF's logits over the prompt (fp32), with prefix caching on and off, chunked
prefill and recomputation after preemption.  Bad words go through the real tokenizer of the
tiny chat model.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from pagedattn import LLM, SamplingParams

from .engine_models import make_model_dir
from .server_harness import tiny_chat_model

FAMILY = "llama3_untied_gqa"
VOCAB = 320


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models"), FAMILY)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return _llm(model_dir)


def _llm(path: Path, **kw: object) -> LLM:
    kw = {"device": "cpu", "block_size": 4, "num_kv_blocks": 256, "swap_space_gib": 0.01, **kw}
    return LLM(str(path), **kw)


def _prompts(seed: int, lens: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lens]


def _tokens(llm: LLM, prompts: list[list[int]], sp: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


# ====================================================================== penalties against HF
def test_greedy_repetition_penalty_is_hf_generate(llm: LLM, hf: transformers.PreTrainedModel) -> None:
    prompts = _prompts(1, (6, 13))
    want = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                            repetition_penalty=1.8, eos_token_id=None, pad_token_id=0)
        want.append(g[0, len(p):].tolist())
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8)
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    # Batched with requests that ask for nothing, which keep their own (unpenalised) tokens.
    got = _tokens(llm, prompts + prompts, [sp, sp, plain, plain])
    assert got[:2] == want
    assert got[2:] != want and got[2:] == _tokens(llm, prompts, plain)


def test_greedy_presence_and_frequency_penalties_step_by_step(llm: LLM, hf: transformers.PreTrainedModel) -> None:
    prompt = _prompts(2, (9,))[0]
    pres, freq = 1.5, 0.9
    ids = list(prompt)
    for _ in range(14):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        out = ids[len(prompt):]
        for t in set(out):
            logits[t] -= pres + freq * out.count(t)
        ids.append(int(logits.argmax()))
    sp = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, presence_penalty=pres, frequency_penalty=freq)
    assert _tokens(llm, [prompt], sp)[0] == ids[len(prompt):]


def test_penalties_are_the_same_with_async_scheduling(model_dir: Path) -> None:
    """Penalised requests never overlap steps (their next logits depend on the token in flight):
    outputs equal the synchronous engine's, beside plain requests that do overlap."""
    prompts = _prompts(3, (5, 11, 7))
    sps = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, frequency_penalty=2.0),
           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0.9, seed=4, max_tokens=12, ignore_eos=True, repetition_penalty=1.4)]
    sync = _tokens(_llm(model_dir, async_scheduling=False), prompts, sps)
    assert _tokens(_llm(model_dir, async_scheduling=True), prompts, sps) == sync


# ====================================================================== bias and masks
def test_logit_bias_forces_a_token_and_allowed_ids_hold(llm: LLM) -> None:
    prompts = _prompts(4, (8, 3))
    forced = _tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                  logit_bias={77: 100.0}))
    assert forced == [[77] * 6] * 2
    allowed = [5, 40, 41, 300]
    sp = SamplingParams(temperature=1.5, seed=9, max_tokens=30, ignore_eos=True, allowed_token_ids=allowed)
    for out in _tokens(llm, prompts, sp):
        assert set(out) <= set(allowed) and len(set(out)) > 1
    # A bias of -100 keeps a token out of a greedy run that would otherwise produce it.
    plain = _tokens(llm, prompts[:1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    banned = _tokens(llm, prompts[:1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                      logit_bias={plain[0]: -100.0}))[0]
    assert banned[0] != plain[0] and plain[0] not in banned


def test_engine_checks_token_ids_against_the_vocabulary(llm: LLM) -> None:
    for kw, field in (({"logit_bias": {VOCAB: 1.0}}, "logit_bias"),
                      ({"allowed_token_ids": [VOCAB]}, "allowed_token_ids"),
                      ({"prompt_logprobs": VOCAB + 1}, "prompt_logprobs"), ({"bad_words": ["x"]}, "bad_words")):
        with pytest.raises(ValueError, match=rf"SamplingParams\.{field}:"):
            llm.generate([[5, 6]], SamplingParams(**kw), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_bad_words_are_never_produced(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> None:
    llm = _llm(tiny_chat_model(tmp_path_factory, default_model_dir), block_size=16)
    tok = llm.get_tokenizer()
    prompt = "The river runs past the old stone mill and"
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    ids = plain.outputs[0].token_ids
    # Words the greedy output contains: one of a single token, one of two.
    one = next(w for i in range(len(ids)) if [ids[i]] in _word_ids(tok, [w := tok.decode(ids[i:i + 1])]))
    two = next(w for i in range(len(ids) - 1) if ids[i:i + 2] in _word_ids(tok, [w := tok.decode(ids[i:i + 2])]))
    words = _word_ids(tok, [one, two])
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=[one, two])
    out = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids
    assert out != ids
    outs = [out]
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True, bad_words=[one, two])
    outs += [o.outputs[0].token_ids for o in llm.generate([prompt] * 3, sampled, use_tqdm=False)]
    for out in outs:
        for word in words:
            k = len(word)
            assert all(out[i:i + k] != word for i in range(len(out) - k + 1)), (word, out)


def _word_ids(tok: object, words: list[str]) -> list[list[int]]:
    from pagedattn.engine.logits_processors import bad_words_token_ids

    return bad_words_token_ids(words, lambda s: tok.encode(s, add_special_tokens=False), 10**9)  # type: ignore[attr-defined]


# ====================================================================== prompt logprobs
def _hf_prompt_logprobs(hf: transformers.PreTrainedModel, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("kw", [
    {"enable_prefix_caching": False},
    {"enable_prefix_caching": True},
    {"enable_prefix_caching": True, "max_num_batched_tokens": 7},  # chunked prefill
    {"enable_prefix_caching": True, "num_kv_blocks": 14, "preemption_mode": "recompute", "max_num_batched_tokens": 9},
], ids=["no-cache", "cache", "chunked", "preempted"])
def test_prompt_logprobs_are_hf_s(model_dir: Path, hf: transformers.PreTrainedModel, kw: dict) -> None:
    prompts = _prompts(5, (21, 30))
    shared = prompts[0][:16] + _prompts(6, (9,))[0]  # shares 4 cached blocks with the first prompt
    llm = _llm(model_dir, **kw)
    k = 3
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=k)
    first = llm.generate(prompts, sp, use_tqdm=False)
    # The same prompts again, and one sharing a prefix: the prefix cache holds their blocks.
    again = llm.generate([prompts[0], shared, prompts[1]], sp, use_tqdm=False)
    for out, p in [*zip(first, prompts), *zip(again, [prompts[0], shared, prompts[1]])]:
        ref = _hf_prompt_logprobs(hf, p)
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(p) and got[0] is None
        for i in range(1, len(p)):
            d = got[i]
            assert d is not None and p[i] in d
            assert d[p[i]] == pytest.approx(ref[i - 1, p[i]].item(), abs=1e-4)
            top = ref[i - 1].topk(k)
            want = dict(zip(top.indices.tolist(), top.values.tolist()))
            assert set(d) == set(want) | {p[i]}
            for t, v in want.items():
                assert d[t] == pytest.approx(v, abs=1e-4)
    # Outputs are unchanged by asking for prompt logprobs.
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in first] == _tokens(llm, prompts, plain)
    assert llm.get_metrics()["kv_blocks_used"] == 0
    llm.engine.check_integrity()


def test_prompt_logprobs_identical_with_and_without_prefix_caching(model_dir: Path) -> None:
    prompts = _prompts(7, (25, 25, 40))
    prompts[1] = prompts[0][:20] + prompts[1][20:]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    runs = []
    for kw in ({"enable_prefix_caching": False}, {"enable_prefix_caching": True},
               {"enable_prefix_caching": True, "max_num_batched_tokens": 6}):
        llm = _llm(model_dir, **kw)
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)  # fill the cache
        runs.append([o.prompt_logprobs for o in llm.generate(prompts, sp, use_tqdm=False)])
    assert runs[0] == runs[1]
    for a, b in zip(runs[0], runs[2]):  # other chunks, other GEMM shapes: the last bits may differ
        for x, y in zip(a[1:], b[1:]):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-5 for t in x)


def test_cached_tokens_count_prefix_cache_hits(llm: LLM) -> None:
    prompt = _prompts(8, (30,))[0]
    sp = SamplingParams(temperature=0, max_tokens=3)
    first = llm.generate(prompt, sp, use_tqdm=False)[0]
    second = llm.generate(prompt, sp, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 28  # whole blocks of 4, the last prompt token computed
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    # A request that wants prompt logprobs takes no hit (it needs every position's logits).
    lp = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0), use_tqdm=False)[0]
    assert lp.num_cached_tokens == 0 and lp.outputs[0].token_ids == first.outputs[0].token_ids
    assert all(d is not None and len(d) == 1 for d in lp.prompt_logprobs[1:])
