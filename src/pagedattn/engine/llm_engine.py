"""The engine: requests in, tokens out, one scheduling step at a time.

``LLMEngine`` wires the parts together and owns the request lifecycle
(waiting -> running -> [swapped | waiting] -> finished).  It is synchronous and single-threaded:
the offline :class:`~pagedattn.engine.llm.LLM` drives it in a loop, the server drives it from
one background thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..cache.block_manager import BlockManager, cdiv
from ..cache.kv_pool import KVCacheSpec
from ..config import EngineConfig
from ..distributed.executor import check_tp_size, make_executor
from ..distributed.group import TorchrunEnv
from ..distributed.worker_loop import run_torchrun_worker
from ..models.loader import load_tokenizer, resolve_model_source
from ..runtime.executor import Executor
from ..runtime.worker import WorkerConfig, freeze_startup_heap, release_startup_heap
from ..transfer import to_device
from .detokenizer import detokenize_incrementally, finish_detokenizing
from .outputs import CompletionOutput, RequestOutput
from .sampler import Sampler, SamplingBatch, SamplingRow
from .sampling_params import SamplingParams
from .scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from .sequence import Request, Sequence
from .step_builder import StepBuilder

logger = logging.getLogger(__name__)

PromptInput = str | list[int] | dict[str, Any]
_GIB = 1 << 30


@dataclass
class _Inflight:
    """A launched decode step whose sampled tokens the host has not read yet."""

    sched: SchedulerOutput
    targets: list[tuple[Sequence, Request]]
    batch: SamplingBatch
    tokens: torch.Tensor  # [n] on the device
    host: torch.Tensor  # [n] pinned copy, valid once ``done`` fires
    done: torch.cuda.Event | None
    greedy: bool  # ``tokens`` came from the runner's greedy path: every rank holds them


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        tp = config.tensor_parallel_size
        # Launched by torchrun for tensor parallelism: rank 0 is the engine, the others serve it.
        torchrun = TorchrunEnv.for_tensor_parallel(tp)
        if torchrun is not None and torchrun.rank != 0:  # serves rank 0's engine, then leaves
            run_torchrun_worker(torchrun, self.device.type, config.distributed_timeout_s)
            raise SystemExit(0)
        t0 = time.perf_counter()
        try:
            self.source = resolve_model_source(config.model, config.load_format, config.download_dir)
        except FileNotFoundError as e:
            raise ValueError(f"model: {e}") from None
        self.arch = self.source.config
        self.max_model_len = self._context_length(config.max_model_len)
        check_tp_size(self.arch, tp)  # before any process starts
        worker_config = WorkerConfig.derive(config, str(self.source.model_dir), self.max_model_len,
                                            self.source.gguf_file)
        kv_heads = max(1, self.arch.num_kv_heads // tp)  # per rank (a replica each when tp > heads)
        worker_config.check_memory(KVCacheSpec(self.arch.num_layers, kv_heads, self.arch.head_dim,
                                               config.block_size, self.dtype))
        device = self.device
        if tp > 1 and device.type == "cuda" and torchrun is None and (device.index or 0) != 0:
            raise ValueError(f"device: tensor parallelism runs rank r on cuda:r; got device={device}")
        self.executor: Executor = make_executor(worker_config, device, config.distributed_timeout_s, torchrun)
        try:
            self._init_rank0(config, t0)
        except BaseException:
            self.executor.shutdown()
            raise

    def _context_length(self, asked: int | None) -> int:
        limit = self.arch.max_position_embeddings
        if asked is not None and asked > limit:
            raise ValueError(f"max_model_len: {asked} is more than the model's context of {limit} tokens")
        return asked or limit

    def _init_rank0(self, config: EngineConfig, t0: float) -> None:
        """Everything only the engine's rank has: tokenizer, block manager, scheduler, sampler."""
        worker = self.executor.worker
        assert worker.pool is not None and worker.runner is not None
        self.model, self.backend, self.kv_pool, self.runner = worker.model, worker.backend, worker.pool, worker.runner
        self.device = worker.device
        self.tokenizer = load_tokenizer(self.source)
        logger.info("loaded %s in %.1fs", self.source.model_dir, time.perf_counter() - t0)
        self.eos_token_ids = set(self.source.eos_token_ids)
        num_blocks, num_cpu = self.executor.num_blocks, worker.num_cpu_blocks
        windows = set(self.arch.layer_sliding_windows)
        # Blocks can be released only if *every* layer forgets them.
        window = windows.pop() if len(windows) == 1 else None
        self.block_manager = BlockManager(
            num_blocks, config.block_size, num_cpu_blocks=num_cpu, enable_prefix_caching=config.enable_prefix_caching,
            sliding_window=window, watermark=config.watermark,
        )
        self.scheduler = Scheduler(config, self.block_manager)
        self.step_builder = StepBuilder(self.block_manager)
        self.sampler = Sampler(self.device, config.seed)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.tracer: Any = None  # a viz.TraceRecorder when tracing is on
        self.async_scheduling = (self.device.type == "cuda") if config.async_scheduling is None \
            else config.async_scheduling
        self._inflight: _Inflight | None = None
        self._tok_host = [torch.empty(0, dtype=torch.long)] * 2
        logger.info("KV pool: %d blocks of %d tokens (%.2f GiB per rank), %d CPU swap blocks, backend %s, "
                    "tensor parallel size %d", num_blocks, config.block_size, self.kv_pool.nbytes / _GIB, num_cpu,
                    self.backend.name, config.tensor_parallel_size)
        freeze_startup_heap()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (if any); the engine is unusable afterwards.  Idempotent."""
        self.executor.shutdown()
        release_startup_heap()

    # ================================================================== requests
    def tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt")
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"prompt: must be a string, got {type(text).__name__}")
                return text, _token_ids(prompt["prompt_token_ids"], "prompt_token_ids")
            if "prompt" not in prompt:
                raise ValueError("prompt: a prompt dict needs 'prompt_token_ids' or 'prompt'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: empty string")
            _check_unicode(prompt, "prompt")
            if self.tokenizer is None:
                raise ValueError("prompt: this model folder has no tokenizer; pass token ids instead")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, _token_ids(prompt, "prompt")
        raise ValueError(f"prompt: must be a string, a list of token ids or a dict; got {type(prompt).__name__}")

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Every check a request must pass, before it touches any engine state."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise ValueError("prompt: empty (no tokens)")
        vocab = self.arch.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids: ids {bad[:5]} outside the vocabulary [0, {vocab})")
        bad = [t for t in params.stop_token_ids or () if t >= vocab]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids: ids {bad[:5]} outside the vocabulary [0, {vocab})")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"SamplingParams.logprobs: {params.logprobs} is more than the vocabulary's {vocab} tokens")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(prompt_ids)} tokens does not fit the model's context of {self.max_model_len} "
                "(at least one token must be generated)"
            )
        total = len(prompt_ids) + (params.max_tokens or self.max_model_len)
        total = min(total, self.max_model_len)
        need = cdiv(total, self.block_manager.block_size) * params.n
        if need > self.block_manager.num_blocks:
            raise ValueError(
                f"num_kv_blocks: the KV pool ({self.block_manager.num_blocks} blocks of "
                f"{self.block_manager.block_size}) is too small for this request ({need} blocks for "
                f"{total} tokens x n={params.n}); use a larger pool or a smaller max_tokens"
            )

    def add_request(self, prompt: PromptInput, params: SamplingParams, request_id: str | None = None,
                    extra_key: object = None, stream: bool = True) -> str:
        """Queue a request.  ``stream=False``: :meth:`step` reports it only once it finishes
        (saves building partial outputs every step for offline batches)."""
        text, ids = self.tokenize(prompt)
        self.validate(ids, params)
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        req = Request(rid, text, ids, params, extra_key=extra_key, stream=stream)
        for i in range(1, params.n):
            req.seqs.append(Sequence(f"{rid}#{i}", i, list(ids), len(ids)))
        for s in req.seqs:
            if params.seed is not None:
                s.generator = torch.Generator(device=self.device)
                s.generator.manual_seed(hash((params.seed, s.index)) & 0x7FFF_FFFF_FFFF_FFFF)
        self.requests[rid] = req
        self.scheduler.add(req)
        self.num_prompt_tokens += len(ids)
        return rid

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free all its blocks.  False if it is unknown or done."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return False
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "abort"
        self.scheduler.finish(req)
        if self.tracer is not None:
            self.tracer.event("abort", request=req.request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ================================================================== the step
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and return outputs of requests that changed.

        With async scheduling, a pure-decode step is *launched* and its tokens read back one
        call later: each call launches step k+1 on the device (inputs: step k's samples, still
        on the device) and then processes step k's tokens on the host while the device works.
        """
        if self.tracer is not None:
            self.tracer.begin_step(self.num_steps)
        if self._inflight is None:
            sched = self.scheduler.schedule()
            step = self.step_builder.build(sched)
            out = self.executor.execute(step).rows  # logits, or with step.greedy the sampled tokens
            if not self._overlappable(sched):
                # Under tensor parallelism on CUDA this is where a dead rank is noticed, rather
                # than in a blocking read of the sampled tokens.
                self.executor.sync()
                return self._end_step(sched, self._process(sched, out, step.greedy))
            self._inflight = self._launch(sched, [(s.seq, s.request) for s in sched.scheduled], out, step.greedy)
        cur = self._inflight
        self._inflight = self._launch_lookahead(cur)
        return self._end_step(cur.sched, self._finish(cur))

    def _end_step(self, sched: SchedulerOutput, touched: list[Request]) -> list[RequestOutput]:
        self.num_steps += 1
        if self.tracer is not None:
            for r in sched.preempted:
                self.tracer.event("preempt", request=r.request_id, to=r.status.value)
            self.tracer.end_step(self.num_steps - 1, self._step_stats(sched))
        return [self._output(r) for r in touched if r.stream or r.finished]

    # ------------------------------------------------------------------ overlapped decode
    def _overlappable(self, sched: SchedulerOutput) -> bool:
        """Pure decode, every sequence samples one token, no logprobs, no fan-out to siblings, no
        token masked (min_tokens reached: it stays reached for the lookahead steps that follow)."""
        if not self.async_scheduling or sched.is_empty:
            return False
        for s in sched.scheduled:
            if s.num_new_tokens != 1 or not s.samples or s.request.params.logprobs is not None:
                return False
            if s.seq.num_output_tokens < s.request.params.min_tokens:
                return False
            if len(s.request.seqs) > 1 and not s.request.prefill_done:
                return False
        return True

    def _launch(self, sched: SchedulerOutput, targets: list[tuple[Sequence, Request]], out: torch.Tensor,
                greedy: bool, batch: SamplingBatch | None = None) -> _Inflight:
        """Sample the step's logits ``out`` (or take its greedy tokens) and start their copy to the host."""
        batch = batch or self.sampler.prepare([self._sampling_row(seq, req) for seq, req in targets])
        tokens = out if greedy else self.sampler.sample(out, batch)
        if not tokens.is_cuda:
            return _Inflight(sched, targets, batch, tokens, tokens, None, greedy)
        # Two pinned buffers in turn: the one in use by the step being read back stays intact.
        n = tokens.shape[0]
        if self._tok_host[0].shape[0] < n:
            self._tok_host = [torch.empty(max(n, 256), dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._tok_host.reverse()
        host = self._tok_host[0][:n]
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Inflight(sched, targets, batch, tokens, host, done, greedy)

    def _launch_lookahead(self, cur: _Inflight) -> _Inflight | None:
        """Launch the next decode step for the same sequences, or None when the batch must
        change first (new or swapped-out requests to admit, a context limit, a full pool)."""
        sch = self.scheduler
        if sch.swapped or (sch.waiting and len(sch.running) < self.config.max_num_seqs):
            return None
        # Sequences that stopped (or were aborted) before this launch drop out; their rows of
        # the in-flight samples are skipped with an on-device gather.
        rows = [i for i, (seq, req) in enumerate(cur.targets)
                if seq.finish_reason is None and req.request_id in self.requests]
        if not rows:
            return None
        targets = [cur.targets[i] for i in rows]
        seqs = [seq for seq, _ in targets]
        if any(seq.num_computed_tokens + 2 > self.max_model_len for seq in seqs):
            return None
        bm = self.block_manager
        for seq in seqs:
            # Slots for the position after the in-flight token; extra slots left by a bail-out
            # are harmless (the next schedule reuses them).
            if not bm.allocate_slots(seq.seq_id, seq.num_computed_tokens + 1, 1):
                return None
        copies = bm.take_pending_copies()  # siblings still sharing their last block
        # The rows are (a subset of) the in-flight step's, so its greediness carries over; after
        # a greedy step every rank holds its tokens, and they need not be sent again.
        greedy = cur.greedy
        step = self.step_builder.lookahead(seqs, [("copy", copies)] if copies else [], greedy,
                                           prev_rows=rows if greedy else None)
        same = len(rows) == len(cur.targets)
        input_ids = cur.tokens if same else cur.tokens.index_select(0, to_device(rows, torch.long, self.device))
        out = self.executor.execute(step, input_ids).rows
        sched = SchedulerOutput(scheduled=[ScheduledSeq(req, seq, 1) for seq, req in targets])
        return self._launch(sched, targets, out, greedy, cur.batch if same else None)

    def _finish(self, cur: _Inflight) -> list[Request]:
        """Read back an in-flight step's tokens and apply them (skipping sequences that
        finished or were aborted after it was launched)."""
        if cur.done is not None:
            self.executor.wait_event(cur.done)
        ids = cur.host.tolist()
        bm = self.block_manager
        live: list[tuple[Sequence, Request]] = []
        toks: list[int] = []
        for (seq, req), tok in zip(cur.targets, ids):
            if seq.finish_reason is not None:
                continue
            seq.num_computed_tokens += 1
            bm.commit(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            live.append((seq, req))
            toks.append(tok)
        n = len(live)
        return self._apply(live, toks, [None] * n, [None] * n)

    # ------------------------------------------------------------------ synchronous steps
    def _process(self, sched: SchedulerOutput, out: torch.Tensor, greedy: bool) -> list[Request]:
        """Apply a synchronous step: ``out`` holds the sampling rows' logits, or with ``greedy``
        their tokens."""
        bm = self.block_manager
        sampling = []
        for s in sched.scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            bm.commit(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.num_computed_tokens == len(seq.token_ids):
                sampling.append(s)
        if not sampling:
            return []
        rows: list[int] = []
        targets: list[tuple[Sequence, Request]] = []
        for r, s in enumerate(sampling):
            req = s.request
            if len(req.seqs) > 1 and not req.prefill_done:  # the first token of n samples: fan out
                rows.extend([r] * len(req.seqs))
                targets.extend((q, req) for q in req.seqs)
            else:
                rows.append(r)
                targets.append((s.seq, req))
        if len(rows) != len(sampling):
            out = out[torch.tensor(rows, device=out.device)]
        if greedy:
            n = len(targets)
            return self._apply(targets, out.tolist(), [None] * n, [None] * n)
        rows_in = [self._sampling_row(seq, req) for seq, req in targets]
        try:
            sampled = self.sampler(out, rows_in)
        except Exception:  # find the row at fault: sample each alone, fail only the ones that raise
            return self._sample_rows_alone(targets, out, rows_in)
        return self._apply(targets, sampled.token_ids, sampled.logprobs, sampled.sampled_logprobs)

    def _sampling_row(self, seq: Sequence, req: Request) -> SamplingRow:
        p = req.params
        banned: list[int] = []
        if seq.num_output_tokens < p.min_tokens:
            banned = [*(() if p.ignore_eos else sorted(self.eos_token_ids)), *(p.stop_token_ids or ())]
        return SamplingRow(p, seq.generator, banned)

    def _sample_rows_alone(self, targets: list[tuple[Sequence, Request]], out: torch.Tensor,
                           rows: list[SamplingRow]) -> list[Request]:
        ok: list[tuple[Sequence, Request]] = []
        toks: list[int] = []
        lps: list[dict[int, float] | None] = []
        slps: list[float | None] = []
        for i, ((seq, req), row) in enumerate(zip(targets, rows)):
            try:
                one = self.sampler(out[i:i + 1], [row])
            except Exception as e:
                self._fail(req, e)
                continue
            ok.append((seq, req))
            toks.append(one.token_ids[0])
            lps.append(one.logprobs[0])
            slps.append(one.sampled_logprobs[0])
        touched = {r.request_id: r for r in self._apply(ok, toks, lps, slps)}
        touched.update((req.request_id, req) for _, req in targets if req.error is not None)
        return list(touched.values())

    def _apply(self, targets: list[tuple[Sequence, Request]], token_ids: list[int],
               logprobs: list[dict[int, float] | None], sampled_logprobs: list[float | None]) -> list[Request]:
        """Append sampled tokens, fork siblings on their first token, check stop conditions.

        What goes wrong with one sequence (its detokenizer, its stop check) fails its request
        alone: the request finishes with ``finish_reason="error"``, its blocks are freed and the
        other requests of the step go on."""
        self._fork_new_siblings(targets)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for (seq, req), tok, lp, slp in zip(targets, token_ids, logprobs, sampled_logprobs):
            touched[req.request_id] = req
            if req.error is not None:
                continue
            try:
                self._append(req, seq, tok, lp, slp, now)
                if seq.finish_reason is not None:
                    self._finish_text(req, seq)
            except Exception as e:
                self._fail(req, e)
            if seq.finish_reason is not None:
                self.scheduler.free_seq(seq)
        self.num_generated_tokens += len(targets)
        for req in touched.values():
            if req.finished:
                self.scheduler.finish(req)
        return list(touched.values())

    def _fork_new_siblings(self, targets: list[tuple[Sequence, Request]]) -> None:
        """Samples 1..n-1 share sample 0's prompt blocks: fork them all before any sample's
        token is applied (sample 0 may finish on its first token and free its blocks)."""
        bm = self.block_manager
        for seq, req in targets:
            if seq.index > 0 and seq.num_output_tokens == 0 and not bm.has_seq(seq.seq_id):
                parent = req.seqs[0]
                bm.fork(parent.seq_id, seq.seq_id)
                seq.num_computed_tokens = parent.num_computed_tokens

    def _append(self, req: Request, seq: Sequence, tok: int, lp: dict[int, float] | None, slp: float | None,
                now: float) -> None:
        seq.token_ids.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += slp or 0.0
        if req.first_token_time is None:
            req.first_token_time = now
        self._check_stop(req, seq, tok)

    def _fail(self, req: Request, error: BaseException) -> None:
        """Finish ``req`` now with ``finish_reason="error"`` and free its blocks."""
        logger.error("request %s failed", req.request_id, exc_info=(type(error), error, error.__traceback__))
        req.error = f"{type(error).__name__}: {error}"
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "error"
        self.scheduler.finish(req)

    def _check_stop(self, req: Request, seq: Sequence, tok: int) -> None:
        p = req.params
        n_out = seq.num_output_tokens
        if self.tokenizer is not None:
            detokenize_incrementally(self.tokenizer, seq, p.skip_special_tokens)
        if n_out >= p.min_tokens:  # before min_tokens nothing but the length limits stops
            if not p.ignore_eos and tok in self.eos_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", None
                return
            if p.stop_token_ids and tok in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", tok
                return
            if p.stop_list and self._check_stop_strings(seq, p):
                return
        if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def _finish_text(self, req: Request, seq: Sequence) -> None:
        """A finished sequence gets the text its detokenizer still held back (a character or byte
        run cut off at the end), which may hold a stop string."""
        p = req.params
        if self.tokenizer is None or isinstance(seq.stop_reason, str):  # a stop string already cut the text
            return
        finish_detokenizing(self.tokenizer, seq, p.skip_special_tokens)
        if p.stop_list and seq.num_output_tokens >= p.min_tokens:
            self._check_stop_strings(seq, p)

    @staticmethod
    def _check_stop_strings(seq: Sequence, p: SamplingParams) -> bool:
        longest = max(len(s) for s in p.stop_list)
        start = max(0, seq.stop_checked_len - longest + 1)
        hit_at, hit = -1, None
        for s in p.stop_list:
            i = seq.text.find(s, start)
            if i != -1 and (hit_at == -1 or i < hit_at):
                hit_at, hit = i, s
        seq.stop_checked_len = len(seq.text)
        if hit is None:
            return False
        seq.text = seq.text[: hit_at + (len(hit) if p.include_stop_str_in_output else 0)]
        seq.finish_reason, seq.stop_reason = "stop", hit
        return True

    # ================================================================== outputs & metrics
    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for s in req.seqs:
            if s.num_output_tokens == 0 and not s.finished:
                continue
            outs.append(CompletionOutput(
                index=s.index, text=s.text, token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if req.params.logprobs is not None else None,
                logprobs=list(s.logprobs) if req.params.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            ))
        finished = req.finished
        if finished:
            self.requests.pop(req.request_id, None)
        m = {"arrival_time": req.arrival_time}
        if req.first_token_time is not None:
            m["first_token_time"] = req.first_token_time
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, metrics=m,
                             error=req.error)

    def _step_stats(self, sched: SchedulerOutput) -> dict[str, int]:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "swapped": len(self.scheduler.swapped),
            "blocks_used": bm.num_used_blocks,
            "blocks_cached": bm.num_cached_blocks,
            "blocks_free": bm.gpu.num_free,
            "cpu_blocks_used": bm.cpu.num_blocks - bm.cpu.num_free,
            "num_tokens": sched.num_batched_tokens,
        }

    def get_metrics(self) -> dict[str, float | int]:
        bm, st = self.block_manager, self.scheduler.stats
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
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "num_requests_swapped": len(self.scheduler.swapped),
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated_tokens,
            "num_prompt_tokens": self.num_prompt_tokens,
        }

    def check_integrity(self) -> None:
        self.block_manager.check_integrity()

    def attach_tracer(self, tracer: Any) -> None:
        """Record every block-pool event and a per-step summary (a ``viz.TraceRecorder``)."""
        self.tracer = tracer
        tracer.attach(self.block_manager)

    def detach_tracer(self) -> Any:
        """Stop recording and close the recorder (writing its file); returns it."""
        tracer, self.tracer = self.tracer, None
        if tracer is not None:
            tracer.close()
        return tracer


def _token_ids(ids: object, name: str) -> list[int]:
    """A prompt's token ids as a list of ints; a ValueError naming ``name`` for anything else."""
    if isinstance(ids, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return list(ids)
    what = type(ids).__name__ if not isinstance(ids, (list, tuple)) else \
        f"a list holding {next(type(t).__name__ for t in ids if not isinstance(t, int) or isinstance(t, bool))}"
    raise ValueError(f"{name}: must be a list of integer token ids, got {what}")


def _check_unicode(text: str, name: str) -> None:
    """Text the tokenizer can take: no lone surrogates (JSON's "\\ud800" or Python's "\\udc80")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: not valid Unicode text ({e.reason} at character {e.start})") from None
