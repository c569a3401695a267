"""Batched sampling on the model's device.

Each row of the logits has its own parameters.  Everything is vectorised; the only loop is
over rows that carry their own seeded generator (to draw that row's noise), and the caller
does a single host transfer of the chosen tokens per step.

Random choice uses the exponential-race trick: ``argmax(p / q)`` with ``q ~ Exp(1)`` samples
from ``p`` exactly, and lets seeded and unseeded rows share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: sampled token + top-k, or None
    sampled_logprobs: list[float | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """``logits [n, V]`` (any float dtype) -> one token per row."""
        assert logits.shape[0] == len(rows)
        logits = logits.float()
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, rows, greedy)
        want_lp = [r.params.logprobs is not None for r in rows]
        if not any(want_lp):
            ids = tokens.tolist()
            return SamplerOutput(ids, [None] * len(rows), [None] * len(rows))
        return self._with_logprobs(logits, tokens, rows, want_lp)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        dev = logits.device
        vocab = logits.shape[1]
        temp = torch.tensor([1.0 if g else r.params.temperature for r, g in zip(rows, greedy)], device=dev)
        scaled = logits / temp[:, None]
        ks = [r.params.top_k if r.params.top_k_active else 0 for r in rows]
        if any(ks):
            kmax = min(max(ks), vocab)
            top_vals = scaled.topk(kmax, dim=-1).values
            k_idx = torch.tensor([min(k, kmax) - 1 if k else kmax - 1 for k in ks], device=dev)
            thresh = top_vals.gather(1, k_idx[:, None])
            active = torch.tensor([k > 0 for k in ks], device=dev)[:, None]
            scaled = scaled.masked_fill(active & (scaled < thresh), float("-inf"))
        probs = scaled.softmax(dim=-1)
        top_ps = [r.params.top_p for r in rows]
        if any(p < 1.0 for p in top_ps):
            p = torch.tensor(top_ps, device=dev)[:, None]
            sorted_p, order = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(dim=-1)
            drop_sorted = (cum - sorted_p) > p  # keep the smallest prefix reaching top_p
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        min_ps = [r.params.min_p for r in rows]
        if any(m > 0 for m in min_ps):
            m = torch.tensor(min_ps, device=dev)[:, None]
            probs = probs.masked_fill(probs < m * probs.max(dim=-1, keepdim=True).values, 0.0)
        q = torch.empty_like(probs)
        q.exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None and not greedy[i]:
                q[i].exponential_(generator=r.generator)
        sampled = (probs / q).argmax(dim=-1)
        if any(greedy):
            g = torch.tensor(greedy, device=dev)
            sampled = torch.where(g, logits.argmax(dim=-1), sampled)
        return sampled

    def _with_logprobs(self, logits, tokens, rows, want_lp) -> SamplerOutput:
        lp = torch.log_softmax(logits, dim=-1)
        k = max(r.params.logprobs or 0 for r in rows)
        chosen = lp.gather(1, tokens[:, None]).squeeze(1)
        if k > 0:
            top_v, top_i = lp.topk(k, dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        ids = tokens.tolist()
        chosen_l = chosen.tolist()
        out_lp: list[dict[int, float] | None] = []
        for i, r in enumerate(rows):
            if not want_lp[i]:
                out_lp.append(None)
                continue
            d = {ids[i]: chosen_l[i]}
            kk = r.params.logprobs or 0
            if kk:
                for t, v in zip(top_i[i][:kk], top_v[i][:kk]):
                    d.setdefault(t, v)
            out_lp.append(d)
        return SamplerOutput(ids, out_lp, chosen_l)
