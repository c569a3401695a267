"""Tensor parallelism over ``torch.distributed``: process groups, the worker loop, executors.

The engine's process is rank 0: it schedules, owns the one block manager and samples.  Every
rank holds a shard of the model (Megatron-style, see :mod:`pagedattn.models.layers`) and a KV
pool with its own heads for the same block ids, and runs each step rank 0 broadcasts.
"""

from ..config import DEFAULT_TIMEOUT_S
from .executor import (
    Executor,
    LocalExecutor,
    TensorParallelExecutor,
    WorkerError,
    check_tp_size,
    make_executor,
)
from .group import TorchrunEnv, TPGroup, init_tp_group
from .worker_loop import Shutdown, run_torchrun_worker, serve_steps, spawn_main

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Executor",
    "LocalExecutor",
    "Shutdown",
    "TPGroup",
    "TensorParallelExecutor",
    "TorchrunEnv",
    "WorkerError",
    "check_tp_size",
    "init_tp_group",
    "make_executor",
    "run_torchrun_worker",
    "serve_steps",
    "spawn_main",
]
