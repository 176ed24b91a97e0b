"""generate() modes and forward conventions a transformers user reaches for, on a tiny random RetNet, checked
against a reference without a cache (whole forwards over the sequence so far)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from retnet.model import modeling_retnet
from retnet.model.modeling_retnet import CACHE_KWARG

GREEDY = dict(do_sample=False, eos_token_id=None)


@pytest.fixture
def model(model_factory):
    # a larger init than the default so that greedy decoding does not settle on one repeated token
    return model_factory(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5)


def _prompt(length, seed=5, batch=1):
    return torch.randint(2, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy_by_whole_forwards(model, sequence, steps):
    for _ in range(steps):
        next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], 1)
    return sequence


@pytest.fixture
def llama():
    """A tiny target model of RetNet's vocabulary, for RetNet to draft for."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
@pytest.mark.parametrize("with_mask", (False, True))
@pytest.mark.parametrize("rollback", (True, False))
def test_retnet_drafts_for_another_models_assisted_generation(model, llama, with_mask, rollback, monkeypatch):
    # transformers crops the draft's cache to drop the candidates the target rejected: the second round failed on
    # "'RetNetCache' object has no attribute 'crop'". The cache now goes back to a snapshot (RetNetCache.crop).
    ids = _prompt(7)
    mask = dict(attention_mask=torch.ones_like(ids)) if with_mask else {}
    drafts = []
    generate = model.generate

    def recording(*args, **kwargs):
        output = generate(*args, **kwargs)
        drafts.append((kwargs["input_ids"], output.sequences))
        cache = output.get(CACHE_KWARG)
        if rollback:  # the cache is handed back, recording, for transformers to crop before the next round
            assert cache.recording and cache.snapshot is not None
        else:  # (before transformers 5.25) none: the next round prefills the sequence again
            assert cache is None
        return output

    monkeypatch.setattr(modeling_retnet, "ASSISTED_ROLLBACK", rollback)
    model.generate = recording
    out = llama.generate(ids, **mask, max_new_tokens=6, assistant_model=model, **GREEDY)
    assert torch.equal(out, llama.generate(ids, **mask, max_new_tokens=6, **GREEDY))
    assert len(drafts) > 1
    for inputs, sequences in drafts:  # each round's candidates are the draft's own greedy continuation
        new = sequences.shape[1] - inputs.shape[1]
        assert new > 0 and torch.equal(sequences, _greedy_by_whole_forwards(model, inputs, new))


@torch.no_grad()
@pytest.mark.parametrize("keep", (2, 4, "tensor"))
@pytest.mark.parametrize("shifted", (False, True))
def test_labels_with_logits_to_keep_give_the_loss_of_the_kept_positions(model, keep, shifted):
    # The logits were cut to the kept positions but the labels were not: cross_entropy failed on
    # "Expected input batch_size (4) to match target batch_size (14)".
    ids = _prompt(7, batch=2)
    labels = ids.clone()
    labels[0, :3] = -100
    next_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
    columns = torch.tensor([1, 4, 6]) if keep == "tensor" else torch.arange(7 - keep, 7)
    logits = model(ids).logits
    expected = F.cross_entropy(logits[:, columns].flatten(0, 1), next_labels[:, columns].flatten(), ignore_index=-100)
    logits_to_keep = columns if keep == "tensor" else keep
    given = dict(shift_labels=next_labels) if shifted else dict(labels=labels)
    out = model(ids, logits_to_keep=logits_to_keep, **given)
    assert out.logits.shape == (2, len(columns), 101)
    torch.testing.assert_close(out.loss, expected)


@torch.no_grad()
def test_labels_of_another_shape_with_logits_to_keep_are_refused_by_name(model):
    with pytest.raises(ValueError, match=r"labels must be \[B, T\].*\(2, 7\).*\(2, 6\)"):
        model(_prompt(7, batch=2), labels=_prompt(6, batch=2), logits_to_keep=1)



def test_batch_select_indices_takes_a_boolean_mask_as_a_mask(model):
    # transformers' caches index their rows by it; a cast to long kept rows 0, 1, 1 for the mask below
    ids = _prompt(5, batch=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cache = model(ids, attention_mask=mask, use_cache=True).cache
    for rows in (torch.tensor([False, True, True]), torch.tensor([1, 2])):
        picked = cache.clone()
        picked.batch_select_indices(rows)
        assert picked.offsets.tolist() == [5, 5]
        assert torch.equal(picked.states[0], cache.states[0][1:])


@torch.no_grad()
@pytest.mark.parametrize("use_cache", (True, False))
def test_a_right_padded_xpos_batch_longer_than_a_packed_frame_runs_as_each_row_alone(model_factory, use_cache):
    # A padded batch runs packed, each row in one xPos frame; a right-padded prompt longer than it covers (104
    # positions at xpos_scale_base=2, 2 800 in fp16 at the default 512) was refused where left padding ran.
    model = model_factory(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5,
                          use_xpos=True, xpos_scale_base=2)
    ids = _prompt(130, batch=2)
    mask = torch.ones_like(ids)
    mask[0, 100:] = 0
    out = model(ids, attention_mask=mask, output_hidden_states=True, use_cache=use_cache)
    assert (out.cache is not None) == use_cache
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 130, 32)] * 2
    alone = [model(ids[:1, :100]).logits[0], model(ids[1:]).logits[0]]
    torch.testing.assert_close(out.logits[0, :100], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[1], alone[1], rtol=1e-4, atol=1e-4)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=3, use_cache=use_cache, **GREEDY)[:, 130:]
    assert torch.equal(generated[0], _greedy_by_whole_forwards(model, ids[:1, :100], 3)[0, 100:])
    assert torch.equal(generated[1], _greedy_by_whole_forwards(model, ids[1:], 3)[0, 130:])


@torch.no_grad()
def test_a_long_padded_xpos_batch_continues_a_cache_in_pieces(model_factory):
    # Padding on top of a cached state runs packed too, left padding included.
    model = model_factory(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5,
                          use_xpos=True, xpos_scale_base=2)
    ids = _prompt(140, batch=2)
    mask = torch.ones_like(ids)
    mask[0, 10:30] = 0  # left padding of the new columns, after the cache's 10
    cache = model(ids[:, :10], use_cache=True).cache
    out = model(ids[:, 10:], attention_mask=mask, cache=cache, use_cache=True)
    real = torch.cat([ids[:1, :10], ids[:1, 30:]], 1)
    torch.testing.assert_close(out.logits[0, 20:], model(real).logits[0, 10:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[1], model(ids[1:]).logits[0, 10:], rtol=1e-4, atol=1e-4)
    assert out.cache.offsets.tolist() == [120, 140] and out.cache.get_seq_length() == 140


def test_pieces_train_like_the_whole_and_keep_the_whole_forwards_conventions(model_factory):
    """Run in pieces, a padded xPos batch's gradients flow across the carried state (the same loss and gradients
    as each row alone), checkpointed training returns no cache (as the unsplit forward), the module's hooks run
    once, and a too-short mask is refused naming the input's length, not a piece's."""
    model = model_factory(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5,
                          use_xpos=True, xpos_scale_base=2)
    ids = _prompt(130, batch=2)
    mask = torch.ones_like(ids)
    mask[0, 100:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    model.zero_grad()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    pieced = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # each row alone, weighted by its targets as the batch's mean weighs them (99 and 129 targets)
    first, second = model(ids[:1, :100], labels=ids[:1, :100]).loss, model(ids[1:], labels=ids[1:]).loss
    ((first * 99 + second * 129) / 228).backward()
    for got, want in zip(pieced, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model.gradient_checkpointing_enable()
    assert model(ids, attention_mask=mask, use_cache=True).cache is None
    model.gradient_checkpointing_disable()
    model.eval()
    calls = []
    handle = model.model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    assert calls == [1]
    with pytest.raises(ValueError, match=r"T=130; got \(2, 94\)"):
        model(ids, attention_mask=mask[:, :94])


def test_labels_with_a_list_of_positions_to_keep(model):
    ids = _prompt(9, batch=2)
    loss = model(ids, labels=ids, logits_to_keep=[1, 4, 6]).loss
    assert torch.equal(loss, model(ids, labels=ids, logits_to_keep=torch.tensor([1, 4, 6])).loss)
