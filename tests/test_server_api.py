"""The API's breadth: /tokenize and /detokenize, the request-field tables (implemented, refused,
ignored, unknown), the API key and CORS, chat_template_kwargs, generation_config.json defaults
and models named by Hub id.

One module-scoped server serves a Qwen3-like tiny model (its chat template reads
``enable_thinking`` and ``documents``; its generation_config.json sets temperature, top_p, top_k
and max_new_tokens) that is reached *by Hub id* through a pre-filled huggingface_hub cache
(offline: nothing touches the network), with an API key and one CORS origin.  Answers are
checked against the tokenizer itself and against the offline ``LLM`` on the same weights.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import transformers

from pagedattn import LLM, SamplingParams
from pagedattn.engine.generation_defaults import log_defaults, sampling_defaults
from pagedattn.entrypoints.access import ServerAccess
from pagedattn.entrypoints.cli import main, make_parser
from pagedattn.entrypoints.openai_protocol import IGNORED, NOT_IMPLEMENTED
from pagedattn.models.hub import is_hub_id
from pagedattn.models.loader import resolve_model_source

from .server_harness import TINY_CONTEXT, ServeProcess, make_async_engine, start_server, tiny_chat_model

HUB_ID = "tiny-org/tiny-qwen"
ORIGIN = "https://app.example"
KEY = secrets.token_urlsafe(16)
# A Qwen3-like template: the generation prompt opens an empty thinking block when
# chat_template_kwargs say enable_thinking: false, and documents go into a system turn.
TEMPLATE = (
    "{%- if documents %}<|im_start|>system\nDocuments:{% for d in documents %} {{ d.title }}: {{ d.text }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
GENERATION_CONFIG = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 12, "do_sample": True,
                     "repetition_penalty": 1.05}
MODEL_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 12}
# What a request that sets temperature 0 and nothing else gets: the model's repetition_penalty applies.
GREEDY = {"temperature": 0, "repetition_penalty": MODEL_DEFAULTS["repetition_penalty"]}
WORDS = ("river", "stone", "light", "garden", "winter", "paper", "window", "music", "yellow", "quiet", "mountain")


# ====================================================================== fixtures
# The tokenizer puts <|endoftext|> (id 0) before every text, as Llama's puts BOS: add_special_tokens matters.
_A, _B = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
_ADD_BOS = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, _A],
            "pair": [_A, _B],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}


def _qwenish(root: Path, base: Path) -> Path:
    """The tiny chat model with the Qwen3-like template, generation_config.json and a BOS."""
    out = root / "tiny-qwen"
    shutil.copytree(base, out)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    tok = json.loads((out / "tokenizer.json").read_text())
    (out / "tokenizer.json").write_text(json.dumps({**tok, "post_processor": _ADD_BOS}))
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, **GENERATION_CONFIG}))
    return out


def _fill_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """huggingface_hub's cache layout for one model: ``models--org--name/snapshots/<commit>/``
    holding the files, and ``refs/main`` naming the commit."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = secrets.token_hex(20)
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """An ``HF_HOME`` whose hub cache (``hub/``) holds the model as ``tiny-org/tiny-qwen``."""
    root = tmp_path_factory.mktemp("hf-home")
    model = _qwenish(tmp_path_factory.mktemp("qwenish"), tiny_chat_model(tmp_path_factory, default_model_dir))
    _fill_hub_cache(root / "hub", HUB_ID, model)
    return root


@pytest.fixture(scope="module")
def hub_cache(hf_home: Path) -> Path:
    return hf_home / "hub"


@pytest.fixture(scope="module")
def snapshot(hub_cache: Path) -> Path:
    return resolve_model_source(HUB_ID, download_dir=str(hub_cache)).model_dir


@pytest.fixture(scope="module")
def ref_tok(snapshot: Path) -> Any:
    """The reference: the model's tokenizer, read by transformers alone."""
    return transformers.AutoTokenizer.from_pretrained(str(snapshot), local_files_only=True)


@pytest.fixture(scope="module")
def server(hub_cache: Path):
    engine = make_async_engine(HUB_ID, download_dir=str(hub_cache))
    srv = start_server(engine, HUB_ID, access=ServerAccess(api_key=KEY, allowed_origins=(ORIGIN,)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(hub_cache: Path) -> LLM:
    """The offline engine on the same weights, by the same Hub id."""
    return LLM(HUB_ID, download_dir=str(hub_cache), device="cpu", block_size=16, num_kv_blocks=512,
               swap_space_gib=0.05)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    return random.Random(f"{request.node.name}-{time.time_ns()}")


def _prompt(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def _post(server, path: str, body: Any, key: str | None = KEY) -> httpx.Response:
    # json.dumps escapes lone surrogates ("\ud800"), as a client's JSON may; httpx's json= cannot send them.
    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{server.base_url}{path}", content=json.dumps(body), headers=headers, timeout=60)


def _error(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]


# ====================================================================== models by Hub id
def test_hub_ids_and_paths_are_told_apart() -> None:
    for ref in ("Qwen/Qwen3-0.6B", "gpt2", "org/name.v2"):
        assert is_hub_id(ref), ref
    for ref in ("./model", "/abs/model", "~/model", "a/b/c", "model.gguf", "org/x.GGUF", "org--x/y", ""):
        assert not is_hub_id(ref), ref


def test_hub_id_resolves_through_the_cache(hub_cache: Path, snapshot: Path) -> None:
    src = resolve_model_source(HUB_ID, download_dir=str(hub_cache))
    assert src.model_dir == snapshot and snapshot.parents[2] == hub_cache
    assert src.weight_files and src.tokenizer_path == snapshot
    assert {k: src.generation_defaults[k] for k in ("temperature", "top_p")} == {"temperature": 0.6, "top_p": 0.95}


def test_a_local_path_wins_over_a_hub_id(hub_cache: Path, snapshot: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / HUB_ID
    shutil.copytree(snapshot, local)
    (local / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    monkeypatch.chdir(tmp_path)
    src = resolve_model_source(HUB_ID, download_dir=str(hub_cache))
    assert src.model_dir == local.resolve() and src.generation_defaults == {"temperature": 0.3}


def test_a_missing_hub_model_is_a_clear_error(hub_cache: Path) -> None:
    with pytest.raises(ValueError, match=r"'tiny-org/absent' is not a local path, nor a model in the Hugging Face "
                                         r"cache at .*HF_HUB_OFFLINE=1") as ei:
        resolve_model_source("tiny-org/absent", download_dir=str(hub_cache))
    assert str(hub_cache) in str(ei.value)
    with pytest.raises(ValueError, match=r"^model: 'tiny-org/absent' is not a local path"):
        LLM("tiny-org/absent", download_dir=str(hub_cache), device="cpu")
    with pytest.raises(ValueError, match="model path does not exist"):  # not an id either: a missing path
        LLM("./no/such/model", device="cpu")


# ====================================================================== generation_config.json defaults
def test_generation_config_defaults_offline(llm: LLM, rng: random.Random) -> None:
    assert llm.get_default_sampling_params() == SamplingParams(**MODEL_DEFAULTS)
    assert llm.get_default_sampling_params() is not llm.get_default_sampling_params()  # a fresh one each call
    outs = llm.generate([_prompt(rng) for _ in range(3)], use_tqdm=False)  # sampling_params=None
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert max(lengths) == MODEL_DEFAULTS["max_tokens"], lengths  # max_new_tokens, not SamplingParams' 16


def test_generation_config_modes_and_odd_values(caplog: pytest.LogCaptureFixture) -> None:
    assert sampling_defaults(GENERATION_CONFIG, "auto") == MODEL_DEFAULTS
    assert sampling_defaults(GENERATION_CONFIG, "none") == {}
    with caplog.at_level(logging.WARNING, logger="pagedattn.engine.generation_defaults"):
        assert sampling_defaults({"top_p": 0.0, "temperature": 0.7}) == {"temperature": 0.7}
    assert "top_p=0.0 is not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pagedattn.engine.generation_defaults"):
        log_defaults(GENERATION_CONFIG, "auto")
    assert "temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.05, max_tokens=12" in caplog.text
    with pytest.raises(ValueError, match="generation_config: must be one of"):
        LLM(device="cpu", generation_config="vllm")


def test_unset_request_fields_take_the_model_defaults(client: openai.OpenAI, llm: LLM, rng: random.Random) -> None:
    prompt, seed = _prompt(rng), rng.randrange(2**31)
    base = dict(model=HUB_ID, prompt=prompt, seed=seed)
    implicit = client.completions.create(**base, extra_body={"ignore_eos": True})
    explicit = client.completions.create(**base, temperature=0.6, top_p=0.95, max_tokens=12,
                                         extra_body={"ignore_eos": True, "top_k": 20})
    want = llm.generate(prompt, SamplingParams(seed=seed, ignore_eos=True, **MODEL_DEFAULTS), use_tqdm=False)[0]
    assert implicit.choices[0].text == explicit.choices[0].text == want.outputs[0].text
    assert implicit.usage.completion_tokens == 12  # min(OpenAI's 16, max_new_tokens)
    # A field the request sets is its own: temperature 0 stays greedy.
    greedy = client.completions.create(**base, temperature=0, extra_body={"ignore_eos": True})
    want = llm.generate(prompt, SamplingParams(**GREEDY, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert greedy.choices[0].text == want.outputs[0].text
    own = client.completions.create(**base, temperature=0, extra_body={"ignore_eos": True, "repetition_penalty": 1})
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert own.choices[0].text == want.outputs[0].text
    # Chat: no max_tokens means the model's max_new_tokens (not the whole context).
    msgs = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=HUB_ID, messages=msgs, seed=seed, extra_body={"ignore_eos": True})
    want = llm.chat(msgs, SamplingParams(seed=seed, ignore_eos=True, **MODEL_DEFAULTS))[0]
    assert chat.choices[0].message.content == want.outputs[0].text and chat.usage.completion_tokens == 12


def test_start_up_lines_name_the_defaults(server, capsys: pytest.CaptureFixture[str]) -> None:
    from pagedattn.entrypoints.server import _announce

    _announce(server.server.config.app.state.server, ServerAccess(api_key="k"), "127.0.0.1", 1)
    err = capsys.readouterr().err
    assert "generation_config.json values: temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.05, " \
           "max_tokens=12" in err
    assert "Authorization: Bearer" in err and "/health and /metrics are open" in err


# ====================================================================== /tokenize, /detokenize
def test_tokenize_a_prompt(server, ref_tok: Any, rng: random.Random) -> None:
    prompt = _prompt(rng, 9) + " 12ab!"
    for add_special in (False, True):
        r = _post(server, "/tokenize", {"model": HUB_ID, "prompt": prompt, "add_special_tokens": add_special})
        want = ref_tok.encode(prompt, add_special_tokens=add_special)
        assert r.status_code == 200 and r.json() == {"count": len(want), "max_model_len": TINY_CONTEXT,
                                                     "tokens": want, "token_strs": None}
    r = _post(server, "/tokenize", {"prompt": prompt, "return_token_strs": True})  # model is optional
    assert r.json()["token_strs"] == ref_tok.convert_ids_to_tokens(ref_tok.encode(prompt))
    assert r.json()["token_strs"][0] == "<|endoftext|>"  # the BOS: add_special_tokens made a difference


def test_completions_add_special_tokens(client: openai.OpenAI, llm: LLM, ref_tok: Any, rng: random.Random) -> None:
    prompt = _prompt(rng)
    for add_special in (True, False):
        ids = ref_tok.encode(prompt, add_special_tokens=add_special)
        r = client.completions.create(model=HUB_ID, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"add_special_tokens": add_special, "ignore_eos": True})
        want = llm.generate({"prompt_token_ids": ids}, SamplingParams(**GREEDY, max_tokens=4, ignore_eos=True),
                            use_tqdm=False)[0]
        assert r.usage.prompt_tokens == len(ids) and r.choices[0].text == want.outputs[0].text


def test_tokenize_a_conversation(server, ref_tok: Any, rng: random.Random) -> None:
    conv = [{"role": "user", "content": _prompt(rng)}, {"role": "assistant", "content": _prompt(rng)},
            {"role": "user", "content": _prompt(rng)}]
    for add_generation in (False, True):
        for add_special in (False, True):
            for continue_final in (False, True):
                if add_generation and continue_final:
                    continue
                msgs = [*conv, {"role": "assistant", "content": "Sure,"}] if continue_final else conv
                for kwargs in ({}, {"enable_thinking": False}):
                    text = ref_tok.apply_chat_template(msgs, add_generation_prompt=add_generation, tokenize=False,
                                                       continue_final_message=continue_final, **kwargs)
                    want = ref_tok.encode(text, add_special_tokens=add_special)
                    r = _post(server, "/tokenize", {
                        "model": HUB_ID, "messages": msgs, "add_generation_prompt": add_generation,
                        "continue_final_message": continue_final, "add_special_tokens": add_special,
                        "chat_template_kwargs": kwargs})
                    assert r.status_code == 200 and r.json()["tokens"] == want, (add_generation, continue_final)
    # Continuing the last message implies no generation prompt unless one is asked for.
    msgs = [*conv, {"role": "assistant", "content": "Sure,"}]
    implicit = _post(server, "/tokenize", {"messages": msgs, "continue_final_message": True}).json()["tokens"]
    assert implicit == ref_tok.encode(ref_tok.apply_chat_template(msgs, continue_final_message=True, tokenize=False),
                                      add_special_tokens=False)
    docs = [{"title": "Note", "text": _prompt(rng)}]
    r = _post(server, "/tokenize", {"messages": conv, "documents": docs})
    assert r.json()["tokens"] == ref_tok.encode(ref_tok.apply_chat_template(
        conv, documents=docs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    assert f"Documents: Note: {docs[0]['text']}" in ref_tok.decode(r.json()["tokens"])  # the template used them


def test_detokenize(server, ref_tok: Any, rng: random.Random) -> None:
    ids = ref_tok.encode(_prompt(rng) + " <|im_end|>", add_special_tokens=False)
    r = _post(server, "/detokenize", {"model": HUB_ID, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": ref_tok.decode(ids)}
    assert _post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


_CONV = [{"role": "user", "content": "hi"}]
_BAD_TOKENIZER_CALLS = [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": _CONV}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a\ud800"}, "prompt"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/tokenize", {"messages": _CONV, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ("/tokenize", {"messages": _CONV, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}},
     "chat_template_kwargs.chat_template"),
    ("/tokenize", {"messages": _CONV, "chat_template_kwargs": {"k": ["ok", "\udc00"]}}, "chat_template_kwargs.k.1"),
    ("/tokenize", {"messages": _CONV, "chat_template_kwargs": []}, "chat_template_kwargs"),
    ("/tokenize", {"messages": _CONV, "continue_final_message": True, "add_generation_prompt": True},
     "continue_final_message"),
    ("/tokenize", {"messages": _CONV, "tools": [{"type": "function", "function": {"name": "f g"}}]},
     "tools.0.function.name"),
    ("/tokenize", [1, 2], None),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {}, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), _BAD_TOKENIZER_CALLS,
                         ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(_BAD_TOKENIZER_CALLS)])
def test_bad_tokenizer_calls_are_400_naming_the_field(server, path: str, body: Any, param: str | None) -> None:
    err = _error(_post(server, path, body))
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_tokenizer_calls_check_the_model(server) -> None:
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        err = _error(_post(server, path, {**body, "model": "other"}), 404)
        assert err["code"] == "model_not_found"


# ====================================================================== chat_template_kwargs
def test_chat_template_kwargs_reach_the_template(client: openai.OpenAI, llm: LLM, ref_tok: Any,
                                                 rng: random.Random) -> None:
    msgs = [{"role": "user", "content": _prompt(rng)}]
    kwargs = {"enable_thinking": False}
    thinking_off = ref_tok.encode(ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                                              **kwargs), add_special_tokens=False)
    plain = ref_tok.encode(ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)
    assert len(thinking_off) > len(plain)
    params = dict(model=HUB_ID, messages=msgs, max_tokens=5, temperature=0)
    r = client.chat.completions.create(**params, extra_body={"chat_template_kwargs": kwargs, "ignore_eos": True})
    assert r.usage.prompt_tokens == len(thinking_off)
    assert client.chat.completions.create(**params).usage.prompt_tokens == len(plain)
    offline = llm.chat(msgs, SamplingParams(**GREEDY, max_tokens=5, ignore_eos=True),
                       chat_template_kwargs=kwargs)[0]
    assert offline.prompt_token_ids == thinking_off and offline.outputs[0].text == r.choices[0].message.content
    assert llm.apply_chat_template(msgs, chat_template_kwargs=kwargs) == thinking_off


def test_chat_template_kwargs_cannot_replace_the_template(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=HUB_ID, messages=_CONV, max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}})
    assert ei.value.body["param"] == "chat_template_kwargs.chat_template"


# ====================================================================== the field tables
@pytest.mark.parametrize("name", sorted(NOT_IMPLEMENTED))
def test_every_not_implemented_field_is_refused(server, name: str) -> None:
    # 2 is no field's no-op value; the same tables guard every endpoint, /tokenize is the cheapest.
    err = _error(_post(server, "/tokenize", {"prompt": "hi", name: 2}))
    assert err["param"] == name and name in err["message"]


def test_not_implemented_fields_at_their_defaults_pass(server, client: openai.OpenAI) -> None:
    r = _post(server, "/tokenize", {"prompt": "hi", **dict.fromkeys(NOT_IMPLEMENTED)})
    assert r.status_code == 200
    r = client.chat.completions.create(
        model=HUB_ID, messages=_CONV, max_tokens=2, presence_penalty=0, frequency_penalty=0.0,
        response_format={"type": "text"}, tool_choice="none", logit_bias={},
        extra_body={"priority": 0, "repetition_penalty": 1.0, "echo": False, "include_reasoning": True})
    assert r.choices[0].finish_reason in ("length", "stop")


_REFUSED = [
    ("chat", {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "guided_regex"),
    ("chat", {"extra_body": {"guided_json": {"type": "object"}, "structural_tag": "x"}}, "structural_tag"),
    ("chat", {"extra_body": {"echo": True}}, "echo"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
    ("chat", {"extra_body": {"priority": 1}}, "priority"),
    ("chat", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("chat", {"messages": [*_CONV, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}]},
     "messages.1.function_call"),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"extra_body": {"guided_regex": "a(", "guided_decoding_backend": "xgrammar"}}, "guided_regex"),
    ("completions", {"extra_body": {"guided_decoding_backend": "outlines"}}, "guided_decoding_backend"),
    ("completions", {"extra_body": {"priority": -3}}, "priority"),
]


@pytest.mark.parametrize(("api", "override", "param"), _REFUSED, ids=[f"{a}-{p}" for a, _, p in _REFUSED])
def test_refused_fields_through_the_client(client: openai.OpenAI, api: str, override: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        if api == "chat":
            client.chat.completions.create(**{"model": HUB_ID, "messages": _CONV, "max_tokens": 2, **override})
        else:
            client.completions.create(**{"model": HUB_ID, "prompt": "hi", "max_tokens": 2, **override})
    assert ei.value.status_code == 400 and ei.value.body["param"] == param


def test_unknown_fields_are_logged_once_ignored_ones_never(client: openai.OpenAI, rng: random.Random,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    top, nested = f"x_top_{rng.randrange(10**9)}", f"x_msg_{rng.randrange(10**9)}"
    msgs: Any = [{"role": "user", "content": "hi", nested: 1}]
    ignored = {"user": "u1", "store": False, "metadata": {"k": "v"}, "service_tier": "auto"}
    with caplog.at_level(logging.WARNING, logger="pagedattn.entrypoints.openai_protocol"):
        for _ in range(2):
            r = client.chat.completions.create(model=HUB_ID, messages=msgs, max_tokens=2, **ignored,
                                               extra_body={top: {"a": 1}})
            assert r.choices  # accepted
    said = [rec.getMessage() for rec in caplog.records]
    assert sum(f"'{top}'" in s for s in said) == 1
    assert sum(f"'messages.*.{nested}'" in s for s in said) == 1
    assert not any(f"'{name}'" in s for s in said for name in IGNORED)


def test_docs_list_every_request_field() -> None:
    from pagedattn.entrypoints import openai_protocol as proto

    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    models = (proto.CompletionRequest, proto.ChatCompletionRequest, proto.TokenizeCompletionRequest,
              proto.TokenizeChatRequest, proto.DetokenizeRequest, proto.ChatMessage)
    names = {*NOT_IMPLEMENTED, *IGNORED, *proto.MESSAGE_NOT_IMPLEMENTED, *proto.MESSAGE_IGNORED,
             *(name for m in models for name in m.model_fields)}
    missing = sorted(n for n in names if f"`{n}`" not in doc and f"`messages.N.{n}`" not in doc)
    assert not missing, f"docs/serving.md does not document {missing}"


# ====================================================================== API key, CORS
def test_the_api_key_is_required(server, rng: random.Random) -> None:
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        wrong.models.list()
    assert ei.value.status_code == 401 and ei.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY[:-1]}"},
                    {"Authorization": f"bearer  {KEY}"}, {"Authorization": "Bearer"}):
        for path in ("/v1/models", "/tokenize", "/nowhere"):
            r = httpx.post(f"{server.base_url}{path}", json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
            assert r.json()["error"]["type"] == "invalid_request_error"
    # Probes stay open; the refusals are counted.
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'pagedattn_request_errors_total{status="401"}' in metrics
    r = _post(server, "/tokenize", {"prompt": _prompt(rng)})
    assert r.status_code == 200


def test_cors_allows_only_the_configured_origin(server) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(url, headers={"Origin": ORIGIN, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(url, headers={"Origin": "https://elsewhere.example", **preflight})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # A page can read the 401 of a request without the key, and the answer with it.
    denied = httpx.get(f"{server.base_url}/v1/models", headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    allowed = httpx.get(f"{server.base_url}/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN


def test_access_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pagedattn.entrypoints.cli import _access

    args = make_parser().parse_args(["serve", "--api-key", "k1", "--allowed-origins", '["https://a", "https://b"]',
                                     "--allowed-methods", "GET, POST", "--allow-credentials", "--protect-probes"])
    assert _access(args) == ServerAccess(api_key="k1", protect_probes=True, allowed_origins=("https://a", "https://b"),
                                         allowed_methods=("GET", "POST"), allow_credentials=True)
    monkeypatch.setenv("PAGEDATTN_API_KEY", "from-env")
    assert _access(make_parser().parse_args(["serve"])).api_key == "from-env"
    assert _access(args).api_key == "k1"  # the flag wins
    monkeypatch.delenv("PAGEDATTN_API_KEY")
    assert _access(make_parser().parse_args(["serve"])) == ServerAccess()
    assert main(["serve", "--api-key", " ", "--device", "cpu"]) == 2  # before any model loads
    assert "api_key: empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--allowed-origins", '["https://a", 3]'])


# ====================================================================== ``pagedattn serve --model org/name``
def test_serve_flags_reach_the_engine(server, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedattn.config import config_from_args
    from pagedattn.entrypoints.server import model_sampling_defaults

    args = make_parser().parse_args(["serve", "--model", HUB_ID, "--download-dir", str(hub_cache),
                                     "--generation-config", "none"])
    config = config_from_args(args)
    assert (config.model, config.download_dir, config.generation_config) == (HUB_ID, str(hub_cache), "none")
    assert model_sampling_defaults(server.engine) == MODEL_DEFAULTS
    monkeypatch.setattr(server.engine.engine.config, "generation_config", "none")
    assert model_sampling_defaults(server.engine) == {}


@pytest.mark.slow  # a process of its own: ~10-20 s on two cores
def test_serve_a_hub_id_from_hf_home(hf_home: Path, tmp_path: Path, rng: random.Random) -> None:
    """The command line end to end: the Hub id through HF_HOME's cache, the key from
    PAGEDATTN_API_KEY, ``--generation-config none`` (the API's defaults), no CORS."""
    key = secrets.token_urlsafe(12)
    env = {"HF_HOME": str(hf_home), "PAGEDATTN_API_KEY": key}
    with ServeProcess(HUB_ID, tmp_path, "--generation-config", "none", env=env) as srv:
        auth = {"Authorization": f"Bearer {key}"}
        models = httpx.get(f"{srv.base_url}/v1/models", headers={**auth, "Origin": ORIGIN})
        assert [m["id"] for m in models.json()["data"]] == [HUB_ID]
        assert "access-control-allow-origin" not in models.headers
        assert httpx.get(f"{srv.base_url}/v1/models").status_code == 401
        body = {"model": HUB_ID, "prompt": _prompt(rng), "seed": rng.randrange(2**31), "ignore_eos": True}
        implicit = httpx.post(f"{srv.base_url}/v1/completions", json=body, headers=auth, timeout=60).json()
        explicit = httpx.post(f"{srv.base_url}/v1/completions", headers=auth, timeout=60, json={
            **body, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 16}).json()
        assert implicit["usage"]["completion_tokens"] == 16  # OpenAI's default, not max_new_tokens
        assert implicit["choices"][0]["text"] == explicit["choices"][0]["text"]
    err = srv.stderr()
    assert "Authorization: Bearer" in err and "generation_config.json values" not in err and key not in err
