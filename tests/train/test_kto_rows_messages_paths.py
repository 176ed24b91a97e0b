"""KTO's labelled rows are called rows, not pairs, in what a KTO run prints through the code it shares with DPO:
the reference log-probs' line as the run starts, and a resume's refusal of rows that changed since (relabelled
here). DPO's messages still say pairs. The data hooks are called directly, on hand-made tokenized rows."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch

from retnet.train import preference
from retnet.train.config import ConfigError
from retnet.train.kto import KtoData
from retnet.train.preference import Pairs, PreferenceData


def _rows(count: int) -> Pairs:
    """``count`` rows of a 2-token prompt, a 2-token completion and a 2-token KL completion."""
    lengths = np.full((count, 3), 2)
    return Pairs(np.arange(count * 6, dtype=np.int64) % 7 + 1, lengths, np.arange(count))


def _data(kind: type, labels: tuple[list, list] = ([True, False, True], [False])):
    splits = _rows(len(labels[0])), _rows(len(labels[1]))
    settings = dict(key="k", seq_len=8, seed=0, micro_batch=1, global_batch=1, rank=0, world_size=1,
                    dataset="rows.jsonl")
    if kind is KtoData:
        data = KtoData(*splits, {"train": np.array(labels[0]), "val": np.array(labels[1])}, None, **settings)
    else:
        data = PreferenceData(*splits, None, **settings)
    data.device, data.autocast, data.group, data.context = torch.device("cpu"), contextlib.nullcontext(), None, None
    return data


@pytest.fixture
def no_model(monkeypatch):
    """The reference pass without a model: zeros of each split's shape."""
    monkeypatch.setattr(preference, "compute_reference",
                        lambda model, splits, **kwargs: [torch.zeros(len(split), 2) for split in splits])


@pytest.mark.parametrize(("kind", "called"), [(KtoData, "rows"), (PreferenceData, "pairs")])
def test_the_reference_line_and_the_changed_data_refusal_name_the_rows(kind, called, tmp_path, no_model, caplog):
    started = _data(kind)
    with caplog.at_level(logging.INFO, logger="retnet.train.preference"):
        started._hold_reference(None, output_dir=tmp_path, checkpoint=None, progress=False, barrier=lambda: None)
    assert f"reference log-probs of 3 train + 1 validation {called} computed in" in caplog.text, caplog.text
    # The resume reads other data (KTO: the same tokens relabelled; DPO: other tokens) under the same reference file
    resumed = _data(kind, ([False, False, True], [False])) if kind is KtoData else _data(kind, ([1, 2, 3, 4], [5]))
    resumed.digest = started.digest
    with pytest.raises(ConfigError) as refused:
        resumed._hold_reference(None, output_dir=tmp_path, checkpoint=tmp_path / "checkpoints" / "step_00000001",
                                progress=False, barrier=lambda: None)
    message = str(refused.value)
    assert f"'rows.jsonl': the {called} changed since the reference log-probs were computed" in message, message
    assert f"holds those of 3 train + 1 validation {called} (sha256" in message, message
    assert f"with the reference of other {called}. Restore the data" in message, message
    if kind is KtoData:
        assert "pair" not in message.replace("unpaired", ""), message
