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


def test_the_trainers_bf16_autocast_follows_the_unfused_head():
    hidden, weight, labels = _inputs(vocab=257)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = causal_lm_loss(F.linear(hidden, weight), labels)
        got = linear_cross_entropy(hidden, weight, labels, chunk_tokens=13)
    grads = torch.autograd.grad(expected, (hidden, weight))
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    for a, b in zip(got_grads, grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_without_grad_mode_no_gradient_is_computed():
    # needs_input_grad stays True under no_grad: the forward computed both gradient matmuls (3x the FLOPs and
    # an fp32 copy of the head's weight) for nothing.
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, labels = _inputs()
    head_flops = 2 * hidden.shape[0] * hidden.shape[1] * hidden.shape[2] * weight.shape[0]
    for context in (torch.no_grad, torch.inference_mode):
        with context(), FlopCounterMode(display=False) as counter:
            linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
        assert counter.get_total_flops() == head_flops
    with FlopCounterMode(display=False) as counter:
        linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
    assert counter.get_total_flops() == 3 * head_flops


@pytest.mark.parametrize("autocast", [False, True])  # fp16 weights; fp32 weights under fp16 autocast
def test_fp16_gradients_keep_the_loss_scale_instead_of_underflowing(autocast):
    # GradScaler's scale reaches the unfused head's softmax gradient before its fp16 matmul; here it comes only
    # in backward, so p / denominator was cast to fp16 unscaled and the small probabilities flushed to zero
    # (and fp16 weights cast GradScaler's initial 65536 to fp16: inf, nan gradients).
    hidden, weight, labels = _inputs(batch=4, length=64, vocab=2000)
    reference = torch.autograd.grad(causal_lm_loss(F.linear(hidden, weight), labels, 20_000), (hidden, weight))
    dtype = torch.float32 if autocast else torch.float16
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    scale = 2.0**16
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        got = linear_cross_entropy(hidden, weight, labels, 20_000)
    got_grads = torch.autograd.grad(got * scale, (hidden, weight))
    for a, b in zip(got_grads, reference):
        assert a.dtype == dtype
        assert ((a.float() / scale - b).norm() / b.norm()).item() < 2e-3


def test_labels_that_all_are_ignored_give_the_unfused_nan_loss_and_zero_gradients():
    hidden, weight, labels = _inputs()
    labels[:] = -100
    expected = causal_lm_loss(F.linear(hidden, weight), labels)
    grads = torch.autograd.grad(expected, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, labels, chunk_tokens=16)
    assert expected.isnan() and got.isnan()
    for a, b in zip(torch.autograd.grad(got, (hidden, weight)), grads):
        assert not b.any()
        torch.testing.assert_close(a, b)


def test_a_double_backward_raises_instead_of_dropping_the_loss_curvature():
    hidden, weight, labels = _inputs()
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=16)
    (grad_hidden,) = torch.autograd.grad(loss, hidden, create_graph=True)
    # A gradient penalty beside the loss: its term was a constant, silently contributing nothing.
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy .* has no double backward"):
        (loss + grad_hidden.pow(2).sum()).backward()


def test_backward_twice_with_retain_graph_accumulates_as_the_unfused_head():
    hidden, weight, labels = _inputs()
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=16)
    loss.backward(retain_graph=True)
    loss.backward()
    expected = torch.autograd.grad(causal_lm_loss(F.linear(hidden, weight), labels) * 2.0, (hidden, weight))
    for got, want in zip((hidden.grad, weight.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_a_chunk_below_one_token_is_refused():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1"):  # -1 gave a loss of 0
        linear_cross_entropy(hidden, weight, labels, chunk_tokens=-1)


@pytest.mark.parametrize("label", [11, -1])
def test_a_label_outside_the_vocabulary_raises_as_in_the_unfused_loss(label):
    """An id past the vocabulary (or negative, not -100) fails in the fused loss as in causal_lm_loss, not counted
    as a logit of 0."""
    hidden, weight = torch.randn(1, 4, 8), torch.randn(11, 8)
    labels = torch.tensor([[1, 2, label, 3]])
    with pytest.raises((IndexError, RuntimeError)):
        causal_lm_loss(hidden @ weight.T, labels)
    with pytest.raises((IndexError, RuntimeError)):
        linear_cross_entropy(hidden, weight, labels)
