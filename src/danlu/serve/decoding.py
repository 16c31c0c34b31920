"""Incremental decoding: generated token ids to text that may be streamed, and stop strings.

New ids are decoded after a few prompt tokens (so word-start markers such as Metaspace's
decode as in the full text); a trailing incomplete UTF-8 character (byte-level BPE) or a
possible start of a stop string is held back until the next token settles it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

CONTEXT_TOKENS = 8  # prompt tokens decoded before the new ones (then cut off again)


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in text (None: nowhere)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def partial_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of text that begins a stop string (it may become one)."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class Continuation:
    """One row's generated text, decoded incrementally: what may be streamed, where to stop.

    c = Continuation(encoder.decode, prompt_ids, stop=["\\n\\n"])
    piece = c.push(token)   # '' while held back; c.done once a stop string appeared
    piece = c.finish()      # the end of generation: whatever was held back
    c.text                  # the continuation, cut before the stop string
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids, stop=()) -> None:
        self.decode, self.stop = decode, list(stop)
        self.context = list(prompt_ids)[-CONTEXT_TOKENS:]
        self.prefix = decode(self.context) if self.context else ""
        self.ids: list[int] = []
        self.text, self.sent, self.done = "", 0, False

    def push(self, *tokens: int) -> str:
        """Add generated tokens; returns the text that may be streamed now."""
        if self.done:
            return ""
        self.ids.extend(tokens)
        full = self.decode(self.context + self.ids)
        text = full[len(self.prefix) :] if full.startswith(self.prefix) else self.decode(self.ids)
        cut = first_stop(text, self.stop)
        if cut is not None:
            self.text, self.done = text[:cut], True
            return self._emit(cut)
        self.text = text
        safe = len(text) - partial_stop(text, self.stop)
        while safe > self.sent and text[safe - 1] == "\ufffd":  # an unfinished character
            safe -= 1
        return self._emit(safe)

    def finish(self) -> str:
        self.done = True
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece
