"""The chunked linear cross-entropy against the logits' loss: value and gradients, chunks that do not divide
the tokens, ignored labels, a global denominator, low precision."""

import pytest
import torch
import torch.nn.functional as F

from retnet.model.loss import linear_cross_entropy
from retnet.model.modeling_retnet import causal_lm_loss


def _inputs(batch=3, length=37, dim=24, vocab=101, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator) / dim**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, :5] = -100  # padding / prompt tokens that do not count
    labels[2, 20] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_tokens", [1, 16, 50, 10_000])  # one token; odd remainders; one chunk
@pytest.mark.parametrize("num_items", [None, 200])
def test_equals_the_loss_of_the_logits_and_its_gradients(chunk_tokens, num_items):
    hidden, weight, labels = _inputs()
    expected = causal_lm_loss(F.linear(hidden, weight), labels, num_items)
    grads = torch.autograd.grad(expected * 3.0, (hidden, weight))  # an upstream gradient other than 1
    got = linear_cross_entropy(hidden, weight, labels, num_items, chunk_tokens=chunk_tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    got_grads = torch.autograd.grad(got * 3.0, (hidden, weight))
    for a, b in zip(got_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_follows_the_unfused_head_within_bf16_rounding():
    hidden, weight, labels = _inputs(dtype=torch.bfloat16, vocab=257)
    expected = causal_lm_loss(F.linear(hidden, weight), labels)
    grads = torch.autograd.grad(expected, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, labels, chunk_tokens=13)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    for a, b in zip(got_grads, grads):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
    assert not got.requires_grad
    torch.testing.assert_close(got, causal_lm_loss(F.linear(hidden, weight), labels).detach())


def test_shapes_that_do_not_match_are_refused():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match=r"\[B, T, D\].*\[3, 37, 24\] and \[3, 36\]"):
        linear_cross_entropy(hidden, weight, labels[:, 1:])


@pytest.mark.parametrize("tied", [True, False])
def test_the_model_trains_on_the_same_loss_and_gradients_without_logits(tied):
    from retnet.model import RetNetConfig, RetNetForCausalLM

    config = RetNetConfig(vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          tie_word_embeddings=tied)
    torch.manual_seed(0)
    plain = RetNetForCausalLM(config).train()
    fused = RetNetForCausalLM(RetNetConfig(**{**config.to_dict(), "fuse_linear_cross_entropy": True})).train()
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 211, (2, 45))
    labels = ids.clone()
    labels[1, :7] = -100
    expected = plain(input_ids=ids, labels=labels, num_items_in_batch=80)
    got = fused(input_ids=ids, labels=labels, num_items_in_batch=80)
    assert got.logits is None and expected.logits is not None
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=1e-6)
    expected.loss.backward()
    got.loss.backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    # Evaluation and generation keep their logits.
    fused.eval()
    assert fused(input_ids=ids, labels=labels).logits.shape == (2, 45, 211)


def test_a_head_that_is_not_a_plain_linear_is_refused_by_name():
    from retnet.model import RetNetConfig, RetNetForCausalLM

    model = RetNetForCausalLM(RetNetConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           fuse_linear_cross_entropy=True)).train()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    ids = torch.randint(0, 64, (1, 9))
    with pytest.raises(ValueError, match="fuse_linear_cross_entropy needs lm_head"):
        model(input_ids=ids, labels=ids)


def test_the_setting_must_be_a_bool():
    from retnet.model import RetNetConfig

    with pytest.raises(ValueError, match="fuse_linear_cross_entropy"):
        RetNetConfig(fuse_linear_cross_entropy="yes")
