"""Architecture description of a decoder-only causal LM, parsed from a HF ``config.json``.

``config.json`` files in the wild come from two generations of ``transformers``:

* 4.x writes ``rope_theta`` at the top level and RoPE scaling as ``rope_scaling``
  (``{"type"|"rope_type": ..., "factor": ...}``) and the weight dtype as ``torch_dtype``;
* 5.x writes one ``rope_parameters`` dict (``rope_theta``, ``rope_type``, ``factor``, ...) and
  ``dtype``.

:meth:`ModelArchConfig.from_hf_config` accepts both and applies the same defaults as the
``transformers`` config classes, so a config means the same model here as in the oracle.  What
every family reads the same way is here (:func:`parse_hf_fields`); the rest (defaults, biases,
windows, ...) is read by the family's class (``config_from_hf`` in :mod:`.base`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .quant_config import QuantConfig, parse_quant_config

_RMS_EPS_DEFAULT = 1e-6
_ROPE_THETA_DEFAULT = 10_000.0

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# Keys each scaled RoPE type needs (after defaults are applied).
_ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
# RoPE types whose pretraining length defaults to max_position_embeddings (as in transformers).
_ROPE_NEEDS_ORIGINAL_LEN = ("llama3", "yarn", "longrope")

_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclass(frozen=True)
class ModelArchConfig:
    """Everything the model code needs to know about an architecture, validated on construction."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = _RMS_EPS_DEFAULT
    rope_theta: float = _ROPE_THETA_DEFAULT
    # None for plain RoPE, else a normalised dict with "rope_type" and that type's parameters.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias
    o_proj_bias: bool = False  # the output projection carries a bias (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3)
    partial_rotary_factor: float = 1.0  # the leading fraction of each head that rotary rotates (Phi-4-mini)
    # Per layer: None (full attention) or the window (a query at p sees keys p-window+1 .. p).
    layer_sliding_windows: list[int | None] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype | None = None  # the checkpoint's dtype, if the config names one
    quant: QuantConfig | None = None  # int4 or FP8 weights (quantization_config), else None

    def __post_init__(self) -> None:
        if not self.architecture or not isinstance(self.architecture, str):
            raise ValueError(f"architecture must be a non-empty string, got {self.architecture!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.layer_sliding_windows:
            object.__setattr__(self, "layer_sliding_windows", [None] * self.num_layers)
        if len(self.layer_sliding_windows) != self.num_layers:
            raise ValueError(
                f"layer_sliding_windows has {len(self.layer_sliding_windows)} entries, expected num_layers="
                f"{self.num_layers}"
            )
        for w in self.layer_sliding_windows:
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                raise ValueError(f"layer_sliding_windows entries must be None or a positive int, got {w!r}")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2 or self.rotary_dim < 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor!r} gives a rotary size of "
                             f"{self.rotary_dim} for head_dim {self.head_dim}; it must be even and at least 2")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, self.rotary_dim)
        for t in self.eos_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"eos_token_ids must be non-negative ints, got {self.eos_token_ids!r}")
        if self.dtype is not None and not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {self.dtype}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """The leading features of each head that rotary rotates (transformers' ``int(head_dim * factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else str(self.rope_scaling["rope_type"])

    @property
    def has_kv_variants(self) -> bool:
        """Whether :meth:`kv_variant` can be other than None (else the engine never asks it)."""
        return self.rope_type == "longrope"

    def kv_variant(self, num_tokens: int) -> str | None:
        """What the K/V of a sequence of ``num_tokens`` tokens depend on besides its tokens and
        their positions (None: nothing).  LongRoPE computes every token of a sequence longer than
        ``original_max_position_embeddings`` with its long table, of a shorter one with the short
        table; a sequence that grows past that length is computed again (as transformers' Phi-3
        generation does), and the two kinds never share cached blocks."""
        if self.rope_scaling is None or not self.has_kv_variants:
            return None
        return "longrope-long" if num_tokens > self.rope_scaling["original_max_position_embeddings"] else None

    @property
    def uniform_sliding_window(self) -> int | None:
        """The window shared by *every* layer, else None.

        A KV cache may only drop blocks that fell out of the window when no layer needs them,
        i.e. when all layers slide with the same window.
        """
        windows = set(self.layer_sliding_windows)
        if len(windows) == 1:
            return next(iter(windows))
        return None

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]) -> ModelArchConfig:
        """Parse a ``config.json`` dict written by transformers 4.x or 5.x, as the family its
        ``architectures`` (or ``model_type``) names reads it."""
        from .registry import parse_hf_config  # the families, and so the registry, build on this module

        return parse_hf_config(d)


def parse_hf_fields(d: Mapping[str, Any], architecture: str, default_max_position: int,
                    default_head_dim: Callable[[Mapping[str, Any]], int], *, activation_key: str = "hidden_act",
                    activations: tuple[str, ...] = ("silu",)) -> dict[str, Any]:
    """The :class:`ModelArchConfig` fields every family reads the same way, checked, as keyword
    arguments: sizes, RoPE, norm epsilon, tied embeddings, token ids, dtype.  The family gives
    the defaults transformers' config class has for it: ``max_position_embeddings``, and the
    head size of a config without ``head_dim``; and the config key of its activation with the
    ones it computes (the first is the default)."""
    _check_hf_keys(d, activation_key, activations)
    num_heads = d["num_attention_heads"]
    max_pos = d.get("max_position_embeddings", default_max_position)
    rope_theta, rope_scaling, partial = _parse_rope(d, max_pos)
    head_dim = d.get("head_dim")
    dtype = _parse_dtype(d.get("dtype") or d.get("torch_dtype"))
    return dict(
        architecture=architecture,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=d.get("num_key_value_heads") or num_heads,
        head_dim=head_dim if head_dim is not None else default_head_dim(d),
        rms_norm_eps=float(d.get("rms_norm_eps", _RMS_EPS_DEFAULT)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        partial_rotary_factor=partial,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=parse_token_ids(d.get("eos_token_id")),
        dtype=dtype,
        quant=parse_quant_config(d.get("quantization_config"), dtype),
    )


def _check_hf_keys(d: Mapping[str, Any], activation_key: str, activations: tuple[str, ...]) -> None:
    """The required keys are there, the sizes are integers, the activation is one the family computes."""
    for key in _REQUIRED_KEYS:
        if d.get(key) is None:
            raise ValueError(f"config.json is missing required key {key!r}")
    for key in (*_REQUIRED_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{key} must be an integer, got {v!r}")
    act = d.get(activation_key, activations[0])
    if act not in activations:
        raise ValueError(f"{activation_key} {act!r} is not supported (only {' or '.join(map(repr, activations))})")


def head_dim_from_heads(d: Mapping[str, Any]) -> int:
    """``hidden_size / num_attention_heads``: the head size of a config without ``head_dim``."""
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    if hidden % heads:
        raise ValueError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) and no head_dim")
    return hidden // heads


def layer_type_windows(d: Mapping[str, Any], window: int, num_layers: int) -> list[int | None]:
    """Per layer, ``window`` or None (full attention), as ``layer_types`` names them."""
    layer_types = d["layer_types"]
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries, expected num_hidden_layers={num_layers}")
    bad = set(layer_types) - {"sliding_attention", "full_attention"}
    if bad:
        raise ValueError(f"layer_types has unsupported entries {sorted(bad)}")
    return [window if t == "sliding_attention" else None for t in layer_types]


def parse_rope(d: Mapping[str, Any], max_pos: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, normalised scaling dict or None) from either config generation (a second
    rotary table of a family, e.g. Gemma 3's local one, is read by handing it its own view)."""
    theta, scaling, _ = _parse_rope(d, max_pos)
    return theta, scaling


def _parse_rope(d: Mapping[str, Any], max_pos: int) -> tuple[float, dict[str, Any] | None, float]:
    """(rope_theta, normalised scaling dict or None, partial rotary factor) from either config
    generation.  Whether the family supports a partial rotary factor is its class's check."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_parameters/rope_scaling must be a dict, got {params!r}")
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported for this architecture")
    theta = float(params.get("rope_theta", d.get("rope_theta", _ROPE_THETA_DEFAULT)))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    partial = 1.0 if partial is None else partial
    if isinstance(partial, bool) or not isinstance(partial, (int, float)):
        raise ValueError(f"partial_rotary_factor must be a number, got {partial!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None, float(partial)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "rope_type", "partial_rotary_factor")}
    scaling["rope_type"] = rope_type
    if rope_type in _ROPE_NEEDS_ORIGINAL_LEN:
        # transformers gives a top-level original_max_position_embeddings priority (Phi-3 style),
        # else defaults it to max_position_embeddings.
        top = d.get("original_max_position_embeddings")
        if top is not None:
            scaling["original_max_position_embeddings"] = top
        scaling.setdefault("original_max_position_embeddings", max_pos)
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_pos / scaling["original_max_position_embeddings"]
    return theta, scaling, float(partial)


def _check_rope_scaling(scaling: Mapping[str, Any], rotary_dim: int) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES or rope_type == "default":
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    for key in _ROPE_REQUIRED[rope_type]:
        if scaling.get(key) is None:
            raise ValueError(f"rope scaling of type {rope_type!r} is missing required key {key!r}")
    if rope_type == "longrope":
        _check_longrope(scaling, rotary_dim)
        return
    factor = scaling["factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"rope scaling factor must be a positive number, got {factor!r}")


def _check_longrope(scaling: Mapping[str, Any], rotary_dim: int) -> None:
    """One positive rescale factor per rotary frequency in each list, as transformers' validation asks."""
    for key in ("short_factor", "long_factor"):
        v = scaling[key]
        ok = isinstance(v, Sequence) and not isinstance(v, str) and all(
            not isinstance(x, bool) and isinstance(x, (int, float)) and x > 0 for x in v)
        if not ok or len(v) != rotary_dim // 2:
            raise ValueError(f"longrope {key} must be a list of {rotary_dim // 2} positive numbers "
                             f"(one per rotary frequency), got {v!r}")
    for key in ("factor", "attention_factor"):
        v = scaling.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ValueError(f"longrope {key} must be a positive number, got {v!r}")


def parse_token_ids(v: int | Sequence[int] | None) -> tuple[int, ...]:
    """A config's ``eos_token_id`` (None, one id or a list) as a tuple of ids."""
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(v)


def _parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"config dtype {name!r} is not a torch floating dtype")
    return dt
