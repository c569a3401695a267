"""Int4 checkpoints made in the tests, packed as the quantization tools pack them.

The quantizers and packers here are written after the tools' own code, loops included, and
share nothing with the loader's (vectorised) unpacking, so they are an independent oracle:

* AutoAWQ: ``AwqQuantizer.pseudo_quantize_tensor`` (asymmetric, ``zero_point=True``) and
  ``WQLinear_GEMM.from_linear`` (``qweight [in, out/8]`` and ``qzeros`` packed along the output
  features in the order ``[0, 2, 4, 6, 1, 3, 5, 7]``);
* AutoGPTQ / GPTQModel: ``Quantizer.find_params`` (the range always holds 0; symmetric: zero
  ``(maxq + 1) / 2``), act-order's ``g_idx`` (groups assigned along a permutation of the input
  features), and ``QuantLinear.pack`` (``qweight [in/8, out]`` packed along the input features,
  ``qzeros`` along the output features, each zero stored minus one in v1 checkpoints);
* compressed-tensors (llm-compressor's W4A16): ``quantize`` on the signed int4 grid
  (symmetric: zero point 0, scale ``max |w| / 7.5``) and ``pack_to_int32`` (values plus 8,
  ``weight_packed [out, in/8]`` along the input features, ``weight_zero_point`` along the
  output features).

A quantized layer is returned with its reference dequantization ``W [out, in]``
(``(q - z) * s`` in float32 from the very integers and the float16 scales that were packed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Sizes whose input features are multiples of 128, so every group size divides them.
TINY_LLAMA = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.25, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


@dataclass(frozen=True)
class Fmt:
    """One checkpoint flavour."""

    method: str  # "awq" | "gptq" | "ct" (compressed-tensors pack-quantized)
    group_size: int = 128
    sym: bool = False
    desc_act: bool = False
    v2: bool = False  # GPTQ checkpoint_format gptq_v2 (zeros stored as they are)

    @property
    def id(self) -> str:
        parts = [self.method, f"g{self.group_size}"]
        if self.method != "awq":
            parts += ["sym" if self.sym else "asym"] + (["act"] if self.desc_act else []) + (["v2"] if self.v2 else [])
        return "-".join(parts)

    def config(self) -> dict:
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "zero_point": True,
                    "version": "gemm", "modules_to_not_convert": None}
        if self.method == "ct":
            channel = self.group_size == -1
            weights = {"num_bits": 4, "type": "int", "symmetric": self.sym, "dynamic": False,
                       "strategy": "channel" if channel else "group",
                       "group_size": None if channel else self.group_size,
                       "actorder": "group" if self.desc_act else None, "observer": "minmax"}
            return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                    "quantization_status": "compressed",
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                                  "output_activations": None, "format": "pack-quantized"}},
                    "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}
        return {"quant_method": "gptq", "bits": 4, "group_size": self.group_size, "sym": self.sym,
                "desc_act": self.desc_act, "checkpoint_format": "gptq_v2" if self.v2 else "gptq",
                "damp_percent": 0.01, "true_sequential": True}


@dataclass
class Quantized:
    tensors: dict[str, torch.Tensor]  # checkpoint suffix -> tensor (qweight, qzeros, scales[, g_idx])
    dequantized: torch.Tensor  # W [out, in], float32


# ---------------------------------------------------------------------- AWQ
def awq_quantize(w: torch.Tensor, group_size: int) -> Quantized:
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    g = w.float().reshape(-1, gs)
    max_val, min_val = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
    scales = ((max_val - min_val).clamp(min=1e-5) / 15).half()
    zeros = (-torch.round(min_val / scales.float())).clamp_(0, 15)
    q = torch.clamp(torch.round(g / scales.float()) + zeros, 0, 15)
    deq = ((q - zeros) * scales.float()).reshape(out_f, in_f)
    intweight = q.reshape(out_f, in_f).t().contiguous().to(torch.int32)  # [in, out]
    zeros_t = zeros.reshape(out_f, -1).t().contiguous().to(torch.int32)  # [groups, out]
    return Quantized({"qweight": _awq_pack(intweight), "qzeros": _awq_pack(zeros_t),
                      "scales": scales.reshape(out_f, -1).t().contiguous()}, deq)


def _awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """``WQLinear_GEMM.from_linear``'s loop."""
    packed = torch.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    return packed


# ---------------------------------------------------------------------- GPTQ
def gptq_quantize(w: torch.Tensor, fmt: Fmt, act_order: torch.Tensor | None = None) -> Quantized:
    """Round-to-nearest on GPTQ's grid (the packing is what matters here, not the error
    feedback).  ``act_order``: the permutation act-order quantizes the input features in."""
    out_f, in_f = w.shape
    gs = in_f if fmt.group_size == -1 else fmt.group_size
    order = torch.arange(in_f) if act_order is None else act_order
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[order] = torch.arange(in_f, dtype=torch.int32) // gs
    groups = in_f // gs
    # Group gi holds the input features order[gi*gs:(gi+1)*gs] (all of them in one go here).
    x = w[:, order].float().reshape(out_f, groups, gs)
    xmin = x.amin(dim=2).clamp(max=0)
    xmax = x.amax(dim=2).clamp(min=0)
    if fmt.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both0, -1.0, xmin), torch.where(both0, 1.0, xmax)
    s = ((xmax - xmin) / 15).half()  # [out, groups]
    z = torch.full_like(xmin, 8.0) if fmt.sym else torch.round(-xmin / s.float())
    q_ordered = torch.clamp(torch.round(x / s.float()[:, :, None]) + z[:, :, None], 0, 15).reshape(out_f, in_f)
    q = torch.empty(in_f, out_f, dtype=torch.int32)
    q[order] = q_ordered.t().to(torch.int32)
    scales, zeros = s.t().contiguous(), z.t().to(torch.int32).contiguous()
    deq = ((q - zeros[g_idx.long()]).float() * scales.float()[g_idx.long()]).t().contiguous()
    stored = zeros if fmt.v2 else zeros - 1
    assert int(stored.min()) >= 0, "a zero point of 0 cannot be stored in a v1 checkpoint"
    return Quantized({"qweight": _gptq_pack_rows(q), "qzeros": _gptq_pack_zeros(stored), "scales": scales,
                      "g_idx": g_idx}, deq)


def _gptq_pack_rows(intweight: torch.Tensor) -> torch.Tensor:
    """``QuantLinear.pack``'s loop over rows (uint32 in numpy there; the same bits)."""
    qweight = torch.zeros((intweight.shape[0] // 8, intweight.shape[1]), dtype=torch.int32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 8
        row += 1
    return qweight


def _gptq_pack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    qzeros = torch.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=torch.int32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 8):
            qzeros[:, col] |= zeros[:, j] << (4 * (j - i))
        i += 8
        col += 1
    return qzeros


# ---------------------------------------------------------------------- compressed-tensors
def ct_quantize(w: torch.Tensor, fmt: Fmt, act_order: torch.Tensor | None = None) -> Quantized:
    out_f, in_f = w.shape
    gs = in_f if fmt.group_size == -1 else fmt.group_size
    order = torch.arange(in_f) if act_order is None else act_order
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[order] = torch.arange(in_f, dtype=torch.int32) // gs
    groups = in_f // gs
    x = w[:, order].float().reshape(out_f, groups, gs)
    lo, hi = x.amin(dim=2).clamp(max=0), x.amax(dim=2).clamp(min=0)
    if fmt.sym:
        s = (torch.maximum(lo.abs(), hi) / 7.5).half()
        zp = torch.zeros_like(lo)
    else:
        s = ((hi - lo) / 15).half()
        zp = torch.clamp(torch.round(-8 - lo / s.float()), -8, 7)
    q_ordered = torch.clamp(torch.round(x / s.float()[:, :, None]) + zp[:, :, None], -8, 7).reshape(out_f, in_f)
    q = torch.empty(out_f, in_f)
    q[:, order] = q_ordered  # signed, [out, in]
    gl = g_idx.long()
    deq = (q - zp[:, gl]) * s.float()[:, gl]
    tensors = {"weight_packed": _ct_pack(q.to(torch.int8), dim=1), "weight_scale": s,
               "weight_shape": torch.tensor([out_f, in_f])}
    if not fmt.sym:
        tensors["weight_zero_point"] = _ct_pack(zp.to(torch.int8), dim=0)
    if fmt.desc_act:
        tensors["weight_g_idx"] = g_idx
    return Quantized(tensors, deq)


def _ct_pack(value: torch.Tensor, dim: int) -> torch.Tensor:
    """``pack_to_int32``: signed int4 plus 8, eight to a word along ``dim``, in order."""
    v = (value.to(torch.int32) + 8)
    if dim == 1:
        packed = torch.zeros((v.shape[0], v.shape[1] // 8), dtype=torch.int32)
        for i in range(8):
            packed |= v[:, i::8] << (4 * i)
    else:
        packed = torch.zeros((v.shape[0] // 8, v.shape[1]), dtype=torch.int32)
        for i in range(8):
            packed |= v[i::8, :] << (4 * i)
    return packed


# ---------------------------------------------------------------------- whole models
def quantize_linear(w: torch.Tensor, fmt: Fmt, act_order: torch.Tensor | None = None) -> Quantized:
    if fmt.method == "awq":
        return awq_quantize(w, fmt.group_size)
    return ct_quantize(w, fmt, act_order) if fmt.method == "ct" else gptq_quantize(w, fmt, act_order)


def random_tiny_llama(seed: int, overrides: dict | None = None
                      ) -> tuple[transformers.LlamaConfig, transformers.PreTrainedModel, torch.Generator]:
    """A tiny random fp32 Llama (seeded) with its norm weights perturbed, and the generator that
    draws the rest of its checkpoint."""
    cfg = transformers.LlamaConfig(**{**TINY_LLAMA, **(overrides or {})})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return cfg, hf, gen


def tiny_ids(seed: int, n: int) -> list[int]:
    """``n`` seeded token ids of the tiny Llama's vocabulary (none of its special ids 0-2)."""
    return torch.randint(3, TINY_LLAMA["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_quantized_model(root: Path, fmt: Fmt, seed: int = 0,
                         overrides: dict | None = None) -> tuple[Path, transformers.PreTrainedModel]:
    """A tiny random Llama saved as a ``fmt`` checkpoint, and the HF model holding its
    reference dequantization (the oracle).  With act-order, the projections of one input
    (q/k/v, gate/up) share a permutation, as they do in GPTQ (one Hessian per input)."""
    cfg, hf, gen = random_tiny_llama(seed, overrides)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in range(cfg.num_hidden_layers):
            orders: dict[str, torch.Tensor | None] = {}
            for proj in LINEARS:
                mod = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                linear = hf.get_submodule(f"model.layers.{layer}.{mod}.{proj}")
                key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(
                    proj, proj)
                if key not in orders:
                    orders[key] = torch.randperm(linear.in_features, generator=gen) if fmt.desc_act else None
                qz = quantize_linear(linear.weight.data, fmt, orders[key])
                linear.weight.copy_(qz.dequantized)
                for kind, t in qz.tensors.items():
                    tensors[f"model.layers.{layer}.{mod}.{proj}.{kind}"] = t
    for name, t in hf.state_dict().items():
        if not any(f".{p}." in name for p in LINEARS):
            tensors[name] = t.contiguous()
    out = root / fmt.id
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    config = cfg.to_dict()
    config["quantization_config"] = fmt.config()
    config["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config))
    return out, hf
