"""The scheduler under mixed concurrent work: what one request (or one model setting) does must not take the batch
down with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.model.modeling_retnet import XPOS_PACKED_MAX_GROWTH, xpos_span

from .conftest import serve_app

pytestmark = pytest.mark.anyio

# xPos with a tiny scale base: one packed frame holds 208 positions (28 288 at the usual 512), so prompts of a few
# hundred tokens reach past it as 30 000-token ones do at 512.
XPOS = dict(use_xpos=True, xpos_scale_base=4.0)
LONG = "Hello world! How are you today? "


def _xpos_model(tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4) -> RetNetForCausalLM:
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                          num_attention_heads=heads, chunk_size=16, tie_word_embeddings=True, initializer_range=0.2,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **XPOS)
    torch.manual_seed(0)
    return RetNetForCausalLM(config).eval()


async def test_xpos_prompts_longer_than_a_packed_frame_prefilled_together(model_dir):
    """Two prompts longer than one xPos frame, prefilled in the same round (one request's, so queued together) with
    --prefill-chunk-tokens past the frame: the packed forward refused them and the engine died (every request 503
    from then on). Each is answered as alone."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = _xpos_model(tokenizer)
    span = xpos_span(model.config, XPOS_PACKED_MAX_GROWTH)
    prompts = [LONG * 40 + str(i) for i in range(2)]
    assert all(len(tokenizer.encode(p)) > 2 * span for p in prompts)
    body = dict(model="micro", max_tokens=4, temperature=0, return_token_ids=True)
    async with serve_app(model_dir, model=model, prefill_chunk_tokens=4096, prefill_token_budget=100_000,
                         prefix_cache_entries=0) as client:
        together = await client.post("/v1/completions", json=dict(body, prompt=prompts))
        assert together.status_code == 200, together.text
        assert (await client.get("/health")).status_code == 200
        alone = [await client.post("/v1/completions", json=dict(body, prompt=p)) for p in prompts]
    assert [c["token_ids"] for c in together.json()["choices"]] == \
        [r.json()["choices"][0]["token_ids"] for r in alone]


async def test_xpos_draft_model_catching_up_on_a_long_prompt(model_dir, tmp_path: Path):
    """A draft model with xPos catches up on a prompt in packed pieces of --prefill-chunk-tokens: a piece past its
    packed frame took the engine down."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    draft = tmp_path / "draft"
    _xpos_model(tokenizer, hidden_size=32, layers=1, heads=2).save_pretrained(draft)
    tokenizer.save_pretrained(draft)
    spec = json.dumps({"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2})
    async with serve_app(model_dir, speculative_config=spec, prefill_chunk_tokens=4096,
                         prefill_token_budget=100_000) as client:
        response = await client.post("/v1/completions", json=dict(model="micro", prompt=LONG * 40, max_tokens=4,
                                                                  temperature=0))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
        assert (await client.get("/health")).status_code == 200
