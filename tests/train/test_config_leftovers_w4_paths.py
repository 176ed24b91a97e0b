"""Config refusals that read as one clear line: an unreadable --config file, a bare boolean flag as the last
argument, an infinite value where a finite positive one is meant, and an empty data.dataset beside a mixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from retnet.train.config import ConfigError, load_config, parse_overrides


def test_an_unreadable_config_file_is_a_config_error_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "run.toml"
    path.write_text("[optim]\nlr = 1e-3\n")

    def refused(self):
        # (the tests run as root, so chmod 000 cannot make the file unreadable)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(ConfigError, match=rf"--config '{path}' cannot be read: Permission denied$"):
        load_config(str(path))


@pytest.mark.parametrize("args", [["--optim.lr=1", "--logging.progress"], ["--logging.progress", "--optim.lr=1"]])
def test_a_bare_boolean_flag_gets_the_hint_wherever_it_stands(args):
    with pytest.raises(ConfigError, match=r"override '--logging.progress' has no value.*write "
                                          r"--logging.progress=VALUE \(a boolean too: =true, not a bare flag\)"):
        parse_overrides(args)


@pytest.mark.parametrize(("override", "message"), [
    ("--optim.lr=1e400", r"optim\.lr must be > 0 and finite; got inf$"),
    ("--optim.lr=-1", r"optim\.lr must be > 0; got -1\.0$"),
    ("--optim.weight_decay=1e400", r"optim\.weight_decay must be >= 0 and finite; got inf$"),
])
def test_an_infinite_value_is_refused_as_not_finite(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


@pytest.mark.parametrize("dataset", ["", "  "])
def test_an_empty_dataset_beside_a_mixture_is_called_empty(dataset):
    with pytest.raises(ConfigError, match=r"data\.dataset is empty; with data\.mixture leave it out .*; got "):
        load_config("tiny", [f"--data.dataset={dataset}", "--data.mixture.stdlib=1"])


def test_an_infinite_mixture_weight_is_refused_as_not_finite():
    with pytest.raises(ConfigError, match=r"data\.mixture\.code\.weight must be a finite number > 0 .*; got inf$"):
        load_config("tiny", ['--data.mixture.code={dataset="x", weight=inf}'])


@pytest.mark.parametrize(("override", "error"), [
    ("--train.context_parallel=3 --data.seq_len=96", "train.context_parallel (3) must divide the world size (2)"),
    ("--train.global_batch_size=3", "train.global_batch_size (3) must be a multiple of"),
])
def test_a_world_size_refusal_is_printed_once_a_node(override, error, monkeypatch, capsys):
    """A refusal of torchrun's world size is every rank's, as a configuration error is: a node's second rank leaves
    it to the first (each rank printed it, met in the trainer)."""
    import types

    from retnet.train import __main__ as train_main
    from retnet.train import trainer

    for name, value in {"LOCAL_RANK": "1", "RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2",
                        "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(name, value)
    slept = []
    monkeypatch.setattr(train_main, "time", types.SimpleNamespace(sleep=slept.append))
    # (the trainer's own check, without the process group a second rank alone would wait for)
    monkeypatch.setattr(trainer, "Trainer", lambda config: config.train.grad_accum_steps(2))
    assert train_main.main(["--config", "tiny", "--train.micro_batch_size=1", *override.split()]) == 2
    assert slept == [train_main.PEER_WAIT_S]
    assert capsys.readouterr().err.startswith(f"retnet-train: error: {error}")
