"""Paths the README listed as known limitations: a padded xPos batch given position_ids beyond one packed frame,
and the decays' checks after an in-place write under torch.inference_mode()."""

import pytest
import torch

from retnet.model import RetNetConfig, RetNetForCausalLM, modeling_retnet
from retnet.model.modeling_retnet import CACHE_KWARG

MODES = ["parallel", "chunkwise", "recurrent"]


def xpos_model(**overrides):
    # xpos_scale_base=4: a packed (padded) row covers 216 positions per forward in fp32, an unpacked frame 16.
    settings = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, chunk_size=8,
                    tie_word_embeddings=True, use_xpos=True, xpos_scale_base=4.0, pad_token_id=0, eos_token_id=1)
    settings.update(overrides)
    torch.manual_seed(0)
    return RetNetForCausalLM(RetNetConfig(**settings)).eval()


def generate_positions(mask):
    """position_ids as transformers' generate builds them from the attention mask (padding at 0)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def padded(rows, left):
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        columns = slice(width - row.shape[1], width) if left else slice(0, row.shape[1])
        ids[i, columns], mask[i, columns] = row[0], 1
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_padded_xpos_batch_with_positions_beyond_a_packed_frame_matches_each_row_alone(mode):
    model = xpos_model()
    assert modeling_retnet.xpos_span(model.config, modeling_retnet.XPOS_PACKED_MAX_GROWTH) == 216
    head = 5
    rows = [torch.randint(2, 101, (1, n)) for n in (head + 240, head + 23)]
    alone = [model(row, retention_mode=mode) for row in rows]
    # Left padding on a cache (the packed path): continuing each row's first tokens.
    cache = model(torch.cat([row[:, :head] for row in rows]), retention_mode=mode).cache
    ids, mask = padded([row[:, head:] for row in rows], left=True)
    mask = torch.cat([torch.ones(2, head, dtype=torch.long), mask], 1)
    out = model(ids, attention_mask=mask, position_ids=generate_positions(mask)[:, head:], cache=cache,
                retention_mode=mode)
    # Right padding, no cache; pads at position 1 (older transformers) and a row whose first column is padding.
    ids_r, mask_r = padded(rows, left=False)
    ids_r[1], mask_r[1] = ids_r[1].roll(3), mask_r[1].roll(3)
    positions_r = (mask_r.cumsum(-1) - 1).masked_fill(mask_r == 0, 1)
    out_r = model(ids_r, attention_mask=mask_r, position_ids=positions_r, retention_mode=mode)
    for i, (row, ref) in enumerate(zip(rows, alone)):
        new = row.shape[1] - head
        torch.testing.assert_close(out.logits[i, -new:], ref.logits[0, head:], atol=2e-5, rtol=1e-5)
        real = mask_r[i].bool()
        torch.testing.assert_close(out_r.logits[i, real], ref.logits[0], atol=2e-5, rtol=1e-5)
        for layer in range(2):
            torch.testing.assert_close(out.cache.states[layer][i], ref.cache.states[layer][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out_r.cache.states[layer][i], ref.cache.states[layer][0], atol=1e-5,
                                       rtol=1e-4)
    assert out.cache.offsets.tolist() == out_r.cache.offsets.tolist() == [row.shape[1] for row in rows]


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_a_long_padded_xpos_batch_at_shifted_positions_without_a_cache_matches_each_row_alone(mode):
    # Without a cache to return, the positions may start anywhere (only distances count): the pieces' frames
    # follow them. A returned cache's offsets count real tokens, so there positions far past them are refused.
    model = xpos_model()
    rows = [torch.randint(2, 101, (1, n)) for n in (240, 30)]
    ids, mask = padded(rows, left=False)
    ids[1], mask[1] = ids[1].roll(3), mask[1].roll(3)  # (a row beginning with padding)
    positions = generate_positions(mask) + 1000
    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=False, retention_mode=mode).logits
    for i, row in enumerate(rows):
        torch.testing.assert_close(out[i, mask[i].bool()], model(row, retention_mode=mode).logits[0], atol=2e-5,
                                   rtol=1e-5)
    with pytest.raises(ValueError, match=r"position_ids run 999 positions past the cache's offsets.*use_cache=False"):
        model(ids, attention_mask=mask, position_ids=positions, use_cache=True)


@torch.no_grad()
def test_padded_xpos_positions_that_leave_the_frame_are_refused_saying_which_positions_to_give():
    model = xpos_model()
    ids = torch.randint(2, 101, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    cache = model(ids[:, :3]).cache
    with pytest.raises(ValueError, match=r"at most 216 positions per sequence.*number each row's real tokens on from "
                                         r"there, as generate builds them from the attention_mask"):
        model(ids[:, 3:], attention_mask=mask, cache=cache, position_ids=(300 + torch.arange(17)).expand(2, -1))


@pytest.mark.parametrize("chunked", [False, True])
def test_generate_continuing_a_cache_with_left_padding_and_position_ids_matches_each_row_alone(chunked):
    model = xpos_model()
    head = 4
    rows = [torch.randint(2, 101, (1, n)) for n in (head + 230, head + 17)]
    ids, mask = padded([row[:, head:] for row in rows], left=True)
    ids = torch.cat([torch.cat([row[:, :head] for row in rows]), ids], 1)
    mask = torch.cat([torch.ones(2, head, dtype=torch.long), mask], 1)
    with torch.no_grad():
        cache = model(ids[:, :head]).cache
    extra = {"prefill_chunk_size": 100} if chunked else {}
    out = model.generate(ids, attention_mask=mask, position_ids=generate_positions(mask), cache=cache,
                         max_new_tokens=5, do_sample=False, **extra)
    for i, row in enumerate(rows):
        expected = model.generate(row, max_new_tokens=5, do_sample=False)
        assert out[i, -5:].tolist() == expected[0, -5:].tolist()


def test_a_decay_written_in_place_under_inference_mode_is_checked_again():
    # The first forward under inference_mode made the layers' ln γ inference tensors, which keep no version
    # counter: a write to one there (a positive ln γ, a state growing as γᵀ) ran unchecked.
    model = xpos_model(use_xpos=False)
    ids = torch.randint(2, 101, (2, 12))
    with torch.inference_mode():
        reference = model(ids).logits
        log_decay = model.model.layers[0].retention.log_decay(ids.device)
        assert not log_decay.is_inference()
        saved = log_decay.clone()
        log_decay.fill_(0.5)
        with pytest.raises(ValueError, match=r"log_decay must be ln γ <= 0.*0\.5"):
            model(ids)
        log_decay.copy_(saved)
        torch.testing.assert_close(model(ids).logits, reference, atol=0, rtol=0)
    # and training after an inference_mode forward still runs (the decays are plain tensors)
    model.train()
    model(ids, labels=ids).loss.backward()


@pytest.mark.skipif(
    not modeling_retnet.ASSISTED_ROLLBACK, reason="transformers < 5.25 refuses assisted decoding of a recurrent state"
)
@torch.no_grad()
@pytest.mark.parametrize("use_xpos", [False, True])
def test_prompt_lookup_from_inputs_embeds_equals_greedy_decoding(model_factory, use_xpos):
    # Generating from inputs_embeds, input_ids hold only the new tokens, while the cache counts the prompt's columns
    # too: the tokens to feed again after a crop were cut by that count, which skipped them (wrong scores; with
    # xPos a shape error).
    model = model_factory(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.5,
                          use_xpos=use_xpos, xpos_scale_base=4.0)
    generator = torch.Generator().manual_seed(3)
    torch.randint(2, 101, (37,), generator=generator)
    prompt = torch.randint(2, 101, (1, 70), generator=generator)
    embeds = model.get_input_embeddings()(prompt)
    options = dict(max_new_tokens=15, do_sample=False, return_dict_in_generate=True, output_scores=True)
    expected = model.generate(inputs_embeds=embeds, **options)
    lookup = model.generate(inputs_embeds=embeds, prompt_lookup_num_tokens=3, **options)
    assert lookup.sequences.tolist() == expected.sequences.tolist()
    for got, want in zip(lookup.scores, expected.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_new_tokens_that_leave_out_one_the_cache_has_not_seen_are_refused(model_factory):
    # generate's cache has not fed the last token it returned: new tokens alone, with the whole sequence's mask,
    # that leave it out ran on from the wrong token (the mask said 6 columns were new, 5 were fed).
    model = model_factory(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5)
    prompt = torch.randint(2, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    first = model.generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
    extra = torch.randint(2, 101, (2, 5), generator=torch.Generator().manual_seed(4))
    full = torch.cat([first.sequences, extra], 1)
    mask = torch.ones_like(full)
    with pytest.raises(ValueError, match=r"its last 5, but its real tokens before the 5 new columns are more than the cache holds"):
        model.generate(extra, attention_mask=mask, **{CACHE_KWARG: cache.clone()}, max_new_tokens=3, do_sample=False)
    # every unseen token (the last one generate returned, then the new ones) continues as the whole sequence does
    expected = model.generate(full, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=False)
    out = model.generate(full[:, cache.get_seq_length():], attention_mask=mask, **{CACHE_KWARG: cache},
                         max_new_tokens=3,                          do_sample=False)
    assert out[:, -3:].tolist() == expected[:, -3:].tolist()


@torch.no_grad()
def test_padded_xpos_rows_of_documents_with_restarting_positions_within_a_frame_run_in_one_forward():
    """A padded batch wider than a packed frame whose rows hold documents with restarting position_ids (a packing
    collator's), each within one frame: split into pieces whose frames follow the real-token count, it was refused
    ("reaches position -150"), though one forward takes it."""
    model = xpos_model()
    ids = torch.randint(2, 101, (2, 300), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 250:] = 0
    positions = torch.cat([torch.arange(150), torch.arange(150)])[None].repeat(2, 1)
    positions[1, 250:] = 0
    logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    for row in (0, 1):  # each row as the same forward gives it in a batch of its own
        alone = model(ids[row:row + 1], attention_mask=mask[row:row + 1], position_ids=positions[row:row + 1],
                      use_cache=False).logits
        torch.testing.assert_close(logits[row], alone[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_new_tokens_continue_a_row_split_from_a_left_padded_cache():
    """split() counts a row's real tokens as seen: its own left-padded mask has more columns before the new tokens
    than that, which the check for a left-out token refused though nothing was left out."""
    torch.manual_seed(0)
    model = RetNetForCausalLM(RetNetConfig(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           pad_token_id=0, eos_token_id=1)).eval()
    ids = torch.randint(2, 101, (2, 6))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    row = model(ids, attention_mask=mask).cache.split()[1]
    new = torch.randint(2, 101, (1, 3))
    whole = model.generate(torch.cat([ids[1:2, 2:], new], 1), max_new_tokens=4, do_sample=False)
    continued = model.generate(new, attention_mask=torch.cat([mask[1:2], torch.ones_like(new)], 1),
                               **{CACHE_KWARG: row.clone()}, max_new_tokens=4, do_sample=False)
    assert continued[0, -4:].tolist() == whole[0, -4:].tolist()


@torch.no_grad()
def test_padded_xpos_inputs_of_other_rows_than_the_cache_or_positions_are_refused_by_name():
    # the pieces' frames were computed before the forward's checks: a raw broadcast RuntimeError
    model = xpos_model(xpos_scale_base=1.0)
    ids = torch.randint(2, 101, (3, 99))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    positions = generate_positions(mask)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, attention_mask=mask, position_ids=positions[:2])
    cache = model(ids[:2, :4]).cache
    with pytest.raises(ValueError, match="the cache holds 2 rows"):
        model(ids, attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1), position_ids=positions + 4,
              **{CACHE_KWARG: cache})
