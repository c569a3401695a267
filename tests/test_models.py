"""Model layer: parity with HF transformers (the oracle) on the paged KV cache, layers, config.

Tiny random models of every supported family are saved with ``save_pretrained`` and loaded
through our loader; their logits at every position must match HF's full-sequence forward
(fp32: max abs diff < 1e-4 of the logit scale, argmax identical) whether the sequence is run
as one prefill, in chunks, token by token, or inside a ragged batch with another sequence.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from pagedattn.models.config import ModelArchConfig
from pagedattn.models.granite import GraniteArchConfig
from pagedattn.models.interface import CausalLM
from pagedattn.models.layers import (
    AllReduce,
    ColumnParallelLinear,
    GeluAndMul,
    GemmaRMSNorm,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    apply_rotary,
    longrope_inv_freqs,
    make_rotary,
    pack_linear_weights_for_cpu,
    rope_inv_freq,
)
from pagedattn.models.llama import LlamaForCausalLM
from pagedattn.models.loader import iter_safetensors, load_model
from pagedattn.models.registry import ARCHITECTURES, build_model, model_class
from pagedattn.models.testing import PagedHarness

VOCAB = 256
SEQ_LEN = 40
BLOCK_SIZE = 4
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, max_position_embeddings=128,
    bos_token_id=1, eos_token_id=2,
)
# name -> (HF config class, extra kwargs)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_untied_llama3_rope": ("LlamaConfig", dict(
        num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_mqa_bias_linear_rope": ("LlamaConfig", dict(
        num_hidden_layers=2, num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "llama_gqa_dynamic_rope": ("LlamaConfig", dict(
        num_hidden_layers=2, num_key_value_heads=2,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral_window8": ("MistralConfig", dict(num_hidden_layers=2, num_key_value_heads=2, sliding_window=8)),
    "qwen2_bias_tied_windowed": ("Qwen2Config", dict(
        num_hidden_layers=3, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=8, max_window_layers=1)),
    "qwen3_qknorm_yarn_rope": ("Qwen3Config", dict(
        num_hidden_layers=2, num_key_value_heads=2, head_dim=32, attention_bias=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32})),
    # Layer 1 keeps a dense MLP (mlp_only_layers); top-3 of 8 experts, weights not renormalised.
    "qwen3_moe_dense_layer_top3": ("Qwen3MoeConfig", dict(
        num_hidden_layers=3, num_key_value_heads=2, attention_bias=True, num_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=False)),
    # Every second layer sparse (decoder_sparse_step), renormalised top-2, a window on every layer.
    "qwen3_moe_step2_renorm_windowed": ("Qwen3MoeConfig", dict(
        num_hidden_layers=2, num_key_value_heads=1, head_dim=32, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=48, decoder_sparse_step=2, norm_topk_prob=True, use_sliding_window=True,
        sliding_window=8)),
    "mixtral_top2_window8": ("MixtralConfig", dict(
        num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
    # Fused qkv/gate_up checkpoint tensors, a quarter of each head left unrotated, LongRoPE whose
    # original length (24) the 40-token sequences cross.
    "phi3_fused_partial_longrope": ("Phi3Config", dict(
        num_hidden_layers=2, num_key_value_heads=2, original_max_position_embeddings=24, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5],
                         "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 13.0]})),
    "phi3_window8": ("Phi3Config", dict(num_hidden_layers=2, num_key_value_heads=4, sliding_window=8, pad_token_id=0)),
    "olmo2_post_norms_qk_norm": ("Olmo2Config", dict(num_hidden_layers=2, num_key_value_heads=2, attention_bias=True,
                                                     pad_token_id=0)),
    "granite_multipliers": ("GraniteConfig", dict(
        num_hidden_layers=2, num_key_value_heads=1, embedding_multiplier=6.0, residual_multiplier=0.4,
        attention_multiplier=0.1, logits_scaling=3.0, tie_word_embeddings=True)),
    # Sliding, global, sliding layers (window 8 < the 40-token sequences); caps that bite; a head
    # size and a softmax scale of their own.
    "gemma2_softcap_windowed": ("Gemma2Config", dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=8, attn_logit_softcapping=1.5, final_logit_softcapping=4.0, tie_word_embeddings=True)),
    # Global then sliding layers with different rotary tables (the global one linearly scaled).
    "gemma3_qknorm_local_rope": ("Gemma3TextConfig", dict(
        num_hidden_layers=3, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=20, sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"], tie_word_embeddings=False,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}


_MOE_TYPES = ("qwen3_moe", "mixtral")


@dataclass
class Family:
    name: str
    hf: transformers.PreTrainedModel
    ours: LlamaForCausalLM
    path: Path


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Large random weights (norms around 1, biases non-zero) so logits are far apart and every
    parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise)


def _make_family(name: str, root: Path) -> Family:
    cls_name, extra = FAMILIES[name]
    cfg = getattr(transformers, cls_name)(**COMMON, **extra)
    # Eager attention: transformers' reference code path (its SDPA path drops Gemma 2's soft-capping).
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    _randomize(hf, seed=sorted(FAMILIES).index(name))
    hf.save_pretrained(root)
    ours, _ = load_model(root, torch.float32, "cpu")
    return Family(name, hf, ours, root)


@pytest.fixture(scope="module")
def build_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Family]:
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = _make_family(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, build_family: Callable[[str], Family]) -> Family:
    return build_family(request.param)


def _ids(seed: int, n: int = SEQ_LEN) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _hf_logits(hf: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0]


def _assert_logits_match(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    err = (got.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err < 1e-4 * scale, f"max abs diff {err:.3g} vs logit scale {scale:.3g}"
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def _harness(model: CausalLM, seed: int = 0) -> PagedHarness:
    return PagedHarness(model, num_blocks=48, block_size=BLOCK_SIZE, seed=seed)


# ---------------------------------------------------------------------- parity with HF
def test_prefill_matches_hf(family: Family) -> None:
    ids = _ids(1)
    got = _harness(family.ours).step([("s", ids)])[0]
    _assert_logits_match(got, _hf_logits(family.hf, ids))


def test_chunked_prefill_matches_hf(family: Family) -> None:
    ids = _ids(2)
    h = _harness(family.ours, seed=1)
    bounds = [0, 9, 25, SEQ_LEN]  # chunks cross block and window boundaries
    whole = {"s": SEQ_LEN}  # HF's one forward pass over the whole sequence (LongRoPE picks its table by it)
    got = torch.cat([h.step([("s", ids[a:b])], whole)[0] for a, b in itertools.pairwise(bounds)])
    _assert_logits_match(got, _hf_logits(family.hf, ids))


def test_decode_steps_match_hf(family: Family) -> None:
    ids = _ids(3)
    h = _harness(family.ours, seed=2)
    parts = [h.step([("s", ids[:30])], {"s": SEQ_LEN})[0]]
    parts += [h.step([("s", [t])])[0] for t in ids[30:]]
    _assert_logits_match(torch.cat(parts), _hf_logits(family.hf, ids))


def test_ragged_batch_matches_hf(family: Family) -> None:
    """Two sequences share steps: decodes first, then prefill/extend chunks, as the runner
    builds them."""
    a, b = _ids(4), _ids(5, n=33)
    h = _harness(family.ours, seed=3)
    got_a, got_b = [], []
    whole = {"a": len(a), "b": len(b)}
    (x,) = h.step([("a", a[:20])], whole)
    got_a.append(x)
    x, y = h.step([("a", a[20:21]), ("b", b[:25])], whole)
    got_a.append(x), got_b.append(y)
    y, x = h.step([("b", b[25:26]), ("a", a[21:])])
    got_a.append(x), got_b.append(y)
    (y,) = h.step([("b", b[26:])])
    got_b.append(y)
    _assert_logits_match(torch.cat(got_a), _hf_logits(family.hf, a))
    _assert_logits_match(torch.cat(got_b), _hf_logits(family.hf, b))


@pytest.mark.parametrize(("name", "prompt_len"), [("qwen3_qknorm_yarn_rope", 12), ("phi3_fused_partial_longrope", 12),
                                                 ("phi3_fused_partial_longrope", 30)])
def test_greedy_matches_hf_generate(build_family: Callable[[str], Family], name: str, prompt_len: int) -> None:
    """Prefill, then one token per step, as transformers' ``generate`` runs.  LongRoPE (original
    length 24): a 12-token prompt stays within the short table for 12 new tokens, a 30-token
    prompt uses the long one from the start."""
    fam = build_family(name)
    prompt = _ids(6, n=prompt_len)
    new = 12 if prompt_len == 12 else 16
    ours = _harness(fam.ours).greedy(prompt, max_new_tokens=new)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = fam.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, len(prompt):].tolist()


@torch.no_grad()
def test_longrope_switch_recomputes_the_sequence_as_hf_generate_does(build_family: Callable[[str], Family]) -> None:
    """transformers picks LongRoPE's table per forward call by its largest position, and Phi-3's
    ``generate`` drops its cache the first time the sequence outgrows the original length (24),
    computing it all again with the long table: each step's logits equal one forward pass over
    the sequence so far.  The model does the same when the sequence is computed again at the
    switch (what the engine's scheduler does); decoding on over the short-table keys would not."""
    fam = build_family("phi3_fused_partial_longrope")
    prompt = _ids(12, n=16)
    ids = torch.tensor([prompt])
    gen = fam.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False,
                          eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    seq = gen.sequences[0].tolist()
    ref = torch.cat(gen.logits)
    for i, row in enumerate(ref):  # every step = one forward pass over the sequence so far
        _assert_logits_match(row[None], _hf_logits(fam.hf, seq[:len(prompt) + i])[-1:])
    h, stale = _harness(fam.ours), _harness(fam.ours, seed=1)
    got = [h.step([("s", prompt)])[0][-1]]
    stale_rows = [stale.step([("s", prompt)])[0][-1]]
    for n in range(len(prompt) + 1, len(seq)):
        if n == 25:  # the sequence outgrows the original length: computed again
            h.free("s")
            got.append(h.step([("s", seq[:n])])[0][-1])
        else:
            got.append(h.step([("s", seq[n - 1:n])])[0][-1])
        stale_rows.append(stale.step([("s", seq[n - 1:n])])[0][-1])
    _assert_logits_match(torch.stack(got), ref)
    assert (torch.stack(stale_rows) - ref)[9:].abs().max() > 1e-2  # from the first long step on


def test_longrope_lengths_per_token_with_and_without_the_runners_lengths() -> None:
    """Each token's sequence length: the runner's (at least position + 1, for an overlapped
    decode whose input is not appended yet), else the sequence's length after the step (a
    decode graph, a profiling pass)."""
    from pagedattn.attention.metadata import AttentionMetadata
    from pagedattn.models.context import ForwardContext
    from pagedattn.models.layers.decoder import forward_lengths

    meta = AttentionMetadata.build([1, 3, 1], [9, 5, 30], [[0, 1, 2], [3, 4], [5] * 8], 4)
    positions = torch.tensor([8, 2, 3, 4, 29])
    ctx = ForwardContext(meta, [], None)  # type: ignore[arg-type]
    assert forward_lengths(positions, ctx).tolist() == [9, 5, 5, 5, 30]
    ctx.total_lens = torch.tensor([8, 40, 40, 40, 30])
    assert forward_lengths(positions, ctx).tolist() == [9, 40, 40, 40, 30]
    decodes = AttentionMetadata.build([1, 1], [9, 30], [[0, 1, 2], [5] * 8], 4)
    assert forward_lengths(torch.tensor([8, 29]), ForwardContext(decodes, [], None)).tolist() == [9, 30]  # type: ignore[arg-type]


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_longrope_tables_are_bitwise_hf(partial: float) -> None:
    """Both LongRoPE tables and the cos/sin scale equal transformers' (Phi-3's default factor:
    max / original length); cos/sin take the table each token's forward length picks."""
    rot = int(32 * partial)
    hf_cfg = transformers.Phi3Config(
        hidden_size=128, num_attention_heads=4, max_position_embeddings=4096, original_max_position_embeddings=256,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
                         "short_factor": [1 + 0.05 * i for i in range(rot // 2)],
                         "long_factor": [1 + 0.7 * i for i in range(rot // 2)]})
    cfg = ModelArchConfig.from_hf_config(hf_cfg.to_dict())
    assert cfg.rotary_dim == rot and cfg.rope_scaling is not None
    short, long, scale = longrope_inv_freqs(rot, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    ref_short, ref_scale = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu")
    ref_long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu", seq_len=257)
    assert torch.equal(short, ref_short) and torch.equal(long, ref_long) and scale == ref_scale > 1
    rotary = make_rotary(cfg, torch.float32)
    hf_rotary = Phi3RotaryEmbedding(hf_cfg)
    x = torch.randn(1, 3)
    for positions in (torch.tensor([0, 7, 255]), torch.tensor([3, 256, 4000])):  # max + 1 <= 256, > 256
        ref_cos, ref_sin = hf_rotary(x, positions[None])
        cos, sin = rotary(positions, torch.full_like(positions, int(positions.max()) + 1))
        assert torch.equal(torch.cat([cos, cos], -1)[:, 0], ref_cos[0])
        assert torch.equal(torch.cat([sin, sin], -1)[:, 0], ref_sin[0])
    # Per token: a short-prompt token and a long-forward token in one step.
    cos, _ = rotary(torch.tensor([5, 5]), torch.tensor([200, 300]))
    assert not torch.equal(cos[0], cos[1])


@pytest.mark.parametrize(("num_kv_heads", "tp_size"), [(4, 2), (2, 4), (1, 2)])
def test_projection_qk_norm_shards_use_the_whole_projection(num_kv_heads: int, tp_size: int) -> None:
    """OLMo 2's q/k norm over all heads, split like the q/k/v projection: each rank normalises
    its heads by the whole projection's mean square (the ranks' sums of squares summed; KV heads
    replicated on several ranks counted once each).  Each rank's slice equals that slice of
    transformers' norm."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    hd, nh, t = 8, 8, 5
    cfg = ModelArchConfig(architecture="Olmo2ForCausalLM", vocab_size=10, hidden_size=32, intermediate_size=8,
                          num_layers=1, num_heads=nh, num_kv_heads=num_kv_heads, head_dim=hd)
    for full, which in ((nh * hd, "q"), (num_kv_heads * hd, "k")):
        w, x = 1 + _rand(full, seed=1), 3 * _rand(t, full, seed=2)
        ref = Olmo2RMSNorm(full, eps=1e-5)
        ref.weight.data.copy_(w)
        norms = []
        for rank in range(tp_size):
            from pagedattn.models.layers import Attention, Shard

            attn = Attention(cfg, 0, Shard(rank, tp_size), projection_qk_norm=True)
            norm = attn.q_norm if which == "q" else attn.k_norm
            norm.weight_loader(norm.weight, w)
            norms.append(norm)
        head = norms[0].local_size
        parts = [x.narrow(1, n.part * head, head) for n in norms]
        total = sum(p.pow(2).sum(-1, keepdim=True) for p in parts)  # every rank's sum of squares, summed
        for n, part in zip(norms, parts, strict=True):
            n.all_reduce = _FixedSum(total)
            expected = ref(x).narrow(1, n.part * head, head)
            torch.testing.assert_close(n(part), expected, rtol=1e-6, atol=1e-6)


class _FixedSum(AllReduce):
    """The cross-rank sum, known in advance (one process plays every rank)."""

    def __init__(self, total: torch.Tensor) -> None:
        self.total = total

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape == self.total.shape
        return self.total.clone()


def test_layer_windows_follow_the_config(build_family: Callable[[str], Family]) -> None:
    assert build_family("mistral_window8").ours.config.layer_sliding_windows == [8, 8]
    qwen2 = build_family("qwen2_bias_tied_windowed").ours
    assert qwen2.config.layer_sliding_windows == [None, 8, 8]
    assert [spec.sliding_window for spec in qwen2.attention_specs()] == [None, 8, 8]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_hf(family: Family, backend: str, dtype: torch.dtype) -> None:
    """On the GPU, with the reference and the Triton attention: chunked prefill then decodes."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from pagedattn.attention.selector import get_attention_backend

    model, _ = load_model(family.path, dtype, "cuda")
    h = PagedHarness(model, num_blocks=48, block_size=BLOCK_SIZE, device="cuda",
                     backend=get_attention_backend("cuda", backend))
    ids = _ids(10)
    got = torch.cat([h.step([("s", ids[:17])], {"s": len(ids)})[0], h.step([("s", ids[17:30])])[0]]
                    + [h.step([("s", [t])])[0] for t in ids[30:]]).float().cpu()
    ref = _hf_logits(family.hf, ids)
    if dtype == torch.float32:
        _assert_logits_match(got, ref)
    else:  # bf16 weights and activations (~3 significant digits): close, mostly the same argmax
        row_err = (got - ref).abs().amax(-1)
        # A router whose top-k scores are nearly tied may pick another expert in bf16 than in fp32,
        # which moves that token's logits far; most tokens must still be close.
        worst = row_err.quantile(0.9) if family.hf.config.model_type in _MOE_TYPES else row_err.max()
        assert worst < 0.1 * ref.abs().max()
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("window", [7, 9])
def test_sliding_window_semantics_match_hf_exactly(build_family: Callable[[str], Family], window: int) -> None:
    """HF's sliding mask is ``k > q - window`` (``q - k < window``), ours the same: the parity
    tests pass with window 8, and an off-by-one window is caught at the first position where
    the two windows differ."""
    fam = build_family("mistral_window8")
    cfg = dataclasses.replace(fam.ours.config, layer_sliding_windows=[window] * fam.ours.config.num_layers)
    model = build_model(cfg, torch.float32, "cpu")
    model.load_weights(iter_safetensors(sorted(fam.path.glob("*.safetensors"))))
    ids = _ids(7)
    got = _harness(model).step([("s", ids)])[0]
    ref = _hf_logits(fam.hf, ids)
    first_diff = min(window, 8)  # query p sees p-w+1..p: windows 8 and w agree while p < min(w, 8)
    torch.testing.assert_close(got[:first_diff], ref[:first_diff], rtol=1e-4, atol=1e-4)
    assert (got[first_diff] - ref[first_diff]).abs().max() > 1e-3


@pytest.mark.parametrize(("name", "change"), [
    ("gemma2_softcap_windowed", {"attn_logit_softcapping": None}),
    ("gemma2_softcap_windowed", {"final_logit_softcapping": None}),
    ("gemma2_softcap_windowed", {"layer_sliding_windows": [None] * 3}),
    ("gemma2_softcap_windowed", {"query_pre_attn_scalar": 16}),  # the head size: the usual scale
    ("gemma3_qknorm_local_rope", {"local_rope_theta": None}),  # one rotary table for every layer
    ("gemma3_qknorm_local_rope", {"layer_sliding_windows": [None] * 3}),
], ids=["attn_cap", "final_cap", "windows", "scale", "local_rope", "windows3"])
def test_each_gemma_knob_changes_the_logits(build_family: Callable[[str], Family], name: str,
                                            change: dict[str, Any]) -> None:
    """The parity tests above are not vacuous: without any one of these the logits are far from HF's."""
    fam = build_family(name)
    model = build_model(dataclasses.replace(fam.ours.config, **change), torch.float32, "cpu")
    model.load_weights(iter_safetensors(sorted(fam.path.glob("*.safetensors"))))
    ids = _ids(12)
    got = _harness(model).step([("s", ids)])[0]
    ref = _hf_logits(fam.hf, ids)
    assert (got - ref).abs().max() > 1e-2 * ref.abs().max()


def test_gemma_embedding_scale_is_rounded_to_the_model_dtype(build_family: Callable[[str], Family]) -> None:
    """sqrt(hidden_size) multiplies the embeddings in the model dtype, as transformers does."""
    fam = build_family("gemma2_softcap_windowed")
    cfg = dataclasses.replace(fam.ours.config, hidden_size=48, intermediate_size=32)
    for dtype in (torch.float32, torch.bfloat16):
        scale = build_model(cfg, dtype, "cpu").model.embed_scale
        assert scale.dtype == dtype and scale.item() == torch.tensor(48**0.5).to(dtype).item()
    assert torch.tensor(48**0.5).to(torch.bfloat16).item() != torch.tensor(48**0.5).item()


def test_gemma_dummy_weights_have_identity_norms(build_family: Callable[[str], Family], tmp_path: Path) -> None:
    """``load_format="dummy"`` fills Gemma's norms (offsets from one) with zeros, as transformers does."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((build_family("gemma3_qknorm_local_rope").path / "config.json").read_text())
    model, _ = load_model(folder, torch.float32, "cpu", load_format="dummy")
    norms = [m for m in model.modules() if isinstance(m, GemmaRMSNorm)]
    assert len(norms) == 3 * 6 + 1 and all(not m.weight.any() for m in norms)
    assert _harness(model).step([("s", _ids(13, 9))])[0].isfinite().all()


@pytest.mark.parametrize("name", ["qwen3_qknorm_yarn_rope", "gemma2_softcap_windowed", "gemma3_qknorm_local_rope"])
def test_bfloat16_model_tracks_fp32(build_family: Callable[[str], Family], name: str) -> None:
    fam = build_family(name)
    model, _ = load_model(fam.path, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.kv_cache_spec(BLOCK_SIZE).dtype == torch.bfloat16
    ids = _ids(8)
    got = _harness(model).step([("s", ids)])[0]
    assert got.dtype == torch.bfloat16
    ref = _hf_logits(fam.hf, ids)
    # Within 5% of the logit scale, or (the Gemma test models amplify rounding: post-norms, small
    # caps) within 1.5x of transformers' own bf16 run's distance from fp32.
    hf_bf16 = _hf_logits(copy.deepcopy(fam.hf).to(torch.bfloat16), ids).float()
    bound = max(0.05 * ref.abs().max().item(), 1.5 * (hf_bf16 - ref).abs().max().item())
    assert (got.float() - ref).abs().max() < bound


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("name", ["llama_mqa_bias_linear_rope", "qwen2_bias_tied_windowed", "llama_untied_llama3_rope"])
def test_cpu_packed_weights_match_dense(build_family: Callable[[str], Family], name: str) -> None:
    """The CPU runtime layout (oneDNN-packed linears) computes the same logits as the dense
    checkpoint layout, for prefill and decode-sized batches, tied and untied heads, with biases."""
    fam = build_family(name)
    packed, _ = load_model(fam.path, torch.float32, "cpu")
    n_linear = sum(isinstance(m, ColumnParallelLinear | RowParallelLinear | ParallelLMHead) for m in packed.modules())
    assert pack_linear_weights_for_cpu(packed) == n_linear
    assert pack_linear_weights_for_cpu(packed) == 0  # idempotent
    assert packed.lm_head.weight.is_mkldnn and not packed.model.embed_tokens.weight.is_mkldnn
    x = torch.randn(2, 3, COMMON["hidden_size"], generator=torch.Generator().manual_seed(7))
    qkv = packed.model.layers[0].self_attn.qkv_proj
    dense_qkv = fam.ours.model.layers[0].self_attn.qkv_proj
    torch.testing.assert_close(qkv(x), dense_qkv(x))  # leading dims around a packed weight
    for seed, n in ((3, SEQ_LEN), (4, 1)):
        batch = [("a", _ids(seed, n)), ("b", _ids(seed + 10, n))]
        for got, ref in zip(_harness(packed).step(batch), _harness(fam.ours).step(batch)):
            _assert_logits_match(got, ref)


def test_kv_cache_spec_and_registry(build_family: Callable[[str], Family]) -> None:
    fam = build_family("qwen3_qknorm_yarn_rope")
    spec = fam.ours.kv_cache_spec(16, torch.float16)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_size, spec.dtype) == (
        2, 2, 32, 16, torch.float16)
    assert set(ARCHITECTURES) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                  "Qwen3MoeForCausalLM", "MixtralForCausalLM",
                                  "Phi3ForCausalLM", "Olmo2ForCausalLM", "GraniteForCausalLM",
                                  "Gemma2ForCausalLM", "Gemma3ForCausalLM"}
    for arch in ARCHITECTURES:  # one class per family, named after the architecture it serves
        assert model_class(arch).__name__ == arch
    with pytest.raises(ValueError, match=r"unsupported architecture 'GPT2LMHeadModel'.*Qwen3ForCausalLM"):
        build_model(dataclasses.replace(fam.ours.config, architecture="GPT2LMHeadModel"), torch.float32, "cpu")


def test_every_family_keeps_the_runtime_contract(family: Family) -> None:
    """What the runner, the CUDA graphs and the workers call (``CausalLM``), on one rank: the
    logits of the sampled rows, their greedy ids (the argmax), one attention spec per layer."""
    model = family.ours
    assert isinstance(model, CausalLM) and type(model).__name__ == model.config.architecture
    specs = model.attention_specs()
    assert [s.sliding_window for s in specs] == model.config.layer_sliding_windows
    assert {(s.num_heads, s.num_kv_heads, s.head_dim) for s in specs} == {
        (model.config.num_heads, model.config.num_kv_heads, model.config.head_dim)}
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(11))
    logits = model.compute_logits(hidden, gather=False)
    assert torch.equal(model.gather_logits(logits), model.compute_logits(hidden))
    assert torch.equal(model.greedy_tokens(logits), logits.argmax(-1))


def test_forward_rejects_bad_inputs(build_family: Callable[[str], Family]) -> None:
    fam = build_family("mistral_window8")
    h = _harness(fam.ours)
    with pytest.raises(ValueError, match="1-D"):
        fam.ours(torch.zeros(1, 3, dtype=torch.long), torch.arange(3), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        h.step([])


# ---------------------------------------------------------------------- load_weights
def _state_dict(fam: Family) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(sorted(fam.path.glob("*.safetensors"))))


def test_load_weights_ignores_tied_head_and_rotary_buffers(build_family: Callable[[str], Family]) -> None:
    fam = build_family("qwen2_bias_tied_windowed")
    sd = _state_dict(fam)
    sd["lm_head.weight"] = torch.randn(VOCAB, 64)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.randn(8)
    model = build_model(fam.ours.config, torch.float32, "cpu")
    model.load_weights(sd.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, sd["model.embed_tokens.weight"])


def test_load_weights_errors_name_the_tensor(build_family: Callable[[str], Family]) -> None:
    fam = build_family("llama_untied_llama3_rope")
    sd = _state_dict(fam)
    model = build_model(fam.ours.config, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.layers\.0\.self_attn\.x_proj\.weight'"):
        model.load_weights([*sd.items(), ("model.layers.0.self_attn.x_proj.weight", torch.randn(2))])
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.mlp\.up_proj\.weight"):
        model.load_weights(missing.items())
    bad = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.randn(64, 64)})
    with pytest.raises(ValueError, match=r"k_proj\.weight.*shape mismatch"):
        model.load_weights(bad.items())


# ---------------------------------------------------------------------- norm and rotary vs HF
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "eps"), [((7, 3, 48), 1e-5), ((16, 576), 1e-5), ((300, 100), 1e-6)])
def test_rmsnorm_is_bitwise_hf(dtype: torch.dtype, shape: tuple[int, ...], eps: float) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    n = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    res = torch.randn(*shape, generator=gen).to(dtype)
    w = (1 + 0.3 * torch.randn(n, generator=gen)).to(dtype)
    ours, ref = RMSNorm(n, eps, dtype), LlamaRMSNorm(n, eps=eps).to(dtype)
    ours.weight.data.copy_(w)
    ref.weight.data.copy_(w)
    assert torch.equal(ours(x), ref(x))
    # The residual form: HF adds the sublayer output to the residual stream, then normalises.
    normed, summed = ours.add_and_norm(x, res)
    assert torch.equal(summed, res + x)
    assert torch.equal(normed, ref(res + x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "eps"), [((7, 3, 48), 1e-6), ((300, 100), 1e-6)])
def test_gemma_rmsnorm_is_bitwise_hf(dtype: torch.dtype, shape: tuple[int, ...], eps: float) -> None:
    """``x / rms(x) * (1 + weight)`` in fp32, rounded once, as ``Gemma2RMSNorm`` (also over heads,
    Gemma 3's q/k norm), and the add-then-norm form."""
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    n = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    res = torch.randn(*shape, generator=gen).to(dtype)
    w = (0.3 * torch.randn(n, generator=gen)).to(dtype)
    ours, ref = GemmaRMSNorm(n, eps, dtype), Gemma2RMSNorm(n, eps=eps).to(dtype)
    ours.weight.data.copy_(w)
    ref.weight.data.copy_(w)
    assert torch.equal(ours(x), ref(x))
    normed, summed = ours.add_and_norm(x, res)
    assert torch.equal(summed, res + x)
    assert torch.equal(normed, ref(res + x))
    assert torch.equal(GemmaRMSNorm(n, eps)(x.float()), x.float() * torch.rsqrt(x.float().pow(2).mean(-1, True) + eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_and_mul_is_bitwise_hf(dtype: torch.dtype) -> None:
    """GeGLU is HF's ``ACT2FN[hidden_activation](gate) * up`` for both GELUs Gemma configs name."""
    gate_up = (torch.randn(9, 2 * 40, generator=torch.Generator().manual_seed(6)) * 4).to(dtype)
    before = gate_up.clone()
    gate, up = gate_up.chunk(2, -1)
    for act, approximate in (("gelu_pytorch_tanh", "tanh"), ("gelu", "none")):
        assert torch.equal(GeluAndMul(approximate)(gate_up), ACT2FN[act](gate) * up)
    assert not torch.equal(GeluAndMul("tanh")(gate_up), GeluAndMul("none")(gate_up))
    assert torch.equal(gate_up, before)
    with pytest.raises(ValueError, match="approximate"):
        GeluAndMul("fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_is_bitwise_torch(dtype: torch.dtype) -> None:
    """SiLU-and-mul (in place on SiLU's output on the CPU) is HF's ``act(gate) * up``, and
    leaves the fused gate/up input as it was."""
    gate_up = (torch.randn(9, 2 * 40, generator=torch.Generator().manual_seed(5)) * 4).to(dtype)
    before = gate_up.clone()
    gate, up = gate_up.chunk(2, -1)
    assert torch.equal(SiluAndMul()(gate_up), torch.nn.functional.silu(gate) * up)
    assert torch.equal(gate_up, before)


ROPES: dict[str, dict[str, Any] | None] = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    "yarn_mscale_untruncated": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                "mscale": 0.9, "mscale_all_dim": 0.7, "beta_fast": 16.0, "truncate": False},
}


def _hf_llama_config(rope: dict[str, Any] | None, head_dim: int = 64) -> transformers.LlamaConfig:
    params = {"rope_type": "default", "rope_theta": 50000.0} if rope is None else {**rope, "rope_theta": 50000.0}
    return transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=2048, rope_parameters=params)


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_inv_freq_is_bitwise_hf(name: str) -> None:
    hf_cfg = _hf_llama_config(ROPES[name])
    cfg = ModelArchConfig.from_hf_config(hf_cfg.to_dict())
    inv, scale = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    if name == "default":
        ref, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[hf_cfg.rope_parameters["rope_type"]](hf_cfg, "cpu")
    assert torch.equal(inv, ref)
    assert scale == ref_scale


@pytest.mark.parametrize("name", ["default", "yarn_mscale_untruncated", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_is_bitwise_hf(name: str, dtype: torch.dtype) -> None:
    hf_cfg = _hf_llama_config(ROPES[name], head_dim=32)
    cfg = ModelArchConfig.from_hf_config(hf_cfg.to_dict())
    gen = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 2000, (11,), generator=gen)
    q = torch.randn(11, 4, 32, generator=gen).to(dtype)
    k = torch.randn(11, 2, 32, generator=gen).to(dtype)
    rot = RotaryEmbedding(32, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, dtype)
    cos, sin = rot(positions)
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf_cfg)(q, positions[None])  # [1, T, D]
    assert torch.equal(torch.cat([cos, cos], -1)[:, 0], ref_cos[0])
    assert torch.equal(torch.cat([sin, sin], -1)[:, 0], ref_sin[0])
    # HF applies rotary on [B, H, T, D]; ours on [T, H, D].
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], ref_cos, ref_sin)
    assert torch.equal(apply_rotary(q, cos, sin), ref_q[0].transpose(0, 1))
    assert torch.equal(apply_rotary(k, cos, sin), ref_k[0].transpose(0, 1))
    # The model rotates q and k as one strided view of the fused qkv projection output.
    qkv = torch.cat([q.flatten(1), k.flatten(1), torch.randn(11, 64, generator=gen).to(dtype)], -1)
    qk = qkv[:, :6 * 32].view(11, 6, 32)
    assert not qk.is_contiguous()
    assert torch.equal(apply_rotary(qk, cos, sin), torch.cat([ref_q[0], ref_k[0]]).transpose(0, 1))


# ---------------------------------------------------------------------- tensor-parallel shards
def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tp_size", [2, 4])
def test_column_parallel_shards_concatenate_to_full(tp_size: int) -> None:
    w, b, x = _rand(24, 10, seed=0), _rand(24, seed=1), _rand(5, 10, seed=2)
    outs = []
    for rank in range(tp_size):
        layer = ColumnParallelLinear(10, 24, bias=True, tp_rank=rank, tp_size=tp_size)
        layer.weight_loader(layer.weight, w)
        layer.weight_loader(layer.bias, b)
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, -1), torch.nn.functional.linear(x, w, b))


def test_merged_column_parallel_shards() -> None:
    gate, up, x = _rand(12, 8, seed=0), _rand(12, 8, seed=1), _rand(3, 8, seed=2)
    full = MergedColumnParallelLinear(8, [12, 12])
    full.weight_loader(full.weight, gate, 0)
    full.weight_loader(full.weight, up, 1)
    torch.testing.assert_close(full(x), torch.cat([x @ gate.T, x @ up.T], -1))
    gates, ups = [], []
    for rank in range(2):
        layer = MergedColumnParallelLinear(8, [12, 12], tp_rank=rank, tp_size=2)
        layer.weight_loader(layer.weight, torch.cat([gate, up]))  # an already-fused checkpoint
        g, u = layer(x).chunk(2, -1)
        gates.append(g), ups.append(u)
    torch.testing.assert_close(torch.cat(gates, -1), x @ gate.T)
    torch.testing.assert_close(torch.cat(ups, -1), x @ up.T)


@pytest.mark.parametrize(("num_kv_heads", "tp_size"), [(4, 2), (2, 2), (1, 2), (2, 4)])
def test_qkv_parallel_shards(num_kv_heads: int, tp_size: int) -> None:
    """Query heads split across ranks; KV heads split too, or replicated when fewer than ranks."""
    hd, nh, hidden = 4, 8, 16
    wq, wk, wv = _rand(nh * hd, hidden, seed=0), _rand(num_kv_heads * hd, hidden, seed=1), \
        _rand(num_kv_heads * hd, hidden, seed=2)
    bq, bk, bv = _rand(nh * hd, seed=3), _rand(num_kv_heads * hd, seed=4), _rand(num_kv_heads * hd, seed=5)
    x = _rand(3, hidden, seed=6)
    q_ref, k_ref, v_ref = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    qs, ks, vs = [], [], []
    for rank in range(tp_size):
        layer = QKVParallelLinear(hidden, hd, nh, num_kv_heads, bias=True, tp_rank=rank, tp_size=tp_size)
        for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            layer.weight_loader(layer.weight, w, sid)
            layer.weight_loader(layer.bias, b, sid)
        q, k, v = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], -1)
        qs.append(q), ks.append(k), vs.append(v)
        kv_head = rank * num_kv_heads // tp_size if num_kv_heads < tp_size else None
        if kv_head is not None:  # replicated: this rank holds exactly KV head kv_head
            torch.testing.assert_close(k, k_ref[:, kv_head * hd:(kv_head + 1) * hd])
    torch.testing.assert_close(torch.cat(qs, -1), q_ref)
    if num_kv_heads >= tp_size:
        torch.testing.assert_close(torch.cat(ks, -1), k_ref)
        torch.testing.assert_close(torch.cat(vs, -1), v_ref)


def test_row_parallel_shards_sum_to_full_with_bias_once() -> None:
    w, b, x = _rand(6, 20, seed=0), _rand(6, seed=1), _rand(4, 20, seed=2)
    total = torch.zeros(4, 6)
    for rank, xs in enumerate(x.chunk(2, -1)):
        layer = RowParallelLinear(20, 6, bias=True, reduce_results=False, tp_rank=rank, tp_size=2)
        layer.weight_loader(layer.weight, w)
        layer.weight_loader(layer.bias, b)
        total += layer(xs)
    torch.testing.assert_close(total, torch.nn.functional.linear(x, w, b))


def test_vocab_parallel_embedding_and_lm_head_shards() -> None:
    vocab, dim = 257, 8  # not divisible by tp_size: the last shard is padded
    table, ids, hidden = _rand(vocab, dim, seed=0), torch.tensor([0, 128, 129, 256, 5]), _rand(3, dim, seed=1)
    emb_sum, logits = torch.zeros(5, dim), []
    for rank in range(2):
        emb = VocabParallelEmbedding(vocab, dim, reduce_results=False, tp_rank=rank, tp_size=2)
        emb.weight_loader(emb.weight, table)
        emb_sum += emb(ids)
        head = ParallelLMHead(vocab, dim, gather_output=False, tp_rank=rank, tp_size=2)
        head.weight_loader(head.weight, table)
        logits.append(head(hidden))
    torch.testing.assert_close(emb_sum, table[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], hidden @ table.T)


def _tp_worker(rank: int, world: int, rdzv: str, model_dir: str, ids: list[int], out_dir: str) -> None:
    """One tensor-parallel rank: its shard of the model, its share of the KV heads."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = ModelArchConfig.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))
        model = build_model(cfg, torch.float32, "cpu", tp_rank=rank, tp_size=world)
        model.load_weights(iter_safetensors(sorted(Path(model_dir).glob("*.safetensors"))))
        h = _harness(model)
        logits = torch.cat([h.step([("s", ids[:25])])[0], h.step([("s", ids[25:26])])[0], h.step([("s", ids[26:])])[0]])
        torch.save(logits, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2_bias_tied_windowed", "llama_mqa_bias_linear_rope",
                                  "phi3_fused_partial_longrope", "olmo2_post_norms_qk_norm", "granite_multipliers",
                                  "gemma2_softcap_windowed", "gemma3_qknorm_local_rope"])
def test_tensor_parallel_model_matches_single_rank(build_family: Callable[[str], Family], name: str,
                                                   tmp_path: Path) -> None:
    """The whole model sharded over 2 processes (gloo all-reduce/all-gather): every rank's
    logits equal HF's.  The MQA cases (Llama, Granite) replicate their single KV head on both
    ranks; Phi-3 splits its fused checkpoint tensors; OLMo 2's q/k norms sum squares across ranks."""
    fam = build_family(name)
    ids = _ids(9)
    torch.multiprocessing.spawn(_tp_worker, args=(2, str(tmp_path / "rdzv"), str(fam.path), ids, str(tmp_path)),
                                nprocs=2, join=True)
    ref = _hf_logits(fam.hf, ids)
    for rank in range(2):
        _assert_logits_match(torch.load(tmp_path / f"rank{rank}.pt"), ref)


def test_parallel_layers_validate_shapes_and_sizes() -> None:
    with pytest.raises(ValueError, match="not divisible by tp_size"):
        ColumnParallelLinear(8, 10, tp_size=4)
    with pytest.raises(ValueError, match="tp_rank"):
        RowParallelLinear(8, 8, tp_rank=2, tp_size=2)
    layer = QKVParallelLinear(16, 4, 4, 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight_loader(layer.weight, torch.randn(16, 16), "k")
    with pytest.raises(ValueError, match="unknown shard_id"):
        layer.weight_loader(layer.weight, torch.randn(16, 16), "x")


# ---------------------------------------------------------------------- config parsing
LLAMA_4X: dict[str, Any] = {  # as transformers 4.x writes it
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "attention_bias": False,
}
LLAMA_5X: dict[str, Any] = {  # the same model as transformers 5.x writes it
    **{k: v for k, v in LLAMA_4X.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")},
    "rope_parameters": {"rope_theta": 500000.0, **LLAMA_4X["rope_scaling"]}, "dtype": "bfloat16", "head_dim": 64,
}


@pytest.mark.parametrize("d", [LLAMA_4X, LLAMA_5X], ids=["4.x", "5.x"])
def test_config_from_both_transformers_generations(d: dict[str, Any]) -> None:
    cfg = ModelArchConfig.from_hf_config(d)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (16, 32, 8, 64)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
    assert cfg.tie_word_embeddings and cfg.dtype == torch.bfloat16
    assert cfg.eos_token_ids == (128001, 128008, 128009) and cfg.bos_token_id == 128000
    assert cfg.layer_sliding_windows == [None] * 16 and cfg.uniform_sliding_window is None


def test_config_legacy_rope_type_key_and_defaults() -> None:
    d = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = ModelArchConfig.from_hf_config(d)
    assert cfg.num_kv_heads == 4  # no num_key_value_heads: multi-head attention
    assert cfg.head_dim == 16 and cfg.rope_theta == 10000.0 and cfg.rms_norm_eps == 1e-6
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.max_position_embeddings == 2048 and cfg.dtype is None and cfg.eos_token_ids == ()
    yarn = ModelArchConfig.from_hf_config({**d, "max_position_embeddings": 4096,
                                           "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}


def test_config_qwen_families() -> None:
    base = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 16, "max_window_layers": 2}
    qwen2 = ModelArchConfig.from_hf_config({**base, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.attention_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    assert qwen2.layer_sliding_windows == [None] * 4  # use_sliding_window absent: off
    on = ModelArchConfig.from_hf_config({**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True})
    assert on.layer_sliding_windows == [None, None, 16, 16]
    typed = ModelArchConfig.from_hf_config({
        **base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]})
    assert typed.layer_sliding_windows == [16, None, 16, None]
    qwen3 = ModelArchConfig.from_hf_config({**base, "model_type": "qwen3", "head_dim": 32})
    assert qwen3.architecture == "Qwen3ForCausalLM" and qwen3.qk_norm and qwen3.head_dim == 32
    assert qwen3.q_size == 128 != qwen3.hidden_size and not qwen3.attention_bias
    assert ModelArchConfig.from_hf_config({**base, "model_type": "qwen3"}).head_dim == 128  # Qwen3Config default


PHI3_MINI_128K: dict[str, Any] = {  # Phi-3-mini-128k-instruct's config.json (transformers 4.x), factors shortened
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
    "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "sliding_window": 262144, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 100 for i in range(48)],
                     "long_factor": [1.0 + i for i in range(48)]},
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 32000,
}


def test_config_phi3_longrope_partial_rotary_and_defaults() -> None:
    cfg = ModelArchConfig.from_hf_config(PHI3_MINI_128K)
    assert cfg.architecture == "Phi3ForCausalLM" and cfg.rotary_dim == cfg.head_dim == 96
    assert cfg.rope_scaling == {"rope_type": "longrope", "short_factor": PHI3_MINI_128K["rope_scaling"]["short_factor"],
                                "long_factor": PHI3_MINI_128K["rope_scaling"]["long_factor"],
                                "original_max_position_embeddings": 4096}
    assert cfg.layer_sliding_windows == [262144] * 32 and cfg.rms_norm_eps == 1e-5
    assert (cfg.kv_variant(4096), cfg.kv_variant(4097)) == (None, "longrope-long")
    _, _, scale = longrope_inv_freqs(96, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    assert scale == math.sqrt(1 + math.log(32) / math.log(4096))  # factor = 131072 / 4096
    # Phi-4-mini: a quarter of each head unrotated, tied embeddings; "su" is LongRoPE's old name,
    # and without a top-level original length Phi3Config's 4096 counts, not the rope dict's.
    mini = {**PHI3_MINI_128K, "hidden_size": 3072, "num_attention_heads": 24, "num_key_value_heads": 8,
            "partial_rotary_factor": 0.75, "tie_word_embeddings": True,
            "rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48,
                             "original_max_position_embeddings": 1024}}
    del mini["original_max_position_embeddings"], mini["rms_norm_eps"], mini["sliding_window"]
    cfg = ModelArchConfig.from_hf_config(mini)
    assert (cfg.head_dim, cfg.rotary_dim, cfg.num_kv_heads) == (128, 96, 8) and cfg.tie_word_embeddings
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "longrope"
    assert cfg.rope_scaling["original_max_position_embeddings"] == 4096
    assert cfg.layer_sliding_windows == [None] * 32 and cfg.rms_norm_eps == 1e-5  # Phi3Config defaults
    assert ModelArchConfig.from_hf_config({**mini, "rope_scaling": None}).kv_variant(10**6) is None


def test_config_olmo2_and_granite() -> None:
    base = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4}
    olmo = ModelArchConfig.from_hf_config({**base, "model_type": "olmo2", "attention_bias": True})
    assert olmo.architecture == "Olmo2ForCausalLM" and olmo.rms_norm_eps == 1e-5  # Olmo2Config's default
    assert olmo.attention_bias and olmo.o_proj_bias and not olmo.qk_norm
    granite = ModelArchConfig.from_hf_config({**base, "architectures": ["GraniteForCausalLM"],
                                              "embedding_multiplier": 12, "residual_multiplier": 0.22,
                                              "attention_multiplier": 0.0078125, "logits_scaling": 8})
    assert isinstance(granite, GraniteArchConfig) and granite.rms_norm_eps == 1e-6
    assert (granite.embedding_multiplier, granite.residual_multiplier, granite.attention_multiplier,
            granite.logits_scaling) == (12.0, 0.22, 0.0078125, 8.0)
    default = ModelArchConfig.from_hf_config({**base, "model_type": "granite"})
    assert isinstance(default, GraniteArchConfig) and default.logits_scaling == default.embedding_multiplier == 1.0
    model = build_model(granite, torch.float32, "cpu")
    assert [s.scale for s in model.attention_specs()] == [0.0078125] * 2


def test_config_mistral_windows() -> None:
    base = {"architectures": ["MistralForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1}
    cfg = ModelArchConfig.from_hf_config({**base, "sliding_window": 32})
    assert cfg.layer_sliding_windows == [32, 32, 32] and cfg.uniform_sliding_window == 32
    assert ModelArchConfig.from_hf_config({**base, "sliding_window": None}).uniform_sliding_window is None
    assert ModelArchConfig.from_hf_config(base).uniform_sliding_window == 4096  # MistralConfig default


GEMMA2_4X: dict[str, Any] = {  # as google/gemma-2-2b's config.json has it (transformers 4.x, no layer_types)
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "vocab_size": 256000, "torch_dtype": "float32", "bos_token_id": 2, "eos_token_id": [1, 107],
}
GEMMA3_4X: dict[str, Any] = {  # as google/gemma-3-1b-it's config.json has it (rope_scaling as the 4b's text part)
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
    "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_theta": 1000000,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 512, "sliding_window_pattern": 6,
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "vocab_size": 262144, "torch_dtype": "bfloat16",
}


def test_config_gemma2() -> None:
    cfg = ModelArchConfig.from_hf_config(GEMMA2_4X)
    assert cfg.architecture == "Gemma2ForCausalLM" and cfg.head_dim == 256 and cfg.num_kv_heads == 4
    assert cfg.layer_sliding_windows == [4096, None] * 13  # even layers slide
    assert cfg.uniform_sliding_window is None
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)  # type: ignore[attr-defined]
    assert cfg.softmax_scale == 1 / 16 and cfg.tie_word_embeddings  # type: ignore[attr-defined]
    assert cfg.eos_token_ids == (1, 107) and cfg.local_rope_theta is None  # type: ignore[attr-defined]
    # Gemma2Config's defaults: soft-capping on unless a key says null; typed layers as given.
    bare = {k: v for k, v in GEMMA2_4X.items() if not k.endswith("softcapping") and k != "head_dim"}
    bare["layer_types"] = ["full_attention", "sliding_attention"] * 13
    cfg = ModelArchConfig.from_hf_config(bare)
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)  # type: ignore[attr-defined]
    assert cfg.layer_sliding_windows == [None, 4096] * 13 and cfg.head_dim == 256
    off = ModelArchConfig.from_hf_config({**GEMMA2_4X, "attn_logit_softcapping": None, "sliding_window": None})
    assert off.attn_logit_softcapping is None and off.uniform_sliding_window is None  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="attn_logit_softcapping must be a positive number or null"):
        ModelArchConfig.from_hf_config({**GEMMA2_4X, "attn_logit_softcapping": -1.0})


def test_config_gemma3_both_transformers_generations() -> None:
    cfg = ModelArchConfig.from_hf_config(GEMMA3_4X)
    assert cfg.qk_norm and cfg.rope_theta == 1e6 and cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert (cfg.local_rope_theta, cfg.local_rope_scaling) == (10000.0, None)  # type: ignore[attr-defined]
    assert cfg.layer_sliding_windows == [None if i % 6 == 5 else 512 for i in range(26)]
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None  # type: ignore[attr-defined]
    assert cfg.tie_word_embeddings and cfg.dtype == torch.bfloat16
    v5 = {k: v for k, v in GEMMA3_4X.items() if k not in ("rope_theta", "rope_scaling", "rope_local_base_freq",
                                                           "sliding_window_pattern", "architectures")}
    v5["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    v5["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(26)]
    assert ModelArchConfig.from_hf_config(v5) == cfg  # by model_type, from transformers 5.x's layout
    bare = ModelArchConfig.from_hf_config({k: v for k, v in v5.items() if k != "rope_parameters"})
    assert (bare.rope_theta, bare.rope_scaling, bare.local_rope_theta) == (1e6, None, 1e4)  # type: ignore[attr-defined]
    capped = ModelArchConfig.from_hf_config({**GEMMA3_4X, "final_logit_softcapping": 20.0})
    assert capped.final_logit_softcapping == 20.0  # type: ignore[attr-defined]


def test_gemma3_caps_as_transformers_applies_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Gemma 3 soft-caps its final logits when the config says so, but (as transformers does)
    never its attention logits, whatever ``attn_logit_softcapping`` says."""
    cfg = transformers.Gemma3TextConfig(**COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                                        sliding_window=6, attn_logit_softcapping=0.5, final_logit_softcapping=2.0)
    # Eager attention: transformers' reference code path (its SDPA path drops Gemma 2's soft-capping).
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    _randomize(hf, seed=21)
    hf.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        ours, _ = load_model(tmp_path, torch.float32, "cpu")
    assert "attn_logit_softcapping=0.5 is ignored" in caplog.text
    assert [s.logit_softcap for s in ours.attention_specs()] == [None, None]
    ids = _ids(22)
    ref = _hf_logits(hf, ids)
    _assert_logits_match(_harness(ours).step([("s", ids)])[0], ref)
    assert ref.abs().max() < 2.0  # the final cap did apply


@pytest.mark.parametrize(("patch", "match"), [
    ({"hidden_activation": "relu"}, r"hidden_activation 'relu' is not supported"),
    ({"use_bidirectional_attention": True}, r"use_bidirectional_attention"),
    ({"query_pre_attn_scalar": 0}, r"query_pre_attn_scalar"),
    ({"final_logit_softcapping": -1.0}, r"final_logit_softcapping"),
    ({"layer_types": ["sliding_attention"]}, r"layer_types has 1 entries"),
    ({"rope_parameters": {"full_attention": {"rope_type": "longrope", "factor": 2.0}}}, r"longrope"),
])
def test_config_gemma_errors_name_the_problem(patch: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelArchConfig.from_hf_config({**GEMMA3_4X, **patch})


@pytest.mark.parametrize(("patch", "match"), [
    ({"architectures": ["GPT2LMHeadModel"]}, r"unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"),
    ({"architectures": None, "model_type": None}, r"missing required key 'architectures'"),
    ({"hidden_size": None}, r"missing required key 'hidden_size'"),
    ({"num_key_value_heads": 3}, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    ({"rope_scaling": {"rope_type": "su", "factor": 2.0}}, r"unsupported rope_type 'su'"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, r"'longrope' is not supported for LlamaForCausalLM"),
    ({"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"rope_type": "longrope", "factor": 2.0}},
     r"missing required key 'short_factor'"),
    ({"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                             "long_factor": [2.0] * 7}},
     r"long_factor must be a list of 8 positive"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"missing required key 'low_freq_factor'"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor 0.5 is not supported by LlamaForCausalLM"),
    ({"architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.1}, r"rotary size of 1 for head_dim 16"),
    ({"architectures": ["GraniteForCausalLM"], "logits_scaling": 0}, r"logits_scaling must be a positive number"),
    ({"torch_dtype": "int8"}, r"dtype 'int8'"),
])
def test_config_errors_name_the_problem(patch: dict[str, Any], match: str) -> None:
    d = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, **patch}
    with pytest.raises(ValueError, match=match):
        ModelArchConfig.from_hf_config(d)


def test_config_validates_on_construction() -> None:
    kw: dict[str, Any] = dict(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=8,
                              num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4)
    assert ModelArchConfig(**kw).layer_sliding_windows == [None, None]
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        ModelArchConfig(**{**kw, "vocab_size": 0})
    with pytest.raises(ValueError, match="layer_sliding_windows has 1 entries"):
        ModelArchConfig(**kw, layer_sliding_windows=[4])
    with pytest.raises(ValueError, match="head_dim must be even"):
        ModelArchConfig(**{**kw, "head_dim": 5})


# ---------------------------------------------------------------------- the default model
def test_default_model_greedy_says_paris(default_model: tuple[Any, Any, Any]) -> None:
    model, source, tok = default_model
    prompt = tok("The capital of France is")["input_ids"]
    out = _harness(model).greedy(prompt, max_new_tokens=3, stop_ids=source.eos_token_ids)
    assert tok.decode(out).startswith(" Paris.")


@pytest.mark.slow
def test_default_model_logits_match_hf_gguf(default_model: tuple[Any, Any, Any], default_model_hf: Any) -> None:
    """Our conversion (dequantize, rename, undo the q/k permutation) + model vs transformers
    reading the same GGUF."""
    model, _, tok = default_model
    text = tok.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    h = _harness(model)
    got = torch.cat([h.step([("s", ids[:20])])[0], h.step([("s", ids[20:])])[0]])
    _assert_logits_match(got, _hf_logits(default_model_hf, ids))
