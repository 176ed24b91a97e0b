"""GRPO's reward functions: how ``grpo.reward_funcs`` names resolve, and the built-ins on bad column values."""

from __future__ import annotations

import sys

import pytest

from retnet.train.config import ConfigError
from retnet.train.rewards import length_target, matches_pattern, resolve


def test_a_reward_module_in_the_working_directory_resolves_under_the_console_script(tmp_path, monkeypatch):
    # `retnet-train` (a console script) starts with its bin directory as sys.path[0], not the working directory,
    # where `python -m` and TRL's scripts find a user's my_rewards.py
    (tmp_path / "cwd_rewards_probe.py").write_text("def probe(completions, **kwargs):\n"
                                                   "    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_rewards_probe", raising=False)
    func = resolve("cwd_rewards_probe:probe")
    assert func(completions=["a", "b"]) == [1.0, 1.0]
    # an installed module still wins over a file of the same name in the working directory
    (tmp_path / "json.py").write_text("raise RuntimeError('the working directory shadowed an installed module')\n")
    assert resolve("json:dumps")([1]) == "[1]"


def test_a_missing_reward_module_is_still_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(ConfigError, match=r"grpo.reward_funcs: 'no_such_rewards:f': module 'no_such_rewards' cannot "
                                          r"be imported: ModuleNotFoundError"):
        resolve("no_such_rewards:f")


def test_builtin_rewards_name_a_column_value_they_cannot_read():
    # a CSV or a JSON row written with quotes gives strings: not a TypeError from deep inside a training step
    assert length_target(["abcd"], target_length=[4]) == [0.0]
    with pytest.raises(ConfigError, match=r"length_target: the 'target_length' column holds str '4'"):
        length_target(["abcd"], target_length=["4"])
    with pytest.raises(ConfigError, match=r"length_target: the 'target_length' column holds bool True"):
        length_target(["abcd"], target_length=[True])
    assert matches_pattern(["<a>x</a>"], pattern=["<a>.*</a>"]) == [1.0]
    with pytest.raises(ConfigError, match=r"matches_pattern: the 'pattern' column holds '\(unclosed', no regular "
                                         r"expression"):
        matches_pattern(["x"], pattern=["(unclosed"])


def test_length_target_refuses_a_length_it_cannot_aim_at():
    # a length <= 0 scored None silently: a column of such lengths trained on a flat reward without a word
    assert length_target(["abc", "ab"], target_length=[float("nan"), None]) == [None, None]
    for bad in (0, -4, -2.5):
        with pytest.raises(ConfigError, match=rf"'target_length' column holds \w+ {bad}; expected a number of "
                                              r"characters \(> 0\)"):
            length_target(["abcd"], target_length=[bad])


def test_a_runs_output_dir_as_the_reward_model_points_to_its_export(tmp_path):
    # the run's config.json (no model's) passes the config-load check, and its tokenizer lies in a subdirectory:
    # the start quoted transformers' sentencepiece error instead of naming the export
    import json

    import torch

    from retnet.train.config_tuning import GrpoConfig
    from retnet.train.rewards import RewardSources

    run = tmp_path / "rm"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    (run / "export").mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"preset": "tiny"}, "train": {"steps": 2}}))
    (run / "export" / "config.json").write_text(json.dumps({"model_type": "retnet"}))
    with pytest.raises(ConfigError, match=rf"grpo.reward_model '{run}' is a training run's train.output_dir, not a "
                                          rf"model \(did you mean '{run / 'export'}', the run's export\?\)"):
        RewardSources(GrpoConfig(reward_model=str(run)), tokenizer=None, encoder=None,
                      device=torch.device("cpu"), autocast=None, stops=[0])
