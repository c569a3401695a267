"""Engine tests on tiny random models of every family: HF parity and scheduling invariance.

HF transformers' greedy ``generate`` is the oracle.  Everything the engine does to save memory
or time (prefix caching, chunked prefill, preemption by swap or recompute, sliding-window
block release, forked samples) must leave greedy outputs token-for-token unchanged.
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedattn import LLM, SamplingParams
from pagedattn.engine.output_processor import request_output
from pagedattn.engine.outputs import CompletionOutput, RequestOutput
from pagedattn.engine.sequence import Request, Sequence

from .engine_models import FAMILIES, hf_greedy, make_model_dir

MAX_NEW = 24


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: make_model_dir(root, f) for f in FAMILIES}


def _prompts(seed: int, lens=(5, 16, 17, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in lens]


def _greedy(llm: LLM, prompts, max_new=MAX_NEW) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def _llm(path, **kw) -> LLM:
    kw.setdefault("device", "cpu")
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("swap_space_gib", 0.01)
    return LLM(str(path), **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_hf(model_dirs, family):
    prompts = _prompts(1)
    expected = hf_greedy(model_dirs[family], prompts, MAX_NEW)
    llm = _llm(model_dirs[family])
    assert _greedy(llm, prompts) == expected
    m = llm.get_metrics()
    assert m["kv_blocks_used"] == 0
    llm.engine.check_integrity()
    if family == "mistral_window":  # window 12, 64-token sequences: blocks must have been released
        assert m["num_window_released_blocks"] > 0
    if family.startswith("gemma"):  # a global layer needs every block: none may be released
        assert m["num_window_released_blocks"] == 0


@pytest.mark.parametrize("family", ["llama3_untied_gqa", "mistral_window",
                                    pytest.param("gemma2_softcap", marks=pytest.mark.slow),
                                    pytest.param("gemma3_local_rope", marks=pytest.mark.slow)])
def test_memory_and_scheduling_features_keep_outputs(model_dirs, family):
    path = model_dirs[family]
    shared = _prompts(7, lens=(37,))[0]
    prompts = [shared + p for p in _prompts(8, lens=(3, 9, 1, 14))] + _prompts(9, lens=(11, 30))
    baseline = hf_greedy(path, prompts, MAX_NEW)

    # Prefix caching on: once the first prompt is computed, the others hit its blocks.
    llm = _llm(path, enable_prefix_caching=True)
    assert _greedy(llm, prompts[:1]) + _greedy(llm, prompts[1:]) == baseline
    m = llm.get_metrics()
    assert m["prefix_cache_hit_rate"] > 0 and m["prefix_cache_hit_tokens"] >= 3 * 36
    # A request whose prompt is fully cached still computes its last token.
    assert _greedy(llm, [prompts[0]]) == [baseline[0]]
    assert m["kv_blocks_used"] == 0 and llm.get_metrics()["kv_blocks_used"] == 0

    # All at once: requests whose next prompt block another request of the same step is
    # computing wait a step and hit the cache, so the shared prefix is computed once.
    llm = _llm(path, enable_prefix_caching=True)
    assert _greedy(llm, prompts) == baseline
    assert llm.get_metrics()["prefix_cache_hit_tokens"] >= 3 * 36

    # Prefix caching off.
    llm = _llm(path, enable_prefix_caching=False)
    assert _greedy(llm, prompts) == baseline
    assert llm.get_metrics()["prefix_cache_hit_tokens"] == 0

    # Chunked prefill at several chunk sizes.
    for chunk in (5, 8, 13):
        llm = _llm(path, max_num_batched_tokens=chunk)
        assert _greedy(llm, prompts) == baseline, f"chunk {chunk}"

    # A pool so small that requests must be preempted, by swap and by recompute.  (With
    # prefix caching on, requests sharing the prefix are admitted a step apart and share
    # blocks, so the swap case needs the tighter pool.)
    for mode, blocks in (("swap", 19), ("recompute", 24)):
        llm = _llm(path, num_kv_blocks=blocks, preemption_mode=mode, enable_prefix_caching=(mode == "swap"))
        assert _greedy(llm, prompts) == baseline, mode
        m = llm.get_metrics()
        assert m["num_preemptions"] > 0, mode
        if mode == "swap":
            assert m["num_swapped_out_blocks"] > 0 and m["num_swap_preemptions"] > 0
        else:
            assert m["num_recompute_preemptions"] > 0
        assert m["kv_blocks_used"] == 0
        llm.engine.check_integrity()


@pytest.mark.parametrize("family", ["gemma2_softcap", "gemma3_local_rope"])
def test_mixed_window_families_keep_outputs_with_prefix_cache_chunks_and_preemption(model_dirs, family):
    """Sliding and global layers in one model (no block is ever released: the global layer needs
    them all), soft-capping: prefix-cache hits with chunked prefill, then a pool so small that
    requests are preempted by swap and by recompute.  Greedy tokens stay HF's.  (The full
    matrix of the test above runs these families too, marked slow.)"""
    path = model_dirs[family]
    shared = _prompts(7, lens=(21,))[0]
    prompts = [shared + p for p in _prompts(8, lens=(3, 9, 14))] + _prompts(9, lens=(11,))
    baseline = hf_greedy(path, prompts, 16)

    llm = _llm(path, enable_prefix_caching=True, max_num_batched_tokens=7)
    assert _greedy(llm, prompts, 16) == baseline
    m = llm.get_metrics()
    assert m["prefix_cache_hit_tokens"] >= 2 * 20 and m["num_window_released_blocks"] == 0
    for mode, blocks in (("swap", 14), ("recompute", 14)):
        llm = _llm(path, num_kv_blocks=blocks, preemption_mode=mode, enable_prefix_caching=(mode == "swap"))
        assert _greedy(llm, prompts, 16) == baseline, mode
        m = llm.get_metrics()
        assert m[f"num_{mode}_preemptions"] > 0, mode
        assert m["kv_blocks_used"] == 0
        llm.engine.check_integrity()


@pytest.mark.parametrize("family", ["qwen2_bias_tied", "gemma2_softcap"])
def test_n_samples_fork_and_copy_on_write(model_dirs, family):
    llm = _llm(model_dirs[family])
    prompt = _prompts(3, lens=(10,))  # 10 tokens, block 4: the last prompt block is partial
    sp = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=12, ignore_eos=True)
    out = llm.generate(prompt, sp, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    m = llm.get_metrics()
    assert m["num_cow_copies"] >= 2  # two of three siblings wrote into the shared partial block
    assert m["kv_blocks_used"] == 0
    # Seeded sampling is reproducible, also in a different batch and engine.
    llm2 = _llm(model_dirs[family], block_size=8)
    other = SamplingParams(temperature=1.0, max_tokens=5)
    again = llm2.generate(_prompts(4, lens=(7,)) + prompt, [other, sp], use_tqdm=False)[1]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    # Different seeds, different samples.
    diff = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=124, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0]
    assert [c.token_ids for c in diff.outputs] != [c.token_ids for c in out.outputs]


def test_sampling_filters(model_dirs):
    llm = _llm(model_dirs["llama_mqa_tied"])
    prompt = _prompts(5, lens=(6,))
    # top_k=1 and a tiny top_p are greedy in disguise.
    greedy = _greedy(llm, prompt, 10)
    for sp in (SamplingParams(temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True, seed=1),
               SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, ignore_eos=True, seed=2),
               SamplingParams(temperature=1.0, min_p=1.0, max_tokens=10, ignore_eos=True, seed=3)):
        assert [o.outputs[0].token_ids for o in llm.generate(prompt, sp, use_tqdm=False)] == greedy
    # Logprobs: the sampled token's logprob is present and top-k are sorted, all <= 0.
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and all(v <= 0 for v in lp.values())
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token


def test_stop_token_ids_and_max_tokens(model_dirs):
    llm = _llm(model_dirs["llama3_untied_gqa"])
    prompt = _prompts(6, lens=(8,))
    full = _greedy(llm, prompt, 16)[0]
    stop_tok = full[5]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok],
                                              ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full[: full.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3


def test_bad_input_is_rejected_before_work(model_dirs, tmp_path):
    llm = _llm(model_dirs["llama_mqa_tied"], num_kv_blocks=32)
    good = _prompts(2, lens=(6,))[0]
    cases = [
        ([], SamplingParams(), "prompt"),
        ("", SamplingParams(), "prompt"),
        ([5] * 600, SamplingParams(), "context"),
        ([999], SamplingParams(), "vocabulary"),
        (good, SamplingParams(max_tokens=400, n=2), "num_kv_blocks"),
    ]
    for prompt, sp, needle in cases:
        with pytest.raises(ValueError, match=needle):
            llm.generate([good, prompt], sp, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    for kwargs, field in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
                          (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=r"does not exist|not found|No such"):
        LLM(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ValueError, match="block_size"):
        _llm(model_dirs["llama_mqa_tied"], block_size=3)
    for bad in (0, -16, 1.5, True):
        with pytest.raises(ValueError, match="cuda_graph_max_batch"):
            _llm(model_dirs["llama_mqa_tied"], cuda_graph_max_batch=bad)
    # The engine is unharmed: a good request still runs.
    assert len(_greedy(llm, [good], 4)[0]) == 4
    assert llm.get_metrics()["kv_blocks_used"] == 0


def test_stream_and_abort(model_dirs):
    llm = _llm(model_dirs["qwen3_qknorm"])
    prompts = _prompts(11, lens=(5, 9))
    full = _greedy(llm, prompts, 8)
    seen: dict[str, list[int]] = {}
    for out in llm.stream(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)):
        prev = seen.get(out.request_id, [])
        assert out.outputs[0].token_ids[: len(prev)] == prev  # cumulative
        seen[out.request_id] = out.outputs[0].token_ids
    assert sorted(seen.values()) == sorted(full)
    # Closing a stream early aborts what is still running and frees its blocks.
    it = llm.stream(prompts, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    assert not llm.engine.has_unfinished_requests()
    assert llm.get_metrics()["kv_blocks_used"] == 0
    llm.engine.check_integrity()


def test_start_up_objects_leave_the_collectors_generations(model_dirs):
    """After start-up the engine's long-lived objects sit in the collector's permanent
    generation (full collections would otherwise walk them every few seconds while serving)
    until shutdown, and a dropped engine is still freed: reference counting frees it."""
    before = gc.get_freeze_count()
    llm = _llm(model_dirs["llama3_untied_gqa"])
    assert gc.get_freeze_count() > before
    model = llm.engine.model
    assert not any(o is model for o in gc.get_objects())
    assert _greedy(llm, _prompts(3, lens=(6,)), max_new=4)
    gone = weakref.ref(model.lm_head.weight)
    llm.shutdown()  # gives the frozen objects back to the collector
    assert gc.get_freeze_count() == 0
    del llm, model
    assert gone() is None


def test_async_scheduling_keeps_outputs(model_dirs):
    """Overlapped decode (step k+1 launched from step k's on-device samples) changes nothing:
    not greedy tokens, not seeded samples, not preemption, and aborts mid-flight free all."""
    path = model_dirs["llama3_untied_gqa"]
    shared = _prompts(7, lens=(37,))[0]
    prompts = [shared + p for p in _prompts(8, lens=(3, 9, 1, 14))] + _prompts(9, lens=(11, 30))
    baseline = _greedy(_llm(path, async_scheduling=False), prompts)
    for kw in (dict(), dict(num_kv_blocks=24), dict(num_kv_blocks=24, preemption_mode="recompute"),
               dict(max_num_batched_tokens=5)):
        llm = _llm(path, async_scheduling=True, **kw)
        assert _greedy(llm, prompts) == baseline, kw
        assert llm.get_metrics()["kv_blocks_used"] == 0
        assert not llm.engine.has_unfinished_requests(), kw  # the step launched ahead is processed too
        llm.engine.check_integrity()
    # Requests stopping at different steps leave the overlapped batch one by one.
    ragged = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 24, 7, 1, 16, 11)]
    got = [o.outputs[0].token_ids for o in _llm(path, async_scheduling=True).generate(prompts, ragged,
                                                                                       use_tqdm=False)]
    assert got == [b[:sp.max_tokens] for b, sp in zip(baseline, ragged)]
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    sync = _llm(path, async_scheduling=False).generate(prompts[:2], sp, use_tqdm=False)
    llm = _llm(path, async_scheduling=True)
    over = llm.generate(prompts[:2], sp, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in over] == [[c.token_ids for c in o.outputs] for o in sync]
    assert llm.get_metrics()["num_cow_copies"] >= 2
    it = llm.stream(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(5):
        next(it)
    it.close()  # aborts with a step in flight
    assert llm.get_metrics()["kv_blocks_used"] == 0
    assert _greedy(llm, prompts) == baseline
    llm.engine.check_integrity()


def test_overlapped_steps_admit_new_requests_and_honour_min_tokens(model_dirs, monkeypatch):
    """The step after one left in flight is an ordinary schedule: requests arriving meanwhile are
    prefilled in the same step as the decodes whose last token is still on the device, and
    min_tokens counts that pending token.  Tokens equal a synchronous run's."""
    path = model_dirs["llama3_untied_gqa"]
    prompts = _prompts(12, lens=(7, 13, 4, 21, 9))
    eos = 3
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=9, min_tokens=6, stop_token_ids=[eos]),
              SamplingParams(temperature=0.0, max_tokens=1),
              SamplingParams(temperature=1.0, seed=4, top_k=5, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]

    def run(async_scheduling: bool) -> tuple[dict[str, list[int]], int]:
        engine = _llm(path, async_scheduling=async_scheduling).engine
        mixed = 0
        real = engine.executor.execute

        def spy(step, prev=None):
            nonlocal mixed
            mixed += bool(step.from_prev) and max(step.query_lens) > 1
            return real(step, prev)

        monkeypatch.setattr(engine.executor, "execute", spy)
        done: dict[str, list[int]] = {}
        pending = list(zip(prompts, params))
        while pending or engine.has_unfinished_requests():
            if pending:  # one arrival per step
                prompt, sp = pending.pop(0)
                engine.add_request(prompt, sp, request_id=str(len(prompts) - len(pending)))
            for out in engine.step():
                engine.check_integrity()
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        assert engine.get_metrics()["kv_blocks_used"] == 0
        return done, mixed

    sync, _ = run(False)
    overlapped, mixed = run(True)
    assert overlapped == sync
    assert mixed > 0, "no step mixed a prefill with pending decode tokens"
    assert len(sync["2"]) >= 6 and eos not in sync["2"][:5]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_every_computed_block_of_the_output_reaches_the_prefix_cache(model_dirs, async_scheduling):
    """A finished sequence's full blocks of computed tokens (all but its last token) are in the
    prefix cache, whichever token filled the last of them: with overlapped steps that token was
    still pending when the step computing it launched, and its block waits for it."""
    llm = _llm(model_dirs["llama3_untied_gqa"], async_scheduling=async_scheduling, enable_prefix_caching=True)
    bs = llm.engine.config.block_size
    rng = random.Random(7)
    for out_len in range(1, 2 * bs + 2):
        prompt = [rng.randrange(3, 320) for _ in range(rng.randrange(2, 3 * bs))]
        sp = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        (first,) = llm.generate([prompt], sp, use_tqdm=False)
        seen = prompt + list(first.outputs[0].token_ids)
        (again,) = llm.generate([seen], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        assert again.num_cached_tokens == (len(seen) - 1) // bs * bs, (len(prompt), out_len)
        llm.engine.check_integrity()


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("preemption", [None, "swap", "recompute"])
def test_after_every_step_each_computed_full_block_is_hashed(model_dirs, async_scheduling, preemption):
    """Commits are skipped where they cannot publish anything (a row launched with a pending
    token, a token applied before the device computed it): after every step each held sequence
    has hashed exactly its full blocks of computed, known tokens, in either loop, with n = 2
    samples, max_tokens from 1, an abort mid-flight, and a pool of 14 blocks that preempts."""
    pool = {} if preemption is None else {"num_kv_blocks": 14, "preemption_mode": preemption}
    llm = _llm(model_dirs["llama3_untied_gqa"], async_scheduling=async_scheduling, enable_prefix_caching=True,
               **pool)
    engine, bm = llm.engine, llm.engine.block_manager
    bs = engine.config.block_size
    rng = random.Random(11)
    ids = []
    for i in range(6):
        sp = SamplingParams(n=1 + i % 2, temperature=0.0 if i % 3 else 0.9, seed=i, ignore_eos=True,
                            max_tokens=rng.randrange(1, 3 * bs))
        ids.append(engine.add_request([rng.randrange(3, 320) for _ in range(rng.randrange(1, 4 * bs))], sp))
    checked = steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps == 3:
            engine.abort_request(ids[2])
        engine.check_integrity()
        for req in engine.scheduler.running:
            for seq in req.seqs:
                if bm.has_seq(seq.seq_id) and not bm.is_swapped(seq.seq_id):
                    want = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
                    assert bm.num_hashed_blocks(seq.seq_id) == want, (seq.seq_id, seq.num_computed_tokens)
                    checked += 1
    assert checked > 20 and engine.get_metrics()["kv_blocks_used"] == 0
    assert (engine.get_metrics()["num_preemptions"] > 0) == (preemption is not None)


@pytest.mark.parametrize(("mode", "blocks"), [("swap", 10), ("recompute", 9)])
def test_request_preempting_itself_after_scheduling_a_sibling_drops_it_from_the_step(model_dirs, mode, blocks):
    """The newest request's first sample gets its slot, the second does not: the request
    preempts itself, and its first sample must leave the step with it."""
    path = model_dirs["llama3_untied_gqa"]
    prompts = [_prompts(10, lens=(9,))[0], _prompts(11, lens=(6,))[0]]
    params = [SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
              SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=10, ignore_eos=True)]
    expected = [[c.token_ids for c in o.outputs] for o in _llm(path).generate(prompts, params, use_tqdm=False)]
    llm = _llm(path, num_kv_blocks=blocks, preemption_mode=mode)
    got = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert llm.get_metrics()["num_preemptions"] > 0
    llm.engine.check_integrity()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_steps_take_tokens_from_the_runner_mixed_steps_sample_logits(model_dirs, monkeypatch,
                                                                            async_scheduling):
    """A step whose sampling rows are all greedy without log-probabilities gets its tokens
    from the runner (the argmax of the logits); a step with any other row samples the logits.
    Either way the greedy requests' tokens are the same."""
    import torch

    llm = _llm(model_dirs["llama3_untied_gqa"], async_scheduling=async_scheduling)
    prompts = _prompts(4)
    want = _greedy(llm, prompts)
    seen: list[tuple[bool, torch.dtype, int]] = []
    real = llm.engine.executor.execute

    def spy(step, *args):
        out = real(step, *args)
        if step.sample_rows:
            assert (out.tokens is not None) == step.greedy and (out.logits is None) == step.greedy
            seen.append((step.greedy, out.rows.dtype, out.rows.dim()))
        return out

    monkeypatch.setattr(llm.engine.executor, "execute", spy)
    assert _greedy(llm, prompts) == want
    assert seen and all(g and dtype == torch.int64 and dim == 1 for g, dtype, dim in seen)
    seen.clear()
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    mixed = [greedy, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0.8, seed=3, max_tokens=MAX_NEW, ignore_eos=True), greedy]
    outs = llm.generate(prompts, mixed, use_tqdm=False)
    assert [outs[i].outputs[0].token_ids for i in (0, 1, 3)] == [want[i] for i in (0, 1, 3)]
    assert all(2 <= len(lp) <= 3 for lp in outs[1].outputs[0].logprobs)  # the top 2 and the sampled token
    assert seen and not any(g for g, _, _ in seen)
    assert all(dtype.is_floating_point and dim == 2 for _, dtype, dim in seen)


@pytest.mark.parametrize("max_batch", [1, 3, 8, 17, 512, 513, 600, 1024, 2000])
def test_cuda_graph_buckets_cover_every_batch_with_bounded_padding(max_batch):
    from pagedattn.runtime.cuda_graphs import batch_buckets

    buckets = batch_buckets(max_batch)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch and buckets[0] == 1
    for n in range(1, max_batch + 1):
        b = next(x for x in buckets if x >= n)
        # at most 15 padded rows up to 512, under 12.5% of the batch above it
        assert b - n <= 15 if b <= 512 else (b - n) / n < 0.125



@pytest.mark.parametrize("family", ["phi3_longrope", "olmo2_post_norms", "granite_multipliers"])
def test_memory_and_sampling_features_keep_outputs_of_the_newer_families(model_dirs, family):
    """Phi-3 (LongRoPE), OLMo 2 and Granite under prefix caching, preemption by swap and by
    recompute, and seeded n > 1 sampling: greedy tokens equal transformers'.  The Phi-3 prompts
    share a prefix across LongRoPE's original length (20): the 12-token prompt is computed with
    the short table and again with the long one once it outgrows 20 tokens, the 23-token prompt
    with the long one, so the two never share cached blocks."""
    path = model_dirs[family]
    shared = _prompts(21, lens=(9,))[0]
    prompts = [shared + p for p in _prompts(22, lens=(3, 14))] + _prompts(23, lens=(6, 30))
    baseline = hf_greedy(path, prompts, 10)

    llm = _llm(path, enable_prefix_caching=True)
    assert _greedy(llm, prompts[:1], 10) + _greedy(llm, prompts[1:], 10) == baseline
    assert _greedy(llm, prompts, 10) == baseline  # all cached now (the short ones as they were computed)
    assert llm.get_metrics()["prefix_cache_hit_tokens"] >= 3 * 8
    if family == "phi3_longrope":  # overlapped decode steps stop before a sequence outgrows 20 tokens
        assert _greedy(_llm(path, async_scheduling=True), prompts, 16) == _greedy(_llm(path), prompts, 16)

    for mode, blocks in (("swap", 11), ("recompute", 11)):
        llm = _llm(path, num_kv_blocks=blocks, preemption_mode=mode, enable_prefix_caching=(mode == "swap"))
        assert _greedy(llm, prompts, 10) == baseline, mode
        m = llm.get_metrics()
        assert m["num_preemptions"] > 0 and m[f"num_{mode}_preemptions"] > 0, mode
        assert m["kv_blocks_used"] == 0
        llm.engine.check_integrity()

    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = [c.token_ids for c in _llm(path).generate(prompts[:1], sp, use_tqdm=False)[0].outputs]
    again = _llm(path, block_size=8).generate(prompts[2:3] + prompts[:1], [SamplingParams(max_tokens=3), sp],
                                              use_tqdm=False)[1]
    assert [c.token_ids for c in again.outputs] == out and len({tuple(t) for t in out}) > 1


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_request_output_reports_every_field_of_the_request(data: st.DataObject) -> None:
    """``request_output`` builds its records positionally (it runs for every stream at every
    step); each field must still land where its name says."""
    n = data.draw(st.integers(1, 3))
    want_lp = data.draw(st.booleans())
    prompt = data.draw(st.lists(st.integers(0, 1000), min_size=1, max_size=6))
    req = Request(data.draw(st.text(min_size=1, max_size=5)), data.draw(st.none() | st.text(max_size=5)), prompt,
                  SamplingParams(n=n, logprobs=1 if want_lp else None))
    for i in range(1, n):
        req.seqs.append(Sequence(f"s{i}", i, list(prompt), len(prompt)))
    for s in req.seqs:
        s.token_ids += data.draw(st.lists(st.integers(0, 1000), max_size=4))
        s.text = data.draw(st.text(max_size=6))
        s.finish_reason = data.draw(st.sampled_from([None, "stop", "length"]))
        s.stop_reason = data.draw(st.none() | st.integers(0, 9) | st.text(max_size=3))
        s.logprobs = [{t: -float(t)} for t in s.output_token_ids]
        s.cumulative_logprob = data.draw(st.floats(-10, 0))
    req.first_token_time = data.draw(st.none() | st.floats(0, 10))
    req.num_cached_tokens = data.draw(st.none() | st.integers(0, 5))
    req.error = data.draw(st.none() | st.text(max_size=5))
    req.prompt_logprobs = data.draw(st.none() | st.just([None, {1: -0.5}]))
    out = request_output(req)
    expected_outs = [
        CompletionOutput(index=s.index, text=s.text, token_ids=s.output_token_ids,
                         cumulative_logprob=s.cumulative_logprob if want_lp else None,
                         logprobs=list(s.logprobs) if want_lp else None,
                         finish_reason=s.finish_reason, stop_reason=s.stop_reason)
        for s in req.seqs if s.num_output_tokens > 0 or s.finished]
    metrics = {"arrival_time": req.arrival_time}
    if req.first_token_time is not None:
        metrics["first_token_time"] = req.first_token_time
    assert out == RequestOutput(
        request_id=req.request_id, prompt=req.prompt, prompt_token_ids=prompt, outputs=expected_outs,
        finished=req.finished, num_cached_tokens=req.num_cached_tokens or 0, metrics=metrics, error=req.error,
        prompt_logprobs=req.prompt_logprobs)
    for o, s in zip(out.outputs, [s for s in req.seqs if s.num_output_tokens > 0 or s.finished]):
        assert o.token_ids is not s.token_ids and o.token_ids == s.output_token_ids  # a copy: the engine appends
