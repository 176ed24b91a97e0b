"""Fine-tuning: ``model.init_from`` starts a run from another run's export (its architecture, weights and
tokenizer) instead of a preset and a random init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.config import ConfigError, build_config

SHAPES = ("model.hidden_size", "model.num_hidden_layers", "model.num_attention_heads")


def fine_tune_args(args: list[str], init_from, **overrides) -> list[str]:
    """``micro`` arguments without the model's shape and the tokenizer (the pretrained model's), from
    ``init_from``."""
    kept = [a for a in args if not a.startswith(tuple(f"--{key}=" for key in (*SHAPES, "data.tokenizer")))]
    return [*kept, f"--model.init_from={init_from}", *[f"--{k.replace('__', '.')}={v}" for k, v in overrides.items()]]


def pretrain(root: Path, corpus, tokenizer_dir) -> Path:
    """A micro run trained 60 steps in this process under ``root`` and exported, with its metrics: its output
    directory."""
    from .conftest import micro_args

    out = root / "run"
    assert main(micro_args(corpus, tokenizer_dir, root / "cache", out, checkpoint__export=True, train__steps=60,
                           optim__lr=1e-2)) == 0
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus, tokenizer_dir):
    """``pretrain``'s run: its output directory."""
    return pretrain(tmp_path_factory.mktemp("pretrained"), corpus, tokenizer_dir)


def test_a_fine_tune_starts_from_the_exported_weights(pretrained, micro, tmp_path, read_metrics, hub_cache):
    """Its first validation loss is the pretrained run's last (the same blocks, the same weights), far below
    the random init's; it trains on from there and exports a model of the same architecture. The export is
    named here by hub id: its snapshot in the HF cache (the suite is offline)."""
    out = tmp_path / "tuned"
    hub_cache("acme/pretrained", pretrained / "export")
    assert main(fine_tune_args(micro(out, checkpoint__export=True), "acme/pretrained")) == 0
    before = read_metrics(pretrained, "val")[-1]["val_loss"]
    start = read_metrics(out, "val")[0]["val_loss"]
    assert start == pytest.approx(before, rel=1e-5, abs=1e-5)
    fresh = tmp_path / "fresh"
    assert main(micro(fresh)) == 0
    assert read_metrics(fresh, "val")[0]["val_loss"] > start + 0.5
    exported = json.loads((out / "export" / "config.json").read_text())
    original = json.loads((pretrained / "export" / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "eos_token_id"):
        assert exported[key] == original[key]
    assert (out / "tokenizer" / "tokenizer.json").read_text() == (pretrained / "export" / "tokenizer.json").read_text()


def test_settings_that_do_not_shape_the_weights_apply_on_top(pretrained, micro, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tuned"
    args = fine_tune_args(micro(out, checkpoint__export=True, train__steps=1), pretrained / "export",
                          model__chunk_size=8, model__dropout=0.1)
    assert main(args) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "export")
    assert model.config.chunk_size == 8 and model.config.dropout == pytest.approx(0.1)


def test_a_fine_tune_resumes_from_its_own_checkpoint(pretrained, micro, tmp_path, read_metrics):
    """Its last checkpoint gone, a fine-tune resumes from the one before and retraces the same losses: the
    checkpoint's weights, not the pretrained ones, are what it continues from."""
    import shutil

    whole = tmp_path / "whole"
    args = fine_tune_args(micro(whole, checkpoint__interval=3), pretrained / "export")
    assert main(args) == 0
    losses = {r["step"]: r["loss"] for r in read_metrics(whole)}
    shutil.rmtree(whole / "checkpoints" / "step_00000006")
    assert main(args) == 0
    again = {r["step"]: r["loss"] for r in read_metrics(whole)}
    assert sorted(again) == sorted(losses) == list(range(1, 7))
    assert [again[step] for step in (4, 5, 6)] == pytest.approx([losses[step] for step in (4, 5, 6)], rel=1e-6)


@pytest.mark.parametrize("key", SHAPES)
def test_a_shape_setting_with_init_from_is_refused_by_name(key):
    name = key.split(".")[1]
    with pytest.raises(ConfigError, match=rf"{key} cannot be set with model.init_from"):
        build_config({"model": {"init_from": "some/export", name: 64}})


def test_another_tokenizer_with_init_from_is_refused(pretrained, tokenizer_dir):
    with pytest.raises(ConfigError, match=r"data.tokenizer .*cannot be set with model.init_from"):
        build_config({"model": {"init_from": str(pretrained / "export")},
                             "data": {"tokenizer": str(tokenizer_dir)}})
    same = build_config({"model": {"init_from": str(pretrained / "export")},
                                "data": {"tokenizer": str(pretrained / "export")}})
    assert same.model.init_from == str(pretrained / "export")


def test_a_bad_init_from_is_refused_naming_it(pretrained, micro, tmp_path, capsys):
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        (weightless / name).write_bytes((pretrained / "export" / name).read_bytes())
    wider = tmp_path / "wider"
    wider.mkdir()
    for path in (pretrained / "export").iterdir():
        (wider / path.name).write_bytes(path.read_bytes())
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))
    other_eos = tmp_path / "other-eos"
    other_eos.mkdir()
    for path in (pretrained / "export").iterdir():
        (other_eos / path.name).write_bytes(path.read_bytes())
    (other_eos / "config.json").write_text(json.dumps({**config, "eos_token_id": config["eos_token_id"] + 7}))
    cases = [(tmp_path / "missing", "no such directory"), ("acme/not-cached", "the hub could not provide it"),
             (tmp_path, "holds no config.json"),
             (weightless, "weights could not be loaded"), (wider, "weights could not be loaded"),
             (other_eos, "the tokenizer is not the one the model was trained with")]
    for init_from, problem in cases:
        out = tmp_path / f"out-{Path(init_from).name}"
        assert main(fine_tune_args(micro(out), init_from)) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert f"model.init_from {str(init_from)!r}" in err and problem in err, err
        assert "Traceback" not in err
        assert not (out / "checkpoints").exists()


# test_fine_tuning_under_ddp_matches_one_process (two gloo ranks under DDP against one process) is in
# test_two_ranks_match_one_process.py (TestInitFrom): its run shares one torchrun launch with other modules' 2-rank
# runs.
