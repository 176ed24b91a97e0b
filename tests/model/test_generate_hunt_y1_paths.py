"""generate() paths found by comparing with transformers' own decoding: assisted decoding (prompt lookup, a draft
model) given inputs_embeds, with or without the prompt's input_ids beside them."""

import pytest
import torch

from retnet.model import modeling_retnet

pytestmark = pytest.mark.skipif(
    not modeling_retnet.ASSISTED_ROLLBACK, reason="transformers < 5.25 refuses assisted decoding of a recurrent state"
)

OPTIONS = dict(max_new_tokens=9, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
               output_scores=True)


def _left_padded_repetitive():
    # prompt lookup finds candidates in the prompt itself, so the first forward already verifies some
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    return ids, (ids != 0).long()


def _assert_same(got, expected):
    assert got.sequences.tolist() == expected.sequences.tolist()
    for a, b in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("draft", ["prompt_lookup", "retnet", "retnet_narrower"])
def test_assisted_decoding_from_ids_and_embeds_verifies_the_candidates_after_the_embeds(model_factory, draft):
    # The first forward fed the prompt's embeddings alone, and transformers verified the candidates by the
    # prompt's logits (silently other tokens); a crop back into the prompt fed its ids again, not the given
    # embeddings; and the draft got the target's embeddings (a shape error for a narrower draft).
    model = model_factory()
    ids, mask = _left_padded_repetitive()
    embeds = model.get_input_embeddings()(ids) * 1.3  # not the ids' own embeddings
    expected = model.generate(ids, inputs_embeds=embeds, attention_mask=mask, **OPTIONS)
    if draft == "prompt_lookup":
        assisting = dict(prompt_lookup_num_tokens=3)
    else:
        narrow = dict(hidden_size=32, num_attention_heads=2) if draft == "retnet_narrower" else {}
        assisting = dict(assistant_model=model_factory(seed=1, num_hidden_layers=1, **narrow))
    got = model.generate(ids, inputs_embeds=embeds, attention_mask=mask, **assisting, **OPTIONS)
    _assert_same(got, expected)


@torch.no_grad()
def test_prompt_lookup_from_left_padded_embeds_alone(model_factory):
    # transformers cuts the mask to input_ids' columns, none of the prompt's here: a ValueError on a mask of
    # (1, 0) for a forward of 12 columns.
    model = model_factory()
    ids, mask = _left_padded_repetitive()
    embeds = model.get_input_embeddings()(ids)
    expected = model.generate(inputs_embeds=embeds, attention_mask=mask, **OPTIONS)
    _assert_same(model.generate(inputs_embeds=embeds, attention_mask=mask, prompt_lookup_num_tokens=3, **OPTIONS),
                 expected)
    assert expected.sequences.tolist() == model.generate(ids, attention_mask=mask, **OPTIONS).sequences[:, 12:].tolist()


@torch.no_grad()
def test_a_draft_model_from_embeds_alone_is_refused_by_name(model_factory):
    # The draft had no token of the prompt, only the target's embeddings: other tokens than plain decoding's
    # (or a shape error from a narrower draft).
    model = model_factory()
    ids, mask = _left_padded_repetitive()
    with pytest.raises(ValueError, match="assistant_model= from inputs_embeds alone"):
        model.generate(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                       assistant_model=model_factory(seed=1, num_hidden_layers=1), **OPTIONS)
