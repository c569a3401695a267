"""What a chat answer's text holds beyond its content: reasoning (``<think>...</think>``) and
tool calls, split out as the text streams in.

Every parser here is incremental: :meth:`feed` takes the next piece of text and returns what can
be told already, :meth:`finish` what is left at the end.  A non-streaming answer is the same
parser fed the whole text once, so streaming and non-streaming always agree, however the text
was cut into pieces.  Text that may be the start of a tag is held back until it is known.

* Reasoning parsers (``--reasoning-parser``): ``qwen3`` (an answer that opens with ``<think>``
  reasons until ``</think>``), ``deepseek_r1`` (the chat template opened ``<think>`` in the prompt:
  everything until ``</think>`` is reasoning, all of it if the tag never comes).
* Tool-call parsers for ``tool_choice: "auto"`` (``--tool-call-parser``): ``hermes``
  (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, as Qwen2.5/Qwen3 and Hermes
  templates ask for) and ``llama3_json`` (an answer that is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several separated by ``;``).  A call whose JSON does not
  parse stays in the content.
* For ``tool_choice: "required"`` or a named function the output is constrained by a JSON
  schema (see :func:`required_tools_schema`), so it always parses: :class:`RequiredCallsParser`
  (a JSON array of ``{"name", "parameters"}``) and :class:`NamedCallParser` (the arguments
  themselves, streamed as they come).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
REASONING_PARSERS = ("qwen3", "deepseek_r1")


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    """A piece of tool call ``index``: its first piece has the id and name."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class ParsedDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __iadd__(self, other: ParsedDelta) -> ParsedDelta:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)
        return self

    @property
    def empty(self) -> bool:
        return not (self.content or self.reasoning or self.tool_calls)


class TextParser(Protocol):
    def feed(self, text: str) -> ParsedDelta: ...

    def finish(self) -> ParsedDelta: ...


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` may be the start of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# ====================================================================== reasoning
class ThinkParser:
    """Splits ``<think>reasoning</think>content``.  ``opened``: the prompt opened the block
    already (DeepSeek-R1's template), so the answer starts in it."""

    START, END = "<think>", "</think>"

    def __init__(self, opened: bool) -> None:
        self.opened = opened
        self.mode = "start"
        self.buf = ""

    def feed(self, text: str) -> ParsedDelta:
        self.buf += text
        out = ParsedDelta()
        if self.mode == "start":
            head = self.buf.lstrip()
            if head.startswith(self.START):
                self.buf, self.mode = head[len(self.START):], "reasoning"
            elif self.START.startswith(head):
                return out  # blank, or maybe the tag's start: wait
            else:
                self.mode = "reasoning" if self.opened else "content"
        if self.mode == "reasoning":
            end = self.buf.find(self.END)
            if end < 0:
                keep = _partial_tag(self.buf, self.END)
                out.reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return out
            out.reasoning, self.buf, self.mode = self.buf[:end], self.buf[end + len(self.END):], "content"
        out.content, self.buf = self.buf, ""
        return out

    def finish(self) -> ParsedDelta:
        rest, self.buf = self.buf, ""
        if self.mode == "reasoning" or (self.mode == "start" and self.opened):
            return ParsedDelta(reasoning=rest)
        return ParsedDelta(content=rest)


def reasoning_parser(name: str) -> ThinkParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"reasoning parser: must be one of {', '.join(REASONING_PARSERS)}; got {name!r}")
    return ThinkParser(opened=name == "deepseek_r1")


# ====================================================================== tool calls, auto
def _call_of(obj: Any, args_key: str) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` of a parsed call object, None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):  # already JSON text (some models write it so)
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


class _Calls:
    """Numbers the calls a parser finds and gives each an id."""

    def __init__(self) -> None:
        self.count = 0

    def whole(self, name: str, arguments: str) -> ToolCallDelta:
        self.count += 1
        return ToolCallDelta(self.count - 1, arguments, new_tool_call_id(), name)


class HermesParser:
    """``<tool_call>{json}</tool_call>`` blocks anywhere in the text; the rest is content, less
    the whitespace next to the blocks."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self.calls = _Calls()
        self.buf = ""
        self.in_call = False
        self.after_call = False  # drop whitespace right after a block
        self.pending_ws = ""  # trailing whitespace of the content: dropped if a block follows
        self.ws_before = ""  # the whitespace dropped before the open block (kept if it is no call)

    def feed(self, text: str) -> ParsedDelta:
        self.buf += text
        out = ParsedDelta()
        while True:
            if self.in_call:
                end = self.buf.find(self.CLOSE)
                if end < 0:
                    return out
                out += self._call(self.buf[:end])
                self.buf, self.in_call = self.buf[end + len(self.CLOSE):], False
                continue
            start = self.buf.find(self.OPEN)
            if start >= 0:
                out.content += self._content(self.buf[:start])
                self.ws_before, self.pending_ws = self.pending_ws, ""
                self.buf, self.in_call = self.buf[start + len(self.OPEN):], True
                continue
            keep = _partial_tag(self.buf, self.OPEN)
            out.content += self._content(self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return out

    def _content(self, text: str) -> str:
        if self.after_call:
            text = text.lstrip()
            if not text:
                return ""
            self.after_call = False
        body = text.rstrip()
        if not body:
            self.pending_ws += text
            return ""
        out = self.pending_ws + body
        self.pending_ws = text[len(body):]
        return out

    def _call(self, body: str) -> ParsedDelta:
        try:
            call = _call_of(json.loads(body), "arguments")
        except json.JSONDecodeError:
            call = None
        if call is None:  # not a call after all: it stays text
            self.after_call = False
            return ParsedDelta(content=self.ws_before + self.OPEN + body + self.CLOSE)
        self.after_call = True
        return ParsedDelta(tool_calls=[self.calls.whole(*call)])

    def finish(self) -> ParsedDelta:
        rest, self.buf = self.buf, ""
        if self.in_call:  # unclosed: a call if its JSON is whole (some models omit the closing tag)
            self.in_call = False
            try:
                call = _call_of(json.loads(rest), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is not None:
                return ParsedDelta(tool_calls=[self.calls.whole(*call)])
            return ParsedDelta(content=self.ws_before + self.OPEN + rest)
        out = ParsedDelta(content=self._content(rest))
        if not self.calls.count:  # plain text keeps every character
            out.content += self.pending_ws
        return out


class Llama3JsonParser:
    """An answer that is one or more ``{"name": ..., "parameters": {...}}`` objects (``;``
    between them), optionally after ``<|python_tag|>``: tool calls.  Decided at its first
    non-blank character; anything else streams as content."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self.calls = _Calls()
        self.buf = ""
        self.mode = "start"

    def feed(self, text: str) -> ParsedDelta:
        self.buf += text
        if self.mode == "start":
            head = self.buf.lstrip()
            if head.startswith((self.TAG, "{")):
                self.mode = "calls"
            elif not head or self.TAG.startswith(head):
                return ParsedDelta()
            else:
                self.mode = "content"
        if self.mode == "calls":
            return ParsedDelta()  # parsed whole at the end
        out, self.buf = self.buf, ""
        return ParsedDelta(content=out)

    def finish(self) -> ParsedDelta:
        rest, self.buf = self.buf, ""
        if self.mode != "calls":
            return ParsedDelta(content=rest)
        calls = _json_objects(rest.strip().removeprefix(self.TAG), ";")
        parsed = [_call_of(obj, "parameters") for obj in calls or ()]
        if not parsed or any(c is None for c in parsed):
            return ParsedDelta(content=rest)
        return ParsedDelta(tool_calls=[self.calls.whole(*c) for c in parsed if c is not None])


def _json_objects(text: str, separator: str) -> list[Any] | None:
    """JSON values one after another (``separator`` and blanks between), None unless all parse."""
    decoder, pos = json.JSONDecoder(), 0
    out: list[Any] = []
    while True:
        while pos < len(text) and (text[pos].isspace() or (out and text[pos] == separator)):
            pos += 1
        if pos == len(text):
            return out
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        out.append(obj)


def tool_call_parser(name: str) -> TextParser:
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    raise ValueError(f"tool call parser: must be one of {', '.join(TOOL_CALL_PARSERS)}; got {name!r}")


# ====================================================================== tool calls, constrained
def required_tools_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of ``tool_choice: "required"``: an array of calls, each one of the tools
    by name with its parameters (one call unless ``parallel``)."""
    items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["name"]]},
                                                "parameters": t.get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class RequiredCallsParser:
    """The answer is a JSON array of ``{"name", "parameters"}`` (its schema guarantees it); each
    call goes out as soon as its object is complete."""

    def __init__(self) -> None:
        self.calls = _Calls()
        self.buf = ""
        self.pos = 0  # where the next item may start
        self.decoder = json.JSONDecoder()

    def feed(self, text: str) -> ParsedDelta:
        self.buf += text
        out = ParsedDelta()
        while True:
            pos = self.pos
            while pos < len(self.buf) and (self.buf[pos].isspace() or self.buf[pos] in "[,"):
                pos += 1
            if pos >= len(self.buf) or self.buf[pos] != "{":
                return out
            try:
                obj, end = self.decoder.raw_decode(self.buf, pos)
            except json.JSONDecodeError:
                return out  # not complete yet
            self.pos = end
            call = _call_of(obj, "parameters")
            if call is not None:
                out.tool_calls.append(self.calls.whole(*call))

    def finish(self) -> ParsedDelta:
        return ParsedDelta()


class NamedCallParser:
    """The answer is the named function's arguments (its schema guarantees it), streamed as they come."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    def feed(self, text: str) -> ParsedDelta:
        if self.started:
            return ParsedDelta(tool_calls=[ToolCallDelta(0, text)] if text else [])
        self.started = True
        return ParsedDelta(tool_calls=[ToolCallDelta(0, text, new_tool_call_id(), self.name)])

    def finish(self) -> ParsedDelta:
        return self.feed("") if not self.started else ParsedDelta()


# ====================================================================== one choice
class ChoiceParser:
    """Reasoning first, then tool calls in what is left (either may be absent)."""

    def __init__(self, reasoning: ThinkParser | None, tools: TextParser | None) -> None:
        self.reasoning, self.tools = reasoning, tools
        self.num_calls = 0

    def feed(self, text: str) -> ParsedDelta:
        return self._tools(self.reasoning.feed(text) if self.reasoning else ParsedDelta(content=text))

    def finish(self) -> ParsedDelta:
        out = self._tools(self.reasoning.finish() if self.reasoning else ParsedDelta())
        if self.tools is not None:
            out += self._count(self.tools.finish())
        return out

    def _tools(self, d: ParsedDelta) -> ParsedDelta:
        if self.tools is None or not d.content:
            return d
        out = self._count(self.tools.feed(d.content))
        out.reasoning = d.reasoning
        return out

    def _count(self, d: ParsedDelta) -> ParsedDelta:
        self.num_calls += sum(1 for c in d.tool_calls if c.id is not None)
        return d


def parse_whole(parser: ChoiceParser, text: str) -> ParsedDelta:
    """A whole answer through ``parser``: content, reasoning and complete tool calls."""
    out = parser.feed(text)
    out += parser.finish()
    merged: dict[int, ToolCallDelta] = {}
    for c in out.tool_calls:
        if c.index in merged:
            merged[c.index].arguments += c.arguments
        else:
            merged[c.index] = ToolCallDelta(c.index, c.arguments, c.id, c.name)
    out.tool_calls = [merged[i] for i in sorted(merged)]
    return out
