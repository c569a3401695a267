"""Request and response bodies of the OpenAI API subset the server speaks.

Requests are validated strictly (``"2"`` is not an integer, ``true`` is not a number, NaN is
not a temperature) so that a bad value is a 400 naming its field rather than a surprise.
Beyond OpenAI's fields, requests accept the engine's extra sampling knobs (``top_k``,
``min_p``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``repetition_penalty``,
``allowed_token_ids``, ``bad_words``, ``prompt_logprobs``, ...), as vLLM does.

Every field a request may carry is one of four kinds:

* implemented: a field of the request models below;
* known but not implemented yet (:data:`NOT_IMPLEMENTED`): a request that sets one to anything
  but its no-op value gets a 400 naming it, never a silently different answer.  Implementing a
  feature means declaring its field on a model and deleting its row;
* known and accepted, but with nothing to do here (:data:`IGNORED`, each with the reason);
* unknown: accepted, so that newer clients keep working, and logged once per field name per
  process (:func:`check_fields`), so that a misspelt or newer option does not go unnoticed.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.sampling_params import RequestOutputKind, SamplingParams
from ..engine.structured import StructuredOutputsParams
from .chat_output import required_tools_schema

logger = logging.getLogger(__name__)

# JSON integers are unbounded; everything that may reach a tensor must fit int64.
_I64_MAX = 2**63 - 1
Int64 = Annotated[int, Field(ge=-_I64_MAX, le=_I64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=_I64_MAX)]
# Token ids of one prompt, or a batch of prompts given as text or token ids.
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
PromptField = (
    str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
)
# The API's own defaults, where neither the request nor the model's generation_config.json sets a value.
COMPLETION_MAX_TOKENS = 16  # OpenAI's for /v1/completions (chat: up to the context)
_API_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                 "presence_penalty": 0.0, "frequency_penalty": 0.0}
MAX_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's and vLLM's)


class UnsupportedFeatureError(ValueError):
    """A known OpenAI feature this server does not implement; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


# ====================================================================== the field tables
@dataclass(frozen=True)
class Refusal:
    """A known field this server does not implement: values ``accepts`` takes are no-ops (the
    field's default), anything else is refused with ``why``."""

    why: str
    accepts: Callable[[Any], bool]


def _unset(v: Any) -> bool:
    return v is None


def _false(v: Any) -> bool:
    return v is None or v is False


def _number(v: Any, neutral: float) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == neutral)


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, (str, list, dict)) and not v)


def _one_of(*ok: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(type(v) is type(o) and v == o for o in ok)


_FUNCTIONS = "the deprecated functions API is not implemented (use tools and tool_choice)"

# Known request fields (OpenAI's and vLLM's) the server does not implement yet.
NOT_IMPLEMENTED: dict[str, Refusal] = {
    "structural_tag": Refusal("structural tags are not implemented (use response_format or guided_json)", _unset),
    "guided_decoding_backend": Refusal("xgrammar is the only backend", _one_of("xgrammar", "auto")),
    "guided_whitespace_pattern": Refusal("is not implemented (JSON output has no whitespace between tokens)",
                                         _unset),
    "functions": Refusal(_FUNCTIONS, _empty),
    "function_call": Refusal(f"{_FUNCTIONS} (only 'none' or 'auto')", _one_of("none", "auto")),
    "suffix": Refusal("is not implemented yet", _empty),
    "use_beam_search": Refusal("beam search is not implemented", _false),
    "length_penalty": Refusal("applies to beam search, which is not implemented (use 1)", lambda v: _number(v, 1)),
    "priority": Refusal("there is no priority scheduling (only 0)", lambda v: _number(v, 0)),
    "chat_template": Refusal("per-request chat templates are not accepted; the model's own is used", _unset),
    "reasoning_effort": Refusal("is not implemented (Qwen3-style templates take chat_template_kwargs: "
                                "{'enable_thinking': false})", _unset),
    "thinking_token_budget": Refusal("is not implemented yet", _unset),
    "modalities": Refusal("only text output (['text'])", lambda v: v is None or v == ["text"]),
    "audio": Refusal("only text output", _unset),
    "web_search_options": Refusal("there is no web search", _unset),
    "mm_processor_kwargs": Refusal("there is no multimodal input", _unset),
    "media_io_kwargs": Refusal("there is no multimodal input", _unset),
    "truncation_side": Refusal("only 'left' (truncate_prompt_tokens keeps the prompt's last tokens)",
                               _one_of(None, "left")),
    "spaces_between_special_tokens": Refusal("is not implemented (only true)", _one_of(True)),
    "logprob_token_ids": Refusal("is not implemented yet", _unset),
    "return_tokens_as_token_ids": Refusal("is not implemented yet", _false),
    "watermarking": Refusal("is not implemented", _false),
    "repetition_detection": Refusal("is not implemented yet", _unset),
    "kv_transfer_params": Refusal("there is no disaggregated serving", _unset),
    "vllm_xargs": Refusal("there are no extensions that take it", _unset),
}

# Known request fields accepted and ignored, with the reason nothing is lost.
IGNORED: dict[str, str] = {
    "user": "an end-user id for the provider's abuse monitoring; nothing here uses it",
    "service_tier": "a billing tier of OpenAI's; this server has one",
    "store": "asks OpenAI to keep the completion for later use; nothing is kept here",
    "metadata": "tags of stored completions (see store)",
    "prediction": "predicted output only makes OpenAI's answer faster, never different",
    "request_id": "the server makes its own ids (the response's id)",
    "session_id": "a grouping for vLLM's routing; there is one engine here",
    "stream_interval": "chunks are sent as tokens come",
}

# Fields of a chat message (the request's messages.N).
MESSAGE_NOT_IMPLEMENTED: dict[str, Refusal] = {
    "function_call": Refusal(f"{_FUNCTIONS} (a conversation with function calls)", _unset),
}
MESSAGE_IGNORED: dict[str, str] = {}


# ====================================================================== the checks
_warned: set[str] = set()


def check_fields(req: _Request) -> None:
    """Refuse what the request asks for and the server does not do (``UnsupportedFeatureError``,
    naming the field); log each unknown field name once per process."""
    for name in req.unknown_fields():
        if name not in _warned:
            _warned.add(name)
            logger.warning("request field %r is unknown to this server and was ignored "
                           "(logged once; see docs/serving.md for the fields it knows)", name)


class _Request(BaseModel):
    # Unknown fields are kept (model_extra), to be checked against the tables and logged.
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    not_implemented: ClassVar[Mapping[str, Refusal]] = {}
    ignored: ClassVar[Mapping[str, str]] = {}

    def unknown_fields(self, path: str = "") -> Iterator[str]:
        """Raise for a refused field; yield unknown ones as paths (list indices as ``*``)."""
        for name, value in (self.model_extra or {}).items():
            refusal = self.not_implemented.get(name)
            if refusal is not None and not refusal.accepts(value):
                raise UnsupportedFeatureError(path + name, refusal.why)
            if refusal is None and name not in self.ignored:
                yield re.sub(r"\.\d+\.", ".*.", "." + path + name)[1:]
        for name in type(self).model_fields:
            for sub, child in _children(getattr(self, name), f"{path}{name}."):
                yield from child.unknown_fields(sub)


def _children(value: Any, path: str) -> Iterator[tuple[str, _Request]]:
    if isinstance(value, _Request):
        yield path, value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, _Request):
                yield f"{path}{i}.", item


class _Body(_Request):
    """A whole request body: the top-level tables apply."""

    not_implemented = NOT_IMPLEMENTED
    ignored = IGNORED


class StreamOptions(_Request):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk also carries the usage so far.
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Request):
    """OpenAI's ``response_format.json_schema``."""

    model_config = ConfigDict(populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> dict[str, Any]:
        """The structured-output fields of this format (``type`` is not "text")."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.json_schema is None:
            raise UnsupportedFeatureError("response_format.json_schema", "is required with type 'json_schema'")
        # No schema: any JSON object, as OpenAI's API takes it.
        schema = self.json_schema.schema_
        return {"json": schema} if schema is not None else {"json_object": True}


class _SamplingRequest(_Body):
    """Fields shared by completions and chat completions."""

    model: str
    n: int = Field(1, ge=1, le=_I64_MAX)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Engine extras (vLLM's names).
    top_k: int | None = Field(None, ge=-1, le=_I64_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int = Field(0, ge=0, le=_I64_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured output: OpenAI's response_format, vLLM's guided_* fields and structured_outputs.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    # Penalties and biases (unset: the model's generation_config.json value, else off).
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (a JSON key, so a string) -> bias
    allowed_token_ids: list[TokenId] | None = None  # vLLM's
    bad_words: list[str] | None = None  # vLLM's
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's
    # vLLM's: only requests with the same salt share cached prefix blocks (tenants apart).
    cache_salt: str | None = Field(None, min_length=1)
    # vLLM's: the response carries the prompt's and each choice's token ids (a stream: the
    # prompt's in its first chunk, each chunk the ids it adds).
    return_token_ids: bool = False
    # vLLM's: keep only the prompt's last k tokens (-1: what the context holds with one token to
    # generate); unset, a prompt that does not fit is a 400.
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=_I64_MAX)

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def usage_in_every_chunk(self) -> bool:
        return self.include_usage_in_stream and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def _check_common(self) -> None:
        check_fields(self)
        if self.stream_options is not None and not self.stream:
            raise UnsupportedFeatureError("stream_options", "is only allowed with stream: true")

    def structured(self) -> StructuredOutputsParams | None:
        """The one constraint the request asks for (a 400 naming the fields if it asks for two)."""
        given: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.type != "text":
            given.append(("response_format", rf.constraint()))
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            value = getattr(self, name)
            if value is not None:
                given.append((name, {name.removeprefix("guided_"): value}))
        if self.structured_outputs is not None:
            given.append(("structured_outputs", self.structured_outputs))
        if len(given) > 1:
            raise UnsupportedFeatureError(given[1][0], f"cannot be combined with {given[0][0]} (one constraint "
                                          "per request)")
        if not given:
            return None
        origin, fields = given[0]
        known = {"json", "regex", "choice", "grammar", "json_object"}
        for key in fields:
            if key not in known:
                raise UnsupportedFeatureError(f"{origin}.{key}",
                                              f"is not implemented (known: {', '.join(sorted(known))})")
        return StructuredOutputsParams(**fields, origin=origin)

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's ``{"token id": bias}`` with the ids as integers."""
        if self.logit_bias is None:
            return None
        out = {}
        for key, bias in self.logit_bias.items():
            try:
                out[int(key)] = bias
            except ValueError:
                raise UnsupportedFeatureError("logit_bias", f"keys must be token ids, got {key!r}") from None
        return out

    def _prompt_logprobs(self, logprobs: int | None) -> int | None:
        return self.prompt_logprobs

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         defaults: Mapping[str, Any]) -> SamplingParams:
        """The engine's parameters: the request's value, else the model's default
        (``defaults``, from its generation_config.json), else the API's."""

        def pick(name: str) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, _API_DEFAULTS[name])

        return SamplingParams(
            n=self.n,
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=pick("top_k"),
            min_p=pick("min_p"),
            repetition_penalty=pick("repetition_penalty"),
            presence_penalty=pick("presence_penalty"),
            frequency_penalty=pick("frequency_penalty"),
            logit_bias=self._logit_bias(),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            prompt_logprobs=self._prompt_logprobs(logprobs),
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=self.structured(),
            # A stream sends what is new at each step; a response is made once, from the end.
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
        )


class CompletionRequest(_SamplingRequest):
    prompt: PromptField
    max_tokens: int | None = Field(None, ge=1, le=_I64_MAX)  # absent: 16; null: up to the context
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    add_special_tokens: bool = True  # vLLM's: e.g. the BOS token before a text prompt
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt's too)

    def _prompt_logprobs(self, logprobs: int | None) -> int | None:
        """Echo with logprobs needs the prompt's: as many alternatives as the completion's."""
        if not (self.echo and logprobs is not None):
            return self.prompt_logprobs
        return max(logprobs, self.prompt_logprobs or 0)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """``defaults``: the model's values for fields the request leaves unset."""
        self._check_common()
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedFeatureError("best_of", "must equal n (server-side best-of is not supported)")
        return self._sampling_params(self._max_tokens(defaults or {}), self.logprobs, defaults or {})

    def _max_tokens(self, defaults: Mapping[str, Any]) -> int | None:
        """OpenAI's 16 when absent (capped by the model's max_new_tokens, as vLLM does); when null,
        the model's max_new_tokens, else up to the context."""
        model_max = defaults.get("max_tokens")
        if "max_tokens" not in self.model_fields_set:
            return min(COMPLETION_MAX_TOKENS, model_max or COMPLETION_MAX_TOKENS)
        return self.max_tokens if self.max_tokens is not None else model_max


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_Request):
    """A call the assistant made earlier in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def to_template_dict(self) -> dict[str, Any]:
        # Templates (Llama 3's, Qwen's) expect the arguments as a mapping they can write out;
        # text that is not a JSON object stays text.
        try:
            args: Any = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            args = self.function.arguments
        if not isinstance(args, dict):
            args = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": args}}


class ChatMessage(_Request):
    not_implemented = MESSAGE_NOT_IMPLEMENTED
    ignored = MESSAGE_IGNORED
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def to_template_dict(self) -> dict[str, Any]:
        """What chat templates expect: a role and one string of content (plus tool calls)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = [c.to_template_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and role == "tool":
            out["name"] = self.name
        return out


class FunctionDefinition(_Request):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition

    def to_template_dict(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatTemplateFields(_Body):
    """What goes into the chat template (vLLM's fields), for chat completions and /tokenize."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    # The last (assistant) message is left open for the model to continue (a "prefill").
    continue_final_message: bool = False
    add_special_tokens: bool = False  # on top of those the template writes (BOS twice, usually)
    documents: list[dict[str, str]] | None = None  # for templates with retrieval-augmented generation
    chat_template_kwargs: dict[str, Any] | None = None  # the template's own variables (Qwen3: enable_thinking)
    tools: list[ChatTool] | None = None  # functions the model may call (passed to the template)

    @property
    def generation_prompt(self) -> bool:
        """``add_generation_prompt``, except that continuing the last message implies none
        unless asked for explicitly (the two exclude each other)."""
        if self.continue_final_message:
            if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
                raise UnsupportedFeatureError("continue_final_message", "cannot be true with add_generation_prompt")
            return False
        return self.add_generation_prompt


class ChatCompletionRequest(ChatTemplateFields, _SamplingRequest):
    # vLLM's chat echo (the last message before the reply) is not implemented; completions echo.
    not_implemented = {**NOT_IMPLEMENTED, "echo": Refusal("is not implemented for chat (completions echo the prompt)",
                                                          _false)}
    max_tokens: int | None = Field(None, ge=1, le=_I64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=_I64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # with tool_choice "required": more than one call allowed
    include_reasoning: bool = True  # with a reasoning parser: false leaves reasoning_content out

    def to_sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """``defaults``: the model's values for fields the request leaves unset."""
        self._check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedFeatureError("top_logprobs", "requires logprobs: true")
        defaults = defaults or {}
        max_tokens = next((m for m in (self.max_completion_tokens, self.max_tokens) if m is not None),
                          defaults.get("max_tokens"))
        params = self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, defaults)
        tools_schema = self.tool_schema()
        if tools_schema is not None:
            if params.structured_outputs is not None:
                raise UnsupportedFeatureError(params.structured_outputs.origin, "cannot be combined with tool_choice "
                                              "'required' or a named function (their calls are the output's format)")
            params.structured_outputs = StructuredOutputsParams(json=tools_schema, origin="tools")
        return params

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" with tools, "none" without."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def tool_function(self) -> FunctionDefinition | None:
        """The function a named tool_choice asks for (a 400 if there is no such tool)."""
        choice = self.effective_tool_choice
        if not isinstance(choice, NamedToolChoice):
            return None
        for tool in self.tools or ():
            if tool.function.name == choice.function.name:
                return tool.function
        raise UnsupportedFeatureError("tool_choice", f"no function named {choice.function.name!r} in tools")

    def tool_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow for tool_choice "required" or a named function."""
        choice = self.effective_tool_choice
        if choice in ("none", "auto"):
            return None
        if not self.tools:
            raise UnsupportedFeatureError("tool_choice", "requires tools")
        named = self.tool_function()
        if named is not None:
            return named.parameters or {"type": "object"}
        return required_tools_schema([t.function.model_dump() for t in self.tools], self.parallel_tool_calls)


# ====================================================================== tokenizer endpoints (vLLM's)
class TokenizeCompletionRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(ChatTemplateFields):
    model: str | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]


# ====================================================================== responses
class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(_Response):
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "pagedattn"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(_Response):
    """OpenAI's legacy per-token logprobs (completions API)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(_Response):
    """One alternative of one prompt position (vLLM's ``prompt_logprobs`` entries)."""

    logprob: float
    decoded_token: str


# Per prompt token: None for the first, then token id (a JSON key) -> its entry, the token itself
# and the top-k.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or token id that ended it (vLLM's field)
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids
    prompt_token_ids: list[int] | None = None  # vLLM's, with return_token_ids


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's
    prompt_token_ids: list[int] | None = None  # vLLM's, with return_token_ids


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's, with return_token_ids: in the first chunk


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorInfo
