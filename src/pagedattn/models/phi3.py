"""Phi-3 and Phi-4-mini (``Phi3ForCausalLM``): Llama's pre-norm decoder over checkpoints whose
q/k/v and gate/up projections are already fused (``qkv_proj``, ``gate_up_proj``), with a partial
rotary (``partial_rotary_factor``: Phi-4-mini rotates 3/4 of each head), LongRoPE scaling
(``longrope``: a short and a long table of rescale factors around
``original_max_position_embeddings``, see :class:`~.layers.LongRopeRotaryEmbedding`) and, when
the config sets ``sliding_window``, one window on every layer.

The fused checkpoint tensors load through the fused layers' own loaders, which split them into
their parts and keep this rank's slice of each, so tensor parallelism shards them as it shards
separate q/k/v and gate/up tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from .layers import ShardId
from .llama import LlamaForCausalLM

_ORIGINAL_MAX_POSITION = 4096  # Phi3Config.original_max_position_embeddings
_RMS_NORM_EPS = 1e-5  # Phi3Config.rms_norm_eps


class Phi3ForCausalLM(LlamaForCausalLM):
    model_type = "phi3"
    default_max_position = 4096
    supports_partial_rotary = True
    supports_longrope = True
    packed_params: ClassVar[Mapping[str, tuple[tuple[str, ShardId], ...]]] = {}  # the checkpoint is fused already

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"rms_norm_eps": float(d.get("rms_norm_eps", _RMS_NORM_EPS)),
                                  "layer_sliding_windows": [d.get("sliding_window")] * num_layers}
        return fields | phi3_rope(d)


def phi3_rope(d: Mapping[str, Any]) -> dict[str, Any]:
    """Phi3Config's reading of the RoPE keys: ``su``/``yarn`` are older names of ``longrope``, and
    the top-level ``original_max_position_embeddings`` (4096 when absent) is the one that counts."""
    params = d.get("rope_parameters") or d.get("rope_scaling")
    if not isinstance(params, Mapping):
        return {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("longrope", "su", "yarn"):
        return {}
    skip = ("rope_theta", "type", "rope_type", "partial_rotary_factor")
    scaling = {k: v for k, v in params.items() if k not in skip}
    scaling["rope_type"] = "longrope"
    scaling["original_max_position_embeddings"] = d.get("original_max_position_embeddings", _ORIGINAL_MAX_POSITION)
    return {"rope_scaling": scaling}
