"""``inputs_embeds`` in another dtype than the model's: each layer's norm raised a cryptic dtype error
("mixed dtype (CPU): expect parameter to have scalar type of Float", "expected m1 and m2 to have the same
dtype"). They are taken where transformers' LlamaForCausalLM takes them (a narrower float into a wider model, any
float under autocast), cast to the model's dtype; elsewhere a ValueError names both dtypes."""

from __future__ import annotations

import pytest
import torch

from .conftest import make_model


def test_narrower_embeds_into_a_wider_model_run_as_the_model_dtype():
    model = make_model()
    embeds = torch.randn(2, 5, 64).to(torch.bfloat16)
    expected = model(inputs_embeds=embeds.float()).logits
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, expected, rtol=0, atol=0)
    labels = torch.randint(0, 101, (2, 5))
    model.train()
    embeds.requires_grad_(True)
    model(inputs_embeds=embeds, labels=labels).loss.backward()
    assert embeds.grad is not None and embeds.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(("model_dtype", "embeds_dtype"), [(torch.bfloat16, torch.float32),
                                                           (torch.bfloat16, torch.float16),
                                                           (torch.float16, torch.bfloat16)])
def test_embeds_that_the_model_would_round_are_refused_naming_both_dtypes(model_dtype, embeds_dtype):
    model = make_model().to(model_dtype)
    embeds = torch.randn(1, 4, 64, dtype=embeds_dtype)
    with pytest.raises(ValueError, match=rf"inputs_embeds is {embeds_dtype}, the model is {model_dtype}: pass "
                                         rf"inputs_embeds\.to\({model_dtype}\)"):
        model(inputs_embeds=embeds)


def test_under_autocast_wider_embeds_are_cast_to_the_model_dtype():
    model = make_model().to(torch.bfloat16)
    embeds = torch.randn(1, 4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(inputs_embeds=embeds).logits
        expected = model(inputs_embeds=embeds.bfloat16()).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_integer_embeds_are_refused():
    with pytest.raises(ValueError, match=r"inputs_embeds must be floating point \(torch.float32, the model's\); "
                                         r"got torch.int64"):
        make_model()(inputs_embeds=torch.zeros(1, 4, 64, dtype=torch.long))
