"""retnet-train's checks at the start found in a bug hunt (a leftover LOCAL_RANK, a name too long for
``--print-config``, a fine-tune resumed under another preset): each test fails without its fix."""

from __future__ import annotations

import errno
import os
import re

import pytest

from retnet.train.config import ConfigError, load_config, model_changes
from retnet.train.distributed import init_distributed


@pytest.mark.parametrize("world_size", [None, "1"])
def test_a_leftover_local_rank_in_a_world_of_one_is_refused_by_name(monkeypatch, world_size):
    """A LOCAL_RANK left in the environment of a plain process (torchrun gives a world of 1 local rank 0): the
    process took itself for local rank 3, left the tokenizer and token cache to a local rank 0 that does not exist
    (a fresh cache then failed as "no such tokenizer directory") and would take cuda:3. It is refused naming the
    variable, as a RANK without WORLD_SIZE is; LOCAL_RANK 0 (or empty) is still a plain process."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("LOCAL_RANK", "3")
    shown = "unset (1)" if world_size is None else "1"
    with pytest.raises(ConfigError, match=rf"^environment variable LOCAL_RANK is 3 but WORLD_SIZE is {re.escape(shown)}: "
                                          r"a single process is local rank 0 .*unset LOCAL_RANK"):
        init_distributed("cpu")
    for value in ("0", ""):
        monkeypatch.setenv("LOCAL_RANK", value)
        assert init_distributed("cpu")[:3] == (0, 0, 1)


def _too_long_paths(tmp_path):
    # a name over the file system's NAME_MAX, and a path over PATH_MAX made of short names
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    return [tmp_path / ("a" * (name_max + 1)) / "run",
            tmp_path.joinpath(*["b" * 200] * (path_max // 200 + 1))]


@pytest.mark.parametrize("which", ["name", "path"])
def test_print_configs_check_refuses_a_name_too_long_as_the_start_does(tmp_path, which):
    """``--print-config --train.output_dir=<300 characters>`` exited 0 while a start refused it ("cannot be
    created: File name too long"): os.path.exists takes such a name for a missing one. The check refuses it in the
    start's words."""
    from retnet.train.__main__ import start_problems
    from retnet.train.trainer import make_output_dir

    path = _too_long_paths(tmp_path)[0 if which == "name" else 1]
    with pytest.raises(ConfigError) as started:
        make_output_dir(path)
    assert os.strerror(errno.ENAMETOOLONG) in str(started.value)
    with pytest.raises(ConfigError) as checked:
        make_output_dir(path, create=False)
    assert str(checked.value) == str(started.value)
    assert start_problems(load_config("tiny", [f"--train.output_dir={path}"])) == [str(started.value)]
    assert not any(p.exists() for p in tmp_path.iterdir())  # nothing made by the check


def test_a_fine_tune_resumed_under_another_preset_is_no_model_change():
    """A model.init_from run's architecture is its init_from model's (the trainer's architecture_changes compares
    it): model.preset is read by nothing, yet a resume with another one was refused as "other model settings:
    model.hidden_size: checkpoint 128, now 512 ...". The settings on top of it are still compared."""
    saved = load_config("tiny", ["--model.init_from=/runs/base/export"]).to_dict()
    other_preset = load_config("tiny", ["--model.init_from=/runs/base/export", "--model.preset=small"])
    assert model_changes(saved, other_preset) == []
    theta = load_config("tiny", ["--model.init_from=/runs/base/export", "--model.preset=small",
                                 "--model.extra.rope_theta=500.0"])
    assert model_changes(saved, theta) == ["model.extra.rope_theta: checkpoint 10000.0, now 500.0"]
    scratch = load_config("tiny").to_dict()  # no init_from on either side: the preset is the architecture
    assert model_changes(scratch, load_config("tiny", ["--model.preset=small"])) != []


def test_the_retnet_config_keys_read_without_importing_it_are_its_to_dicts():
    """A mistyped [model] key is answered before torch and transformers are imported: its hint reads
    RetNetConfig's keys from its source and a list of PretrainedConfig's, which must stay RetNetConfig().to_dict()'s
    (a transformers release adding one to it: add it to config._PRETRAINED_CONFIG_KEYS)."""
    import retnet
    from retnet.train.config import _retnet_config_keys

    retnet.register()
    from retnet.model import RetNetConfig

    assert _retnet_config_keys() == set(RetNetConfig().to_dict())


def test_a_long_name_under_a_file_is_refused_as_mkdir_refuses_it(tmp_path):
    """Under a file, mkdir fails with ENOTDIR before it reads a new name's length."""
    from retnet.train.data import creation_problem

    (tmp_path / "f").write_text("")
    assert creation_problem(tmp_path / "f" / ("y" * 300)) == f"{str(tmp_path / 'f')!r} is not a directory"
