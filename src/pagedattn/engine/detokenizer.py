"""Incremental detokenisation for streaming.

Decoding one token at a time is wrong (a character may span tokens, and a decoder may treat a
token by what surrounds it) and decoding everything each step is quadratic.  Each sequence keeps a
short window of ids: the last ones whose text is out (left context, decoded again so that merges
and leading spaces at the seam come out as in the full text) and those whose text is not out yet.
Text is emitted once the window decodes to more than its left context and does not end in an
unfinished character (U+FFFD), as vLLM and TGI do.  The window is decoded one of two ways, with
the same text as a result:

* tokenizers' own :class:`~tokenizers.decoders.DecodeStream` (Rust) for fast tokenizers whose
  ``decode`` does not clean up spaces: ~3 us a token on a 2-core CPU against ~6.5 us for two
  Python-level ``decode`` calls;
* otherwise, and for any window holding byte-fallback tokens: ``decode`` of the whole window and
  of its left context.

Byte fallback (Llama 2, Mistral, Gemma, Phi-3: tokens ``<0x00>``..``<0xFF>`` for what the
vocabulary cannot spell) decodes a run of byte tokens as one UTF-8 string, and where the run is
not valid UTF-8 every byte of it becomes U+FFFD: one more byte can turn characters already decoded
into replacement characters.  The text of a run is therefore held back until the run ends (a
token that is neither a byte token nor dropped from the text), and DecodeStream, which cannot take
text back (it raises "Invalid prefix"), only sees runs that have ended.  Should it refuse anyway,
the sequence goes on with the ``decode`` way from the prompt on.

What the text is: the text the output tokens add to the prompt's, where the prompt is read up to
what it leaves open (a trailing byte run, an unfinished character, tokens dropped from the text),
so the output never rewrites the prompt's text: ``decode(P + out)[len(decode(P)):]`` for that
prompt ``P``.  While a sequence runs, its text is a prefix of that, short of an unfinished
character or byte run at the very end; :func:`finish_detokenizing` adds that remainder once the
sequence finishes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from .sequence import Sequence

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # a tokenizers without DecodeStream
    DecodeStream = None  # type: ignore[assignment,misc]

_LEFT_CONTEXT = 5
_UNFINISHED = "\ufffd"  # what decoders make of bytes that are not (yet) a whole character


def detokenize_incrementally(tok: PreTrainedTokenizerBase, seq: Sequence, skip_special_tokens: bool) -> str:
    """Append the text of ``seq``'s newest tokens to ``seq.text``; return the new piece."""
    if seq.detok is None:
        seq.detok = _Window(tok, seq, skip_special_tokens)
    new = seq.detok.feed(tok, seq)
    seq.text += new
    return new


def finish_detokenizing(tok: PreTrainedTokenizerBase, seq: Sequence, skip_special_tokens: bool) -> str:
    """Append whatever text of ``seq`` is still held back (an unfinished character or byte run
    at the end): a finished sequence's text is the whole decode of its output."""
    if seq.detok is None:
        seq.detok = _Window(tok, seq, skip_special_tokens)
    new = seq.detok.finish(tok, seq)
    seq.text += new
    return new


# ---------------------------------------------------------------------- the vocabulary
@dataclass(frozen=True)
class _Vocab:
    """What the detokenizer needs to know of a tokenizer, worked out once per tokenizer."""

    size: int  # ids from here on are no token: decoders drop them
    byte_ids: frozenset[int]  # byte-fallback tokens (none unless the decoder turns them into bytes)
    special_ids: frozenset[int]  # the ids ``skip_special_tokens`` drops
    stream: bool  # whether DecodeStream decodes as ``tok.decode`` does

    def dropped(self, t: int, skip_special_tokens: bool) -> bool:
        """Whether the decoder never sees ``t``: it neither adds text nor ends a byte run."""
        return t >= self.size or (skip_special_tokens and t in self.special_ids)

    def opens(self, t: int, skip_special_tokens: bool) -> bool:
        """Whether ``t`` leaves a byte run open (a byte token, or one the decoder never sees)."""
        return t in self.byte_ids or self.dropped(t, skip_special_tokens)

    def run_open(self, ids: list[int], start: int, skip_special_tokens: bool) -> bool:
        """Whether ``ids`` end inside a byte run that began at ``start`` or later."""
        if not self.byte_ids:
            return False
        for i in range(len(ids) - 1, start - 1, -1):
            if ids[i] in self.byte_ids:
                return True
            if not self.dropped(ids[i], skip_special_tokens):
                return False
        return False


_VOCABS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, _Vocab] = weakref.WeakKeyDictionary()


def _vocab(tok: PreTrainedTokenizerBase) -> _Vocab:
    v = _VOCABS.get(tok)
    if v is None:
        v = _VOCABS[tok] = _inspect(tok)
    return v


def _inspect(tok: PreTrainedTokenizerBase) -> _Vocab:
    backend = getattr(tok, "backend_tokenizer", None)
    specials = set(tok.all_special_ids)
    if backend is not None:  # tokenizers drops its added tokens marked special, whatever transformers lists
        specials |= {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        size = backend.get_vocab_size(with_added_tokens=True)
    else:
        size = len(tok)
    stream = DecodeStream is not None and backend is not None and not getattr(tok, "clean_up_tokenization_spaces",
                                                                               False)
    return _Vocab(size, _byte_fallback_ids(tok), frozenset(specials), stream)


def _byte_fallback_ids(tok: PreTrainedTokenizerBase) -> frozenset[int]:
    """The ids of ``<0x00>``..``<0xFF>``, where the decoder turns them into bytes."""
    found = tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    assert isinstance(found, list)  # a list of tokens gives a list of ids
    ids = [i for i in found if i is not None and i != tok.unk_token_id]
    if not ids or _decode(tok, ids[:1], False) == tok.convert_ids_to_tokens(ids[0]):  # spelled as written
        return frozenset()
    return frozenset(ids)


def _decode(tok: PreTrainedTokenizerBase, ids: list[int], skip_special_tokens: bool) -> str:
    text = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str)  # one flat list of ids decodes to one string
    return text


def _context(tok: PreTrainedTokenizerBase, v: _Vocab, seq: Sequence, skip_special_tokens: bool) -> list[int]:
    """The prompt's last few tokens, the output's left context: its first token's leading space (or
    its merge with the prompt) decodes as in the full text.  It ends before what the prompt leaves
    open, so the output starts its own byte run or character; it starts where no byte run is cut."""
    ids, end = seq.token_ids, seq.prompt_len
    while end > 0 and v.opens(ids[end - 1], skip_special_tokens):
        end -= 1
    start = max(0, end - _LEFT_CONTEXT)
    while start > 0 and v.opens(ids[start], skip_special_tokens) and v.opens(ids[start - 1], skip_special_tokens):
        start -= 1
    while end > start and (v.opens(ids[end - 1], skip_special_tokens)
                           or _decode(tok, ids[start:end], skip_special_tokens).endswith(_UNFINISHED)):
        end -= 1
    return ids[start:end]


# ---------------------------------------------------------------------- one sequence
class _Window:
    """One sequence's detokenizer: ``ids[:read]`` is left context whose text is out, ``ids[read:]``
    the tokens whose text is not.  Every split it makes (the window's start, ``read``) falls after
    a whole character and outside any byte run, so the window decodes as its part of the full text."""

    def __init__(self, tok: PreTrainedTokenizerBase, seq: Sequence, skip_special_tokens: bool) -> None:
        self.vocab = _vocab(tok)
        self.skip = skip_special_tokens
        self._restart(tok, seq, use_stream=self.vocab.stream)

    def _restart(self, tok: PreTrainedTokenizerBase, seq: Sequence, use_stream: bool) -> None:
        """Start over from the prompt, dropping the text that is already out."""
        self.ids = _context(tok, self.vocab, seq, self.skip)
        self.read = len(self.ids)
        self.prefix: str | None = None  # the text of ids[:read], decoded when needed
        self.fed = seq.prompt_len  # tokens of the sequence taken in so far
        self.swallow = len(seq.text)  # characters of text already out
        self.use_stream = use_stream
        self.stream: Any = None  # a DecodeStream primed with ids[:read]; None: primed when next used

    def feed(self, tok: PreTrainedTokenizerBase, seq: Sequence) -> str:
        ids = seq.token_ids
        if self.vocab.run_open(ids, seq.prompt_len, self.skip):
            return ""  # the run may yet turn what it decoded to into U+FFFD
        new = ids[self.fed:]
        self.fed = len(ids)
        if self.use_stream and self.vocab.byte_ids.isdisjoint(self.ids[self.read:]) \
                and self.vocab.byte_ids.isdisjoint(new):
            try:
                return self._swallowed(self._by_stream(tok, new))
            except Exception:  # tokenizers refuses the window (its text no longer starts as before)
                self._restart(tok, seq, use_stream=False)
                new = seq.output_token_ids
                self.fed = len(ids)
        return self._swallowed(self._by_decode(tok, new, final=False))

    def finish(self, tok: PreTrainedTokenizerBase, seq: Sequence) -> str:
        new = seq.token_ids[self.fed:]
        self.fed = len(seq.token_ids)
        return self._swallowed(self._by_decode(tok, new, final=True))

    def _by_stream(self, tok: PreTrainedTokenizerBase, new: list[int]) -> str:
        if self.stream is None:
            pending = self.ids[self.read:]
            del self.ids[self.read:]
            self.stream = DecodeStream(ids=self.ids, skip_special_tokens=self.skip)
            new = pending + new
        backend = tok.backend_tokenizer
        pieces = []
        for t in new:
            self.ids.append(t)
            piece = self.stream.step(backend, t)
            if piece is not None:  # the stream's window now starts where it last read up to, as ours does
                del self.ids[:self.read]
                self.read = len(self.ids)
                pieces.append(piece)
        if pieces:
            self.prefix = None
        return "".join(pieces)

    def _by_decode(self, tok: PreTrainedTokenizerBase, new: list[int], final: bool) -> str:
        self.ids += new
        self.stream = None  # it has not seen these
        text = _decode(tok, self.ids, self.skip)
        if self.prefix is None:
            self.prefix = _decode(tok, self.ids[:self.read], self.skip)
        if len(text) <= len(self.prefix) or (text.endswith(_UNFINISHED) and not final):
            return ""
        piece = text[len(self.prefix):]
        del self.ids[:self.read]
        self.read = len(self.ids)
        self.prefix = None
        return piece

    def _swallowed(self, piece: str) -> str:
        if self.swallow:
            cut = min(self.swallow, len(piece))
            self.swallow -= cut
            piece = piece[cut:]
        return piece
