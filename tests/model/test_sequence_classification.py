"""RetNetForSequenceClassification: transformers' Llama head (pooling, losses, loading) on RetNet."""

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from retnet.model import RetNetCache, RetNetConfig, RetNetForCausalLM, RetNetForSequenceClassification

MODES = ("parallel", "chunkwise")
PAD, EOS = 0, 1


def tiny_config(**overrides) -> RetNetConfig:
    # chunk_size 8 with odd lengths below: no sequence is a whole number of chunks
    settings = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, chunk_size=8,
                    pad_token_id=PAD, eos_token_id=EOS, num_labels=3)
    settings.update(overrides)
    return RetNetConfig(**settings)


def make_classifier(seed: int = 0, **overrides) -> RetNetForSequenceClassification:
    torch.manual_seed(seed)
    return RetNetForSequenceClassification(tiny_config(**overrides)).eval()


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 101, (length,), generator=torch.Generator().manual_seed(seed))


def _batch(sequences: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, padded with PAD on ``side`` to the longest sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols], mask[row, cols] = seq, 1
    return ids, mask


SEQUENCES = [_ids(13, 1), _ids(21, 2), _ids(27, 3)]


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_logits_are_the_score_of_the_rightmost_non_pad_hidden_state(mode):
    model = make_classifier(retention_mode=mode)
    ids, _ = _batch(SEQUENCES, "right")
    ids[1, :3] = PAD  # a row padded on both sides: still its rightmost non-pad token
    out = model(ids)
    assert isinstance(out, SequenceClassifierOutputWithPast)
    assert out.logits.shape == (3, 3)

    hidden = model.model(ids).last_hidden_state
    for row in range(len(ids)):
        last = max(i for i in range(ids.shape[1]) if ids[row, i] != PAD)
        torch.testing.assert_close(out.logits[row], hidden[row, last] @ model.score.weight.T, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ("right", "left"))
def test_a_padded_row_scores_as_the_sequence_alone(mode, side):
    model = make_classifier(retention_mode=mode)
    alone = torch.cat([model(seq[None]).logits for seq in SEQUENCES])
    ids, mask = _batch(SEQUENCES, side)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, alone, rtol=1e-5, atol=1e-5)
    # the mask's rows as inputs_embeds pick the same tokens
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits, alone, rtol=1e-5, atol=1e-5)
    if side == "right":  # causal: trailing pads change nothing before them, so transformers' pad-id rule suffices
        torch.testing.assert_close(model(ids).logits, alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_parallel_and_chunkwise_give_the_same_logits():
    model = make_classifier()
    ids, mask = _batch(SEQUENCES, "left")
    logits = {mode: model(ids, attention_mask=mask, retention_mode=mode).logits for mode in MODES}
    torch.testing.assert_close(logits["chunkwise"], logits["parallel"], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_mask_keeps_a_final_eos_that_is_also_the_pad_id():
    # Tokenizers without a pad often pad with the EOS; a sequence ending in that EOS then looks padded by the id.
    model = make_classifier(pad_token_id=EOS)
    seq = torch.cat([_ids(12, 4), torch.tensor([EOS])])[None]
    hidden = model.model(seq).last_hidden_state[0]
    by_mask = model(seq, attention_mask=torch.ones_like(seq)).logits[0]
    by_pad_id = model(seq).logits[0]  # transformers' rule: the token before the EOS
    torch.testing.assert_close(by_mask, model.score(hidden[-1]))
    torch.testing.assert_close(by_pad_id, model.score(hidden[-2]))


@torch.no_grad()
def test_without_a_pad_token_only_a_single_row_or_a_mask_is_accepted():
    model = make_classifier(pad_token_id=None)
    ids, mask = _batch(SEQUENCES[:2], "right")
    with pytest.raises(ValueError, match=re.escape("Cannot handle batch sizes > 1 if no padding token is defined.")):
        model(ids)
    one = model(SEQUENCES[1][None]).logits  # B = 1: the last position
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[1:], one, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_inputs_embeds_without_a_mask_pool_the_last_position():
    model = make_classifier()
    ids, _ = _batch(SEQUENCES, "left")
    embeds = model.get_input_embeddings()(ids)
    hidden = model.model(ids).last_hidden_state
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model.score(hidden[:, -1]))


@pytest.mark.parametrize(
    ("num_labels", "labels", "problem_type"),
    [
        (1, torch.tensor([0.5, -1.0, 2.0]), "regression"),
        (3, torch.tensor([2, 0, -100]), "single_label_classification"),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), "multi_label_classification"),
    ],
)
def test_problem_type_is_inferred_from_the_labels_and_the_loss_is_torchs(num_labels, labels, problem_type):
    model = make_classifier(num_labels=num_labels)
    ids, mask = _batch(SEQUENCES, "right")
    out = model(ids, attention_mask=mask, labels=labels)
    assert model.config.problem_type == problem_type
    logits = out.logits
    expected = {
        "regression": lambda: F.mse_loss(logits.squeeze(), labels),
        "single_label_classification": lambda: F.cross_entropy(logits, labels, ignore_index=-100),
        "multi_label_classification": lambda: F.binary_cross_entropy_with_logits(logits, labels),
    }[problem_type]()
    torch.testing.assert_close(out.loss, expected)
    # an explicit problem_type wins over the inference: integer labels as 2-output regression targets
    model = make_classifier(num_labels=2, problem_type="regression")
    targets = torch.randn(3, 2)
    out = model(ids, attention_mask=mask, labels=targets)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits, targets))


def test_gradients_reach_the_backbone_and_the_score():
    model = make_classifier(retention_mode="chunkwise").train()
    ids, mask = _batch(SEQUENCES, "left")
    model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
    for name in ("score.weight", "model.embed_tokens.weight", "model.layers.0.retention.q_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the head's loss is a per-batch mean: Trainer must divide it over accumulation steps itself
    assert model.accepts_loss_kwargs is False


@torch.no_grad()
def test_save_and_load_round_trip_through_the_auto_class(tmp_path):
    model = make_classifier(num_labels=2)
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is RetNetForSequenceClassification and loaded.config.num_labels == 2
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids, mask = _batch(SEQUENCES, "left")
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


@torch.no_grad()
@pytest.mark.parametrize("tie", (True, False))
def test_a_causal_lm_checkpoint_loads_as_a_reward_model(tmp_path, tie):
    torch.manual_seed(0)
    lm = RetNetForCausalLM(tiny_config(tie_word_embeddings=tie)).eval()
    lm.save_pretrained(tmp_path)
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    assert type(reward) is RetNetForSequenceClassification and reward.score.out_features == 1
    backbone = reward.model.state_dict()
    assert backbone.keys() == lm.model.state_dict().keys()
    for key, value in lm.model.state_dict().items():
        assert torch.equal(backbone[key], value), key
    # score is new: drawn as transformers draws a Linear, N(0, initializer_range), not left empty
    weight = reward.score.weight
    assert torch.isfinite(weight).all() and 0.5 < weight.std().item() / reward.config.initializer_range < 1.5
    ids, mask = _batch(SEQUENCES, "left")
    out = reward(ids, attention_mask=mask, labels=torch.tensor([1.0, 0.0, -1.0]))
    assert out.logits.shape == (3, 1) and reward.config.problem_type == "regression"


@torch.no_grad()
def test_a_training_export_scores_tokenizer_batches(tmp_path, bpe_tokenizer):
    from retnet.train.checkpoint import export_pretrained

    config = tiny_config(vocab_size=len(bpe_tokenizer), pad_token_id=bpe_tokenizer.pad_token_id,
                         eos_token_id=bpe_tokenizer.eos_token_id)
    torch.manual_seed(0)
    export = export_pretrained(tmp_path / "export", config, RetNetForCausalLM(config).state_dict(), bpe_tokenizer)
    reward = AutoModelForSequenceClassification.from_pretrained(export, num_labels=1).eval()
    texts = ["def add(a, b):\n    return a + b\n", "import os\n"]
    for side in ("left", "right"):
        bpe_tokenizer.padding_side = side
        batch = bpe_tokenizer(texts, padding=True, return_tensors="pt")
        alone = torch.cat([reward(**bpe_tokenizer(text, return_tensors="pt")).logits for text in texts])
        torch.testing.assert_close(reward(**batch).logits, alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_cache_continues_scoring_a_growing_sequence():
    model = make_classifier()
    seq = SEQUENCES[1][None]
    out = model(seq[:, :12], use_cache=True)
    assert isinstance(out.cache, RetNetCache) and out.past_key_values is out.cache
    continued = model(seq[:, 12:], past_key_values=out.cache, use_cache=True)
    torch.testing.assert_close(continued.logits, model(seq).logits, rtol=1e-5, atol=1e-5)
    assert model(seq, use_cache=False).cache is None
    loss, logits = model(seq, labels=torch.tensor([1]), use_cache=False, return_dict=False)
    assert loss.dim() == 0 and logits.shape == (1, 3)


@torch.no_grad()
def test_packed_sequences_give_one_row_each():
    model = make_classifier()
    packed = torch.cat(SEQUENCES)[None]
    cu_seqlens = torch.tensor([0, 13, 34, 61])
    alone = torch.cat([model(seq[None]).logits for seq in SEQUENCES])
    out = model(packed, cu_seqlens=cu_seqlens, labels=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out.logits, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="every packed sequence needs a token"):
        model(packed, cu_seqlens=torch.tensor([0, 13, 13, 61]))
