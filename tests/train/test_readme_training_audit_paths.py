"""What an audit of the README's Training part against the code found: each test holds a claim the code broke."""

from __future__ import annotations

import json

import pytest

from retnet.train.evaluate import EvalError, read_documents


@pytest.fixture
def documents_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(3)))
    return path


@pytest.mark.parametrize("below", [False, True], ids=["a file", "under a file"])
def test_eval_cache_dir_that_cannot_be_a_directory_is_named(documents_file, tmp_path, below):
    # README (Evaluation): bad input exits 2 "with a message naming the option"; datasets failed inside the file
    # and the message blamed --dataset's columns
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cache = blocker / "cache" if below else blocker
    with pytest.raises(EvalError, match=r"^--cache-dir '.*not-a-directory.*' (is not a directory|cannot be created)"):
        read_documents(str(documents_file), cache_dir=str(cache))


def test_eval_cache_dir_is_expanded_and_used(documents_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    docs = read_documents(str(documents_file), cache_dir="~/eval-cache")
    assert len(docs) == 3 and (tmp_path / "eval-cache").is_dir()


def test_reward_eval_cache_dir_that_cannot_be_a_directory_is_named(tmp_path):
    # the reward-model scorer read its pairs with the same unchecked cache directory
    from retnet.train.evaluate_reward import read_pairs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(EvalError, match=r"^--cache-dir '.*not-a-directory' is not a directory"):
        read_pairs(str(pairs), tokenizer=None, cache_dir=str(blocker))


def test_eval_of_data_read_in_place_needs_no_cache_dir(tmp_path, monkeypatch):
    """stdlib and a save_to_disk directory are read in place: retnet-eval on them makes no cache directory, so a
    home (or --cache-dir) where none can be made, a read-only one, does not stop it."""
    import datasets

    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    assert len(read_documents("stdlib", max_documents=2)) == 2
    datasets.Dataset.from_dict({"text": ["a b"]}).save_to_disk(str(tmp_path / "saved"))
    assert read_documents(str(tmp_path / "saved"), cache_dir=str(blocker / "cache")) == ["a b"]
