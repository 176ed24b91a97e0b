"""The export of a DPO (or KTO, reward model) run keeps the dropout of the model it tuned: TRL's disable_dropout,
which the run follows, zeroes the training's dropout, not the model's config."""

from __future__ import annotations

import json
import shutil

from retnet.train.__main__ import main
from retnet.train.checkpoint import load_checkpoint
from retnet.train.trainer import _config_dropout

from .test_preference import dpo_args, toy  # noqa: F401 - toy: the fixture


def test_the_export_keeps_the_tuned_models_dropout(toy, tmp_path):  # noqa: F811
    """A base saved with dropout 0.1 trains without it, but its export said dropout 0.0: an SFT from it (or any
    further tuning) silently trained without dropout."""
    base = tmp_path / "base"
    shutil.copytree(toy / "base", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dropout": 0.1}))
    out = tmp_path / "run"
    assert main(dpo_args(toy, out, model__init_from=base, train__steps=1, train__eval_interval=0,
                         train__eval_blocks=2, checkpoint__export=True)) == 0
    assert json.loads((out / "export" / "config.json").read_text())["dropout"] == 0.1
    # what it trained with: the checkpoint's model config
    assert load_checkpoint(out / "checkpoints" / "step_00000001")["trainer"]["model_config"]["dropout"] == 0.0


def test_the_dropout_written_back_is_the_starting_models(tmp_path):
    """init_from's config.json (RetNetConfig's default where it names none), else the preset's."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "retnet", "dropout": 0.25}))
    assert _config_dropout(tmp_path, "tiny") == 0.25
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "retnet"}))
    assert _config_dropout(tmp_path, "tiny") == 0.0
    assert _config_dropout(None, "tiny") == 0.0
