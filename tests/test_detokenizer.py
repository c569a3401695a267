"""Incremental detokenisation: the streamed text is the text of the whole sequence, whichever of
the two ways produced it (tokenizers' DecodeStream, or the two-offset decode)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from pagedattn.engine import detokenizer as dt
from pagedattn.engine.sequence import Sequence

TEXTS = [
    " The capital of France is Paris. It has been since 987.",
    " Café, naïve, jalapeño: ünïcödé everywhere — and “quotes”.",
    " 日本語のテキストと絵文字 🍣☕ mixed with English words.",
    "\n\n  indented\tcode() { return x[i] + 1; }\n",
]


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _stream(tok: Any, prompt: list[int], out: list[int], chunk: int, how: Any) -> tuple[Sequence, str]:
    seq = Sequence("s", 0, list(prompt), len(prompt))
    pieces = []
    for i in range(0, len(out), chunk):
        seq.token_ids.extend(out[i:i + chunk])
        pieces.append(how(tok, seq, True))
    return seq, "".join(pieces)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_text_of_the_output(tok: Any, text: str, chunk: int) -> None:
    prompt = tok.encode("Tell me something:", add_special_tokens=False)
    out = tok.encode(text, add_special_tokens=False)
    want = tok.decode(prompt + out)[len(tok.decode(prompt)):]
    for how in (dt.detokenize_incrementally, dt._detokenize_by_offsets):
        seq, streamed = _stream(tok, prompt, out, chunk, how)
        assert seq.text == streamed == want, how.__name__
    assert seq.decode_stream is None  # the offsets way never makes a stream
    seq, _ = _stream(tok, prompt, out, chunk, dt.detokenize_incrementally)
    assert seq.decode_stream not in (None, False)  # a fast tokenizer and a plain prompt: the stream


def test_prompt_tails_the_stream_cannot_take_use_the_offsets(tok: Any) -> None:
    """A prompt ending inside a character or on a special token, and tokenizers whose decode
    cleans up spaces, go the offsets way; the text is the same either way."""
    out = tok.encode(" and then some more text.", add_special_tokens=False)
    cut = tok.encode(" ☕", add_special_tokens=False)
    assert len(cut) > 1, "needs a character split over tokens"
    special = [*tok.encode("Hi", add_special_tokens=False), tok.all_special_ids[0]]
    for prompt in (cut[:-1], special):
        seq, streamed = _stream(tok, prompt, out, 1, dt.detokenize_incrementally)
        assert seq.decode_stream is False
        assert streamed == _stream(tok, prompt, out, 1, dt._detokenize_by_offsets)[1]
    tok.clean_up_tokenization_spaces = True
    try:
        seq, _ = _stream(tok, tok.encode("Hi", add_special_tokens=False), out, 1, dt.detokenize_incrementally)
        assert seq.decode_stream is False
    finally:
        tok.clean_up_tokenization_spaces = False


def test_random_token_ids_stream_like_the_offsets(tok: Any) -> None:
    """Random ids (cut characters, special tokens anywhere), fed 1..3 at a time: both ways give
    the same text."""
    rng = random.Random(7)
    vocab, specials = len(tok), tok.all_special_ids
    for _ in range(300):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 10))]
        out = [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(rng.randint(1, 16))]
        chunk = rng.randint(1, 3)
        fast = _stream(tok, prompt, out, chunk, dt.detokenize_incrementally)[0].text
        slow = _stream(tok, prompt, out, chunk, dt._detokenize_by_offsets)[0].text
        want = tok.decode(prompt + out, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]
        assert fast == slow or fast == want.rstrip("\ufffd"), (prompt, out, chunk)
