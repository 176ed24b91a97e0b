"""KTO on unpaired binary feedback (``data.format = "unpaired"``): the loss against TRL's formulas, the KL
completions, a run that learns from 0.5 and exports, an exact resume against the saved reference, the refusals."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.config import ConfigError, KtoConfig, build_config, kto_changes
from retnet.train.kto import KtoData, check_row, kl_order, kto_loss
from retnet.train.preference import REFERENCE_FILE, completion_logps

from .conftest import metrics, save_micro_base, timeless

THINGS = ["the sky", "a cat", "the sea", "a tree", "an apple", "the moon", "a dog", "the sun"]
ADJECTIVES = ["blue", "green", "red", "big", "small", "round", "loud", "soft"]
ROWS = 25  # 23 train rows: micro-batches of 2 leave a last KL chunk of one row
METRICS = ("rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "rewards/margins", "kl")


def question(i: int) -> str:
    return f"Is {THINGS[i % 8]} {ADJECTIVES[(i * 3) % 8]}?"


def conversational(i: int) -> dict:
    """The toy feedback: "Maybe, yes" is desirable, "Maybe, no" undesirable, alternating over the questions."""
    good = i % 2 == 0
    return {"prompt": [{"role": "user", "content": question(i)}],
            "completion": [{"role": "assistant", "content": f"Maybe, {'yes' if good else 'no'}"}], "label": good}


def standard(i: int) -> dict:
    good = i % 3 != 0
    return {"prompt": f"Q: {question(i)}\nA:", "completion": f" Maybe, {'yes' if good else 'no'} {i}", "label": good}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """rows.jsonl (conversational), standard.jsonl, and base/: a random-init micro RetNet with a BPE trained on
    the rows (the default chat template), saved as an export is (the model.init_from of every run here)."""
    from retnet.tokenization import train_byte_level_bpe
    from retnet.train.chat import render_default

    root = tmp_path_factory.mktemp("kto")
    rows = [conversational(i) for i in range(ROWS)]
    write_jsonl(root / "rows.jsonl", rows)
    write_jsonl(root / "standard.jsonl", [standard(i) for i in range(ROWS)])
    texts = [render_default(r["prompt"] + r["completion"]) for r in rows]
    texts += [s["prompt"] + s["completion"] for s in map(standard, range(ROWS))]
    save_micro_base(root / "base", train_byte_level_bpe(texts, vocab_size=300))
    return root


def kto_args(toy: Path, out: Path, **overrides) -> list[str]:
    """CLI arguments of an 8-step KTO run of the micro base on the toy rows (``section__key`` overrides)."""
    values = {
        "model.init_from": toy / "base", "data.format": "unpaired", "data.dataset": toy / "rows.jsonl",
        "data.seq_len": 32, "data.val_fraction": 0.1, "data.cache_dir": toy / "cache", "train.output_dir": out,
        "train.steps": 8, "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.eval_interval": 4,
        "train.eval_blocks": 8, "optim.lr": 1e-2, "optim.warmup_steps": 1, "checkpoint.interval": 4,
        "checkpoint.export": False, "logging.progress": False, "logging.tensorboard": False,
        "logging.log_interval": 1,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", "tiny", *[f"--{k}={v}" for k, v in values.items()]]


def build(toy: Path, dataset: Path, micro_batch: int = 2) -> KtoData:
    from retnet.train.config import DataConfig
    from retnet.train.data import build_data

    cfg = DataConfig(dataset=str(dataset), format="unpaired", seq_len=32, val_fraction=0.1,
                     cache_dir=str(toy / "cache"))
    return build_data(cfg, vocab_size=300, seed=0, micro_batch=micro_batch, global_batch=4, rank=0, local_rank=0,
                      world_size=1, tokenizer_dir=toy / "base", barrier=lambda: None)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """The 8-step run (checkpoints at 4 and 8, exported): its output directory."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(kto_args(toy, out, checkpoint__export=True)) == 0
    return out


# ----------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------
def trl_kto_loss(policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                 reference_rejected_logps, reference_KL_logps, *, beta, desirable_weight, undesirable_weight,
                 loss_type):
    """TRL's ``KTOTrainer.kto_loss`` (and ``get_batch_loss_metrics``' ``losses.nanmean()``), transcribed for one
    process (``gather_for_metrics`` of a scalar is the scalar)."""
    if loss_type == "kto":
        kl = (policy_KL_logps - reference_KL_logps).mean().detach()
        kl = kl.mean().clamp(min=0)
    else:
        kl = torch.zeros(1, dtype=policy_chosen_logps.dtype)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    elif loss_type == "apo_zero_unpaired":
        chosen_losses = 1 - F.sigmoid(beta * chosen_logratios)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    if loss_type == "kto":
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    elif loss_type == "apo_zero_unpaired":
        rejected_losses = F.sigmoid(beta * rejected_logratios)
    rejected_rewards = beta * rejected_logratios.detach()
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.nanmean(), chosen_rewards, rejected_rewards, kl


@pytest.mark.parametrize(("loss_type", "beta", "weights", "kl_shift"), [
    ("kto", 0.1, (1.0, 1.0), 0.0),
    ("kto", 0.7, (1.33, 0.5), 3.0),  # a positive KL estimate
    ("kto", 0.3, (1.0, 2.0), -3.0),  # a negative one, clamped at 0
    ("apo_zero_unpaired", 0.4, (0.8, 1.5), 0.0),
])
def test_the_loss_and_its_gradients_are_trls(loss_type, beta, weights, kl_shift):
    """In float64, :func:`kto_loss` with :meth:`KtoData._kl`'s estimate gives TRL's mean loss, rewards, KL and
    the gradients of the loss with respect to the policy's log-probs, for rows of both labels in any order."""
    generator = torch.Generator().manual_seed(0)
    rows = 9
    policy = (-torch.rand(rows, generator=generator, dtype=torch.float64) * 30).requires_grad_()
    reference = policy.detach() + torch.randn(rows, generator=generator, dtype=torch.float64) * 4
    policy_kl = (-torch.rand(rows, generator=generator, dtype=torch.float64) * 30).requires_grad_()
    reference_kl = policy_kl.detach() - kl_shift + torch.randn(rows, generator=generator, dtype=torch.float64)
    labels = torch.tensor([True, False, False, True, True, False, True, False, False])
    cfg = KtoConfig(beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1], loss_type=loss_type)

    kl = KtoData._kl(SimpleNamespace(group=None), policy_kl - reference_kl) if loss_type == "kto" else \
        torch.zeros((), dtype=torch.float64)
    losses, rewards = kto_loss(policy, reference, labels, kl, cfg)
    losses.mean().backward()
    ours = policy.grad.clone()
    policy.grad = None
    expected, chosen, rejected, trl_kl = trl_kto_loss(
        policy[labels], policy[~labels], policy_kl, reference[labels], reference[~labels], reference_kl, beta=beta,
        desirable_weight=weights[0], undesirable_weight=weights[1], loss_type=loss_type)
    expected.backward()
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours, policy.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rewards[labels], chosen, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rewards[~labels], rejected, rtol=1e-12, atol=1e-14)
    assert kl.item() == pytest.approx(trl_kl.item(), rel=1e-12, abs=1e-14)
    assert (kl.item() > 1) == (kl_shift > 0) and kl.item() >= 0
    assert policy_kl.grad is None  # the KL estimate is detached, as TRL's


def test_the_kl_completions_are_the_chunks_rotated(toy):
    """Each row's KL completion is the completion of the row before it in its chunk of micro_batch rows (the
    chunk's first row takes the last one's), its tokens as encoded after its own prompt; decoded, a row's
    completion is its text and the EOS; the labels are the rows'."""
    from transformers import AutoTokenizer

    assert kl_order(5, 2).tolist() == [1, 0, 3, 2, 4] and kl_order(6, 3).tolist() == [2, 0, 1, 5, 3, 4]
    tokenizer = AutoTokenizer.from_pretrained(toy / "base")
    rows = [standard(i) for i in range(ROWS)]
    for micro_batch in (2, 3):
        data = build(toy, toy / "standard.jsonl", micro_batch)
        for split, name in ((data.train, "train"), (data.val, "val")):
            order = kl_order(len(split), micro_batch)
            for index in range(len(split)):
                prompt, completion, other = split.parts(index)
                row = rows[split.rows[index]]
                assert tokenizer.decode(prompt) == row["prompt"]
                assert tokenizer.decode(completion) == row["completion"] + tokenizer.eos_token
                assert other.tolist() == split.parts(order[index])[1].tolist()
                assert bool(data.row_labels[name][index]) is row["label"]


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------
def test_a_run_starts_at_one_half_and_learns_the_feedback(trained, toy):
    """Step 1 and the step-0 evaluation see the policy equal to the reference: every row's loss is
    1 − σ(0) = 0.5, the rewards and the KL estimate 0; eight steps later the loss fell, the desirable completions'
    rewards rose above the undesirable ones', in validation too; the metrics have TRL's names; the export loads."""
    from transformers import AutoModelForCausalLM

    train, val = metrics(trained), metrics(trained, "val")
    first = train[0]
    assert first["loss"] == 0.5 and first["kl"] == 0.0
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert set(METRICS) <= set(first) and not {"rewards/accuracies", "count/chosen"} & set(first)
    assert val[0]["val_loss"] == 0.5 and val[0]["val_rewards/margins"] == 0.0
    assert train[-1]["loss"] < 0.45 and train[-1]["rewards/margins"] > 0.3 and train[-1]["kl"] > 0
    assert train[-1]["rewards/chosen"] > 0 > train[-1]["rewards/rejected"]
    assert [r["step"] for r in val] == [0, 4, 8] and val[-1]["val_loss"] < 0.45
    assert val[-1]["val_rewards/margins"] > 0.3 and {f"val_{name}" for name in METRICS} <= set(val[-1])
    AutoModelForCausalLM.from_pretrained(trained / "export")


def test_the_reference_holds_the_completions_and_the_kl_completions(trained, toy):
    """reference_logps.pt: per row, the base model's summed log-probs of its completion and its KL completion."""
    from retnet.model import RetNetForCausalLM

    reference = torch.load(trained / REFERENCE_FILE)
    data = build(toy, toy / "rows.jsonl")
    model = RetNetForCausalLM.from_pretrained(toy / "base").eval()
    ids = np.arange(len(data.train))
    with torch.no_grad():
        logps = completion_logps(model, data.train.batch(ids))
    assert reference["train"].shape == (23, 2) and reference["val"].shape == (2, 2)
    torch.testing.assert_close(reference["train"], torch.stack(logps.chunk(2), dim=1), rtol=1e-5, atol=1e-5)


def test_a_resume_retraces_the_run_without_recomputing_the_reference(trained, toy, tmp_path, monkeypatch, capsys):
    """From the step-4 checkpoint the records (losses, metrics, validation) are the uninterrupted run's bit for
    bit, with the saved reference; without that file the resume is refused, not recomputed."""
    import retnet.train.preference as preference

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")

    def refuse(*args, **kwargs):
        raise AssertionError("a resume recomputed the reference log-probs")

    monkeypatch.setattr(preference, "compute_reference", refuse)
    assert main(kto_args(toy, copy)) == 0
    for kind in ("train", "val"):
        assert timeless(metrics(copy, kind)) == timeless(metrics(trained, kind))
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    (copy / REFERENCE_FILE).unlink()
    capsys.readouterr()
    assert main(kto_args(toy, copy)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{REFERENCE_FILE}, the reference log-probs checkpoint" in err and "is missing" in err, err


def test_a_resume_with_another_objective_batch_or_labels_is_refused(trained, toy, tmp_path, capsys):
    """kto settings and train.micro_batch_size (the KL completions' chunk) are the checkpoint's; relabelled rows
    (the same tokens) are refused as other data."""
    saved = build_config({"data": {"format": "unpaired", "dataset": "u.jsonl"},
                          "model": {"init_from": "base"}}).to_dict()
    now = build_config({"data": {"format": "unpaired", "dataset": "u.jsonl"}, "model": {"init_from": "base"},
                        "kto": {"beta": 0.2, "loss_type": "apo_zero_unpaired"},
                        "train": {"micro_batch_size": 4, "global_batch_size": 8}})
    assert kto_changes(saved, now) == ["kto.beta: checkpoint 0.1, now 0.2",
                                       "kto.loss_type: checkpoint 'kto', now 'apo_zero_unpaired'",
                                       "train.micro_batch_size: checkpoint 8, now 4 (the chunk KTO's KL completions "
                                       "are rotated within)"]
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    capsys.readouterr()
    assert main(kto_args(toy, copy, kto__desirable_weight=1.2, train__steps=9)) == EXIT_CONFIG
    assert "another KTO objective: kto.desirable_weight: checkpoint 1.0, now 1.2" in capsys.readouterr().err
    assert main(kto_args(toy, copy, train__micro_batch_size=4, train__steps=9)) == EXIT_CONFIG
    assert "train.micro_batch_size: checkpoint 2, now 4" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "rows.jsonl", [conversational(i) for i in range(ROWS)])
    run = lambda steps: main(kto_args(toy, tmp_path / "run", data__dataset=data, train__steps=steps,
                                      train__eval_interval=0, checkpoint__interval=1))
    assert run(1) == 0
    write_jsonl(data, [{**row, "label": not row["label"]} for row in map(conversational, range(ROWS))])
    os.utime(data, (time.time() + 5, time.time() + 5))  # (the same size: a new cache key by the time alone)
    capsys.readouterr()
    assert run(2) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "changed since the reference log-probs were computed" in err and "Traceback" not in err, err


def test_a_resume_on_other_data_parallel_ranks_is_warned_of(toy, caplog):
    """The KL estimate spans the data-parallel ranks' micro-batches (TRL's gather): a resume on another number of
    them continues on another trajectory (measured: 2 gloo ranks and one process part at step 3), which is
    warned of; not without a KL term, nor on as many ranks."""
    saved = build(toy, toy / "rows.jsonl").state_dict()
    assert saved["kl_ranks"] == 1
    for kl_ranks, loss_type, warned in ((2, "kto", True), (1, "kto", False), (2, "apo_zero_unpaired", False)):
        data = build(toy, toy / "rows.jsonl")
        data.load_state_dict({**saved, "kl_ranks": kl_ranks})
        data.cfg = KtoConfig(loss_type=loss_type)
        caplog.clear()
        with caplog.at_level("WARNING", logger="retnet.train.kto"):
            data._warn_of_kl_ranks()
        assert ("resuming on 1 data-parallel rank(s) a run whose KL estimates each spanned 2 rank(s)'"
                in caplog.text) is warned, caplog.text


@pytest.mark.parametrize(("desirable", "undesirable", "expected"), [
    (0, 23, "all 23 training rows are undesirable (none desirable)"),
    (23, 0, "all 23 training rows are desirable (none undesirable)"),
    # TRL's ranges where both kinds are there (eq. 8: 5·1 / 10 · [1, 1.33], 10·1 / 5 / [1.33, 1])
    (10, 5, "10 desirable and 5 undesirable training rows, and the weights do not make up for the difference: set "
            "EITHER kto.desirable_weight in [0.5, 0.67] or kto.undesirable_weight in [1.5, 2.0]"),
])
def test_the_balance_warning_counts_the_rows_as_they_are(desirable, undesirable, expected, caplog):
    """A set of one kind is said to be so (TRL's max(count, 1) made the log claim "1 desirable and 22 undesirable"
    of 23 undesirable rows, with ranges for a weight of no row)."""
    labels = np.array([True] * desirable + [False] * undesirable)
    with caplog.at_level("WARNING", logger="retnet.train.kto"):
        KtoData._warn_of_weights(SimpleNamespace(row_labels={"train": labels}, cfg=KtoConfig()))
    assert expected in caplog.text and " 1 desirable" not in caplog.text and " 1 undesirable" not in caplog.text


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------
UNPAIRED = {"data": {"format": "unpaired", "dataset": "u.jsonl"}, "model": {"init_from": "b"}}


@pytest.mark.parametrize(("sections", "message"), [
    ({"data": {"format": "unpaired", "dataset": "u.jsonl"}}, r"model.init_from must name the model to tune with "
                                                             r"data.format 'unpaired'"),
    ({"data": {"format": "unpaired"}, "model": {"init_from": "b"}},
     r"data.dataset must hold unpaired prompt/completion/label rows with data.format 'unpaired'"),
    ({**UNPAIRED, "data": {**UNPAIRED["data"], "streaming": True}},
     r"data.streaming cannot be used with data.format 'unpaired'"),
    ({"data": {"format": "unpaired", "mixture": {"a": 1, "b": 2}}, "model": {"init_from": "b"}},
     r"data.mixture cannot be used with data.format 'unpaired'.*\['a', 'b'\]"),
    ({**UNPAIRED, "data": {**UNPAIRED["data"], "seq_len": 32, "max_prompt_length": 32}},
     r"data.max_prompt_length must be < data.seq_len \(32\)"),
    ({"kto": {"beta": 0.5}}, r"kto.beta is set but data.format is 'text'; KTO trains on data.format 'unpaired'"),
    ({"data": {"format": "preference", "dataset": "p.jsonl"}, "model": {"init_from": "b"},
      "kto": {"undesirable_weight": 2.0}}, r"kto.undesirable_weight is set but data.format is 'preference'"),
    ({**UNPAIRED, "dpo": {"beta": 0.5}}, r"dpo.beta is set but data.format is 'unpaired'"),
    ({**UNPAIRED, "kto": {"beta": 0.0}}, r"kto.beta must be > 0; got 0.0"),
    ({**UNPAIRED, "kto": {"desirable_weight": -1.0}}, r"kto.desirable_weight must be > 0; got -1.0"),
    ({**UNPAIRED, "kto": {"loss_type": "bco"}},
     r"kto.loss_type must be one of \('kto', 'apo_zero_unpaired'\).*; got 'bco'"),
    ({**UNPAIRED, "train": {"micro_batch_size": 1, "global_batch_size": 4}},
     r"train.micro_batch_size must be >= 2 with kto.loss_type 'kto'.*; got 1"),
    ({**UNPAIRED, "reward": {"enabled": True}}, r"data.format must be 'preference' with reward.enabled=true"),
])
def test_bad_kto_configs_are_refused_by_name(sections, message):
    with pytest.raises(ConfigError, match=message):
        build_config(sections)


def test_apo_zero_unpaired_takes_micro_batches_of_one():
    """No KL term, no other row needed: TRL's apo_zero_unpaired trains on per-device batches of one."""
    build_config({**UNPAIRED, "kto": {"loss_type": "apo_zero_unpaired"},
                  "train": {"micro_batch_size": 1, "global_batch_size": 4}})


@pytest.mark.parametrize(("values", "problem"), [
    (("Q?", " yes", 1), "'label' of 'u.jsonl', row 7: holds int 1; expected a boolean"),
    (("Q?", " yes", None), "'label' of 'u.jsonl', row 7: holds NoneType None"),
    (("Q?", None, True), "'completion' of 'u.jsonl', row 7: holds NoneType None; expected a string"),
    (("Q?", [{"role": "assistant", "content": "yes"}], True), "'completion' of 'u.jsonl', row 7: holds list"),
    (([{"role": "user", "content": "Q?"}], [], False), "'completion' of 'u.jsonl', row 7: is an empty list"),
    (([{"role": "user"}], [{"role": "assistant", "content": "y"}], True),
     "'prompt' of 'u.jsonl', row 7: message 0 has content None"),
])
def test_a_row_that_is_no_labelled_completion_is_refused_naming_it(values, problem):
    with pytest.raises(ConfigError) as refused:
        check_row("u.jsonl", 7, *values)
    assert problem in str(refused.value)


def test_bad_unpaired_data_is_refused_by_the_cli(toy, tmp_path, capsys):
    rows = [standard(i) for i in range(6)]
    rows[3]["label"] = "yes"
    mislabelled = write_jsonl(tmp_path / "mislabelled.jsonl", rows)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " b"}] * 4)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{**standard(i), "prompt": ""} for i in range(4)])
    cases = [
        (mislabelled, f"'label' of {str(mislabelled)!r}, row 3: holds str 'yes'; expected a boolean"),
        (pairs, "has no ['completion', 'label'] column(s)"),
        (pairs, "preference pairs (chosen/rejected) train with DPO, data.format 'preference'"),
        (empty, "its prompt encodes to no tokens: the first completion token would be predicted from nothing; "
                "give every row a prompt"),
    ]
    for dataset, problem in cases:
        assert main(kto_args(toy, tmp_path / "out", data__dataset=dataset)) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, err
