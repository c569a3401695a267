"""FP8 KV cache (``kv_cache_dtype="fp8"``) outside the kernels: the option, the pool's sizing
and block moves, the torch reference's round trip, checkpoint scales, and the engine.

Accuracy against the full-precision cache is measured, not assumed equal: e4m3 keeps 3
mantissa bits (2^-4 relative rounding error), and the tiny test models (initialised with a
large range so their logits are far apart) amplify it.  On llama3_untied_gqa, prefill + decode
logits through the fp8 cache differ from the fp32 cache's by 11% of their norm on average and
pick the same top token at 92% of positions (measured); the asserts leave some room above
that, far below what a cache read with a wrong scale or wrong bytes gives (errors of 100% and
more).  Whole greedy sequences then diverge after the first differing token, so the engine
tests compare the first generated tokens with the default cache, and everything that moves
pages (prefix caching, swap, recompute) with fp8 itself.
"""

from __future__ import annotations

import argparse
import random

import pytest
import torch

from pagedattn import LLM, SamplingParams
from pagedattn.cache.kv_pool import FP8_KV_DTYPE, KVCachePool, KVCacheSpec, dequantize, quantize_fp8, store_kv_ref
from pagedattn.config import EngineConfig, add_engine_args, config_from_args, kv_cache_torch_dtype
from pagedattn.models.layers import Attention
from pagedattn.models.loader import iter_safetensors, load_model
from pagedattn.models.testing import PagedHarness

from .engine_models import make_model_dir

FP8 = FP8_KV_DTYPE


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("fp8kv"), "llama3_untied_gqa")


def _prompts(seed: int, lens=(5, 16, 17, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in lens]


def _llm(path, **kw) -> LLM:
    kw.setdefault("device", "cpu")
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("swap_space_gib", 0.01)
    return LLM(str(path), **kw)


def _greedy(llm: LLM, prompts, max_new: int = 16) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


# --------------------------------------------------------------------------- the option


def test_kv_cache_dtype_option_and_flag() -> None:
    assert EngineConfig(device="cpu").kv_cache_dtype == "auto"
    for bad in ("fp16", "FP8", "e4m3", 8):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            EngineConfig(device="cpu", kv_cache_dtype=bad)  # type: ignore[arg-type]
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert config_from_args(parser.parse_args(["--kv-cache-dtype", "fp8", "--device", "cpu"])).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int8"])
    assert kv_cache_torch_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.bfloat16) == FP8
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache_torch_dtype("int4", torch.bfloat16)


def test_bad_kv_cache_dtype_is_a_value_error_before_loading(llama) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        _llm(llama, kv_cache_dtype="float8")


# --------------------------------------------------------------------------- pool


def test_fp8_pool_holds_twice_the_tokens_of_bf16() -> None:
    bf16 = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)
    fp8 = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16, dtype=FP8)
    assert fp8.bytes_per_token == 2 * 3 * 2 * 64 and bf16.bytes_per_token == 2 * fp8.bytes_per_token
    budget = 10 * bf16.bytes_per_block + 5
    assert fp8.blocks_for_bytes(budget) == 2 * bf16.blocks_for_bytes(budget) == 20
    assert KVCachePool.from_budget(fp8, budget).nbytes == 20 * fp8.bytes_per_block
    with pytest.raises(ValueError, match="8 bits"):
        KVCacheSpec(1, 1, 8, 4, dtype=torch.float8_e5m2)


def test_fp8_pool_moves_blocks_bytewise() -> None:
    """Copy-on-write, swap out and in, and zeroing on an fp8 pool (torch's CPU index ops have no
    float8 kernels: the pool moves bytes) keep every page bit for bit."""
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=FP8)
    pool = KVCachePool(spec, num_blocks=6, num_cpu_blocks=3)
    g = torch.Generator().manual_seed(5)
    scale = torch.tensor([0.25])
    for layer in range(2):
        kv = torch.randn(2, 24, 2, 8, generator=g)
        pool.write(layer, kv[0], kv[1], torch.arange(24), scale, scale)
    before = pool.kv.view(torch.uint8).clone()
    assert before.any()
    pool.copy_blocks([(1, 4)])
    assert torch.equal(pool.read_block(4).view(torch.uint8), before[:, :, 1])
    pool.swap_out([(2, 0), (3, 2)])
    pool.zero_blocks([2, 3])
    assert not pool.read_block(2).view(torch.uint8).any()
    pool.swap_in([(2, 5), (0, 3)])
    assert torch.equal(pool.read_block(5).view(torch.uint8), before[:, :, 3])
    assert torch.equal(pool.read_block(3).view(torch.uint8), before[:, :, 2])


def test_reference_store_round_trip_error_is_bounded() -> None:
    """store_kv_ref then dequantize (what the torch reference reads): within 2^-4 of |x| (half
    a step of 3 mantissa bits), or 2^-10 * s below e4m3's normal range, after the clamp to
    +-448 * s; values already on the grid come back exactly."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 2, 16, generator=g) * 4
    for s in (1.0, 0.03125, 3.0):
        scale = torch.tensor([s])
        k_cache = torch.zeros(16, 4, 2, 16, dtype=FP8)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(64, generator=g)
        store_kv_ref(x, -x, k_cache, v_cache, slots, scale, scale * 2)
        k_back = dequantize(k_cache, scale).view(64, 2, 16)[slots]
        v_back = dequantize(v_cache, scale * 2).view(64, 2, 16)[slots]
        for back, want, sc in ((k_back, x.clamp(-448 * s, 448 * s), s), (v_back, -x.clamp(-896 * s, 896 * s), 2 * s)):
            err = (back - want).abs()
            assert (err <= want.abs() * 2.0**-4 + 2.0**-10 * sc).all()
            rel = (err.norm() / want.norm()).item()
            assert 1e-3 < rel < 2.0**-4, rel  # rounded for real, within e4m3's bound
    on_grid = quantize_fp8(x, torch.tensor([1.0])).float()
    assert torch.equal(quantize_fp8(on_grid, torch.tensor([1.0])).float(), on_grid)


# --------------------------------------------------------------------------- checkpoint scales


@pytest.mark.parametrize(("names", "want"), [
    ({"k_scale": 0.5, "v_scale": 0.25}, (0.5, 0.25)),  # vLLM's
    ({"k_proj.k_scale": 2.0, "v_proj.v_scale": 0.125}, (2.0, 0.125)),  # ModelOpt's
    ({"k_proj.output_scale": 0.75, "v_proj.output_scale": 1.5}, (0.75, 1.5)),  # compressed-tensors'
    ({"kv_scale": 0.0625}, (0.0625, 0.0625)),  # the old single scale
])
def test_checkpoint_kv_scales_are_loaded(llama, names, want) -> None:
    model, source = load_model(llama, torch.float32, "cpu")
    extra = [(f"model.layers.{i}.self_attn.{n}", torch.tensor(v * (i + 1))) for i in range(2)
             for n, v in names.items()]
    model.load_weights([*iter_safetensors(source.weight_files), *extra])
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    for i, a in enumerate(attn):
        assert (a.k_scale.item(), a.v_scale.item()) == (want[0] * (i + 1), want[1] * (i + 1))
    fresh, _ = load_model(llama, torch.float32, "cpu")
    assert all(a.k_scale.item() == 1.0 == a.v_scale.item() for a in fresh.modules() if isinstance(a, Attention))
    with pytest.raises(ValueError, match="k_scale must be a positive"):
        model.load_weights([*iter_safetensors(source.weight_files),
                            ("model.layers.0.self_attn.k_scale", torch.tensor(-1.0))])
    with pytest.raises(ValueError, match="one value"):
        model.load_weights([*iter_safetensors(source.weight_files),
                            ("model.layers.0.self_attn.v_scale", torch.ones(2))])
    for other in ("model.layers.0.self_attn.q_scale", "model.layers.0.mlp.k_scale", "model.layers.9.self_attn.k_scale"):
        with pytest.raises(ValueError, match="unexpected weight"):  # not a scale of an attention module
            model.load_weights([*iter_safetensors(source.weight_files), (other, torch.tensor(1.0))])


# --------------------------------------------------------------------------- model and engine


def _harness_logits(model, ids: list[int], kv_dtype, scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Logits of a 40-token prefill then 8 decode steps (teacher-forced) through a PagedHarness."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.k_scale.fill_(scales[0])
            m.v_scale.fill_(scales[1])
    h = PagedHarness(model, num_blocks=32, block_size=4, kv_cache_dtype=kv_dtype)
    out = [h.step([("s", ids[:40])])[0]]
    out += [h.step([("s", [t])])[0] for t in ids[40:]]
    return torch.cat(out)


def test_fp8_logits_stay_near_the_full_precision_cache(llama) -> None:
    model, _ = load_model(llama, torch.float32, "cpu")
    ids = _prompts(1, lens=(48,))[0]
    full = _harness_logits(model, ids, None)
    fp8 = _harness_logits(model, ids, FP8)
    rel = (fp8 - full).norm(dim=-1) / full.norm(dim=-1)
    top1 = (fp8.argmax(-1) == full.argmax(-1)).float().mean().item()
    assert rel.mean() < 0.16 and rel.max() < 0.4 and top1 >= 0.8, (rel.mean(), rel.max(), top1)
    assert rel.mean() > 1e-3, "the cache was not quantized"
    # Power-of-two scales move the e4m3 grid without changing its relative spacing: the same
    # logits up to the few values that fall below the normal range or into the clamp.  A
    # kernel that dropped a scale on store or read would be off by 4x (K) or 2x (V) here.
    scaled = _harness_logits(model, ids, FP8, scales=(0.25, 0.5))
    assert ((scaled - fp8).norm(dim=-1) / fp8.norm(dim=-1)).max() < 0.02


def test_engine_fp8_first_tokens_match_the_default_cache(llama) -> None:
    prompts = _prompts(1)
    default = _greedy(_llm(llama), prompts)
    llm = _llm(llama, kv_cache_dtype="fp8")
    assert llm.engine.executor.worker.pool.kv.dtype == FP8
    fp8 = _greedy(llm, prompts)
    assert [s[0] for s in fp8] == [s[0] for s in default]
    llm.engine.check_integrity()


def test_engine_fp8_pool_from_memory_counts_one_byte(llama) -> None:
    """Sized from cpu_kv_space_gib: 4x the blocks of the float32 (CPU default) cache."""
    blocks = {kv: _llm(llama, num_kv_blocks=None, cpu_kv_space_gib=0.001, kv_cache_dtype=kv).engine.executor.worker
              .pool.num_blocks for kv in ("auto", "fp8")}
    assert 4 * blocks["auto"] <= blocks["fp8"] < 4 * (blocks["auto"] + 1), blocks  # floors of one budget


def test_engine_fp8_prefix_cache_swap_and_recompute_keep_outputs(llama) -> None:
    """With the fp8 cache, prefix-cache hits, swapped-out and back pages, and recomputed ones
    give the tokens of an fp8 run with none of them, and leave the pool consistent."""
    shared = _prompts(7, lens=(37,))[0]
    prompts = [shared + p for p in _prompts(8, lens=(3, 9, 1, 14))] + _prompts(9, lens=(11, 30))
    baseline = _greedy(_llm(llama, kv_cache_dtype="fp8", enable_prefix_caching=False), prompts)

    llm = _llm(llama, kv_cache_dtype="fp8", enable_prefix_caching=True)
    assert _greedy(llm, prompts[:1]) + _greedy(llm, prompts[1:]) == baseline
    assert llm.get_metrics()["prefix_cache_hit_tokens"] >= 3 * 36
    llm.engine.check_integrity()
    for mode, blocks in (("swap", 19), ("recompute", 24)):
        llm = _llm(llama, kv_cache_dtype="fp8", num_kv_blocks=blocks, preemption_mode=mode,
                   enable_prefix_caching=(mode == "swap"))
        assert _greedy(llm, prompts) == baseline, mode
        m = llm.get_metrics()
        assert m[f"num_{mode}_preemptions"] > 0, mode
        if mode == "swap":
            assert m["num_swapped_out_blocks"] > 0
        assert m["kv_blocks_used"] == 0
        llm.engine.check_integrity()
