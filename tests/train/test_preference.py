"""Preference tuning (``data.format = "preference"``, DPO): the completion tokens, the summed log-probs, the loss
formulas, a run that learns a toy preference from log(2), exact resume against the saved reference, LoRA (the
reference is the base model), dropout off in the policy, and the refusals (two gloo ranks against one process: in
test_two_ranks_match_one_process.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.config import ConfigError, DataConfig, DpoConfig, build_config, data_changes, dpo_changes
from retnet.train.preference import (
    METRICS,
    REFERENCE_FILE,
    PairEncoder,
    check_pair,
    completion_logps,
    dpo_loss,
    pack,
)

from .conftest import metrics, save_micro_base, timeless

THINGS = ["the sky", "a cat", "the sea", "a tree", "an apple", "the moon", "a dog", "the sun"]
ADJECTIVES = ["blue", "green", "red", "big", "small", "round", "loud", "soft"]
PAIRS = 23  # odd: the 2-rank reference pass pads its second share


def question(i: int) -> str:
    return f"Is {THINGS[i % 8]} {ADJECTIVES[(i * 3) % 8]}?"


def conversational(i: int) -> dict:
    """The toy preference: the same answer but for its last word, "yes" chosen, "no" rejected."""
    answer = lambda word: [{"role": "assistant", "content": f"Maybe, {word}"}]
    return {"prompt": [{"role": "user", "content": question(i)}], "chosen": answer("yes"), "rejected": answer("no")}


def standard(i: int) -> dict:
    return {"prompt": f"Q: {question(i)}\nA:", "chosen": " Maybe, yes", "rejected": " Maybe, no"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """pairs.jsonl (conversational), standard.jsonl, and base/: a random-init micro RetNet with a BPE trained on
    the pairs (the default chat template), saved as an export is (the model.init_from of every run here)."""
    from retnet.tokenization import train_byte_level_bpe
    from retnet.train.chat import render_default

    root = tmp_path_factory.mktemp("preference")
    rows = [conversational(i) for i in range(PAIRS)]
    write_jsonl(root / "pairs.jsonl", rows)
    write_jsonl(root / "standard.jsonl", [standard(i) for i in range(PAIRS)])
    texts = [render_default(r["prompt"] + r[side]) for r in rows for side in ("chosen", "rejected")]
    texts += [s["prompt"] + s[side] for s in map(standard, range(PAIRS)) for side in ("chosen", "rejected")]
    tokenizer = train_byte_level_bpe(texts, vocab_size=300)
    save_micro_base(root / "base", tokenizer)
    return root


def dpo_args(toy: Path, out: Path, **overrides) -> list[str]:
    """CLI arguments of an 8-step DPO run of the micro base on the toy pairs (``section__key`` overrides)."""
    values = {
        "model.init_from": toy / "base", "data.format": "preference", "data.dataset": toy / "pairs.jsonl",
        "data.seq_len": 32, "data.val_fraction": 0.1, "data.cache_dir": toy / "cache", "train.output_dir": out,
        "train.steps": 8, "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.eval_interval": 4,
        "train.eval_blocks": 8, "optim.lr": 1e-2, "optim.warmup_steps": 1, "checkpoint.interval": 4,
        "checkpoint.export": False, "logging.progress": False, "logging.tensorboard": False,
        "logging.log_interval": 1,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", "tiny", *[f"--{k}={v}" for k, v in values.items()]]


def build(toy: Path, dataset: Path | str, **settings):
    from retnet.train.data import build_data

    values = dict(dataset=str(dataset), format="preference", seq_len=32, val_fraction=0.1,
                  cache_dir=str(toy / "cache"))
    values.update(settings)
    return build_data(DataConfig(**values), vocab_size=300, seed=0, micro_batch=2, global_batch=4, rank=0,
                      local_rank=0, world_size=1, tokenizer_dir=toy / "base", barrier=lambda: None)


def tokenizer_of(toy: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy / "base")


def train_dpo(toy: Path, out: Path) -> Path:
    """The 8-step run (checkpoints at 4 and 8, exported) in this process: its output directory ``out``."""
    assert main(dpo_args(toy, out, checkpoint__export=True)) == 0
    return out


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """``train_dpo``'s run: its output directory."""
    return train_dpo(toy, tmp_path_factory.mktemp("dpo") / "run")


# ----------------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["pairs.jsonl", "standard.jsonl"])
def test_the_completion_tokens_are_the_completion_and_eos(toy, dataset):
    """Decoded, each sequence's target tokens are exactly its completion (what the template adds after the prompt
    with the generation prompt, for conversations) and EOS; the positions kept predict them; chosen and rejected
    share the prompt's tokens."""
    tokenizer = tokenizer_of(toy)
    data = build(toy, toy / dataset)
    rows = [json.loads(line) for line in (toy / dataset).read_text().splitlines()]
    ids = np.arange(len(data.train))[:5]
    batch = data.train.batch(ids)
    eos = tokenizer.eos_token
    flat = batch.input_ids[0]
    assert torch.equal(flat[batch.keep + 1], batch.labels)
    for number, index in enumerate(ids):
        row = rows[data.train.rows[index]]
        for side, sequence in (("chosen", number), ("rejected", len(ids) + number)):
            completion = tokenizer.decode(batch.labels[batch.sequence == sequence])
            if dataset == "standard.jsonl":
                prompt, expected = row["prompt"], row[side] + eos
            else:
                prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
                expected = f"{row[side][0]['content']}{eos}"  # the template's EOS closes it, once
            assert completion == expected
            lo, hi = batch.cu_seqlens[sequence].item(), batch.cu_seqlens[sequence + 1].item()
            assert tokenizer.decode(flat[lo:hi]) == prompt + expected
            assert batch.lengths[sequence] == (batch.sequence == sequence).sum()
        starts = batch.cu_seqlens[[number, len(ids) + number]].tolist()
        length = batch.cu_seqlens[number + 1].item() - starts[0] - batch.lengths[number].item()
        assert torch.equal(flat[starts[0]:starts[0] + length], flat[starts[1]:starts[1] + length])


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_long_pairs_keep_the_prompts_end_then_cut_the_completions(toy, kind):
    """data.max_prompt_length: a longer prompt keeps its last tokens (TRL's keep_end: for a conversation, the
    generation prompt the completion follows), then each completion keeps its first tokens, as many as fit in
    data.seq_len; with 0 a prompt that fits is whole."""
    tokenizer = tokenizer_of(toy)
    text = " ".join(question(i) for i in range(6))
    if kind == "standard":
        pair, prompt = (text, " yes" * 30, " no" * 30), text
    else:
        pair = tuple(check_pair("x", 0, ([{"role": "user", "content": text}],
                                         [{"role": "assistant", "content": " yes" * 30}],
                                         [{"role": "assistant", "content": " no" * 30}])))
        prompt = tokenizer.apply_chat_template(pair[0], tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    cfg = DataConfig(dataset="x", format="preference", seq_len=24, max_prompt_length=10)
    p, c, r = PairEncoder(tokenizer, cfg).encode([(0, pair)]).parts(0)
    assert len(ids) > 10 and p.tolist() == ids[-10:]
    assert tokenizer.decode(p).endswith(prompt[-8:])  # the end, not the start, of the prompt
    completion = tokenizer.decode(c)
    assert len(c) == len(r) == 14 and completion.startswith(" yes yes") and tokenizer.eos_token not in completion
    whole = PairEncoder(tokenizer, DataConfig(dataset="x", format="preference", seq_len=len(ids) + 3))
    p, c, _ = whole.encode([(0, pair)]).parts(0)
    assert p.tolist() == ids and len(c) == 3
    short = PairEncoder(tokenizer, DataConfig(dataset="x", format="preference", seq_len=24)).encode(
        [(0, ("Q?", " yes", " no"))])
    assert short.parts(0)[1][-1] == tokenizer.eos_token_id  # EOS kept when it fits


def test_a_prefilled_prompt_is_continued(toy):
    """A conversational prompt ending with an assistant message is rendered open (continue_final_message, no
    generation prompt, as TRL does) and the completion continues that message: no second assistant header."""
    tokenizer = tokenizer_of(toy)
    user = {"role": "user", "content": question(2)}
    pair = check_pair("x", 0, ([user, {"role": "assistant", "content": "Maybe,"}],
                               [{"role": "assistant", "content": " yes"}], [{"role": "assistant", "content": " no"}]))
    encoder = PairEncoder(tokenizer, DataConfig(dataset="x", format="preference", seq_len=64))
    head, chosen, rejected = encoder.texts(0, pair)
    answered = lambda word: tokenizer.apply_chat_template([user, {"role": "assistant", "content": f"Maybe, {word}"}],
                                                          tokenize=False)
    assert head.endswith("Maybe,") and head.count("<|assistant|>") == 1
    assert head + chosen == answered("yes") and head + rejected == answered("no")
    assert (chosen, rejected) == (f" yes{tokenizer.eos_token}", f" no{tokenizer.eos_token}")
    _, c, r = encoder.encode([(0, pair)]).parts(0)
    eos = tokenizer.eos_token
    # the template closed each completion with the EOS: not a second one
    assert tokenizer.decode(c) == f" yes{eos}" and tokenizer.decode(r) == f" no{eos}"


# ----------------------------------------------------------------------------------------------------------
# Log-probs and the loss
# ----------------------------------------------------------------------------------------------------------
def test_summed_logps_equal_a_sequence_by_sequence_computation(toy):
    """The packed forward (one row, one segment per sequence, logits only where a completion token is predicted)
    gives each sequence's summed completion log-probs as a forward of that sequence alone does."""
    from retnet.model import RetNetForCausalLM

    model = RetNetForCausalLM.from_pretrained(toy / "base").eval()
    data = build(toy, toy / "standard.jsonl")
    ids = np.array([3, 0, 7])
    parts = [data.train.parts(i) for i in ids]
    with torch.no_grad():
        got = completion_logps(model, pack(parts, ids))
        expected = []
        for side in (1, 2):
            for prompt, *completions in parts:
                sequence = torch.from_numpy(np.concatenate([prompt, completions[side - 1]]))[None]
                logps = model(input_ids=sequence, use_cache=False).logits[0].float().log_softmax(-1)
                targets = torch.arange(len(prompt), sequence.shape[1])
                expected.append(logps[targets - 1, sequence[0, targets]].sum())
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_the_losses_are_the_papers_formulas():
    torch.manual_seed(0)
    policy, reference = -torch.rand(8) * 20, -torch.rand(8) * 20
    lengths = torch.tensor([3, 5, 2, 7, 4, 4, 6, 1])
    pc, pr, rc, rr = policy[:4], policy[4:], reference[:4], reference[4:]
    beta = 0.3
    margin = (pc - rc) - (pr - rr)
    losses, chosen, rejected = dpo_loss(policy, reference, lengths, DpoConfig(beta=beta))
    torch.testing.assert_close(losses, -torch.log(torch.sigmoid(beta * margin)))
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))
    smoothed, _, _ = dpo_loss(policy, reference, lengths, DpoConfig(beta=beta, label_smoothing=0.2))
    torch.testing.assert_close(smoothed, -0.8 * torch.log(torch.sigmoid(beta * margin))
                               - 0.2 * torch.log(torch.sigmoid(-beta * margin)))
    # IPO on length-averaged log-probs, as TRL's ipo: (h − 1/(2β))²
    lc, lr = lengths[:4], lengths[4:]
    averaged = (pc / lc - rc / lc) - (pr / lr - rr / lr)
    ipo, chosen, _ = dpo_loss(policy, reference, lengths, DpoConfig(beta=beta, loss_type="ipo"))
    torch.testing.assert_close(ipo, (averaged - 1 / (2 * beta)) ** 2)
    torch.testing.assert_close(chosen, beta * (pc - rc) / lc)
    # policy == reference: every pair's sigmoid loss is log 2, its rewards 0
    same, chosen, rejected = dpo_loss(reference, reference, lengths, DpoConfig(beta=beta))
    assert same.tolist() == pytest.approx([math.log(2)] * 4) and chosen.abs().sum() == rejected.abs().sum() == 0


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------
def test_a_run_starts_at_log_2_and_learns_the_preference(trained):
    """Step 1 and the step-0 evaluation see the policy equal to the reference: the loss is log 2 and the rewards
    0; eight steps later the loss fell and the chosen answers are preferred, in validation too."""
    train, val = metrics(trained), metrics(trained, "val")
    first = train[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(abs(first[name]) < 1e-6 for name in METRICS if name.startswith("rewards/"))
    assert val[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6) and val[0]["val_rewards/margins"] == 0
    last = train[-1]
    assert last["loss"] < first["loss"] - 0.2, [r["loss"] for r in train]
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 0.4
    assert last["rewards/chosen"] > last["rewards/rejected"]
    assert [r["step"] for r in val] == [0, 4, 8]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.2 and val[-1]["val_rewards/accuracies"] == 1.0
    assert {f"val_{name}" for name in METRICS} <= set(val[-1])
    assert (trained / REFERENCE_FILE).is_file()


def test_the_metrics_have_trls_names():
    assert METRICS == ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                       "logps/rejected")  # TRL's DPOTrainer's (get_batch_loss_metrics)


def test_the_export_loads_and_prefers_the_chosen_answer(trained, toy):
    """A plain save_pretrained model (what retnet-serve loads) that scores "yes" above "no" after a prompt."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_of(toy)
    model = AutoModelForCausalLM.from_pretrained(trained / "export").eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question(5)}], tokenize=False,
                                           add_generation_prompt=True)
    answers = [np.asarray([*tokenizer.encode(f"Maybe, {word}\n"), tokenizer.eos_token_id]) for word in ("yes", "no")]
    parts = [(np.asarray(tokenizer.encode(prompt)), *answers)]
    with torch.no_grad():
        chosen, rejected = completion_logps(model, pack(parts, np.zeros(1)))
    assert chosen > rejected + 1.0


def test_a_resume_retraces_the_run_without_recomputing_the_reference(trained, toy, tmp_path, monkeypatch,
                                                                     capsys):
    """From the step-4 checkpoint the records (losses, rewards, validation) are the uninterrupted run's bit for
    bit, with the saved reference; without that file the resume is refused, not recomputed."""
    import retnet.train.preference as preference

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")

    def refuse(*args, **kwargs):
        raise AssertionError("a resume recomputed the reference log-probs")

    monkeypatch.setattr(preference, "compute_reference", refuse)
    assert main(dpo_args(toy, copy)) == 0
    for kind in ("train", "val"):
        assert timeless(metrics(copy, kind)) == timeless(metrics(trained, kind))
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    (copy / REFERENCE_FILE).unlink()
    capsys.readouterr()
    assert main(dpo_args(toy, copy)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{REFERENCE_FILE}, the reference log-probs checkpoint" in err and "is missing" in err, err
    # a damaged file, garbage or a pickle of no weights, is refused the same way, not with an unpickling traceback
    torch.save({"key": "k", "train": torch.zeros(3, 2), "val": torch.zeros(1, 2), "other": Path("x")},
               tmp_path / "objects.pt")
    for damaged in (np.random.default_rng(0).bytes(256), (tmp_path / "objects.pt").read_bytes()):
        (copy / REFERENCE_FILE).write_bytes(damaged)
        assert main(dpo_args(toy, copy)) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert "is missing, unreadable or holds others" in err and "Traceback" not in err, err


def test_a_resume_on_other_pairs_is_refused(toy, tmp_path, capsys):
    """The reference file holds a content hash of the tokenized pairs: the same pairs rewritten (a new cache key)
    resume; other pairs under the same path (the same count) are refused, naming data.dataset."""
    data = tmp_path / "pairs.jsonl"
    shutil.copy(toy / "pairs.jsonl", data)
    out = tmp_path / "run"
    run = lambda steps: main(dpo_args(toy, out, data__dataset=data, train__steps=steps, train__eval_interval=0,
                                      checkpoint__interval=1))
    assert run(1) == 0
    data.write_text(data.read_text())
    os.utime(data, (time.time() + 5, time.time() + 5))
    assert run(2) == 0
    rows = [conversational(i) for i in range(PAIRS)]
    for row in rows:
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    write_jsonl(data, rows)
    capsys.readouterr()
    assert run(3) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"data.dataset {str(data)!r}: the pairs changed since the reference log-probs were computed" in err, err
    assert "21 train + 2 validation pairs" in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads descriptors' paths from /proc")
def test_the_reference_file_and_its_rename_reach_the_disk(tmp_path, monkeypatch):
    from retnet.train.preference import SavedReference, _write_reference

    synced, real = [], os.fsync

    def record(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    _write_reference(tmp_path / REFERENCE_FILE, SavedReference("k", "p", [torch.zeros(3, 2), torch.zeros(1, 2)]))
    assert synced[0].name.startswith(f".tmp-{REFERENCE_FILE}") and synced[-1] == tmp_path  # the file, then the rename
    assert [p.name for p in tmp_path.iterdir()] == [REFERENCE_FILE]


def test_the_policy_trains_without_the_init_from_models_dropout(toy, tmp_path, capsys):
    """TRL's disable_dropout: a model.init_from with dropout 0.3 trains without it, so step 1 is log 2 (the
    reference is computed in eval mode); model.dropout set explicitly wins. Both are logged."""
    base = tmp_path / "base"
    shutil.copytree(toy / "base", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dropout": 0.3}))
    one_step = dict(model__init_from=base, train__steps=1, train__eval_interval=0, checkpoint__interval=0)
    capsys.readouterr()
    assert main(dpo_args(toy, tmp_path / "off", **one_step)) == 0
    assert "DPO: dropout off in the policy (model.init_from's 0.3 -> 0" in capsys.readouterr().err
    first = metrics(tmp_path / "off")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0
    assert main(dpo_args(toy, tmp_path / "on", model__dropout=0.3, **one_step)) == 0
    assert "DPO: the policy trains with dropout 0.3, as model.dropout sets it" in capsys.readouterr().err
    assert abs(metrics(tmp_path / "on")[0]["loss"] - math.log(2)) > 1e-4


def test_abandoned_temp_dirs_of_a_killed_tokenization_are_removed(toy, tmp_path):
    cache = tmp_path / "cache"
    abandoned = cache / ".tmp-preferences-0123abcd-42-deadbeef"
    abandoned.mkdir(parents=True)
    (abandoned / "train.tokens.npy").write_bytes(b"\0" * 16)
    old = time.time() - 3 * 24 * 3600
    for path in (abandoned / "train.tokens.npy", abandoned):
        os.utime(path, (old, old))
    build(toy, toy / "standard.jsonl", cache_dir=str(cache))
    assert not abandoned.exists() and not list(cache.glob(".tmp-*"))


def test_a_resume_with_another_objective_or_data_is_refused(trained, toy, tmp_path, capsys):
    saved = build_config({"data": {"format": "preference", "dataset": "p.jsonl"},
                          "model": {"init_from": "base"}}).to_dict()
    now = build_config({"data": {"format": "preference", "dataset": "p.jsonl", "max_prompt_length": 8},
                        "model": {"init_from": "base"}, "dpo": {"beta": 0.2, "loss_type": "ipo"}})
    assert dpo_changes(saved, now) == ["dpo.beta: checkpoint 0.1, now 0.2",
                                       "dpo.loss_type: checkpoint 'sigmoid', now 'ipo'"]
    assert data_changes(saved, now, tokenizer_reused=True) == ["data.max_prompt_length: checkpoint 0, now 8"]
    chat = build_config({"data": {"format": "chat", "dataset": "p.jsonl"}})
    assert data_changes(saved, chat, tokenizer_reused=True) == ["data.format: checkpoint 'preference', now 'chat'"]
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    capsys.readouterr()
    assert main(dpo_args(toy, copy, dpo__label_smoothing=0.1)) == EXIT_CONFIG
    assert "another DPO objective: dpo.label_smoothing: checkpoint 0.0, now 0.1" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
def test_lora_dpo_against_the_base_model(toy, tmp_path):
    """With LoRA the reference is the base model (the adapters start at zero): the saved reference log-probs are
    the trained model's with its adapters disabled; the loss starts at log 2 and falls; the exported adapter
    loaded by peft onto the base computes the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from retnet.train.config import load_config
    from retnet.train.trainer import Trainer

    out = tmp_path / "lora"
    args = dpo_args(toy, out, train__steps=3, train__eval_interval=0, checkpoint__interval=0, checkpoint__export=True,
                    lora__rank=4, lora__alpha=8, optim__lr=3e-2, optim__weight_decay=0.0)
    trainer = Trainer(load_config("tiny", args[2:]))
    try:
        trainer.train()
        losses = [r["loss"] for r in metrics(out)]
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0] - 0.05, losses
        model, data = trainer.raw_model.eval(), trainer.data
        ids = np.arange(6)
        with torch.no_grad():
            trained = completion_logps(model, data.train.batch(ids))
            with trainer.peft_model.disable_adapter():
                base = completion_logps(model, data.train.batch(ids))
        reference = torch.load(out / REFERENCE_FILE)["train"][ids]
        torch.testing.assert_close(base, torch.cat([reference[:, 0], reference[:, 1]]), rtol=1e-5, atol=1e-5)
        assert (trained - base).abs().max() > 1e-3  # the adapters moved
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy / "base"),
                                           out / "export" / "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(completion_logps(loaded, data.train.batch(ids)), trained, rtol=1e-5, atol=1e-5)
    finally:
        trainer.close()


def test_ipo_starts_at_its_formulas_value(toy, tmp_path, capsys):
    """Policy == reference: IPO's loss is (0 − 1/(2β))², the settings reach the loss; logps/* are the
    length-averaged log-probs the IPO loss compares (as TRL logs them). Without a progress bar the evaluation
    prints its line as the text path's does."""
    out = tmp_path / "ipo"
    capsys.readouterr()
    # one step of every train pair (21): its logps are the means over the whole split, in any order
    assert main(dpo_args(toy, out, train__steps=1, train__eval_interval=0, checkpoint__interval=0,
                         train__global_batch_size=21, train__micro_batch_size=7, dpo__loss_type="ipo",
                         dpo__beta=0.25)) == 0
    assert "step 0: val loss 4.0000, rewards/accuracies 0.000, rewards/margins 0.0000" in capsys.readouterr().err
    first, val = metrics(out)[0], metrics(out, "val")[0]
    assert first["loss"] == pytest.approx(4.0, abs=1e-5)
    data, reference = build(toy, toy / "pairs.jsonl"), torch.load(out / REFERENCE_FILE)
    for split, record, prefix in ((data.train, first, ""), (data.val, val, "val_")):
        averaged = reference[prefix.rstrip("_") or "train"] / torch.from_numpy(np.array(split.lengths[:, 1:]))
        for column, side in enumerate(("chosen", "rejected")):
            assert record[f"{prefix}logps/{side}"] == pytest.approx(averaged[:, column].mean().item(), rel=1e-5)


def assert_records_match(expected: Path, got: Path, names, tolerance: float) -> None:
    """The train and validation records of run ``got`` are ``expected``'s: the loss and every metric of ``names``."""
    for kind, keys in (("train", ["loss", *names]), ("val", ["val_loss", *(f"val_{m}" for m in names)])):
        one, two = metrics(expected, kind), metrics(got, kind)
        assert len(one) == len(two) > 1
        for key in keys:
            assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=tolerance, abs=tolerance), key


# test_two_gloo_ranks_match_one_process (DDP on two gloo ranks against the one-process run) is in
# test_two_ranks_match_one_process.py (TestPreference): its run shares one torchrun launch with other modules' 2-rank
# runs.


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sections", "message"), [
    ({"data": {"format": "preference", "dataset": "p.jsonl"}}, r"model.init_from must name the model to tune"),
    ({"data": {"format": "preference"}, "model": {"init_from": "b"}}, r"data.dataset must hold preference pairs"),
    ({"data": {"format": "preference", "dataset": "p.jsonl", "streaming": True}, "model": {"init_from": "b"}},
     r"data.streaming cannot be used with data.format 'preference'"),
    ({"data": {"format": "preference", "mixture": {"a": 1, "b": 2}}, "model": {"init_from": "b"}},
     r"data.mixture cannot be used with data.format 'preference'.*\['a', 'b'\]"),
    ({"data": {"format": "preference", "dataset": "p.jsonl", "seq_len": 32, "max_prompt_length": 32},
      "model": {"init_from": "b"}}, r"data.max_prompt_length must be < data.seq_len \(32\).*; got 32"),
    ({"data": {"max_prompt_length": 8}}, r"data.max_prompt_length is set but data.format is 'text'"),
    ({"dpo": {"beta": 0.5}}, r"dpo.beta is set but data.format is 'text'"),
    ({"dpo": {"beta": 0.0}}, r"dpo.beta must be > 0; got 0.0"),
    ({"dpo": {"loss_type": "kto_pair"}},
     r"dpo.loss_type must be one of \('sigmoid', 'ipo', .*\) \(TRL's names; .*\); got 'kto_pair'"),
    ({"dpo": {"label_smoothing": 0.5}}, r"dpo.label_smoothing must be in \[0, 0.5\); got 0.5"),
    ({"dpo": {"label_smoothing": 0.1, "loss_type": "ipo"}}, r"dpo.label_smoothing applies to dpo.loss_type 'sigmoid'"),
])
def test_bad_preference_configs_are_refused_by_name(sections, message):
    with pytest.raises(ConfigError, match=message):
        build_config(sections)


@pytest.mark.parametrize(("values", "problem"), [
    (("Q?", " yes", None), "'rejected' of 'p.jsonl', row 7: holds NoneType None; expected a string"),
    (("Q?", [{"role": "assistant", "content": "yes"}], " no"), "'chosen' of 'p.jsonl', row 7: holds list"),
    (([{"role": "user", "content": "Q?"}], [], [{"role": "assistant", "content": "no"}]),
     "'chosen' of 'p.jsonl', row 7: is an empty list"),
    (([{"role": "user"}], [{"role": "assistant", "content": "y"}], [{"role": "assistant", "content": "n"}]),
     "'prompt' of 'p.jsonl', row 7: message 0 has content None"),
    ((3, " yes", " no"), "'prompt' of 'p.jsonl', row 7: holds int 3"),
])
def test_a_row_that_is_no_pair_is_refused_naming_it(values, problem):
    with pytest.raises(ConfigError) as refused:
        check_pair("p.jsonl", 7, values)
    assert problem in str(refused.value)


@pytest.mark.parametrize(("pair", "settings", "problem"), [
    (("", " yes", " no"), {}, "row 4 of 'x': its prompt encodes to no tokens"),
    (("Q? " * 40, " yes", " no"), {}, "leaves no room for a completion within data.seq_len 24"),
    (("Q?", " same", " same"), {}, "its chosen and rejected completions are the same"),
    (("Q?", " yes yes yes yes yes", " yes yes yes yes no"), {"seq_len": 6},
     "the same 4 tokens once cut to the 4 tokens data.seq_len 6 leaves after the prompt"),
])
def test_pairs_that_cannot_train_are_refused(toy, pair, settings, problem):
    cfg = DataConfig(dataset="x", format="preference", **{"seq_len": 24, **settings})
    with pytest.raises(ConfigError, match=problem):
        PairEncoder(tokenizer_of(toy), cfg).encode([(4, pair)])


def test_bad_preference_data_is_refused_by_the_cli(toy, tmp_path, capsys):
    rows = [standard(i) for i in range(6)]
    del rows[3]["rejected"]
    missing = write_jsonl(tmp_path / "missing.jsonl", rows)
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(3):
        (plain / f"{i}.txt").write_text("text")
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "a"}, {"text": "b"}])
    cases = [
        (missing, f"'rejected' of {str(missing)!r}, row 3: holds NoneType None"),
        (plain, "is text files; data.format 'preference' reads the ['prompt', 'chosen', 'rejected'] columns"),
        (texts, "has no ['prompt', 'chosen', 'rejected'] column(s)"),
    ]
    for dataset, problem in cases:
        assert main(dpo_args(toy, tmp_path / "out", data__dataset=dataset)) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, err
