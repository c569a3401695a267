"""The sparse mixture-of-experts block (router + experts) of the MoE families, and the config
fields it reads.

The router (``gate``, replicated on every rank) picks each token's ``top_k`` experts; the
experts (``experts``, :class:`FusedMoE`) hold every expert's gate/up and down projections as
two stacked tensors, ``w13_weight [E, 2I, H]`` and ``w2_weight [E, H, I]``, the layout the
fused kernel reads (:mod:`..moe_ops`).  With tensor parallelism each expert's FFN is split
like the dense MLP: every rank holds ``I / tp`` of each expert's intermediate features (its
slice of gate and up, the matching columns of down) and returns partial sums, which the norm
after the layer reduces.

Checkpoints name each expert's projections separately (``experts.{e}.gate_proj.weight`` in
Qwen3-MoE, ``experts.{e}.w1.weight`` in Mixtral); :meth:`FusedMoE.checkpoint_parts` lists
those names for the model's loader and :meth:`FusedMoE.weight_loader` copies this rank's
slice of each into its expert's place.  A checkpoint holding transformers' own fused layout
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``) is read through
:func:`per_expert_weights`, which splits it into those names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelArchConfig
from ..moe_ops import fused_moe, route
from .parallel import AllReduce, Shard, divide, process_group_all_reduce
from .weights import ShardId, check_shape, default_weight_loader, new_param

# Part of an expert's checkpoint tensor in a shard id ``(expert, part)``.
GATE, UP, DOWN = 0, 1, 2
# Checkpoint names of an expert's gate, up and down projections.
QWEN_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")


@dataclass(frozen=True)
class MoEArchConfig(ModelArchConfig):
    """A decoder whose layers ``sparse_layers`` marks use a sparse MoE block instead of the MLP:
    ``num_experts`` experts of ``moe_intermediate_size`` features, ``num_experts_per_tok`` of
    them per token, their routing weights renormalised to sum to 1 with ``norm_topk_prob``, and
    kept in fp32 (not cast to the activation dtype) with ``router_fp32_weights``."""

    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    router_fp32_weights: bool = False
    sparse_layers: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.sparse_layers) != self.num_layers:
            raise ValueError(f"sparse_layers has {len(self.sparse_layers)} entries, expected num_layers="
                             f"{self.num_layers}")
        if not any(self.sparse_layers):
            return
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                             f"({self.num_experts})")


class MoERouter(nn.Module):
    """The router's linear layer, ``[E, H]``, replicated on every rank: each rank routes the
    same tokens to the same experts."""

    def __init__(self, hidden_size: int, num_experts: int, params_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.weight = new_param((num_experts, hidden_size), params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # transformers' op: the same logits, the same experts chosen


class FusedMoE(nn.Module):
    """Every expert's SiLU-gated FFN in two stacked tensors (this rank's share of each expert's
    intermediate features); ``forward`` runs each token through its experts and returns the
    weighted sum (per-rank partial sums with tensor parallelism)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, shard: Shard, *,
                 expert_names: tuple[str, str, str] = QWEN_EXPERT_NAMES) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.tp_rank, self.tp_size = shard.rank, shard.size
        self.local_size = divide(intermediate_size, shard.size, "moe intermediate size")
        self.expert_names = expert_names
        self.w13_weight = new_param((num_experts, 2 * self.local_size, hidden_size), shard.dtype)
        self.w2_weight = new_param((num_experts, hidden_size, self.local_size), shard.dtype)
        # Only asked for a place to write the partial sums (the norm after the layer reduces them).
        self.all_reduce: AllReduce = process_group_all_reduce

    def checkpoint_parts(self, leaf: str) -> list[tuple[str, ShardId]]:
        """The checkpoint tensors (names relative to this module, shard ids) parameter ``leaf`` holds."""
        gate, up, down = self.expert_names
        if leaf == "w13_weight":
            return [(f"{e}.{name}.weight", (e, part)) for e in range(self.num_experts)
                    for part, name in ((GATE, gate), (UP, up))]
        if leaf == "w2_weight":
            return [(f"{e}.{down}.weight", (e, DOWN)) for e in range(self.num_experts)]
        raise ValueError(f"{type(self).__name__} has no parameter {leaf!r}")

    def checkpoint_shape(self, param: nn.Parameter, shard_id: ShardId) -> tuple[int, int]:
        """The full checkpoint tensor of part ``shard_id``: ``[I, H]`` for gate and up, ``[H, I]`` for down."""
        _, part = self._expert_part(shard_id)
        return (self.hidden_size, self.intermediate_size) if part == DOWN else (self.intermediate_size,
                                                                               self.hidden_size)

    def _expert_part(self, shard_id: ShardId) -> tuple[int, int]:
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and 0 <= shard_id[0] < self.num_experts
                and shard_id[1] in (GATE, UP, DOWN)):
            raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__} "
                             f"(expected (expert < {self.num_experts}, part 0-2))")
        return shard_id[0], shard_id[1]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        expert, part = self._expert_part(shard_id)
        check_shape(loaded_weight, self.checkpoint_shape(param, shard_id))
        n, start = self.local_size, self.tp_rank * self.local_size
        if part == DOWN:
            param.data[expert].copy_(loaded_weight.narrow(1, start, n))
        else:  # this rank's rows of gate (first half) or up (second half)
            param.data[expert].narrow(0, part * n, n).copy_(loaded_weight.narrow(0, start, n))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = self.all_reduce.partials_buffer(x.shape[0], self.hidden_size, x.dtype) if self.tp_size > 1 else None
        return fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, out=out)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.local_size}/{self.intermediate_size}, tp={self.tp_rank}/{self.tp_size}")


class SparseMoEBlock(nn.Module):
    """Router (``gate``) then experts (``experts``): the MLP block of a sparse decoder layer."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, shard: Shard, *,
                 renormalize: bool, fp32_weights: bool = False,
                 expert_names: tuple[str, str, str] = QWEN_EXPERT_NAMES) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.fp32_weights = top_k, renormalize, fp32_weights
        self.gate = MoERouter(hidden_size, num_experts, shard.dtype)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, shard, expert_names=expert_names)

    @classmethod
    def from_config(cls, cfg: MoEArchConfig, shard: Shard,
                    expert_names: tuple[str, str, str] = QWEN_EXPERT_NAMES) -> SparseMoEBlock:
        return cls(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, shard,
                   renormalize=cfg.norm_topk_prob, fp32_weights=cfg.router_fp32_weights, expert_names=expert_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize, self.fp32_weights)
        return self.experts(x, weights, ids)


_FUSED_EXPERTS = re.compile(r"^(?P<prefix>(?:.*\.)?experts)\.(?P<kind>gate_up_proj|down_proj)$")


def per_expert_weights(weights: Iterable[tuple[str, torch.Tensor]],
                       expert_names: tuple[str, str, str] = QWEN_EXPERT_NAMES) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` with transformers' fused expert tensors (``experts.gate_up_proj [E, 2I, H]``,
    ``experts.down_proj [E, H, I]``) split into per-expert checkpoint names (views, no copies)."""
    gate, up, down = expert_names
    for name, tensor in weights:
        m = _FUSED_EXPERTS.match(name)
        if m is None or tensor.dim() != 3:
            yield name, tensor
            continue
        prefix = m["prefix"]
        if m["kind"] == "down_proj":
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.{down}.weight", tensor[e]
            continue
        if tensor.shape[1] % 2:
            raise ValueError(f"cannot load {name!r}: gate_up_proj has an odd number of rows {tuple(tensor.shape)}")
        g, u = tensor.chunk(2, dim=1)
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.{gate}.weight", g[e]
            yield f"{prefix}.{e}.{up}.weight", u[e]
