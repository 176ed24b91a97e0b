"""Reward models (``reward.enabled = true``, TRL's RewardTrainer) on the preference pairs of test_preference: the
loss at step 1 by hand, the centering term, the backbone loaded from the LM export under a seeded head, a run
that learns the toy preference, the export as an AutoModelForSequenceClassification, exact resume, refusals; LoRA
and DoRA reward models: only the adapters and the score head train, checkpoints hold both, exact resume (one
process and FSDP), the merged export and the adapter score as the trained model."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.config import ConfigError, build_config, load_config, reward_changes
from retnet.train.reward import METRICS, reward_loss, sequence_rewards

from .conftest import metrics, timeless, train_fsdp_in_process
from .test_preference import (  # noqa: F401 - toy: the fixture
    build,
    dpo_args,
    question,
    tokenizer_of,
    toy,
)


def reward_args(toy, out, **overrides) -> list[str]:  # noqa: F811 - toy: the fixture's value
    return dpo_args(toy, out, reward__enabled="true", **overrides)


def train_reward(toy, out):  # noqa: F811 - toy: the fixture's value
    """An 8-step reward-model run (checkpoints at 4 and 8, exported) in this process: its output directory
    ``out``."""
    assert main(reward_args(toy, out, checkpoint__export=True)) == 0
    return out


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):  # noqa: F811
    """``train_reward``'s run: its output directory."""
    return train_reward(toy, tmp_path_factory.mktemp("reward") / "run")


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
    for kind in ("train", "val"):
        assert timeless(metrics(copy, kind)) == timeless(metrics(trained, kind))


# test_two_gloo_ranks_match_one_process (DDP on two gloo ranks against the one-process run) is in
# test_two_ranks_match_one_process.py (TestReward): its run shares one torchrun launch with other modules' 2-rank runs.


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
    ({**VALID, "reward": {"enabled": True}, "lora": {"rank": 4, "target_modules": ["q_proj", "score"]}},
     r"lora.target_modules must name Linear modules of the decoder layers.*score head is no LoRA target, it "
     r"trains in full.*; got \['q_proj', 'score'\]"),
    ({**VALID, "reward": {"center_rewards_coefficient": 0.1}},
     r"reward.center_rewards_coefficient is set but reward.enabled is false.*; got 0.1"),
    ({**VALID, "reward": {"enabled": True, "center_rewards_coefficient": float("nan")}},
     r"reward.center_rewards_coefficient must be >= 0 and finite; got nan"),
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


# -- LoRA and DoRA reward models: adapters on the frozen backbone, the new score head trained in full ------------------
LORA = {"lora__rank": 4, "lora__alpha": 8, "optim__weight_decay": 0.0, "optim__lr": 2e-2}


def _lora_reward_run(out, toy, **overrides):  # noqa: F811 - toy: the fixture's value
    """A LoRA reward run in this process, exported: (output directory, arguments, the trained model in eval mode,
    the trainer's FLOPs per token, its parameter counts (all, trainable), its start-up log)."""
    import logging

    from retnet.train.trainer import Trainer

    args = reward_args(toy, out, checkpoint__export=True, **{**LORA, **overrides})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("retnet").addHandler(handler)
    try:
        trainer = Trainer(load_config("tiny", args[2:]))
        try:
            trainer.train()
        finally:
            trainer.close()
    finally:
        logging.getLogger("retnet").removeHandler(handler)
    log = "\n".join(record.getMessage() for record in records)
    return out, args, trainer.raw_model.eval(), trainer.flops_per_token, (trainer.n_params, trainer.n_trainable), log


@pytest.fixture(scope="module")
def lora_trained(toy, tmp_path_factory):  # noqa: F811
    """An 8-step LoRA reward run (checkpoints at 4 and 8, evaluations at 0, 4, 8, exported)."""
    return _lora_reward_run(tmp_path_factory.mktemp("reward-lora") / "run", toy)


def _sequences(toy):  # noqa: F811
    """[N, T] ids and their attention mask: chosen and rejected texts of three questions, right-padded, EOS ended."""
    tokenizer = tokenizer_of(toy)
    rows = []
    for i in range(3):
        for word in ("yes", "no"):
            text = tokenizer.apply_chat_template([{"role": "user", "content": question(i)},
                                                  {"role": "assistant", "content": f"Maybe, {word}"}], tokenize=False)
            rows.append([*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id])
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return ids, mask


def _assert_export_scores_as(model, export, toy):  # noqa: F811
    """``export`` loads as a one-label AutoModelForSequenceClassification without LoRA weights whose scores are the
    trained ``model``'s (adapters and head, before the merge) to 1e-5; so does ``export/adapter`` (with the head)
    loaded by peft onto the base causal LM read as a classifier."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    ids, mask = _sequences(toy)
    merged = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert type(merged).__name__ == "RetNetForSequenceClassification" and merged.config.num_labels == 1
    assert merged.config.architectures == ["RetNetForSequenceClassification"]
    assert merged.config.pad_token_id == tokenizer_of(toy).pad_token_id
    assert set(merged.state_dict()) == {k for k in AutoModelForSequenceClassification.from_config(merged.config)
                                        .state_dict()}  # no lora_*, no modules_to_save copies
    assert (export / "tokenizer.json").is_file()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)  # the pad id
        base = AutoModelForSequenceClassification.from_pretrained(toy / "base", num_labels=1).eval()
        adapter = PeftModel.from_pretrained(base, export / "adapter").eval()
        torch.testing.assert_close(adapter(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
    assert expected.shape == (len(ids), 1) and torch.isfinite(expected).all()


def test_lora_trains_only_the_adapters_and_the_score_head(lora_trained, toy):  # noqa: F811
    """The trainable parameters are lora_A/lora_B and peft's copy of ``score`` (its original stays the seeded
    init); the backbone is init_from's, bit for bit, after training; the loss falls; the log counts them; the MFU
    counts 4·N of the frozen backbone (no vocabulary projection) and 6· the trained parameters."""
    from safetensors.torch import load_file

    from retnet.train.flops import flops_per_token

    out, _, model, flops, (n_params, n_trainable), log = lora_trained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in model.state_dict() if ".lora_A." in k or ".lora_B." in k} | {
        "score.modules_to_save.default.weight"}
    state = model.state_dict()
    base = load_file(toy / "base" / "model.safetensors")
    backbone = {k.replace(".base_layer.", "."): v for k, v in state.items()
                if k.startswith("model.") and ".lora_" not in k}
    assert set(backbone) == {k for k in base if k.startswith("model.")}
    for key, value in backbone.items():
        assert torch.equal(value, base[key]), key
    assert not torch.equal(state["score.modules_to_save.default.weight"], state["score.original_module.weight"])
    losses = [r["loss"] for r in metrics(out)]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.1, losses
    assert n_trainable == sum(model.get_parameter(name).numel() for name in trainable)
    assert f"{n_trainable / 1e6:.3f}M" in log and "LoRA rank 4 on" in log and "and the score head" in log
    assert flops == flops_per_token(model.config, 32, n_trainable, output_head=False)
    assert n_params > n_trainable


def test_lora_checkpoints_hold_the_adapters_and_the_head(lora_trained):
    from retnet.train.checkpoint import list_checkpoints, load_checkpoint

    out, _, model, *_ = lora_trained
    saved = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved["model"]) == trainable and "score.modules_to_save.default.weight" in trainable
    assert len(saved["optimizer"]["state"]) == len(trainable) and saved["trainer"]["lora_base"]["sha256"]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
def test_the_lora_export_is_the_merged_classifier_and_the_adapter_with_the_head(lora_trained, toy):  # noqa: F811
    import json

    out, _, model, *_ = lora_trained
    _assert_export_scores_as(model, out / "export", toy)
    config = json.loads((out / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert config["base_model_name_or_path"] == str((toy / "base").resolve())


def test_a_lora_resume_retraces_the_run_bit_for_bit(lora_trained, toy, tmp_path, capsys):  # noqa: F811
    """From the step-4 checkpoint (adapters and head over init_from's weights again) the train and validation
    records are the uninterrupted run's, bit for bit."""
    out, args, *_ = lora_trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    args = [a if not a.startswith("--train.output_dir=") else f"--train.output_dir={copy}" for a in args]
    capsys.readouterr()
    assert main([*args, "--checkpoint.export=false"]) == 0
    assert "at step 4" in capsys.readouterr().err
    for kind in ("train", "val"):
        assert timeless(metrics(copy, kind)) == timeless(metrics(out, kind))
    assert [r["step"] for r in metrics(copy)] == list(range(1, 9))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
def test_a_dora_reward_model_trains_the_magnitudes_and_exports_merged(toy, tmp_path):  # noqa: F811
    """lora.use_dora: the magnitudes train too, and the merged export (peft folds them in) scores as the model."""
    out, _, model, *_ = _lora_reward_run(tmp_path / "dora", toy, lora__use_dora="true",
                                         lora__target_modules="q_proj,v_proj", train__steps=2,
                                         train__eval_interval=0, checkpoint__interval=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".lora_magnitude_vector." in n} == {
        f"model.layers.{i}.retention.{m}.lora_magnitude_vector.default.weight"
        for i in range(2) for m in ("q_proj", "v_proj")}
    assert "score.modules_to_save.default.weight" in trainable
    _assert_export_scores_as(model, out / "export", toy)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
def test_a_lora_checkpoint_resumes_under_fsdp(lora_trained, toy, tmp_path):  # noqa: F811
    """FSDP2 (fully_shard over the frozen backbone, the adapters and peft's score copy) in this process, a gloo
    group of one rank: the one-process step-4 checkpoint loads by name, the losses retrace the run, and the export
    gathered from the shards is the one-process run's merged classifier."""
    from safetensors.torch import load_file

    out, args, *_ = lora_trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    args = [a if not a.startswith("--train.output_dir=") else f"--train.output_dir={copy}" for a in args]
    train_fsdp_in_process(args[2:], resumed_step=4)
    losses = {r["step"]: r["loss"] for r in metrics(out)}
    again = {r["step"]: r["loss"] for r in metrics(copy)}
    assert [again[s] for s in range(5, 9)] == pytest.approx([losses[s] for s in range(5, 9)], rel=1e-6)
    merged, expected = load_file(copy / "export" / "model.safetensors"), load_file(out / "export" / "model.safetensors")
    assert merged.keys() == expected.keys() and "score.weight" in merged
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)


# -- retnet-eval of a reward export: accuracy and margins on preference pairs ------------------------------------------
def _eval(args: list, capsys) -> tuple[int, str, str]:
    """``retnet-eval`` in this process: (exit status, stdout, stderr)."""
    from retnet.train.evaluate import main as eval_main

    capsys.readouterr()
    code = eval_main([*map(str, args), "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _eval_record(trained, toy, dataset, capsys, *extra) -> dict:  # noqa: F811 - toy: the fixture's value
    code, out, err = _eval(["--model", trained / "export", "--dataset", dataset, "--cache-dir", toy / "cache",
                            "--json", *extra], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_eval_of_the_export_is_each_pair_scored_alone(trained, toy, capsys):  # noqa: F811
    """retnet-eval on the reward export (standard rows): accuracy, margin and the mean rewards are those of each
    pair's chosen and rejected sequences (prompt, completion, EOS, encoded apart) scored one at a time, for
    --batch-size 1 and 3 alike; --json prints one record with the trainer's metric names; the text line too."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(trained / "export").eval()
    tokenizer = tokenizer_of(toy)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    rewards = []
    for line in (toy / "standard.jsonl").read_text().splitlines():
        row = json.loads(line)
        ids = [[*encode(row["prompt"]), *encode(row[side]), tokenizer.eos_token_id] for side in ("chosen", "rejected")]
        with torch.no_grad():
            rewards.append([model(input_ids=torch.tensor([seq])).logits[0, 0].item() for seq in ids])
    chosen, rejected = torch.tensor(rewards, dtype=torch.float64).unbind(1)
    expected = {"accuracy": (chosen > rejected).double().mean().item(), "margin": (chosen - rejected).mean().item(),
                "rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                "loss": -F.logsigmoid(chosen - rejected).mean().item()}
    records = [_eval_record(trained, toy, toy / "standard.jsonl", capsys, "--batch-size", batch) for batch in (1, 3)]
    for record in records:
        assert record["pairs"] == len(rewards)
        for name, value in expected.items():
            assert record[name] == pytest.approx(value, abs=1e-5), name
    scores = (*METRICS, "loss")  # alike up to the packed row's rounding (covered by the 1e-5 above)
    apart = lambda record: {k: v for k, v in record.items() if k not in (*scores, "batch_size", "seconds",
                                                                         "pairs_per_second")}
    assert apart(records[0]) == apart(records[1])
    assert [records[0][name] for name in scores] == pytest.approx([records[1][name] for name in scores], abs=1e-6)
    assert set(records[1]) == {"model", "dataset", "name", "split", "max_documents", "pairs", *METRICS, "loss", "cut",
                               "seq_len", "max_prompt_length", "pairs_per_second", "seconds", "batch_size", "device",
                               "dtype", "quantization"}
    assert records[1]["batch_size"] == 3 and records[1]["cut"] == 0 and records[1]["seq_len"] is None
    assert records[1]["quantization"] == "none"
    assert records[1]["device"] == "cpu" and records[1]["dtype"] == "float32"
    code, out, err = _eval(["--model", trained / "export", "--dataset", toy / "standard.jsonl", "--cache-dir",
                            toy / "cache", "--max-documents", 5], capsys)
    assert code == 0, err
    assert out.startswith("5 pairs: accuracy ") and "margin" in out and "rewards/rejected" in out


def test_eval_of_the_validation_pairs_is_the_trainers_last_validation_record(trained, toy, tmp_path, capsys):  # noqa: F811
    """The run's validation pairs (its split is seeded: split_documents of the rows), written out and scored by
    retnet-eval with the run's seq_len, give the trainer's last val_* record (conversational rows: the chat
    template as training renders it)."""
    from retnet.train.data import split_documents

    lines = (toy / "pairs.jsonl").read_text().splitlines()
    _, val = split_documents(lines, 0.1)
    held_out = tmp_path / "val.jsonl"
    held_out.write_text("".join(line + "\n" for line in val))
    last = metrics(trained, "val")[-1]
    record = _eval_record(trained, toy, held_out, capsys, "--batch-size", 2, "--seq-len", 32)
    assert record["pairs"] == len(val) and record["seq_len"] == 32
    for name in (*METRICS, "loss"):
        assert record[name] == pytest.approx(last[f"val_{name}"], abs=1e-5), name


@pytest.mark.parametrize(("extra", "message"), [
    (["--position-edges", "128"], "--position-edges 128 means nothing for --model"),
    (["--segment-tokens", "64"], "--segment-tokens 64 means nothing for --model"),
    (["--dataset", "{text}"], "--dataset '{text}' has no ['prompt', 'chosen', 'rejected'] column(s)"),
    (["--dataset", "stdlib"], "--dataset must hold preference pairs"),
    (["--seq-len", "8", "--max-prompt-length", "8"], "--max-prompt-length must be < --seq-len (8)"),
])
def test_eval_refuses_what_a_reward_model_cannot_be_scored_on(trained, toy, tmp_path, capsys, extra,  # noqa: F811
                                                              message):
    from retnet.train.evaluate import EXIT_USAGE

    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "a document"}\n{"text": "another"}\n')
    extra = [str(text) if value == "{text}" else value for value in extra]
    message = message.replace("{text}", str(text))
    code, out, err = _eval(["--model", trained / "export", "--dataset", toy / "pairs.jsonl", "--cache-dir",
                            toy / "cache", *extra], capsys)
    assert code == EXIT_USAGE and not out
    assert message in err and "data." not in err, err


def test_eval_refuses_a_classifier_of_several_labels_and_a_causal_lms_pair_options(trained, toy, tmp_path,  # noqa: F811
                                                                                   capsys):
    from retnet.train.evaluate import EXIT_USAGE

    several = tmp_path / "classifier"
    shutil.copytree(trained / "export", several)
    config = json.loads((several / "config.json").read_text())
    config.update(id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
    (several / "config.json").write_text(json.dumps(config))
    code, _, err = _eval(["--model", several, "--dataset", toy / "pairs.jsonl"], capsys)
    assert code == EXIT_USAGE
    assert "is a RetNetForSequenceClassification with 2 labels, not a reward model" in err, err
    code, _, err = _eval(["--model", toy / "base", "--dataset", toy / "pairs.jsonl", "--seq-len", 32], capsys)
    assert code == EXIT_USAGE and "--seq-len 32 means nothing for --model" in err and "a causal LM" in err, err
