"""Gemma 3 (text only, ``Gemma3ForCausalLM``): Gemma 2's decoder with a per-head Gemma RMSNorm of
q and k before rotary, two rotary tables (``rope_local_base_freq``, 10 000 by default, for the
sliding-window layers; ``rope_theta``, 1 000 000 by default, with ``rope_scaling`` for the
global ones), five sliding layers to one global when the config has no ``layer_types``, and no
final-logit soft-capping unless the config sets it.  Attention-logit soft-capping is never
applied: transformers' Gemma 3 reads ``attn_logit_softcapping`` but attends without it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from .config import ModelArchConfig, parse_rope
from .gemma2 import Gemma2ForCausalLM, GemmaArchConfig

logger = logging.getLogger(__name__)

# Gemma3TextConfig's default bases: global and local.
_GLOBAL_THETA = 1_000_000.0
_LOCAL_THETA = 10_000.0


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    model_type = "gemma3_text"
    default_max_position = 131_072
    default_attn_softcap = None
    default_final_softcap = None
    default_sliding_pattern = 6

    @classmethod
    def config_from_hf(cls, d: Mapping[str, Any]) -> ModelArchConfig:
        # The shared parser reads the global rotary table; the local one is a field of Gemma's.
        full, local = _rope_views(d)
        cfg = super().config_from_hf({**d, "rope_parameters": full, "rope_scaling": None})
        assert isinstance(cfg, GemmaArchConfig)
        theta, scaling = parse_rope({"rope_parameters": local}, cfg.max_position_embeddings)
        return dataclasses.replace(cfg, local_rope_theta=theta, local_rope_scaling=scaling)

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        fields = {**super().config_fields(d, num_layers), "qk_norm": True}
        if fields["attn_logit_softcapping"] is not None:
            # transformers' Gemma 3 reads the key but never passes it to its attention.
            logger.warning("attn_logit_softcapping=%s is ignored: Gemma 3 attends without it (as transformers does)",
                           fields["attn_logit_softcapping"])
            fields["attn_logit_softcapping"] = None
        return fields


def _rope_views(d: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The global and the local layers' RoPE parameters (each with its ``rope_theta``): from
    transformers 5.x's per-layer-type ``rope_parameters``, or from 4.x's ``rope_theta`` and
    ``rope_scaling`` (global) and ``rope_local_base_freq`` (local)."""
    params = d.get("rope_parameters")
    if isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = dict(params or d.get("rope_scaling") or {})
        local = {}
    full.setdefault("rope_theta", d.get("rope_theta", _GLOBAL_THETA))
    local.setdefault("rope_theta", d.get("rope_local_base_freq", _LOCAL_THETA))
    return full, local
