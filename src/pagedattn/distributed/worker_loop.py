"""What ranks other than 0 run: receive steps from rank 0 and execute them, nothing else.

A worker is started either by the engine (:func:`spawn_main`, the target of a spawned process)
or by ``torchrun`` (:func:`run_torchrun_worker`, called where the engine would have been
built).  Either way it joins the group, receives the :class:`~pagedattn.runtime.worker.WorkerConfig`,
builds its shard and KV pool in lockstep with the others, then loops: one
:class:`~pagedattn.runtime.model_runner.StepInput` in, one forward pass on its shard (its logits
are dropped: rank 0 samples), until :class:`Shutdown`.

Any exception ends the process at once (after leaving its traceback for rank 0): a rank that
falls out of step would only hang the others' collectives.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from ..runtime.model_runner import StepInput
from ..runtime.worker import WorkerConfig, freeze_startup_heap, release_startup_heap, start_worker
from .group import Rendezvous, TorchrunEnv, TPGroup, init_tp_group, make_store, mark_alive, report_error

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shutdown:
    """Rank 0's last message: leave the loop and the group."""


def serve_steps(group: TPGroup) -> None:
    """Build this rank's worker from the configuration rank 0 broadcasts, then execute every
    step it broadcasts until :class:`Shutdown`."""
    config = group.broadcast_object()
    if not isinstance(config, WorkerConfig):
        raise RuntimeError(f"expected the worker configuration first, got {type(config).__name__}")
    if group.device.type == "cpu":
        # The ranks share the machine's cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.world_size))
    worker = start_worker(config, group.rank, group.device, group)
    freeze_startup_heap()
    greedy_tokens: torch.Tensor | None = None  # the last step's, when it was greedy
    while True:
        msg = group.broadcast_object()
        if isinstance(msg, Shutdown):
            worker.release_graphs()  # before the group goes: see Worker.release_graphs
            release_startup_heap()
            return
        if not isinstance(msg, StepInput):
            raise RuntimeError(f"unexpected message from rank 0: {type(msg).__name__}")
        greedy_tokens = worker.execute(msg, _previous_samples(msg, greedy_tokens, group)).tokens


def _previous_samples(step: StepInput, greedy_tokens: torch.Tensor | None, group: TPGroup) -> torch.Tensor | None:
    """The previous step's samples that this step's input ids take from the device (overlapped
    scheduling): rank 0 sends them, unless that step was greedy and every rank holds them."""
    if not step.from_prev:
        return None
    if not step.prev_greedy:
        prev = torch.empty(step.num_prev, dtype=torch.long, device=group.device)
        group.broadcast_tensor(prev)
        return prev
    if greedy_tokens is None or greedy_tokens.shape[0] != step.num_prev:
        raise RuntimeError("an overlapped step takes its ids from a previous greedy step this rank did not run")
    return greedy_tokens


def spawn_main(rank: int, world_size: int, rendezvous: Rendezvous, device_type: str, timeout_s: float,
               parent_pid: int) -> None:
    """Entry point of a worker process started by the engine (rank ``rank`` uses
    ``cuda:<rank>`` on CUDA).  Exits the process when the engine's process goes away."""
    _detach_from_terminal_signals()
    _exit_with_parent(parent_pid)
    store = None
    group: TPGroup | None = None
    try:
        store = make_store(rendezvous, world_size, timeout_s)
        mark_alive(store, rank)
        group = init_tp_group(rank, world_size, rank, device_type, timeout_s, store)
        serve_steps(group)
    except BaseException:
        _die(rank, store if group is None else group.store)
    assert group is not None
    group.destroy()


def run_torchrun_worker(env: TorchrunEnv, device_type: str, timeout_s: float) -> None:
    """A non-zero rank of a ``torchrun`` launch: serve rank 0's engine until it shuts down."""
    if env.rank == 0:
        raise ValueError("rank 0 runs the engine, not the worker loop")
    _detach_from_terminal_signals()
    group: TPGroup | None = None
    try:
        group = init_tp_group(env.rank, env.world_size, env.local_rank, device_type, timeout_s)
        serve_steps(group)
    except BaseException:
        _die(env.rank, None if group is None else group.store)
    assert group is not None
    group.destroy()


def _die(rank: int, store: object) -> None:
    """Report the exception being handled and leave now: cleanup could block on peers."""
    text = f"rank {rank} (pid {os.getpid()}):\n{traceback.format_exc()}"
    report_error(store, rank, text)  # type: ignore[arg-type]
    print(f"pagedattn tensor-parallel worker {text}", file=sys.stderr, flush=True)
    os._exit(1)


def _detach_from_terminal_signals() -> None:
    # Ctrl-C reaches every process of the terminal's group; rank 0 decides when workers stop.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _exit_with_parent(parent_pid: int, period_s: float = 0.5) -> None:
    """Exit when the engine's process dies, even while blocked in a device wait that no
    closed socket would interrupt."""

    def watch() -> None:
        while True:
            time.sleep(period_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="pagedattn-parent-watch", daemon=True).start()
