"""A ``margin`` column in a reward model's preference pairs (TRL's RewardTrainer): the loss is
-logsigmoid(r_chosen - r_rejected - margin), in training, validation and retnet-eval; the metrics (accuracy, margin)
stay TRL's, of the rewards alone; a margin that is not a number is refused naming the row."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retnet.train.config import ConfigError, RewardConfig
from retnet.train.reward import RewardData, reward_loss

from .test_preference import build, standard, toy, write_jsonl  # noqa: F401 - toy: the fixture


def test_reward_loss_subtracts_the_margin():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 3.0])
    margin = torch.tensor([0.5, 0.0, -2.0])
    torch.testing.assert_close(reward_loss(chosen, rejected, margin=margin),
                               -F.logsigmoid(chosen - rejected - margin))
    expected = -F.logsigmoid(chosen - rejected - margin) + 0.1 * (chosen + rejected) ** 2
    torch.testing.assert_close(reward_loss(chosen, rejected, 0.1, margin=margin), expected)


def _margin_rows(count: int = 8) -> list[dict]:
    return [{**standard(i), "margin": float(i % 4)} for i in range(count)]


def test_the_margin_column_is_kept_and_the_loss_subtracts_it(toy, tmp_path):  # noqa: F811
    """Each pair keeps its row's margin (train and validation, through the token cache); the reward data's loss of a
    batch is TRL's with it, its accuracy and margin metrics those of the rewards alone (TRL's)."""
    from retnet.model import RetNetForSequenceClassification

    rows = _margin_rows()
    data = build(toy, write_jsonl(tmp_path / "margins.jsonl", rows), val_fraction=0.25)
    for pairs in (data.train, data.val):
        assert pairs.margins is not None
        assert pairs.margins.tolist() == [rows[row]["margin"] for row in pairs.rows]
    torch.manual_seed(0)
    model = RetNetForSequenceClassification.from_pretrained(toy / "base", num_labels=1).eval()
    reward = RewardData.of(data, RewardConfig(enabled=True))
    reward.start(None, model, None, torch.device("cpu"), output_dir=tmp_path, checkpoint=None, progress=False,
                 barrier=lambda: None)
    for split, pairs in (("train", data.train), ("val", data.val)):
        ids = torch.arange(len(pairs)).numpy()
        batch = pairs.batch(ids)
        with torch.no_grad():
            losses, sums = reward._pair_loss(model, batch, split)
            chosen, rejected = model(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens).logits[:, 0].chunk(2)
        margin = torch.tensor(pairs.margins[ids], dtype=torch.float32)
        assert margin.abs().sum() > 0
        torch.testing.assert_close(losses, -F.logsigmoid(chosen - rejected - margin))
        torch.testing.assert_close(sums[:2], torch.stack([(chosen > rejected).float().sum(),
                                                          (chosen - rejected).sum()]))


def test_pairs_without_a_margin_column_have_none(toy):  # noqa: F811
    data = build(toy, toy / "standard.jsonl")
    assert data.train.margins is None and data.val.margins is None


@pytest.mark.parametrize(("value", "shown"), [(None, "row 5: holds NoneType None"), (math.inf, "row 5: holds float inf"),
                                              ("quoted", "row 0: holds str '0.0'")])
def test_a_margin_that_is_no_number_is_refused_naming_the_row(toy, tmp_path, value, shown):  # noqa: F811
    rows = _margin_rows()
    rows[5]["margin"] = value
    if value == "quoted":  # one JSON type per column: every row's margin a string
        rows = [{**row, "margin": str(row["margin"])} for row in rows]
    dataset = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError) as refused:
        build(toy, dataset)
    assert f"'margin' of {str(dataset)!r}, {shown}; expected a finite number" in str(refused.value)


def test_eval_loss_subtracts_the_margins():
    from retnet.train.evaluate_reward import reward_metrics

    rewards = torch.tensor([[1.0, 0.0], [0.5, 1.5], [2.0, -1.0]])
    margins = torch.tensor([0.5, -1.0, 3.0])
    chosen, rejected = rewards.double().unbind(1)
    plain = reward_metrics(rewards)
    got = reward_metrics(rewards, margins)
    assert got["loss"] == pytest.approx(-F.logsigmoid(chosen - rejected - margins.double()).mean().item())
    assert got["loss"] != pytest.approx(plain["loss"])
    assert {k: v for k, v in got.items() if k != "loss"} == {k: v for k, v in plain.items() if k != "loss"}


def test_retnet_eval_reads_the_margins_and_its_loss_subtracts_them(toy, tmp_path):  # noqa: F811
    from retnet.model import RetNetForSequenceClassification
    from retnet.train.evaluate_reward import evaluate_pairs, read_pairs, score_pairs

    from .test_preference import tokenizer_of

    rows = _margin_rows(5)
    pairs = read_pairs(str(write_jsonl(tmp_path / "margins.jsonl", rows)), tokenizer_of(toy),
                       cache_dir=tmp_path / "cache")
    assert pairs.margins.tolist() == [row["margin"] for row in rows]
    torch.manual_seed(0)
    model = RetNetForSequenceClassification.from_pretrained(toy / "base", num_labels=1).eval()
    chosen, rejected = score_pairs(model, pairs).double().unbind(1)
    margins = torch.tensor([row["margin"] for row in rows], dtype=torch.float64)
    loss = evaluate_pairs(model, pairs, batch_size=2).metrics["loss"]
    assert loss == pytest.approx(-F.logsigmoid(chosen - rejected - margins).mean().item(), abs=1e-6)


def test_cut_pairs_take_generates_list_of_eos_ids():
    """A model config's eos_token_id may be a list (generate's form): retnet-eval counts the cut pairs with it
    rather than failing on numpy's ambiguous truth value."""
    import numpy as np

    from retnet.train.preference import Pairs
    from retnet.train.reward import cut_pairs

    # pair 0 closed by EOS 9, pair 1's chosen cut before it
    pairs = Pairs(np.array([1, 2, 3, 9, 4, 9, 1, 2, 3, 4, 9], dtype=np.int64), np.array([[2, 2, 2], [1, 2, 2]]),
                  np.array([0, 1]))
    assert cut_pairs(pairs, 9) == 1
    assert cut_pairs(pairs, [9, 7]) == 1
    assert cut_pairs(pairs, [7]) == 2
