"""Streaming text out of token ids: incremental detokenisation and stop strings across token boundaries.

Text is released only when it is final: bytes of an unfinished UTF-8 character wait for the next token,
and so does any tail that could be the start of a stop string. A stop string is not emitted unless asked
(``include``: vLLM's ``include_stop_str_in_output``).
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    """Decode one token at a time (vLLM's prefix/read offsets): the new text is the decoding of a short
    window of recent tokens minus the decoding of the same window without the newest ones, so tokenisers
    whose pieces depend on their neighbours (leading spaces, byte fallback) still decode exactly."""

    def __init__(self, decode, context_ids: list[int] | None = None, window: int = 6, unfinished: int = 0):
        """``unfinished``: how many of the context's last tokens hold a character it leaves unfinished (a prompt
        sent as token ids may end inside one; see :func:`unfinished_character`). Their text is not read yet, so
        the tokens after them finish the character; read, they would decode as U+FFFD in the prefix and the
        character's first bytes would be lost from the text of the token that completes it."""
        self.decode = decode  # ids -> str
        self.ids: list[int] = list(context_ids[-max(window, unfinished + 1) :]) if context_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids) - min(unfinished, len(self.ids))

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an unfinished character decodes as U+FFFD)."""
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


def unfinished_character(raw: bytes) -> bytes:
    """The bytes ``raw`` ends with that begin a UTF-8 character and lack some of its continuation bytes (at
    most 3); empty when ``raw`` ends on a character boundary or with bytes that no continuation can make valid
    (those are U+FFFD for good)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    # The decoder keeps back only a valid beginning of a character, and one has at most 3 bytes before its last.
    decoder.decode(raw[-3:])
    return decoder.getstate()[0]


class StopStrings:
    """Accumulates generated text and releases the part that can no longer turn into a stop string."""

    def __init__(self, stops: list[str], include: bool = False):
        self.stops = [s for s in stops if s]
        self.include = include
        self.text = ""
        self.emitted = 0
        self.unsearched = 0  # the end of the text no stop may end in (the first min_tokens tokens')
        self.stopped = False
        self.cut = ""  # once stopped: the text dropped after the kept part (the stop string, unless included, on)

    def push(self, delta: str, search: bool = True) -> str:
        """Add ``delta``; return the text now safe to emit. Sets ``stopped`` when a stop string appeared
        (the text from it on is dropped). ``search=False``: ``delta`` is the text of the first ``min_tokens``
        tokens, where no stop may end; one that starts there and ends in later text is found (as vLLM finds
        it), so its start is held back here too."""
        self.text += delta
        if not self.stops:
            return self._release(len(self.text))
        if not search:
            self.unsearched = len(self.text)
            return self._release(len(self.text) - self._held())
        hits = [(p + len(s), p) for s in self.stops
                if (p := self.text.find(s, max(self.emitted, self.unsearched - len(s) + 1))) >= 0]
        if hits:
            # The stop that completes first (then the longest) is the one generation meets first; the
            # earliest start would make the cut depend on how the tokens split the text.
            self.stopped = True
            end, start = min(hits)
            self.cut = self.text[end if self.include else start :]
            self.text = self.text[: end if self.include else start]
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        tail = self.text[self.emitted :]
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(tail)), best, -1):
                if tail.endswith(stop[:k]):
                    best = k
                    break
        return best

    def _release(self, end: int) -> str:
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out


__all__ = ["IncrementalDetokenizer", "StopStrings", "unfinished_character"]
