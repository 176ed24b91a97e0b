import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from retnet.model import RetNetConfig, RetNetForCausalLM, RetNetForSequenceClassification, RetNetModel

MODES = ("parallel", "chunkwise", "recurrent")


def _ids(batch=2, length=37, vocab=101, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=generator)


@torch.no_grad()
def test_three_retention_modes_give_the_same_logits(tiny_model):
    ids = _ids()  # 37 tokens: not a multiple of the chunk size 8
    logits = {mode: tiny_model(ids, retention_mode=mode).logits for mode in MODES}
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(logits[mode], logits["parallel"], rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("prefill_mode", ("auto", *MODES))
def test_prefill_then_cached_decoding_equals_full_forward_with_left_padding(tiny_model, prefill_mode):
    ids = _ids(length=29)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # row 1 is left padded
    ids[1, :6] = 0
    full = tiny_model(ids, attention_mask=mask, retention_mode="parallel").logits

    split = 13
    out = tiny_model(ids[:, :split], attention_mask=mask[:, :split], use_cache=True, retention_mode=prefill_mode)
    pieces, cache = [out.logits], out.cache
    for t in range(split, ids.shape[1]):
        out = tiny_model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    stepped = torch.cat(pieces, dim=1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_left_padding_contributes_nothing(tiny_model):
    ids = _ids(batch=1, length=20)
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    for mode in MODES:
        alone = tiny_model(ids, retention_mode=mode).logits
        padded_logits = tiny_model(padded, attention_mask=mask, retention_mode=mode).logits[:, 7:]
        torch.testing.assert_close(padded_logits, alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_right_padding_and_holes_leave_each_rows_cache_as_alone(model_factory, mode):
    # a padded position writes no kᵀv, but the decay must not run over it either
    model = model_factory(use_xpos=True)
    ids = _ids(batch=3, length=11)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padded
    mask[2, 2:4] = 0  # a hole, then right padding
    mask[2, 9:] = 0
    out = model(ids, attention_mask=mask, use_cache=True, retention_mode=mode)
    for row in range(3):
        real = mask[row].bool()
        alone = model(ids[row, real][None], use_cache=True, retention_mode=mode)
        torch.testing.assert_close(out.logits[row, real], alone.logits[0], rtol=1e-5, atol=1e-5)
        for state, alone_state in zip(out.cache.states, alone.cache.states):
            torch.testing.assert_close(state[row], alone_state[0], rtol=1e-5, atol=1e-6, msg=f"row {row}")
        assert out.cache.offsets[row] == alone.cache.offsets[0]


@torch.no_grad()
@pytest.mark.parametrize("mode", (*MODES, "auto"))
def test_left_padded_chunk_continues_each_rows_cache(tiny_model, mode):
    prefix = _ids(batch=3, length=6, seed=2)
    cache = tiny_model(prefix, use_cache=True, retention_mode=mode).cache
    chunk = _ids(batch=3, length=5, seed=3)
    chunk_mask = torch.ones_like(chunk)
    chunk_mask[0, :2] = 0
    chunk_mask[1] = 0  # nothing new for row 1
    mask = torch.cat([torch.ones_like(prefix), chunk_mask], dim=1)
    out = tiny_model(chunk, attention_mask=mask, cache=cache, use_cache=True, retention_mode=mode)
    for row in range(3):
        real = chunk_mask[row].bool()
        alone = tiny_model(torch.cat([prefix[row], chunk[row, real]])[None], use_cache=True, retention_mode=mode)
        torch.testing.assert_close(out.logits[row, real], alone.logits[0, 6:], rtol=1e-5, atol=1e-5)
        for state, alone_state in zip(out.cache.states, alone.cache.states):
            torch.testing.assert_close(state[row], alone_state[0], rtol=1e-5, atol=1e-6, msg=f"row {row}")


@torch.no_grad()
def test_state_is_constant_size_and_accepts_the_deprecated_kwarg(tiny_model):
    ids = _ids(batch=1, length=40)
    out = tiny_model(ids[:, :10], use_cache=True)
    size_after_10 = out.cache.nbytes()
    out2 = tiny_model(ids[:, 10:], past_key_values=out.cache, use_cache=True)
    assert out2.cache is out.cache
    assert out2.cache.nbytes() == size_after_10  # O(1) in the context length
    assert out2.cache.get_seq_length() == 40
    config = tiny_model.config
    # fp32 states per layer, and one int64 offset for the one row
    expected = config.num_hidden_layers * config.num_attention_heads * config.head_dim * config.value_head_dim * 4 + 8
    assert size_after_10 == expected


def test_loss_ignores_minus_100_labels(tiny_model):
    ids = _ids(length=17)
    labels = ids.clone()
    labels[:, :5] = -100
    out = tiny_model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, tiny_model.config.vocab_size)
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert tiny_model.model.embed_tokens.weight.grad is not None


def test_gradients_agree_across_modes(model_factory):
    model = model_factory()
    ids = _ids(length=19)
    grads = {}
    for mode in MODES:
        model.zero_grad()
        model(ids, labels=ids, retention_mode=mode).loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["chunkwise"], grads["parallel"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads["recurrent"], grads["parallel"], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(model_factory):
    ids = _ids(length=16)
    plain, checkpointed = model_factory().train(), model_factory().train()
    # transformers 5.2x renamed gradient_checkpointing_enable; 5.17 only has the old name
    getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)()
    for model in (plain, checkpointed):
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@torch.no_grad()
def test_packed_documents_do_not_leak_into_each_other(tiny_model):
    docs = [_ids(batch=1, length=n, seed=n) for n in (11, 5, 17)]
    packed = torch.cat(docs, dim=1)
    cu_seqlens = torch.tensor([0, 11, 16, 33])
    for mode in MODES:
        logits = tiny_model(packed, cu_seqlens=cu_seqlens, retention_mode=mode).logits
        alone = torch.cat([tiny_model(d, retention_mode=mode).logits for d in docs], dim=1)
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("use_xpos", (False, True))
def test_position_ids_that_restart_keep_packed_documents_apart(model_factory, use_xpos):
    # transformers' padding-free collator packs examples into one row and marks them only by position_ids that
    # restart at 0; transformers' models then keep them apart, as cu_seqlens does here.
    from transformers import DataCollatorWithFlattening

    from retnet.model.modeling_retnet import causal_lm_loss

    model = model_factory(use_xpos=use_xpos)
    docs = [_ids(1, 5, seed=2), _ids(1, 11, seed=3), _ids(1, 1, seed=4)]
    batch = DataCollatorWithFlattening()([{"input_ids": d[0].tolist()} for d in docs])
    alone = torch.cat([model(d).logits for d in docs], dim=1)
    for use_cache in (False, True):
        out = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    use_cache=use_cache)
        torch.testing.assert_close(out.logits, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, causal_lm_loss(alone, batch["labels"]))
    # Positions that only count on, from anywhere, are one sequence.
    ids = _ids(1, 9)
    torch.testing.assert_close(model(ids, position_ids=torch.arange(9)[None]).logits, model(ids).logits)
    with pytest.raises(ValueError, match=r"position_ids restart.*row 1.*B=1"):
        model(_ids(2, 9), position_ids=torch.tensor([list(range(9)), [0, 1, 2, 0, 1, 2, 3, 4, 5]]))


@torch.no_grad()
def test_output_hidden_states(tiny_model):
    out = tiny_model(_ids(length=9), output_hidden_states=True)
    assert len(out.hidden_states) == tiny_model.config.num_hidden_layers + 1
    assert out.hidden_states[0].shape == (2, 9, tiny_model.config.hidden_size)


@torch.no_grad()
@pytest.mark.parametrize("model_class", (RetNetForCausalLM, RetNetModel, RetNetForSequenceClassification))
def test_the_configs_output_defaults_are_honoured(tmp_path, model_factory, model_class):
    # transformers' models read output_hidden_states and return_dict from the config when the call leaves them
    # unset: from_pretrained(path, output_hidden_states=True) is the usual way to get the hidden states.
    model_factory().save_pretrained(tmp_path)
    model = model_class.from_pretrained(tmp_path, output_hidden_states=True).eval()
    out = model(_ids(length=5))
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert model(_ids(length=5), output_hidden_states=False).hidden_states is None
    model.config.return_dict = False
    assert isinstance(model(_ids(length=5)), tuple)
    assert not isinstance(model(_ids(length=5), return_dict=True), tuple)


def test_resize_token_embeddings_keeps_ties(tiny_model):
    tiny_model.resize_token_embeddings(130)
    assert tiny_model.config.vocab_size == 130
    assert tiny_model.lm_head.weight.shape[0] == 130
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()
    assert tiny_model(torch.tensor([[129, 3]])).logits.shape == (1, 2, 130)


@torch.no_grad()
def test_per_layer_activations_and_linear_ffn(model_factory):
    model = model_factory(hidden_act=["sau", "identity"], hidden_act_kwargs=[{"alpha": 0.2, "sigma": 0.5}, {}])
    assert type(model.model.layers[0].mlp.act_fn).__name__ == "SAU"
    linear_mlp = model.model.layers[1].mlp
    x = torch.randn(3, model.config.hidden_size)
    # identity activation: the FFN is an affine map, so it is additive
    torch.testing.assert_close(linear_mlp(x + x), 2 * linear_mlp(x), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(model(_ids(length=7)).logits).all()


@torch.no_grad()
@pytest.mark.parametrize("overrides", [dict(ffn_glu=True, hidden_act="silu"), dict(norm_type="rmsnorm", use_xpos=True),
                                       dict(use_output_gate=False, use_head_norm=False, decay_schedule="linspace")])
def test_variants_agree_across_modes(model_factory, overrides):
    model = model_factory(**overrides)
    ids = _ids(length=21)
    reference = model(ids, retention_mode="parallel").logits
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(model(ids, retention_mode=mode).logits, reference, rtol=1e-4, atol=1e-5)


def test_save_pretrained_roundtrip(tmp_path, model_factory):
    model = model_factory(hidden_act="smelu", hidden_act_kwargs={"beta": 1.5})
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "generation_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RetNetForCausalLM)
    ids = _ids(length=12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@torch.no_grad()
def test_bf16_long_sequence_with_32_heads_matches_fp32():
    config = RetNetConfig(vocab_size=64, hidden_size=256, num_hidden_layers=1, num_attention_heads=32,
                          chunk_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = RetNetForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 4096))
    reference = model(ids, retention_mode="chunkwise").logits
    low = model.to(torch.bfloat16)(ids, retention_mode="chunkwise").logits.float()
    assert torch.isfinite(low).all()
    # bf16 has 8 bits of mantissa: relative error of the logits ~1e-2 of their spread
    error = (low - reference).abs().max() / reference.abs().max()
    assert error < 5e-2, error
    assert (low.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_unknown_retention_mode_is_refused(tiny_model):
    with pytest.raises(ValueError, match="retention_mode"):
        tiny_model(_ids(length=3), retention_mode="sideways")


def test_trained_activation_parameters_survive_save_and_load(tmp_path, model_factory):
    model = model_factory(hidden_act="sau", hidden_act_kwargs={"alpha": 0.15, "sigma": 2.0})
    with torch.no_grad():
        model.model.layers[1].mlp.act_fn.alpha.fill_(0.42)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[1].mlp.act_fn.alpha.item() == pytest.approx(0.42)
    assert loaded.model.layers[0].mlp.act_fn.alpha.item() == pytest.approx(0.15)
    assert loaded.model.layers[0].mlp.act_fn.sigma.item() == pytest.approx(2.0)


@pytest.mark.parametrize("reentrant", (True, False))
def test_gradient_checkpointing_continues_a_given_cache(model_factory, reentrant):
    # Training on from a carried state (truncated BPTT): checkpointing must not drop the cache's state.
    prefix, ids = _ids(length=10, seed=4), _ids(length=7, seed=5)
    plain, checkpointed = model_factory().train(), model_factory().train()
    # transformers 5.2x renamed gradient_checkpointing_enable (and its kwargs argument); 5.17 has the old names
    if hasattr(checkpointed, "activation_checkpointing_enable"):
        checkpointed.activation_checkpointing_enable({"use_reentrant": reentrant})
    else:
        checkpointed.gradient_checkpointing_enable({"use_reentrant": reentrant})
    results = []
    for model in (plain, checkpointed):
        with torch.no_grad():
            cache = model(prefix, use_cache=True).cache
        out = model(ids, labels=ids, cache=cache, use_cache=True)
        out.loss.backward()
        results.append((out.loss.detach(), out.cache))
    (loss, cache), (checkpointed_loss, checkpointed_cache) = results
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=0)
    assert checkpointed_cache is not None and checkpointed_cache.offsets.tolist() == [17, 17]
    for got, want in zip(checkpointed_cache.states, cache.states):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


@torch.no_grad()
def test_a_cache_of_another_batch_or_depth_is_refused_by_name(tiny_model):
    from retnet.model import RetNetCache
    from retnet.model.modeling_retnet import CACHE_KWARG

    three_rows = tiny_model(_ids(batch=3, length=5), use_cache=True).cache
    for batch in (1, 2):
        with pytest.raises(ValueError, match=rf"cache holds 3 rows.*batch of {batch}"):
            tiny_model(_ids(batch=batch, length=4), cache=three_rows, use_cache=True)
    for layers in (1, 5):
        with pytest.raises(ValueError, match=rf"cache has {layers} layers.*2"):
            tiny_model(_ids(batch=1, length=4), cache=RetNetCache(layers), use_cache=True)
    # beam search returns its beams' states: continuing the best sequence alone from them is refused
    out = tiny_model.generate(_ids(batch=1, length=7), num_beams=3, max_new_tokens=3, do_sample=False,
                              eos_token_id=None, return_dict_in_generate=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    with pytest.raises(ValueError, match=r"cache holds 3 rows.*batch of 1"):
        tiny_model.generate(out.sequences, **{CACHE_KWARG: cache}, max_new_tokens=2, do_sample=False,
                            eos_token_id=None)


@torch.no_grad()
def test_position_ids_of_another_shape_are_refused_by_name(tiny_model):
    ids = _ids(length=9)
    reference = tiny_model(ids).logits
    # one row of positions serves the whole batch, as in transformers' models
    torch.testing.assert_close(tiny_model(ids, position_ids=torch.arange(9)[None]).logits, reference)
    for shape in ((9,), (2, 8), (2, 10), (3, 9)):
        positions = torch.arange(shape[-1]).expand(shape)
        with pytest.raises(ValueError, match=rf"position_ids must be \[B, T\].*B=2, T=9; got \({shape[0]},"):
            tiny_model(ids, position_ids=positions)


@torch.no_grad()
@pytest.mark.parametrize("use_xpos", (False, True))
def test_one_row_of_position_ids_serves_a_padded_batch(model_factory, use_xpos):
    # [1, T] positions broadcast over the batch; with xPos a hole (which runs the batch packed) made the frame
    # check index a [1, T] tensor with the batch's [B·T] token indices (IndexError)
    model = model_factory(use_xpos=use_xpos)
    ids = _ids(length=9)
    mask = torch.ones_like(ids)
    mask[1, 3:5] = 0
    one_row = torch.arange(9)[None]
    for use_cache in (False, True):
        want = model(ids, attention_mask=mask, position_ids=one_row.expand(2, -1), use_cache=use_cache)
        got = model(ids, attention_mask=mask, position_ids=one_row, use_cache=use_cache)
        torch.testing.assert_close(got.logits, want.logits)
        if use_cache:
            for a, b in zip(got.cache.states, want.cache.states):
                torch.testing.assert_close(a, b)


def test_a_pad_that_is_the_eos_does_not_freeze_the_eos_embedding():
    """Tokenizers without a pad token usually get pad = EOS; the embedding's padding_idx would then keep the
    EOS row, which opens every packed training document, at its initial value."""
    from retnet.model import RetNetConfig, RetNetForCausalLM

    common = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, eos_token_id=3)
    for pad in (3, 4):
        model = RetNetForCausalLM(RetNetConfig(**common, pad_token_id=pad))
        ids = torch.tensor([[3, 7, 8, 3, 9]])
        model(input_ids=ids, labels=ids).loss.backward()
        grad = model.model.embed_tokens.weight.grad
        assert grad[3].abs().sum() > 0
    assert model.model.embed_tokens.padding_idx == 4  # a pad of its own still gets no gradient


@pytest.mark.parametrize("fused", [False, True], ids=["plain-head", "fused-head"])
def test_no_label_to_predict_gives_the_same_loss_on_both_heads(model_factory, fused):
    """No label to predict, all −100 or T = 0, is a mean over nothing: nan with zero gradients, as
    F.cross_entropy and transformers' causal-LM loss give it; 0 with a num_items_in_batch. The plain head
    refused T = 0 with a cross-entropy batch-size error (its shifted labels had B entries for 0 logits)."""
    model = model_factory(fuse_linear_cross_entropy=fused).train()  # the fused head runs in training only
    ids = _ids(length=7)
    cases = {
        "T=0 B=1": (torch.zeros(1, 0, dtype=torch.long),) * 2,
        "T=0 B=2": (torch.zeros(2, 0, dtype=torch.long),) * 2,
        "all -100": (ids, torch.full_like(ids, -100)),
        "one token": (ids[:, :1], ids[:, :1]),  # its only label is the one it would predict past the end
    }
    for name, (inputs, labels) in cases.items():
        model.zero_grad()
        loss = model(inputs, labels=labels).loss
        assert loss.dtype == torch.float32 and loss.isnan(), f"{name}: {loss}"
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(not g.isnan().any() and not g.any() for g in grads), name
        counted = model(inputs, labels=labels, num_items_in_batch=4).loss
        assert counted.item() == 0.0, f"{name}: {counted}"


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent", "auto", "packed"])
def test_bf16_autocast_keeps_every_forms_state_fp32_and_decoding_continues(model_factory, mode):
    """The state is fp32 [B, H, K, V] everywhere: under CPU autocast the references' matmuls ran in bf16
    and handed the parallel and recurrent forms' (and the packed padded batch's) states back as bf16."""
    model = model_factory()
    ids = _ids(length=13)
    kwargs = dict(retention_mode=None if mode == "packed" else mode)
    if mode == "packed":
        ids, kwargs["cu_seqlens"] = ids[:1, :12], torch.tensor([0, 5, 12])
    with torch.no_grad():
        want = model(ids, use_cache=True, **kwargs).cache
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cache = model(ids, use_cache=True, **kwargs).cache
            assert [s.dtype for s in cache.states] == [torch.float32] * len(cache.states)
            for got, expected in zip(cache.states, want.states):
                # q, k, v are bf16 projections: within their rounding of the fp32 run's state
                torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
            rows = cache.batch_size
            for step in range(3):
                out = model(torch.full((rows, 1), 5 + step), cache=cache, use_cache=True)
                assert [s.dtype for s in out.cache.states] == [torch.float32] * len(cache.states)
                assert out.logits.isfinite().all()
    assert cache.offsets.tolist() == (want.offsets + 3).tolist()
