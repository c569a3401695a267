"""Incremental detokenisation: whatever ids come, whichever way a window is decoded
(tokenizers' DecodeStream or two ``decode`` calls), the streamed text is the tokenizer's own
decode of the output, and a finished sequence's text is all of it.

Vocabularies, built here with the ``tokenizers`` library (nothing is downloaded): a byte-fallback
SentencePiece-style BPE laid out as Llama 2's ``tokenizer.json`` (and Gemma's variant, without the
leading-space strip), a byte-level BPE as GPT-2's and Qwen's, the embedded default model's, and a
Llama vocabulary read from GGUF metadata by the loader.

What "the text" is (see ``pagedattn.engine.detokenizer``): ``decode(P + out)[len(decode(P)):]``
where ``P`` is the prompt read up to what it leaves open (a byte run, an unfinished character,
tokens the decoder drops), so the output never rewrites the prompt's text.  Held back while the
sequence runs: at most an unfinished character or byte run at the very end.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pagedattn.engine import detokenizer as dt
from pagedattn.engine.output_processor import check_stop_strings
from pagedattn.engine.sampling_params import SamplingParams
from pagedattn.engine.sequence import Sequence

TEXTS = [
    " The capital of France is Paris. It has been since 987.",
    " Café, naïve, jalapeño: ünïcödé everywhere — and “quotes”.",
    " 日本語のテキストと絵文字 🍣☕ mixed with English words.",
    "\n\n  indented\tcode() { return x[i] + 1; }\n",
]
# What the byte-fallback vocabularies learn from: no CJK or emoji, so those fall back to bytes.
CORPUS = [TEXTS[0], TEXTS[1], TEXTS[3], "Hello world, how are you doing today? I like tea and coffee."] * 8
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
SPECIALS = ["<unk>", "<s>", "</s>"]


# ====================================================================== vocabularies
def llama_tokenizer(strip: bool = True) -> transformers.PreTrainedTokenizerFast:
    """Llama 2's layout: ``<unk> <s> </s>``, the 256 byte tokens, then learned ``▁`` pieces; byte
    fallback in the model and decoder.  ``strip=False``: Gemma's decoder (no leading-space strip)."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, special_tokens=SPECIALS,
                                                            show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTE_TOKENS)}
    for t in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tk = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if strip else steps)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", clean_up_tokenization_spaces=False)


def byte_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """GPT-2's and Qwen's kind: every byte is a token of its own, characters split across tokens."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS * 8, trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                                clean_up_tokenization_spaces=False)


@functools.cache
def byte_ids(tok: Any) -> list[int]:
    """The tokens worth over-representing: byte-fallback tokens, or a byte-level BPE's 256 one-byte
    tokens."""
    ids = [i for i in tok.convert_tokens_to_ids(BYTE_TOKENS) if i not in (None, tok.unk_token_id)]
    if ids:
        return ids
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    return sorted(i for i in tok.convert_tokens_to_ids(alphabet) if i is not None)


def write_llama_gguf(path: Path, tok: Any, seed: int = 0) -> Path:
    """A tiny random Llama as llama.cpp writes it, with ``tok``'s vocabulary as SentencePiece
    metadata (token types: 2 unknown, 3 control, 6 byte, 1 normal; scores give the merge order)."""
    import gguf

    from .test_loader import _gguf_sizes, add_hf_tensors, close_gguf

    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    byte = set(BYTE_TOKENS)
    types = [2 if t == "<unk>" else 3 if t in SPECIALS else 6 if t in byte else 1 for t in tokens]
    cfg = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, initializer_range=0.002)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg)
    w = gguf.GGUFWriter(str(path), "llama")
    _gguf_sizes(w, cfg)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    add_hf_tensors(w, hf, "llama", lambda _, a: (a.astype(np.float16), None))  # tied: no lm_head
    return close_gguf(w, path)


@pytest.fixture(scope="session")
def llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_gguf(tmp_path_factory.mktemp("gguf-llama") / "tiny-llama.gguf", llama_tokenizer())


@pytest.fixture(scope="session")
def gguf_llama_tokenizer(llama_gguf: Path) -> Any:
    """The loader's tokenizer for a GGUF with a SentencePiece (byte-fallback) vocabulary."""
    from pagedattn.models.loader import load_tokenizer, resolve_model_source

    return load_tokenizer(resolve_model_source(str(llama_gguf)))


VOCABS = ["llama", "gemma", "byte_level", "default", "gguf_llama"]


@pytest.fixture(scope="module", params=VOCABS)
def vocab(request: pytest.FixtureRequest) -> Any:
    builders: dict[str, Callable[[], Any]] = {
        "llama": llama_tokenizer,
        "gemma": lambda: llama_tokenizer(strip=False),
        "byte_level": byte_level_tokenizer,
        "default": lambda: transformers.AutoTokenizer.from_pretrained(request.getfixturevalue("default_model_dir")),
        "gguf_llama": lambda: request.getfixturevalue("gguf_llama_tokenizer"),
    }
    return builders[request.param]()


@pytest.fixture(scope="module")
def llama() -> Any:
    return llama_tokenizer()


# ====================================================================== the oracle
def is_byte_fallback(tok: Any) -> bool:
    return tok.convert_tokens_to_ids("<0x41>") not in (None, tok.unk_token_id)


def expected_text(tok: Any, prompt: list[int], out: list[int], skip: bool) -> str:
    """The tokenizer's own decode of the output after the prompt, the prompt read up to what it
    leaves open (trailing byte tokens, tokens the decoder drops, an unfinished character)."""
    open_ids = set(byte_ids(tok)) if is_byte_fallback(tok) else set()
    size = tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    dropped = set(tok.all_special_ids) if skip else set()
    p = list(prompt)
    while p and (p[-1] in open_ids or p[-1] in dropped or p[-1] >= size
                 or tok.decode(p, skip_special_tokens=skip).endswith("\ufffd")):
        p.pop()
    head, full = tok.decode(p, skip_special_tokens=skip), tok.decode(p + out, skip_special_tokens=skip)
    assert full.startswith(head)
    if p == prompt:  # a prompt that ends whole: plainly what the output adds to its text
        assert full == tok.decode(prompt + out, skip_special_tokens=skip)
    return full[len(head):]


def run(tok: Any, prompt: list[int], out: list[int], chunks: list[int], skip: bool, stream: bool = True,
        stop: str | None = None) -> tuple[Sequence, list[str]]:
    """Feed ``out`` in ``chunks`` as the engine does (stop strings checked on the text after each
    step, and once more after the sequence finishes and its held-back text comes out); return the
    sequence and its text after each step."""
    seq = Sequence("s", 0, list(prompt), len(prompt))
    seq.detok = dt._Window(tok, seq, skip)
    seq.detok.use_stream = stream
    params = SamplingParams(stop=stop)
    texts, pieces, i = [], [], 0
    for n in chunks:
        if i >= len(out):
            break
        seq.token_ids.extend(out[i:i + n])
        i += n
        pieces.append(dt.detokenize_incrementally(tok, seq, skip))
        assert "".join(pieces) == seq.text  # the pieces are the text, nothing taken back
        texts.append(seq.text)
        if stop and check_stop_strings(seq, params):
            return seq, texts
    seq.token_ids.extend(out[i:])
    dt.finish_detokenizing(tok, seq, skip)
    if stop:
        check_stop_strings(seq, params)
    return seq, texts


# ====================================================================== the property
@functools.cache
def token_ids(tok: Any) -> st.SearchStrategy[list[int]]:
    """Ids as a model may sample them: byte tokens over-represented (alone they are mostly not
    UTF-8), whole encoded characters (so runs are often valid), special tokens and ids past the
    vocabulary (a model's padded rows), mixed."""
    size, byte = tok.backend_tokenizer.get_vocab_size(with_added_tokens=True), byte_ids(tok)
    text = st.text(st.sampled_from(list("ab é—日本語🍣☕\n")), min_size=1, max_size=4)
    piece = st.one_of(
        st.lists(st.sampled_from(byte), min_size=1, max_size=4),
        text.map(lambda s: tok.encode(s, add_special_tokens=False)),
        st.integers(0, size + 2).map(lambda i: [i]),
        st.sampled_from(tok.all_special_ids).map(lambda i: [i]),
    )
    return st.lists(piece, max_size=8).map(lambda ps: [i for p in ps for i in p])


def check_streamed_text(tok: Any, data: st.DataObject, skip: bool, stream: bool) -> None:
    ids = token_ids(tok)
    prompt, out = data.draw(ids, "prompt"), data.draw(ids.filter(bool), "out")
    chunks = data.draw(st.lists(st.integers(1, 3), min_size=len(out), max_size=len(out)), "chunks")
    want = expected_text(tok, prompt, out, skip)
    seq, texts = run(tok, prompt, out, chunks, skip, stream)
    assert seq.text == want  # finished: all of it
    assert all(want.startswith(t) for t in texts)  # while running: never a character that is not in it
    held = want[len(texts[-1]):]
    if held:  # only an unfinished character or byte run at the end is held back
        tail_is_bytes = (is_byte_fallback(tok) and out[-1] in byte_ids(tok)) or out[-1] in tok.all_special_ids \
            or out[-1] >= tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)
        assert tail_is_bytes or want.endswith("\ufffd"), (held, out)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans(), stream=st.booleans())
def test_streamed_text_is_the_full_decode(vocab: Any, data: st.DataObject, skip: bool, stream: bool) -> None:
    check_streamed_text(vocab, data, skip, stream)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_text_made_only_at_the_end_is_the_full_decode(vocab: Any, data: st.DataObject, skip: bool) -> None:
    """A sequence that is not streamed and has no stop strings is detokenised once, when it
    finishes: the same text as fed token by token."""
    ids = token_ids(vocab)
    prompt, out = data.draw(ids, "prompt"), data.draw(ids.filter(bool), "out")
    seq = Sequence("s", 0, [*prompt, *out], len(prompt))
    dt.finish_detokenizing(vocab, seq, skip)
    assert seq.text == expected_text(vocab, prompt, out, skip)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans(), stream=st.booleans())
def test_streamed_text_is_the_full_decode_long(vocab: Any, data: st.DataObject, skip: bool, stream: bool) -> None:
    check_streamed_text(vocab, data, skip, stream)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans(), stream=st.booleans())
def test_stop_strings_across_byte_tokens_are_found(vocab: Any, data: st.DataObject, skip: bool,
                                                   stream: bool) -> None:
    """A stop string cut from the text (so often spanning byte tokens and characters made of
    several) ends the text where it first occurs, found while streaming or in the held-back end."""
    tok = vocab
    ids = token_ids(tok)
    prompt, out = data.draw(ids, "prompt"), data.draw(ids.filter(bool), "out")
    want = expected_text(tok, prompt, out, skip)
    if not want:
        return
    a = data.draw(st.integers(0, len(want) - 1), "stop start")
    stop = want[a:a + data.draw(st.integers(1, 4), "stop length")]
    seq, _ = run(tok, prompt, out, [1] * len(out), skip, stream, stop=stop)
    assert seq.text == want[:want.find(stop)] and seq.stop_reason == stop


# ====================================================================== cases by name
def test_text_of_real_sentences(vocab: Any) -> None:
    tok = vocab
    prompt = tok.encode("Tell me something:", add_special_tokens=False)
    for text in TEXTS:
        out = tok.encode(text, add_special_tokens=False)
        want = tok.decode(prompt + out)[len(tok.decode(prompt)):]
        for chunk in (1, 3):
            for stream in (True, False):
                seq, texts = run(tok, prompt, out, [chunk] * len(out), True, stream)
                assert seq.text == texts[-1] == want, (text, chunk, stream)


def test_byte_fallback_sequences_tokenizers_refuses(llama: Any) -> None:
    """The reported failure: a byte that turns a decoded run into U+FFFD makes tokenizers' stream
    raise ("Invalid prefix"); here the run's text waits for the run to end."""
    from tokenizers.decoders import DecodeStream

    a, bad, coffee = llama.convert_tokens_to_ids(["<0x41>", "<0x80>", "<0xE2>"])
    word = llama.encode("tea", add_special_tokens=False)  # " tea": the normalizer adds the "▁"
    out = [a, bad, *word]
    stream = DecodeStream(skip_special_tokens=True)
    with pytest.raises(Exception, match="Invalid prefix"):
        for t in out:
            stream.step(llama.backend_tokenizer, t)
    prompt = llama.encode("I like", add_special_tokens=False)
    seq, texts = run(llama, prompt, out, [1] * len(out), True)
    assert texts[:2] == ["", ""] and seq.text == texts[-1] == "�� tea"
    # A valid run waits for its end too, then comes out whole.
    cup = llama.encode("☕", add_special_tokens=False)
    first_byte = cup.index(coffee)
    seq, texts = run(llama, prompt, cup + word, [1] * (len(cup) + len(word)), True)
    assert texts[first_byte:len(cup)] == [texts[first_byte - 1]] * (len(cup) - first_byte)
    assert seq.text == texts[-1] == " ☕ tea"


def test_a_prompt_left_open_is_not_rewritten(llama: Any) -> None:
    """A prompt ending on a byte run: output bytes start a run of their own, so a stray byte is
    one U+FFFD (not the prompt's whole character turned into four), and a whole character is
    itself."""
    prompt = llama.encode("I like ☕", add_special_tokens=False)
    bad = llama.convert_tokens_to_ids("<0x80>")
    cup = llama.encode("☕", add_special_tokens=False)[1:]  # the bytes without the leading "▁"
    assert run(llama, prompt, [bad], [1], True)[0].text == "�"
    assert run(llama, prompt, cup, [1] * len(cup), True)[0].text == "☕"
    assert llama.decode(prompt + cup) == "I like ☕☕"


def test_a_byte_level_prompt_cut_inside_a_character(vocab: Any) -> None:
    """A prompt of ids that ends inside a character: the output is decoded after the prompt's last
    whole character, and comes out the same either way."""
    tok = vocab
    cut = tok.encode(" ☕ and 🍣", add_special_tokens=False)
    k = next((k for k in range(1, len(cut)) if tok.decode(cut[:k]).endswith("\ufffd")), None)
    if k is None:
        pytest.skip("this vocabulary spells these characters in one token")
    out = tok.encode(" and then some more text.", add_special_tokens=False)
    texts = {run(tok, cut[:k], out, [1] * len(out), True, stream)[0].text for stream in (True, False)}
    assert texts == {expected_text(tok, cut[:k], out, True)}


def test_tokenizers_refusing_midway_hands_over_to_decode(llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should tokenizers' stream refuse anyway, the sequence goes on by ``decode`` from the prompt
    on, and the text already out is not repeated."""
    real = dt.DecodeStream
    steps = {"n": 0}

    class Refusing:
        def __init__(self, **kw: Any) -> None:
            self.inner = real(**kw)

        def step(self, backend: Any, t: int) -> str | None:
            steps["n"] += 1
            if steps["n"] == 6:
                raise Exception("Invalid prefix encountered while decoding stream.")
            return self.inner.step(backend, t)

    monkeypatch.setattr(dt, "DecodeStream", Refusing)
    prompt = llama.encode("Tell me:", add_special_tokens=False)
    out = llama.encode(" Café, ☕ naïve — tea and coffee today", add_special_tokens=False)
    seq, texts = run(llama, prompt, out, [1] * len(out), True)
    assert steps["n"] == 6 and not seq.detok.use_stream
    assert seq.text == texts[-1] == llama.decode(prompt + out)[len(llama.decode(prompt)):]


def test_what_the_detokenizer_learns_of_a_vocabulary(llama: Any) -> None:
    v = dt._vocab(llama)
    assert v.byte_ids == set(range(3, 259)) and v.special_ids == {0, 1, 2} and v.stream
    assert not dt._vocab(byte_level_tokenizer()).byte_ids
    # Tokens spelled like bytes, but a decoder that writes them out as they are: no byte fallback.
    plain = Tokenizer(models.WordLevel({"<0x41>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=plain, unk_token="[UNK]")
    assert tok.decode([0]) == "<0x41>" and not dt._vocab(tok).byte_ids


def test_decode_that_cleans_up_spaces_never_uses_the_stream() -> None:
    tok = byte_level_tokenizer()
    tok.clean_up_tokenization_spaces = True
    assert not dt._vocab(tok).stream
