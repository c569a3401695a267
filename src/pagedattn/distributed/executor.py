"""The engine's side of model execution: one rank in-process, or a tensor-parallel group.

:class:`LocalExecutor` runs everything in the engine's process.  :class:`TensorParallelExecutor`
makes the engine's process rank 0 of a group: it starts the other ranks (spawned processes, or
the other processes of a ``torchrun`` launch), sends each step's :class:`StepInput` to them
before running its own shard, and watches them:

* a worker that fails (an exception at start-up or in a step, or a killed process) stops the
  engine with a :class:`WorkerError` on rank 0 naming the rank and its traceback or exit
  status; the other workers are terminated, never left behind;
* on CUDA every host wait for device work that holds collectives (the result of a step) polls
  the workers' liveness instead of blocking, so a dead peer cannot hang the engine; every wait
  is bounded by ``timeout_s``;
* :meth:`TensorParallelExecutor.shutdown` (also run when the executor is garbage collected and
  at interpreter exit) stops the workers, politely first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import DEFAULT_TIMEOUT_S
from ..models.config import ModelArchConfig
from ..models.layers import AllReduce
from ..models.registry import build_model
from ..runtime.executor import Executor, LocalExecutor
from ..runtime.model_runner import StepInput, StepOutput
from ..runtime.worker import Worker, WorkerConfig, start_worker
from .group import (
    Rendezvous,
    TorchrunEnv,
    TPGroup,
    init_tp_group,
    is_alive_marked,
    make_store,
    rank_device,
    read_error_reports,
)
from .worker_loop import Shutdown, spawn_main

logger = logging.getLogger(__name__)

_POLL_CHECK_S = 0.1  # how often a device wait looks at the workers
_JOIN_S = 10.0  # how long a stopping worker gets before it is terminated


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed or died; the engine cannot go on."""


@dataclass
class _Resources:
    """What must be released however the executor ends: by :meth:`TensorParallelExecutor.shutdown`,
    after a failure, or by the finaliser at garbage collection or interpreter exit (which must
    not hold the executor itself)."""

    procs: list[BaseProcess] = field(default_factory=list)
    group: TPGroup | None = None
    worker: Worker | None = None  # rank 0's, whose CUDA graphs must go before the group
    failed: bool = False  # a rank failed: nothing may wait on the others or on the device
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        graceful = not self.failed and self.group is not None
        if graceful:
            assert self.group is not None
            try:
                self.group.broadcast_object(Shutdown())
                if self.worker is not None:
                    self.worker.release_graphs()
            except Exception as e:
                logger.warning("stopping the tensor-parallel workers in order failed: %r", e)
                graceful = False
        if not graceful:
            _stop_processes(self.procs, 0.0)  # first: nothing of theirs is worth waiting for
        if self.group is not None:
            if graceful:
                self.group.destroy()  # the workers leave theirs at the same time
            else:
                self.group.abort()
        _stop_processes(self.procs, _JOIN_S)


class TensorParallelExecutor:
    """Rank 0 of a tensor-parallel group of ``config.tp_size`` ranks.

    ``torchrun=None``: the engine spawns ranks 1..N-1 itself (``torch.multiprocessing``, spawn;
    rank ``r`` computes on ``cuda:<r>``).  Otherwise this process is rank 0 of a ``torchrun``
    launch whose other ranks run :func:`~pagedattn.distributed.worker_loop.run_torchrun_worker`.
    """

    def __init__(self, config: WorkerConfig, device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 torchrun: TorchrunEnv | None = None) -> None:
        if config.tp_size < 2:
            raise ValueError(f"tp_size must be >= 2 for a tensor-parallel executor, got {config.tp_size}")
        self.config = config
        self.tp_size = config.tp_size
        self.timeout_s = float(timeout_s)
        self.is_torchrun = torchrun is not None
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, _Resources.release, self._res)
        self._lock = threading.Lock()  # one message on the control channel at a time
        # What stopped the engine, as text: the exception itself would hold its traceback's
        # frames, which hold this executor -- a cycle that keeps a failed engine (its KV pool,
        # its graphs) alive until the garbage collector happens to run.
        self._error: str | None = None
        self._closed = False
        self._store: dist.Store | None = None  # where failing workers leave their tracebacks
        local_rank = torchrun.local_rank if torchrun is not None else 0
        self.device = rank_device(device_type, local_rank)
        try:
            store = None if torchrun is not None else self._spawn_workers(device_type)
            self.group = init_tp_group(0, self.tp_size, local_rank, device_type, self.timeout_s, store)
            self._res.group = self.group
            self._store = self.group.store
            self.group.broadcast_object(config)
            self.worker = start_worker(config, 0, self.device, _GuardedCollectives(self))
            self._res.worker = self.worker
        except BaseException as e:
            raise self._fail(e, "start-up") from e
        assert self.worker.pool is not None
        self.num_blocks = self.worker.pool.num_blocks
        logger.info("tensor parallelism: %d ranks (%s), %d KV blocks per rank", self.tp_size,
                    "torchrun" if self.is_torchrun else "spawned workers", self.num_blocks)

    # ================================================================== start-up
    def _spawn_workers(self, device_type: str) -> dist.TCPStore:
        if device_type == "cuda" and torch.cuda.device_count() < self.tp_size:
            raise ValueError(f"tensor_parallel_size={self.tp_size} needs {self.tp_size} GPUs, "
                             f"{torch.cuda.device_count()} are visible")
        store = make_store(None, self.tp_size, self.timeout_s)
        self._store = store
        ctx = mp.get_context("spawn")
        rdzv = Rendezvous("127.0.0.1", store.port)
        for rank in range(1, self.tp_size):
            p = ctx.Process(target=spawn_main, name=f"pagedattn-tp-rank{rank}", daemon=False,
                            args=(rank, self.tp_size, rdzv, device_type, self.timeout_s, os.getpid()))
            p.start()
            self._res.procs.append(p)
        # Workers import torch and this package first; fail fast if one dies doing so instead of
        # waiting out the group's rendezvous timeout.
        deadline = time.monotonic() + self.timeout_s
        pending = set(range(1, self.tp_size))
        while pending:
            pending = {r for r in pending if not is_alive_marked(store, r)}
            self._check_processes()
            if time.monotonic() > deadline:
                raise WorkerError(f"tensor-parallel ranks {sorted(pending)} did not start "
                                  f"within {self.timeout_s:.0f} s")
            if pending:
                time.sleep(0.02)
        return store

    # ================================================================== steps
    def execute(self, step: StepInput, prev: torch.Tensor | None = None) -> StepOutput:
        self._check_usable()
        try:
            with self._lock:
                self.group.broadcast_object(step)
                if prev is not None and not step.prev_greedy:
                    self.group.broadcast_tensor(prev)
                return self.worker.execute(step, prev)
        except BaseException as e:
            raise self._fail(e, "a step") from e

    def sync(self) -> None:
        if self.device.type != "cuda":
            return  # gloo collectives finish on the host; a dead peer fails them at once
        ev = torch.cuda.Event()
        ev.record()
        self.wait_event(ev)

    def wait_event(self, event: torch.cuda.Event) -> None:
        if self.device.type != "cuda":
            event.synchronize()
            return
        try:
            self._poll(event.query, "a step on the GPU")
        except BaseException as e:
            raise self._fail(e, "a step") from e

    def _poll(self, done: Callable[[], bool], what: str) -> None:
        """Spin until ``done()`` (yielding the GIL), checking the workers every ``_POLL_CHECK_S``."""
        start = time.monotonic()
        next_check = start + _POLL_CHECK_S
        while not done():
            now = time.monotonic()
            if now >= next_check:
                self._check_workers()
                if now - start > self.timeout_s:
                    raise WorkerError(f"{what} did not finish within {self.timeout_s:.0f} s (a rank is stuck)")
                next_check = now + _POLL_CHECK_S
            time.sleep(0)

    # ================================================================== health
    def _check_usable(self) -> None:
        if self._error is not None:
            raise WorkerError(f"the tensor-parallel engine stopped after an error: {self._error}")
        if self._closed:
            raise WorkerError("the tensor-parallel engine is shut down")
        self._check_processes()

    def _check_processes(self) -> None:
        """Raise if a spawned worker has exited (cheap: a non-blocking wait per process)."""
        for rank, p in enumerate(self._res.procs, start=1):
            if p.exitcode is not None:
                raise WorkerError(f"tensor-parallel rank {rank} exited unexpectedly ({_describe_exit(p.exitcode)})")

    def _reports(self) -> dict[int, str]:
        return read_error_reports(self._store, self.tp_size)

    def _check_workers(self) -> None:
        self._check_processes()
        errors = self._reports()
        if errors:
            rank = min(errors)
            raise WorkerError(f"tensor-parallel rank {rank} failed:\n{errors[rank]}")

    def _fail(self, cause: BaseException, during: str) -> BaseException:
        """Stop every rank after ``cause`` and return the exception to raise: a
        :class:`WorkerError` explaining a worker's failure when there was one, else ``cause``."""
        if self._error is None:
            self._error = str(cause) or repr(cause)
        explanation = self._explain_worker_failure()
        self._closed = True
        self._res.failed = True
        self._finalizer()  # releases, once
        if explanation is None:
            return cause
        if isinstance(cause, WorkerError) and str(cause) == explanation:
            return cause
        err = WorkerError(f"{explanation}\n(rank 0 was in {during}: {cause!r})")
        self._error = str(err)
        return err

    def _explain_worker_failure(self) -> str | None:
        """What went wrong on the workers, if anything: the report one left, else how its
        process ended.  Gives exiting workers a moment: rank 0 often notices first."""
        deadline = time.monotonic() + 2.0
        while True:
            errors = self._reports()
            if errors:
                rank = min(errors)
                return f"tensor-parallel rank {rank} failed:\n{errors[rank]}"
            dead = [(r, p.exitcode) for r, p in enumerate(self._res.procs, start=1) if p.exitcode is not None]
            # A killed worker leaves no report; one that failed (status 1) may still be writing it.
            if dead and (any(code != 1 for _, code in dead) or time.monotonic() > deadline):
                r, code = next(((r, c) for r, c in dead if c != 1), dead[0])
                return f"tensor-parallel rank {r} exited unexpectedly ({_describe_exit(code)})"
            if not self._res.procs or time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the spawned workers (empty under torchrun)."""
        return [p.pid for p in self._res.procs if p.pid is not None]

    # ================================================================== shutdown
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wait for a step another thread may be running; if it does not end, stop the hard way.
        if self._lock.acquire(timeout=_JOIN_S):
            try:
                self._finalizer()
            finally:
                self._lock.release()
        else:
            self._res.failed = True
            self._finalizer()


class _GuardedCollectives:
    """Rank 0's start-up collectives: the group's, with device waits that watch the workers."""

    def __init__(self, ex: TensorParallelExecutor) -> None:
        self.ex = ex

    def barrier(self) -> None:
        self.ex.group.barrier()

    def min_int(self, value: int) -> int:
        return self.ex.group.min_int(value)

    def fast_all_reduce(self, dtype: torch.dtype, decode_bytes: int) -> AllReduce | None:
        return self.ex.group.fast_all_reduce(dtype, decode_bytes)

    def wait_device(self) -> None:
        if self.ex.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
            self.ex._poll(ev.query, "start-up work on the GPU")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _stop_processes(procs: list[BaseProcess], grace_s: float) -> None:
    """Join, then terminate, then kill: nothing is left running."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)


def check_tp_size(arch: ModelArchConfig, tp_size: int) -> None:
    """Raise ValueError (before anything starts) unless ``arch`` shards over ``tp_size`` ranks:
    builds rank 0's shard on the meta device, so the checks are exactly those of the layers."""
    if tp_size == 1:
        return
    try:
        build_model(arch, torch.float32, "meta", tp_rank=0, tp_size=tp_size)
    except ValueError as e:
        raise ValueError(f"tensor_parallel_size={tp_size} does not fit {arch.architecture}: {e}") from None


def make_executor(config: WorkerConfig, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S,
                  torchrun: TorchrunEnv | None = None) -> Executor:
    """A :class:`LocalExecutor` for ``tp_size == 1``, else a :class:`TensorParallelExecutor`."""
    if config.tp_size == 1:
        return LocalExecutor(config, device)
    return TensorParallelExecutor(config, device.type, timeout_s, torchrun)
