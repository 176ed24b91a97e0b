"""Conversations -> token ids and a loss mask, for supervised fine-tuning (``data.format = "chat"``).

Each row's ``data.messages_field`` is a list of ``{"role", "content"}`` messages. A conversation is rendered
with the tokenizer's chat template as the server renders a prompt (the tokenizer's own template, else
``retnet.tokenization.DEFAULT_CHAT_TEMPLATE``; ``apply_chat_template(messages, tokenize=False)``, no
generation prompt) and encoded as the server encodes it (``tokenizer.encode(text, add_special_tokens=False)``:
the template's special tokens, ``<|im_start|>`` and the like, are the special tokens, not their text).

The loss mask: assistant message ``i``'s span runs from the end of ``render(messages[:i],
add_generation_prompt=True)`` (what the server prompts with) to the end of ``render(messages[:i + 1])``
(its content and the template's end-of-turn markers); a token that overlaps a span is a target. Every
prefix rendering must be a prefix of the whole conversation's, or the spans are not where the tokens are:
such a template is refused. EOS follows each conversation, a target too when the conversation ends with an
assistant message (the server stops on EOS), and it is where the next conversation's packed segment starts.

Per token one ``uint8`` of flags: :data:`TARGET` (its label counts in the loss) and :data:`BOUNDARY` (the EOS
that ends a conversation: a packed segment starts there). Not every EOS: a template whose end of turn is the
tokenizer's EOS (ChatML tokenizers whose EOS is ``<|im_end|>``) has one in every turn, which must not cut the
conversation into segments that forget the question before the answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from retnet.train.config import ConfigError

TARGET = 1  # the token's label counts in the loss
BOUNDARY = 2  # the EOS that ends a conversation: a packed segment starts at it


def chat_template(tokenizer) -> str | None:
    """The ``chat_template`` argument of ``apply_chat_template``, as the server passes it: None (the
    tokenizer's own, transformers picks it) when the tokenizer has one, else the project's default."""
    from retnet.tokenization import DEFAULT_CHAT_TEMPLATE

    return None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE


def template_identity(tokenizer) -> dict[str, Any]:
    """What decides a conversation's rendering besides its messages: the template and the special tokens'
    texts a template may write (``{{ bos_token }}``). Part of the token cache's key."""
    return {"chat_template": chat_template(tokenizer) or tokenizer.chat_template,
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}


def render_default(messages: list[dict[str, Any]]) -> str:
    """A conversation rendered with ``DEFAULT_CHAT_TEMPLATE``, the template of the BPE a run trains (what the
    BPE is trained on: it is not there yet to render them)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from retnet.tokenization import DEFAULT_CHAT_TEMPLATE

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=DEFAULT_CHAT_TEMPLATE)
    return rendered[0]


def check_conversations(dataset: str, field: str, rows: Iterable[Any],
                        first_row: int = 0) -> list[list[dict[str, Any]]]:
    """The non-empty conversations of ``rows`` (a column's values, in row order), each message as the template
    reads it: ``role`` and ``content`` strings plus any other key the row sets (``datasets`` fills a key that
    only some messages have with None there, which is left out). An empty or missing conversation is dropped,
    as empty documents are; anything else that is not a list of role/content string dicts is refused with its
    row index (``first_row`` is the first row's: a streamed row is checked alone, at its place in the stream)."""
    conversations = []
    for index, row in enumerate(rows, start=first_row):
        if row is None or (isinstance(row, list) and not row):
            continue
        problem = conversation_problem(row)
        if problem:
            raise ConfigError(f"data.messages_field {field!r} of {dataset!r}, row {index}: {problem}; expected a "
                              f"list of {{'role': str, 'content': str}} messages")
        conversations.append(template_messages(row))
    return conversations


def conversation_problem(row: Any) -> str | None:
    """What makes ``row`` no list of ``{"role": str, "content": str}`` messages (``"message 1 has content
    None"``), or None when it is one."""
    if not isinstance(row, list):
        return f"holds {type(row).__name__} {row!r:.80}"
    for number, message in enumerate(row):
        if not isinstance(message, dict):
            return f"message {number} is {type(message).__name__} {message!r:.80}"
        if not isinstance(message.get("role"), str) or not message["role"]:
            return f"message {number} has role {message.get('role')!r:.80}"
        if not isinstance(message.get("content"), str):
            return f"message {number} has content {message.get('content')!r:.80}"
    return None


def template_messages(row: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A checked conversation's messages as the template reads them: without the keys ``datasets`` filled with
    None where only some messages have them."""
    return [{k: v for k, v in m.items() if v is not None} for m in row]


class ChatEncoder:
    """Conversations -> (ids, flags) with ``tokenizer``; ``assistant_only_loss`` False makes every token a target."""

    def __init__(self, tokenizer, assistant_only_loss: bool = True, dataset: str = ""):
        from tokenizers import Tokenizer

        self.tokenizer, self.assistant_only_loss, self.dataset = tokenizer, assistant_only_loss, dataset
        self.template = chat_template(tokenizer)
        # The backend as the server's tokenizer.encode runs it: special tokens' text as the special tokens (the
        # backend's default; document_encoder turns that off for plain text), whole, unpadded.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               continue_final_message: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message,
                                                  chat_template=self.template)

    def spans(self, messages: list[dict[str, Any]], index: int = 0) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, the character spans of its assistant messages). ``index``: the row's,
        for the error of a template that cannot be masked."""
        try:
            text = self.render(messages)
            spans = []
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                prompt = self.render(messages[:i], add_generation_prompt=True)
                turn = self.render(messages[: i + 1])
                if not (text.startswith(prompt) and text.startswith(turn) and len(prompt) <= len(turn)):
                    raise ValueError(f"the rendering of its first {i} messages (with the generation prompt) or of "
                                     f"its first {i + 1} is not where the whole conversation's rendering has them")
                spans.append((len(prompt), len(turn)))
        except Exception as error:  # jinja's own errors, raise_exception in a template, the check above
            raise ConfigError(
                f"data.format 'chat': the tokenizer's chat template cannot be masked on row {index} of "
                f"{self.dataset!r}: {type(error).__name__}: {error}. Each assistant message must render in the "
                f"same place in every prefix of its conversation (a template that rewrites earlier turns cannot "
                f"be masked); data.assistant_only_loss=false trains on every token instead") from None
        return text, spans

    def encode(self, conversations: list[list[dict[str, Any]]], batch: int = 256,
               rows: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, flags) of every conversation followed by EOS, concatenated; ids uint16 when every id fits,
        flags uint8 (:data:`TARGET`, :data:`BOUNDARY`). ``rows``: each conversation's row in the dataset, which an
        error names (default: its index in ``conversations``)."""
        from retnet.train.data import vocab_bound

        dtype = np.uint16 if vocab_bound(self.tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
        eos = self.tokenizer.eos_token_id
        rows = range(len(conversations)) if rows is None else rows
        ids, flags = [], []
        for start in range(0, len(conversations), batch):
            chunk = conversations[start:start + batch]
            if self.assistant_only_loss:
                rendered = [self.spans(c, rows[start + i]) for i, c in enumerate(chunk)]
            else:
                rendered = [(self._render_checked(c, rows[start + i]), None) for i, c in enumerate(chunk)]
            encodings = self.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
            for messages, (_, spans), encoding in zip(chunk, rendered, encodings):
                if spans is None:
                    mask = np.full(len(encoding.ids), TARGET, dtype=np.uint8)
                else:
                    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
                    inside = np.zeros(len(offsets), dtype=bool)
                    for lo, hi in spans:
                        inside |= (offsets[:, 1] > lo) & (offsets[:, 0] < hi)
                    mask = inside.astype(np.uint8) * TARGET
                ends_answered = not self.assistant_only_loss or messages[-1]["role"] == "assistant"
                ids.append(np.asarray([*encoding.ids, eos], dtype=dtype))
                flags.append(np.append(mask, np.uint8(BOUNDARY | (TARGET if ends_answered else 0))))
        if not ids:
            return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.uint8)
        return np.concatenate(ids), np.concatenate(flags)

    def _render_checked(self, messages: list[dict[str, Any]], index: int) -> str:
        try:
            return self.render(messages)
        except Exception as error:
            raise ConfigError(f"data.format 'chat': the tokenizer's chat template refused row {index} of "
                              f"{self.dataset!r}: {type(error).__name__}: {error}") from None


def without_spilled_targets(blocks: np.ndarray, continued: bool = False) -> np.ndarray:
    """``[N, T]`` blocks' flags (the flat stream cut every T tokens) without the targets of a conversation's
    part that spills into a block from the one before: the block's state starts fresh there, so those tokens
    would be learnt without the question before them. Cleared up to and including the block's first closing EOS
    (that conversation's own, predicted from it), unless the block before ended with a closing EOS (the
    block starts a conversation). So a conversation is trained on what fits in its first block, as a
    ``max_length`` truncation trains it, and one longer than a block is trained on its first ``T`` tokens.

    ``continued``: the first block follows one not given here that did not end with a closing EOS (a stream
    packs its blocks one at a time, and must clear them as the token cache's whole array is cleared)."""
    out = np.array(blocks, dtype=np.uint8, copy=True)
    if out.size == 0:
        return out
    boundary = (out & BOUNDARY) != 0
    continues = np.zeros(len(out), dtype=bool)
    continues[0] = continued
    continues[1:] = ~boundary[:-1, -1]
    first_end = np.where(boundary.any(axis=1), boundary.argmax(axis=1), out.shape[1])
    spilled = continues[:, None] & (np.arange(out.shape[1])[None, :] <= first_end[:, None])
    out[spilled] &= np.uint8(~TARGET & 0xFF)
    return out


def target_count(flags: np.ndarray) -> int:
    """Labels that count in ``[B, T]`` blocks' flags: the targets after each block's first token (the first
    has no token before it in the block to be predicted from)."""
    return int(np.count_nonzero(np.asarray(flags)[:, 1:] & TARGET))


__all__ = ["BOUNDARY", "TARGET", "ChatEncoder", "chat_template", "check_conversations", "conversation_problem",
           "render_default", "target_count", "template_identity", "template_messages", "without_spilled_targets"]
