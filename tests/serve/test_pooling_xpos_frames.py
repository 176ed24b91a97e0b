"""The pooling engine with an xPos model: an input longer than one packed xPos frame (the model refuses it packed)
runs alone and unpacked, scored or embedded as the model runs it alone, and the inputs it was sent with (or beside)
run packed as before; on the old engine it failed with every input of its forward, each request a 500."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from retnet.model import RetNetConfig, RetNetForSequenceClassification
from retnet.model.modeling_retnet import XPOS_PACKED_MAX_GROWTH, xpos_span
from tests.serve.conftest import serve_app
from tests.serve.test_classify import ok

pytestmark = pytest.mark.anyio

MAX_TOKENS = 128  # --max-prompt-tokens: above the packed frame of the model below


@pytest.fixture(scope="module")
def xpos_dir(model_dir, tmp_path_factory):
    """A micro random xPos reward model (one label) whose packed frame is a few chunks long (xpos_scale_base 2),
    its pad id the EOS (a final EOS must still be the token scored), saved with the micro LM's tokenizer."""
    path = tmp_path_factory.mktemp("xpos-reward")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          chunk_size=16, use_xpos=True, xpos_scale_base=2.0, pad_token_id=tokenizer.eos_token_id,
                          eos_token_id=tokenizer.eos_token_id, initializer_range=0.2, num_labels=1)
    torch.manual_seed(2)
    RetNetForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(xpos_dir):
    """The model in fp32, and each input run alone through it: ``(score, last hidden state, mean hidden state)``."""
    model = AutoModelForSequenceClassification.from_pretrained(xpos_dir, dtype=torch.float32).eval()

    def run(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids_t = torch.tensor([ids])
        with torch.inference_mode():
            out = model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), output_hidden_states=True)
        hidden = out.hidden_states[-1][0].float()
        return out.logits[0].float(), hidden[-1], hidden.mean(0)

    return model, run


def inputs(model) -> tuple[list[list[int]], list[list[int]]]:
    """(one request's inputs: short, over a packed frame (ending with the EOS, the pad id), short; another
    request's short input)."""
    frame = xpos_span(model.config, XPOS_PACKED_MAX_GROWTH)
    assert frame < MAX_TOKENS - 8
    eos = model.config.eos_token_id
    long = [5 + (i * 7) % 200 for i in range(frame + 8)] + [eos]
    return [[11, 12, 13], long, list(range(20, 40))], [[40, 41, 42, 43]]


def error(got: list[float], expected: torch.Tensor) -> float:
    return (torch.tensor(got) - expected).abs().max().item()


async def test_an_input_over_a_packed_xpos_frame_is_scored_alone_and_the_others_packed(xpos_dir, reference):
    model, run = reference
    first, second = inputs(model)
    async with serve_app(xpos_dir, max_prompt_tokens=MAX_TOKENS) as http:
        answers = await asyncio.gather(http.post("/pooling", json={"input": first}),
                                       http.post("/pooling", json={"input": second}))
    rows = [item["data"] for answer in answers for item in ok(answer)["data"]]
    for ids, row in zip([*first, *second], rows, strict=True):
        assert error(row, run(ids)[0]) < 1e-5, len(ids)


@pytest.mark.parametrize("pooling", ["LAST", "MEAN"])
async def test_an_input_over_a_packed_xpos_frame_is_embedded_alone_and_the_others_packed(xpos_dir, reference,
                                                                                        pooling):
    model, run = reference
    first, second = inputs(model)
    async with serve_app(xpos_dir, max_prompt_tokens=MAX_TOKENS, convert="embed",
                         pooler_config={"pooling_type": pooling}) as http:
        answers = await asyncio.gather(http.post("/v1/embeddings", json={"input": first}),
                                       http.post("/v1/embeddings", json={"input": second}))
    rows = [item["embedding"] for answer in answers for item in ok(answer)["data"]]
    for ids, row in zip([*first, *second], rows, strict=True):
        expected = F.normalize(run(ids)[1 if pooling == "LAST" else 2], dim=-1)
        assert error(row, expected) < 1e-5, len(ids)
