"""The engine: requests in, tokens out, one scheduling step at a time.

``LLMEngine`` wires the parts together and owns the request lifecycle
(waiting -> running -> [swapped | waiting] -> finished).  It is synchronous and single-threaded:
the offline :class:`~pagedattn.engine.llm.LLM` drives it in a loop, the server drives it from
one background thread.

One loop serves both orders of work.  Each :meth:`LLMEngine.step` schedules, launches the step
on the device and samples there; a step is then either processed at once, or -- with async
scheduling, when nothing about its rows needs the host first -- left in flight and processed
after the next step is launched, so the host's work overlaps the device's.  The scheduler counts
the tokens in flight (``Sequence.num_pending``), and the next step reads them on the device.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..cache.block_manager import BlockManager
from ..cache.kv_pool import KVCacheSpec
from ..config import EngineConfig, kv_cache_torch_dtype
from ..distributed.executor import check_tp_size, make_executor
from ..distributed.group import TorchrunEnv
from ..distributed.worker_loop import run_torchrun_worker
from ..models.loader import load_tokenizer, resolve_model_source
from ..runtime import compile_guard
from ..runtime.executor import Executor
from ..runtime.worker import WorkerConfig, freeze_startup_heap, release_startup_heap
from ..transfer import HostCopies
from .input_processor import InputProcessor, PromptInput
from .output_processor import OutputProcessor, Target, request_output
from .outputs import RequestOutput
from .prompt_logprobs import record_prompt_logprobs
from .sampler import Sampler, SamplingBatch
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Request
from .step_builder import StepBuilder
from .step_sampler import StepSampler
from .structured import GrammarCompilerCache

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "PromptInput"]
_GIB = 1 << 30


@dataclass
class _Launched:
    """A step on the device: its sampling rows, in the order of its outputs, and what came back."""

    sched: SchedulerOutput
    targets: list[Target]
    out: torch.Tensor  # the rows' logits, or with ``greedy`` their tokens
    greedy: bool
    # Sampled on the device (a step left in flight), with a pinned host copy valid once ``done``.
    tokens: torch.Tensor | None = None
    host: torch.Tensor | None = None
    done: torch.cuda.Event | None = None
    batch: SamplingBatch | None = None

    @property
    def masked(self) -> bool:  # grammars mask its logits: it samples after the previous step's tokens
        return any(seq.grammar is not None for seq, _ in self.targets)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device
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
        self.dtype = config.resolved_dtype(self.arch.dtype)  # "auto": the checkpoint's, on this device
        self.max_model_len = self._context_length(config.max_model_len)
        check_tp_size(self.arch, tp)  # before any process starts
        worker_config = WorkerConfig.derive(config, str(self.source.model_dir), self.max_model_len, self.dtype,
                                            self.source.gguf_file)
        kv_heads = max(1, self.arch.num_kv_heads // tp)  # per rank (a replica each when tp > heads)
        worker_config.check_memory(KVCacheSpec(self.arch.num_layers, kv_heads, self.arch.head_dim, config.block_size,
                                               kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)))
        if tp > 1 and self.device.type == "cuda" and torchrun is None and (self.device.index or 0) != 0:
            raise ValueError(f"device: tensor parallelism runs rank r on cuda:r; got device={self.device}")
        self.executor: Executor = make_executor(worker_config, self.device, config.distributed_timeout_s, torchrun)
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
        self.block_manager = BlockManager(  # blocks are released only where *every* layer's window allows
            num_blocks, config.block_size, num_cpu_blocks=num_cpu, enable_prefix_caching=config.enable_prefix_caching,
            sliding_window=self.arch.uniform_sliding_window, watermark=config.watermark)
        self.scheduler = Scheduler(config, self.block_manager,
                                   self.arch.kv_variant if self.arch.has_kv_variants else None)
        self.step_builder = StepBuilder(self.scheduler.block_table)
        self.sampler = Sampler(self.device, config.seed)
        if self.device.type == "cuda":
            with compile_guard.starting_up():  # its kernel compiles now, not on a request
                self.sampler.warm_up(self.arch.vocab_size, self.dtype)
        self.step_sampler = StepSampler(self.sampler, self.eos_token_ids)
        self.grammars = GrammarCompilerCache(self.tokenizer, self.arch.vocab_size, self.eos_token_ids)
        self.inputs = InputProcessor(self.tokenizer, self.arch.vocab_size, self.max_model_len, config.block_size,
                                     num_blocks, self.device, self.grammars)
        self.outputs = OutputProcessor(self.scheduler, self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = self.num_prompt_tokens = 0
        self.tracer: Any = None  # a viz.TraceRecorder when tracing is on
        self.async_scheduling = (self.device.type == "cuda") if config.async_scheduling is None \
            else config.async_scheduling
        self._inflight: _Launched | None = None
        self._host_copies = HostCopies()
        logger.info("KV pool: %d blocks of %d tokens (%.2f GiB per rank, %s, %d bytes per token), %d CPU swap blocks, "
                    "backend %s, tensor parallel size %d", num_blocks, config.block_size, self.kv_pool.nbytes / _GIB,
                    self.kv_pool.spec.dtype, self.kv_pool.spec.bytes_per_token, num_cpu, self.backend.name,
                    config.tensor_parallel_size)
        freeze_startup_heap()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (if any); the engine is unusable afterwards.  Idempotent."""
        self.executor.shutdown()
        release_startup_heap()

    # ================================================================== requests
    def add_request(self, prompt: PromptInput, params: SamplingParams, request_id: str | None = None,
                    extra_key: object = None, stream: bool = True) -> str:
        """Queue a request.  ``stream=False`` (or ``params.output_kind`` FINAL_ONLY): :meth:`step`
        reports it only once it finishes (saves building partial outputs every step for offline
        batches).  What each report holds is ``params.output_kind``'s (cumulative by default)."""
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        req = self.inputs.make_request(rid, prompt, params, extra_key, stream)
        self.scheduler.refresh_kv_variant(req, req.seqs[0])
        self.requests[rid] = req
        self.scheduler.add(req)
        self.num_prompt_tokens += len(req.prompt_token_ids)
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
        return self.scheduler.has_unfinished() or self._inflight is not None

    def settle(self) -> None:
        """With no request left to run, process the step still in flight (the overlapped loop
        launched it before learning that its sequences had finished), so the engine is idle."""
        while self._inflight is not None and not self.scheduler.has_unfinished():
            self.step()

    # ================================================================== the step
    def step(self) -> list[RequestOutput]:
        """Schedule, launch the step, and return outputs of requests that changed.

        A step left in flight (see the module's docstring) is processed by the next call, after
        that call has launched its own step."""
        if self.tracer is not None:
            self.tracer.begin_step(self.num_steps)
        sched = self.scheduler.schedule()
        cur = self._launch(sched)
        prev, self._inflight = self._inflight, None
        touched = self._process(prev) if prev is not None else []
        if cur is not None and cur.masked and self._can_defer(cur):
            self._sample_on_device(cur, None, launched=True)  # its grammars have taken the previous step's tokens
        if cur is not None and cur.host is not None:
            self._inflight = cur
        elif cur is not None:
            touched += self._process(cur)
        return self._end_step(sched, touched)

    def _launch(self, sched: SchedulerOutput) -> _Launched | None:
        """Run ``sched``'s step (its pending input ids read from the step in flight); sample on
        the device and start the copy to the host when the step can stay in flight."""
        if sched.is_empty and not sched.kv_ops:
            return None
        prev = self._inflight
        rows = {seq.seq_id: i for i, (seq, _) in enumerate(prev.targets)} if prev is not None else None
        step = self.step_builder.build(sched, rows, prev.greedy if prev is not None else False)
        result = self.executor.execute(step, prev.tokens if step.from_prev and prev is not None else None)
        if result.prompt_logits is not None:
            record_prompt_logprobs([(s.request, s.seq, s.start, s.num_new_tokens) for s in sched.scheduled],
                                   result.prompt_logits)
        cur = _Launched(sched, [(s.seq, s.request) for s in sched.scheduled if s.samples], result.rows, step.greedy)
        if self._can_defer(cur) and not cur.masked:
            self._sample_on_device(cur, prev)
        self.scheduler.launched(sched)
        return cur

    def _can_defer(self, cur: _Launched) -> bool:
        """Whether nothing about the step's rows needs the host before the next step."""
        return self.async_scheduling and bool(cur.targets) and all(r.can_overlap for _, r in cur.targets)

    def _sample_on_device(self, cur: _Launched, prev: _Launched | None, launched: bool = False) -> None:
        """Sample ``cur``'s rows into ``cur.tokens`` and start their copy to the host; a failure
        leaves ``cur`` to the synchronous path, which isolates the row at fault.  ``launched``:
        ``cur`` is already counted as pending (its rows' tokens are one fewer after the known ones)."""
        if cur.greedy:
            cur.tokens = cur.out
        else:
            try:
                cur.batch = self.step_sampler.batch(cur.targets, prev.targets if prev else None,
                                                    prev.batch if prev else None, launched)
                cur.tokens = self.sampler.sample(cur.out, cur.batch)
            except Exception:
                cur.batch = None
                return
        cur.host, cur.done = self._host_copies.start(cur.tokens)

    def _process(self, cur: _Launched) -> list[Request]:
        """Apply a step's tokens: read back those sampled on the device, or sample on the host
        (n samples fan out on their first token)."""
        for seq, _ in cur.targets:
            seq.num_pending -= 1
        if cur.host is not None:
            if cur.done is not None:
                self.executor.wait_event(cur.done)
            return self.outputs.apply(cur.targets, cur.host.tolist())
        # Under tensor parallelism on CUDA this is where a dead rank is noticed, rather than in a
        # blocking read of the step's output.
        self.executor.sync()
        rows: list[int] = []
        targets: list[Target] = []
        for r, (seq, req) in enumerate(cur.targets):
            fan_out = req.params.n > 1 and not req.prefill_done
            rows.extend([r] * (len(req.seqs) if fan_out else 1))
            targets.extend((q, req) for q in req.seqs) if fan_out else targets.append((seq, req))
        out = cur.out
        if len(rows) != len(cur.targets):
            out = out[torch.tensor(rows, device=out.device)]
        if cur.greedy:
            return self.outputs.apply(targets, out.tolist())
        ok, sampled, failed = self.step_sampler.on_host(targets, out)
        for req, e in failed:
            self.outputs.fail(req, e)
        touched = self.outputs.apply(ok, sampled.token_ids, sampled.logprobs, sampled.sampled_logprobs)
        return touched + [req for req, _ in failed]

    def _end_step(self, sched: SchedulerOutput, touched: list[Request]) -> list[RequestOutput]:
        self.num_steps += 1
        if self.tracer is not None:
            for r in sched.preempted:
                self.tracer.event("preempt", request=r.request_id, to=r.status.value)
            self.tracer.end_step(self.num_steps - 1, self.scheduler.step_stats(sched))
        outputs = []
        for req in {id(r): r for r in touched}.values():
            if req.finished:
                self.requests.pop(req.request_id, None)
            elif not req.stream:
                continue
            outputs.append(request_output(req))
        return outputs

    # ================================================================== metrics & tracing
    def get_metrics(self) -> dict[str, float | int]:
        return {**self.scheduler.metrics(), "num_steps": self.num_steps,
                "num_generated_tokens": self.outputs.num_generated_tokens, "num_prompt_tokens": self.num_prompt_tokens}

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
