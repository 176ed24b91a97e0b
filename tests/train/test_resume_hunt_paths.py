"""Resume paths found by a bug hunt: a save interrupted while it replaced a checkpoint of the same step, and a
fine-tune resumed on a ``model.init_from`` of another architecture."""

import os

import pytest
import torch

from retnet.train import checkpoint as ckpt_module
from retnet.train.checkpoint import (
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temp,
    save_checkpoint,
)


def test_a_crash_between_the_two_renames_of_a_replacement_keeps_the_checkpoint(tmp_path, monkeypatch):
    """Without an atomic swap (macOS, NFS), saving a step that has a checkpoint moves the old one aside, then
    renames the new one in. A process killed between the two left no step_* and two .tmp- directories, both of
    which the next start removed: with keep_last 1 nothing was left to resume from. The one moved aside is put
    back."""
    monkeypatch.setattr(ckpt_module, "_exchange", lambda a, b: False)
    save_checkpoint(tmp_path, 4, model={"w": torch.zeros(3)}, optimizer={}, trainer={"n": 1}, keep_last=1)
    rename = os.rename

    def killed_after_moving_aside(source, target):
        if os.path.basename(source).startswith(".tmp-") and os.path.basename(target) == "step_00000004":
            raise KeyboardInterrupt  # the new checkpoint's rename into place never happens
        rename(source, target)

    monkeypatch.setattr(ckpt_module.os, "rename", killed_after_moving_aside)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, model={"w": torch.ones(3)}, optimizer={}, trainer={"n": 2}, keep_last=1)
    monkeypatch.setattr(ckpt_module.os, "rename", rename)
    assert list_checkpoints(tmp_path) == []  # the state a new process finds

    ckpt_module._checked.clear()
    remove_stale_temp(tmp_path)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_00000004"
    state = load_checkpoint(tmp_path / "step_00000004")
    assert torch.equal(state["model"]["w"], torch.zeros(3)) and state["trainer"] == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]


def test_a_relaunch_resumes_from_the_checkpoint_an_interrupted_replacement_moved_aside(micro, run_here, read_metrics,
                                                                                     tmp_path):
    """The relaunch itself must find the checkpoint put back: it picked its checkpoint before removing the stale
    directories, so with keep_last 1 it started from nothing (its metrics.jsonl rewritten from step 0)."""
    out = tmp_path / "run"
    args = micro(out, train__steps=2, checkpoint__interval=2, checkpoint__keep_last=1)
    assert run_here(args).returncode == 0
    first = read_metrics(out)
    step = out / "checkpoints" / "step_00000002"
    os.rename(step, step.with_name(f".tmp-{step.name}-4242-old"))  # killed between _replace's two renames

    done = run_here(micro(out, train__steps=3, checkpoint__interval=2, checkpoint__keep_last=1))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "restored checkpoint" in done.stderr
    records = read_metrics(out)
    # resumed at step 2: the records up to it are the first run's (times included), not those of a new start
    assert [r["step"] for r in records] == [1, 2, 3] and records[:2] == first


def _fine_tune_args(micro, out, init_from, **overrides) -> list[str]:
    """``micro``'s arguments for a fine-tune of ``init_from`` (its architecture and tokenizer are the model's)."""
    return [arg for arg in micro(out, **overrides) if not arg.startswith(("--data.tokenizer=", "--model."))] + [
        f"--model.init_from={init_from}"]


def test_a_fine_tune_resumed_on_an_init_from_of_another_architecture_is_refused(micro, tokenizer_dir, tmp_path,
                                                                                capsys):
    """A full fine-tune's architecture is model.init_from's config.json. Relaunched with model.init_from naming
    another model whose weights have the same shapes (here another activation), the checkpoint's weights loaded
    into it and trained on as another model, without a word; the same base resumes as before."""
    import json

    from transformers import AutoTokenizer

    from retnet.train.__main__ import EXIT_CONFIG, main

    from .conftest import save_micro_base

    base, other = tmp_path / "base", tmp_path / "other"
    save_micro_base(base, AutoTokenizer.from_pretrained(tokenizer_dir))
    save_micro_base(other, AutoTokenizer.from_pretrained(tokenizer_dir))
    config = json.loads((other / "config.json").read_text())
    assert config["hidden_act"] != "relu"
    (other / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    out = tmp_path / "run"
    assert main(_fine_tune_args(micro, out, base, train__steps=1)) == 0
    capsys.readouterr()

    assert main(_fine_tune_args(micro, out, other, train__steps=2)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "model.init_from" in err and f"hidden_act: checkpoint {config['hidden_act']!r}, now 'relu'" in err
    assert "Traceback" not in err
    assert main(_fine_tune_args(micro, out, base, train__steps=2)) == 0
    assert "at step 1" in capsys.readouterr().err

    # model.init_from left out on resume: the model would be the preset's, here of the same shapes as the base, with
    # another activation: it resumed silently as that other model
    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.train.data import vocab_bound

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    preset_shaped = tmp_path / "preset-shaped"
    tokenizer.save_pretrained(preset_shaped)
    RetNetForCausalLM(RetNetConfig.from_preset(
        "tiny", vocab_size=vocab_bound(tokenizer), hidden_act="relu", eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).save_pretrained(preset_shaped)
    out = tmp_path / "relu"
    assert main(_fine_tune_args(micro, out, preset_shaped, train__steps=1)) == 0
    capsys.readouterr()
    without = [arg for arg in _fine_tune_args(micro, out, preset_shaped, train__steps=2) if "init_from" not in arg]
    assert main(without) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "without model.init_from" in err and "hidden_act: checkpoint 'relu'" in err, err[-2000:]


def test_a_resume_switching_to_the_fused_kernel_moves_the_step_counts_to_the_parameters(monkeypatch):
    # A CPU run's (or tensor parallelism's) checkpoint holds AdamW unfused: load_state_dict leaves its step counts
    # on the CPU, where the fused kernel a CUDA resume switches on refuses them. Parameters on the meta device stand
    # in for the GPU's here: the counts must follow them.
    from types import SimpleNamespace

    from retnet.train import trainer as trainer_module
    from retnet.train.config import OptimConfig

    params = [torch.nn.Parameter(torch.ones(3, device="meta")), torch.nn.Parameter(torch.ones(2, device="meta"))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-3)
    for param in params:
        optimizer.state[param] = {"step": torch.tensor(4.0), "exp_avg": torch.zeros_like(param),
                                  "exp_avg_sq": torch.zeros_like(param)}
    monkeypatch.setattr(trainer_module, "adamw_kernel", lambda model, device: {"fused": True})
    fake = SimpleNamespace(cfg=SimpleNamespace(optim=OptimConfig()), optimizer=optimizer, model=None,
                           device=torch.device("cpu"))
    trainer_module.Trainer._apply_optim_settings(fake)
    for param in params:
        step = optimizer.state[param]["step"]
        assert step.device == param.device and step.dtype == torch.float32
    assert all(group["fused"] for group in optimizer.param_groups)
