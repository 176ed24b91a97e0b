"""A byte-level BPE tokenizer trained with HF ``tokenizers``, wrapped for transformers.

Used when a training run is given no tokenizer, and by tests that need a real one without a download.
Byte-level means every string encodes (no unknown token) and decodes back exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Used by the server when a tokenizer has no chat template of its own (documented in the README).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (including the 256 bytes and the special
    tokens ``<|endoftext|>`` (EOS, id 0) and ``<|pad|>`` (id 1)) on ``texts``."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + 2 special tokens); got {vocab_size}")
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


__all__ = ["DEFAULT_CHAT_TEMPLATE", "EOS_TOKEN", "PAD_TOKEN", "train_byte_level_bpe", "wrap_tokenizer"]
