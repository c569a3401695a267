"""How the engine runs a step: the :class:`Executor` interface, and the executor of one rank.

The tensor-parallel executor (``pagedattn.distributed``) implements the same interface over a
group of processes.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .model_runner import StepInput, StepOutput
from .worker import SingleRank, Worker, WorkerConfig, start_worker


class Executor(Protocol):
    """Runs steps on every rank; the engine talks to nothing else below the scheduler."""

    worker: Worker  # this process's rank (rank 0)
    num_blocks: int  # KV blocks of every rank (the same block ids everywhere)

    def execute(self, step: StepInput, prev: torch.Tensor | None = None) -> StepOutput:
        """Run a step on every rank (``prev``: the previous step's samples, see
        :meth:`~.model_runner.ModelRunner.execute`); returns rank 0's output."""

    def sync(self) -> None:
        """Wait for the device work queued so far (a no-op where waits cannot hang)."""

    def wait_event(self, event: torch.cuda.Event) -> None:
        """Wait for ``event``, recorded after device work that may hold collectives."""

    def shutdown(self) -> None:
        """Stop and release every rank but this process; idempotent."""


class LocalExecutor:
    """A world of one: the whole model in the engine's process."""

    def __init__(self, config: WorkerConfig, device: torch.device) -> None:
        self.worker = start_worker(config, 0, device, SingleRank(device))
        self.num_blocks = self.worker.pool.num_blocks if self.worker.pool is not None else 0

    def execute(self, step: StepInput, prev: torch.Tensor | None = None) -> StepOutput:
        return self.worker.execute(step, prev)

    def sync(self) -> None:
        pass

    def wait_event(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def shutdown(self) -> None:
        pass
