"""Bugs found by checking the model against the RetNet / SAU / SmeLU papers and against transformers' conventions."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from retnet.model.activations import GeneralizedSmeLU, SmeLU, generalized_smelu, smelu

# -- SmeLU / generalized SmeLU with a wide quadratic region ------------------------------------------------


@pytest.mark.parametrize("width", [2.0**66, 2.0**100, 2.0**123, 2.0**126])  # (exact in float32; 4·2^126 is not)
def test_smelu_and_gsmelu_with_a_huge_width_stay_finite(width):
    # Accepted (finite, > 0), but squaring (x + β) before dividing by 4β overflows float32 from β ≈ 1.8e19:
    # the quadratic region was inf although SmeLU there is at most β.
    x = torch.tensor([-width, -1.0, 0.0, 1.0, width / 2], dtype=torch.float32, requires_grad=True)
    expected = (x.detach().double() + width) ** 2 / (4 * width)  # SmeLU(β), all of x inside [−β, β]
    cases = [
        ("smelu", lambda v: smelu(v, width)),
        ("SmeLU", SmeLU(width)),
        ("gsmelu", lambda v: generalized_smelu(v, width, width)),
        ("gsmelu trainable", GeneralizedSmeLU(width, width, trainable=True)),
    ]
    for name, fn in cases:
        out = fn(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), (name, out, grad)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(grad.double(), (x.detach().double() + width) / (2 * width), rtol=1e-6,
                                   atol=1e-7, msg=name)
    # A trainable width's own gradients: ∂f/∂a of a·(u+α)² overflowed where f did not, writing inf into α and β.
    trainable = GeneralizedSmeLU(width, width, trainable=True)
    trainable(x.detach()).sum().backward()
    for name, parameter in trainable.named_parameters():
        assert torch.isfinite(parameter.grad).all(), (name, parameter.grad)
    # Asymmetric: the value is f(β) = g₋·β + t + (g₊ − g₋)(α + β)/2 at β and the right slope beyond.
    alpha, beta, g_minus, g_plus, t = 3 * 2.0**80, 2.0**80, -0.5, 2.0, 7.0
    at = torch.tensor([beta, 2 * beta], dtype=torch.float32)
    for fn in (lambda v: generalized_smelu(v, alpha, beta, g_minus, g_plus, t),
               GeneralizedSmeLU(alpha, beta, g_minus, g_plus, t, trainable=True)):
        value_at_beta = g_minus * beta + t + (g_plus - g_minus) * (alpha + beta) / 2
        torch.testing.assert_close(fn(at).double(), torch.tensor([value_at_beta, value_at_beta + g_plus * beta],
                                                                 dtype=torch.float64), rtol=1e-6, atol=0)


# -- initialisation ------------------------------------------------------------------------------------------


def test_the_padding_embedding_starts_at_zero_as_in_transformers(model_factory, tmp_path):
    # nn.Embedding(padding_idx) freezes that row and documents it as zeros; transformers' models zero it at init.
    # RetNet drew it at random like every other row, so a pad (frozen) kept a random embedding for good.
    model = model_factory(tie_word_embeddings=False)
    pad = model.config.pad_token_id
    assert model.model.embed_tokens.padding_idx == pad
    assert torch.count_nonzero(model.get_input_embeddings().weight[pad]) == 0
    assert torch.count_nonzero(model.get_input_embeddings().weight[pad + 1]) > 0  # the others are drawn
    assert torch.count_nonzero(model_factory(tie_word_embeddings=True).lm_head.weight[pad]) == 0  # tied: one row
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, pad_token_id=3))
    assert torch.count_nonzero(llama.get_input_embeddings().weight[3]) == 0  # the convention followed
    # A checkpoint's own pad row is loaded, not zeroed.
    with torch.no_grad():
        model.get_input_embeddings().weight[pad] = 0.5
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded_row = loaded.get_input_embeddings().weight[pad]
    assert torch.equal(loaded_row, torch.full_like(loaded_row, 0.5))
    # The pad row gets no gradient, so it stays where it started.
    model.train()
    ids = torch.tensor([[5, pad, 7, 9]])
    model(ids, labels=ids).loss.backward()
    assert torch.count_nonzero(model.get_input_embeddings().weight.grad[pad]) == 0


# -- configuration ---------------------------------------------------------------------------------------------


def test_numpy_activation_parameters_are_saved_as_plain_numbers(model_factory, tmp_path):
    # Accepted as real numbers (a sweep's np.float32 grid, say), but json cannot write np.float32 / np.int64:
    # printing the config raised a TypeError, and save_pretrained left a truncated config.json behind.
    kwargs = [{"alpha": np.float32(0.25), "sigma": np.float64(0.5)}, {"beta": np.float32(1.5)}]
    model = model_factory(hidden_act=["sau", "smelu"], hidden_act_kwargs=kwargs)
    assert "smelu" in repr(model.config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hidden_act_kwargs"] == [{"alpha": 0.25, "sigma": 0.5}, {"beta": 1.5}]
    assert all(type(value) is float for layer in saved["hidden_act_kwargs"] for value in layer.values())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[1].mlp.act_fn.beta == 1.5
    ids = torch.tensor([[5, 9, 2, 7]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # The config object itself keeps what it was given.
    assert type(model.config.hidden_act_kwargs[1]["beta"]) is np.float32
    model.config.hidden_act_kwargs = {"beta": np.int64(2)}
    model.config.hidden_act = "smelu"
    assert json.loads(model.config.to_json_string())["hidden_act_kwargs"] == {"beta": 2}
