"""generate() as a user coming from Llama calls it, on a tiny random RetNet, checked against the ground truth of a
recurrent model: greedy decoding by whole forwards without a cache, each prompt alone."""

import pytest
import torch

from retnet.model.modeling_retnet import CACHE_KWARG

GREEDY = dict(do_sample=False, eos_token_id=None)
LENGTHS = (5, 12, 8, 1)


@pytest.fixture
def model(model_factory):
    # a larger init than the default so that greedy decoding does not settle on one repeated token
    return model_factory(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5)


def _prompts():
    return [torch.randint(2, 101, (n,), generator=torch.Generator().manual_seed(n)) for n in LENGTHS]


def _right_padded(prompts):
    """What a tokenizer with ``padding_side="right"`` (transformers' default, and retnet's BPE's) returns."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # pad_token_id 0
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return ids, mask


def _greedy_by_whole_forwards(model, prompt, steps):
    sequence = prompt[None]
    for _ in range(steps):
        next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], 1)
    return sequence[0, len(prompt):]


@torch.no_grad()
@pytest.mark.parametrize("options", [{}, dict(use_cache=False), dict(prefill_chunk_size=3)],
                         ids=["cached", "uncached", "chunked_prefill"])
def test_a_right_padded_batch_continues_each_prompt_as_alone(model, options):
    # The first new token used to come from the logits of a row's trailing padding (transformers only warns).
    prompts = _prompts()
    ids, mask = _right_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, **options, **GREEDY)
    for row, prompt in enumerate(prompts):
        assert torch.equal(out[row, ids.shape[1]:], _greedy_by_whole_forwards(model, prompt, 6)), row


@torch.no_grad()
def test_transformers_right_padding_warning_is_dropped_for_this_model_only(model):
    """It says the results are incorrect, which they are not here; the filter acts only inside this model's
    generate (the same message outside it still reaches the log)."""
    import logging

    from transformers.generation import utils as generation_utils

    class Recorded(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    log, recorded = logging.getLogger(generation_utils.__name__), Recorded()
    log.addHandler(recorded)
    try:
        ids, mask = _right_padded(_prompts())
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, **GREEDY)
        assert not [m for m in recorded.messages if "right-padding" in m], recorded.messages
        log.warning("A decoder-only architecture is being used, but right-padding was detected! (another model)")
        assert [m for m in recorded.messages if "right-padding" in m]
    finally:
        log.removeHandler(recorded)


@torch.no_grad()
def test_a_right_padded_batch_scores_and_beams_follow_the_real_tokens(model):
    prompts = _prompts()
    ids, mask = _right_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=2, output_logits=True, return_dict_in_generate=True,
                         **GREEDY)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(out.logits[0][row], model(prompt[None]).logits[0, -1], rtol=1e-4, atol=1e-4)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, **GREEDY)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=4, num_beams=3, **GREEDY)
        assert torch.equal(beams[row, ids.shape[1]:], alone[0, len(prompt):]), row


@torch.no_grad()
@pytest.mark.parametrize("batch", (1, 2))
def test_an_empty_prompt_is_refused_clearly(model, batch):
    # It failed on an IndexError inside transformers' generate.
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(torch.zeros(batch, 0, dtype=torch.long), max_new_tokens=2, **GREEDY)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(inputs_embeds=torch.zeros(batch, 0, 32), max_new_tokens=2, **GREEDY)


@torch.no_grad()
def test_a_cache_continued_twice_needs_a_copy_and_the_error_says_so(model):
    # transformers' prompt-reuse recipe: one prefilled cache, copied for each continuation.
    prompt = torch.randint(2, 101, (1, 12), generator=torch.Generator().manual_seed(1))
    prefix_cache = model(prompt[:, :7], use_cache=True).cache
    expected = model.generate(prompt, max_new_tokens=4, **GREEDY)
    for _ in range(2):
        assert torch.equal(model.generate(prompt, **{CACHE_KWARG: prefix_cache.clone()}, max_new_tokens=4, **GREEDY), expected)
    model.generate(prompt, **{CACHE_KWARG: prefix_cache}, max_new_tokens=4, **GREEDY)  # moves it on to 15 tokens
    with pytest.raises(ValueError, match=r"in place.*cache\.clone\(\)"):
        model.generate(prompt, **{CACHE_KWARG: prefix_cache}, max_new_tokens=4, **GREEDY)


@torch.no_grad()
def test_a_continued_row_without_a_new_token_is_warned_of_and_finished_rows_continue(model):
    # Its first new token comes from a padding column's logits: the right ones, of the last token the cache saw,
    # were in the previous call's output. Warned of, not refused: a batch whose rows finished (EOS, then padding)
    # is generated further that way, as with transformers' other models.
    import logging

    prompts = _prompts()[:2]
    ids, mask = _right_padded(prompts)
    new = torch.randint(2, 101, (2, 3), generator=torch.Generator().manual_seed(3))
    whole = torch.cat([ids, new], 1)
    log, records = logging.getLogger("retnet.model.modeling_retnet"), []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    log.addHandler(handler)
    try:
        for new_mask, warned in (([[1, 1, 1], [1, 0, 0]], False), ([[1, 1, 1], [0, 0, 0]], True)):
            records.clear()
            cache = model(ids, attention_mask=mask, use_cache=True).cache
            whole_mask = torch.cat([mask, torch.tensor(new_mask)], 1)
            out = model.generate(whole, attention_mask=whole_mask, max_new_tokens=2, **{CACHE_KWARG: cache}, **GREEDY)
            assert out.shape == (2, whole.shape[1] + 2)
            assert bool([m for m in records if "rows [1] of the batch have no real token" in m]) == warned, records
        # a batch generated further after one row finished: transformers pads the finished row and infers the mask
        start = ids[:, :4]
        eos = int(model.generate(start, max_new_tokens=1, **GREEDY)[0, -1])  # row 0's first token ends it
        first = model.generate(start, max_new_tokens=3, pad_token_id=0, eos_token_id=eos, do_sample=False,
                               return_dict_in_generate=True)
        assert first.sequences[0, -1] == 0 and first.sequences[1, -1] != 0, first.sequences
        records.clear()
        more = model.generate(first.sequences, **{CACHE_KWARG: getattr(first, CACHE_KWARG)}, max_new_tokens=2, pad_token_id=0,
                              **GREEDY)
        assert more.shape[1] == first.sequences.shape[1] + 2
        assert [m for m in records if "rows [0] of the batch have no real token" in m], records
    finally:
        log.removeHandler(handler)
