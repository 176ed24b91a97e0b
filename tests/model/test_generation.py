import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer, pipeline

from retnet.model import RetNetCache


def _prompt(length, seed=3, batch=1):
    return torch.randint(2, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_greedy_generate_with_cache_equals_recomputing_every_step(tiny_model):
    prompt = _prompt(11)
    generated = tiny_model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    sequence = prompt
    for _ in range(12):
        next_token = tiny_model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


@torch.no_grad()
def test_generate_uses_the_recurrent_cache(tiny_model):
    out = tiny_model.generate(_prompt(9), max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                              eos_token_id=None)
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    assert isinstance(cache, RetNetCache)
    assert cache.get_seq_length() == 9 + 4 - 1  # the last token is sampled, never fed back
    assert cache.offsets.tolist() == [12]


@torch.no_grad()
def test_left_padded_batch_gives_the_same_tokens_as_each_prompt_alone(tiny_model):
    prompts = [_prompt(n, seed=n)[0] for n in (5, 12, 8)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    batched = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for row, prompt in enumerate(prompts):
        alone = tiny_model.generate(prompt[None], max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[row, width:], alone[0, len(prompt):]), row


@torch.no_grad()
def test_beam_search_reorders_the_state(tiny_model):
    prompt = _prompt(7, batch=2)
    out = tiny_model.generate(prompt, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False,
                              eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (4, 13)
    # the best beam's score is the model's own log-likelihood of it, recomputed without a cache
    best = out.sequences[0:1]
    logprobs = tiny_model(best).logits.log_softmax(-1)[0, 6:-1]
    total = logprobs.gather(-1, best[0, 7:, None]).sum()
    torch.testing.assert_close(out.sequences_scores[0] * 6, total, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_beam_search_without_a_cache_matches_with_one(tiny_model):
    prompt = _prompt(7, batch=2)
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, eos_token_id=None)
    assert torch.equal(tiny_model.generate(prompt, use_cache=False, **kwargs), tiny_model.generate(prompt, **kwargs))


@torch.no_grad()
@pytest.mark.parametrize("kwargs", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)])
@pytest.mark.parametrize("name", ("cache", "past_key_values"))
def test_continuing_from_a_returned_cache_with_several_sequences_per_prompt(tiny_model, kwargs, name):
    first = tiny_model.generate(_prompt(7), max_new_tokens=3, do_sample=False, eos_token_id=None,
                                return_dict_in_generate=True)
    cache = first.past_key_values if getattr(first, "past_key_values", None) is not None else first.cache
    torch.manual_seed(0)
    continued = tiny_model.generate(first.sequences, max_new_tokens=4, eos_token_id=None, **{name: cache}, **kwargs)
    torch.manual_seed(0)
    recomputed = tiny_model.generate(first.sequences, max_new_tokens=4, eos_token_id=None, **kwargs)
    assert torch.equal(continued, recomputed)


@torch.no_grad()
def test_sampling_is_seeded_and_respects_top_k(tiny_model):
    prompt = _prompt(6)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=3, top_p=0.95, eos_token_id=None)
    torch.manual_seed(123)
    first = tiny_model.generate(prompt, **kwargs)
    torch.manual_seed(123)
    second = tiny_model.generate(prompt, **kwargs)
    assert torch.equal(first, second)
    # top_k=1 sampling is greedy
    greedy = tiny_model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    sampled = tiny_model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=1, eos_token_id=None)
    assert torch.equal(greedy, sampled)


def test_pipeline_and_streamer_with_a_trained_tokenizer(tmp_path, bpe_tokenizer, model_factory):
    model = model_factory(vocab_size=len(bpe_tokenizer), pad_token_id=bpe_tokenizer.pad_token_id,
                          eos_token_id=bpe_tokenizer.eos_token_id)
    model.save_pretrained(tmp_path)
    bpe_tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("def add(a, b):", max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"].startswith("def add(a, b):")

    inputs = tokenizer("for i in range", return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=8, do_sample=False,
                                                                 streamer=streamer))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tokenizer.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("mode", ("parallel", "chunkwise"))
@torch.no_grad()
def test_retention_mode_is_honoured_by_generate(tiny_model, mode):
    prompt = _prompt(20)
    default = tiny_model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None)
    forced = tiny_model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None, retention_mode=mode)
    assert torch.equal(default, forced)
