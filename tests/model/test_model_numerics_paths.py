"""Numerics and dtypes of the model: fp16/bf16 against fp32, long contexts, and what stays fp32."""

import pytest
import torch

from retnet.model import RetNetConfig, RetNetForCausalLM


def _long_context_model(weight_gain: float) -> RetNetForCausalLM:
    """One layer whose q/k/v projections are ``weight_gain`` times their init (a trained model's retention scores
    and values are far larger than at init), with weights that fp16 represents exactly, so that an fp16 copy
    differs from it only by how it computes."""
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=11, hidden_size=64, num_hidden_layers=1, num_attention_heads=8, chunk_size=64)
    model = RetNetForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
                param.mul_(weight_gain)
            param.copy_(param.half().float())
    return model


def test_fp16_retention_outputs_past_65504_stay_finite_at_long_contexts():
    # 8 heads: the slowest decays as 1 − 2^−12, so a repeated token's retention output grows ~4096-fold over the
    # context; in fp32 it reaches 2.9e5 here, past fp16's 65504, and the head norm brings it back to its scale.
    model = _long_context_model(weight_gain=40.0)
    ids = torch.full((1, 4097), 3)
    with torch.no_grad():
        reference = model(ids).logits
        half = model.to(torch.float16)
        for mode in ("auto", "recurrent"):
            logits = half(ids, retention_mode=mode).logits
            assert logits.dtype == torch.float16
            assert torch.isfinite(logits).all(), mode
            torch.testing.assert_close(logits.float(), reference, atol=3e-3, rtol=0)
        # a decoding step on the cached (fp32) state of the first 4096 tokens
        cache = half(ids[:, :-1]).cache
        step = half(ids[:, -1:], cache=cache).logits
        assert torch.isfinite(step).all()
        torch.testing.assert_close(step[:, -1].float(), reference[:, -1], atol=3e-3, rtol=0)


@pytest.mark.parametrize(("act", "kwargs"), [
    ("sau", {"trainable_sigma": True}),
    ("gsmelu", {"trainable": True}),
], ids=["sau", "gsmelu"])
def test_a_model_built_in_bf16_is_bf16_throughout_as_one_cast_to_it_and_fsdp2_shards_it(act, kwargs):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    config = RetNetConfig(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, chunk_size=8,
                          hidden_act=act, hidden_act_kwargs=kwargs)
    torch.manual_seed(0)
    cast = RetNetForCausalLM(config).to(torch.bfloat16)
    # what from_pretrained(path, dtype=torch.bfloat16) builds the model with before loading the weights
    built = RetNetForCausalLM._from_config(config, dtype=torch.bfloat16)
    assert {p.dtype for p in built.parameters()} == {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    built.load_state_dict(cast.state_dict())
    ids = torch.randint(2, 101, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(built(ids).logits, cast(ids).logits)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for layer in built.model.layers:
            fully_shard(layer)  # FSDP2 takes one parameter dtype per group
        fully_shard(built)
        built.train()
        built(ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in built.model.layers[0].mlp.act_fn.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("hidden_size", "heads", "expected"), [
    (66, 2, r"head_dim must be even .*hidden_size / num_attention_heads = 66 / 2; got 33"),
    (1028, 1, r"head_dim must be <= 512 .*hidden_size / num_attention_heads = 1028 / 1; got 1028"),
])
def test_a_head_dim_derived_from_the_hidden_size_is_refused_naming_the_hidden_size(hidden_size, heads, expected):
    with pytest.raises(ValueError, match=expected):
        RetNetConfig(hidden_size=hidden_size, num_attention_heads=heads)
    # one given explicitly is refused as given
    with pytest.raises(ValueError, match=r"head_dim must be even \(rotary position pairs the key dimensions\); got 7"):
        RetNetConfig(hidden_size=hidden_size, num_attention_heads=heads, head_dim=7)


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_fused_distillation_gradients_survive_fp16_under_a_loss_scale(alpha):
    # Trainer passes num_items_in_batch, the token count of all accumulated micro-batches: each logit's gradient,
    # (q − p) / count, is then ~1e-9 here, below fp16's smallest subnormal (6e-8) unless GradScaler's scale has
    # multiplied it first, as the unfused head's backward does (and linear_cross_entropy, by dividing late).
    from retnet.model.distillation import linear_distillation_loss
    from retnet.model.loss import linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    vocab, width, length, count = 4096, 32, 256, 65536
    hidden = torch.randn(1, length, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.05
    teacher_hidden = torch.randn(1, length, width, generator=generator)
    teacher_weight = torch.randn(vocab, width, generator=generator) * 0.05
    labels = torch.randint(0, vocab, (1, length), generator=generator)

    def gradients(loss_fn, dtype, loss_scale):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(h, w)
        (loss * loss_scale).backward()
        return h.grad / loss_scale, w.grad / loss_scale

    def distill(h, w):
        return linear_distillation_loss(h, w, teacher_hidden, teacher_weight, labels, count, alpha=alpha)[0]

    reference = gradients(distill, torch.float32, 1.0)
    got = gradients(distill, torch.float16, 2.0**16)
    for g, r in zip(got, reference, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=0, atol=2e-3 * r.abs().max().item())
    if alpha == 0.0:  # the cross-entropy alone: as linear_cross_entropy's under the same scale
        plain = gradients(lambda h, w: linear_cross_entropy(h, w, labels, count), torch.float16, 2.0**16)
        for g, p in zip(got, plain, strict=True):
            torch.testing.assert_close(g, p, rtol=0, atol=2e-3 * p.abs().max().item())


def test_an_fp16_xpos_packed_row_runs_as_far_as_an_fp32_one():
    # A packed row runs each sequence in one xPos frame, bounded by the scales' range: fp16 was held to 2^10
    # (2 816 positions at base 512) for fp16 q and k, but fp16 models scale them in fp32 (retention runs in fp32),
    # so an fp16 row as long as an fp32 one runs and matches it.
    from retnet.model.modeling_retnet import XPOS_PACKED_MAX_GROWTH, xpos_span

    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, use_xpos=True,
                          xpos_scale_base=16, chunk_size=16)
    model = RetNetForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    length = int(xpos_span(config, XPOS_PACKED_MAX_GROWTH)) - 1
    assert length > int(xpos_span(config, 2.0**10)) + 50  # past the old fp16 limit
    ids = torch.randint(0, 32, (1, length))
    cu_seqlens = torch.tensor([0, 7, length])
    with torch.no_grad():
        reference = model(ids, cu_seqlens=cu_seqlens).logits
        logits = model.to(torch.float16)(ids, cu_seqlens=cu_seqlens).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), reference, atol=2e-2, rtol=0)
