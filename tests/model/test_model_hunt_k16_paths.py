"""transformers parity of RetNetForCausalLM's forward keywords (hunt k16)."""

import pytest
import torch

from tests.model.conftest import make_model


@pytest.mark.parametrize("fused", [False, True])
def test_ignore_index_keyword_drops_those_labels(fused):
    # transformers' causal-LM loss takes ignore_index as a keyword; it was dropped here, the pad id counted
    model = make_model(fuse_linear_cross_entropy=fused).train()
    torch.manual_seed(1)
    ids = torch.randint(2, 101, (2, 9))
    labels = ids.clone()
    labels[0, :4] = 0
    labels[1, 6:] = 0
    expected = model(ids, labels=labels.masked_fill(labels == 0, -100)).loss
    got = model(ids, labels=labels, ignore_index=0).loss
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(model(ids, labels=labels).loss, expected)
    # −100 stays ignored alongside it, and shift_labels take it alike
    labels[1, 0] = -100
    torch.testing.assert_close(model(ids, labels=labels, ignore_index=0).loss,
                               model(ids, labels=labels.masked_fill(labels == 0, -100)).loss)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(ids, shift_labels=shifted, ignore_index=0).loss,
                               model(ids, labels=labels, ignore_index=0).loss)


def test_ignore_index_not_an_int_is_refused():
    model = make_model()
    ids = torch.randint(2, 101, (1, 5))
    with pytest.raises(ValueError, match="ignore_index"):
        model(ids, labels=ids, ignore_index=None)


@pytest.mark.parametrize("embeds", [False, True])
def test_unbatched_inputs_are_refused_by_name(embeds):
    # a [T] row was embedded to [T, d] and read as T rows of d tokens: an unpacking error deep in a layer
    model = make_model()
    ids = torch.randint(2, 101, (7,))
    inputs = {"inputs_embeds": model.get_input_embeddings()(ids)} if embeds else {"input_ids": ids}
    name = "inputs_embeds" if embeds else "input_ids"
    with pytest.raises(ValueError, match=rf"{name} must be \[B, T.*got shape \(7"):
        model(**inputs)
    with pytest.raises(ValueError, match=name):
        model.model(**inputs)


def test_trainer_label_smoothing_shifts_the_labels(tmp_path):
    # Trainer shifts the labels for label smoothing only for the causal LMs transformers' table names: RetNet's loss
    # compared each position's logits with its own token, teaching it to copy its input
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LabelSmoother

    model = make_model()
    torch.manual_seed(2)
    rows = [torch.randint(2, 101, (n,)) for n in (5, 9, 3, 7)]
    width = max(len(row) for row in rows)
    ids = torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in rows])
    mask = torch.stack([torch.arange(width) < len(row) for row in rows]).long()
    labels = ids.masked_fill(mask == 0, -100)
    dataset = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                             label_smoothing_factor=0.1)
    got = Trainer(model=model, args=args, eval_dataset=dataset).evaluate()["eval_loss"]
    with torch.no_grad():
        outputs = model(input_ids=ids, attention_mask=mask)
    expected = LabelSmoother(0.1)(outputs, labels, shift_labels=True).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_one_position_as_a_0dim_tensor_on_the_fused_head():
    # logits_to_keep=torch.tensor(t) gives [B, V] logits (transformers' indexing); the fused loss refused it with a
    # shape error while the plain head's ran
    plain = make_model().train()
    fused = make_model(fuse_linear_cross_entropy=True).train()
    ids = torch.randint(2, 101, (2, 9))
    expected = plain(ids, labels=ids, logits_to_keep=torch.tensor([3])).loss
    torch.testing.assert_close(plain(ids, labels=ids, logits_to_keep=torch.tensor(3)).loss, expected)
    torch.testing.assert_close(fused(ids, labels=ids, logits_to_keep=torch.tensor(3)).loss, expected)
    assert plain.eval()(ids, logits_to_keep=torch.tensor(3)).logits.shape == (2, 101)
