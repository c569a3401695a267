"""Mixture-of-experts families (Qwen3-MoE, Mixtral) against HF transformers, on the CPU path.

The router and the sparse block against transformers' modules; config parsing (sparse and
dense layers, both generations' key names, defaults); checkpoints in the Hub's per-expert
layout and in transformers' fused layout; tensor-parallel shards of the experts; and the
engine: greedy tokens equal HF's with prefix caching, swap and recompute preemption, and
seeded parallel samples whose every token's log-probability is HF's.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from pagedattn import LLM, SamplingParams
from pagedattn.models import moe_ops as mo
from pagedattn.models.config import ModelArchConfig
from pagedattn.models.layers import FusedMoE, MoEArchConfig, Shard, SparseMoEBlock, per_expert_weights
from pagedattn.models.layers.moe import MIXTRAL_EXPERT_NAMES
from pagedattn.models.loader import iter_safetensors, load_model

from .engine_models import hf_greedy, make_model_dir

HIDDEN, INTER, EXPERTS = 32, 24, 6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hf_block(family: str, top_k: int, norm: bool, seed: int) -> torch.nn.Module:
    """transformers' sparse block with random weights (router logits spread wide)."""
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS,
                                          num_experts_per_tok=top_k, norm_topk_prob=norm)
        block: torch.nn.Module = Qwen3MoeSparseMoeBlock(cfg)
    else:
        cfg = transformers.MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS,
                                         num_experts_per_tok=top_k)
        block = MixtralSparseMoeBlock(cfg)
    g = _gen(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block.eval()


def _ours(family: str, hf: torch.nn.Module, top_k: int, norm: bool, shard: Shard | None = None) -> SparseMoEBlock:
    names = MIXTRAL_EXPERT_NAMES if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    with torch.device("cpu"):
        ours = SparseMoEBlock(HIDDEN, EXPERTS, top_k, INTER, shard or Shard(), renormalize=norm or family == "mixtral",
                              fp32_weights=family == "mixtral", expert_names=names)
    # transformers' in-memory names are its fused layout: the same split the loader applies.
    for name, t in per_expert_weights(hf.state_dict().items(), names):
        if name == "gate.weight":
            ours.gate.weight_loader(ours.gate.weight, t)
            continue
        _, e, part, _ = name.split(".")
        sid = (int(e), names.index(part))
        param = ours.experts.w2_weight if sid[1] == 2 else ours.experts.w13_weight
        ours.experts.weight_loader(param, t, sid)
    return ours


@pytest.mark.parametrize(("family", "top_k", "norm"), [("qwen3_moe", 2, False), ("qwen3_moe", 3, True),
                                                       ("mixtral", 2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_matches_transformers(family: str, top_k: int, norm: bool, dtype: torch.dtype) -> None:
    """The same experts chosen with the same weights (the router is transformers' arithmetic),
    and the block's output equal to transformers' on the CPU."""
    hf = _hf_block(family, top_k, norm, seed=top_k).to(dtype)
    ours = _ours(family, hf, top_k, norm).to(dtype)
    x = (torch.randn(1, 11, HIDDEN, generator=_gen(5)) * 2).to(dtype)
    with torch.no_grad():
        _, hf_w, hf_ids = hf.gate(x[0])
        ref = hf(x)[0]
    w, ids = mo.route(ours.gate(x[0]), top_k, ours.renormalize, ours.fp32_weights)
    assert torch.equal(ids, hf_ids) and w.dtype == hf_w.dtype and torch.equal(w, hf_w)
    assert torch.equal(ours(x[0]), ref)


def test_dense_reference_equals_the_expert_loop() -> None:
    g = _gen(1)
    x = torch.randn(9, HIDDEN, generator=g)
    w13, w2 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g), torch.randn(EXPERTS, HIDDEN, INTER, generator=g)
    w, ids = mo.route(torch.randn(9, EXPERTS, generator=g), 2, False, False)
    torch.testing.assert_close(mo.fused_moe_dense_ref(x, w13, w2, w, ids), mo.fused_moe_ref(x, w13, w2, w, ids))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_tensor_parallel_expert_shards_sum_to_the_block(family: str) -> None:
    """Rank r holds intermediate features [r I/tp, (r+1) I/tp) of every expert; the ranks'
    partial outputs sum to the whole block's."""
    hf = _hf_block(family, 2, True, seed=7)
    full = _ours(family, hf, 2, True)
    x = torch.randn(6, HIDDEN, generator=_gen(8))
    parts = [_ours(family, hf, 2, True, Shard(r, 2)) for r in range(2)]
    assert parts[0].experts.w13_weight.shape == (EXPERTS, INTER, HIDDEN)
    torch.testing.assert_close(sum(p(x) for p in parts), full(x))
    with pytest.raises(ValueError, match="not divisible by tp_size"):
        FusedMoE(EXPERTS, HIDDEN, INTER, Shard(0, 5))


def test_expert_weight_loader_names_bad_input() -> None:
    moe = FusedMoE(EXPERTS, HIDDEN, INTER, Shard())
    with pytest.raises(ValueError, match="unexpected shard_id"):
        moe.weight_loader(moe.w13_weight, torch.randn(INTER, HIDDEN), (EXPERTS, 0))
    with pytest.raises(ValueError, match="unexpected shard_id"):
        moe.weight_loader(moe.w13_weight, torch.randn(INTER, HIDDEN), None)
    with pytest.raises(ValueError, match="shape mismatch"):
        moe.weight_loader(moe.w2_weight, torch.randn(INTER, HIDDEN), (0, 2))


# ---------------------------------------------------------------------- config
QWEN3_MOE_HUB: dict[str, Any] = {  # Qwen3-30B-A3B's config.json (transformers 4.x keys)
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": None, "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "mlp_only_layers": [], "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 48, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "attention_bias": False, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
}


def test_config_qwen3_moe_hub_and_sparse_layers() -> None:
    cfg = ModelArchConfig.from_hf_config(QWEN3_MOE_HUB)
    assert isinstance(cfg, MoEArchConfig) and cfg.architecture == "Qwen3MoeForCausalLM"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (128, 8, 768)
    assert cfg.norm_topk_prob and not cfg.router_fp32_weights and cfg.qk_norm and cfg.head_dim == 128
    assert cfg.sparse_layers == [True] * 48 and cfg.layer_sliding_windows == [None] * 48
    small = {**QWEN3_MOE_HUB, "num_hidden_layers": 6, "head_dim": None, "decoder_sparse_step": 2,
             "mlp_only_layers": [3], "num_experts": None, "num_local_experts": 16, "use_sliding_window": True,
             "sliding_window": 64}
    cfg = ModelArchConfig.from_hf_config(small)
    assert cfg.sparse_layers == [False, True, False, False, False, True]
    assert cfg.num_experts == 16 and cfg.head_dim == 2048 // 32  # Qwen3MoeConfig has no head_dim default
    assert cfg.layer_sliding_windows == [64] * 6
    assert ModelArchConfig.from_hf_config({**small, "num_local_experts": 0}).sparse_layers == [False] * 6


def test_config_mixtral_defaults() -> None:
    d = {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
         "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    cfg = ModelArchConfig.from_hf_config(d)
    assert isinstance(cfg, MoEArchConfig)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 14336)
    assert cfg.norm_topk_prob and cfg.router_fp32_weights and cfg.sparse_layers == [True] * 32
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 1e6 and cfg.uniform_sliding_window is None
    cfg = ModelArchConfig.from_hf_config({**d, "rope_theta": 5e5, "rms_norm_eps": 1e-6, "sliding_window": 4096})
    assert cfg.rope_theta == 5e5 and cfg.rms_norm_eps == 1e-6 and cfg.uniform_sliding_window == 4096


@pytest.mark.parametrize(("patch", "match"), [
    ({"num_experts_per_tok": 200}, r"num_experts_per_tok \(200\) exceeds num_experts \(128\)"),
    ({"moe_intermediate_size": 0}, r"moe_intermediate_size must be a positive int"),
    ({"decoder_sparse_step": 0}, r"decoder_sparse_step must be a positive int"),
])
def test_config_errors_name_the_problem(patch: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelArchConfig.from_hf_config({**QWEN3_MOE_HUB, **patch})
    with pytest.raises(ValueError, match="sparse_layers has 1 entries"):
        dataclasses.replace(ModelArchConfig.from_hf_config(QWEN3_MOE_HUB), sparse_layers=[True])


# ---------------------------------------------------------------------- checkpoints and the engine
MAX_NEW = 16


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-models")
    return {f: make_model_dir(root, f, seed=1) for f in ("qwen3_moe", "mixtral")}


def _logits(path: Path, ids: list[int]) -> torch.Tensor:
    from pagedattn.models.testing import PagedHarness

    model, _ = load_model(path, torch.float32, "cpu")
    return PagedHarness(model, num_blocks=32, block_size=4).step([("s", ids)])[0]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_checkpoint_in_transformers_fused_layout_loads_the_same_model(model_dirs: dict[str, Path], family: str,
                                                                      tmp_path: Path) -> None:
    """transformers keeps the experts fused in memory (``mlp.experts.gate_up_proj``); a
    checkpoint written in that layout loads into the same model as the Hub's per-expert one."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[family], dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((model_dirs[family] / "config.json").read_text())
    ids = [5, 17, 99, 3, 250, 8, 41]
    assert torch.equal(_logits(tmp_path, ids), _logits(model_dirs[family], ids))
    hub = dict(iter_safetensors(sorted(model_dirs[family].glob("*.safetensors"))))
    expert = "block_sparse_moe.experts.3.w2" if family == "mixtral" else "mlp.experts.3.down_proj"
    missing = {k: v for k, v in hub.items() if f"layers.1.{expert}" not in k}
    model, _ = load_model(model_dirs[family], torch.float32, "cpu")
    with pytest.raises(ValueError, match=re.escape(f"missing weights: model.layers.1.{expert}.weight")):
        model.load_weights(missing.items())


def test_dummy_weights_fill_every_expert(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((model_dirs["qwen3_moe"] / "config.json").read_text())
    full, _ = load_model(tmp_path, torch.float32, "cpu", load_format="dummy", seed=2)
    half, _ = load_model(tmp_path, torch.float32, "cpu", load_format="dummy", seed=2, tp_rank=1, tp_size=2)
    w2 = "model.layers.1.mlp.experts.w2_weight"
    full_w2, half_w2 = dict(full.named_parameters())[w2], dict(half.named_parameters())[w2]
    assert full_w2.std() > 0.01 and torch.equal(half_w2, full_w2[:, :, full_w2.shape[2] // 2:])


def _prompts(seed: int, lens: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in lens]


def _llm(path: Path, **kw: Any) -> LLM:
    return LLM(str(path), **{"device": "cpu", "block_size": 4, "num_kv_blocks": 256, "swap_space_gib": 0.01, **kw})


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_prefix_cache_and_preemption_keep_hf_greedy_tokens(model_dirs: dict[str, Path], family: str) -> None:
    """HF's greedy tokens (plain runs: test_engine's family parity) with a pool so small that
    requests are preempted: by swap with the shared prefix cached, and by recompute."""
    path = model_dirs[family]
    shared = _prompts(7, (21,))[0]
    prompts = [shared + p for p in _prompts(8, (3, 9, 1, 14))] + _prompts(9, (11, 30))
    baseline = hf_greedy(path, prompts, MAX_NEW)
    for mode in ("swap", "recompute"):
        llm = _llm(path, num_kv_blocks=13, preemption_mode=mode, enable_prefix_caching=(mode == "swap"))
        assert _greedy(llm, prompts) == baseline, mode
        m = llm.get_metrics()
        assert m[f"num_{mode}_preemptions"] > 0 and m["kv_blocks_used"] == 0, mode
        if mode == "swap":
            assert m["prefix_cache_hit_tokens"] >= 3 * 20
        llm.engine.check_integrity()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_seeded_samples_carry_hf_log_probabilities(model_dirs: dict[str, Path], family: str) -> None:
    """``n=3`` seeded samples forked from one prompt (copy-on-write of its partial block): each
    sampled token's log-probability equals HF's for that token after that prefix, and the
    same seed gives the same samples in another batch."""
    path = model_dirs[family]
    prompt = _prompts(3, (10,))
    sp = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=10, ignore_eos=True, logprobs=0)
    llm = _llm(path)
    out = llm.generate(prompt, sp, use_tqdm=False)[0]
    samples = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in samples}) > 1 and llm.get_metrics()["num_cow_copies"] >= 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for c in out.outputs:
        ids = prompt[0] + c.token_ids
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
        ref = [lp[len(prompt[0]) - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
        got = [d[t] for d, t in zip(c.logprobs, c.token_ids, strict=True)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-4)
    other = SamplingParams(temperature=1.0, max_tokens=5)
    again = _llm(path, block_size=8).generate(_prompts(4, (7,)) + prompt, [other, sp], use_tqdm=False)[1]
    assert [c.token_ids for c in again.outputs] == samples


# ---------------------------------------------------------------------- the benchmark
def test_benchmark_smoke_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``bench_moe.py`` is a GPU benchmark; on the CPU (torch path, tiny shape) it runs end to
    end and its figures are consistent."""
    import importlib
    import json
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.delitem(sys.modules, "bench_moe", raising=False)
    bench = importlib.import_module("bench_moe")
    out = tmp_path / "moe.json"
    res = bench.main(["--device", "cpu", "--smoke", "--out", str(out), "--reps", "2"])
    assert json.loads(out.read_text()) == res
    shape = bench.SMOKE
    assert [r["batch"] for r in res["batches"]] == list(shape.batches) and res["copy_gbps"] > 0
    for r in res["batches"]:
        assert shape.top_k <= r["distinct_experts_per_layer"] <= min(shape.experts, r["batch"] * shape.top_k)
        per_layer = r["distinct_experts_per_layer"] * 3 * shape.hidden * shape.intermediate * 4
        assert r["weight_bytes"] == pytest.approx(shape.layers * (per_layer + shape.experts * shape.hidden * 4))
        assert r["max_abs_diff"] < 1e-5
        for name in ("fused", "loop"):
            assert r[name]["tok_per_s"] == pytest.approx(r["batch"] / r[name]["us"] * 1e6)
            assert r[name]["pct_roofline"] == pytest.approx(100 * r["roofline_us"] / r[name]["us"])
    assert res["batches"][0]["distinct_experts_per_layer"] == shape.top_k  # one token: exactly its experts
    with pytest.raises(ValueError, match="--layers"):
        bench.main(["--device", "cpu", "--smoke", "--layers", "0"])
