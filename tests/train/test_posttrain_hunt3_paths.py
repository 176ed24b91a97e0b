"""Post-training paths found by a third hunt: a resume of an objective without a reference file (a reward model,
SimPO/ORPO, reference-free DPO) on pairs that changed at the same path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from retnet.train.config import ConfigError, DpoConfig, RewardConfig
from retnet.train.preference import Pairs, PreferenceData
from retnet.train.reward import RewardData

# (prompt, chosen, rejected) ids, 0 the EOS
TRAIN = [([5, 6], [7, 0], [8, 9, 0]), ([5, 7], [9, 0], [7, 0]), ([6, 6], [8, 0], [9, 9, 0])]
VAL = [([6, 5], [7, 7, 0], [8, 0])]


def split(rows: list[tuple], swapped: bool = False, margins: list[float] | None = None) -> Pairs:
    parts = [(p, r, c) if swapped else (p, c, r) for p, c, r in rows]
    tokens = np.asarray([t for part in parts for ids in part for t in ids], dtype=np.uint16)
    lengths = np.asarray([[len(ids) for ids in part] for part in parts], dtype=np.int64)
    return Pairs(tokens, lengths, np.arange(len(rows)), margins)


def objective(kind: str, swapped: bool = False, margins: list[float] | None = None) -> PreferenceData:
    data = PreferenceData(split(TRAIN, swapped, margins), split(VAL, swapped, None if margins is None else [0.0]),
                          SimpleNamespace(eos_token_id=0), key="k", seq_len=8, seed=0, micro_batch=1,
                          global_batch=2, rank=0, world_size=1, dataset="pairs.jsonl")
    return RewardData.of(data, RewardConfig(enabled=True)) if kind == "reward" else data


def start(data: PreferenceData, kind: str, checkpoint, tmp_path) -> None:
    dpo = {"simpo": DpoConfig(loss_type="simpo"), "reference_free": DpoConfig(reference_free=True),
           "reward": DpoConfig()}[kind]
    data.start(dpo, None, torch.autocast("cpu", enabled=False), torch.device("cpu"), output_dir=tmp_path,
               checkpoint=checkpoint, progress=False, barrier=lambda: None)


@pytest.mark.parametrize("kind", ["reward", "simpo", "reference_free"])
def test_a_resume_on_other_pairs_without_a_reference_file_is_refused(kind, tmp_path):
    """DPO's reference file holds a digest of the pairs, which a resume compares with the data it reads; a reward
    model, SimPO, ORPO and reference-free DPO have no such file, and a run resumed on a pairs file edited in place
    (chosen and rejected swapped: the opposite preference) went on training on it without a word, its position
    pointing into other pairs."""
    run = objective(kind, margins=[0.5, 1.0, 0.0] if kind == "reward" else None)
    start(run, kind, None, tmp_path)
    state = run.state_dict()

    same = objective(kind, margins=[0.5, 1.0, 0.0] if kind == "reward" else None)
    same.load_state_dict(state)
    start(same, kind, tmp_path / "checkpoints" / "step_00000001", tmp_path)  # the same pairs resume
    assert same.consumed == run.consumed

    other = objective(kind, swapped=True, margins=[0.5, 1.0, 0.0] if kind == "reward" else None)
    other.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"data.dataset 'pairs.jsonl': the pairs changed since the checkpoint was "
                                          r"written: it was trained on 3 train \+ 1 validation pairs"):
        start(other, kind, tmp_path / "checkpoints" / "step_00000001", tmp_path)

    older = objective(kind, swapped=True, margins=[0.5, 1.0, 0.0] if kind == "reward" else None)
    older.load_state_dict({k: v for k, v in state.items() if k != "pairs"})  # a checkpoint from before the digest
    start(older, kind, tmp_path / "checkpoints" / "step_00000001", tmp_path)


def test_a_reward_model_resumed_on_other_margins_is_refused(tmp_path):
    """The reward model's loss reads the margin column too: the same pairs with other margins are other data."""
    run = objective("reward", margins=[0.5, 1.0, 0.0])
    start(run, "reward", None, tmp_path)
    other = objective("reward", margins=[0.5, 2.0, 0.0])
    other.load_state_dict(run.state_dict())
    with pytest.raises(ConfigError, match=r"the pairs changed since the checkpoint was written.*or their 'margin' "
                                          r"values"):
        start(other, "reward", tmp_path / "checkpoints" / "step_00000001", tmp_path)
