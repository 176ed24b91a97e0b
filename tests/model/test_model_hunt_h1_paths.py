"""generate() through peft's prompt learning (prompt tuning, p-tuning), checked against greedy decoding by whole
forwards of the peft model without a cache."""

import pytest
import torch

peft = pytest.importorskip("peft")

GREEDY = dict(do_sample=False, eos_token_id=None)
PROMPTS = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])  # left-padded, pad_token_id 0


def _prompt_learning(model, kind):
    config = (peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3) if kind == "prompt"
              else peft.PromptEncoderConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3,
                                            encoder_hidden_size=16))
    return peft.get_peft_model(model, config).eval()


def _greedy_by_whole_forwards(model, ids, mask, steps):
    for _ in range(steps):
        next_token = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
    return ids[:, -steps:]


@torch.no_grad()
@pytest.mark.parametrize("kind", ["prompt", "p_tuning"])
@pytest.mark.parametrize("use_xpos", [False, True], ids=["rope", "xpos"])
def test_prompt_learning_generates_as_whole_forwards(model_factory, kind, use_xpos):
    # peft tells a decoding step from the prefill by the cache under its old name, past_key_values: not finding it,
    # it prepended the virtual tokens again at every step, into the state (every token after the first was wrong).
    model = _prompt_learning(model_factory(hidden_size=32, num_attention_heads=2, initializer_range=0.5,
                                           use_xpos=use_xpos), kind)
    mask = (PROMPTS != 0).long()
    expected = _greedy_by_whole_forwards(model, PROMPTS, mask, 5)
    out = model.generate(input_ids=PROMPTS, attention_mask=mask, max_new_tokens=5, **GREEDY)
    assert torch.equal(out[:, -5:], expected)
    beams = model.generate(input_ids=PROMPTS, attention_mask=mask, max_new_tokens=5, num_beams=2, **GREEDY)
    uncached = model.generate(input_ids=PROMPTS, attention_mask=mask, max_new_tokens=5, num_beams=2, use_cache=False,
                              **GREEDY)
    assert torch.equal(beams, uncached)


@torch.no_grad()
@pytest.mark.parametrize("options", [dict(prefill_chunk_size=2), dict(prompt_lookup_num_tokens=2)],
                         ids=["chunked_prefill", "prompt_lookup"])
def test_prompt_learning_refuses_forwards_of_several_new_tokens(model_factory, options):
    # After the prefill peft feeds only the last new token of a forward: a second prefill chunk, or assisted
    # decoding's candidates, lost the others silently.
    model = _prompt_learning(model_factory(hidden_size=32, num_attention_heads=2), "prompt")
    with pytest.raises(ValueError, match="prompt learning"):
        model.generate(input_ids=PROMPTS[1:], max_new_tokens=4, **options, **GREEDY)


@torch.no_grad()
def test_lora_keeps_chunked_prefill_and_prompt_lookup(model_factory):
    # peft's LoRA wraps generate too, without prompt learning: nothing refused, the tokens are plain decoding's.
    model = peft.get_peft_model(model_factory(hidden_size=32, num_attention_heads=2, initializer_range=0.5),
                                peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=2, init_lora_weights=False)).eval()
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    plain = model.generate(input_ids=ids, max_new_tokens=6, **GREEDY)
    for options in (dict(prefill_chunk_size=3), dict(prompt_lookup_num_tokens=2)):
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=6, **options, **GREEDY), plain), options
