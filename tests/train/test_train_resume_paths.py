"""What a user of ``retnet-train`` meets when a run is resumed, its settings changed between runs, or its
config is off: LoRA targets written out vs left to the default, the warmup against the run's length, and the
other resume and config paths (in-process micro runs: ``main`` returns the exit status)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from retnet.train.__main__ import EXIT_CONFIG, EXIT_NONFINITE, main
from retnet.train.checkpoint import list_checkpoints, load_checkpoint
from retnet.train.config import ConfigError, load_config, schedule_warnings
from retnet.train.optim import get_lr

from .conftest import micro_args

# The micro model's decoder Linears (use_output_gate on, ffn_glu off): what lora.target_modules [] adapts
MICRO_TARGETS = ["q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "up_proj", "down_proj"]
LORA = {"lora__rank": 4, "lora__alpha": 8, "optim__lr": 2e-2, "train__steps": 4, "checkpoint__interval": 2}


def _losses(read_metrics, out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def _copy_from(run: Path, to: Path, step: int) -> Path:
    """``run`` as it was after saving ``step``: the later checkpoints gone, as if it died there."""
    shutil.copytree(run, to)
    for path in list_checkpoints(to / "checkpoints"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    return to


def _rewrite_trainer(path: Path, change) -> None:
    """Edit a checkpoint's trainer.pt (and its manifest entry), as one an older version wrote."""
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    change(trainer)
    torch.save(trainer, path / "trainer.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / "trainer.pt").read_bytes()
    manifest["files"]["trainer.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, corpus, tokenizer_dir, cache_dir):
    """A LoRA run on a random init with lora.target_modules left empty, 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("lora-default") / "run"
    assert main(micro_args(corpus, tokenizer_dir, cache_dir, out, **LORA)) == 0
    return out


def test_lora_targets_written_out_resume_the_default_ones(lora_run, micro, tmp_path, read_metrics, capsys):
    """Bug: ``[]`` (every projection) in the checkpoint and the same list written out now were refused as
    other LoRA settings; they are the same adapters, and the resume retraces the losses bit for bit."""
    saved = load_checkpoint(list_checkpoints(lora_run / "checkpoints")[-1])["trainer"]
    assert saved["lora_targets"] == MICRO_TARGETS  # what peft wrapped, not the setting
    out = _copy_from(lora_run, tmp_path / "run", step=2)
    assert main(micro(out, lora__target_modules=",".join(MICRO_TARGETS), **LORA)) == 0
    assert _losses(read_metrics, out) == _losses(read_metrics, lora_run)
    # a real change of targets is still refused, naming the setting and both values
    other = _copy_from(lora_run, tmp_path / "other", step=4)
    assert main(micro(other, **{**LORA, "train__steps": 5}, lora__target_modules="v_proj,q_proj")) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"lora.target_modules: checkpoint [] (all the model has: {MICRO_TARGETS}), now ['v_proj', 'q_proj']" in err


def test_a_checkpoint_without_its_resolved_targets_resolves_its_setting(lora_run, micro, tmp_path, capsys):
    """A checkpoint written before the resolved targets were saved: its ``[]`` is resolved against the model
    the resume builds (the same: model settings cannot change), so the full list written out resumes it."""
    out = _copy_from(lora_run, tmp_path / "run", step=4)
    _rewrite_trainer(list_checkpoints(out / "checkpoints")[-1], lambda trainer: trainer.pop("lora_targets"))
    fewer = [name for name in MICRO_TARGETS if name != "g_proj"]
    assert main(micro(out, **{**LORA, "train__steps": 5}, lora__target_modules=",".join(fewer))) == EXIT_CONFIG
    assert "now ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj']" in capsys.readouterr().err
    # (steps 4 = the checkpoint's: only exports again, after the comparison passed)
    assert main(micro(out, lora__target_modules=",".join(reversed(MICRO_TARGETS)), **LORA)) == 0


# ----------------------------------------------------------------------------------------------------------
# The warmup against the run's length
# ----------------------------------------------------------------------------------------------------------
def test_a_warmup_longer_than_the_run_is_refused_naming_both_settings():
    with pytest.raises(ConfigError) as error:
        load_config("tiny", ["--train.steps=10", "--optim.warmup_steps=11"])
    assert "optim.warmup_steps must be <= train.steps (10)" in str(error.value) and "got 11" in str(error.value)


@pytest.mark.parametrize(("overrides", "warned"), [
    (["--train.steps=10", "--optim.warmup_steps=10"], True),
    (["--train.steps=10", "--optim.warmup_steps=10", "--optim.schedule=linear"], True),
    (["--train.steps=10", "--optim.warmup_steps=9"], False),  # decays on the final step
    (["--train.steps=10", "--optim.warmup_steps=10", "--optim.schedule=constant"], False),  # no decay meant
    (["--train.steps=10", "--optim.warmup_steps=10", "--optim.lr=1e-3", "--optim.min_lr=1e-3"], False),  # nothing to decay to
])
def test_a_warmup_as_long_as_the_run_is_warned_of(overrides, warned):
    """Taken, as HF's and nanoGPT's schedules take it, but the decay configured never happens: said."""
    cfg = load_config("tiny", overrides)
    final = get_lr(cfg.train.steps - 1, cfg.optim, cfg.train.steps)
    # warned exactly when the final step does not run at min_lr though a decay to it was configured
    assert (final != cfg.optim.min_lr and cfg.optim.schedule != "constant") == warned
    notes = schedule_warnings(cfg)
    assert bool(notes) == warned
    if warned:
        assert "optim.warmup_steps (10) equals train.steps (10)" in notes[0] and "optim.min_lr" in notes[0]


def test_the_trainer_logs_the_warmup_warning_before_anything_else(micro, tmp_path, capsys):
    """Logged at start-up (here the run then stops at once: its output_dir is a file)."""
    out = tmp_path / "file"
    out.write_text("")
    assert main(micro(out, train__steps=3, optim__warmup_steps=3)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "optim.warmup_steps (3) equals train.steps (3)" in err and "exists and is not a directory" in err


# ----------------------------------------------------------------------------------------------------------
# Interruptions
# ----------------------------------------------------------------------------------------------------------
def test_a_nonfinite_loss_names_the_checkpoint_a_resume_would_take(lora_run, micro, tmp_path, monkeypatch, capsys):
    """Bug: after a save cut short (step 4 without its manifest) the run resumes from step 2; a NaN loss then
    named step 4, the newest directory, as "the last good checkpoint", which a resume skips as invalid."""
    from retnet.train.trainer import Trainer

    out = _copy_from(lora_run, tmp_path / "run", step=4)
    (out / "checkpoints" / "step_00000004" / "manifest.json").unlink()
    loss = Trainer._loss
    monkeypatch.setattr(Trainer, "_loss", lambda self, *a, **k: loss(self, *a, **k) * float("nan"))
    assert main(micro(out, **LORA)) == EXIT_NONFINITE
    err = capsys.readouterr().err
    good = out / "checkpoints" / "step_00000002"
    assert f"loss is nan at step 3; stopping without saving. The last good checkpoint is {good};" in err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002", "step_00000004"]


def test_a_lora_target_the_model_lacks_is_refused_before_the_data_is_read(micro, tmp_path, monkeypatch, capsys):
    """Bug: refused only once the model was built, after the whole dataset had been read and tokenized (hours on a
    large one). Now before: the targets are resolved against the architecture, which is known at start."""
    from retnet.train import trainer as trainer_module

    def build_data(*args, **kwargs):
        raise AssertionError("the data was read before the LoRA targets were checked")

    monkeypatch.setattr(trainer_module, "build_data", build_data)
    args = micro(tmp_path / "run", lora__rank=4, lora__target_modules="q_proj,g_proj",
                 model__extra__use_output_gate="false")
    assert main(args) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "lora.target_modules names modules this model does not have: ['g_proj']" in err
    assert "got ['q_proj', 'g_proj']" in err


def test_a_lora_run_on_another_architecture_is_refused_as_not_a_retnet(micro, tokenizer_dir, tmp_path, capsys):
    """The early LoRA target check reads model.init_from's config before the model is built: a Llama there must get
    the "not a RetNet" refusal, not a message about its fields or modules."""
    import json
    import shutil

    llama = tmp_path / "llama"
    shutil.copytree(tokenizer_dir, llama)  # a tokenizer that loads: the config is what is refused
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 100}))
    shape = ("--model.hidden_size=", "--model.num_hidden_layers=", "--model.num_attention_heads=", "--data.tokenizer=")
    args = [a for a in micro(tmp_path / "run", lora__rank=4) if not a.startswith(shape)]
    assert main([*args, f"--model.init_from={llama}"]) == EXIT_CONFIG
    assert "holds a 'llama' model, not a RetNet" in capsys.readouterr().err
