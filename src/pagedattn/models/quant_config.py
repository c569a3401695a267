"""Weight-only int4 quantization (W4A16): what a checkpoint's ``quantization_config`` says.

Two checkpoint formats load, both 4-bit with a scale and an integer zero point per group of
``group_size`` input features of every output feature (:mod:`.quant_formats` has their tensor
layouts):

* **AWQ** (AutoAWQ, ``quant_method: "awq"``, ``version: "gemm"``, ``zero_point: true``);
* **GPTQ** (AutoGPTQ / GPTQModel, ``quant_method: "gptq"``): symmetric or asymmetric,
  ``desc_act`` (act-order: a per-input-feature group index ``g_idx``), and the zero-point
  convention of ``checkpoint_format`` (``"gptq"``, v1: the stored zero is one less than the
  real one, as AutoGPTQ packs it; ``"gptq_v2"``: stored as is).
* **compressed-tensors** ``pack-quantized`` W4A16 (llm-compressor, ``quant_method:
  "compressed-tensors"``): one config group of int4 weights for every ``Linear`` (the LM head
  may be ignored), group or channel strategy, symmetric or not, ``actorder: "group"`` (a
  ``weight_g_idx``); no activation quantization.

Anything else in ``quantization_config`` (another method, other bit widths, AWQ without zero
points or in the GEMV layout, per-module overrides) is refused here, when the config is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

QUANT_METHODS = ("awq", "gptq", "compressed-tensors")
GROUP_SIZES = (32, 64, 128, 256, -1)  # -1: one group over all input features (per channel)
_GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's int4 weight quantization, checked."""

    method: str  # "awq", "gptq" or "compressed-tensors": the checkpoint's tensor layout
    group_size: int  # input features per scale/zero group; -1: all of them
    desc_act: bool = False  # act-order: rows belong to groups as g_idx says
    sym: bool = False  # symmetric (zero point 8); GPTQ stores its zeros anyway, compressed-tensors none
    zero_offset: int = 0  # added to every stored zero point (1 for GPTQ v1 checkpoints)
    bits: int = 4
    scale_dtype: torch.dtype = torch.float16  # what scales and zero points are held in (the checkpoint's dtype)

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"quantization method {self.method!r} is not supported; supported: "
                             f"{', '.join(QUANT_METHODS)}")
        if self.bits != 4:
            raise ValueError(f"{self.method} with bits={self.bits} is not supported (only 4-bit weights)")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"{self.method} group_size {self.group_size!r} is not supported; "
                             f"supported: {', '.join(map(str, GROUP_SIZES))}")

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
    if fmt != "pack-quantized":
        raise ValueError(f"{what}: format {fmt!r} is not supported (only 'pack-quantized' int4 weights)")
    if group.get("targets") != ["Linear"]:
        raise ValueError(f"{what}: targets {group.get('targets')!r} are not supported (only ['Linear'])")
    if group.get("input_activations") or group.get("output_activations"):
        raise ValueError(f"{what}: activation quantization is not supported (weight-only int4)")
    ignored = d.get("ignore") or []
    if any("lm_head" not in str(m) for m in ignored):
        raise ValueError(f"{what}: ignore {ignored!r} is not supported (every linear layer of the decoder must be "
                         "quantized)")
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


def _int(d: Mapping[str, Any], key: str, default: int) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"quantization_config {key} must be an integer, got {v!r}")
    return v
