"""Post-training paths a TRL user takes (bug hunt 4): ``async def`` reward functions, as TRL's GRPOTrainer awaits
them."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest
import torch

from retnet.train.config import GrpoConfig
from retnet.train.rewards import RewardSources

from .test_grpo import prompts_data, tokenizer_of, toy  # noqa: F401 - toy: the fixture

ASYNC_REWARDS = '''
import asyncio

EVENTS = {}

async def _meet(mine, theirs):
    # each waits for the other to have started: only functions awaited together get past it
    loop = asyncio.get_running_loop()
    for name in (mine, theirs):
        EVENTS.setdefault((id(loop), name), asyncio.Event())
    EVENTS[(id(loop), mine)].set()
    await asyncio.wait_for(EVENTS[(id(loop), theirs)].wait(), timeout=10)
    del EVENTS[(id(loop), theirs)]

async def judge_a(completions, **kwargs):
    await _meet("a", "b")
    return [float(c.count("a")) for c in completions]

async def judge_b(completions, solution, **kwargs):
    await _meet("b", "a")
    return [None if s is None else 0.5 for s in solution]

def plain(completions, **kwargs):
    return [1.0] * len(completions)
'''


@pytest.fixture
def async_rewards(tmp_path, monkeypatch):
    (tmp_path / "async_rewards.py").write_text(ASYNC_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("async_rewards", None)


def test_async_reward_functions_are_awaited_together(toy, async_rewards):  # noqa: F811
    """TRL's GRPOTrainer awaits ``async def`` reward functions (an LLM judge's API calls), all of a step's at
    once; they were called as plain functions, and the coroutine they returned stopped the run ("judge_a returned
    coroutine ... it must return one number per completion"). Called from a running event loop too (a notebook's),
    where ``asyncio.run`` would refuse."""
    tokenizer = tokenizer_of(toy)
    data = prompts_data(toy)
    cfg = GrpoConfig(reward_funcs=["async_rewards:judge_a", "async_rewards:plain", "async_rewards:judge_b"],
                     reward_weights=[1.0, 2.0, 4.0])
    sources = RewardSources(cfg, tokenizer, data.encoder, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    completions = [np.array(tokenizer.encode("aab")), np.array(tokenizer.encode("b"))]
    for _ in range(2):  # the run's loop again at the next step
        got = sources(data.train, np.array([0, 1]), completions)
        assert got.tolist() == [[2.0, 1.0, 0.5], [0.0, 1.0, 0.5]]

    async def inside_a_loop():
        return sources(data.train, np.array([0, 1]), completions)

    assert asyncio.run(inside_a_loop()).tolist() == got.tolist()


def _plotted(monkeypatch, tmp_path, config: dict | None):
    """The axes of the loss.png ``plot_losses`` draws of a one-step run with ``config`` as its config.json."""
    import json

    import matplotlib.pyplot as plt

    from retnet.train.plots import plot_losses

    records = [{"kind": "val", "step": 0, "val_loss": -0.03}, {"kind": "train", "step": 1, "loss": -0.04},
               {"kind": "val", "step": 1, "val_loss": 0.001}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png") == tmp_path / "loss.png"
    return figures[-1].axes[0]


@pytest.mark.parametrize(("config", "label"), [
    ({"data": {"format": "prompts"}}, "GRPO loss"),
    ({"data": {"format": "unpaired"}}, "KTO loss"),
    ({"data": {"format": "preference"}, "dpo": {"loss_type": "ipo"}, "reward": {"enabled": False}},
     "preference loss (ipo)"),
    ({"data": {"format": "preference"}, "dpo": {"loss_type": ["sigmoid", "sft"]}}, "preference loss (sigmoid+sft)"),
    ({"data": {"format": "preference"}, "reward": {"enabled": True}}, "reward model loss"),
    ({"data": {"format": "text"}, "distill": {"teacher": "runs/big/export"}}, "distillation loss (nats/token)"),
    ({"data": {"format": "chat"}}, "cross-entropy (nats/token)"),
    (None, "cross-entropy (nats/token)"),
])
def test_the_loss_plot_names_the_runs_objective_and_its_steps_are_whole(monkeypatch, tmp_path, config, label):
    """loss.png labelled every run's loss "cross-entropy (nats/token)": a GRPO run's negative loss, a DPO, KTO
    or reward model run's too. And a run of one step had ticks at steps 0.2, 0.4 ... between its steps."""
    axes = _plotted(monkeypatch, tmp_path, config)
    assert axes.get_ylabel() == label
    ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
    assert ticks == [0.0, 1.0]


def test_exact_match_takes_a_whole_number_read_as_a_float(toy, tmp_path):  # noqa: F811
    """A JSON ``solution`` column of numbers that are not all whole (42 and 3.5) is read as floats: the 42 row's
    answer reached exact_match as 42.0, compared as the text "42.0", and a completion "42" scored 0. A NaN
    solution (a missing value in a float column) was the text "nan"; it is no solution, as a NaN target_length."""
    import json

    from retnet.train.config import DataConfig
    from retnet.train.data import build_data
    from retnet.train.rewards import exact_match

    rows = [{"prompt": f"Compute {i}:", "solution": answer} for i, answer in enumerate([42, 3.5, 7, None] * 3)]
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(dataset=str(tmp_path / "math.jsonl"), format="prompts", val_fraction=0.1,
                     cache_dir=str(tmp_path / "cache"))
    data = build_data(cfg, vocab_size=300, seed=0, micro_batch=8, global_batch=16, rank=0, local_rank=0,
                      world_size=1, tokenizer_dir=toy / "base", barrier=lambda: None)
    read = {p: c["solution"] for split in (data.train, data.val) for p, c in zip(split.prompts, split.columns)}
    answers = [read["Compute 0:"], read["Compute 1:"], read["Compute 2:"], read["Compute 3:"]]
    assert answers[:3] == [42.0, 3.5, 7.0]  # (datasets' float64 column)
    assert exact_match([" 42\n", "3.5", "7", "anything"], solution=answers) == [1.0, 1.0, 1.0, None]
    assert exact_match(["42.0", "42.5", "nan"], solution=[42.0, 42.0, float("nan")]) == [1.0, 0.0, None]
    assert exact_match(["x", "True"], solution=[" x ", True]) == [1.0, 1.0]
