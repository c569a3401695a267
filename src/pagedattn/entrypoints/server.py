"""OpenAI-compatible HTTP server: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
and vLLM's ``/tokenize`` and ``/detokenize``.

One :class:`~pagedattn.engine.async_engine.AsyncLLMEngine` serves every connection, so requests
from all clients are batched together by the scheduler.  Streaming responses are server-sent
events in OpenAI's chunk format ending with ``data: [DONE]``.  A client that disconnects
aborts its requests at once (streaming: Starlette cancels the response task; non-streaming: a
watcher on the connection cancels the wait), which frees their KV blocks.

Unset sampling fields take the model's generation_config.json values (``generation_config``
"auto").  An API key and CORS are :mod:`.access`'s; which request fields are implemented,
refused or ignored is :mod:`.openai_protocol`'s.

Errors are OpenAI-shaped JSON (``{"error": {"message", "type", "param", "code"}}``): bad
parameters are 400 (FastAPI's 422 included), a missing or wrong API key 401, an unknown model
404, a body over the size limit 413, a stopped engine 503.  Internal error text goes to the
log, never to a client.

Against hostile or broken clients (limits in :class:`ServerLimits`): request bodies are capped,
prompts are tokenized on a worker thread, connections are capped and must deliver their
headers and body in time (:class:`GuardedH11Protocol`), and failed ``accept()`` calls at the
file-descriptor limit are logged once a minute instead of thousands of times a second.  If the
engine dies, running requests fail, ``/health`` turns 503 and the server exits with status 1 so
that a supervisor restarts it (:class:`Server`); on SIGTERM running requests get the shutdown
grace to finish, then an error (JSON, or an error event plus ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import re
import resource
import signal
import sys
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar

import h11
import jinja2
import pydantic
import uvicorn
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from ..engine.generation_defaults import describe, sampling_defaults
from ..engine.llm_engine import LLMEngine
from ..engine.outputs import CompletionOutput, RequestOutput
from ..engine.sampling_params import SamplingParams
from .access import ServerAccess, install_access
from .chat_output import (
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    ChoiceParser,
    NamedCallParser,
    ParsedDelta,
    RequiredCallsParser,
    TextParser,
    parse_whole,
    reasoning_parser,
    tool_call_parser,
)
from .metrics import ServerMetrics
from .openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatTemplateFields,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    FunctionCallOut,
    ModelCard,
    ModelList,
    PromptLogprob,
    PromptLogprobs,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    ToolCallOut,
    TopLogprob,
    UnsupportedFeatureError,
    UsageInfo,
    check_fields,
    new_id,
    now,
)

logger = logging.getLogger(__name__)

# Engine error prefixes that name something other than the API field at fault.
_PARAM_ALIASES = {"prompt_token_ids": "prompt", "num_kv_blocks": "max_tokens", "sampling params": None}


@dataclass(frozen=True)
class ServerLimits:
    """What one client may take from the server (``pagedattn serve`` flags)."""

    max_body_bytes: int = 4 << 20  # far above any prompt that fits a context; 413 beyond
    max_connections: int = 2048  # open connections, idle ones included; 503 beyond
    header_timeout_s: float = 10.0  # from connecting (or a kept-alive request's first byte) to its last header
    body_timeout_s: float = 30.0  # from the last header to the end of the body
    keep_alive_s: int = 5  # an idle kept-alive connection is closed after this
    shutdown_grace_s: float = 10.0  # running requests get this long to finish on SIGTERM/SIGINT

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"{name}: must be positive, got {value}")


# ====================================================================== errors
class APIError(Exception):
    """An error answered as OpenAI's error JSON with the given HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        # The message may quote client text, which may hold lone surrogates: escape them, as
        # JSON cannot carry them in UTF-8.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def bad_request(cls, e: ValueError, prompt_param: str = "prompt") -> APIError:
        """A 400 for a ``ValueError`` of the engine, naming the field it starts with."""
        msg = str(e)
        param = getattr(e, "param", None)
        if param is None:
            m = re.match(r"(?:SamplingParams\.)?([A-Za-z_ ]+):", msg)
            param = _PARAM_ALIASES.get(m.group(1), m.group(1)) if m else None
        if param == "prompt":
            param = prompt_param
        return cls(400, msg, param=param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


def _engine_gone() -> APIError:
    # The cause is in the log (the engine loop logs it); a client learns only that it is gone.
    return APIError(503, "the engine is not running", type="server_error", code="engine_unavailable")


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another replica or later", type="server_error",
                    code="server_shutting_down")


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400: the first problem, with its field as ``param``."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
    # Union members add their type name to the location (e.g. "prompt.str"); keep the field path.
    param = ".".join(p for p in loc if not re.fullmatch(r"[a-z]+\[.*\]|str|int|float|bool|list|dict", p)) or None
    where = f"{param}: " if param else "request body: "
    got = "" if err.get("type") == "missing" else f" (got {_short(err.get('input'))})"
    return APIError(400, f"{where}{err.get('msg', 'invalid value')}{got}", param=param)


def _short(value: Any, limit: int = 80) -> str:
    """A bounded, printable rendering of whatever the client sent (JSON values, or raw bytes)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    s = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ====================================================================== server state
@dataclass(frozen=True)
class ChatParsing:
    """How chat answers are split (``pagedattn serve --tool-call-parser / --reasoning-parser``):
    tool calls out of the text for ``tool_choice: "auto"`` (``hermes``, ``llama3_json``; None:
    "auto" with tools is refused), reasoning out of the content (``qwen3``, ``deepseek_r1``)."""

    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser: must be one of {', '.join(TOOL_CALL_PARSERS)}; "
                             f"got {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser: must be one of {', '.join(REASONING_PARSERS)}; "
                             f"got {self.reasoning_parser!r}")

    def for_request(self, req: ChatCompletionRequest, params: SamplingParams) -> Callable[[], ChoiceParser] | None:
        """A maker of each choice's parser, None when the text is all content.  A constrained
        answer (response_format, a required or named tool choice) starts with no reasoning block
        open: ``qwen3`` (an answer opens it itself) still applies, ``deepseek_r1`` does not."""
        tools = self._tools(req)
        reasoning = self.reasoning_parser
        if params.structured_outputs is not None and reasoning != "qwen3":
            reasoning = None
        if tools is None and reasoning is None:
            return None
        return lambda: ChoiceParser(reasoning_parser(reasoning) if reasoning else None, tools() if tools else None)

    def _tools(self, req: ChatCompletionRequest) -> Callable[[], TextParser] | None:
        choice = req.effective_tool_choice
        named = req.tool_function()
        if named is not None:
            return lambda: NamedCallParser(named.name)
        if choice == "required":
            return RequiredCallsParser
        if choice != "auto" or not req.tools:
            return None
        name = self.tool_call_parser
        if name is None:
            raise APIError(400, "tool_choice: 'auto' with tools needs a server started with --tool-call-parser "
                           f"({', '.join(TOOL_CALL_PARSERS)}); use 'required', a named function or 'none'",
                           param="tool_choice")
        return lambda: tool_call_parser(name)


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_name: str
    limits: ServerLimits = field(default_factory=ServerLimits)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    # The model's generation_config.json values for sampling fields a request leaves unset.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    _token_text: dict[int, str] = field(default_factory=dict)
    # Requests that may still run; weak, so that finished ones need no bookkeeping.
    live: weakref.WeakSet[Generation] = field(default_factory=weakref.WeakSet)
    closed: bool = False  # past the shutdown grace: running requests were failed, new ones are refused
    chat: ChatParsing = field(default_factory=lambda: ChatParsing())

    def close_after(self, grace_s: float) -> None:
        """Shutdown began: in ``grace_s`` fail whatever still runs (its client gets an error
        rather than a cut connection) and refuse new requests."""
        asyncio.get_running_loop().call_later(grace_s, self._close)

    def _close(self) -> None:
        self.closed = True
        for gen in list(self.live):
            gen.fail(_shutting_down())

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{self.model_name}`).",
                           param="model", code="model_not_found")

    def token_text(self, token_id: int) -> str:
        """A token's own text, for logprobs (cached; the vocabulary is fixed)."""
        s = self._token_text.get(token_id)
        if s is None:
            tok = self.engine.tokenizer
            s = tok.decode([token_id]) if tok is not None else str(token_id)
            self._token_text[token_id] = s
        return s

    def chat_prompt(self, req: ChatTemplateFields) -> dict[str, Any]:
        """The conversation through the model's chat template, as a pre-tokenized prompt."""
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        msgs = [m.to_template_dict() for m in req.messages]
        for i, m in enumerate(msgs):
            _check_unicode(m["content"], f"messages.{i}.content")
            _check_json_unicode(m.get("tool_calls"), f"messages.{i}.tool_calls")
        _check_json_unicode(req.documents, "documents")
        kwargs = _template_variables(tok, req.chat_template_kwargs or {})
        generation_prompt = req.generation_prompt  # outside the try: its own error names its own field
        tools = [t.to_template_dict() for t in req.tools] if req.tools else None
        _check_json_unicode(tools, "tools")
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt,
                                           continue_final_message=req.continue_final_message,
                                           documents=req.documents, tools=tools, **kwargs)
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from None
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=req.add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
        """A text prompt's token ids (checked: there is a tokenizer, the text is Unicode)."""
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, f"{param}: this model has no tokenizer; pass token ids", param=param)
        _check_unicode(text, param)
        return list(tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "tokens: this model has no tokenizer", param="tokens")
        vocab = self.engine.engine.arch.vocab_size
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise APIError(400, f"tokens: ids {bad[:5]} outside the vocabulary [0, {vocab})", param="tokens")
        return str(tok.decode(ids))


def _check_unicode(text: str, param: str) -> None:
    """JSON may carry lone surrogates (``"\\ud800"``), which are no text a tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param}: not valid Unicode text ({e.reason} at character {e.start})",
                       param=param) from None


def _check_json_unicode(value: Any, param: str) -> None:
    """``_check_unicode`` for every string of a JSON value (keys too), naming the path."""
    if isinstance(value, str):
        _check_unicode(value, param)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_unicode(v, f"{param}.{i}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, param)
            _check_json_unicode(v, f"{param}.{k}")


def _template_variables(tok: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``chat_template_kwargs`` checked: a name of ``apply_chat_template``'s own parameters
    would change the call rather than set a template variable (``tokenize``, ``chat_template``:
    a template of the client's), so it is refused."""
    own = {name for name, p in inspect.signature(tok.apply_chat_template).parameters.items()
           if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} | {"messages", "conversation"}
    for key in kwargs:
        if key in own:
            raise APIError(400, f"chat_template_kwargs.{key}: not a template variable but a parameter of the "
                           "template call (the request's own field sets it, where there is one)",
                           param=f"chat_template_kwargs.{key}")
    _check_json_unicode(kwargs, "chat_template_kwargs")
    return kwargs


# ====================================================================== one API request
class Generation:
    """The engine requests behind one API request (one per prompt) and their merged outputs."""

    def __init__(self, state: ServerState, prompts: list[dict[str, Any]], params: SamplingParams,
                 request_id: str, arrival: float, cache_salt: str | None = None) -> None:
        self.state = state
        self.prompts = prompts  # tokenized and validated
        self.params = params
        self.request_id = request_id
        self.arrival = arrival
        self.cache_salt = cache_salt  # salts the prefix-cache keys of every prompt
        self.streams: list[RequestStream] = []

    @classmethod
    async def create(cls, state: ServerState, make_prompts: Callable[[], list[Any]], params: SamplingParams,
                     request_id: str, prompt_param: str = "prompt", cache_salt: str | None = None) -> Generation:
        """Build the prompts (``make_prompts``) and tokenize and check them, on a worker thread:
        a long prompt takes the tokenizer seconds, which must not stall every other client.
        Every prompt is checked before any is queued: a bad one must not leave the others running."""
        arrival = time.monotonic()
        engine = state.engine

        def prepare() -> list[dict[str, Any]]:
            return [engine.prepare(p, params) for p in make_prompts()]

        try:
            prompts = await asyncio.to_thread(prepare)
        except ValueError as e:
            raise APIError.bad_request(e, prompt_param) from None
        return cls(state, prompts, params, request_id, arrival, cache_salt)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p["prompt_token_ids"]) for p in self.prompts)

    async def start(self) -> None:
        if self.state.closed:
            raise _shutting_down()
        self.state.live.add(self)
        try:
            for i, p in enumerate(self.prompts):
                self.streams.append(await self.state.engine.generate(p, self.params, f"{self.request_id}-{i}",
                                                                     extra_key=self.cache_salt))
        except BaseException:
            self.abort()
            raise
        if self.state.closed:  # the grace ended while this was being queued
            self.fail(_shutting_down())

    def abort(self) -> None:
        for s in self.streams:
            s.abort()

    def fail(self, err: Exception) -> None:
        """End every request now; whoever reads the outputs gets ``err``."""
        for s in self.streams:
            s.fail(err)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(prompt index, output)`` as they come, until every prompt finished: what is new
        since the last one for a stream, one final output for a response (``params.output_kind``).
        Leaving early (error, cancellation, close) aborts what is still running."""
        timers = [self.state.metrics.timer(self.arrival) for _ in self.streams]
        merged = _merge(self.streams)
        try:
            async for i, out in merged:
                if out.error is not None:  # this request failed alone (logged by the engine)
                    raise APIError(500, "internal error while generating this request", type="server_error")
                timers[i].on_output(out)
                yield i, out
        finally:
            self.abort()
            await merged.aclose()

    async def finals(self) -> list[RequestOutput]:
        last: list[RequestOutput | None] = [None] * len(self.streams)
        async for i, out in self.outputs():
            last[i] = out
        assert all(o is not None for o in last)
        return last  # type: ignore[return-value]


async def _merge(streams: list[RequestStream]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    if len(streams) == 1:  # the common case needs no helper tasks
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finished
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body was already read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work`` but cancel it (aborting its requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


class ClientDisconnected(Exception):
    pass


# ====================================================================== streaming deltas
@dataclass
class _ChoiceCursor:
    """What of one choice was already sent."""

    tokens: int = 0  # output tokens (the usage's count)
    text_offset: int = 0  # legacy logprobs' running character offset
    done: bool = False


def _advance(cur: _ChoiceCursor, c: CompletionOutput, want_tokens: bool) -> CompletionOutput | None:
    """Choice ``c`` of a DELTA output (what is new since the last one; the engine holds back
    text that may begin a stop string) when it is worth a chunk, else None."""
    if cur.done:
        return None
    cur.tokens += len(c.token_ids)
    cur.done = c.finished
    if not (c.text or c.finished or (want_tokens and c.token_ids)):
        return None
    return c


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def _sse_error(e: Exception) -> str:
    return _sse(_to_api_error(e).body().model_dump_json())


def _to_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return _engine_gone()
    if isinstance(e, ValueError):
        return APIError.bad_request(e)
    logger.error("request failed", exc_info=e)
    return APIError(500, "internal server error", type="server_error")


# ====================================================================== logprobs
def _completion_logprobs(state: ServerState, token_ids: list[int], lps: list[dict[int, float]],
                         cur: _ChoiceCursor) -> CompletionLogprobs:
    """OpenAI's legacy format: the sampled token and up to ``logprobs`` alternatives per token."""
    out = CompletionLogprobs()
    for tid, d in zip(token_ids, lps):
        s = state.token_text(tid)
        out.tokens.append(s)
        out.token_logprobs.append(d.get(tid))
        top: dict[str, float] = {}
        for t, v in sorted(d.items(), key=lambda kv: -kv[1]):
            top.setdefault(state.token_text(t), v)  # ids sharing a text keep the likelier one
        out.top_logprobs.append(top)
        out.text_offset.append(cur.text_offset)
        cur.text_offset += len(s)
    return out


def _chat_logprobs(state: ServerState, token_ids: list[int], lps: list[dict[int, float]], k: int) -> ChatLogprobs:
    content = []
    for tid, d in zip(token_ids, lps):
        top = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        s = state.token_text(tid)
        content.append(ChatTokenLogprob(
            token=s, logprob=d[tid], bytes=list(s.encode()),
            top_logprobs=[TopLogprob(token=(ts := state.token_text(t)), logprob=v, bytes=list(ts.encode()))
                          for t, v in top],
        ))
    return ChatLogprobs(content=content)


def _prompt_logprobs(state: ServerState, out: RequestOutput) -> PromptLogprobs | None:
    """vLLM's ``prompt_logprobs``: per prompt token (None for the first) id -> logprob and text."""
    if out.prompt_logprobs is None:
        return None
    return [None if d is None else {str(t): PromptLogprob(logprob=v, decoded_token=state.token_text(t))
                                    for t, v in d.items()} for d in out.prompt_logprobs]


@dataclass
class _Echo:
    """What ``echo`` puts before a choice: the prompt's text and, with logprobs, its tokens'."""

    text: str
    logprobs: CompletionLogprobs | None


def _echo(state: ServerState, req: CompletionRequest, out: RequestOutput, cur: _ChoiceCursor) -> _Echo | None:
    if not req.echo:
        return None
    tok = state.engine.tokenizer
    text = out.prompt if out.prompt is not None else (tok.decode(out.prompt_token_ids) if tok is not None else "")
    if req.logprobs is None:
        return _Echo(text, None)
    lp = CompletionLogprobs()
    entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    for tid, d in zip(out.prompt_token_ids, entries):
        s = state.token_text(tid)
        lp.tokens.append(s)
        lp.token_logprobs.append(None if d is None else d.get(tid))
        top: dict[str, float] | None = None
        if d is not None:  # the token and the completion's number of alternatives
            best = sorted(d.items(), key=lambda kv: -kv[1])[:req.logprobs]
            top = {}
            for t, v in [*best, (tid, d[tid])]:
                top.setdefault(state.token_text(t), v)
        lp.top_logprobs.append(top)
        lp.text_offset.append(cur.text_offset)
        cur.text_offset += len(s)
    return _Echo(text, lp)


def _joined(a: CompletionLogprobs | None, b: CompletionLogprobs | None) -> CompletionLogprobs | None:
    if a is None or b is None:
        return a or b
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


def _usage(gen: Generation, finals: list[RequestOutput | None], completion: int | None = None) -> UsageInfo:
    """``completion``: the output tokens a stream counted (default: those of ``finals``)."""
    if completion is None:
        completion = sum(len(c.token_ids) for o in finals if o is not None for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in finals if o is not None)
    return UsageInfo.of(gen.num_prompt_tokens, completion, cached)


def _counted(cursors: Iterable[_ChoiceCursor]) -> int:
    return sum(cur.tokens for cur in cursors)


# ====================================================================== endpoints
def _completions_stream(state: ServerState, req: CompletionRequest, gen: Generation) -> AsyncIterator[str]:
    cid, created, n = gen.request_id, now(), req.n
    want_lp, ids = req.logprobs is not None, req.return_token_ids
    cursors: dict[tuple[int, int], _ChoiceCursor] = {}
    last: list[RequestOutput | None] = [None] * len(gen.prompts)
    firsts: dict[int, RequestOutput] = {}

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        if usage is None and req.usage_in_every_chunk:
            usage = _usage(gen, last, _counted(cursors.values()))
        return _sse(CompletionResponse(id=cid, created=created, model=state.model_name, choices=choices,
                                       usage=usage).model_dump_json())

    async def events() -> AsyncIterator[str]:
        try:
            async for i, out in gen.outputs():
                last[i] = out
                opening = firsts.setdefault(i, out)  # a prompt's first output holds its prompt logprobs
                for c in out.outputs:
                    # A choice's first chunk carries the echoed prompt and the prompt logprobs.
                    first = (i, c.index) not in cursors
                    cur = cursors.setdefault((i, c.index), _ChoiceCursor())
                    echo = _echo(state, req, opening, cur) if first else None
                    plp = _prompt_logprobs(state, opening) if first and req.prompt_logprobs is not None else None
                    d = _advance(cur, c, want_lp or ids)
                    if d is None and echo is None and plp is None and not (ids and first):
                        continue
                    lp = _completion_logprobs(state, d.token_ids, d.logprobs, cur) \
                        if d is not None and d.logprobs is not None else None
                    yield chunk([CompletionChoice(
                        index=i * n + c.index, text=(echo.text if echo else "") + (d.text if d else ""),
                        logprobs=_joined(echo.logprobs if echo else None, lp), prompt_logprobs=plp,
                        finish_reason=d.finish_reason if d else None, stop_reason=d.stop_reason if d else None,
                        token_ids=(d.token_ids if d else []) if ids else None,
                        prompt_token_ids=opening.prompt_token_ids if ids and first else None)])
            if req.include_usage_in_stream:
                yield chunk([], _usage(gen, last, _counted(cursors.values())))
        except Exception as e:
            yield _sse_error(e)
        yield _sse("[DONE]")

    return events()


def _chat_stream(state: ServerState, req: ChatCompletionRequest, gen: Generation,
                 parser: Callable[[], ChoiceParser] | None) -> AsyncIterator[str]:
    cid, created = gen.request_id, now()
    want_lp, ids = req.logprobs, req.return_token_ids
    k = req.top_logprobs or 0
    cursors: dict[int, _ChoiceCursor] = {}
    parsers: dict[int, ChoiceParser] = {}
    last: list[RequestOutput | None] = [None]
    usage_field = req.include_usage_in_stream

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None,
              prompt_token_ids: list[int] | None = None) -> str:
        if usage is None and req.usage_in_every_chunk:
            usage = _usage(gen, last, _counted(cursors.values()))
        data = ChatCompletionChunk(id=cid, created=created, model=state.model_name, choices=choices,
                                   usage=usage, prompt_token_ids=prompt_token_ids).model_dump()
        for ch in data["choices"]:  # a delta carries only what changed, as OpenAI's do
            ch["delta"] = _without_none(ch["delta"])
        return _sse(json.dumps(data, ensure_ascii=False, separators=(",", ":")))

    def choice(d: CompletionOutput, lp: ChatLogprobs | None) -> ChatChunkChoice | None:
        token_ids = d.token_ids if ids else None
        if parser is None:
            return ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text), logprobs=lp,
                                   finish_reason=d.finish_reason, stop_reason=d.stop_reason, token_ids=token_ids)
        p = parsers.setdefault(d.index, parser())
        parsed = p.feed(d.text)
        if d.finish_reason is not None:
            parsed += p.finish()
        finish = _finish_reason(d.finish_reason, p.num_calls)
        delta = _parsed_delta(parsed, req.include_reasoning)
        if delta == DeltaMessage() and finish is None and lp is None and not token_ids:
            return None  # held back (a tag's start, a call not complete yet) or left out (reasoning)
        return ChatChunkChoice(index=d.index, delta=delta, logprobs=lp, finish_reason=finish,
                               stop_reason=d.stop_reason, token_ids=token_ids)

    async def events() -> AsyncIterator[str]:
        try:
            # The role comes first, before any token, as OpenAI does.
            for j in range(req.n):
                yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))],
                            prompt_token_ids=gen.prompts[0]["prompt_token_ids"] if ids and j == 0 else None)
            async for _, out in gen.outputs():
                last[0] = out
                for c in out.outputs:
                    cur = cursors.setdefault(c.index, _ChoiceCursor())
                    d = _advance(cur, c, want_lp or ids)
                    if d is None:
                        continue
                    lp = _chat_logprobs(state, d.token_ids, d.logprobs, k) if d.logprobs is not None else None
                    ch = choice(d, lp)
                    if ch is not None:
                        yield chunk([ch])
            if usage_field:
                yield chunk([], _usage(gen, last, _counted(cursors.values())))
        except Exception as e:
            yield _sse_error(e)
        yield _sse("[DONE]")

    return events()


def _completion_response(state: ServerState, req: CompletionRequest, gen: Generation,
                         finals: list[RequestOutput]) -> CompletionResponse:
    choices = []
    ids = req.return_token_ids
    for i, out in enumerate(finals):
        plp = _prompt_logprobs(state, out) if req.prompt_logprobs is not None else None
        for c in out.outputs:
            lp, cur = None, _ChoiceCursor()
            echo = _echo(state, req, out, cur)
            if req.logprobs is not None and c.logprobs is not None:
                lp = _completion_logprobs(state, c.token_ids, c.logprobs, cur)
            choices.append(CompletionChoice(index=i * req.n + c.index, text=(echo.text if echo else "") + c.text,
                                            logprobs=_joined(echo.logprobs if echo else None, lp),
                                            prompt_logprobs=plp, finish_reason=c.finish_reason,
                                            stop_reason=c.stop_reason, token_ids=c.token_ids if ids else None,
                                            prompt_token_ids=out.prompt_token_ids if ids else None))
    choices.sort(key=lambda ch: ch.index)
    return CompletionResponse(id=gen.request_id, created=now(), model=state.model_name, choices=choices,
                              usage=_usage(gen, list(finals)))


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _finish_reason(reason: str | None, num_calls: int) -> str | None:
    """OpenAI's "tool_calls" for an answer that called tools and ended by itself."""
    return "tool_calls" if reason == "stop" and num_calls else reason


def _parsed_delta(parsed: ParsedDelta, include_reasoning: bool) -> DeltaMessage:
    calls = [DeltaToolCall(index=c.index, id=c.id, type="function" if c.id is not None else None,
                           function=DeltaFunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.tool_calls]
    return DeltaMessage(content=parsed.content or None, tool_calls=calls or None,
                        reasoning_content=(parsed.reasoning if include_reasoning else None) or None)


def _parsed_message(parsed: ParsedDelta, include_reasoning: bool) -> ChatMessageOut:
    calls = [ToolCallOut(id=c.id or "", function=FunctionCallOut(name=c.name or "", arguments=c.arguments))
             for c in parsed.tool_calls]
    # OpenAI's content is null next to tool calls unless the model wrote text too.
    content = parsed.content if parsed.content or not calls else None
    return ChatMessageOut(content=content, tool_calls=calls or None,
                          reasoning_content=(parsed.reasoning if include_reasoning else None) or None)


def _chat_response(state: ServerState, req: ChatCompletionRequest, gen: Generation, final: RequestOutput,
                   parser: Callable[[], ChoiceParser] | None) -> ChatCompletionResponse:
    choices = []
    for c in sorted(final.outputs, key=lambda c: c.index):
        lp = None
        if req.logprobs and c.logprobs is not None:
            lp = _chat_logprobs(state, c.token_ids, c.logprobs, req.top_logprobs or 0)
        message, finish = ChatMessageOut(content=c.text), c.finish_reason
        if parser is not None:
            parsed = parse_whole(parser(), c.text)
            message, finish = _parsed_message(parsed, req.include_reasoning), _finish_reason(
                c.finish_reason, len(parsed.tool_calls))
        choices.append(ChatChoice(index=c.index, message=message, logprobs=lp, finish_reason=finish,
                                  stop_reason=c.stop_reason, token_ids=c.token_ids if req.return_token_ids else None))
    return ChatCompletionResponse(id=gen.request_id, created=now(), model=state.model_name, choices=choices,
                                  usage=_usage(gen, [final]),
                                  prompt_logprobs=_prompt_logprobs(state, final) if req.prompt_logprobs is not None
                                  else None,
                                  prompt_token_ids=final.prompt_token_ids if req.return_token_ids else None)


def _sampling_params(state: ServerState, req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    try:
        return req.to_sampling_params(state.sampling_defaults)
    except UnsupportedFeatureError as e:
        raise APIError(400, str(e), param=e.param) from None
    except ValueError as e:
        raise APIError.bad_request(e) from None


def _chat_parser(state: ServerState, req: ChatCompletionRequest,
                 params: SamplingParams) -> Callable[[], ChoiceParser] | None:
    try:
        return state.chat.for_request(req, params)
    except UnsupportedFeatureError as e:
        raise APIError(400, str(e), param=e.param) from None


def _completion_prompts(state: ServerState, req: CompletionRequest) -> Callable[[], list[Any]]:
    """The prompts to queue; text ones tokenized here when the request wants no special tokens."""
    if req.add_special_tokens:
        return req.prompts

    def encoded() -> list[Any]:
        return [{"prompt": p, "prompt_token_ids": state.encode(p, False)} if isinstance(p, str) else p
                for p in req.prompts()]

    return encoded


def _tokenize_request(body: dict[str, Any]) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """vLLM's two request shapes, told apart by their one required field."""
    if ("prompt" in body) == ("messages" in body):
        raise APIError(400, "prompt: give either prompt (a text) or messages (a conversation)", param="prompt")
    cls = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    return _validated(cls, body)


def _validated(cls: type[pydantic.BaseModel], body: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(body)
    except pydantic.ValidationError as e:
        raise RequestValidationError(e.errors()) from None


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _respond(raw: Request, gen: Generation, stream: bool,
                   make_stream: Callable[[], AsyncIterator[str]],
                   make_body: Callable[[list[RequestOutput]], Any]) -> Response:
    await gen.start()
    if stream:
        async def abort_leftovers() -> None:  # e.g. the client left before the first chunk was sent
            gen.abort()

        return StreamingResponse(make_stream(), media_type="text/event-stream", headers=_SSE_HEADERS,
                                 background=BackgroundTask(abort_leftovers))
    try:
        finals = await _unless_disconnected(raw, gen.finals())
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; keeps the log honest
    return JSONResponse(make_body(finals).model_dump(exclude_none=False))


# ====================================================================== the app
def create_app(async_engine: AsyncLLMEngine, served_model_name: str, limits: ServerLimits | None = None,
               enable_docs: bool = False, access: ServerAccess | None = None,
               chat: ChatParsing | None = None) -> FastAPI:
    """The FastAPI app for one engine.  Its lifespan starts the engine thread and shuts it down.

    ``enable_docs`` serves the OpenAPI schema and its pages (``/docs``, ``/redoc``); they are
    off by default, as they tell anyone who can connect everything the server accepts.
    ``access``: an API key and CORS (none by default).  ``chat``: the tool-call and reasoning
    parsers of chat answers (none by default)."""
    state = ServerState(async_engine, served_model_name, limits or ServerLimits(),
                        sampling_defaults=model_sampling_defaults(async_engine), chat=chat or ChatParsing())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(async_engine.shutdown)

    docs: dict[str, Any] = {} if enable_docs else {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(title="pagedattn", version=_version(), lifespan=lifespan, **docs)
    app.state.server = state
    app.add_middleware(BodyLimit, state=state)
    install_access(app, access or ServerAccess(), lambda: state.metrics.http_errors.labels(status="401").inc())
    _install_error_handlers(app, state)

    @app.get("/health")
    async def health() -> Response:
        if async_engine.is_running and not state.closed:
            return JSONResponse({"status": "ok"})
        return (_shutting_down() if state.closed else _engine_gone()).response()

    @app.get("/metrics")
    async def metrics() -> Response:
        snapshot = await async_engine.get_metrics()
        return Response(state.metrics.render(snapshot), media_type=CONTENT_TYPE_LATEST)

    def card() -> ModelCard:
        return ModelCard(id=served_model_name, max_model_len=async_engine.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        state.check_model(model)
        return card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        state.check_model(req.model)
        params = _sampling_params(state, req)
        gen = await Generation.create(state, _completion_prompts(state, req), params, new_id("cmpl"),
                                      cache_salt=req.cache_salt)
        return await _respond(raw, gen, req.stream, lambda: _completions_stream(state, req, gen),
                              lambda finals: _completion_response(state, req, gen, finals))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        state.check_model(req.model)
        params = _sampling_params(state, req)
        parser = _chat_parser(state, req, params)
        gen = await Generation.create(state, lambda: [state.chat_prompt(req)], params, new_id("chatcmpl"),
                                      prompt_param="messages", cache_salt=req.cache_salt)
        return await _respond(raw, gen, req.stream, lambda: _chat_stream(state, req, gen, parser),
                              lambda finals: _chat_response(state, req, gen, finals[0], parser))

    @app.post("/tokenize")
    async def tokenize(body: Annotated[dict[str, Any], Body()]) -> Response:
        req = _tokenize_request(body)
        if req.model is not None:
            state.check_model(req.model)
        check_fields(req)  # a refused field is a 400 naming it (the UnsupportedFeatureError handler)
        # On a worker thread, as for generation: a long prompt takes the tokenizer seconds.
        ids = await asyncio.to_thread(_tokenize, state, req)
        strs = async_engine.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=async_engine.max_model_len, tokens=ids,
                                             token_strs=strs).model_dump())

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> Response:
        if req.model is not None:
            state.check_model(req.model)
        check_fields(req)  # a refused field is a 400 naming it (the UnsupportedFeatureError handler)
        text = await asyncio.to_thread(state.decode, req.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    return app


def _tokenize(state: ServerState, req: TokenizeCompletionRequest | TokenizeChatRequest) -> list[int]:
    if isinstance(req, TokenizeChatRequest):
        return list(state.chat_prompt(req)["prompt_token_ids"])
    return state.encode(req.prompt, req.add_special_tokens)


def model_sampling_defaults(engine: AsyncLLMEngine) -> dict[str, Any]:
    """The model's generation_config.json sampling values, unless the engine's generation_config is "none"."""
    inner = engine.engine
    return sampling_defaults(inner.source.generation_defaults, inner.config.generation_config)


def _too_large(limits: ServerLimits) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limits.max_body_bytes} bytes",
                    code="request_too_large")


class BodyLimit:
    """413 for a request body over ``limits.max_body_bytes``: at once when its Content-Length
    says so, else (chunked) as soon as the bytes read pass the limit, before the body is parsed.

    (Starlette's own limit answers in text/plain, and overrides the app's JSON answer.)"""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.state.limits.max_body_bytes
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            self.state.metrics.http_errors.labels(status="413").inc()
            return await _too_large(self.state.limits).response()(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # FastAPI passes HTTP exceptions from the body read on to the handlers
                raise StarletteHTTPException(413)
            return message

        await self.app(scope, counted, send)


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    def answer(err: APIError) -> JSONResponse:
        state.metrics.http_errors.labels(status=str(err.status)).inc()
        return err.response()

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return answer(_to_api_error(exc))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return answer(_validation_error(exc))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 413:
            return answer(_too_large(state.limits))
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return answer(APIError(exc.status_code, str(exc.detail), type=kind))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return answer(APIError(500, "internal server error", type="server_error"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(EngineDeadError, on_api_error)
    app.add_exception_handler(UnsupportedFeatureError, on_api_error)  # a 400 naming the field
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


def _version() -> str:
    from .. import __version__

    return __version__


# ====================================================================== running it
def default_model_name(model: str | None, source: Any) -> str:
    """``--model`` as given, else the embedded model's name: its GGUF file name without
    ``.gguf`` and without a trailing quantization tag (``SmolLM2-135M-Instruct``)."""
    if model:
        return model
    gguf = getattr(source, "gguf_file", None)
    if gguf is None:
        return Path(source.model_dir).name
    return re.sub(r"[.-](?:[QqFf]\d\w*|I[Qq]\d\w*|[Bb][Ff]16)$", "", Path(gguf).name.removesuffix(".gguf"))


# ====================================================================== the transport
def _refusal(status: int, reason: str, err: APIError) -> bytes:
    """A whole HTTP response that closes the connection, written before (or instead of) any request."""
    body = err.body().model_dump_json().encode()
    retry = "retry-after: 1\r\n" if status == 503 else ""
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{retry}\r\n")
    return head.encode() + body


_TOO_MANY_CONNECTIONS = _refusal(503, "Service Unavailable", APIError(
    503, "too many open connections; retry later", type="server_error", code="too_many_connections"))
_NOT_HTTP = _refusal(400, "Bad Request", APIError(400, "malformed HTTP request (or headers over 16 KiB)"))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the guards it lacks against clients that hold sockets.

    - A connection cap, checked when a connection is accepted: beyond it the client gets a 503
      at once and the connection ends.  (uvicorn's ``limit_concurrency`` answers only once a
      whole request has arrived, which a client sending partial headers never lets happen, so
      such sockets piled up to the file-descriptor limit.)
    - Deadlines: a request's headers must be complete ``header_timeout_s`` after the connection
      opened (or after the first byte of a kept-alive connection's next request), its body
      ``body_timeout_s`` after its headers; a client that misses one is disconnected.  Idle
      kept-alive connections keep uvicorn's own timeout.

    ``limits`` and ``metrics`` are set on a subclass per server (:func:`guarded_protocol`)."""

    limits: ClassVar[ServerLimits] = ServerLimits()
    metrics: ClassVar[ServerMetrics] = ServerMetrics()
    lingering: ClassVar[int] = 0  # refused connections not closed yet (per subclass, i.e. per server)
    _deadline: asyncio.TimerHandle | None = None
    _phase: object = None  # the state the deadline guards
    _refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            self._refuse()
            return
        self._guard(h11.IDLE)

    def _refuse(self) -> None:
        """Answer 503 and end the connection.  The client may be sending its request already:
        closing with it unread resets the connection, and a reset can destroy the 503 before
        the client reads it.  So the socket sends its end of the stream and lingers, discarding
        what comes, until the client hangs up or its header deadline passes; unless as many
        refused ones as the cap linger already (a flood), which are reset at once."""
        self.connections.discard(self)  # refused ones do not hold a place
        self._refused = True
        self.metrics.connections_cut.labels(reason="too_many_connections").inc()
        self.transport.write(_TOO_MANY_CONNECTIONS)
        cls = type(self)
        if cls.lingering >= self.limits.max_connections:
            self.transport.close()
            return
        cls.lingering += 1
        self.transport.write_eof()
        self._deadline = self.loop.call_later(self.limits.header_timeout_s, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._guard(self.conn.their_state)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Answered early (a 413) while the body still comes: its deadline keeps running.
        self._guard(h11.SEND_BODY if self.conn.their_state is h11.SEND_BODY else None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused and self._deadline is not None:  # it lingered
            type(self).lingering -= 1
            self._deadline.cancel()
        self._guard(None)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # What h11 cannot parse: uvicorn's answer is text/plain, clients of this API expect JSON.
        self.metrics.connections_cut.labels(reason="malformed_http").inc()
        self.transport.write(_NOT_HTTP)
        self.transport.close()

    def _guard(self, state: object) -> None:
        """Keep the deadline of the phase ``state`` names (headers: IDLE, body: SEND_BODY)
        running; start it when the phase changed, drop it for any other state."""
        phase = state if state in (h11.IDLE, h11.SEND_BODY) else None
        if phase is self._phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None and not self.transport.is_closing():
            limit = self.limits.header_timeout_s if phase is h11.IDLE else self.limits.body_timeout_s
            self._deadline = self.loop.call_later(limit, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        reason = "header_timeout" if self._phase is h11.IDLE else "body_timeout"
        self.metrics.connections_cut.labels(reason=reason).inc()
        self.transport.close()


def guarded_protocol(limits: ServerLimits, metrics: ServerMetrics) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "metrics": metrics})


class AcceptErrorLog:
    """An event-loop exception handler that reports failed ``accept()`` calls once a minute.

    At the file-descriptor limit asyncio's accept loop fails once per pending connection, up to
    the listen backlog per attempt, and logs each failure with a traceback: 7 MB of log a second.
    Other errors go to the default handler."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.last = -math.inf
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != self.MESSAGE:
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return
        logger.warning("cannot accept connections: %s (%d more failures since the last report)",
                       context.get("exception"), self.suppressed)
        self.last, self.suppressed = now, 0


class Server(uvicorn.Server):
    """uvicorn's server with the app's policies: quiet ``accept()`` failures, an exit when the
    engine dies (so that a supervisor restarts the process; :attr:`engine_failed` tells), and on
    shutdown running requests get the grace of ``limits.shutdown_grace_s``, then an error."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.engine_failed = False

    async def startup(self, sockets: list[Any] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptErrorLog())
        await super().startup(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self.state.engine.error is not None and not self.should_exit:
            logger.error("the engine stopped after an error; stopping the server (exit status 1)")
            self.engine_failed = self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        self.state.close_after(self.state.limits.shutdown_grace_s)
        await super().shutdown(sockets)


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> Server:
    """A uvicorn server for an app of :func:`create_app`, with the app's limits."""
    state: ServerState = app.state.server
    limits = state.limits
    config = uvicorn.Config(
        app, host=host, port=port, http=guarded_protocol(limits, state.metrics), lifespan="on",
        log_level="info" if verbose else "warning", access_log=verbose,
        timeout_keep_alive=limits.keep_alive_s,
        # The app answers what still runs when the grace ends; uvicorn cancels only what is
        # stuck after that (e.g. a stream whose client stopped reading).
        timeout_graceful_shutdown=math.ceil(limits.shutdown_grace_s) + 3,
    )
    return Server(config, state)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (each connection takes a descriptor,
    and soft limits are often 1024); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fit_connections(limits: ServerLimits, fd_limit: int) -> ServerLimits:
    """Cap connections at a third of the descriptors: as many again may be refused ones
    lingering, and the rest is the process's own."""
    cap = fd_limit // 3
    if fd_limit == resource.RLIM_INFINITY or limits.max_connections <= cap:
        return limits
    logger.warning("the connection cap (%d) lowered to %d: this process may open only %d files",
                   limits.max_connections, cap, fd_limit)
    return replace(limits, max_connections=max(1, cap))


def run_server(engine_factory: Callable[[], LLMEngine], *, served_model_name: str | None = None,
               model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               limits: ServerLimits | None = None, enable_docs: bool = False, verbose: bool = False,
               access: ServerAccess | None = None, chat: ChatParsing | None = None) -> int:
    """``pagedattn serve``: build the engine, then serve until SIGINT/SIGTERM, or until the engine
    fails (exit status 1, so that a supervisor restarts the process).

    On a signal the server stops accepting connections and lets running responses finish for up
    to ``limits.shutdown_grace_s`` seconds (default 10); what still runs then gets an error (JSON,
    or an error event and ``[DONE]``) and its requests are aborted; the app's lifespan then stops
    the engine thread."""
    limits = fit_connections(limits or ServerLimits(), raise_fd_limit())
    # Built on the engine thread, so that all torch work of the process happens there.
    engine = AsyncLLMEngine.from_factory(engine_factory)
    name = served_model_name or default_model_name(model, engine.engine.source)
    app = create_app(engine, name, limits, enable_docs=enable_docs, access=access, chat=chat)
    server = make_server(app, host, port, verbose=verbose)
    _announce(app.state.server, access or ServerAccess(), host, port)
    try:
        with _sigterm_returns():
            server.run()
    finally:
        engine.shutdown()  # no-op when the lifespan already did it
        engine.engine.shutdown()  # tensor-parallel workers (nothing to do for one rank)
        print("pagedattn: server stopped", file=sys.stderr, flush=True)
    if server.engine_failed or engine.error is not None:
        print("pagedattn: the engine failed (see the log above); exit status 1", file=sys.stderr, flush=True)
        return 1
    return 0


def _announce(state: ServerState, access: ServerAccess, host: str, port: int) -> None:
    """The start-up lines: where, the model defaults requests get, whether a key is needed."""
    def say(line: str) -> None:
        print(f"pagedattn: {line}", file=sys.stderr, flush=True)

    if state.sampling_defaults:
        say(f"unset request fields take the model's generation_config.json values: "
            f"{describe(state.sampling_defaults)} (--generation-config none: the API's defaults)")
    chat = state.chat
    if chat.tool_call_parser or chat.reasoning_parser:
        say(f"chat answers: tool calls read by {chat.tool_call_parser or 'none (tool_choice auto is refused)'}, "
            f"reasoning split by {chat.reasoning_parser or 'none'}")
    if access.api_key is not None:
        say("requests need 'Authorization: Bearer <the API key>'"
            + ("" if access.protect_probes else " (/health and /metrics are open)"))
    say(f"serving {state.model_name!r} at http://{host}:{port}/v1 (Ctrl-C to stop)")


@contextlib.contextmanager
def _sigterm_returns() -> Iterator[None]:
    """After a graceful shutdown uvicorn re-raises the signal it caught under the previous handler;
    for SIGTERM make that handler a no-op so ``serve`` returns (exit status 0) instead of dying
    by the signal.  SIGINT keeps Python's KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
