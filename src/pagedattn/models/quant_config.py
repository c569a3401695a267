"""Quantized checkpoints: what a checkpoint's ``quantization_config`` says.

Int4 weights (W4A16): three checkpoint formats load, all 4-bit with a scale and an integer
zero point per group of ``group_size`` input features of every output feature
(:mod:`.quant_formats` has their tensor layouts):

* **AWQ** (AutoAWQ, ``quant_method: "awq"``, ``version: "gemm"``, ``zero_point: true``);
* **GPTQ** (AutoGPTQ / GPTQModel, ``quant_method: "gptq"``): symmetric or asymmetric,
  ``desc_act`` (act-order: a per-input-feature group index ``g_idx``), and the zero-point
  convention of ``checkpoint_format`` (``"gptq"``, v1: the stored zero is one less than the
  real one, as AutoGPTQ packs it; ``"gptq_v2"``: stored as is).
* **compressed-tensors** ``pack-quantized`` W4A16 (llm-compressor, ``quant_method:
  "compressed-tensors"``): one config group of int4 weights for every ``Linear`` (the LM head
  may be ignored), group or channel strategy, symmetric or not, ``actorder: "group"`` (a
  ``weight_g_idx``); no activation quantization.

FP8 weights and activations (W8A8, ``bits == 8``): e4m3 weights with float32 scales, per
tensor, per output channel or per block of ``block_size`` (``QuantConfig.fp8_strategy``); with
per-tensor and per-channel scales the activations are quantized per token at run time, with
block scales they stay in the model's dtype (:mod:`pagedattn.kernels.fp8`):

* **compressed-tensors** ``float-quantized`` (llm-compressor's FP8 and FP8_DYNAMIC schemes):
  weights of type ``float``, 8 bits, symmetric, strategy ``tensor``, ``channel`` or ``block``;
  input activations float 8-bit, dynamic per token (or per group, with blocks) or static per
  tensor (``input_scale``, loaded and checked, but the activations are still scaled per token,
  which is never coarser);
* **fbgemm_fp8** (transformers' ``FbgemmFp8Config``): per-channel weight scales, dynamic per-token
  activations whose absolute maximum is clamped to ``activation_scale_ub``;
* **fp8** (transformers' ``FineGrainedFP8Config``): ``weight_block_size`` blocks (or none: one
  scale per tensor), activation scheme ``dynamic`` or ``static`` (``activation_scale``, checked
  and, as above, superseded by per-token scales); only float32 scales (not ``ue8m0``).

Anything else in ``quantization_config`` (another method, other bit widths, AWQ without zero
points or in the GEMV layout, per-module overrides, weight-only FP8, a quantized KV cache) is
refused here, when the config is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

QUANT_METHODS = ("awq", "gptq", "compressed-tensors", "fbgemm_fp8", "fp8")
FP8_STRATEGIES = ("tensor", "channel", "block")
GROUP_SIZES = (32, 64, 128, 256, -1)  # -1: one group over all input features (per channel)
_GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's weight quantization (int4, or FP8 with ``bits == 8``), checked."""

    method: str  # one of QUANT_METHODS: the checkpoint's tensor layout
    group_size: int  # input features per scale/zero group; -1: all of them (FP8: per-channel or per-tensor)
    desc_act: bool = False  # act-order: rows belong to groups as g_idx says
    sym: bool = False  # symmetric (zero point 8); GPTQ stores its zeros anyway, compressed-tensors none
    zero_offset: int = 0  # added to every stored zero point (1 for GPTQ v1 checkpoints)
    bits: int = 4  # 8: FP8 (with an fp8_strategy)
    scale_dtype: torch.dtype = torch.float16  # what scales and zero points are held in (the checkpoint's dtype)
    fp8_strategy: str | None = None  # FP8 weight scales: "tensor", "channel" or "block"
    block_size: tuple[int, int] | None = None  # FP8 blocks: (output features, input features) per scale
    act_amax_ub: float | None = None  # fbgemm_fp8: activations' absolute maximum clamped to this

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"quantization method {self.method!r} is not supported; supported: "
                             f"{', '.join(QUANT_METHODS)}")
        if self.fp8_strategy is not None:
            self._check_fp8()
            return
        if self.bits != 4:
            raise ValueError(f"{self.method} with bits={self.bits} is not supported (only 4-bit weights)")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"{self.method} group_size {self.group_size!r} is not supported; "
                             f"supported: {', '.join(map(str, GROUP_SIZES))}")

    def _check_fp8(self) -> None:
        if self.bits != 8:
            raise ValueError(f"{self.method} FP8 with bits={self.bits} is not supported (only 8-bit e4m3)")
        if self.fp8_strategy not in FP8_STRATEGIES:
            raise ValueError(f"{self.method} FP8 weight strategy {self.fp8_strategy!r} is not supported; supported: "
                             f"{', '.join(FP8_STRATEGIES)}")
        if (self.fp8_strategy == "block") != (self.block_size is not None):
            raise ValueError(f"{self.method} FP8: block scales need a block size, got {self.block_size!r}")
        if self.block_size is not None and (len(self.block_size) != 2 or min(self.block_size) <= 0):
            raise ValueError(f"{self.method} FP8 block size {self.block_size!r} is not two positive integers")

    @property
    def is_fp8(self) -> bool:
        """e4m3 weights with float scales, activations quantized per token (W8A8)."""
        return self.fp8_strategy is not None

    @property
    def has_g_idx(self) -> bool:
        """The checkpoint carries a group index per input feature: GPTQ always (trivial without
        act-order), compressed-tensors with group act-order."""
        return self.method == "gptq" or (self.method == "compressed-tensors" and self.desc_act)

    def groups(self, in_features: int) -> int:
        """Scale/zero groups of ``in_features`` input features (which the group size must divide)."""
        gs = self.group_size_for(in_features)
        if in_features % gs:
            raise ValueError(f"input features ({in_features}) are not a multiple of group_size ({gs})")
        return in_features // gs

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def parse_quant_config(d: Any, dtype: torch.dtype | None = None) -> QuantConfig | None:
    """``config.json``'s ``quantization_config`` (None: not quantized); ``dtype``: the
    checkpoint's (its scales' dtype, float16 when it names none)."""
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ValueError(f"quantization_config must be a dict, got {d!r}")
    method = str(d.get("quant_method", "")).lower()
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization_config quant_method {d.get('quant_method')!r} is not supported; supported: "
                         f"{', '.join(QUANT_METHODS)}")
    if method == "compressed-tensors":
        return _compressed_tensors(d, dtype)
    if method in ("fbgemm_fp8", "fp8"):
        return _hf_fp8(d, method)
    bits = _int(d, "bits" if "bits" in d else "w_bit", 4)
    group_size = _int(d, "group_size" if "group_size" in d else "q_group_size", 128)
    skipped = d.get("modules_to_not_convert")
    if skipped and any("lm_head" not in str(m) for m in skipped):
        raise ValueError(f"quantization_config modules_to_not_convert {skipped!r} is not supported "
                         "(every linear layer of the decoder must be quantized)")
    cfg = _awq(d, bits, group_size) if method == "awq" else _gptq(d, bits, group_size)
    if dtype in (torch.bfloat16, torch.float32):
        cfg = dataclasses.replace(cfg, scale_dtype=dtype)
    return cfg


def _awq(d: Mapping[str, Any], bits: int, group_size: int) -> QuantConfig:
    version = str(d.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {d.get('version')!r} is not supported (only the 'gemm' layout)")
    if not d.get("zero_point", True):
        raise ValueError("AWQ without zero points (zero_point: false) is not supported")
    return QuantConfig("awq", group_size, bits=bits)


def _gptq(d: Mapping[str, Any], bits: int, group_size: int) -> QuantConfig:
    fmt = str(d.get("checkpoint_format", "gptq")).lower()
    if fmt not in _GPTQ_FORMATS:
        raise ValueError(f"GPTQ checkpoint_format {d.get('checkpoint_format')!r} is not supported; supported: "
                         f"{', '.join(_GPTQ_FORMATS)}")
    if d.get("dynamic"):
        raise ValueError("GPTQ per-module overrides (dynamic) are not supported")
    return QuantConfig("gptq", group_size, desc_act=bool(d.get("desc_act", False)), sym=bool(d.get("sym", True)),
                       zero_offset=1 if fmt == "gptq" else 0, bits=bits)


def _compressed_tensors(d: Mapping[str, Any], dtype: torch.dtype | None) -> QuantConfig:
    """llm-compressor's W4A16: one ``pack-quantized`` group of int4 weights for every Linear."""
    what = "compressed-tensors quantization_config"
    groups = d.get("config_groups")
    if not isinstance(groups, Mapping) or len(groups) != 1:
        raise ValueError(f"{what}: exactly one config group is supported, got {groups!r}")
    (group,) = groups.values()
    fmt = group.get("format") or d.get("format")
    if fmt not in ("pack-quantized", "float-quantized"):
        raise ValueError(f"{what}: format {fmt!r} is not supported (only 'pack-quantized' int4 weights and "
                         "'float-quantized' FP8)")
    if group.get("targets") != ["Linear"]:
        raise ValueError(f"{what}: targets {group.get('targets')!r} are not supported (only ['Linear'])")
    ignored = d.get("ignore") or []
    if any("lm_head" not in str(m) for m in ignored):
        raise ValueError(f"{what}: ignore {ignored!r} is not supported (every linear layer of the decoder must be "
                         "quantized)")
    if d.get("kv_cache_scheme"):
        raise ValueError(f"{what}: kv_cache_scheme {d.get('kv_cache_scheme')!r} is not supported (the KV cache "
                         "is not quantized)")
    if fmt == "float-quantized":
        return _compressed_tensors_fp8(group)
    if group.get("input_activations") or group.get("output_activations"):
        raise ValueError(f"{what}: activation quantization is not supported with int4 weights (W4A16 only)")
    w = group.get("weights") or {}
    if w.get("type", "int") != "int" or w.get("dynamic"):
        raise ValueError(f"{what}: weights of type {w.get('type')!r} (dynamic={w.get('dynamic')}) are not supported")
    strategy = w.get("strategy")
    if strategy not in ("group", "channel"):
        raise ValueError(f"{what}: weight strategy {strategy!r} is not supported (group or channel)")
    group_size = _int(w, "group_size", 128) if strategy == "group" else -1
    actorder = w.get("actorder")
    if actorder not in (None, "group", "weight", False):
        raise ValueError(f"{what}: actorder {actorder!r} is not supported")
    bits = _int(w, "num_bits", 4)
    scale_dtype = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float16
    return QuantConfig("compressed-tensors", group_size, desc_act=actorder == "group",
                       sym=bool(w.get("symmetric", True)), bits=bits, scale_dtype=scale_dtype)


def _compressed_tensors_fp8(group: Mapping[str, Any]) -> QuantConfig:
    """llm-compressor's FP8 (W8A8): e4m3 weights, float 8-bit input activations."""
    what = "compressed-tensors float-quantized"
    w = group.get("weights") or {}
    if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("dynamic") or not w.get("symmetric", True):
        raise ValueError(f"{what}: weights {dict(w)!r} are not supported (8-bit float, static, symmetric)")
    strategy = w.get("strategy")
    block = None
    if strategy == "block":
        block = _block_size(w.get("block_structure"), f"{what} block_structure")
    elif strategy not in ("tensor", "channel"):
        raise ValueError(f"{what}: weight strategy {strategy!r} is not supported (tensor, channel or block)")
    if group.get("output_activations"):
        raise ValueError(f"{what}: output activation quantization is not supported")
    a = group.get("input_activations")
    if not a:
        raise ValueError(f"{what}: weight-only FP8 (no input_activations) is not supported (W8A8 only)")
    if a.get("type") != "float" or a.get("num_bits") != 8 or not a.get("symmetric", True):
        raise ValueError(f"{what}: input activations {dict(a)!r} are not supported (8-bit float, symmetric)")
    dynamic_ok = a.get("dynamic") is True and a.get("strategy") in ("token", "group")
    static_ok = not a.get("dynamic") and a.get("strategy") == "tensor"
    if not (dynamic_ok or static_ok):
        raise ValueError(f"{what}: input activation strategy {a.get('strategy')!r} (dynamic={a.get('dynamic')}) is "
                         "not supported (dynamic per token or group, or static per tensor)")
    return QuantConfig("compressed-tensors", -1, bits=8, scale_dtype=torch.float32, fp8_strategy=strategy,
                       block_size=block)


def _hf_fp8(d: Mapping[str, Any], method: str) -> QuantConfig:
    """transformers' ``fbgemm_fp8`` (per-channel) and ``fp8`` (FineGrainedFP8: blocks or per tensor)."""
    skipped = d.get("modules_to_not_convert")
    if skipped and any("lm_head" not in str(m) for m in skipped):
        raise ValueError(f"{method} quantization_config modules_to_not_convert {skipped!r} is not supported "
                         "(every linear layer of the decoder must be quantized)")
    if method == "fbgemm_fp8":
        ub = d.get("activation_scale_ub", 1200.0)
        if isinstance(ub, bool) or not isinstance(ub, int | float) or ub <= 0:
            raise ValueError(f"fbgemm_fp8 activation_scale_ub must be a positive number, got {ub!r}")
        return QuantConfig(method, -1, bits=8, scale_dtype=torch.float32, fp8_strategy="channel",
                           act_amax_ub=float(ub))
    scheme = str(d.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"fp8 activation_scheme {d.get('activation_scheme')!r} is not supported (dynamic or static)")
    if d.get("scale_fmt", "float") != "float":
        raise ValueError(f"fp8 scale_fmt {d.get('scale_fmt')!r} is not supported (only float32 scales)")
    if d.get("modules_to_convert") or d.get("dequantize"):
        raise ValueError("fp8 modules_to_convert and dequantize are not supported")
    raw = d.get("weight_block_size")
    block = None if raw is None else _block_size(raw, "fp8 weight_block_size")
    return QuantConfig(method, -1, bits=8, scale_dtype=torch.float32,
                       fp8_strategy="tensor" if block is None else "block", block_size=block)


def _block_size(raw: Any, what: str) -> tuple[int, int]:
    if not isinstance(raw, list | tuple) or len(raw) != 2 or \
            any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in raw):
        raise ValueError(f"{what} must be two positive integers, got {raw!r}")
    return int(raw[0]), int(raw[1])


def _int(d: Mapping[str, Any], key: str, default: int) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"quantization_config {key} must be an integer, got {v!r}")
    return v
