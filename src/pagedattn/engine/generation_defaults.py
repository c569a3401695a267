"""The model's recommended sampling values (``generation_config.json``) as request defaults.

Models are tuned for particular settings (Qwen3: temperature 0.6, top_p 0.95, top_k 20; some
a repetition_penalty) that differ from the API's defaults (temperature 1, no truncation, no
penalty).  As vLLM's ``--generation-config
auto`` does, a request that leaves such a field unset gets the model's value; one that sets it
keeps its own.  ``EngineConfig.generation_config = "none"`` turns this off.  ``do_sample`` is
ignored, as vLLM ignores it: a model's temperature is its advice for sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# generation_config.json's key -> the SamplingParams field it is the default of.
# (vLLM's set: HF's other generation options have no request field here or there.)
APPLIED = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def sampling_defaults(generation: Mapping[str, Any], mode: str = "auto") -> dict[str, Any]:
    """The SamplingParams fields the model's ``generation_config.json`` sets (none for mode "none").
    A value SamplingParams refuses is left out with a warning: a model's odd file must not make
    every request fail."""
    if mode == "none":
        return {}
    out: dict[str, Any] = {}
    for key, name in APPLIED.items():
        value = generation.get(key)
        if value is not None and _valid(name, value, key):
            out[name] = value
    return out


def _valid(name: str, value: Any, key: str) -> bool:
    try:
        SamplingParams(**{name: value})
    except ValueError as e:
        logger.warning("generation_config.json: %s=%r is not used as a default (%s)", key, value, e)
        return False
    return True


def describe(defaults: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in defaults.items())


def log_defaults(generation: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """Compute the defaults and say at start-up which apply."""
    defaults = sampling_defaults(generation, mode)
    if defaults:
        logger.info("the model's generation_config.json sets the defaults of unset sampling fields: %s "
                    "(generation_config='none' turns them off)", describe(defaults))
    return defaults
