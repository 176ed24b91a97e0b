"""``retnet-eval --json`` of a reward model records ``--seq-len`` and ``--max-prompt-length`` as the user gives them:
null when not given (no cut, the whole prompt), which the flags' own defaults are. It recorded
``max_prompt_length: 0``, a value the flag refuses, so the record could not be passed back. The report is called
with the parsed command line and a scored result (no model to load)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retnet.train import evaluate_reward
from retnet.train.evaluate import _parser
from retnet.train.evaluate_reward import RewardEvalResult
from retnet.train.preference import Pairs
from retnet.train.reward import METRICS

PAIRS = Pairs(np.arange(1, 7, dtype=np.int64), np.array([[2, 2, 2]]), np.array([0]))


def _record(argv: list[str], monkeypatch, capsys) -> dict:
    scored = RewardEvalResult(pairs=1, metrics=dict.fromkeys((*METRICS, "loss"), 0.5), cut=0, seconds=1.0,
                              pairs_per_second=1.0)
    monkeypatch.setattr(evaluate_reward, "evaluate_pairs", lambda *args, **kwargs: scored)
    args = _parser().parse_args(["--model", "rm", "--dataset", "pairs.jsonl", "--json", "--no-progress", *argv])
    assert evaluate_reward.report(args, torch.nn.Linear(1, 1), PAIRS, eos_token_id=0) == 0
    return json.loads(capsys.readouterr().out)


def test_unset_cut_options_are_recorded_as_null(monkeypatch, capsys):
    record = _record([], monkeypatch, capsys)
    assert record["seq_len"] is None and record["max_prompt_length"] is None, record


def test_given_cut_options_are_recorded_as_given_and_parse_back(monkeypatch, capsys):
    record = _record(["--seq-len", "64", "--max-prompt-length", "16"], monkeypatch, capsys)
    assert record["seq_len"] == 64 and record["max_prompt_length"] == 16
    # what the record holds is what the flag takes: passed back, the same command line
    again = _parser().parse_args(["--model", "rm", "--max-prompt-length", str(record["max_prompt_length"])])
    assert again.max_prompt_length == 16


def test_the_flag_refuses_the_zero_the_record_used_to_hold(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", "rm", "--max-prompt-length", "0"])
    assert "--max-prompt-length" in capsys.readouterr().err
