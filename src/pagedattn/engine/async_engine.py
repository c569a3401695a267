"""The engine behind an event loop: one thread steps, many coroutines stream.

:class:`LLMEngine` is single-threaded, so :class:`AsyncLLMEngine` gives it exactly one thread
of its own.  Everything that touches engine state (adding and aborting requests, reading
metrics) travels to that thread as a command through a locked queue; the thread runs pending
commands between steps, steps while there is work, and sleeps on a condition variable when
there is none.  Outputs travel back to each request's asyncio queue, a step's outputs for
one event loop in one ``loop.call_soon_threadsafe``.

Requests are checked (tokenized and validated) before they are queued, on a worker thread of
the caller's event loop (a long prompt takes the tokenizer seconds, which must not stall the
loop): those two calls only read the tokenizer and fixed sizes, so a bad request fails in
:meth:`AsyncLLMEngine.generate` itself, before any streaming starts.

A consumer that stops listening (``aclose()``, a cancelled task, a dropped stream) aborts its
request at once, which frees its KV blocks on the next pass of the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from .llm_engine import LLMEngine, PromptInput
from .outputs import RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Command = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


class EngineDeadError(RuntimeError):
    """The engine loop is not running (shut down, or stopped by an error); nothing can be served."""


class RequestStream(AsyncIterator[RequestOutput]):
    """The :class:`RequestOutput` s of one request, ending with a ``finished`` one.

    A slow consumer never falls behind by more than one item: it skips intermediate cumulative
    outputs (each holds everything so far), and gets the DELTA outputs that piled up (``delta``)
    joined into one.  Closing the stream, or cancelling the task that waits on it, aborts the
    request.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None],
                 delta: bool = False) -> None:
        self.request_id = request_id
        self._loop = loop
        self._delta = delta
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._abort_fn = abort
        self._done = False  # set once the final output or an error was handed out, or on abort

    # ----------------------------------------------------------------- engine-thread side
    def put(self, item: RequestOutput | BaseException) -> None:
        """Hand an output (or the error that ends the request) to the consumer's loop."""
        deliver([(self, item)])

    def _put_now(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    # ----------------------------------------------------------------- consumer side
    @property
    def finished(self) -> bool:
        return self._done

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: the consumer went away mid-wait
            self.abort()
            raise
        while not isinstance(item, BaseException) and not item.finished and not self._queue.empty():
            later = self._queue.get_nowait()
            if self._delta and not isinstance(later, BaseException):
                item.add(later)
            else:  # cumulative: only the newest matters
                item = later
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def fail(self, err: BaseException) -> None:
        """Stop the request now and hand its consumer ``err`` (no-op once it finished).
        Call on the consumer's loop."""
        if not self._done:
            self._abort_fn(self.request_id)
            self.put(err)

    def abort(self) -> None:
        """Stop the request now (no-op once it finished).  A consumer waiting on the stream
        sees it end."""
        if not self._done:
            self._done = True
            self._abort_fn(self.request_id)
            self.put(StopAsyncIteration())

    async def aclose(self) -> None:
        self.abort()

    def __del__(self) -> None:
        # Safety net for a stream dropped without being closed: its blocks must not leak.
        if not self._done:
            self._done = True
            with contextlib.suppress(Exception):
                self._abort_fn(self.request_id)


def deliver(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    """Hand each stream its item with one wake-up per event loop: ``call_soon_threadsafe`` wakes
    the loop through a pipe, and one call per stream and step made that write (and the GIL
    hand-offs it causes) a third of the engine thread's time at 256 streams (docs/benchmarks.md,
    "Serving host work")."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput | BaseException]]] = {}
    for stream, item in items:
        by_loop.setdefault(stream._loop, []).append((stream, item))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream._put_now(item)


class AsyncLLMEngine:
    """Run an :class:`LLMEngine` in a background thread and serve it to asyncio code.

    ``start()`` launches the thread (``generate`` starts it too); ``shutdown()`` aborts every
    request, fails their streams with :class:`EngineDeadError` and joins the thread.  If a step
    raises, the loop stops, every pending request fails with :class:`EngineDeadError` (chained
    to the cause) and later calls fail fast.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._init_state()

    def _init_state(self) -> None:
        self._cond = threading.Condition()
        self._commands: deque[_Command] = deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond: no new commands are accepted
        # Engine thread only.  Weak: a stream its consumer dropped unclosed dies, and its
        # request is aborted (by RequestStream.__del__, or here when its next output finds no stream).
        self._streams: weakref.WeakValueDictionary[str, RequestStream] = weakref.WeakValueDictionary()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.error: BaseException | None = None  # what stopped the loop, if it failed

    # ================================================================== lifecycle
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive() and not self._stopping and self.error is None

    @classmethod
    def from_factory(cls, factory: Callable[[], LLMEngine]) -> AsyncLLMEngine:
        """Build the engine *on* its thread, start the loop there, and return once it is built
        (re-raising what ``factory`` raised).

        Prefer this when the calling thread has not run torch work yet (a server process): on
        the CPU, OpenMP keeps one thread pool per thread that runs parallel work, and a second
        pool next to an idle first one makes every small parallel op pay for waking sleeping
        workers (measured: the default model decoded ~40% slower on 2 cores).  Built here,
        every torch op of the process runs on the engine thread."""
        self = cls.__new__(cls)
        self._init_state()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def build_and_run() -> None:
            try:
                self.engine = factory()
            except BaseException as e:
                ready.set_exception(e)
                return
            ready.set_result(None)
            self._run()

        with self._start_lock:
            self._launch(build_and_run)
        ready.result()
        return self

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._start_lock:
            if self._thread is not None:
                return
            if self._stopping:
                raise EngineDeadError("the engine was shut down")
            self._launch(self._run)

    def _launch(self, target: Callable[[], None]) -> None:
        # Daemon: a forced exit must not hang on a step; clean exits go through shutdown().
        self._thread = threading.Thread(target=target, name="pagedattn-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 60.0) -> None:
        """Abort every request and stop the thread (waits for the step in progress)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                logger.warning("engine thread still busy %.0f s after shutdown was requested", timeout or 0)

    # ================================================================== requests
    def prepare(self, prompt: PromptInput, params: SamplingParams) -> dict[str, Any]:
        """Tokenize and validate a prompt on the calling thread (both only read fixed state).

        Returns the pre-tokenized prompt that :meth:`generate` accepts; raises ``ValueError``
        naming the bad field."""
        text, ids = self.engine.inputs.prepare(prompt, params)
        return {"prompt": text, "prompt_token_ids": ids}

    async def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str | None = None,
        extra_key: object = None,
    ) -> RequestStream:
        """Queue a request and return its stream of outputs (of ``params.output_kind``).
        ``extra_key`` salts its prefix-cache keys (``LLMEngine.add_request``).

        Validation errors raise ``ValueError`` here, before anything is queued.  Iterate the
        stream to the end, or close it (``aclose()``/``abort()``) to abort the request."""
        self._check_alive()
        prepared = await asyncio.to_thread(self.prepare, prompt, params)
        rid = uuid.uuid4().hex if request_id is None else str(request_id)
        stream = RequestStream(rid, asyncio.get_running_loop(), self._abort_soon,
                               delta=params.output_kind == RequestOutputKind.DELTA)
        self.start()
        self._submit(lambda: self._add(stream, prepared, params, extra_key))
        return stream

    async def abort(self, request_id: str) -> None:
        """Abort a request by id (no-op when unknown or done)."""
        with contextlib.suppress(EngineDeadError):
            self._submit(lambda: self._abort(request_id))

    async def get_metrics(self) -> dict[str, float | int]:
        """``LLMEngine.get_metrics()``, read on the engine thread so it never races a step."""
        return await self.run_in_engine(lambda e: e.get_metrics())

    async def run_in_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """``fn(engine)`` on the engine thread, between steps (or here, once the thread is gone).
        What ``fn`` raises is re-raised here and leaves the loop running."""

        def call() -> tuple[bool, Any]:
            try:
                return True, fn(self.engine)
            except Exception as e:
                return False, e

        try:
            fut = self._submit(call)
        except EngineDeadError:
            # The loop is gone or leaving: once its thread has exited nothing else touches the engine.
            await asyncio.to_thread(self._join)
            return fn(self.engine)
        ok, value = await asyncio.wrap_future(fut)
        if not ok:
            raise value
        return value

    # ================================================================== caller-side helpers
    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error!r}") from self.error
        if self._stopping:
            raise EngineDeadError("the engine is shut down")

    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._stopping or self.error is not None:
                raise EngineDeadError("the engine is not running")
            self._commands.append((fn, fut))
            self._cond.notify()
        return fut

    def _abort_soon(self, request_id: str) -> None:
        with contextlib.suppress(EngineDeadError):  # a stopped engine has already aborted it
            self._submit(lambda: self._abort(request_id))

    def _join(self) -> None:
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    # ================================================================== engine thread
    def _run(self) -> None:
        try:
            while True:
                self._run_commands(self._wait_for_work())
                if self._stopping:
                    break
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
        except BaseException as e:  # a failed step leaves engine state unknown: stop serving
            logger.exception("engine loop stopped by an error")
            self.error = e
            with self._cond:
                self._stopping = True
            self._fail_all(e)
            return
        self._abort_all()

    def _wait_for_work(self) -> list[_Command]:
        """Block until there are commands, unfinished requests or a stop; take the commands."""
        with self._cond:
            while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                self._cond.wait()
            commands = list(self._commands)
            self._commands.clear()
        return commands

    @staticmethod
    def _run_commands(commands: list[_Command]) -> None:
        for fn, fut in commands:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)
                if not isinstance(e, ValueError):  # a bad command fails alone; anything else is an engine bug
                    raise

    def _add(self, stream: RequestStream, prompt: dict[str, Any], params: SamplingParams,
             extra_key: object = None) -> None:
        rid = stream.request_id
        if rid in self._streams:
            stream.put(ValueError(f"request_id {rid!r} is already in use"))
            return
        try:
            self.engine.add_request(prompt, params, request_id=rid, extra_key=extra_key)
        except ValueError as e:
            stream.put(e)
            return
        self._streams[rid] = stream

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)  # False (and harmless) when already done

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        items: list[tuple[RequestStream, RequestOutput | BaseException]] = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # nobody listens any more
                if not out.finished:
                    self.engine.abort_request(out.request_id)
                continue
            if out.finished:
                del self._streams[out.request_id]
            items.append((stream, out))
        deliver(items)

    def _abort_all(self) -> None:
        """Shutdown: run what was queued, then abort every request and end its stream."""
        with self._cond:
            commands = list(self._commands)
            self._commands.clear()
        self._run_commands(commands)
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
        self._fail_streams(EngineDeadError("the engine was shut down"))

    def _fail_all(self, cause: BaseException) -> None:
        err = EngineDeadError(f"the engine stopped after an error: {cause!r}")
        err.__cause__ = cause
        with self._cond:
            commands = list(self._commands)
            self._commands.clear()
        for _, fut in commands:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(err)
        self._fail_streams(err)

    def _fail_streams(self, err: BaseException) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        deliver([(s, err) for s in streams])

