"""The embedded default model (SmolLM2-135M-Instruct, GGUF) end to end, against HF transformers."""

from __future__ import annotations

import pytest
import torch

from pagedattn import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]
MAX_NEW = 32


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", num_kv_blocks=512, swap_space_gib=0.1)


def test_greedy_tokens_match_hf(llm, default_model_hf):
    hf_model = default_model_hf  # the session's oracle, shared with the model tests
    tok = llm.get_tokenizer()
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([tok.encode(prompt)])
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist(), prompt
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    assert outs[0].outputs[0].text.startswith(" Paris.")
    assert llm.get_metrics()["kv_blocks_used"] == 0


def test_stop_strings_and_streaming_text(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=40, stop=["."], ignore_eos=True)
    out = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "."
    assert out.text == " Paris"
    # Streaming produces the same text, growing monotonically.
    last = ""
    for o in llm.stream([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)):
        t = o.outputs[0].text
        assert t.startswith(last)
        last = t
    full = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    assert last == full


def test_chat_template(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert "Paris" in out.outputs[0].text
