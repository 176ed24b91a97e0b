"""GRPO's prompt rows (:mod:`retnet.train.prompts`): what is refused when the rows are read."""

from __future__ import annotations

import pytest

from retnet.train.config import ConfigError, DataConfig
from retnet.train.prompts import load_prompt_rows


def test_a_column_named_as_a_reward_argument_is_refused_at_load(tmp_path):
    import datasets

    cfg = DataConfig(dataset="rows.jsonl", format="prompts")
    fine = datasets.Dataset.from_dict({"prompt": ["2 + 2 ="], "solution": ["4"], "completion": ["4"]})
    assert load_prompt_rows(cfg, None, tmp_path, fine) == [(0, "2 + 2 =", {"solution": "4", "completion": "4"})]
    # the reward functions get every other column as a keyword beside prompts, completions and completion_ids:
    # one of those names would be a TypeError at the first step, after the model was loaded and sampled
    clash = datasets.Dataset.from_dict({"prompt": ["2 + 2 ="], "completions": ["4"]})
    with pytest.raises(ConfigError, match=r"data.dataset 'rows.jsonl' has a 'completions' column"):
        load_prompt_rows(cfg, None, tmp_path, clash)
