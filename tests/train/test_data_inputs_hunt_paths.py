"""Training data as users bring it: a ``save_to_disk`` DatasetDict one of whose splits is empty (a filtered "test")
failed whichever split the run read, with a bare IndexError that blamed the text column of "local files"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import build_data

_BUILD = dict(vocab_size=512, seed=0, micro_batch=1, global_batch=1, rank=0, local_rank=0, world_size=1,
              tokenizer_dir=None, barrier=lambda: None)
_DOCS = [f"document {i}: " + "def f(x):\n    return x + 1\n" * 2 for i in range(12)]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_saved_dataset_dict_with_an_empty_split_reads_its_other_splits(tokenizer_dir, tmp_path, streaming):
    import datasets

    saved = tmp_path / "saved"
    empty = datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")}))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": _DOCS}), "test": empty,
                          "validation": datasets.Dataset.from_dict({"text": _DOCS[:4]})}).save_to_disk(str(saved))

    def build(split: str):
        config = DataConfig(dataset=str(saved), split=split, tokenizer=str(tokenizer_dir), seq_len=16,
                            streaming=streaming, val_documents=2, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
        return build_data(config, **_BUILD)

    data = build("train")
    first = data.micro_batches(1)[0] if streaming else data.train
    assert "document" in data.tokenizer.decode(first.reshape(-1).tolist())
    picked = build("validation")  # a split saved in a DatasetDict is no "one saved Dataset" whose split is refused
    assert "document" in picked.tokenizer.decode(picked.val.reshape(-1).tolist())
    with pytest.raises(ConfigError, match=r"data\.dataset .*saved': its split 'test' holds no rows"):
        build("test")
    with pytest.raises(ConfigError, match=r"data\.split 'dev' is not a split of .*\['test', 'train', 'validation'\]"):
        build("dev")


@pytest.mark.parametrize("layout", [
    ("data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"),  # a hub set downloaded as it is
    ("wiki.train.jsonl", "wiki.valid.jsonl"),
    ("train/part-0.csv", "dev/part-0.csv"),
])
def test_a_directory_of_several_splits_files_is_refused_not_trained_on_whole(tmp_path, layout):
    """Read as one set, the test (or validation) files of a dataset laid out as datasets names its splits were
    trained on, unseen; load_dataset(directory) reads its train split alone."""
    import pandas as pd

    from retnet.train.data import local_files

    root = tmp_path / "set"
    for name in layout:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame({"text": [f"{name} row {i}" for i in range(3)]})
        if path.suffix == ".parquet":
            frame.to_parquet(path)
        elif path.suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_json(path, orient="records", lines=True)
    for spec in (str(root), str(root / "**" / ("*" + Path(layout[0]).suffix))):
        with pytest.raises(ConfigError, match=r"holds the files of several splits.*train: 1 file.*e\.g\. '(.*)', or "
                                              r"give each as a data\.mixture source") as refused:
            local_files(spec)
        hint = re.search(r"e\.g\. '([^']*)', or give", str(refused.value)).group(1)
        assert [p.relative_to(root).as_posix() for p in local_files(hint)] == [layout[0]]
    # one split's files, and files named otherwise, are read as before
    assert local_files(str(root / layout[0])) == [root / layout[0]]
    other = tmp_path / "plain"
    other.mkdir()
    for name in ("pretrain.jsonl", "contest.jsonl", "train-1.jsonl"):
        (other / name).write_text('{"text": "a"}\n')
    assert len(local_files(str(other))) == 3
    for name in ("training.md", "testing.md"):  # a document each, not a split's rows
        (tmp_path / "docs" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "docs" / name).write_text("a")
    assert len(local_files(str(tmp_path / "docs"))) == 2
