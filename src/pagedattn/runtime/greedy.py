"""Greedy choice on the device: the argmax the model runner (and the sampler) take.

It lives with the LM head, whose greedy tokens over vocabulary slices build on it.
"""

from __future__ import annotations

from ..models.layers.vocab import argmax_rows

__all__ = ["argmax_rows"]
