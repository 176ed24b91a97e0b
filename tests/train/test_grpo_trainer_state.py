"""GRPO reward functions get TRL's ``trainer_state`` (a ``transformers.TrainerState``: ``global_step`` the optimizer
steps taken when the completions were sampled, ``max_steps`` the run's): a TRL reward function that reads it (a
curriculum over the steps) or names it as a parameter runs unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retnet.train.__main__ import main
from retnet.train.config import ConfigError, GrpoConfig

from .test_grpo import grpo_args, prompts_data, tokenizer_of, toy  # noqa: F401 - toy: the fixture

STATE_REWARDS = '''
STEPS = []

def by_step(completions, trainer_state, **kwargs):
    STEPS.append((trainer_state.global_step, trainer_state.max_steps))
    return [float(trainer_state.global_step)] * len(completions)
'''


@pytest.fixture
def state_rewards(tmp_path, monkeypatch):
    (tmp_path / "state_rewards.py").write_text(STATE_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import state_rewards

    yield state_rewards
    import sys

    sys.modules.pop("state_rewards", None)


def test_reward_functions_get_the_trainer_state(toy, state_rewards):  # noqa: F811
    from transformers import TrainerState

    from retnet.train.rewards import RewardSources

    tokenizer = tokenizer_of(toy)
    data = prompts_data(toy)
    sources = RewardSources(GrpoConfig(reward_funcs=["state_rewards:by_step"]), tokenizer, data.encoder,
                            torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert isinstance(sources.state, TrainerState)
    sources.state.global_step, sources.state.max_steps = 3, 10
    got = sources(data.train, np.array([0, 0]), [np.array(tokenizer.encode("a")), np.array(tokenizer.encode("b"))])
    assert got[:, 0].tolist() == [3.0, 3.0] and state_rewards.STEPS == [(3, 10)]


def test_a_run_hands_its_step_to_the_reward_functions(toy, state_rewards, tmp_path):  # noqa: F811
    """Each generation is scored with the steps taken before it (TRL's global_step), the evaluation after step N
    with N; max_steps is train.steps."""
    out = tmp_path / "run"
    args = grpo_args(toy, out, grpo__reward_funcs="state_rewards:by_step", grpo__beta=0.0,
                     grpo__max_completion_length=2, train__steps=2, train__global_batch_size=8,
                     train__micro_batch_size=8, train__eval_interval=2, train__eval_blocks=1, checkpoint__interval=0)
    assert main(args) == 0
    assert state_rewards.STEPS == [(0, 2), (0, 2), (1, 2), (2, 2)]  # eval at 0, steps 1 and 2, eval at 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in records if r["kind"] == "train"] == [0.0, 1.0]
    assert [r["val_reward"] for r in records if r["kind"] == "val"] == [0.0, 2.0]


def test_a_trainer_state_column_is_refused(toy, tmp_path):  # noqa: F811
    from .test_preference import write_jsonl

    rows = [{"prompt": f"Say a word {i}:", "trainer_state": i} for i in range(8)]
    path = write_jsonl(tmp_path / "state.jsonl", rows)
    with pytest.raises(ConfigError, match="has a 'trainer_state' column, the name of an argument the reward "
                                          "functions get"):
        prompts_data(toy, str(path))


def test_a_reward_model_without_a_tokenizer_is_refused_naming_grpo_reward_model(toy, tmp_path):  # noqa: F811
    """A classifier saved without its tokenizer: the refusal names grpo.reward_model (the setting given), not
    data.tokenizer."""
    from retnet.model import RetNetConfig, RetNetForSequenceClassification
    from retnet.train.rewards import RewardSources

    config = RetNetConfig.from_pretrained(toy / "base")
    config.num_labels = 1
    RetNetForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    data = prompts_data(toy)
    with pytest.raises(ConfigError) as refused:
        RewardSources(GrpoConfig(reward_model=str(tmp_path / "rm")), tokenizer_of(toy), data.encoder,
                      torch.device("cpu"), torch.autocast("cpu", enabled=False))
    message = str(refused.value)
    assert message.startswith(f"grpo.reward_model {str(tmp_path / 'rm')!r}: its tokenizer") and \
        "data.tokenizer" not in message, message
