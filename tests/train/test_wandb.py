"""logging.wandb: real W&B runs (offline, in-process micro training), read back from the files W&B writes."""

from __future__ import annotations

import importlib.machinery
import json
import math
import struct
import sys
import types
import zlib
from pathlib import Path

import pytest

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.checkpoint import list_checkpoints
from retnet.train.config import ConfigError, load_config

wandb = pytest.importorskip("wandb")  # the [wandb] extra, in [dev]
from wandb.proto import wandb_internal_pb2  # noqa: E402 - after the skip

HEADER, BLOCK, RECORD_HEADER = b":W&B", 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_file(path: Path) -> list:
    """The ``Record`` protobufs of an offline ``run-<id>.wandb`` file.

    wandb 0.31 has no Python reader for it. The layout is LevelDB's log: a 7-byte file header (``:W&B``, a
    2-byte magic, a version byte), then 32 KiB blocks of chunks, each with a 7-byte header (CRC32 of the type
    byte and the data, the data's length as 2 bytes little-endian, the type: FULL, or FIRST MIDDLE... LAST for
    a record split across blocks); a block's tail too short for a header is padding. A torn last chunk (a
    writer killed mid-record) ends it."""
    data = path.read_bytes()
    assert data[:4] == HEADER, f"{path} is no W&B run file: {data[:7]!r}"
    records, pending, pos = [], b"", len(HEADER) + 3
    while pos + RECORD_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        if (crc, length, kind) == (0, 0, 0):  # zero padding to the block's end
            pos += left
            continue
        if pos + RECORD_HEADER + length > len(data):
            break  # a torn tail: the writer was killed mid-record (what it wrote before is whole)
        chunk = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad CRC at offset {pos}"
        pos += RECORD_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def take_wandb_runs(output_dir: Path, into: Path) -> list[dict]:
    """The offline W&B runs the last training wrote (``output_dir/wandb``), moved to ``into``: id, name, tags,
    config, history by step, exit code.

    W&B's service writes a run's file out after ``finish()`` has returned: it is read once the service has
    stopped (``wandb.teardown``). Moved, because an offline run's folder is named by the second it started and
    its id, so a resume started within the same second as the run it resumes would share it."""
    wandb.teardown()
    (output_dir / "wandb").rename(into)
    runs = []
    for folder in sorted(into.glob("offline-run-*")):
        files = list(folder.glob("run-*.wandb"))
        assert len(files) == 1, files
        run = {"id": None, "name": None, "config": {}, "history": {}, "exit_code": None, "tags": []}
        for record in read_wandb_file(files[0]):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"], run["name"], run["tags"] = record.run.run_id, record.run.display_name, list(record.run.tags)
                updates = record.run.config.update
            elif kind == "config":
                updates = record.config.update
            elif kind == "history":
                row = run["history"].setdefault(record.history.step.num, {})
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                        row[key] = json.loads(item.value_json)
                continue
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
                continue
            else:
                continue
            for item in updates:
                run["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        runs.append(run)
    return runs


def expected_history(records: list[dict]) -> dict[int, dict]:
    """metrics.jsonl's records as W&B rows: TensorBoard's tags (``train/loss``, ``val/val_loss`` ...) by step."""
    rows: dict[int, dict] = {}
    for record in records:
        prefix = "train" if record["kind"] == "train" else "val"
        rows.setdefault(record["step"], {}).update(
            {f"{prefix}/{k}": v for k, v in record.items()
             if k not in ("kind", "step", "time") and isinstance(v, (int, float))})
    return rows


def all_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline, its settings and caches under tmp_path, quiet; torn down after, since W&B reads its
    environment once per process (a later test's WANDB_MODE would be ignored otherwise)."""
    home = tmp_path / "wandb-home"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_TAGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no stdout/stderr wrapping inside pytest's capture
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("NETRC", str(home / "netrc"))  # none: no credentials from this machine
    monkeypatch.setenv("HOME", str(home))
    wandb.teardown()
    yield
    wandb.teardown()


def test_records_config_and_exact_resume_to_the_same_run(offline, micro, tmp_path):
    out = tmp_path / "run"
    # A constant schedule: the redone steps' learning rates do not depend on train.steps, which the resume extends
    common = dict(train__eval_interval=2, checkpoint__interval=2, optim__schedule="constant", logging__wandb="true",
                  logging__wandb_tags="micro,test")
    assert main(micro(out, train__steps=4, **common)) == 0
    state = json.loads((out / "wandb-run.json").read_text())
    (first,) = take_wandb_runs(out, tmp_path / "wandb-1")
    assert first["id"] == state["id"] and state["sent"] == [4, "val"]
    assert first["name"] == "run" and first["tags"] == ["micro", "test"] and first["exit_code"] == 0
    # Every record metrics.jsonl has, value for value, at its step (steps 0..4; validation at 0, 2, 4)
    assert first["history"] == expected_history(all_records(out))
    assert sorted(first["history"]) == [0, 1, 2, 3, 4] and "val/val_loss" in first["history"][2]
    # The W&B config is the run's whole config, as config.json has it
    saved = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in first["config"].items() if k != "_wandb"} == saved
    assert saved["logging"]["wandb"] is True and first["config"]["train"]["steps"] == 4

    # A crash after step 4 was logged but before its checkpoint: the resume (auto, extended to 6 steps) redoes
    # steps 3 and 4 from step 2's checkpoint, bit for bit, and sends W&B only what it lacks, in the same run.
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    for path in sorted(ckpts[-1].rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    ckpts[-1].rmdir()
    assert main(micro(out, train__steps=6, **common)) == 0
    (second,) = take_wandb_runs(out, tmp_path / "wandb-2")
    assert second["id"] == first["id"]
    assert sorted(second["history"]) == [5, 6]  # nothing at or below the step the run had reached
    rows = expected_history(all_records(out))
    assert second["history"] == {step: rows[step] for step in (5, 6)}
    redone = {step: {k: v for k, v in rows[step].items() if k != "train/tokens_per_s"} for step in (3, 4)}
    assert redone == {step: {k: v for k, v in first["history"][step].items() if k != "train/tokens_per_s"}
                      for step in (3, 4)}  # what was not resent is what W&B has: the resume is exact
    assert second["config"]["train"]["steps"] == 6 and second["exit_code"] == 0
    assert json.loads((out / "wandb-run.json").read_text()) == {"id": first["id"], "project": "retnet-stack",
                                                                "sent": [6, "val"]}

    # Resuming from an older checkpoint's path starts a new trajectory: a new W&B run, given the records up to
    # the checkpoint, then its own; wandb-run.json names it, for the next resume to continue.
    assert main(micro(out, train__steps=6, train__resume=out / "checkpoints" / "step_00000004", **common)) == 0
    (branch,) = take_wandb_runs(out, tmp_path / "wandb-3")
    assert branch["id"] != first["id"]
    assert branch["history"] == expected_history(all_records(out))
    assert json.loads((out / "wandb-run.json").read_text()) == {"id": branch["id"], "project": "retnet-stack",
                                                                "sent": [6, "val"]}
    # W&B's note of a step it dropped (below the one it was at): none was sent
    logs = "".join(path.read_text() for path in tmp_path.glob("wandb-*/offline-run-*/logs/debug-internal.log"))
    assert logs and "ignoring partial history record" not in logs


def test_a_failed_run_still_finishes_its_wandb_run(offline, micro, tmp_path, monkeypatch):
    from retnet.train.trainer import Trainer

    out = tmp_path / "run"
    original = Trainer.train_step

    def fail_at_step_3(self):
        if self.step == 2:
            raise RuntimeError("boom")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", fail_at_step_3)
    with pytest.raises(RuntimeError, match="boom"):
        main(micro(out, train__steps=6, logging__wandb="true", logging__wandb_run_name="named"))
    (run,) = take_wandb_runs(out, tmp_path / "wandb")
    assert run["exit_code"] == 1 and run["name"] == "named"  # close() finished it, as failed
    assert sorted(run["history"]) == [0, 1, 2] and run["history"] == expected_history(all_records(out))


def test_wandb_not_installed_is_refused_before_any_data_is_read(micro, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, find_spec sees none
    out = tmp_path / "run"
    assert main(micro(out, logging__wandb="true")) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "logging.wandb" in err and "pip install 'retnet-stack[wandb]'" in err
    assert not out.exists()
    assert main(micro(out, train__steps=1)) == 0  # off (the default), nothing is needed


def test_wandb_that_cannot_start_is_refused_with_its_message(offline, micro, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")  # without an API key (the fixture leaves none)
    wandb.teardown()
    out = tmp_path / "run"
    assert main(micro(out, logging__wandb="true")) == EXIT_CONFIG
    err = capsys.readouterr().err
    # W&B's words: "No API key configured" (0.31), "api_key not configured (no-tty)" (0.19.10, the floor)
    assert "logging.wandb" in err and ("No API key" in err or "api_key not configured" in err)
    assert not (out / "metrics.jsonl").exists() and not list_checkpoints(out / "checkpoints")


def test_wandb_settings_are_checked():
    config = load_config("tiny", ["--logging.wandb_tags=a,b", "--logging.wandb_run_name=x"])
    assert config.logging.wandb is False and config.logging.wandb_tags == ["a", "b"]
    assert config.logging.wandb_project == "retnet-stack" and config.logging.wandb_run_name == "x"
    assert load_config("tiny", ["--logging.wandb_run_name="]).logging.wandb_run_name is None
    for override, key in (("--logging.wandb_project=a/b", "logging.wandb_project"),
                          ("--logging.wandb_project=", "logging.wandb_project"),
                          (f"--logging.wandb_tags={'x' * 65}", "logging.wandb_tags")):
        with pytest.raises(ConfigError, match=key):
            load_config("tiny", [override])


class _FakeRun:
    starting_step = 0

    def __init__(self):
        self.logged, self.finished = [], []

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self, exit_code=None):
        self.finished.append(exit_code)


def _bare_trainer(tmp_path: Path, *, rank: int, resumed: bool = False, step: int = 0, args: tuple = ()):
    """A Trainer with only what its W&B logging reads: the unit under test, without a training run."""
    from retnet.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = load_config("tiny", [f"--train.output_dir={tmp_path / 'run'}", "--logging.wandb=true",
                                       "--train.steps=10", "--optim.warmup_steps=1", *args])
    trainer.rank, trainer.is_main, trainer.resumed, trainer.step = rank, rank == 0, resumed, step
    trainer.stop_requested = trainer._completed = False
    trainer.output_dir = Path(trainer.cfg.train.output_dir)
    trainer.output_dir.mkdir(parents=True, exist_ok=True)
    trainer._writer = trainer._progress = trainer._metrics = trainer._wandb = None
    trainer._previous_handlers = {}
    return trainer


def test_only_the_main_rank_starts_and_logs_to_wandb(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what LoggingConfig's check looks for
    fake.init = lambda **kwargs: calls.append(kwargs) or _FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)

    other = _bare_trainer(tmp_path / "rank1", rank=1)
    other._start_wandb()
    other._log({"kind": "train", "step": 1, "loss": 1.0})
    other.close()
    assert calls == [] and other._wandb is None and not (other.output_dir / "wandb-run.json").exists()

    main_rank = _bare_trainer(tmp_path / "rank0", rank=0)
    main_rank._start_wandb()
    (kwargs,) = calls
    run_id = json.loads((main_rank.output_dir / "wandb-run.json").read_text())["id"]
    assert kwargs["id"] == run_id and kwargs["resume"] == "allow" and kwargs["name"] == "run"
    assert kwargs["project"] == "retnet-stack" and kwargs["dir"] == str(main_rank.output_dir)
    assert kwargs["config"] == main_rank.cfg.to_dict()
    run = main_rank._wandb.run
    main_rank._wandb.log({"kind": "train", "step": 3, "loss": 2.0, "mfu": None, "time": 1.0})
    main_rank._wandb.log({"kind": "train", "step": 3, "loss": 2.0})  # sent already
    main_rank._wandb.log({"kind": "val", "step": 3, "val_loss": math.log(3)})
    assert run.logged == [(3, {"train/loss": 2.0}), (3, {"val/val_loss": math.log(3)})]
    main_rank.close()  # short of train.steps without a stop signal: failed
    assert run.finished == [1] and main_rank._wandb is None


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module: ``calls`` holds each ``init``'s arguments, ``runs`` the runs it returned."""
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what LoggingConfig's check looks for
    fake.calls, fake.runs = [], []

    def init(**kwargs):
        fake.calls.append(kwargs)
        fake.runs.append(_FakeRun())
        return fake.runs[-1]

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def _records(*keys: tuple[int, str]) -> list[dict]:
    return [{"kind": kind, "step": step, **({"loss": 1.0} if kind == "train" else {"val_loss": 2.0})}
            for step, kind in keys]


def test_any_rank0_failure_to_start_wandb_reaches_every_rank(fake_wandb, tmp_path, monkeypatch):
    """Rank 0 answers the other ranks whatever goes wrong (here: wandb-run.json cannot be written, after
    wandb.init), after the long-timeout barrier: W&B's init may outlast the training group's timeout."""
    import torch.distributed as dist

    from retnet.train import wandb_logging

    events, answer_for_others = [], []
    monkeypatch.setattr(wandb_logging, "is_distributed", lambda: True)
    monkeypatch.setattr(wandb_logging, "barrier", lambda: events.append("barrier"))

    def broadcast(objects, src):
        if answer_for_others:
            objects[0] = answer_for_others[0]
        events.append(("broadcast", objects[0]))

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    main_rank = _bare_trainer(tmp_path / "rank0", rank=0)
    (main_rank.output_dir / "wandb-run.json").mkdir()  # a file that cannot be replaced: an OSError
    with pytest.raises(OSError):
        main_rank._start_wandb()
    assert [event if event == "barrier" else event[0] for event in events] == ["barrier", "broadcast"]
    message = events[1][1]
    assert "IsADirectoryError" in message and "wandb-run.json" in message
    assert fake_wandb.runs[0].finished == [1] and main_rank._wandb is None  # the W&B run it started: failed

    answer_for_others.append(message)
    events.clear()
    other = _bare_trainer(tmp_path / "rank1", rank=1)
    with pytest.raises(ConfigError, match="IsADirectoryError"):
        other._start_wandb()
    assert len(fake_wandb.calls) == 1 and events[0] == "barrier"

    answer_for_others.clear()
    events.clear()
    fine = _bare_trainer(tmp_path / "fine", rank=0)
    fine._start_wandb()
    assert events == ["barrier", ("broadcast", None)] and fine._wandb.run is fake_wandb.runs[1]


def test_the_resume_mark_is_saved_only_once_wandb_has_the_records(fake_wandb, tmp_path):
    """wandb.log only queues a record: the mark of what was sent is written when the W&B run has finished
    (it then has them), not at each record (a file write each) - a crash in between would lose those records,
    never sent again by the resume."""
    first = _bare_trainer(tmp_path, rank=0)
    first._start_wandb()
    for record in _records((0, "val"), (1, "train"), (2, "train"), (2, "val"), (3, "train")):
        first._wandb.log(record)
    # a crash here (a kill, an OOM): W&B may not have written or uploaded those records yet
    state = json.loads((first.output_dir / "wandb-run.json").read_text())
    assert state["sent"] == [-1, ""]
    run_id = state["id"]

    resumed = _bare_trainer(tmp_path, rank=0, resumed=True, step=2)  # from step 2's checkpoint
    resumed._start_wandb()
    assert fake_wandb.calls[1]["id"] == run_id
    for record in _records((0, "val"), (1, "train"), (2, "train"), (2, "val"), (3, "train"), (4, "train")):
        resumed._wandb.log(record)  # _open_loggers' records up to the checkpoint, then the redone and new steps
    assert [step for step, _ in fake_wandb.runs[1].logged] == [0, 1, 2, 2, 3, 4]  # W&B drops what it has
    resumed._completed = True
    resumed.close()
    assert fake_wandb.runs[1].finished == [0]
    assert json.loads((tmp_path / "run" / "wandb-run.json").read_text())["sent"] == [4, "train"]

    again = _bare_trainer(tmp_path, rank=0, resumed=True, step=4)
    again._start_wandb()
    for record in _records((3, "train"), (4, "train"), (4, "val"), (5, "train")):
        again._wandb.log(record)
    assert [step for step, _ in fake_wandb.runs[2].logged] == [4, 5]  # after the mark: (4, val) and step 5


def test_wandb_disabled_leaves_the_wandb_run_of_the_output_dir_alone(offline, tmp_path, monkeypatch):
    """WANDB_MODE=disabled: no W&B run, so no wandb-run.json claiming records were sent, and that of an earlier
    W&B run is kept for a later resume with W&B on (which sends it what it missed)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    wandb.teardown()
    trainer = _bare_trainer(tmp_path, rank=0)
    trainer._start_wandb()
    assert trainer._wandb is None  # no W&B run: no record is sent
    trainer.close()
    assert not (trainer.output_dir / "wandb-run.json").exists()

    earlier = {"id": "abc123", "sent": [4, "val"]}
    (trainer.output_dir / "wandb-run.json").write_text(json.dumps(earlier))
    resumed = _bare_trainer(tmp_path, rank=0, resumed=True, step=6)
    resumed._start_wandb()
    assert resumed._wandb is None  # no W&B run: no record is sent
    resumed.close()
    assert json.loads((trainer.output_dir / "wandb-run.json").read_text()) == earlier


def test_a_branch_or_another_project_does_not_continue_the_wandb_run(fake_wandb, tmp_path):
    state = tmp_path / "run" / "wandb-run.json"
    # An explicit resume from an older checkpoint with W&B off starts a new trajectory: a later resume with W&B
    # on must not continue the W&B run of the one it left (its steps 3 and 4 are another trajectory's)
    off = _bare_trainer(tmp_path, rank=0, resumed=True, step=2,
                        args=("--logging.wandb=false", f"--train.resume={tmp_path / 'run/checkpoints/step_00000002'}"))
    state.write_text(json.dumps({"id": "abc123", "project": "retnet-stack", "sent": [4, "val"]}))
    off._start_wandb()
    assert not state.exists()
    # The same explicit resume, but at the step the W&B run had reached: the same trajectory, kept
    state.write_text(json.dumps({"id": "abc123", "project": "retnet-stack", "sent": [2, "val"]}))
    off._start_wandb()
    assert state.exists()

    # Another wandb_project on a resume: the W&B run there is new, and gets every record
    state.write_text(json.dumps({"id": "abc123", "project": "retnet-stack", "sent": [4, "val"]}))
    moved = _bare_trainer(tmp_path, rank=0, resumed=True, step=4, args=("--logging.wandb_project=other",))
    moved._start_wandb()
    assert fake_wandb.calls[-1]["id"] != "abc123" and fake_wandb.calls[-1]["project"] == "other"
    moved._wandb.log(_records((1, "train"))[0])
    assert fake_wandb.runs[-1].logged == [(1, {"train/loss": 1.0})]
    moved.close()
    assert json.loads(state.read_text())["project"] == "other"
    # The same project: continued (a file without one, as the first version wrote it, too)
    state.write_text(json.dumps({"id": "abc123", "sent": [4, "val"]}))
    same = _bare_trainer(tmp_path, rank=0, resumed=True, step=4)
    same._start_wandb()
    assert fake_wandb.calls[-1]["id"] == "abc123"


def test_the_wandb_run_fails_when_the_training_does(fake_wandb, micro, tmp_path, monkeypatch):
    """W&B's exit code is the process's: an error after the last step (the plot's last draw: a full disk there is
    only a warning, another error is raised) or while the trainer is being set up, after the W&B run started,
    finishes it as failed."""
    import retnet.train.plots
    from retnet.train.trainer import Trainer

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib broke")

    monkeypatch.setattr(retnet.train.plots, "plot_losses", broken)
    with pytest.raises(RuntimeError, match="matplotlib broke"):
        main(micro(tmp_path / "late", train__steps=2, logging__wandb="true"))
    assert fake_wandb.runs[-1].finished == [1] and fake_wandb.runs[-1].logged

    monkeypatch.setattr(Trainer, "_open_loggers", no_space)
    with pytest.raises(OSError, match="No space"):
        main(micro(tmp_path / "early", train__steps=2, logging__wandb="true"))
    assert len(fake_wandb.runs) == 2 and fake_wandb.runs[-1].finished == [1]


def test_the_wandb_file_reader_spans_blocks_and_stops_at_a_torn_tail(offline, tmp_path):
    """Records split across 32 KiB blocks are joined; a file whose writer was killed mid-record (the run of a
    crash) gives the records before the torn one."""
    run = wandb.init(project="reader", id="reader1", dir=str(tmp_path), reinit="create_new")
    for step in range(300):
        run.log({"train/loss": step / 7, "pad": "x" * 100}, step=step)
    run.finish()
    wandb.teardown()
    (path,) = tmp_path.glob("wandb/offline-run-*/run-reader1.wandb")
    assert path.stat().st_size > 2 * BLOCK

    def history(file: Path) -> list[int]:
        return [r.history.step.num for r in read_wandb_file(file) if r.WhichOneof("record_type") == "history"]

    assert history(path) == list(range(300))
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(path.read_bytes()[:-3])
    assert history(torn) == list(range(300)) and len(read_wandb_file(torn)) == len(read_wandb_file(path)) - 1
