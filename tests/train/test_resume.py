"""Checkpoint housekeeping and resume edge cases: stale temp directories, malformed manifests, a model that
no longer fits, resuming explicitly from an older checkpoint, and a streamed run resumed on another world
size; what a resumed run logs. In-process runs (``main`` returns the exit status)."""

import hashlib
import json
import os
import shutil
import signal
import types
from pathlib import Path

import pytest
import torch

from retnet.train import checkpoint as ckpt_module
from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_stale_export,
    save_checkpoint,
    verify_checkpoint,
)

from .conftest import micro_args


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): _digest(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_steps(corpus, tokenizer_dir, cache_dir, tmp_path_factory) -> Path:
    """The output directory of ``micro(out, train__steps=2)``, trained once for the module: the many tests that
    start from that run (its checkpoint of step 2, its records) take a copy of it (``copy_of``) to change."""
    out = tmp_path_factory.mktemp("two-steps") / "run"
    assert main(micro_args(corpus, tokenizer_dir, cache_dir, out, train__steps=2)) == 0
    return out


def copy_of(run: Path, out: Path) -> Path:
    """``run``'s output directory copied to ``out`` (a run resumes from a moved output directory): ``out``."""
    shutil.copytree(run, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# 1. Stale temp directories
# ----------------------------------------------------------------------------------------------------------
def test_stale_temp_checkpoints_are_removed_at_start(micro, two_steps, tmp_path, capsys):
    """A process killed mid-save leaves ``.tmp-step_…`` behind; the next start removes it (a preemption loop
    would otherwise fill the disk), and leaves checkpoints and moved-aside corrupt ones alone."""
    out = copy_of(two_steps, tmp_path / "run")
    root = out / "checkpoints"
    stale = [root / ".tmp-step_00000004-424242", root / ".tmp-step_00000006-7"]
    for path in stale:
        path.mkdir()
        (path / "model.pt").write_bytes(b"x" * 1000)
    corrupt = root / "step_00000001.corrupt-123"
    corrupt.mkdir()
    assert main(micro(out, train__steps=3)) == 0
    assert not any(path.exists() for path in stale)
    assert "removed stale" in capsys.readouterr().err
    assert corrupt.is_dir()
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000003"]


def test_stale_export_directories_are_removed_at_start(micro, tmp_path, capsys):
    """A process killed mid-export leaves ``.tmp-export-<pid>`` / ``.old-export-<pid>`` beside the export;
    the next start removes them before it exports anything, and a resume leaves the export itself alone (a run
    that starts removes it: it is another run's)."""
    out = tmp_path / "run"
    assert main(micro(out, train__steps=1)) == 0
    export = out / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    stale = [out / ".tmp-export-424242", out / ".old-export-7"]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 1000)
    assert main(micro(out, train__steps=1)) == 0  # resumed (train.resume auto)
    assert not any(path.exists() for path in stale)
    assert "removed stale temporary export" in capsys.readouterr().err
    assert (export / "config.json").read_text() == "{}"


def test_an_export_moved_aside_by_a_dead_process_is_restored(tmp_path):
    """Death between export_pretrained's two renames leaves only ``.old-export-<pid>`` complete: it is
    renamed back, not deleted, and the half-written ``.tmp-`` one is removed."""
    old, tmp = tmp_path / ".old-export-7", tmp_path / ".tmp-export-7"
    for path in (old, tmp):
        path.mkdir()
        (path / "config.json").write_text(path.name)
    assert remove_stale_export(tmp_path / "export") == [tmp]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (tmp_path / "export" / "config.json").read_text() == ".old-export-7"


def test_a_failed_save_removes_its_temp_directory(tmp_path, monkeypatch):
    def full_disk(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module, "_write_durable", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, model={}, optimizer={}, trainer={}, keep_last=2)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_sharded_save_removes_its_temp_directory(micro, tmp_path, monkeypatch, capsys):
    """As the full layout's: a disk that filled up while the shards were written does not stay full of them."""
    from retnet.train import trainer as trainer_module

    real = trainer_module.save_sharded_state

    def full_disk(directory, *args, **kwargs):
        real(directory, *args, **kwargs)  # the shards are written, then the disk is full (e.g. while hashing)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer_module, "save_sharded_state", full_disk)
    out = tmp_path / "run"
    assert main(micro(out, train__steps=2, checkpoint__layout="sharded")) == EXIT_CONFIG
    assert "No space left" in capsys.readouterr().err
    assert list((out / "checkpoints").iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# 2. A checkpoint that does not fit the configured model
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resume", ["auto", "explicit"])
def test_model_shape_mismatch_is_a_checkpoint_error(resume, micro, two_steps, tmp_path, capsys):
    out = copy_of(two_steps, tmp_path / "run")
    before = _tree_digest(out / "checkpoints")
    target = "auto" if resume == "auto" else out / "checkpoints" / "step_00000002"
    capsys.readouterr()
    assert main(micro(out, train__steps=4, model__hidden_size=64, train__resume=target)) == EXIT_CONFIG
    err = capsys.readouterr().err
    # Refused from the checkpoint's config, naming the setting, before any data is read (the weights' shapes
    # are checked again when they load, for a checkpoint whose config does not say)
    assert "step_00000002" in err and "model.hidden_size: checkpoint 32, now 64" in err
    assert "data: " not in err and "Traceback" not in err
    assert _tree_digest(out / "checkpoints") == before


def test_model_settings_that_change_what_the_weights_compute_are_refused(micro, two_steps, tmp_path, capsys,
                                                                          read_metrics):
    """Same shapes, another function (rotary base, activation, xPos): the resumed run would silently train
    another model from the checkpoint's weights. How the model is computed or regularized may change."""
    out = copy_of(two_steps, tmp_path / "run")
    before = _tree_digest(out / "checkpoints")
    capsys.readouterr()
    assert main([*micro(out, train__steps=4), "--model.extra.rope_theta=500", "--model.hidden_act=silu"]) \
        == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "model.extra.rope_theta: checkpoint 10000.0, now 500" in err
    assert "model.hidden_act: checkpoint 'gelu', now 'silu'" in err
    assert "step_00000002" in err and "Traceback" not in err
    assert "data: " not in err  # refused before the data is read
    assert _tree_digest(out / "checkpoints") == before
    assert main([*micro(out, train__steps=4, model__dropout=0.1, model__chunk_size=8),
                 "--model.extra.retention_mode=chunkwise"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_weights_of_another_shape_are_refused_when_the_checkpoint_config_does_not_say(micro, two_steps, tmp_path,
                                                                                       capsys):
    """A checkpoint whose config holds no model section (written by another tool, or an older version) is
    not compared setting by setting: the weights' shapes are, when they load."""
    out = copy_of(two_steps, tmp_path / "run")
    root = out / "checkpoints"
    state = load_checkpoint(root / "step_00000002")
    del state["trainer"]["config"]["model"]
    save_checkpoint(root, 2, model=state["model"], optimizer=state["optimizer"], trainer=state["trainer"],
                    keep_last=1)
    capsys.readouterr()
    assert main(micro(out, train__steps=4, model__hidden_size=64)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "step_00000002" in err and "does not fit the configured model" in err
    assert "[512, 32]" in err and "[512, 64]" in err  # the embedding's shape, saved and configured
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------
# 3. A manifest that is JSON of the wrong structure
# ----------------------------------------------------------------------------------------------------------
def _malformed(manifest: dict) -> list:
    files = manifest["files"]
    return [
        [],
        "step 4",
        {"format": 1, "step": 4},
        {**manifest, "files": list(files)},
        {**manifest, "files": {**files, "model.pt": "abc"}},
        {**manifest, "files": {**files, "model.pt": {"sha256": files["model.pt"]["sha256"]}}},
        {**manifest, "files": {**files, "model.pt": {**files["model.pt"], "bytes": "12"}}},
        {k: v for k, v in manifest.items() if k != "step"},
        {**manifest, "step": "4"},
    ]


def test_malformed_manifest_is_a_corrupt_checkpoint(micro, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(micro(out, checkpoint__interval=2, train__steps=4)) == 0
    root = out / "checkpoints"
    newest = root / "step_00000004"
    good = json.loads((newest / "manifest.json").read_text())
    for bad in _malformed(good):
        (newest / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="step_00000004"):
            verify_checkpoint(newest)
        assert find_resume_checkpoint(root) == root / "step_00000002", bad

    # Named explicitly: refused with the manifest named, nothing written.
    before = _tree_digest(root)
    assert main(micro(out, train__steps=6, train__resume=newest)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "step_00000004/manifest.json" in err and "Traceback" not in err
    assert _tree_digest(root) == before

    # auto: skipped with a warning; the run resumes from step 2.
    assert main(micro(out, checkpoint__interval=2, train__steps=6)) == 0
    assert "at step 2" in capsys.readouterr().err
    assert verify_checkpoint(root / "step_00000006")["step"] == 6


# ----------------------------------------------------------------------------------------------------------
# 4. The newer run's state wins
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_saving_a_step_again_replaces_it(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(ckpt_module, "_exchange", lambda a, b: False)
    first = save_checkpoint(tmp_path, 4, model={"w": torch.zeros(3)}, optimizer={}, trainer={"n": 1}, keep_last=3)
    again = save_checkpoint(tmp_path, 4, model={"w": torch.ones(3)}, optimizer={}, trainer={"n": 2}, keep_last=3)
    assert again == first
    state = load_checkpoint(again)
    assert torch.equal(state["model"]["w"], torch.ones(3)) and state["trainer"] == {"n": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000004"]


def test_loading_a_checkpoint_this_process_verified_hashes_it_once(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 2, model={"w": torch.arange(4.0)}, optimizer={}, trainer={"n": 1}, keep_last=1)
    ckpt_module._checked.clear()  # as in a new process: the resume chooses it first
    hashed = []
    real_sha256 = ckpt_module._sha256
    monkeypatch.setattr(ckpt_module, "_sha256", lambda file: hashed.append(file.name) or real_sha256(file))
    assert find_resume_checkpoint(tmp_path) == path
    chosen = len(hashed)
    assert chosen == len(ckpt_module.FILES)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(4.0))
    assert len(hashed) == chosen  # verified moments ago: not hashed again
    # A file rewritten since (same size, other bytes) has another identity: verified again, and refused.
    model_file = path / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    before = model_file.stat().st_mtime_ns
    model_file.write_bytes(bytes(data))
    os.utime(model_file, ns=(before + 10**9, before + 10**9))  # a coarse-clock filesystem would keep the mtime
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_other_ranks_take_rank_0s_verification_of_the_same_files(tmp_path, monkeypatch):
    """Rank 0 hashes the checkpoint it resumes; the other ranks take its verification of the same files (inode,
    size, mtime) instead of each hashing tens of GB again, and still hash files that differ from those."""
    path = save_checkpoint(tmp_path, 2, model={"w": torch.arange(4.0)}, optimizer={}, trainer={"n": 1}, keep_last=1)
    identity = ckpt_module.verified_identity(path)  # rank 0: written (so hashed) by this process
    assert identity
    ckpt_module._checked.clear()  # another rank: a process that verified nothing
    assert ckpt_module.verified_identity(path) == ()
    hashed = []
    real_sha256 = ckpt_module._sha256
    monkeypatch.setattr(ckpt_module, "_sha256", lambda file: hashed.append(file.name) or real_sha256(file))
    assert ckpt_module.note_verified(path, identity)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(4.0)) and hashed == []
    # Files rewritten after rank 0 hashed them are not those it verified: hashed here, and refused.
    ckpt_module._checked.clear()
    model_file = path / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    before = model_file.stat().st_mtime_ns
    model_file.write_bytes(bytes(data))
    os.utime(model_file, ns=(before + 10**9, before + 10**9))
    assert not ckpt_module.note_verified(path, identity)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    assert "model.pt" in hashed


def test_loaded_weights_are_mapped_from_the_files_not_copied(tmp_path):
    """The ranks of a node resuming share the checkpoint in the page cache: its tensors are mapped from the
    files (each rank reading its own full copy of model and Adam state ran a 6.7B model on 8 GPUs out of host
    memory), and copy-on-write, so training on from them never writes into the checkpoint."""
    path = save_checkpoint(tmp_path, 2, model={"w": torch.arange(4.0)},
                           optimizer={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
                           trainer={"n": 1}, keep_last=1)
    state = load_checkpoint(path)
    mapped = Path("/proc/self/maps").read_text()
    assert str(path / "model.pt") in mapped and str(path / "optimizer.pt") in mapped
    state["model"]["w"].add_(1)
    state["optimizer"]["state"][0]["exp_avg"].mul_(5)
    del state
    verify_checkpoint(path)  # the files are as written: the manifest's hashes still match
    ckpt_module._checked.clear()
    again = load_checkpoint(path)
    assert torch.equal(again["model"]["w"], torch.arange(4.0))
    assert torch.equal(again["optimizer"]["state"][0]["exp_avg"], torch.ones(3))


def test_loaded_weights_stay_copy_on_write_under_a_shared_mmap_default(tmp_path):
    """torch.load's mmap flags are a process-wide setting (``set_default_mmap_options``): a library or tool that
    sets MAP_SHARED must not make training on a loaded checkpoint write into its files."""
    import mmap

    path = save_checkpoint(tmp_path, 2, model={"w": torch.arange(4.0)},
                           optimizer={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
                           trainer={"n": 1}, keep_last=1)
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        state = load_checkpoint(path)
        state["model"]["w"].add_(1)
        state["optimizer"]["state"][0]["exp_avg"].mul_(5)
        del state
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    ckpt_module._checked.clear()
    verify_checkpoint(path)  # the files are as written


def _resumed_trainer(args: list[str]):
    from retnet.train.config import load_config
    from retnet.train.trainer import Trainer

    assert args[:2] == ["--config", "tiny"]
    return Trainer(load_config("tiny", args[2:]))


def test_cpu_training_does_not_keep_the_resumed_checkpoint_mapped(micro, tmp_path):
    """On the CPU the optimizer loads its state without a copy: the Adam tensors stayed views of the mapped
    optimizer.pt, so a checkpoint pruned behind the run kept its disk space for the whole run (and on NFS its
    directory held a .nfs file, and pruning failed with 'Directory not empty')."""
    out = tmp_path / "run"
    common = dict(checkpoint__interval=2, checkpoint__keep_last=1)
    assert main(micro(out, train__steps=2, **common)) == 0
    trainer = _resumed_trainer(micro(out, train__steps=4, **common))
    try:
        assert trainer.step == 2
        trainer.train()
        assert not (out / "checkpoints" / "step_00000002").exists()  # pruned
        mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(out) in line]
        assert mapped == []
    finally:
        trainer.close()


def test_a_resume_trains_with_the_optim_settings_configured_now(micro, two_steps, tmp_path):
    """optim.* may change on resume (README): the optimizer state's param groups hold the checkpoint's
    weight_decay, betas and eps, which silently replaced the configured ones."""
    out = copy_of(two_steps, tmp_path / "run")
    # from the full checkpoint of step 2, saving step 4 sharded; then from that sharded one
    for layout, steps in (("sharded", 4), ("full", 6)):
        trainer = _resumed_trainer(micro(out, train__steps=steps, optim__weight_decay=0.25, optim__beta2=0.99,
                                         optim__eps=1e-6, checkpoint__layout=layout))
        try:
            decay, no_decay = trainer.optimizer.param_groups
            assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.25, 0.0)
            assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-6 for g in (decay, no_decay))
            assert trainer.step == steps - 2 and trainer.optimizer.state  # the Adam moments are the checkpoint's
            trainer.train()  # saved in this layout, which the next resume reads
        finally:
            trainer.close()


def test_explicit_resume_from_an_older_checkpoint_supersedes_the_newer_ones(micro, tmp_path, capsys):
    """Resuming explicitly from step 2 of a run that saved 2, 4, 6 (here with another learning rate) starts
    a new trajectory: its step 4 replaces the old step 4, the old step 6 is moved aside (not deleted), and a
    later ``resume=auto`` continues the new trajectory."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    assert main(micro(out, checkpoint__interval=2, checkpoint__keep_last=3, train__steps=6)) == 0
    old_step_4 = _digest(root / "step_00000004" / "model.pt")
    old_step_6 = _tree_digest(root / "step_00000006")
    capsys.readouterr()

    assert main(micro(out, checkpoint__interval=2, checkpoint__keep_last=3, train__steps=4, optim__lr=1e-3,
                      train__resume=root / "step_00000002")) == 0
    err = capsys.readouterr().err
    assert "step_00000006" in err and "abandoned" in err
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000004"]
    assert _digest(root / "step_00000004" / "model.pt") != old_step_4
    trainer = torch.load(root / "step_00000004" / "trainer.pt", weights_only=False)
    assert trainer["config"]["optim"]["lr"] == 1e-3
    (aside,) = root.glob("step_00000006.abandoned-*")
    assert _tree_digest(aside) == old_step_6
    assert not list(root.glob(".tmp-*"))

    assert main(micro(out, checkpoint__interval=2, checkpoint__keep_last=3, train__steps=5, optim__lr=1e-3)) == 0
    assert "at step 4" in capsys.readouterr().err


def test_resuming_with_train_steps_below_the_checkpoint_step_is_refused(micro, tmp_path, capsys):
    """train.steps below the newest checkpoint's step would train nothing and export the checkpoint's later
    step: refused before any data is read, naming both, and nothing written. The same number of steps (a
    finished run run again) only exports again; an earlier checkpoint named explicitly resumes."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    assert main(micro(out, checkpoint__interval=2, checkpoint__keep_last=3, train__steps=4)) == 0
    before = _tree_digest(out)
    capsys.readouterr()
    assert main(micro(out, checkpoint__interval=2, checkpoint__keep_last=3, train__steps=3)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "train.steps is 3" in err and "step_00000004" in err and "at step 4" in err and "Traceback" not in err
    assert _tree_digest(out) == before
    assert main(micro(out, checkpoint__interval=2, checkpoint__keep_last=3, train__steps=4)) == 0
    assert main(micro(out, checkpoint__interval=2, checkpoint__keep_last=3, train__steps=3,
                      train__resume=root / "step_00000002")) == 0
    assert "at step 2" in capsys.readouterr().err
    assert verify_checkpoint(root / "step_00000003")["step"] == 3


# ----------------------------------------------------------------------------------------------------------
# 5. Resuming on another world size
# ----------------------------------------------------------------------------------------------------------
def _as_if_two_ranks(src: Path, dst: Path) -> None:
    """Copy ``src``'s newest checkpoint into ``dst`` as though two ranks had written it."""
    state = load_checkpoint(list_checkpoints(src)[-1])
    trainer = state["trainer"]
    trainer["world_size"], trainer["ranks"] = 2, [trainer["ranks"][0], trainer["ranks"][0]]
    save_checkpoint(dst, state["step"], model=state["model"], optimizer=state["optimizer"], trainer=trainer,
                    keep_last=2)


def test_streamed_data_refuses_another_world_size(micro, tmp_path, capsys):
    out, moved = tmp_path / "run", tmp_path / "moved"
    args = dict(data__streaming=True, data__val_documents=10)
    assert main(micro(out, **args, train__steps=2)) == 0
    _as_if_two_ranks(out / "checkpoints", moved / "checkpoints")
    before = _tree_digest(moved / "checkpoints")
    assert main(micro(moved, **args, train__steps=4)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "data.streaming" in err and "2 ranks" in err and "world size 1" in err
    assert _tree_digest(moved / "checkpoints") == before


@pytest.mark.parametrize("streamed_first", [True, False], ids=["streamed-then-packed", "packed-then-streamed"])
def test_resuming_in_the_other_data_mode_is_a_config_error(streamed_first, micro, tmp_path, capsys):
    out = tmp_path / "run"
    streamed = dict(data__streaming=True, data__val_documents=10)
    first, then = (streamed, {}) if streamed_first else ({}, streamed)
    assert main(micro(out, **first, train__steps=2)) == 0
    before = _tree_digest(out / "checkpoints")
    assert main(micro(out, **then, train__steps=4)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "step_00000002" in err and f"data.streaming={str(streamed_first).lower()}" in err
    assert "Traceback" not in err
    assert _tree_digest(out / "checkpoints") == before


def test_packed_data_resumes_on_another_world_size(micro, two_steps, tmp_path, capsys, read_metrics):
    out, moved = copy_of(two_steps, tmp_path / "run"), tmp_path / "moved"
    _as_if_two_ranks(out / "checkpoints", moved / "checkpoints")
    shutil.copy(out / "metrics.jsonl", moved / "metrics.jsonl")
    assert main(micro(moved, train__steps=4)) == 0
    assert "written by 2 ranks" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(moved)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------------------
# 6. Pruning, a run that starts over an earlier one, output_dir
# ----------------------------------------------------------------------------------------------------------
def test_pruning_keeps_the_checkpoint_just_saved_under_a_newer_invalid_one(tmp_path):
    """resume=auto skipped an invalid step 10 and resumed from step 2: with keep_last=1, saving step 3 must keep
    step 3 (counting the invalid step 10 in, pruning deleted the checkpoint just written and left nothing
    valid to resume from)."""
    state = dict(model={"w": torch.zeros(2)}, optimizer={}, trainer={})
    save_checkpoint(tmp_path, 2, **state, keep_last=1)
    (tmp_path / "step_00000010").mkdir()  # no manifest: invalid
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_00000002"
    save_checkpoint(tmp_path, 3, **state, keep_last=1)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step_00000003"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000010"]
    save_checkpoint(tmp_path, 10, **state, keep_last=2)  # reaching its step moves the invalid one aside
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000010"]
    assert verify_checkpoint(tmp_path / "step_00000010")["step"] == 10
    assert len(list(tmp_path.glob("step_00000010.corrupt-*"))) == 1


def test_a_checkpoint_copied_under_another_steps_name_is_skipped(tmp_path, caplog):
    """resume=auto picks by the step_N name: step 2 copied by hand to step_00000009 verified (its files match its
    manifest) and was resumed from at every relaunch, going back to step 2 each time. Its manifest's step must be
    its name's: skipped under auto with a warning naming both, refused by name."""
    state = dict(model={"w": torch.zeros(2)}, optimizer={}, trainer={})
    save_checkpoint(tmp_path, 2, **state, keep_last=3)
    shutil.copytree(tmp_path / "step_00000002", tmp_path / "step_00000009")
    with pytest.raises(CheckpointError, match=r"step_00000009'.* holds step 2 .*not step 9 .*rename it step_00000002"):
        verify_checkpoint(tmp_path / "step_00000009")
    with caplog.at_level("WARNING", logger="retnet.train.checkpoint"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step_00000002"
    assert "holds step 2" in caplog.text and "not step 9" in caplog.text
    (tmp_path / "step_00000002").rename(tmp_path / "only")
    with pytest.raises(CheckpointError, match=r"no valid checkpoint.*holds step 2"):
        find_resume_checkpoint(tmp_path)
    assert verify_checkpoint(tmp_path / "only")["step"] == 2  # under a name that is no step_N: taken as it says


def test_pruning_counts_only_valid_checkpoints(tmp_path, monkeypatch):
    """keep_last counts checkpoints that verify: an invalid step 3 (a file corrupted in place, same size) must
    not take the place of the valid step 2, which would leave step 4 the only one to resume from. The invalid
    one is left where it is until it falls out of the window, then removed with the older ones."""
    state = dict(model={"w": torch.zeros(2)}, optimizer={}, trainer={})
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, **state, keep_last=3)
    with open(tmp_path / "step_00000003" / "model.pt", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff\xfe\xfd")
    # saved as by an earlier process: within the same clock tick as its write, the rewrite keeps its mtime
    monkeypatch.setattr(ckpt_module, "_checked", {})
    save_checkpoint(tmp_path, 4, **state, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000004"]
    save_checkpoint(tmp_path, 5, **state, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]


def test_pruning_does_not_hash_checkpoints_again(tmp_path, monkeypatch):
    """Checking validity at every save must not read back every kept checkpoint (tens of GB each at the paper
    sizes): one written or verified by this process and unchanged since is known to be valid."""
    state = dict(model={"w": torch.zeros(2)}, optimizer={}, trainer={})
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, **state, keep_last=3)
    hashed = []
    sha256 = ckpt_module._sha256
    monkeypatch.setattr(ckpt_module, "_sha256", lambda path: hashed.append(path) or sha256(path))
    save_checkpoint(tmp_path, 4, **state, keep_last=3)
    assert len(hashed) == len(ckpt_module.FILES)  # the new checkpoint's own files, once, for its manifest
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000004"]


def test_a_run_that_starts_over_a_run_without_checkpoints_starts_clean(micro, tmp_path, read_metrics):
    """An earlier run in the same output_dir died before its first checkpoint (here: its checkpoints removed).
    The new run starts from step 0 with the configuration it is given: its own tokenizer (not the one the
    dead run saved), and metrics without the dead run's records (no second step-0 evaluation)."""
    from retnet.train.data import load_tokenizer

    out = tmp_path / "run"
    trained = [a for a in micro(out, train__steps=1, model__vocab_size=300, data__tokenizer_train_chars=20_000,
                                data__cache_dir=tmp_path / "cache") if not a.startswith("--data.tokenizer=")]
    assert main(trained) == 0
    assert len(load_tokenizer(out / "tokenizer")) == 300
    shutil.rmtree(out / "checkpoints")

    assert main(micro(out, train__steps=2)) == 0  # data.tokenizer: the 512-token test tokenizer
    assert len(load_tokenizer(out / "tokenizer")) == 512
    model = load_checkpoint(out / "checkpoints" / "step_00000002")["model"]
    assert model["model.embed_tokens.weight"].shape[0] == 512
    assert [r["step"] for r in read_metrics(out, "val")] == [0, 2]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]

    assert main(micro(out, train__steps=3)) == 0  # a resume keeps its records up to its checkpoint
    assert [r["step"] for r in read_metrics(out, "val")] == [0, 2, 3]


@pytest.mark.parametrize("where", ["output_dir", "checkpoints"])
def test_output_dir_that_is_a_file_is_a_config_error(where, micro, tmp_path, capsys):
    out = tmp_path / "run"
    if where == "output_dir":
        out.write_text("not a directory")
    else:
        out.mkdir()
        (out / "checkpoints").write_text("not a directory")
    assert main(micro(out, train__steps=1)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "train.output_dir" in err and "not a directory" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------
# 7. What a resumed run logs: the same records as a run never stopped
# ----------------------------------------------------------------------------------------------------------
def _interrupt(monkeypatch, during_step: int, how: str) -> None:
    """Make the next run stop in 1-based step ``during_step``: a SIGTERM before it (the loop stops after it) or a
    crash before it, as a SIGKILL would (the records written after the last checkpoint stay in the file)."""
    from retnet.train.trainer import Trainer

    step = Trainer.train_step

    def train_step(self):
        if self.step == during_step - 1:
            if how == "crash":
                raise RuntimeError("killed")
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def _records(out: Path, read_metrics, kind: str) -> list[tuple]:
    keys = ("step", "loss", "lr", "grad_norm", "tokens") if kind == "train" else ("step", "val_loss")
    return [tuple(r[k] for k in keys) for r in read_metrics(out, kind)]


# The settings of the runs never stopped that several tests compare their stopped runs with: each such run is
# trained once for the module (``uninterrupted``) and only read
LOGGED_EVERY_4 = dict(train__steps=8, logging__log_interval=4, checkpoint__interval=3)
EVALUATED_EVERY_2 = dict(train__steps=4, train__eval_interval=2)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tokenizer_dir, cache_dir, tmp_path_factory):
    """``uninterrupted(**settings)``: the output directory of ``micro(out, **settings)`` trained once for the
    module (the same settings, the same run)."""
    runs = {}

    def run(**settings) -> Path:
        key = json.dumps(settings, sort_keys=True, default=str)
        if key not in runs:
            out = tmp_path_factory.mktemp("uninterrupted") / "whole"
            assert main(micro_args(corpus, tokenizer_dir, cache_dir, out, **settings)) == 0
            runs[key] = out
        return runs[key]

    return run


@pytest.mark.parametrize("how", ["crash", "signal"])
def test_a_resumed_run_logs_the_records_of_an_uninterrupted_one(how, micro, uninterrupted, tmp_path, monkeypatch,
                                                                read_metrics):
    """A record every 4 steps, checkpoints every 3: a crash in step 5 resumes from step 3, a SIGTERM in step 6
    saves step 6, both inside a record's window. The record closing that window averages the steps before the
    checkpoint too (it carries them), so the losses are those of the run never stopped, bit for bit, and a
    stop adds no record of its own."""
    common = LOGGED_EVERY_4
    whole, stopped = uninterrupted(**common), tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _interrupt(patch, during_step=5 if how == "crash" else 6, how=how)
        if how == "crash":
            with pytest.raises(RuntimeError, match="killed"):
                main(micro(stopped, **common))
        else:
            assert main(micro(stopped, **common)) == 0
    assert [r["step"] for r in read_metrics(stopped)] == [4]
    assert main(micro(stopped, **common)) == 0
    assert [r["step"] for r in read_metrics(whole)] == [4, 8]
    assert _records(stopped, read_metrics, "train") == _records(whole, read_metrics, "train")
    assert all(r["tokens_per_s"] > 0 for r in read_metrics(stopped))


@pytest.mark.parametrize("during_step", [2, 4], ids=["eval-step", "final-step"])
def test_a_stop_on_an_eval_step_saves_first_and_the_resume_evaluates(during_step, micro, uninterrupted, tmp_path,
                                                                     monkeypatch, read_metrics):
    """A SIGTERM in a step that ends with an evaluation (step 2 of eval_interval=2, or the final step with its
    evaluation and export) saves and exits without evaluating: a preemption's grace period is short. The
    resumed run evaluates that step first, and ends with the metrics and export of a run never stopped."""
    common = dict(EVALUATED_EVERY_2, checkpoint__export=True)
    whole, stopped = uninterrupted(**common), tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _interrupt(patch, during_step=during_step, how="signal")
        assert main(micro(stopped, **common)) == 0
    assert [p.name for p in list_checkpoints(stopped / "checkpoints")] == [f"step_{during_step:08d}"]
    assert [r["step"] for r in read_metrics(stopped, "val")] == [0, 2][:during_step // 2]  # not the stop step's
    assert not (stopped / "export").exists()

    assert main(micro(stopped, **common)) == 0
    assert [r["step"] for r in read_metrics(whole, "val")] == [0, 2, 4]
    assert _records(stopped, read_metrics, "val") == _records(whole, read_metrics, "val")
    assert _records(stopped, read_metrics, "train") == _records(whole, read_metrics, "train")
    assert (stopped / "export" / "model.safetensors").is_file()



def _stop_at_2_then_crash_at_4(monkeypatch, args: list[str]) -> None:
    """A SIGTERM during step 2 (saves, evaluation left pending), then a resume that evaluates step 2 and is
    killed during step 4, before its next checkpoint."""
    for how, during_step in (("signal", 2), ("crash", 4)):
        with monkeypatch.context() as patch:
            _interrupt(patch, during_step=during_step, how=how)
            if how == "crash":
                with pytest.raises(RuntimeError, match="killed"):
                    main(args)
            else:
                assert main(args) == 0


def test_the_evaluation_left_by_a_stop_is_not_logged_twice(micro, uninterrupted, tmp_path, monkeypatch, read_metrics):
    """The resumed run evaluates the step a SIGTERM left unevaluated, then crashes before its next checkpoint:
    the run after it resumes from the same checkpoint and evaluates that step again, in place of the record
    the crashed run wrote, not beside it."""
    common = EVALUATED_EVERY_2
    # the run never stopped: the export test_a_stop_on_an_eval_step_saves_first_and_the_resume_evaluates's (an
    # export after the last step changes none of its records)
    whole, stopped = uninterrupted(**common, checkpoint__export=True), tmp_path / "stopped"
    _stop_at_2_then_crash_at_4(monkeypatch, micro(stopped, **common))
    assert [r["step"] for r in read_metrics(stopped, "val")] == [0, 2]
    assert main(micro(stopped, **common)) == 0
    assert _records(stopped, read_metrics, "val") == _records(whole, read_metrics, "val")
    assert _records(stopped, read_metrics, "train") == _records(whole, read_metrics, "train")


# 16 blocks of 128 tokens a step: a few of the corpus's documents (up to 3000 characters each)
STREAMED_6 = dict(data__streaming=True, data__val_documents=10, train__steps=6, data__seq_len=128,
                  train__global_batch_size=16, train__micro_batch_size=8)


def _count_encodes(patch: pytest.MonkeyPatch) -> list[int]:
    """[the documents the stream's encoder tokenized], counted from now on (``patch`` undoes it)."""
    from retnet.train import streaming as streaming_module

    counter, real = [0], streaming_module.document_encoder

    class Counting:
        def __init__(self, tokenizer):
            self.inner = real(tokenizer)

        def encode(self, *args, **kwargs):
            counter[0] += 1
            return self.inner.encode(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    patch.setattr(streaming_module, "document_encoder", Counting)
    return counter


@pytest.fixture(scope="module")
def streamed_uninterrupted(corpus, tokenizer_dir, cache_dir, tmp_path_factory) -> tuple[Path, int]:
    """The streamed run of STREAMED_6 never stopped, trained once for the module: (its output directory, the
    documents it tokenized)."""
    out = tmp_path_factory.mktemp("streamed") / "whole"
    with pytest.MonkeyPatch.context() as patch:
        counter = _count_encodes(patch)
        assert main(micro_args(corpus, tokenizer_dir, cache_dir, out, **STREAMED_6)) == 0
    return out, counter[0]


@pytest.mark.parametrize("checkpoint_holds", ["stream-place", "blocks-only"])
def test_a_streamed_resume_replays_the_losses_without_tokenizing_what_it_read(checkpoint_holds, micro,
                                                                              streamed_uninterrupted, tmp_path,
                                                                              monkeypatch, read_metrics):
    """A streamed run stopped at step 3 and resumed trains on the blocks of a run never stopped (bit-equal
    losses), and tokenizes only the documents after its checkpoint's place in the stream: those of the two
    runs add up to those of the uninterrupted one. A checkpoint written before that place was saved (only the
    number of blocks read) still resumes, by tokenizing the stream again up to it."""
    counter = _count_encodes(monkeypatch)
    common = STREAMED_6
    (whole, uninterrupted), stopped = streamed_uninterrupted, tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _interrupt(patch, during_step=3, how="signal")
        assert main(micro(stopped, **common)) == 0
    before_stop, counter[0] = counter[0], 0
    if checkpoint_holds == "blocks-only":
        path = list_checkpoints(stopped / "checkpoints")[-1]
        state = load_checkpoint(path)
        for rank in state["trainer"]["ranks"]:
            rank["data"] = {"kind": "streaming", "position": rank["data"]["position"]}
        save_checkpoint(stopped / "checkpoints", 3, model=state["model"], optimizer=state["optimizer"],
                        trainer=state["trainer"], keep_last=2)
    assert main(micro(stopped, **common)) == 0
    assert _records(stopped, read_metrics, "train") == _records(whole, read_metrics, "train")
    replayed = before_stop if checkpoint_holds == "blocks-only" else 0
    assert 1 < before_stop < uninterrupted - 1
    assert counter[0] == uninterrupted - before_stop + replayed


def _tensorboard_steps(out: Path) -> dict[str, list[int]]:
    """The steps of each scalar TensorBoard shows (purges applied), in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in ("train/loss", "val/val_loss")}


def test_tensorboard_shows_the_evaluation_left_by_a_stop_once(micro, tmp_path, monkeypatch, read_metrics):
    """As in metrics.jsonl: the evaluation a SIGTERM left pending at step 2, logged by a resume that crashed
    before its next checkpoint and redone by the next resume, is one point at step 2, beside step 2's training
    record (which that step's purge must not lose)."""
    from tensorboard.summary.writer import event_file_writer

    # TensorBoard reads a folder's event files in name order: "events.out.tfevents.<second>.<host>.<pid>.<n>", n
    # counting the writers of the process. The runs here start within a second or two of each other, in this
    # process: numbered on from the writers of earlier tests in this worker, a run's n could pass 9 (or 99) and its
    # file sort before the earlier run's of the same second ("…10" < "…9"), whose purge would then undo its points.
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))
    common = dict(train__steps=4, train__eval_interval=2, logging__tensorboard=True)
    stopped = tmp_path / "stopped"
    _stop_at_2_then_crash_at_4(monkeypatch, micro(stopped, **common))
    assert main(micro(stopped, **common)) == 0
    assert [r["step"] for r in read_metrics(stopped, "val")] == [0, 2, 4]
    assert _tensorboard_steps(stopped) == {"train/loss": [1, 2, 3, 4], "val/val_loss": [0, 2, 4]}


# ----------------------------------------------------------------------------------------------------------
# 8. Data settings: a resume continues the same token stream, or is refused
# ----------------------------------------------------------------------------------------------------------
def test_resuming_with_other_data_settings_is_refused_naming_each(micro, two_steps, corpus, tmp_path, capsys):
    """A checkpoint's data position counts blocks of the token stream its settings made: with another dataset,
    block length, text field, validation split or shuffling seed it would point into other blocks, and the run
    would silently stop being a continuation. Refused with each changed setting named, nothing written."""
    out = copy_of(two_steps, tmp_path / "run")
    root = out / "checkpoints"
    before = _tree_digest(root)
    moved = tmp_path / "elsewhere" / "docs.jsonl"
    moved.parent.mkdir()
    shutil.copy(corpus, moved)
    cases = [
        (dict(data__seq_len=64), ["data.seq_len: checkpoint 32, now 64"]),
        (dict(data__dataset=moved), [f"data.dataset: checkpoint {str(corpus)!r}, now {str(moved)!r}"]),
        (dict(data__text_field="body"), ["data.text_field: checkpoint 'text', now 'body'"]),
        (dict(data__val_fraction=0.2), ["data.val_fraction: checkpoint 0.1, now 0.2"]),
        (dict(data__max_documents=100), ["data.max_documents: checkpoint 0, now 100"]),
        (dict(train__seed=7), ["train.seed: checkpoint 1337, now 7"]),
        (dict(data__seq_len=64, train__seed=7, train__resume=root / "step_00000002"),
         ["data.seq_len: checkpoint 32, now 64", "train.seed: checkpoint 1337, now 7"]),
    ]
    for overrides, expected in cases:
        assert main(micro(out, train__steps=4, **overrides)) == EXIT_CONFIG, overrides
        err = capsys.readouterr().err
        assert all(line in err for line in expected), err
        assert "step_00000002" in err and "another train.output_dir" in err and "Traceback" not in err
        assert _tree_digest(root) == before


def test_resuming_with_settings_that_keep_the_data_is_allowed(micro, two_steps, tokenizer_dir, tmp_path, read_metrics):
    """What does not change the blocks or their order stays free on a resume: the steps (extending a run),
    logging, evaluation, checkpointing, the batch split, the optimizer, the cache location, the streaming
    split size of a packed run, and tokenizer settings while the run's saved tokenizer is the one it uses."""
    out = copy_of(two_steps, tmp_path / "run")
    copy = tmp_path / "tokenizer-copy"
    shutil.copytree(tokenizer_dir, copy)
    assert main(micro(out, train__steps=4, logging__log_interval=2, train__eval_interval=3, train__eval_blocks=4,
                      checkpoint__interval=3, checkpoint__keep_last=1, train__micro_batch_size=1, optim__lr=1e-3,
                      data__cache_dir=tmp_path / "other-cache", data__val_documents=50, data__tokenizer=copy,
                      data__tokenizer_train_chars=1000, model__vocab_size=300)) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 4]


def test_a_resume_without_its_saved_tokenizer_refuses_another_one(micro, two_steps, tokenizer_dir, tmp_path, capsys):
    """A resume tokenizes with the copy saved in output_dir; where that copy is gone it takes the configured
    tokenizer, which must then be the one the checkpoint was trained with."""
    out = copy_of(two_steps, tmp_path / "run")
    shutil.rmtree(out / "tokenizer")
    copy = tmp_path / "tokenizer-copy"
    shutil.copytree(tokenizer_dir, copy)
    assert main(micro(out, train__steps=4, data__tokenizer=copy)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"data.tokenizer: checkpoint {str(tokenizer_dir)!r}, now {str(copy)!r}" in err
    assert main(micro(out, train__steps=4)) == 0


def test_a_streamed_resume_refuses_another_validation_split(micro, tmp_path, capsys):
    """A stream's validation split is its first data.val_documents documents, kept out of training: another
    count changes what is trained on. data.val_fraction (packed runs) and the seed of the packed permutation
    do not touch a stream."""
    out = tmp_path / "run"
    streamed = dict(data__streaming=True, data__val_documents=10)
    assert main(micro(out, **streamed, train__steps=2)) == 0
    before = _tree_digest(out / "checkpoints")
    assert main(micro(out, **{**streamed, "data__val_documents": 20}, train__steps=4)) == EXIT_CONFIG
    assert "data.val_documents: checkpoint 10, now 20" in capsys.readouterr().err
    assert _tree_digest(out / "checkpoints") == before
    assert main(micro(out, **streamed, data__val_fraction=0.2, train__seed=7, train__steps=3)) == 0


def test_a_hub_dataset_run_resumes_offline_from_its_token_cache(micro, corpus, tmp_path, monkeypatch, read_metrics,
                                                                capsys):
    """The checkpoint keeps the fingerprint of the hub data it was trained on: the resume finds its token cache
    without the hub or the HF cache, and refuses a hub set that changed once that cache is gone."""
    import datasets

    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    current = {"text": docs}

    def load_dataset(path, name=None, **kwargs):  # the hub, offline: whatever its HF cache holds
        assert path == "someone/corpus"
        if current is None:
            raise ConnectionError("offline, and the dataset is not in the HF cache")
        return datasets.Dataset.from_dict(current)

    def load_dataset_builder(path, name=None, **kwargs):  # which builder reads it: a repository of Parquet files
        if current is None:
            raise ConnectionError("offline, and the dataset is not in the HF cache")
        return types.SimpleNamespace(name="parquet")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "load_dataset_builder", load_dataset_builder)
    cache, out = tmp_path / "cache", tmp_path / "run"
    hub = dict(data__dataset="someone/corpus", data__cache_dir=cache)
    assert main(micro(out, **hub, train__steps=2)) == 0
    current = None
    assert main(micro(out, **hub, train__steps=4)) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    for tokens in cache.glob("tokens-*"):
        shutil.rmtree(tokens)
    current = {"text": [d.replace("def ", "async def ") for d in docs]}
    capsys.readouterr()
    assert main(micro(out, **hub, train__steps=6)) == EXIT_CONFIG
    assert "data.dataset 'someone/corpus' now holds other data than the checkpoint" in capsys.readouterr().err


def test_tokens_count_what_each_step_trained_on_across_a_batch_change(micro, two_steps, tmp_path, monkeypatch,
                                                                       read_metrics):
    """A resume may change the global batch: the "tokens" of a record count the tokens trained on, not the
    step times the current batch, and tokens/s counts each step of a window at its own batch."""
    import itertools
    import time
    import types

    from retnet.train import trainer as trainer_module

    out = copy_of(two_steps, tmp_path / "run")  # logging.log_interval 1: 4 blocks of 32 tokens a step
    assert main(micro(out, train__steps=4, logging__log_interval=1, train__global_batch_size=8)) == 0
    assert [r["tokens"] for r in read_metrics(out)] == [128, 256, 512, 768]

    # every step takes 1 s; a SIGTERM stops after step 1 (128 tokens), inside the window that step 2 (256) closes
    clock = itertools.count()
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock)),
                                                                      time=time.time))
    window = tmp_path / "window"
    with monkeypatch.context() as patch:
        _interrupt(patch, during_step=1, how="signal")
        assert main(micro(window, train__steps=2, logging__log_interval=2)) == 0
    assert main(micro(window, train__steps=2, logging__log_interval=2, train__global_batch_size=8)) == 0
    [record] = read_metrics(window)
    assert (record["step"], record["tokens"], record["tokens_per_s"]) == (2, 384, 192.0)


def test_rng_states_of_more_gpus_than_this_machine_has_restore_the_ones_it_has(monkeypatch):
    """A packed run may resume on another world size, and so on a machine with fewer GPUs: each rank saved the
    states of every GPU it saw, and restoring one per saved state asked for devices that are not there."""
    from retnet.train.checkpoint import rng_state, set_rng_state

    state = {**rng_state(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}
    restored = {}

    def set_one(new_state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        assert (index or 0) < 2, f"no GPU {index} on this machine"
        restored[index or 0] = int(new_state[0])

    def set_all(new_states):
        for index, new_state in enumerate(new_states):
            set_one(new_state, index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_one)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    set_rng_state(state)
    assert restored == {0: 0, 1: 1}


# ----------------------------------------------------------------------------------------------------------
# 9. The sharded layout (torch distributed checkpoint; the default under FSDP2)
# ----------------------------------------------------------------------------------------------------------
def test_sharded_and_full_checkpoints_resume_each_other(micro, tmp_path, read_metrics):
    """A run saved in the full layout, resumed in the sharded one, then in the full one again, replays the
    uninterrupted run's losses bit for bit: each layout holds the whole model and optimizer state, and a
    resume reads whichever layout the checkpoint has."""
    whole, mixed = tmp_path / "whole", tmp_path / "mixed"
    common = dict(checkpoint__interval=2, checkpoint__keep_last=5, optim__schedule="constant")
    assert main(micro(whole, **common, train__steps=6)) == 0
    assert main(micro(mixed, **common, train__steps=2)) == 0
    assert main(micro(mixed, **common, train__steps=4, checkpoint__layout="sharded")) == 0
    assert main(micro(mixed, **common, train__steps=6, checkpoint__layout="full")) == 0
    assert [r["loss"] for r in read_metrics(mixed)] == [r["loss"] for r in read_metrics(whole)]
    sharded = mixed / "checkpoints" / "step_00000004"
    manifest = verify_checkpoint(sharded)
    assert manifest["layout"] == "sharded"
    assert {"trainer.pt", "state/.metadata", "state/__0_0.distcp"} <= set(manifest["files"])
    assert not (sharded / "model.pt").exists()
    # Tools read a sharded checkpoint whole: the same weights as the full layout's at that step.
    ckpt_module._checked.clear()
    got, expected = load_checkpoint(sharded), load_checkpoint(whole / "checkpoints" / "step_00000004")
    assert got["layout"] == "sharded" and got["step"] == 4 and got["model"].keys() == expected["model"].keys()
    assert all(torch.equal(got["model"][k], expected["model"][k]) for k in expected["model"])


def test_a_corrupt_shard_is_refused_by_name(micro, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(micro(out, train__steps=2, checkpoint__layout="sharded")) == 0
    shard = out / "checkpoints" / "step_00000002" / "state" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ckpt_module._checked.clear()
    capsys.readouterr()
    assert main(micro(out, train__steps=4, checkpoint__layout="sharded")) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "__0_0.distcp" in err and "corrupt" in err and "Traceback" not in err


def test_a_manifest_listing_a_path_outside_the_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 2, model={"w": torch.zeros(2)}, optimizer={}, trainer={}, keep_last=1)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = manifest["files"]["trainer.pt"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a path inside the checkpoint"):
        verify_checkpoint(path)


def test_a_sharded_save_whose_shards_rank_0_cannot_see_is_refused(tmp_path):
    """Nodes that do not share train.output_dir: the other ranks' shards are on their own disks, and a manifest
    without them would be a checkpoint that verifies but cannot load."""
    from retnet.train.checkpoint import commit_checkpoint, new_temp_dir

    root = tmp_path / "checkpoints"
    tmp = new_temp_dir(root, 3)
    (tmp / "state").mkdir()
    (tmp / "state" / ".metadata").write_bytes(b"m")
    (tmp / "state" / "__0_0.distcp").write_bytes(b"0")
    elsewhere = {"state/__1_0.distcp": {"sha256": "0" * 64, "bytes": 1}}  # hashed on another node
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp.*filesystem they share"):
        commit_checkpoint(root, 3, tmp, trainer={}, keep_last=1, layout="sharded", hashed=elsewhere)
    assert list_checkpoints(root) == [] and not tmp.exists()
