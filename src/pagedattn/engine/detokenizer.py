"""Incremental detokenisation for streaming.

Decoding one token at a time is wrong for byte-level BPE (a character may span tokens) and
decoding everything each step is quadratic.  We keep two offsets into the token list, as
vLLM and TGI do: text is emitted only once the tokens after ``read_offset`` decode to
something that does not end in an incomplete character (U+FFFD), and a few tokens of left
context (from ``prefix_offset``) are decoded along with it so merges at the seam come out
right.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .sequence import Sequence

_LEFT_CONTEXT = 5


def detokenize_incrementally(tok: PreTrainedTokenizerBase, seq: Sequence, skip_special_tokens: bool) -> str:
    """Append the text of ``seq``'s newest tokens to ``seq.text``; return the new piece."""
    ids = seq.token_ids
    if seq.read_offset == 0 and seq.prefix_offset == 0:
        # Start with the prompt's tail as left context so the first output token's leading
        # space (or its merge with the prompt) decodes as it will in the full text.
        seq.read_offset = seq.prompt_len
        seq.prefix_offset = max(0, seq.prompt_len - _LEFT_CONTEXT)
    prefix_text = tok.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip_special_tokens)
    full_text = tok.decode(ids[seq.prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
        new = full_text[len(prefix_text):]
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        seq.text += new
        return new
    return ""
