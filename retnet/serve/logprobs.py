"""The logprob fields of a response, from the engine's :class:`~retnet.serve.sequence.TokenLogprob` entries:
a completion's (OpenAI's ``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset``, the offsets counted
by :class:`TextOffsets`), a chat's content entries, and vLLM's ``prompt_logprobs``."""

from __future__ import annotations

import codecs

from retnet.serve.protocol import (
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)


class TextOffsets:
    """Each token's ``text_offset``: where it starts in the returned text, counted from ``start``.

    A token's characters are those its bytes decode to in sequence (a character split across tokens is
    counted once, in the token holding its first byte; a byte that is no part of a valid character is the
    U+FFFD the text shows for it). Special tokens (``special_ids``: those the engine's decoding skips) are not
    in a completion's text, and in an echoed prompt only where the client's text holds them: a BOS the
    tokenizer adds is not in it, and counting its characters would shift every later offset.
    """

    def __init__(self, start: int, special_ids: set[int], echoed: str | None = None, held: bytes = b""):
        """``held``: the bytes of the prompt's last tokens that its text leaves to the completion's (a character
        they leave unfinished, see :class:`~retnet.serve.serving.CompletionPrompt`): they start the completion's
        text."""
        self.special_ids = special_ids
        self.echoed = echoed  # the echoed prompt (starting at 0), or None for a completion's text
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.position = start + len(self.decoder.decode(held))  # characters of the text decoded so far

    def push(self, token_id: int, label: str, raw: bytes) -> int:
        """The offset of this token (``label``: its text, ``raw``: its bytes), then count its characters."""
        pending = bool(self.decoder.getstate()[0])
        # A character begun by earlier tokens is already counted: one U+FFFD if it never completes.
        offset = self.position + pending
        if token_id in self.special_ids:
            if self.echoed is None or not self.echoed.startswith(label, offset):
                return offset
            if pending:
                # A special token an echoed token-id prompt shows ends the character before it: the decoding
                # writes that one as U+FFFD and the bytes after the token as characters of their own (a
                # continuation byte there is another U+FFFD, not the end of the character).
                self.position += len(self.decoder.decode(b"", final=True))
                self.decoder.reset()
        self.position += len(self.decoder.decode(raw))
        return offset


def token_label(entry, as_ids: bool = False) -> str:
    """How a logprobs entry names its token: its text, or with vLLM's ``return_tokens_as_token_ids``
    ``"token_id:<id>"``."""
    return f"token_id:{entry.token_id}" if as_ids else entry.token


def add_completion_logprobs(target: CompletionLogprobs, entries, offsets: TextOffsets, k: int | None = None,
                            as_ids: bool = False) -> None:
    """``k``: keep that many alternatives of each entry (the prompt's may hold more, for prompt_logprobs);
    ``as_ids``: tokens named by id (:func:`token_label`), their offsets still counted in the text."""
    for entry in entries:
        label = token_label(entry, as_ids)
        target.tokens.append(label)
        target.token_logprobs.append(entry.logprob)
        top = None
        if entry.logprob is not None:
            # OpenAI's completions (and vLLM's) always hold the chosen token too: up to logprobs + 1 entries.
            top = {token_label(t, as_ids): t.logprob for t in entry.top[:k]}
            top.setdefault(label, entry.logprob)
        target.top_logprobs.append(top)
        target.text_offset.append(offsets.push(entry.token_id, entry.token, entry.token_bytes))


def vllm_prompt_logprobs(entries, k: int | None) -> PromptLogprobs | None:
    """vLLM's ``prompt_logprobs`` of the engine's prompt scores (``entries``, one a prompt token): each token's
    own logprob and rank, then its top ``k`` ranked 1..k; None where the request asked for none (``k`` None)."""
    if k is None or entries is None:
        return None
    out: PromptLogprobs = []
    for entry in entries:
        if entry.logprob is None:  # the first token: nothing before it to score it after
            out.append(None)
            continue
        ranked = {entry.token_id: PromptLogprob(logprob=entry.logprob, rank=entry.rank, decoded_token=entry.token)}
        for rank, alt in enumerate(entry.top[:k], 1):
            ranked.setdefault(alt.token_id, PromptLogprob(logprob=alt.logprob, rank=rank, decoded_token=alt.token))
        out.append(ranked)
    return out


def chat_logprob(entry, as_ids: bool = False) -> ChatTokenLogprob:
    """``as_ids``: the tokens named by id (:func:`token_label`); ``bytes`` stay the tokens' own, as vLLM's."""
    return ChatTokenLogprob(
        token=token_label(entry, as_ids), logprob=entry.logprob, bytes=list(entry.token_bytes),
        top_logprobs=[TopLogprob(token=token_label(t, as_ids), logprob=t.logprob, bytes=list(t.token_bytes))
                      for t in entry.top],
    )
