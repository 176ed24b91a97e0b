"""A byte-level BPE tokenizer trained with HF ``tokenizers``, wrapped for transformers.

Used when a training run is given no tokenizer, and by tests that need a real one without a download.
Byte-level means every string encodes (no unknown token) and decodes back exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# The smallest vocabulary train_byte_level_bpe makes: the 256 byte tokens and the two special tokens.
MIN_VOCAB_SIZE = 256 + 2
# Used by the server when a tokenizer has no chat template of its own (documented in the README). An assistant's
# tool calls are written in the Hermes format (each a <tool_call> block after its text), which
# `--tool-call-parser hermes` reads back: without them a turn that only calls a tool trained as an empty answer.
# The tools' schemas are not listed (a prompt with tools stays the one it was, for models trained on it).
# Each message ends with the tokenizer's EOS (as Zephyr's do), so that every assistant turn, not only a
# conversation's last, is trained to end on the token the server stops on; nothing follows the EOS (Zephyr writes a
# newline): a session's next turn continues after the EOS the model generated, and renders exactly as the same
# conversation sent whole, and a conversation's rendering ends on the EOS that closes it (chat training's boundary).
# Tokenizers and exports that carry a template of their own (the BPE a run trains writes this one into its
# tokenizer_config, an export made before keeps the template it was trained on) are not affected by a change here.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] if message['content'] is not none else '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set function = call['function'] if call['function'] is defined else call %}"
    "<tool_call>\n{{ {'name': function['name'], 'arguments': function['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def vocab_bound(tokenizer) -> int:
    """One more than the largest id ``tokenizer`` can produce: the embedding rows the model needs. Usually
    ``len(tokenizer)``, but a tokenizer whose ids have gaps (tokens removed from a vocabulary, added tokens
    at fixed ids) has ids at or beyond its length, which would index past an embedding of ``len`` rows."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (including the 256 bytes and the special
    tokens ``<|endoftext|>`` (EOS, id 0) and ``<|pad|>`` (id 1)) on ``texts``."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + 2 special tokens); got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a ``tokenizers`` one, with EOS/pad set and the default chat template."""
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    wrapped.chat_template = DEFAULT_CHAT_TEMPLATE
    return wrapped


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-printable-character map, inverted: what a byte-level token's characters stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    return {decoder.get("type", ""), *(t for d in decoder.get("decoders") or [] for t in _decoder_types(d))}


class TokenBytes:
    """The raw bytes one token stands for inside a text, which decoding it alone cannot give: a token holding
    part of a multi-byte character decodes to U+FFFD, and a SentencePiece token (``▁world``) loses its
    leading space, which the decoder strips from the first token of a text (Metaspace, Llama 2's ``Strip``).
    Logprobs report these bytes, as OpenAI's API does.

    Byte-level BPE tokens map back through GPT-2's byte alphabet; SentencePiece byte-fallback tokens
    (``<0xE2>``) are their byte; any other token is what it adds to a text after a fixed non-special token
    (its decoding there, less that token's), so the decoder's own rules decide, whatever they are.
    :meth:`start` gives a token's bytes at the start of a text instead (all there is before it is skipped).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend
        decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
        types = _decoder_types(decoder)
        self.byte_level = "ByteLevel" in types
        self.byte_fallback = "ByteFallback" in types
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        # Added tokens are kept as their text, not in the byte alphabet, whose stand-ins for bytes 0xA1-0xFF are
        # real characters ("ï" in "naïve"): read through it (or decoded, as a ByteLevel decoder maps them too) such
        # a token gives lone bytes, not its text
        added = backend.get_added_tokens_decoder() if backend is not None else {}
        self.added = {token_id: token.content.encode("utf-8") for token_id, token in added.items()}
        self._cache: dict[int, bytes] = {}
        self._start_cache: dict[int, bytes] = {}
        self._anchor: tuple[int, str] | bool | None = False  # False: not looked for yet

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._bytes(token_id)
        return cached

    def start(self, token_id: int) -> bytes:
        """The token's bytes as the first of a text, where a SentencePiece decoder drops the space it opens
        with (``▁Hello`` is ``Hello``); the same as :meth:`__call__` for most tokens."""
        cached = self._start_cache.get(token_id)
        if cached is None:
            cached = self(token_id)
            if token_id not in self.special_ids and _whole_characters(cached):
                decoded = self._decode([token_id])
                if not self.byte_level or token_id not in self.added or "\ufffd" not in decoded:
                    cached = decoded.encode("utf-8")
            self._start_cache[token_id] = cached
        return cached

    def _bytes(self, token_id: int) -> bytes:
        piece = self.backend.id_to_token(token_id) if self.backend is not None else None
        if token_id in self.special_ids or piece is None:
            return self._decode([token_id]).encode("utf-8")
        if self.byte_level:
            alphabet = _byte_level_alphabet()
            if all(c in alphabet for c in piece):
                raw = bytes(alphabet[c] for c in piece)
                # an added token spelled in the alphabet ("Ġword") still reads through it; one whose reading is no
                # UTF-8 was its own text
                if token_id not in self.added or _whole_characters(raw):
                    return raw
        if self.byte_level and token_id in self.added:  # (other tokenizers' added tokens read as they did)
            return self.added[token_id]
        if self.byte_fallback and (match := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(match.group(1), 16)])
        anchor = self._find_anchor() if self.backend is not None else None
        if anchor is not None:
            anchor_id, anchor_text = anchor
            both = self._decode([anchor_id, token_id])
            if both.startswith(anchor_text):
                return both[len(anchor_text) :].encode("utf-8")
        return self._decode([token_id]).encode("utf-8")

    def _find_anchor(self) -> tuple[int, str] | None:
        """A non-special token that decodes to whole characters on its own and again when followed by itself:
        what a token adds after it is what the token adds inside a text."""
        if self._anchor is False:
            self._anchor = None
            candidates = [self.backend.token_to_id(prefix + c) for c in "axe0" for prefix in ("", "▁", "Ġ")]
            candidates += range(min(self.backend.get_vocab_size(), 1024))
            for candidate in candidates:
                if candidate is None or candidate in self.special_ids:
                    continue
                text = self._decode([candidate])
                if text and "\ufffd" not in text and self._decode([candidate, candidate]).startswith(text):
                    self._anchor = (candidate, text)
                    break
        return self._anchor

    def _decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids)

    def label(self, token_id: int, start: bool = False) -> str:
        """The token as text, or ``bytes:\\xe2\\x80`` when its bytes are not whole characters (so that two
        such tokens keep apart as keys of ``top_logprobs``, where both would decode to U+FFFD). ``start``: as
        the first token of a text (see :meth:`start`)."""
        raw = self.start(token_id) if start else self(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _whole_characters(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def characters_started(raw: bytes) -> int:
    """How many characters start in ``raw``: its length in characters when it decodes, counting a character
    split across tokens once, in the token holding its first byte (for ``text_offset``)."""
    return sum(1 for b in raw if b & 0xC0 != 0x80)


def render_pair(prompt: list[dict], completions, render) -> tuple[str, ...]:
    """(prompt text, each completion's text) of a conversational pair, ``render`` being a chat template's
    ``render(messages, **options)`` to text. A prompt that ends with an assistant message is left open
    (``continue_final_message``, no generation prompt, as TRL renders it) and a completion that starts with an
    assistant message continues it: rendered as the conversation with that message's content appended to the
    prefill's, not as a second assistant turn (which would make the completion an end of turn and a new assistant
    header before the answer). The reward trainer renders its conversational pairs with it, and the server a
    reward model's ``messages``, so that both score the same tokens. An empty prompt or completion is a
    ValueError naming it (there is no turn to render or to continue)."""
    if not prompt:
        raise ValueError("the prompt has no messages: a conversational pair needs at least one prompt turn")
    completions = list(completions)
    for index, messages in enumerate(completions):
        if not messages:
            raise ValueError(f"completion {index} has no messages: a conversational completion needs at least one "
                             "turn")
    prefill = prompt[-1]["role"] == "assistant"
    head = render(prompt, continue_final_message=True) if prefill else render(prompt, add_generation_prompt=True)
    texts = []
    for messages in completions:
        if prefill and messages[0]["role"] == "assistant":
            # A completion that only calls tools has content None (the OpenAI form): it continues the prefill
            # with its calls, which the message it is merged into must keep
            first = messages[0]
            # (a None key, as datasets gives every message each key, must not drop the prefill's value)
            opened = {**prompt[-1], **{k: v for k, v in first.items() if k != "content" and v is not None},
                      "content": _continued(prompt[-1].get("content"), "the prompt's final assistant message")
                      + _continued(first.get("content"), f"completion {len(texts)}'s first message")}
            whole = render([*prompt[:-1], opened, *messages[1:]])
        else:
            whole = render([*prompt, *messages])
        if not whole.startswith(head):
            raise ValueError(f"the prompt rendered {'open' if prefill else 'with the generation prompt'} is not "
                             "where the rendering of the prompt and the completion has it")
        texts.append(whole[len(head):])
    return head, *texts


def closed_by_eos(ids: list[int], eos: int | None) -> list[int]:
    """``ids`` followed by ``eos``, unless they already end with it (a chat template that ends each message with
    the EOS, the default's: a completion's rendering carries its closing EOS, which must not be doubled) or there
    is no EOS. What the reward trainer, DPO and the server's reward scoring close a completion with."""
    ids = list(ids)
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return [*ids, eos]


def _continued(content, what: str) -> str:
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(f"{what} has content of type {type(content).__name__}; a prefilled assistant turn is "
                         "continued as text, so its content and the completion's must be strings")
    return content


__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "EOS_TOKEN", "PAD_TOKEN", "TokenBytes", "characters_started", "closed_by_eos",
    "render_pair",
    "train_byte_level_bpe", "wrap_tokenizer",
]
