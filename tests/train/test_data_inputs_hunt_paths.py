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


def _write(root: Path, names) -> None:
    import pandas as pd

    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame({"text": [f"{name} row {i}" for i in range(3)]})
        if path.suffix == ".parquet":
            frame.to_parquet(path)
        elif path.suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_json(path, orient="records", lines=True)


# (the train split's files, another split's, files named otherwise beside them that the suggested glob must not take)
@pytest.mark.parametrize("train, other, beside", [
    (["data/train-00000-of-00001.parquet"], ["data/test-00000-of-00001.parquet"], ["data/constraints.parquet"]),
    (["data/train-00000-of-00002-0a1b2c3d.parquet", "data/train-00001-of-00002-4e5f6a7b.parquet"],
     ["data/validation-00000-of-00001-8c9d0e1f.parquet"], []),  # the hub's older shard names
    (["wiki.train.jsonl"], ["wiki.valid.jsonl"], ["pretrain.jsonl", "strained.jsonl"]),
    (["train.jsonl"], ["test.jsonl", "val.jsonl"], ["latest.jsonl"]),
    (["train/part-0.csv"], ["dev/part-0.csv"], ["devices.csv", "latest.csv"]),
    (["data/validation/a.jsonl"], ["data/test/a.jsonl"], ["data/eval-harness/a.jsonl"]),
    (["train.jsonl"], ["eval.jsonl"], ["retrieval.jsonl"]),  # datasets' other words for the test split
    (["training.jsonl"], ["testing.jsonl"], []),
    (["train/a.jsonl"], ["evaluation/a.jsonl"], []),
])
def test_a_directory_of_several_splits_files_is_refused_not_trained_on_whole(tmp_path, train, other, beside):
    """Read as one set, the test (or validation) files of a dataset laid out as datasets names its splits were
    trained on, unseen; load_dataset(directory) reads its train split alone. The glob suggested selects the first
    split's files and no other (a "*train*" took pretrain.jsonl, a "*dev*" devices.csv)."""
    from retnet.train.data import local_files

    root = tmp_path / "set"
    _write(root, [*train, *other, *beside])
    split = "validation" if "validation" in train[0] else "train"
    for spec in (str(root), str(root / "**" / ("*" + Path(train[0]).suffix))):
        with pytest.raises(ConfigError, match=rf"holds the files of several splits.*{split}: {len(train)} file.*"
                                              r"e\.g\. '(.*)', or give each as a data\.mixture source") as refused:
            local_files(spec)
        hint = re.search(r"e\.g\. '([^']*)', or give", str(refused.value)).group(1)
        assert [p.relative_to(root).as_posix() for p in local_files(hint)] == sorted(train)
    # one split's files, and files named otherwise, are read as before
    assert local_files(str(root / train[0])) == [root / train[0]]
    other = tmp_path / "plain"
    other.mkdir()
    for name in ("pretrain.jsonl", "contest.jsonl", "train-1.jsonl"):
        (other / name).write_text('{"text": "a"}\n')
    assert len(local_files(str(other))) == 3
    for name in ("train.md", "test.md"):  # a document each, not a split's rows
        (tmp_path / "docs" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "docs" / name).write_text("a")
    assert len(local_files(str(tmp_path / "docs"))) == 2


def test_no_glob_is_suggested_where_none_selects_the_train_files_alone(tmp_path):
    from retnet.train.data import local_files

    _write(tmp_path, ["train.jsonl", "wiki.train.jsonl", "test.jsonl"])
    with pytest.raises(ConfigError, match=r"train: 2 file.*test: 1 file.*with globs given as data\.mixture sources "
                                          r"\(no one glob selects the train files alone here\), or give each") as no:
        local_files(str(tmp_path))
    assert "e.g. '" not in str(no.value).split("would be read together")[1]


@pytest.mark.parametrize("names", [
    ("training-data.jsonl", "my-dev-notes.jsonl"),
    ("train_set.jsonl", "unit_test_cases.jsonl"),
    ("training-logs.csv", "model-evaluation.csv"),
    ("python_train.jsonl", "eval-harness/cases.jsonl"),
    ("python-train.parquet", "python-test-generation.parquet"),
    ("train_config.json", "test_utils.json"),
    ("train.part.jsonl", "test-0.jsonl", "dev-00000.jsonl", "training/a.jsonl", "testing/a.jsonl"),
])
def test_files_that_only_mention_a_split_word_are_one_set(tmp_path, names):
    """A split word inside a longer name or folder name is no split layout (datasets' own patterns take these too):
    such a folder was refused as several splits though it is the one set a user means to train on."""
    from retnet.train.data import local_files

    root = tmp_path / "set"
    _write(root, names)
    assert sorted(p.relative_to(root).as_posix() for p in local_files(str(root))) == sorted(names)
