"""What every decoder-only family shares: the LM head, the logits, the KV cache's shape, weight loading
and config parsing.  A family subclasses :class:`DecoderForCausalLM` in a file of its own (see
:mod:`.llama`) and says only what differs: its config defaults and fields, and its decoder layer.

Input is one flattened ragged batch: ``input_ids``/``positions`` ``[T]`` hold the new tokens of
every sequence of the step back to back, and ``ctx.meta`` tells the attention backend which
sequence each token belongs to.  There is no batch dimension and no padding.

Runtime layout differs from the checkpoint: q/k/v live in one ``qkv_proj`` and gate/up in one
``gate_up_proj`` (one matmul each).  :meth:`DecoderForCausalLM.load_weights` maps HF checkpoint
names onto those (``packed_params``) through each layer's ``weight_loader``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, cast

import torch
from torch import nn

from ..attention.backend import AttentionLayerSpec
from ..cache.kv_pool import KVCacheSpec
from .config import ModelArchConfig, head_dim_from_heads, parse_hf_fields
from .context import ForwardContext
from .layers import AllReduce, Attention, DecoderModel, ParallelLMHead, Shard, ShardId, WeightLoading, set_all_reduce

# Checkpoint entries that are not weights (buffers some exporters save).
_IGNORED_WEIGHTS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Checkpoint tensors that only a quantized checkpoint has (int4's packed weights, FP8's scales).
_QUANTIZED_SUFFIXES = ("qweight", "qzeros", "weight_packed", "weight_scale", "weight_scale_inv")
# Scales of an fp8 KV cache, vLLM's names: ``<attn>.k_scale``/``v_scale``, ModelOpt's
# ``<attn>.k_proj.k_scale``, compressed-tensors' ``<attn>.k_proj.output_scale``, and the old
# ``<attn>.kv_scale`` (one scale for both).  ``<attn>`` is the attention module's name.
_KV_SCALE = re.compile(r"^(?P<attn>.+?)\.(?:(?P<own>[kv])_scale|(?P<proj>[kv])_proj\.(?:[kv]_scale|output_scale)"
                       r"|kv_scale)$")


class DecoderForCausalLM(nn.Module):
    """A causal LM over the paged KV cache: ``model`` (a :class:`DecoderModel` of the family's
    layers) and ``lm_head`` (tied to the embedding when the config says so).  Implements
    :class:`~.interface.CausalLM`, the contract the runtime relies on.

    A family sets the class attributes and overrides :meth:`make_layer` (and, for config keys
    of its own, :meth:`config_fields`; for a stack shaped otherwise, :meth:`make_model`).  Its
    class is named after the HF architecture it serves.
    """

    model_type: ClassVar[str]  # config.json's model_type, for configs that name no architecture
    default_max_position: ClassVar[int] = 2048  # max_position_embeddings when the config omits it
    config_class: ClassVar[type[ModelArchConfig]] = ModelArchConfig  # a subclass holds a family's own knobs
    supports_partial_rotary: ClassVar[bool] = False  # transformers' modeling code honours partial_rotary_factor
    # transformers' generation for this family recomputes the cache when a sequence outgrows
    # LongRoPE's original length (Phi-3's), the behaviour the engine reproduces; other families
    # keep K/V computed with the short table, which the engine does not.
    supports_longrope: ClassVar[bool] = False
    # config.json's activation key and the activations the family computes (the first is the default).
    activation_key: ClassVar[str] = "hidden_act"
    activations: ClassVar[tuple[str, ...]] = ("silu",)
    # Runtime fused parameter -> the checkpoint projections it holds, with their shard ids.
    packed_params: ClassVar[Mapping[str, tuple[tuple[str, ShardId], ...]]] = {
        "qkv_proj": (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")),
        "gate_up_proj": (("gate_proj", 0), ("up_proj", 1)),
    }

    def __init__(self, cfg: ModelArchConfig, params_dtype: torch.dtype = torch.float32, *, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        super().__init__()
        if not params_dtype.is_floating_point:
            raise ValueError(f"params_dtype must be a floating type, got {params_dtype}")
        self.config = cfg
        self.dtype = params_dtype
        self.tp_rank, self.tp_size = tp_rank, tp_size
        shard = Shard(tp_rank, tp_size, params_dtype, cfg.quant)
        self.model = self.make_model(cfg, shard)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, **shard.kw)
        # LongRoPE picks its table by each sequence's length (see layers.decoder.forward_lengths).
        self.uses_total_lens = cfg.rope_type == "longrope"
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_model(self, cfg: ModelArchConfig, shard: Shard) -> DecoderModel:
        """The decoder stack (the layers are made as it registers them, in order)."""
        return DecoderModel(cfg, shard, (self.make_layer(cfg, i, shard) for i in range(cfg.num_layers)))

    def make_layer(self, cfg: ModelArchConfig, layer_idx: int, shard: Shard) -> nn.Module:
        """Decoder layer ``layer_idx`` (a :class:`~.layers.DecoderLayer`, or a module with its ``forward``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ config
    @classmethod
    def config_from_hf(cls, d: Mapping[str, Any]) -> ModelArchConfig:
        """This family's reading of a ``config.json`` (transformers 4.x or 5.x)."""
        fields = parse_hf_fields(d, cls.__name__, cls.default_max_position, cls.default_head_dim,
                                 activation_key=cls.activation_key, activations=cls.activations)
        if fields["partial_rotary_factor"] != 1.0 and not cls.supports_partial_rotary:
            raise ValueError(f"partial_rotary_factor {fields['partial_rotary_factor']!r} is not supported by "
                             f"{cls.__name__} (only 1.0)")
        fields.update(cls.config_fields(d, fields["num_layers"]))
        scaling = fields.get("rope_scaling")
        if scaling is not None and scaling.get("rope_type") == "longrope" and not cls.supports_longrope:
            raise ValueError(f"rope_type 'longrope' is not supported for {cls.__name__} (only for Phi3ForCausalLM)")
        return cls.config_class(**fields)

    @classmethod
    def default_head_dim(cls, d: Mapping[str, Any]) -> int:
        """The head size of a config without ``head_dim``."""
        return head_dim_from_heads(d)

    @classmethod
    def config_fields(cls, d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        """The family's own fields of its :attr:`config_class` (biases, q/k norm, sliding windows)."""
        return {}

    # ------------------------------------------------------------------ inference
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``input_ids``, ``positions`` int64 ``[T]`` -> final-norm hidden states ``[T, hidden_size]``."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be 1-D [T], got {tuple(input_ids.shape)} and "
                f"{tuple(positions.shape)}"
            )
        if len(ctx.kv_caches) != self.config.num_layers:
            raise ValueError(f"ctx.kv_caches has {len(ctx.kv_caches)} layers, the model has {self.config.num_layers}")
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """``hidden [n, hidden_size]`` -> logits ``[n, vocab_size]`` in the model dtype; with
        ``gather=False`` and tensor parallelism, this rank's vocabulary slice ``[n, vocab / tp]``
        (see :meth:`gather_logits` and :meth:`greedy_tokens`)."""
        return self.lm_head(hidden, gather)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary slice ``[n, vocab / tp]`` -> the full logits ``[n, vocab]`` (collective)."""
        return self.lm_head.gather(logits)

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """The argmax over the whole vocabulary, int64 ``[n]``, of every rank's slice (collective)."""
        return self.lm_head.greedy_tokens(logits)

    def attention_specs(self) -> list[AttentionLayerSpec]:
        """Each attention layer's spec on this rank, in layer order."""
        return [m.spec for m in self.modules() if isinstance(m, Attention)]

    def kv_cache_spec(self, block_size: int, dtype: torch.dtype | None = None) -> KVCacheSpec:
        """Shape of this rank's KV pool (its share of the KV heads)."""
        first = self.attention_specs()[0]  # every layer has the same heads on this rank
        return KVCacheSpec(num_layers=self.config.num_layers, num_kv_heads=first.num_kv_heads,
                           head_dim=first.head_dim, block_size=block_size, dtype=dtype or self.dtype)

    def set_all_reduce(self, all_reduce: AllReduce) -> int:
        """Make every layer that sums across ranks use ``all_reduce``; returns how many."""
        return set_all_reduce(self, all_reduce)

    # ------------------------------------------------------------------ weights
    def checkpoint_names(self) -> dict[str, tuple[str, ShardId]]:
        """HF checkpoint name -> (runtime parameter name, shard id) for every expected tensor."""
        names: dict[str, tuple[str, ShardId]] = {}
        for pname, _ in self.named_parameters():  # a tied lm_head is listed once, as the embedding
            module_path, _, leaf = pname.rpartition(".")
            owner, _, attr = module_path.rpartition(".")
            parts = getattr(self.get_submodule(module_path), "checkpoint_parts", None)
            if parts is not None:  # a parameter holding many checkpoint tensors names them (MoE experts)
                names.update({f"{module_path}.{name}": (pname, shard) for name, shard in parts(leaf)})
            elif attr in self.packed_params:
                for part, shard in self.packed_params[attr]:
                    names[f"{owner}.{part}.{leaf}"] = (pname, shard)
            else:
                names[pname] = (pname, None)
        return names

    def _load_kv_scale(self, name: str, tensor: torch.Tensor) -> bool:
        """Load ``name`` if it is an fp8 KV-cache scale of an attention module (see ``_KV_SCALE``)."""
        m = _KV_SCALE.match(name)
        if m is None:
            return False
        try:
            attn = self.get_submodule(m["attn"])
        except AttributeError:
            return False
        if not isinstance(attn, Attention):
            return False
        which = m["own"] or m["proj"]
        try:
            for w in (which,) if which else ("k", "v"):
                attn.load_kv_scale(w, tensor)
        except ValueError as e:
            raise ValueError(f"cannot load {name!r}: {e}") from None
        return True

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into the runtime (fused, sharded) parameters.

        Tensors are consumed one at a time, so the caller can stream them from disk.  Raises
        ValueError naming any unexpected or missing tensor, or a shape mismatch.
        """
        expected = self.checkpoint_names()
        params = dict(self.named_parameters())
        seen: set[str] = set()
        for name, tensor in weights:
            if _IGNORED_WEIGHTS.search(name):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding is the output projection
            if name not in expected and self._load_kv_scale(name, tensor):
                continue
            if name not in expected:
                if self.config.quant is None and name.rpartition(".")[2] in _QUANTIZED_SUFFIXES:
                    raise ValueError(f"checkpoint tensor {name!r} is quantized, but config.json has no "
                                     "quantization_config")
                raise ValueError(
                    f"unexpected weight {name!r} in checkpoint for {self.config.architecture} (no matching parameter)"
                )
            pname, shard = expected[name]
            owner = cast(WeightLoading, self.get_submodule(pname.rpartition(".")[0]))
            try:
                owner.weight_loader(params[pname], tensor, shard)
            except ValueError as e:
                raise ValueError(f"cannot load {name!r}: {e}") from None
            seen.add(name)
        missing = sorted(set(expected) - seen)
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing weights: {shown}")
