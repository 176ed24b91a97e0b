import pytest
import torch

import retnet  # noqa: F401  (registers the Auto classes)
from retnet.model import RetNetConfig, RetNetForCausalLM

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.getcwd())\n",
    "The retention mechanism replaces attention with a decaying recurrence.\n",
] * 20


def make_model(seed: int = 0, **overrides) -> RetNetForCausalLM:
    """A tiny random RetNet, in eval mode, with odd chunking so no length is a chunk multiple."""
    settings = dict(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, chunk_size=8,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return RetNetForCausalLM(RetNetConfig(**settings)).eval()


@pytest.fixture
def model_factory():
    return make_model


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from retnet.tokenization import train_byte_level_bpe

    return train_byte_level_bpe(TEXTS, vocab_size=300, min_frequency=1)
