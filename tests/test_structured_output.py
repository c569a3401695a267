"""Structured output and tool calling on the embedded default model (SmolLM2-135M-Instruct).

Offline: outputs constrained by JSON schemas (nested objects, enums, arrays, required fields),
regexes, choices and EBNF grammars parse and validate (``jsonschema``), greedy and sampled, with
n > 1, stop strings, prefix caching and async scheduling; a bad constraint is a ValueError
before any work.  Through the server and the official ``openai`` client: ``response_format``,
vLLM's guided fields, tool calls (``required``, a named function, ``auto`` with the hermes
parser) and ``reasoning_content``, streaming (reassembled by the client's own stream state) and
not.  The server's model folder is the default model's with a Hermes-style tool template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import torch
from openai.lib.streaming.chat import ChatCompletionStreamState

from pagedattn import LLM, SamplingParams
from pagedattn.engine.async_engine import AsyncLLMEngine
from pagedattn.engine.structured import GrammarCompilerCache, StructuredOutputsParams, apply_bitmask, fill_bitmask
from pagedattn.entrypoints.server import ChatParsing, create_app

from .server_harness import ServerThread

S = StructuredOutputsParams
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                               "maximum": 120}}}
SHAPE = {"type": "object", "additionalProperties": False, "required": ["color", "point"],
         "properties": {"color": {"enum": ["red", "green", "blue"]},
                        "point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                                  "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                 "y": {"type": "integer", "minimum": -9, "maximum": 9}}}}}
TAGS = {"type": "object", "additionalProperties": False, "required": ["tags"],
        "properties": {"tags": {"type": "array", "minItems": 1, "maxItems": 3,
                                "items": {"type": "string", "maxLength": 8}}}}
FLAGS = {"type": "object", "additionalProperties": False, "required": ["ok", "level"],
         "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]}, "note": {"type": "null"}}}
SCHEMAS = [("Describe a person as JSON.", PERSON), ("Pick a color and a point as JSON.", SHAPE),
           ("List a few tags for a cat picture as JSON.", TAGS), ("Is the system ok? Answer in JSON.", FLAGS)]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}}}}
TOOLS = [WEATHER, TIME]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
# A Qwen2.5-like template: tools in a system turn, calls as <tool_call> blocks, results as <tool_response>.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions. Tools: <tools>{% for t in tools %}{{ t | tojson }}"
    "{% endfor %}</tools>\nAnswer a call as <tool_call>\n{\"name\": <name>, \"arguments\": <args>}\n</tool_call>"
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL = "smol-tools"


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# Two KV blocks and more: a prompt that the prefix cache can hit.
SYSTEM = ("You are a careful assistant. You answer every question in valid JSON, with short values, "
          "and you never add keys that were not asked for. Keep names under ten letters.")


@pytest.fixture(scope="module")
def model_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's folder (linked, not copied) with the tool template."""
    out = tmp_path_factory.mktemp("smol-tools")
    for f in default_model_dir.iterdir():
        if f.name != "chat_template.jinja":
            (out / f.name).symlink_to(f)
    (out / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), device="cpu", num_kv_blocks=256, swap_space_gib=0.05)


# ====================================================================== offline
def test_json_schemas_greedy_in_one_batch(llm: LLM) -> None:
    """Four schemas in one batch (one bitmask for all rows), greedy: each output validates."""
    params = [SamplingParams(temperature=0, max_tokens=60, structured_outputs=S(json=schema)) for _, schema in SCHEMAS]
    prompts = [{"prompt_token_ids": llm.apply_chat_template(_chat(q))} for q, _ in SCHEMAS]
    plain = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for (_, schema), out in zip(SCHEMAS, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)
        assert c.token_ids[-1] in llm.engine.eos_token_ids  # ended by the grammar's own end
    assert not plain.text.lstrip().startswith("{")  # unconstrained, the model would not write JSON
    assert llm.get_metrics()["kv_blocks_used"] == 0


def test_json_schemas_sampled_with_n(llm: LLM) -> None:
    """Sampled, n=3: each sample has its own matcher and its own valid answer."""
    prompts = [{"prompt_token_ids": llm.apply_chat_template(_chat(q))} for q, _ in SCHEMAS[:3]]
    params = [SamplingParams(n=3, temperature=0.8, top_p=0.95, seed=7 + i, max_tokens=60,
                             structured_outputs=S(json=json.dumps(schema)))
              for i, (_, schema) in enumerate(SCHEMAS[:3])]
    for (_, schema), out in zip(SCHEMAS, llm.generate(prompts, params, use_tqdm=False)):
        assert len(out.outputs) == 3
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)


def test_regex_choice_grammar_and_json_object(llm: LLM) -> None:
    cases = [
        (S(regex=r"[0-9]{3}-[0-9]{4}"), lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
        (S(choice=["yes", "no", "it depends"]), lambda t: t in ("yes", "no", "it depends")),
        (S(grammar='root ::= "The answer is " ("Paris" | "Rome") "."'),
         lambda t: t in ("The answer is Paris.", "The answer is Rome.")),
        (S(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    prompts = [{"prompt_token_ids": llm.apply_chat_template(_chat(q))} for q in (
        "A phone number?", "Is the sky blue?", "Capital of France?", 'Reply with {"ok": true} in JSON.')]
    # Sampled at 0.7: at 1.0 about one json_object answer in three wanders past 40 tokens.
    for greedy in (True, False):
        params = [SamplingParams(temperature=0 if greedy else 0.7, seed=3, max_tokens=40, structured_outputs=p)
                  for p, _ in cases]
        for (_, ok), out in zip(cases, llm.generate(prompts, params, use_tqdm=False)):
            c = out.outputs[0]
            assert c.finish_reason == "stop" and ok(c.text), c.text


def test_stop_strings_prefix_cache_and_async_scheduling(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop string cuts the constrained text; a prefix-cache hit and an async-scheduling engine
    give the same greedy answer.  With async scheduling a constrained step stays in flight too:
    it samples once the previous step's tokens have advanced its grammar."""
    prompt = {"prompt_token_ids": llm.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                           *_chat(SCHEMAS[0][0])])}
    assert len(prompt["prompt_token_ids"]) > 2 * 16
    sp = SamplingParams(temperature=0, max_tokens=60, structured_outputs=S(json=PERSON))
    first = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0]
    hits = llm.get_metrics()["prefix_cache_hit_tokens"]
    engine = llm.engine
    sampled = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs=S(json=PERSON))
               for s in range(3)]
    other = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    sync = llm.generate([prompt] * 3 + ["Once upon a time"], [*sampled, other], use_tqdm=False)
    masked_in_flight = 0
    sample_on_device = type(engine)._sample_on_device

    def counting(self: Any, cur: Any, prev: Any, **kw: Any) -> None:
        nonlocal masked_in_flight
        sample_on_device(self, cur, prev, **kw)
        masked_in_flight += cur.masked and cur.host is not None

    monkeypatch.setattr(type(engine), "_sample_on_device", counting)
    engine.async_scheduling = True
    try:
        # Next to an unconstrained request, whose steps overlap too.
        again, _ = llm.generate([prompt, "Once upon a time"], [sp, other], use_tqdm=False)
        overlapped = llm.generate([prompt] * 3 + ["Once upon a time"], [*sampled, other], use_tqdm=False)
    finally:
        engine.async_scheduling = False
    assert llm.get_metrics()["prefix_cache_hit_tokens"] > hits
    assert again.outputs[0].text == first.text
    assert [o.outputs[0].text for o in overlapped] == [o.outputs[0].text for o in sync]
    assert masked_in_flight > 10
    engine.check_integrity()
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=60, stop=[","],
                                              structured_outputs=S(json=PERSON)), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == "," and first.text.startswith(cut.text + ",")


@pytest.mark.parametrize(("bad", "says"), [
    (S(json={"type": "objekt"}), r"structured_outputs\.json: invalid JSON schema: .*objekt"),
    (S(json="{not json"), r"structured_outputs\.json: not valid JSON"),
    (S(regex="a(b"), r"structured_outputs\.regex: invalid regular expression: .*parenthesis"),
    (S(grammar="root ::= missing"), r"structured_outputs\.grammar: invalid EBNF grammar: .*missing"),
])
def test_bad_constraints_fail_before_any_work(llm: LLM, bad: StructuredOutputsParams, says: str) -> None:
    before = llm.get_metrics()["num_prompt_tokens"]
    with pytest.raises(ValueError, match=says):
        llm.generate(["fine prompt", "another"], [SamplingParams(), SamplingParams(structured_outputs=bad)],
                     use_tqdm=False)
    assert llm.get_metrics()["num_prompt_tokens"] == before and not llm.engine.has_unfinished_requests()


def test_length_bounded_strings_stay_valid_json(llm: LLM) -> None:
    """A string with minLength/maxLength admits no raw control character (JSON forbids them;
    xgrammar's own length rule lets them through) and keeps its bounds."""
    import xgrammar as xgr

    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 2, "maxLength": 4},
                                               "b": {"type": "array", "items": {"type": "string", "maxLength": 3}}},
              "required": ["a", "b"]}
    compiled = llm.engine.grammars.compile(S(json=schema))
    for text, ok in (('{"a": "xy", "b": ["z"]}', True), ('{"a": "x\x12", "b": []}', False),
                     ('{"a": "xy", "b": ["\x07"]}', False), ('{"a": "x", "b": []}', False),
                     ('{"a": "xyzwv", "b": []}', False), ('{"a": "日本", "b": ["abc"]}', True)):
        m = xgr.GrammarMatcher(compiled)
        assert (m.accept_string(text) and m.accept_token(llm.get_tokenizer().eos_token_id)) == ok, text


def test_params_need_exactly_one_constraint() -> None:
    for kw in ({}, {"json": {}, "regex": "a"}, {"choice": []}, {"choice": "ab"}, {"json_object": False}):
        with pytest.raises(ValueError, match="structured_outputs"):
            S(**kw)
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})  # type: ignore[arg-type]


def test_padded_vocabulary_and_both_tokenizer_loaders(model_dir: Path, llm: LLM) -> None:
    """Logits wider than the tokenizer (padded embeddings): the ids beyond are never allowed.  The
    generic tokenizer.json loader and AutoTokenizer give the same masks."""
    import transformers

    tok = llm.get_tokenizer()
    n = len(tok)
    auto = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    masks = []
    for t in (auto, fast):
        cache = GrammarCompilerCache(t, n + 77, [2])
        grammars = cache.new_matchers(S(json=PERSON), 2)
        grammars[1] = None  # an unconstrained row in the same batch
        mask = fill_bitmask(grammars, torch.device("cpu"))
        assert mask is not None and mask.rows == [0]
        logits = torch.randn(2, n + 77)
        logits[:, n + 5] = 100.0  # a padded id, likeliest of all
        out = apply_bitmask(logits, mask)
        assert torch.isinf(out[0, n:]).all() and tok.decode([out[0].argmax().item()]).startswith("{")
        assert torch.isinf(out[0, tok.encode(" x")[0]])  # a JSON object starts with "{"
        assert torch.equal(out[1], logits[1]) and logits[0, n + 5] == 100.0  # the input is left alone
        masks.append(mask.bitmask)
    assert torch.equal(masks[0], masks[1])


# ====================================================================== the server
@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[ServerThread]:
    """The offline engine behind the server (the offline tests above are done with it)."""
    app = create_app(AsyncLLMEngine(llm.engine), MODEL, chat=ChatParsing("hermes", "qwen3"))
    s = ServerThread(app).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _stream_final(client: openai.OpenAI, **kw: Any) -> Any:
    """A streamed chat completion as the openai client assembles it."""
    state = ChatCompletionStreamState(input_tools=kw.get("tools", openai.omit))
    for chunk in client.chat.completions.create(stream=True, **kw):
        state.handle_chunk(chunk)
    return state.get_final_completion()


def test_response_format_json_schema_chat(client: openai.OpenAI) -> None:
    for q, schema in SCHEMAS[:2]:
        kw = dict(model=MODEL, messages=_chat(q), max_tokens=60, temperature=0,
                  response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        whole = client.chat.completions.create(**kw)
        jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
        streamed = _stream_final(client, **kw)
        assert streamed.choices[0].message.content == whole.choices[0].message.content
        assert whole.choices[0].finish_reason == streamed.choices[0].finish_reason == "stop"


def test_guided_fields_on_completions(client: openai.OpenAI) -> None:
    cases = [({"guided_json": TAGS}, lambda t: jsonschema.validate(json.loads(t), TAGS) is None),
             ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
             ({"guided_regex": "[a-z]{2,5}!"}, lambda t: re.fullmatch("[a-z]{2,5}!", t)),
             ({"guided_grammar": 'root ::= "x" [0-9] [0-9]'}, lambda t: re.fullmatch("x[0-9]{2}", t)),
             ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down"))]
    for extra, ok in cases:
        r = client.completions.create(model=MODEL, prompt="Answer: ", max_tokens=40, temperature=0.7, seed=1, n=2,
                                      extra_body=extra)
        for c in r.choices:
            assert c.finish_reason == "stop" and ok(c.text), (extra, c.text)


@pytest.mark.parametrize(("extra", "param", "says"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "objekt"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "regular expression"),
    ({"guided_grammar": "root ::= nothing"}, "guided_grammar", "nothing"),
    ({"guided_json": {"type": "object"}, "guided_choice": ["a"]}, "guided_choice", "guided_json"),
    ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs.xml", "not implemented"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided_regex", "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
      "tool_choice": "required"}, "tools", "objekt"),
])
def test_bad_constraints_are_400_naming_the_field(client: openai.OpenAI, extra: dict, param: str, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=_chat("hi"), max_tokens=5, extra_body=extra)
    assert ei.value.body["param"] == param and says in ei.value.body["message"]


def _check_calls(message: Any, names: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_tool_choice_required_and_named(client: openai.OpenAI) -> None:
    msgs = _chat("What is the weather in Paris, and the time in UTC?")
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        kw = dict(model=MODEL, messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0,
                  parallel_tool_calls=False)
        whole = client.chat.completions.create(**kw)
        c = whole.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        _check_calls(c.message, names)
        streamed = _stream_final(client, **kw).choices[0]
        assert streamed.finish_reason == "tool_calls"
        assert [(t.function.name, t.function.arguments) for t in streamed.message.tool_calls] == \
            [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
    sampled = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="required",
                                             max_tokens=80, temperature=1.0, seed=5, n=2, parallel_tool_calls=False)
    for c in sampled.choices:
        assert len(c.message.tool_calls) == 1
        _check_calls(c.message, {"get_weather", "get_time"})


# The model itself seldom calls tools; a regex makes it write a Hermes block, so that the "auto"
# path (the hermes parser on free text) runs end to end.
HERMES_CALL = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}'
               r"\n</tool_call>")


def test_tool_choice_auto_parses_hermes_calls(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=_chat("Weather in Paris?"), tools=TOOLS, max_tokens=60, temperature=0,
              extra_body={"guided_regex": HERMES_CALL})
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Checking."
    _check_calls(whole.message, {"get_weather"})
    streamed = _stream_final(client, **kw).choices[0]
    assert streamed.message.content == "Checking." and streamed.finish_reason == "tool_calls"
    assert streamed.message.tool_calls[0].function.arguments == whole.message.tool_calls[0].function.arguments
    plain = client.chat.completions.create(model=MODEL, messages=_chat("Say hi."), tools=TOOLS, max_tokens=8,
                                           temperature=0, tool_choice="none").choices[0]
    assert plain.message.tool_calls is None and plain.message.content


def test_reasoning_content_is_split(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=_chat("Is water wet?"), max_tokens=40, temperature=0,
              extra_body={"guided_regex": "<think>[a-z ]{1,20}</think>(yes|no)"})
    whole = client.chat.completions.create(**kw).choices[0].message
    assert whole.content in ("yes", "no") and re.fullmatch("[a-z ]{1,20}", whole.reasoning_content)
    streamed = _stream_final(client, **kw).choices[0].message
    assert (streamed.content, streamed.reasoning_content) == (whole.content, whole.reasoning_content)
    hidden = client.chat.completions.create(**{**kw, "extra_body": {**kw["extra_body"], "include_reasoning": False}})
    assert hidden.choices[0].message.content == whole.content
    assert getattr(hidden.choices[0].message, "reasoning_content", None) is None


def test_a_conversation_with_tool_calls_renders(server: ServerThread, llm: LLM) -> None:
    import httpx

    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "22 C"}]
    r = httpx.post(f"{server.base_url}/tokenize", json={"messages": msgs, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    text = llm.get_tokenizer().decode(r.json()["tokens"])
    assert '"arguments": {"city": "Paris"}' in text and "<tool_response>\n22 C" in text and "get_weather" in text


def test_offline_chat_renders_tools_as_the_server_does(server: ServerThread, llm: LLM) -> None:
    import httpx

    msgs = _chat("Weather in Paris?")
    r = httpx.post(f"{server.base_url}/tokenize", json={"messages": msgs, "tools": TOOLS})
    assert r.status_code == 200, r.text
    ids = llm.apply_chat_template(msgs, tools=TOOLS)
    assert ids == r.json()["tokens"] and len(ids) > len(llm.apply_chat_template(msgs))
    assert "get_weather" in llm.get_tokenizer().decode(ids)
    # A forced call offline: the tool's arguments schema through structured output.
    sp = SamplingParams(temperature=0, max_tokens=60,
                        structured_outputs=StructuredOutputsParams(json=PARAMS["get_weather"]))
    out = llm.chat(msgs, sp, tools=TOOLS)[0]
    assert out.prompt_token_ids == ids
    jsonschema.validate(json.loads(out.outputs[0].text), PARAMS["get_weather"])
    with pytest.raises(ValueError, match="tools must be a list of dicts"):
        llm.chat(msgs, sp, tools="get_weather")  # type: ignore[arg-type]
