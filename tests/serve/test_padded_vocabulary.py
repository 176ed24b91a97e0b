"""A model whose vocabulary is padded past its tokenizer's ids (``retnet-train --model.vocab_size``, as nanoGPT pads
GPT-2's 50257 to 50304): the server never samples, scores or lists a padding id, as vLLM trims those logits."""

from __future__ import annotations

import pytest
import torch

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.tokenization import vocab_bound

from .conftest import CORPUS, serve_app

PADDING = 8
pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def padded_model_dir(tmp_path_factory):
    """A micro model of ``len(tokenizer) + 8`` rows whose padding rows' logits would win every step unmasked."""
    from retnet.tokenization import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(CORPUS, vocab_size=300, min_frequency=1)
    bound = vocab_bound(tokenizer)
    config = RetNetConfig(vocab_size=bound + PADDING, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          chunk_size=16, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = RetNetForCausalLM(config).eval()
    with torch.no_grad():  # the padding rows: the hidden state's own direction, far larger than any real row
        model.lm_head.weight[bound:] = 50 * torch.randn(PADDING, 32).sign()
    path = tmp_path_factory.mktemp("padded")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, bound


async def test_padding_ids_are_never_sampled_scored_or_listed(padded_model_dir):
    path, bound = padded_model_dir
    async with serve_app(path) as client:
        body = dict(model="micro", prompt="def add(a, b):", max_tokens=12, logprobs=5, echo=True,
                    temperature=1.0, seed=3, ignore_eos=True, return_token_ids=True)
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert len(choice["token_ids"]) == 12 and all(t < bound for t in choice["token_ids"])
        logprobs = choice["logprobs"]
        # 5 alternatives a token, every one a real token's, with finite logprobs summing to at most 1
        for top in logprobs["top_logprobs"][1:]:
            assert len(top) >= 5 and all(value > float("-inf") for value in top.values())
        greedy = await client.post("/v1/completions", json=dict(body, temperature=0.0))
        assert all(t < bound for t in greedy.json()["choices"][0]["token_ids"])
