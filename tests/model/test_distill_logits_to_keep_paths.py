"""``RetNetForCausalLM(labels=..., distill=..., logits_to_keep=...)``: the teacher's hidden states, given for every
input token, are cut to the student's kept positions (the loss was refused as covering other tokens)."""

from __future__ import annotations

import pytest
import torch

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.model.distillation import Distillation

T = 12


@pytest.fixture(scope="module")
def models():
    config = RetNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, chunk_size=16)
    torch.manual_seed(0)
    student, teacher = RetNetForCausalLM(config).train(), RetNetForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, T))
    with torch.no_grad():
        hidden = teacher.model(input_ids=ids).last_hidden_state
    return student, teacher, ids, hidden


def _loss(models, labels, hidden=None, **kwargs):
    student, teacher, ids, states = models
    distill = Distillation(states if hidden is None else hidden, teacher.lm_head.weight, temperature=2.0, alpha=0.7)
    return student(input_ids=ids, labels=labels, distill=distill, **kwargs).loss, distill.parts


@pytest.mark.parametrize("keep", [4, torch.tensor([1, 4, 7, 10])], ids=["last", "positions"])
def test_the_teacher_states_are_cut_as_the_students(models, keep):
    ids = models[2]
    kept = range(T - keep, T) if isinstance(keep, int) else keep.tolist()
    # the whole forward's loss over the targets of the kept positions alone (position t predicts label t + 1)
    masked = torch.full_like(ids, -100)
    targets = [t + 1 for t in kept if t + 1 < T]
    masked[:, targets] = ids[:, targets]
    loss, parts = _loss(models, ids, logits_to_keep=keep)
    whole, whole_parts = _loss(models, masked)
    torch.testing.assert_close(loss, whole)
    torch.testing.assert_close(parts, whole_parts)
    assert parts[0] > 0
    # states given already cut to the kept positions are taken as they are
    positions = list(kept)
    precut, precut_parts = _loss(models, ids, hidden=models[3][:, positions], logits_to_keep=keep)
    torch.testing.assert_close(precut, whole)
    torch.testing.assert_close(precut_parts, whole_parts)


def test_teacher_states_of_other_tokens_are_refused_naming_both(models):
    ids, hidden = models[2], models[3]
    with pytest.raises(ValueError, match="teacher's hidden states cover 11 tokens, the forward's input 12"):
        _loss(models, ids, hidden=hidden[:, 1:], logits_to_keep=4)
