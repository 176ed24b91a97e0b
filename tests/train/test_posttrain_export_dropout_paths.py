"""The export of a DPO (or KTO, reward model) run keeps the settings of the model it tuned: TRL's disable_dropout,
which the run follows, zeroes the training's dropout, not the model's config; the fused loss is the training's."""

from __future__ import annotations

import json
import shutil

import pytest

from retnet.train.__main__ import main
from retnet.train.checkpoint import load_checkpoint
from retnet.train.trainer import _starting_values

from .test_preference import PAIRS, conversational, dpo_args, toy  # noqa: F401 - toy: the fixture


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_the_export_config_is_the_tuned_models(toy, tmp_path, objective):  # noqa: F811
    """A base saved with dropout 0.1 trains without it, but its export said dropout 0.0: an SFT from it (or any
    further tuning) silently trained without dropout; and a base saved with fuse_linear_cross_entropy on was
    exported with it off. The export's config.json is the base's."""
    base = tmp_path / "base"
    shutil.copytree(toy / "base", base)
    config = json.loads((base / "config.json").read_text())
    config = {**config, "dropout": 0.1, "fuse_linear_cross_entropy": True}
    (base / "config.json").write_text(json.dumps(config))
    settings = {}
    if objective == "kto":  # the toy pairs as labelled completions
        rows = [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
                for pair in map(conversational, range(PAIRS)) for side in ("chosen", "rejected")]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        settings = {"data__format": "unpaired", "data__dataset": tmp_path / "rows.jsonl"}
    out = tmp_path / "run"
    assert main(dpo_args(toy, out, model__init_from=base, train__steps=1, train__eval_interval=0,
                         train__eval_blocks=2, checkpoint__export=True, **settings)) == 0
    exported = json.loads((out / "export" / "config.json").read_text())
    assert {key: exported.get(key) for key in {*config, *exported} - {"transformers_version"}} == \
        {key: config.get(key) for key in {*config, *exported} - {"transformers_version"}}
    # what it trained with: the checkpoint's model config
    trained = load_checkpoint(out / "checkpoints" / "step_00000001")["trainer"]["model_config"]
    assert trained["dropout"] == 0.0 and trained["fuse_linear_cross_entropy"] is True


def test_the_values_written_back_are_the_starting_models(tmp_path):
    """init_from's config.json (RetNetConfig's default where it names none), else the preset's."""
    keys = {"dropout", "fuse_linear_cross_entropy"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "retnet", "dropout": 0.25,
                                                      "fuse_linear_cross_entropy": True}))
    assert _starting_values(tmp_path, "tiny", keys) == {"dropout": 0.25, "fuse_linear_cross_entropy": True}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "retnet"}))
    assert _starting_values(tmp_path, "tiny", keys) == {"dropout": 0.0, "fuse_linear_cross_entropy": False}
    assert _starting_values(None, "tiny", keys) == {"dropout": 0.0, "fuse_linear_cross_entropy": False}
