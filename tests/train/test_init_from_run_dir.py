"""model.init_from given what retnet-train writes that is no model: refused naming the directory to give."""

import json

import pytest

from retnet.train.config import ConfigError
from retnet.train.trainer import _check_pretrained_dir


def test_a_runs_output_dir_or_checkpoint_as_init_from_names_its_export(tmp_path):
    # The run's own config.json (its training configuration) and saved tokenizer let it pass as a model before.
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {"output_dir": str(run)}}))
    (run / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model.init_from .*is a training run's train.output_dir, not a model "
                                          r"\(its export, .*run/export'?, is not written yet"):
        _check_pretrained_dir(run)
    with pytest.raises(ConfigError, match=r"model.init_from .*step_00000004' is a training checkpoint .*run/export"):
        _check_pretrained_dir(step)


def test_a_config_file_that_is_not_utf8_is_one_error_naming_it(tmp_path):
    from retnet.train.config import load_config

    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[optim]\nlr = 1e-3 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"--config .*bad.toml' is not UTF-8 text"):
        load_config(str(bad))
