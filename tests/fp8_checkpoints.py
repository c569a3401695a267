"""FP8 checkpoints made in the tests, in each tool's own layout, with their dequantized twins.

The quantizers here follow the tools' code and share nothing with the loader's:

* llm-compressor (compressed-tensors ``float-quantized``): the observer's absolute maximum over
  the tensor (``strategy: tensor``, ``weight_scale [1]``), over each output row (``channel``,
  ``[N, 1]``) or over each ``block_structure`` block (``block``, ``[ceil(N/bn), ceil(K/bk)]``),
  scale ``amax / 448``, the weight divided by it, clamped and cast to e4m3; a static activation
  scheme adds ``input_scale [1]``; scales are stored in the model's dtype;
* fbgemm's ``quantize_fp8_per_row`` (transformers' ``fbgemm_fp8``): one float32 scale per
  output row, ``weight_scale [N, 1]``;
* transformers' FineGrainedFP8 (``fp8``, DeepSeek-V3's layout): ``weight_scale_inv`` float32 over
  ``weight_block_size`` blocks (the last block of a dimension may be partial), or a scalar
  without blocks; a static activation scheme adds a scalar ``activation_scale``.

Every checkpoint comes with its dequantization ``q * s`` in float32, written as a dense
checkpoint of the same model: the oracle the FP8 model must equal on the CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from .quant_checkpoints import LINEARS, random_tiny_llama

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


@dataclass(frozen=True)
class Fp8Fmt:
    """One FP8 checkpoint flavour."""

    method: str  # "ct" (compressed-tensors float-quantized) | "fbgemm" | "fp8" (FineGrainedFP8)
    strategy: str  # "tensor" | "channel" | "block"
    block: tuple[int, int] | None = None
    static: bool = False  # static activation scales in the checkpoint

    @property
    def id(self) -> str:
        parts = [self.method, self.strategy] + ([f"{self.block[0]}x{self.block[1]}"] if self.block else [])
        return "-".join(parts + (["static"] if self.static else []))

    def config(self) -> dict:
        if self.method == "fbgemm":
            return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
        if self.method == "fp8":
            return {"quant_method": "fp8", "activation_scheme": "static" if self.static else "dynamic",
                    "weight_block_size": list(self.block) if self.block else None, "modules_to_not_convert": None}
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": self.strategy,
                   "group_size": None, "observer": "minmax",
                   "block_structure": list(self.block) if self.block else None}
        if self.static:
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor",
                    "observer": "minmax"}
        else:
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                    "strategy": "group" if self.block else "token", "group_size": self.block[1] if self.block else None,
                    "observer": None}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                              "output_activations": None, "format": "float-quantized"}},
                "ignore": ["lm_head"], "kv_cache_scheme": None}


def _cast(w: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    return torch.clamp(w / scale_full, -E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize(w: torch.Tensor, fmt: Fp8Fmt, act_amax: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``w [N, K]`` float32 -> (checkpoint tensors by suffix, dequantized ``[N, K]`` float32)."""
    n, k = w.shape
    if fmt.strategy == "tensor":
        scale = (w.abs().max() / E4M3_MAX).reshape(1)
        if fmt.method == "ct":
            scale = scale.to(torch.bfloat16)  # llm-compressor keeps the model's dtype
        full = scale.float().expand(n, k)
    elif fmt.strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
        full = scale.expand(n, k)
    else:
        assert fmt.block is not None
        bn, bk = fmt.block
        scale = torch.empty(math.ceil(n / bn), math.ceil(k / bk))
        full = torch.empty(n, k)
        for i in range(scale.shape[0]):  # block by block, the last ones partial
            for j in range(scale.shape[1]):
                blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
                scale[i, j] = blk.abs().max() / E4M3_MAX
                full[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = scale[i, j]
    q = _cast(w, full)
    deq = q.float() * full.float()
    name = "weight_scale_inv" if fmt.method == "fp8" else "weight_scale"
    tensors = {"weight": q, name: scale.reshape(()) if fmt.method == "fp8" and fmt.strategy == "tensor" else scale}
    if fmt.static:
        act = torch.tensor(act_amax / E4M3_MAX)
        tensors["input_scale" if fmt.method == "ct" else "activation_scale"] = act.reshape(1) if fmt.method == "ct" \
            else act
    return tensors, deq


def make_fp8_model(root: Path, fmt: Fp8Fmt, seed: int = 0) -> tuple[Path, Path, transformers.PreTrainedModel]:
    """A tiny random Llama saved as a ``fmt`` checkpoint and as its dequantized dense twin; the
    HF model holds the dequantized weights."""
    cfg, hf, _ = random_tiny_llama(seed)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in range(cfg.num_hidden_layers):
            for proj in LINEARS:
                mod = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                linear = hf.get_submodule(f"model.layers.{layer}.{mod}.{proj}")
                # Each projection its own scales (q, k and v differ), as the tools quantize them.
                qz, deq = quantize(linear.weight.data, fmt, act_amax=4.0)
                linear.weight.copy_(deq)
                tensors.update({f"model.layers.{layer}.{mod}.{proj}.{kind}": t for kind, t in qz.items()})
    dense = {name: t.contiguous() for name, t in hf.state_dict().items()}
    tensors.update({name: t for name, t in dense.items() if not any(f".{p}." in name for p in LINEARS)})
    out, ref = root / fmt.id, root / f"{fmt.id}-dequantized"
    config = cfg.to_dict()
    config["torch_dtype"] = "float32"
    for folder, weights, quant in ((out, tensors, fmt.config()), (ref, dense, None)):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**config, **({"quantization_config": quant} if quant else {})}))
    return out, ref, hf
