"""The chat-answer parsers (reasoning, tool calls) on crafted texts: what they split out, and that
streaming agrees with the whole text however it is cut, at every character boundary."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from pagedattn.entrypoints.chat_output import (
    ChoiceParser,
    HermesParser,
    Llama3JsonParser,
    NamedCallParser,
    ParsedDelta,
    RequiredCallsParser,
    parse_whole,
    reasoning_parser,
    required_tools_schema,
)

Make = Callable[[], ChoiceParser]


def _hermes() -> ChoiceParser:
    return ChoiceParser(None, HermesParser())


def _llama3() -> ChoiceParser:
    return ChoiceParser(None, Llama3JsonParser())


def _qwen3_hermes() -> ChoiceParser:
    return ChoiceParser(reasoning_parser("qwen3"), HermesParser())


def _r1() -> ChoiceParser:
    return ChoiceParser(reasoning_parser("deepseek_r1"), None)


def _summary(d: ParsedDelta) -> tuple[str, str, list[tuple[str | None, dict]]]:
    """Content, reasoning and the calls (name, parsed arguments): the ids are random."""
    return d.content, d.reasoning, [(c.name, json.loads(c.arguments)) for c in d.tool_calls]


def _streamed(make: Make, pieces: list[str]) -> ParsedDelta:
    """The pieces through one parser, reassembled as a client does (arguments by call index)."""
    p = make()
    out = ParsedDelta()
    for piece in pieces:
        out += p.feed(piece)
    out += p.finish()
    calls: dict[int, list] = {}
    for c in out.tool_calls:
        if c.id is not None:
            assert c.index not in calls, "a call's id and name come once"
            calls[c.index] = [c.id, c.name, c.arguments]
        else:
            calls[c.index][2] += c.arguments
    assert sorted(calls) == list(range(len(calls)))
    return ParsedDelta(out.content, out.reasoning,
                       [type(out.tool_calls[0])(i, a, cid, n) for i, (cid, n, a) in sorted(calls.items())])


W = {"city": "Paris", "unit": "celsius"}
CASES: list[tuple[Make, str, tuple[str, str, list]]] = [
    (_hermes, "Just text, <b>no</b> calls.\n", ("Just text, <b>no</b> calls.\n", "", [])),
    (_hermes, "  spaced  ", ("  spaced  ", "", [])),
    (_hermes, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     ("", "", [("get_weather", W)])),
    (_hermes, 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
              '<tool_call>\n{"name": "b", "arguments": {"x": [1, "<tool_call>"]}}\n</tool_call>\nDone.',
     ("Let me check.Done.", "", [("a", {}), ("b", {"x": [1, "<tool_call>"]})])),
    (_hermes, '<tool_call>{"name": "f", "arguments": "{\\"k\\": 2}"}</tool_call>', ("", "", [("f", {"k": 2})])),
    (_hermes, 'Broken: <tool_call>{"name": oops}</tool_call> end', ('Broken: <tool_call>{"name": oops}</tool_call> end',
                                                                    "", [])),
    (_hermes, '<tool_call>\n{"name": "f", "arguments": {"a": 1}}', ("", "", [("f", {"a": 1})])),  # unclosed
    (_hermes, "text then <tool_call>{\"name\": ", ("text then <tool_call>{\"name\": ", "", [])),  # cut off
    (_hermes, "ends with <tool_c", ("ends with <tool_c", "", [])),
    (_llama3, '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     ("", "", [("get_weather", W)])),
    (_llama3, '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"y": null}}',
     ("", "", [("a", {}), ("b", {"y": None})])),
    (_llama3, '  {"not": "a call"}', ('  {"not": "a call"}', "", [])),
    (_llama3, "The answer is {1}.", ("The answer is {1}.", "", [])),
    (_llama3, "<|python", ("<|python", "", [])),
    (_qwen3_hermes, "<think>\nHmm, weather.\n</think>\n\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n"
                    "</tool_call>", ("", "\nHmm, weather.\n", [("g", {})])),
    (_qwen3_hermes, "<think>short</think>The answer.", ("The answer.", "short", [])),
    (_qwen3_hermes, "No thinking here </think> at all.", ("No thinking here </think> at all.", "", [])),
    (_qwen3_hermes, "<think>never closed", ("", "never closed", [])),
    (_qwen3_hermes, "<thin", ("<thin", "", [])),
    (_r1, "reasoning first</think>then content", ("then content", "reasoning first", [])),
    (_r1, "<think>opened again</think>x", ("x", "opened again", [])),
    (_r1, "all reasoning, cut off </thi", ("", "all reasoning, cut off </thi", [])),
]

IDS = [f"{m.__name__}-{i}" for i, (m, _, _) in enumerate(CASES)]


@pytest.mark.parametrize(("make", "text", "want"), CASES, ids=IDS)
def test_parsers_split_crafted_texts(make: Make, text: str, want: tuple) -> None:
    assert _summary(parse_whole(make(), text)) == want


@pytest.mark.parametrize(("make", "text", "want"), CASES, ids=IDS)
def test_streaming_agrees_at_every_split(make: Make, text: str, want: tuple) -> None:
    rng = random.Random()
    for cut in range(len(text) + 1):
        assert _summary(_streamed(make, [text[:cut], text[cut:]])) == want, cut
    assert _summary(_streamed(make, list(text))) == want  # a character at a time
    for _ in range(20):  # random cuts into many pieces
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(2, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert _summary(_streamed(make, pieces)) == want, pieces


def test_hermes_streams_content_before_a_call_completes() -> None:
    p = _hermes()
    first = p.feed("Checking the weather. <tool_")
    assert first.content == "Checking the weather." and not first.tool_calls
    assert p.feed('call>{"name": "w", "arguments": {').empty  # inside the call: nothing yet
    call = p.feed('}}</tool_call>')
    assert [(c.index, c.name, c.arguments) for c in call.tool_calls] == [(0, "w", "{}")] and call.tool_calls[0].id
    assert p.num_calls == 1


def test_named_call_streams_its_arguments() -> None:
    p = ChoiceParser(None, NamedCallParser("get_weather"))
    a, b, end = p.feed('{"city": '), p.feed('"Rome"}'), p.finish()
    assert a.tool_calls[0].name == "get_weather" and a.tool_calls[0].id and a.tool_calls[0].arguments == '{"city": '
    assert b.tool_calls[0].id is None and b.tool_calls[0].arguments == '"Rome"}' and end.empty
    assert p.num_calls == 1
    empty = ChoiceParser(None, NamedCallParser("f"))  # an empty answer still names its call
    assert [c.name for c in empty.finish().tool_calls] == ["f"]


def test_required_calls_go_out_as_each_completes() -> None:
    p = ChoiceParser(None, RequiredCallsParser())
    text = '[{"name": "a", "parameters": {"s": "}]"}}, {"name": "b", "parameters": {}}]'
    split = text.index(", {")
    first = p.feed(text[:split])
    assert [(c.name, json.loads(c.arguments)) for c in first.tool_calls] == [("a", {"s": "}]"})]
    rest = p.feed(text[split:])
    assert [c.name for c in rest.tool_calls] == ["b"] and rest.tool_calls[0].index == 1
    for cut in range(len(text) + 1):
        assert _summary(_streamed(lambda: ChoiceParser(None, RequiredCallsParser()), [text[:cut], text[cut:]])) == \
            ("", "", [("a", {"s": "}]"}), ("b", {})])


def test_required_tools_schema_shape() -> None:
    tools = [{"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}},
             {"name": "b", "parameters": None}]
    schema = required_tools_schema(tools, parallel=False)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    names = [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]]
    assert names == [["a"], ["b"]]
    assert "maxItems" not in required_tools_schema(tools, parallel=True)


def test_unknown_parsers_are_refused() -> None:
    from pagedattn.entrypoints.cli import make_parser
    from pagedattn.entrypoints.server import ChatParsing

    with pytest.raises(ValueError, match="reasoning parser"):
        reasoning_parser("nope")
    with pytest.raises(ValueError, match="tool_call_parser"):
        ChatParsing(tool_call_parser="xml")
    args = make_parser().parse_args(["serve", "--tool-call-parser", "llama3_json", "--reasoning-parser", "qwen3"])
    assert (args.tool_call_parser, args.reasoning_parser) == ("llama3_json", "qwen3")
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--tool-call-parser", "xml"])
