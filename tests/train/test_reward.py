"""Reward models (``reward.enabled = true``, TRL's RewardTrainer) on the preference pairs of test_preference: the
loss at step 1 by hand, the centering term, the backbone loaded from the LM export under a seeded head, a run
that learns the toy preference, the export as an AutoModelForSequenceClassification, exact resume, refusals."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.config import ConfigError, build_config, load_config, reward_changes
from retnet.train.reward import METRICS, reward_loss, sequence_rewards

from .conftest import metrics
from .test_preference import (  # noqa: F401 - toy: the fixture
    assert_records_match,
    build,
    dpo_args,
    question,
    tokenizer_of,
    toy,
)


def reward_args(toy, out, **overrides) -> list[str]:  # noqa: F811 - toy: the fixture's value
    return dpo_args(toy, out, reward__enabled="true", **overrides)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):  # noqa: F811
    """An 8-step reward-model run (checkpoints at 4 and 8, exported): its output directory."""
    out = tmp_path_factory.mktemp("reward") / "run"
    assert main(reward_args(toy, out, checkpoint__export=True)) == 0
    return out


def first_step_rewards(trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards of step 1's global batch under the trainer's model as it starts."""
    data = trainer.data
    ids = data.block_rows(0, data.global_batch)
    with torch.no_grad():
        return sequence_rewards(trainer.raw_model, data.train.batch(ids)).chunk(2)


def test_step_one_is_trls_loss_of_the_export_backbone_under_a_seeded_head(toy, tmp_path):  # noqa: F811
    """The classifier starts from the LM export's backbone (every weight but ``score``), the head drawn from the
    seed (two runs alike); step 1's loss is -logsigmoid(r_c - r_r) of the first batch computed by hand, and with
    reward.center_rewards_coefficient c that plus c·mean((r_c + r_r)²); the metrics are those rewards'."""
    from transformers import AutoModelForCausalLM

    from retnet.model import RetNetForSequenceClassification
    from retnet.train.trainer import Trainer

    base = AutoModelForCausalLM.from_pretrained(toy / "base").state_dict()
    losses, scores = {}, []
    for coefficient in (0.0, 0.5):
        out = tmp_path / f"c{coefficient}"
        args = reward_args(toy, out, train__steps=1, train__eval_interval=0, checkpoint__interval=0,
                           reward__center_rewards_coefficient=coefficient)
        trainer = Trainer(load_config("tiny", args[2:]))
        try:
            model = trainer.raw_model
            assert isinstance(model, RetNetForSequenceClassification) and model.config.num_labels == 1
            state = model.state_dict()
            assert {k for k in state if not k.startswith("model.")} == {"score.weight"}
            for key, value in state.items():
                if key.startswith("model."):
                    assert torch.equal(value, base[key]), key
            scores.append(state["score.weight"].clone())
            chosen, rejected = first_step_rewards(trainer)
            trainer.train()
        finally:
            trainer.close()
        record = metrics(out)[0]
        losses[coefficient] = record["loss"]
        by_hand = -F.logsigmoid(chosen - rejected).mean() + coefficient * ((chosen + rejected) ** 2).mean()
        assert record["loss"] == pytest.approx(by_hand.item(), rel=1e-5, abs=1e-6)
        assert record["rewards/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5, abs=1e-6)
        assert record["rewards/rejected"] == pytest.approx(rejected.mean().item(), rel=1e-5, abs=1e-6)
        assert record["margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-5, abs=1e-6)
        assert record["accuracy"] == (chosen > rejected).float().mean().item()
    assert torch.equal(scores[0], scores[1])  # the same seed, the same head: the rewards above were the same
    assert losses[0.5] > losses[0.0]


def test_reward_loss_is_trls_formula():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 3.0])
    torch.testing.assert_close(reward_loss(chosen, rejected), -F.logsigmoid(chosen - rejected))
    expected = -F.logsigmoid(chosen - rejected).mean() + 0.1 * torch.mean((chosen + rejected) ** 2)
    torch.testing.assert_close(reward_loss(chosen, rejected, 0.1).mean(), expected)  # TRL's batch loss
    assert reward_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(math.log(2))


def test_a_run_learns_the_preference(trained):
    """The loss falls from about log 2, the chosen sequences score above the rejected ones (train and validation);
    the records carry the metrics; nothing like DPO's reference pass ran."""
    train, val = metrics(trained), metrics(trained, "val")
    assert METRICS == ("accuracy", "margin", "rewards/chosen", "rewards/rejected")
    assert set(METRICS) <= set(train[0]) and {f"val_{name}" for name in METRICS} <= set(val[0])
    last = train[-1]
    assert last["loss"] < train[0]["loss"] - 0.2, [r["loss"] for r in train]
    assert last["accuracy"] == 1.0 and last["margin"] > 0 and last["rewards/chosen"] > last["rewards/rejected"]
    assert [r["step"] for r in val] == [0, 4, 8]
    # from a random head's near-ties (a margin of ~0.001, as likely wrong as right) to a clear preference
    assert abs(val[0]["val_margin"]) < 0.05 and val[-1]["val_loss"] < val[0]["val_loss"] - 0.2
    assert val[-1]["val_accuracy"] == 1.0 and val[-1]["val_margin"] > 0.5
    assert not (trained / "reference_logps.pt").exists()  # no reference pass


def test_the_export_is_a_sequence_classifier_that_prefers_the_chosen_answer(trained, toy):  # noqa: F811
    """AutoModelForSequenceClassification loads the export; it scores every validation pair's chosen sequence
    above its rejected one, packed as the run batches them and as plain one-row inputs."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(trained / "export").eval()
    assert type(model).__name__ == "RetNetForSequenceClassification" and model.config.num_labels == 1
    data = build(toy, toy / "pairs.jsonl")
    with torch.no_grad():
        chosen, rejected = sequence_rewards(model, data.val.batch(np.arange(len(data.val)))).chunk(2)
    assert (chosen > rejected).all(), (chosen, rejected)
    # texts, one sequence a row, as a user of the export scores them (the last real token: EOS)
    tokenizer = tokenizer_of(toy)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": question(3)},
                                            {"role": "assistant", "content": f"Maybe, {word}"}], tokenize=False)
             for word in ("yes", "no")]
    ids = [[*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id] for text in texts]
    with torch.no_grad():
        scores = [model(input_ids=torch.tensor([row])).logits[0, 0].item() for row in ids]
    assert scores[0] > scores[1], scores


def test_a_resume_retraces_the_run_bit_for_bit(trained, toy, tmp_path, capsys):  # noqa: F811
    """From the step-4 checkpoint the train and validation records are the uninterrupted run's, bit for bit."""
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    capsys.readouterr()
    assert main(reward_args(toy, copy)) == 0
    assert "at step 4" in capsys.readouterr().err  # resumed from the step-4 checkpoint, not started over
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "mfu")}
                             for r in records]
    for kind in ("train", "val"):
        assert strip(metrics(copy, kind)) == strip(metrics(trained, kind))


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(trained, toy, tmp_path, run):  # noqa: F811
    """DDP, micro 2 × accum 1 × 2 ranks: the losses, rewards and validation records of the one-process run
    (micro 2 × accum 2): the metrics are global-batch means. (To 1e-4: the gradients are summed in another order,
    and at lr 1e-2 the steps' rounding differences grow to ~1e-5 of a margin of 1.6 by step 6.)"""
    ddp = tmp_path / "ddp"
    done = run(reward_args(toy, ddp), nproc=2)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "world 2 × micro 2 × accum 1" in done.stderr
    assert_records_match(trained, ddp, METRICS, tolerance=1e-4)


def test_a_resume_with_other_reward_settings_is_refused(trained, toy, tmp_path, capsys):  # noqa: F811
    """reward_changes names what differs (a checkpoint from before [reward] trained none); the CLI refuses a
    reward run's checkpoint resumed as DPO, before any data is read."""
    saved = build_config({"data": {"format": "preference", "dataset": "p.jsonl"}, "model": {"init_from": "b"}})
    now = build_config({"data": {"format": "preference", "dataset": "p.jsonl"}, "model": {"init_from": "b"},
                        "reward": {"enabled": True, "center_rewards_coefficient": 0.01}})
    assert reward_changes(saved.to_dict(), now) == ["reward.enabled: checkpoint False, now True",
                                                     "reward.center_rewards_coefficient: checkpoint 0.0, now 0.01"]
    old = {k: v for k, v in saved.to_dict().items() if k != "reward"}  # a checkpoint from before the section
    assert reward_changes(old, saved) == [] and reward_changes(old, now)[0].startswith("reward.enabled")
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    capsys.readouterr()
    assert main(dpo_args(toy, copy)) == EXIT_CONFIG  # the reward run resumed as DPO
    err = capsys.readouterr().err
    assert "other reward-model settings: reward.enabled: checkpoint True, now False" in err, err


VALID = {"data": {"format": "preference", "dataset": "p.jsonl"}, "model": {"init_from": "b"}}


@pytest.mark.parametrize(("sections", "message"), [
    ({"reward": {"enabled": True}}, r"data.format must be 'preference' with reward.enabled=true.*; got 'text'"),
    ({"reward": {"enabled": True}, "data": VALID["data"]},
     r"model.init_from must name the model to start from with reward.enabled=true.*; got None"),
    ({**VALID, "reward": {"enabled": True}, "dpo": {"beta": 0.2}},
     r"dpo.beta is set but reward.enabled=true trains a reward model, not DPO.*; got 0.2"),
    ({**VALID, "reward": {"enabled": True}, "lora": {"rank": 4}},
     r"lora.rank must be 0 with reward.enabled=true.*; got 4"),
    ({**VALID, "reward": {"center_rewards_coefficient": 0.1}},
     r"reward.center_rewards_coefficient is set but reward.enabled is false.*; got 0.1"),
    ({**VALID, "reward": {"enabled": True, "center_rewards_coefficient": float("nan")}},
     r"reward.center_rewards_coefficient must be >= 0; got nan"),
])
def test_bad_reward_configs_are_refused_by_name(sections, message):
    with pytest.raises(ConfigError, match=message):
        build_config(sections)


def test_cut_pairs_are_counted_and_logged(toy, caplog):  # noqa: F811
    """A completion cut to data.seq_len loses its EOS and is scored at its last kept token: such pairs are
    counted (a warning names how many), pairs that fit are not."""
    from retnet.train.config import RewardConfig
    from retnet.train.reward import RewardData, cut_pairs

    whole = build(toy, toy / "pairs.jsonl")
    eos = whole.tokenizer.eos_token_id
    assert cut_pairs(whole.train, eos) == 0 and cut_pairs(whole.val, eos) == 0
    longest = int(max(whole.train.lengths[:, 1:].max(), whole.val.lengths[:, 1:].max()))
    # prompts keep 8 tokens; the room after them drops the longest completions' EOS
    cut = build(toy, toy / "pairs.jsonl", seq_len=8 + longest - 1, max_prompt_length=8)
    counted = cut_pairs(cut.train, eos) + cut_pairs(cut.val, eos)
    assert counted > 0
    with caplog.at_level("WARNING", logger="retnet.train.reward"):
        RewardData.of(cut, RewardConfig(enabled=True))
    assert f"{counted} of {len(cut.train) + len(cut.val)} pairs were cut" in caplog.text


def test_the_export_has_the_tokenizers_pad_id_and_scores_a_padded_batch_from_ids_alone(toy, tmp_path):  # noqa: F811
    """An init_from model whose config has no pad_token_id exports a reward model with its tokenizer's, so a
    batch right-padded by that tokenizer is scored from input_ids alone, each row as when scored alone."""
    import json

    from transformers import AutoModelForSequenceClassification

    base = tmp_path / "base"
    shutil.copytree(toy / "base", base)
    config = json.loads((base / "config.json").read_text())
    config["pad_token_id"] = None
    (base / "config.json").write_text(json.dumps(config))
    tokenizer = tokenizer_of(toy)
    assert tokenizer.pad_token_id is not None
    out = tmp_path / "run"
    assert main(reward_args(toy, out, model__init_from=base, train__steps=2, train__eval_interval=0,
                            checkpoint__export=True)) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out / "export").eval()
    assert model.config.pad_token_id == tokenizer.pad_token_id
    texts = ["a short one", "a longer text to be scored than the first"]
    ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    width = max(map(len, ids))
    batch = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    with torch.no_grad():
        together = model(input_ids=batch).logits[:, 0]
        alone = torch.cat([model(input_ids=torch.tensor([row])).logits[:, 0] for row in ids])
    assert torch.allclose(together, alone, atol=1e-5)


def test_a_reward_model_counts_no_vocabulary_projection_in_its_flops():
    from retnet.model import RetNetConfig
    from retnet.train.flops import flops_per_token

    config = RetNetConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
    assert flops_per_token(config, 128) - flops_per_token(config, 128, output_head=False) == 6 * 1000 * 64
