"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption.

Every step it fills one token budget (``max_num_batched_tokens``), in this order:

1. **running** requests, oldest first: one token per decoding sequence, or the next chunk of
   a prompt still being prefilled.  When the pool runs dry the *newest* running request is
   preempted (swapped to the CPU pool when it fits there, else recomputed later), so older
   requests keep making progress and FCFS order is kept.
2. **swapped** requests, oldest first, when nothing was preempted this step.
3. **waiting** requests, oldest first, while the budget, ``max_num_seqs`` and the block pool
   (above its watermark) allow; each consults the prefix cache first.

Data movement decided here (swap-out, copy-on-write, swap-in) is returned as an ordered list
of operations that the model runner executes before the forward pass, in that order.  The
scheduler is the block manager's only user in the engine: committing computed tokens to the
prefix cache and forking samples go through it too.

With overlapped scheduling a step is scheduled while the previous one still runs: a sequence's
token sampled there is pending (``Sequence.num_pending``), counted like any uncomputed token.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..cache.block_manager import BlockManager, BlockTable, PrefixMatch, Slots
from ..config import EngineConfig
from ..runtime.model_runner import KVOp
from .sequence import Request, RequestStatus, Sequence


class ScheduledSeq:
    """``num_new_tokens`` of ``seq`` from position ``start``; ``samples``: the chunk reaches the
    sequence's end, so its last row samples.  Both fixed when scheduled (launching the step
    moves ``seq.num_computed_tokens`` on)."""

    __slots__ = ("num_new_tokens", "request", "samples", "seq", "start")

    def __init__(self, request: Request, seq: Sequence, num_new_tokens: int) -> None:
        self.request, self.seq, self.num_new_tokens = request, seq, num_new_tokens
        self.start = start = seq.num_computed_tokens
        self.samples = start + num_new_tokens == seq.num_tokens + seq.num_pending

    def __repr__(self) -> str:
        return f"ScheduledSeq({self.seq.seq_id!r}, start={self.start}, num_new_tokens={self.num_new_tokens})"


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first
    kv_ops: list[KVOp] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_swap_preemptions: int = 0
    num_recompute_preemptions: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 kv_variant: Callable[[int], object] | None = None) -> None:
        self.config = config
        self.bm = block_manager
        # How the model computes a sequence's K/V given its length (ModelArchConfig.kv_variant).
        self.kv_variant = kv_variant
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.stats = SchedulerStats()

    # ------------------------------------------------------------------ queue management
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def free_seq(self, seq: Sequence) -> None:
        if self.bm.has_seq(seq.seq_id):
            self.bm.free(seq.seq_id)

    def block_table(self, seq_id: str) -> BlockTable:
        return self.bm.block_table(seq_id)

    def commit(self, seq: Sequence) -> None:
        """Publish ``seq``'s computed blocks whose tokens are all known (a pending token's are
        not yet) to the prefix cache; nothing for a sequence swapped out or freed."""
        self.bm.commit(seq.seq_id, seq.token_ids, min(seq.num_computed_tokens, len(seq.token_ids)))

    def launched(self, out: SchedulerOutput) -> None:
        """``out``'s step is on the device: its tokens count as computed (their blocks go to the
        prefix cache now: any later step that reads them runs after this one), and each sampling
        row's token is pending until the host applies it."""
        for s in out.scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            # A row whose last token is pending fills no block the host can hash yet: what it
            # could publish was published when the token before it was applied or launched.
            if seq.num_computed_tokens <= len(seq.token_ids):
                self.commit(seq)
            seq.num_pending += s.samples

    def fork(self, req: Request) -> None:
        """The first token of ``n`` samples: samples 1..n-1 share sample 0's blocks (before any
        sample's token is applied: sample 0 may finish on its first token and free them)."""
        parent = req.seqs[0]
        for seq in req.seqs[1:]:
            if seq.num_output_tokens == 0 and not self.bm.has_seq(seq.seq_id):
                self.bm.fork(parent.seq_id, seq.seq_id)
                seq.num_computed_tokens = parent.num_computed_tokens

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request from whichever queue holds it; free its blocks."""
        for q in (self.waiting, self.swapped):
            if req in q:
                q.remove(req)
        if req in self.running:
            self.running.remove(req)
        for s in req.seqs:
            self.free_seq(s)
        req.status = RequestStatus.FINISHED

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            budget = self._schedule_swapped(out, budget)
            if not self.swapped:
                self._schedule_waiting(out, budget)
        # Decodes first: the attention backends run them with the decode kernel.
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            ok = True
            for seq in self._active_seqs(req):
                if budget == 0:
                    break
                self.refresh_kv_variant(req, seq)
                n = min(seq.num_uncomputed, budget)
                if n == 0:
                    continue
                got = self._allocate(req, seq, n, out)
                while got is None:
                    victim = self.running[-1]
                    self._preempt(victim, out)
                    if victim is req:
                        ok = False
                        break
                    got = self._allocate(req, seq, n, out)
                if got is None:
                    # The request preempted itself: its sequences scheduled above go with it.
                    budget += sum(s.num_new_tokens for s in out.scheduled if s.request is req)
                    out.scheduled[:] = [s for s in out.scheduled if s.request is not req]
                    break
                out.scheduled.append(ScheduledSeq(req, seq, got))
                budget -= got
            if ok:
                i += 1
        return budget

    def _schedule_swapped(self, out: SchedulerOutput, budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.swapped[0]
            seqs = self._active_seqs(req)
            held = [s for s in seqs if self.bm.has_seq(s.seq_id)]
            ids = [s.seq_id for s in held]
            # Exact, not padded: a request that needs the whole pool must still get back in.
            need = self.bm.blocks_to_resume(ids, [s.num_computed_tokens for s in held]) + len(seqs) - len(held)
            if not self.bm.can_allocate(need) or budget < len(seqs):
                break
            self.swapped.popleft()
            out.kv_ops.append(("swap_in", self.bm.swap_in(ids)))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            for seq in seqs:
                self.refresh_kv_variant(req, seq)
                n = min(seq.num_uncomputed, budget)
                got = self._allocate(req, seq, n, out) if n else None
                if got:
                    out.scheduled.append(ScheduledSeq(req, seq, got))
                    budget -= got
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> int:
        # Digests of full prompt blocks that requests admitted in this step will compute.  A
        # request whose next uncached block is among them waits one step and then hits the
        # cache instead of computing the same block again (a shared system prompt arriving
        # with many requests at once is computed once, not once per request of the step).
        pending: set[bytes] = set()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            seq = self._active_seqs(req)[0]
            self.refresh_kv_variant(req, seq)
            match = self.bm.match_prefix(seq.token_ids, req.extra_key)
            if req.needs_prompt_logits:  # its prompt logprobs need the logits of every prompt position
                match = PrefixMatch(0, [], [], match.prompt_keys)
            fresh = match.prompt_keys[len(match.keys):]
            if fresh and fresh[0].digest in pending:
                break  # FCFS: later requests wait too
            pending.update(k.digest for k in fresh)
            n = seq.num_tokens - match.num_tokens
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            need = self.bm.blocks_needed(None, match.num_tokens, n, match)
            if not self.bm.can_allocate(need):
                break
            slots = self.bm.allocate_slots(seq.seq_id, match.num_tokens, n, match, req.extra_key)
            assert slots is not None, "admission check passed but allocation failed"
            self._copy(out, slots)
            self.stats.prefix_query_tokens += seq.num_tokens
            self.stats.prefix_hit_tokens += match.num_tokens
            seq.num_computed_tokens = match.num_tokens
            if req.num_cached_tokens is None:  # first admission (vLLM's num_cached_tokens)
                req.num_cached_tokens = match.num_tokens
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledSeq(req, seq, n))
            budget -= n
            # Siblings that were preempted by recomputation rejoin through the running loop.
        return budget

    # ------------------------------------------------------------------ metrics
    def step_stats(self, out: SchedulerOutput) -> dict[str, int]:
        """The queues and the pool after a step (a trace's per-step summary)."""
        bm = self.bm
        return {
            "running": len(self.running), "waiting": len(self.waiting), "swapped": len(self.swapped),
            "blocks_used": bm.num_used_blocks, "blocks_cached": bm.num_cached_blocks, "blocks_free": bm.gpu.num_free,
            "cpu_blocks_used": bm.cpu.num_blocks - bm.cpu.num_free, "num_tokens": out.num_batched_tokens,
        }

    def metrics(self) -> dict[str, float | int]:
        bm, st = self.bm, self.stats
        return {
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_cached": bm.num_cached_blocks,
            "kv_blocks_free": bm.gpu.num_free,
            "cpu_blocks_total": bm.cpu.num_blocks,
            "cpu_blocks_used": bm.cpu.num_blocks - bm.cpu.num_free,
            "block_size": bm.block_size,
            "prefix_cache_hit_rate": st.prefix_cache_hit_rate,
            "prefix_cache_hit_tokens": st.prefix_hit_tokens,
            "prefix_cache_query_tokens": st.prefix_query_tokens,
            "prefix_cache_evictions": bm.cache.stats.evictions,
            "num_preemptions": st.num_preemptions,
            "num_swap_preemptions": st.num_swap_preemptions,
            "num_recompute_preemptions": st.num_recompute_preemptions,
            "num_swapped_out_blocks": bm.stats.num_swapped_out_blocks,
            "num_swapped_in_blocks": bm.stats.num_swapped_in_blocks,
            "num_cow_copies": bm.stats.num_cow_copies,
            "num_window_released_blocks": bm.stats.num_window_released,
            "num_requests_running": len(self.running),
            "num_requests_waiting": len(self.waiting),
            "num_requests_swapped": len(self.swapped),
        }

    # ------------------------------------------------------------------ helpers
    def refresh_kv_variant(self, req: Request, seq: Sequence) -> None:
        """Where the model computes K/V differently once ``seq`` reaches its length (pending
        tokens included; LongRoPE past its original length), drop what the request's sequences
        hold so they are computed again, and key their blocks by the new variant in the prefix
        cache.  Only LongRoPE models have a ``kv_variant``: for the others this is one test."""
        if self.kv_variant is None:
            return
        variant = self.kv_variant(seq.num_tokens + seq.num_pending)
        if variant == req.kv_variant:
            return
        for s in req.seqs:
            self.free_seq(s)
            s.num_computed_tokens = 0
        req.kv_variant = variant
        req.extra_key = (req.extra_key, variant)

    @staticmethod
    def _active_seqs(req: Request) -> list[Sequence]:
        """Sequences that need compute: only the first until the prompt is done, then all live."""
        if not req.prefill_done:
            return [req.seqs[0]]
        return req.live_seqs

    def _allocate(self, req: Request, seq: Sequence, n: int, out: SchedulerOutput) -> int | None:
        """Reserve slots for up to ``n`` new tokens of ``seq``; the number scheduled, or None."""
        if self.bm.has_seq(seq.seq_id):
            slots = self.bm.allocate_slots(seq.seq_id, seq.num_computed_tokens, n)
        else:  # a sibling re-admitted after recomputation: look up the prefix cache first
            match = self.bm.match_prefix(seq.token_ids, req.extra_key)
            n = min(n, seq.num_tokens - match.num_tokens)
            slots = self.bm.allocate_slots(seq.seq_id, match.num_tokens, n, match, req.extra_key)
            if slots is not None:
                seq.num_computed_tokens = match.num_tokens
        if slots is None:
            return None
        self._copy(out, slots)
        return n

    @staticmethod
    def _copy(out: SchedulerOutput, slots: Slots) -> None:
        if slots.copies:
            out.kv_ops.append(("copy", list(slots.copies)))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        out.preempted.append(req)
        ids = [s.seq_id for s in req.seqs if self.bm.has_seq(s.seq_id)]
        if self.config.preemption_mode == "swap" and ids and self.bm.can_swap_out(ids):
            out.kv_ops.append(("swap_out", self.bm.swap_out(ids)))
            req.status = RequestStatus.SWAPPED
            self._insert_fcfs(self.swapped, req)
            self.stats.num_swap_preemptions += 1
            return
        for s in req.seqs:
            self.free_seq(s)
            s.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self._insert_fcfs(self.waiting, req)
        self.stats.num_recompute_preemptions += 1

    @staticmethod
    def _insert_fcfs(q: deque[Request], req: Request) -> None:
        keys = [r.arrival_time for r in q]
        q.insert(bisect.bisect_right(keys, req.arrival_time), req)
