"""The engine on a CUDA GPU: Triton backend, CUDA-graph decode steps, HF parity in fp32."""

from __future__ import annotations

import pytest
import torch

from pagedattn import LLM, SamplingParams

from .engine_models import hf_greedy, make_model_dir
from .test_engine import _prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("family", ["llama3_untied_gqa", "mistral_window", "qwen3_qknorm", "qwen3_moe", "mixtral",
                                    "gemma2_softcap", "gemma3_local_rope", "phi3_longrope", "olmo2_post_norms",
                                    "granite_multipliers"])
@pytest.mark.parametrize("eager", [False, True])
def test_gpu_greedy_matches_hf(tmp_path, family, eager):
    path = make_model_dir(tmp_path, family)
    prompts = _prompts(1) + _prompts(2, lens=(3, 33, 64))
    expected = hf_greedy(path, prompts, 24)
    llm = LLM(str(path), device="cuda", dtype="float32", block_size=16, num_kv_blocks=128, enforce_eager=eager,
              max_num_seqs=16, swap_space_gib=0.01)
    assert llm.engine.backend.name == "triton"
    assert (llm.engine.runner.graphs is None) == eager
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert got == expected
    assert llm.get_metrics()["kv_blocks_used"] == 0


def test_gpu_preemption_and_prefix_cache_keep_outputs(tmp_path):
    path = make_model_dir(tmp_path, "llama3_untied_gqa")
    shared = _prompts(7, lens=(40,))[0]
    prompts = [shared + p for p in _prompts(8, lens=(3, 9, 1, 14))] + _prompts(9, lens=(11, 30))
    expected = hf_greedy(path, prompts, 24)
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for mode in ("swap", "recompute"):
        llm = LLM(str(path), device="cuda", dtype="float32", block_size=4, num_kv_blocks=24, preemption_mode=mode,
                  swap_space_gib=0.01, max_num_batched_tokens=16)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        assert got == expected, mode
        m = llm.get_metrics()
        assert m["num_preemptions"] > 0 and m["kv_blocks_used"] == 0
        llm.engine.check_integrity()


def test_gpu_memory_utilization_too_low_is_a_clear_error(tmp_path):
    path = make_model_dir(tmp_path, "llama_mqa_tied")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(str(path), device="cuda", gpu_memory_utilization=0.001)
