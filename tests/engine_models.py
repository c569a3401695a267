"""Tiny random-initialised HF models of each supported family, saved with ``save_pretrained``.

Weights are drawn with a large init range so logits are far apart: greedy decoding is then
decided by clear margins, not float-rounding ties, and token-for-token parity is meaningful.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    initializer_range=0.25,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, tuple[str, dict]] = {
    "llama3_untied_gqa": ("LlamaConfig", dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "llama_mqa_tied": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=12, tie_word_embeddings=False)),
    "qwen2_bias_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_qknorm": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    # Layer 0 dense (mlp_only_layers), layer 1 sparse: top-2 of 8 experts, not renormalised.
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=48, mlp_only_layers=[0], norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    # LongRoPE with an original length of 20: short prompts outgrow it while generating (the
    # engine computes them again, as transformers does), long ones use the long table throughout.
    "phi3_longrope": ("Phi3Config", dict(
        num_key_value_heads=2, original_max_position_embeddings=20, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [2.0, 3.0, 5.0, 9.0]})),
    "olmo2_post_norms": ("Olmo2Config", dict(num_key_value_heads=2, pad_token_id=0)),
    "granite_multipliers": ("GraniteConfig", dict(
        num_key_value_heads=2, embedding_multiplier=6.0, residual_multiplier=0.4, attention_multiplier=0.1,
        logits_scaling=3.0)),
    # A sliding layer then a global one (window 12, shorter than most sequences), soft-caps that bite.
    "gemma2_softcap": ("Gemma2Config", dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=12,
        attn_logit_softcapping=3.0, final_logit_softcapping=8.0, tie_word_embeddings=True)),
    # A global layer then a sliding one, each with its own rotary table; q/k norms.
    "gemma3_local_rope": ("Gemma3TextConfig", dict(
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=20, sliding_window=12,
        layer_types=["full_attention", "sliding_attention"], tie_word_embeddings=False,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}


def make_model_dir(root: Path, family: str, seed: int = 0) -> Path:
    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**COMMON, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # RMSNorm weights init to 1 (Gemma's to 0); perturb them so the norms are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
    out = root / family
    model.save_pretrained(out)
    return out


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The oracle: HF transformers ``generate``, greedy, one prompt at a time, no EOS stop.

    LongRoPE models generate without a cache: each step is one forward pass over the whole
    sequence, which is what Phi-3's generation means by dropping its cache when the sequence
    outgrows the original length (some transformers releases, 5.17 among them, then fed that
    forward only the newest token)."""
    # Eager attention: transformers' reference code path (its SDPA path drops Gemma 2's soft-capping).
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    rope = getattr(model.config, "rope_parameters", None) or {}
    use_cache = rope.get("rope_type") != "longrope"
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=use_cache)
        outs.append(g[0, len(p):].tolist())
    return outs
