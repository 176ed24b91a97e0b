"""Paths through the serving engine and its OpenAI API that once went wrong for a client: each test failed before
its fix (see the docstrings)."""

from __future__ import annotations

import json

import pytest
import torch

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.tokenization import vocab_bound

from .conftest import CORPUS, serve_app

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}


def sse_events(text: str) -> list[dict]:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.fixture(scope="module")
def padded_model_dir(tmp_path_factory):
    """A tiny model whose vocabulary has 8 rows past its tokenizer's ids (as nanoGPT pads GPT-2's)."""
    from retnet.tokenization import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(CORPUS, vocab_size=300, min_frequency=1)
    bound = vocab_bound(tokenizer)
    config = RetNetConfig(vocab_size=bound + 8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          chunk_size=16, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("padded-paths")
    RetNetForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, bound


async def test_padding_ids_are_refused_as_out_of_the_vocabulary(padded_model_dir):
    """The ids were checked against the model's padded vocabulary, not the tokenizer's: a prompt holding a padding
    id ran, and with echo + logprobs its -inf logprob made the response a 500 (not JSON); allowed_token_ids naming
    only padding ids left every logit -inf (greedy took id 0, sampling with logprobs was a 500). vLLM refuses a
    prompt id past the tokenizer's."""
    path, bound = padded_model_dir
    async with serve_app(path) as client:
        for body, param in (
            ({"prompt": [5, bound + 1, 7], "max_tokens": 0, "echo": True, "logprobs": 1}, "prompt"),
            ({"prompt": [[5], [bound]], "max_tokens": 2}, "prompt"),
            ({"prompt": [5, 6], "max_tokens": 3, "allowed_token_ids": [bound + 1], "logprobs": 1}, "allowed_token_ids"),
            ({"prompt": [5, 6], "max_tokens": 3, "allowed_token_ids": [bound, 7], **GREEDY}, "allowed_token_ids"),
        ):
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert (error["param"], error["code"]) == (param, "invalid_token_id")
            assert f"size {bound}" in error["message"]
        r = await client.post("/detokenize", json={"tokens": [bound + 2]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_token_id"
        # The tokenizer's own ids still run, scored with finite logprobs.
        r = await client.post("/v1/completions", json={"prompt": [5, bound - 1, 7], "max_tokens": 2, "echo": True,
                                                       "logprobs": 1, "allowed_token_ids": [bound - 1, 9], **GREEDY})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert all(value is None or value > float("-inf") for value in choice["logprobs"]["token_logprobs"])


def model_never_writing(model_dir, token: int) -> RetNetForCausalLM:
    """The micro model with ``token``'s logit -inf in every forward (a model trained to never write a token)."""
    model = RetNetForCausalLM.from_pretrained(model_dir).eval()

    def mask(module, args, logits):
        logits[..., token] = float("-inf")
        return logits

    model.get_output_embeddings().register_forward_hook(mask)
    return model


async def test_a_minus_infinity_logprob_is_sent_as_vllms_floor_not_a_500_or_bad_json(model_dir):
    """A prompt token the model gives probability 0 was scored -inf: the response was a 500 (JSON has no
    -Infinity) and a streamed one sent ``-Infinity``, which no JSON parser reads. vLLM sends -9999.0."""
    never = 7
    async with serve_app(model_dir, model=model_never_writing(model_dir, never)) as client:
        body = {"prompt": [5, never, 6], "max_tokens": 2, "echo": True, "logprobs": 1, "prompt_logprobs": 1, **GREEDY}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["logprobs"]["token_logprobs"][1] == -9999.0
        assert choice["prompt_logprobs"][1][str(never)]["logprob"] == -9999.0
        del body["prompt_logprobs"]
        r = await client.post("/v1/completions", json={**body, "stream": True})
        assert "Infinity" not in r.text and "NaN" not in r.text
        first = sse_events(r.text)[0]["choices"][0]
        assert first["logprobs"]["token_logprobs"][1] == -9999.0
