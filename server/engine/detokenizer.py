"""Streaming detokenization with stop sequences.

Incremental decoding as in TGI and vLLM: the stream keeps a window of recent token ids split by a read
offset, decodes the window with and without the tokens after the offset, and emits the difference. The
tokens before the offset give context, so tokenizers whose text for a token depends on its neighbours
(SentencePiece's stripped leading space, byte-level BPE's characters split across tokens) give the same
text as decoding everything at once, at a cost per token that depends on the window, not on the length of
the generation. Text ending in U+FFFD (an incomplete UTF-8 character) waits for the next token.

On top of that, text that could be the beginning of a stop sequence is held back until the following text
decides it, so nothing from a stop sequence on is ever sent, even when the stop spans several tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


class TextStream:
    """Turns one sequence's generated token ids into text chunks that are safe to send.

    All `push` results plus `finish()` add up to `tokenizer.decode(ids, skip_special_tokens=True)` cut
    before the first occurrence of any stop sequence.
    """

    def __init__(self, tokenizer: Any, stop_sequences: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = tuple(stop_sequences)
        self._window: list[int] = []  # ids from the prefix offset on
        self._read = 0  # window[:read] is context whose text was already taken
        self._pending = ""  # decoded but unsent: a tail that may start a stop sequence
        self._stopped = False
        self._done = False

    @property
    def stopped(self) -> bool:
        """A stop sequence appeared; the text from it on was dropped."""
        return self._stopped

    def push(self, token_id: int) -> str:
        """Add the next generated token; returns the text that became final (often "")."""
        if self._stopped or self._done:
            raise RuntimeError("push() after the stream stopped or finished")
        self._window.append(token_id)
        new, complete = self._tail_text()
        if not complete:
            # The characters before the partial one are final already, so a stop among them counts now.
            return self._cut_at_stop(self._pending + new.rstrip(_REPLACEMENT)) or ""
        self._window = self._window[self._read :]
        self._read = len(self._window)
        text = self._pending + new
        cut = self._cut_at_stop(text)
        if cut is not None:
            return cut
        keep = len(text) - self._stop_prefix_len(text)
        self._pending = text[keep:]
        return text[:keep]

    def finish(self) -> str:
        """End of generation (length or EOS): returns the held-back text, partial characters included."""
        if self._stopped or self._done:
            return ""
        self._done = True
        new, _ = self._tail_text()
        text = self._pending + new
        self._pending = ""
        cut = self._cut_at_stop(text)
        return text if cut is None else cut

    def _tail_text(self) -> tuple[str, bool]:
        """Text the ids after the read offset add, and whether it ends on a whole character."""
        prefix = self._decode(self._window[: self._read])
        full = self._decode(self._window)
        if len(full) <= len(prefix):  # e.g. only special tokens so far: wait for text, keep the context
            return "", False
        return full[len(prefix) :], not full.endswith(_REPLACEMENT)

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def _cut_at_stop(self, text: str) -> str | None:
        """If a stop sequence occurs in `text`, stop and return the text before its first occurrence."""
        found = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if not found:
            return None
        self._stopped = True
        self._pending = ""
        return text[: min(found)]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that some stop sequence begins with."""
        longest = 0
        for stop in self._stops:
            # Scan candidate starts left to right: the first that fits is this stop's longest tail.
            start = text.find(stop[:1], max(0, len(text) - len(stop) + 1))
            while start >= 0 and len(text) - start > longest:
                if stop.startswith(text[start:]):
                    longest = len(text) - start
                    break
                start = text.find(stop[:1], start + 1)
        return longest
