"""KTO's data builder refuses, in its own format's words, what DPO's refuses: text files and a missing tokenizer
(the two builders share their start, preference.open_rows: these pin the words KTO passes it)."""

from __future__ import annotations

import json

import pytest

from retnet.train.config import ConfigError, DataConfig
from retnet.train.kto import build_kto_data


def build(cfg: DataConfig):
    return build_kto_data(cfg, seed=0, micro_batch=2, global_batch=2, rank=0, local_rank=0, world_size=1,
                          tokenizer_dir=None, barrier=lambda: None)


def test_text_files_are_refused_naming_the_unpaired_columns(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "0.txt").write_text("text")
    cfg = DataConfig(dataset=str(plain), format="unpaired", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"is text files; data\.format 'unpaired' reads the "
                                          r"\['prompt', 'completion', 'label'\] columns"):
        build(cfg)


def test_rows_without_a_tokenizer_are_refused_naming_unpaired(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Q?", "completion": " yes", "label": True}) + "\n")
    cfg = DataConfig(dataset=str(rows), format="unpaired", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"data\.format 'unpaired' needs the tokenizer of the model it tunes"):
        build(cfg)
