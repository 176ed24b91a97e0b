"""Tool-call parsers: a model's own tool-call format read out of its free text, for ``tool_choice`` "auto"
(vLLM's ``--tool-call-parser``). The server's ``tool_call_parser`` setting names one of :data:`TOOL_CALL_PARSERS`.

A parser reads one choice's text as it is generated: :meth:`HermesToolParser.feed` returns the content that is
decided to be text and the calls that have just been closed; :meth:`HermesToolParser.finish` the rest at the
end. However the text is split into pieces, the content given out adds up to the same text and the calls are the
same: what a stream sends equals what the whole response holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from retnet.serve.protocol import FunctionCall, ToolCall


class HermesToolParser:
    """The Hermes format (NousResearch Hermes 2/3, Qwen 2.5/3 ...): each call is
    ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number of them, after any text.

    - The text outside the calls is the content. Whitespace right after a call (the newlines between calls) is
      dropped, and content that is only whitespace is none when calls were made (``content: null``).
    - A call is a ``<tool_call>...</tool_call>`` whose body is a JSON object with a string ``name`` naming one of
      ``tools`` and an ``arguments`` object (``parameters`` is read the same, as vLLM's parser reads it). Any
      other (no JSON, an unknown name, arguments no object) is no call: its text, tags and all, stays in the
      content, as vLLM leaves a call it cannot parse.
    - ``parallel`` false (``parallel_tool_calls: false``): the calls after the first are dropped.
    - A closing tag inside one of the body's JSON strings (``{"text": "</tool_call>"}``) does not close the call,
      unless the body up to the next closing tag is no call either.
    - A call still open at the end (``max_tokens``, a stop string) is no call: its raw text is content.

    While the text may be a call (from an opening tag, or its first characters, up to the closing tag) it is
    held back, never given out as content: a stream sends no call's text as content, and a text that turns out
    to be no call (``<tool_`` then ``s>``, or a call that does not parse) is given out when that is decided.
    """

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    OPEN_CLOSE = (OPEN, CLOSE)
    MAX_PASSED_PARSES = 64

    def __init__(self, tools: Iterable[str], parallel: bool = True):
        self.tools = frozenset(tools)
        self.parallel = parallel
        self.calls: list[ToolCall] = []  # every call made so far
        self.buffer = ""  # text not decided yet: the start of an opening tag, or an open call
        self.in_call = False  # buffer holds an opening tag and what followed it
        # Where the open call's closing tags stand that fell inside its JSON strings (so did not close it).
        self.passed: list[int] = []
        self.fast = 0  # how many of them the fast path passed (no parse)
        self.after_call = False  # whitespace here follows a call (dropped)
        # Whitespace before any other content: content or none depends on whether calls follow.
        self.pending = ""
        self.started = False  # content other than whitespace has been given out

    def tags(self) -> tuple[str, ...]:
        """The markup a call is written in: where a tokenizer makes them special tokens, decoding must keep them."""
        return self.OPEN_CLOSE

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """The next piece of the text: (the content decided by it, the calls it closes)."""
        self.buffer += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self.in_call:
                end = self.buffer.find(self.CLOSE, self.passed[-1] + 1 if self.passed else 0)
                if end < 0:
                    break
                # Still inside the string the last passed tag stood in: no need to parse the body again
                if self.passed and _string_goes_on(self.buffer[self.passed[-1] : end]):
                    self.passed.append(end)
                    self.fast += 1
                    continue
                body = self.buffer[len(self.OPEN) : end]
                call = self._call(body)
                # A closing tag written in one of the call's strings; each such check parses the body again, so a
                # call holds at most MAX_PASSED_PARSES of them in strings of their own (no quadratic work).
                if call is None and len(self.passed) < self.MAX_PASSED_PARSES + self.fast and _ends_in_string(body):
                    self.passed.append(end)
                    continue
                if call is None and self.passed:  # no call either way: the first tag closed it
                    end = self.passed[0]
                self.passed, self.fast = [], 0
                end += len(self.CLOSE)
                raw, self.buffer, self.in_call = self.buffer[:end], self.buffer[end:], False
                if call is None:
                    content.append(self._content(raw))
                    continue
                self.after_call = True
                if self.parallel or not self.calls:
                    self.calls.append(call)
                    calls.append(call)
                continue
            start = self.buffer.find(self.OPEN)
            if start >= 0:
                content.append(self._content(self.buffer[:start]))
                self.buffer, self.in_call = self.buffer[start:], True
                continue
            # Hold back an ending that an opening tag may start with ("<", "<tool_" ...).
            keep = next((k for k in range(min(len(self.OPEN) - 1, len(self.buffer)), 0, -1)
                         if self.OPEN.startswith(self.buffer[-k:])), 0)
            cut = len(self.buffer) - keep
            content.append(self._content(self.buffer[:cut]))
            self.buffer = self.buffer[cut:]
            break
        return "".join(content), calls

    def finish(self) -> str:
        """The content still held at the end of the text: the start of a tag, a call left open, whitespace."""
        rest, self.buffer, self.in_call, self.passed, self.fast = self.buffer, "", False, [], 0
        content = self._content(rest)
        if not self.calls:  # no calls: the text is all content, whitespace included
            content += self.pending
        self.pending = ""
        return content

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole text's (content, calls); content None when calls were made and nothing else but whitespace."""
        content, _ = self.feed(text)
        content += self.finish()
        return (content or None) if self.calls else content, self.calls

    def _content(self, text: str) -> str:
        if self.after_call:
            stripped = text.lstrip()
            if stripped:
                self.after_call = False
            text = stripped
        if self.started:
            return text
        self.pending += text
        if self.pending.isspace() or not self.pending:
            return ""
        text, self.pending, self.started = self.pending, "", True
        return text

    def _call(self, body: str) -> ToolCall | None:
        try:
            value = loads_exact(body)
            # type, not isinstance: a number's text is a str too (loads_exact), and a name is a JSON string.
            if not isinstance(value, dict) or type(value.get("name")) is not str or value["name"] not in self.tools:
                return None
            arguments = value["arguments"] if "arguments" in value else value.get("parameters")
            if not isinstance(arguments, dict):
                return None
            # As vLLM's arguments: the object's JSON as json.dumps writes it.
            return ToolCall(function=FunctionCall(name=value["name"], arguments=dumps_exact(arguments)))
        except (ValueError, RecursionError):  # no JSON (NaN is none), or nested past Python's stack: text
            return None


def _ends_in_string(body: str) -> bool:
    """Whether ``body`` is JSON cut off inside a string: with that string closed, it fails only at its end (json's
    own message for an unterminated string is another after a ``\\uXXXX`` escape)."""
    closed = body + '"'
    try:
        loads_exact(closed)
    except json.JSONDecodeError as error:
        return error.pos == len(closed)
    except (ValueError, RecursionError):
        return False
    return True


def _string_goes_on(text: str) -> bool:
    """Whether ``text``, read inside a JSON string (not inside an escape), leaves that string open: it is a
    string's valid content (no unescaped quote, no control character, whole escapes)."""
    try:
        json.loads('"' + text + '"')
    except ValueError:
        return False
    return True


class _Number(str):
    """A JSON number's text as it was written."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is no JSON")


def loads_exact(text: str) -> Any:
    """JSON text with its numbers kept as written: as floats, ``1e999`` would be written back as ``Infinity``,
    which is no JSON, and ``1.50`` as ``1.5``; as ints, one of over 4300 digits fails to parse. ``NaN`` and
    ``Infinity``, which json.loads takes, are a ValueError: arguments holding them would be no JSON."""
    return json.loads(text, parse_float=_Number, parse_int=_Number, parse_constant=_no_constant)


def dumps_exact(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False)`` of :func:`loads_exact`'s values, each number as it was written
    and each lone surrogate as its ``\\uXXXX`` escape. Recursive, two frames a level: nested past ~330 levels it
    raises RecursionError, which its callers take as no call."""
    if isinstance(value, _Number):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_dumps_scalar(key)}: {dumps_exact(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps_exact(item) for item in value) + "]"
    return _dumps_scalar(value)


# After json.loads a surrogate pair's two escapes are one character: a surrogate left in a string came from a lone
# escape the model wrote (JSON's syntax, and the grammar's, admit "\ud800").
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _dumps_scalar(value: Any) -> str:
    # Written back as the escape it was: as a character it is no UTF-8, and the answer holding these arguments
    # failed to encode (a 500, or a stream cut off, on chat, the Responses API and the Messages API alike).
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", json.dumps(value, ensure_ascii=False))


TOOL_CALL_PARSERS = {"hermes": HermesToolParser}

__all__ = ["TOOL_CALL_PARSERS", "HermesToolParser", "dumps_exact", "loads_exact"]
