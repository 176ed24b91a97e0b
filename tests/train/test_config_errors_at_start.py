"""retnet-train's refusals of its configuration at the start: a mistyped override is answered before torch and
transformers are imported, in the config loader's words; under torchrun a configuration's error is printed once a
node (every rank reads the same configuration and meets the same error), while a rank's own error is printed by the
rank that met it."""

from __future__ import annotations

import re
import subprocess
import sys
import types

import pytest

from retnet.train import __main__ as train_main
from retnet.train.config_base import ConfigError, launch_env_int

from .conftest import REPO, run_train, train_env


def _train_importtime(args, env):
    """``python -X importtime -m retnet.train ARGS``: its exit status, the stderr lines it printed (the import
    timings left out), the modules it imported and its stderr."""
    process = subprocess.run([sys.executable, "-X", "importtime", "-m", "retnet.train", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    lines = process.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    printed = [line for line in lines if not line.startswith("import time:")]
    return process.returncode, printed, imported, process.stderr


@pytest.mark.parametrize(("override", "error"), [
    ("--train.lrr=1", "retnet-train: error: unknown config key 'train.lrr'; known in [train]: "
                      "['activation_checkpointing', "),
    ("--nosection.x=1", "retnet-train: error: unknown config key 'nosection.x': no section 'nosection'; known: "
                        "['checkpoint', 'data', "),
    ("--optim.lr=fast", "retnet-train: error: optim.lr expects float; got 'fast'"),
    # (the hint for a [model] key took seconds: it built a RetNetConfig, importing torch and transformers)
    ("--model.hiden_size=1", "retnet-train: error: unknown config key 'model.hiden_size' (did you mean "
                             "'model.hidden_size'?); known in [model]: "),
    ("--model.use_xpos=true", "retnet-train: error: unknown config key 'model.use_xpos' (did you mean "
                              "'model.extra.use_xpos'? [model] sets the other RetNetConfig fields through extra)"),
])
def test_a_mistyped_override_is_refused_before_torch_is_imported(override, error):
    returncode, printed, imported, _ = _train_importtime([override], train_env())
    assert returncode == 2 and len(printed) == 1 and printed[0].startswith(error), printed
    assert "retnet.train.config" in imported and not {"torch", "transformers"} & imported


def test_torchrun_prints_a_configuration_error_once():
    done = run_train(["--train.lrr=1"], nproc=2, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and output.count("retnet-train: error: unknown config key 'train.lrr'") == 1, output


@pytest.fixture
def second_rank(monkeypatch):
    """This process as a launch's second rank on its node; the waits ``_config_error`` would sleep, recorded."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    slept = []
    monkeypatch.setattr(train_main, "time", types.SimpleNamespace(sleep=slept.append))
    return slept


def test_another_rank_waits_for_the_first_to_print_the_configurations_error(second_rank, capsys):
    """A rank that is not its node's first leaves the error to the first (torchrun stops it meanwhile); if it is
    still running after the wait, it prints the error itself."""
    assert train_main.main(["--optim.lr=-1"]) == 2
    assert second_rank == [train_main.PEER_WAIT_S]
    assert capsys.readouterr().err == "retnet-train: error: optim.lr must be > 0; got -1.0\n"


def test_a_ranks_own_error_is_printed_at_once(second_rank, capsys, monkeypatch):
    from retnet.train import trainer
    from retnet.train.config import ConfigError

    def fails(config):
        raise ConfigError("data.dataset: this rank's shard is unreadable")

    monkeypatch.setattr(trainer, "Trainer", fails)
    assert train_main.main(["--config", "tiny"]) == 2
    assert second_rank == []
    assert capsys.readouterr().err == "retnet-train: error: data.dataset: this rank's shard is unreadable\n"


@pytest.mark.parametrize("env", [{"LOCAL_RANK": "1"}, {"RANK": "3"}, {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}])
def test_a_process_not_launched_by_torchrun_prints_at_once(env, monkeypatch, capsys):
    # a leftover LOCAL_RANK, or a launcher that sets RANK and stops no one: no one would cut a wait short
    for name in ("LOCAL_RANK", "RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    slept = []
    monkeypatch.setattr(train_main, "time", types.SimpleNamespace(sleep=slept.append))
    assert train_main.main(["--optim.lr=-1"]) == 2
    assert slept == []
    assert capsys.readouterr().err == "retnet-train: error: optim.lr must be > 0; got -1.0\n"


def test_a_launchers_variable_that_is_no_count_is_one_line_naming_it(tmp_path):
    """``WORLD_SIZE=two retnet-train`` was int()'s ValueError traceback (RANK's and LOCAL_RANK's met in the trainer)."""
    env = train_env()
    env["WORLD_SIZE"] = "two"
    returncode, printed, imported, stderr = _train_importtime(
        ["--config", "tiny", f"--train.output_dir={tmp_path / 'run'}"], env)
    assert returncode == 2 and printed == [
        "retnet-train: error: environment variable WORLD_SIZE must be an integer >= 1 (as torchrun sets it), or "
        "unset for a single process; got 'two'"], stderr[-3000:]
    assert not {"torch", "transformers"} & imported


@pytest.mark.parametrize(("name", "value", "least"), [
    ("WORLD_SIZE", "two", 1), ("WORLD_SIZE", "0", 1), ("LOCAL_WORLD_SIZE", "0", 1), ("RANK", "x", 0),
    ("LOCAL_RANK", "-1", 0),
])
def test_launch_env_int_refuses_a_value_that_is_no_count_naming_it(name, value, least, monkeypatch):
    monkeypatch.setenv(name, value)
    message = (f"environment variable {name} must be an integer >= {least} (as torchrun sets it), or unset for a "
               f"single process; got {value!r}")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        launch_env_int(name, 7)


@pytest.mark.parametrize(("value", "expected"), [(None, 7), ("", 7), ("3", 3)])
def test_launch_env_int_reads_an_unset_or_empty_variable_as_its_default(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", value)
    assert launch_env_int("RANK", 7) == expected


def test_empty_launcher_variables_are_unset_as_torchs_env_start_reads_them(monkeypatch):
    """torch's ``env://`` rendezvous takes an empty ``RANK``/``WORLD_SIZE`` for one not set: a plain process,
    rank 0 of 1 (``int('')`` was a ValueError traceback)."""
    from retnet.train.distributed import init_distributed

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "")
    rank, local_rank, world_size, device = init_distributed("cpu")
    assert (rank, local_rank, world_size, device.type) == (0, 0, 1, "cpu")
