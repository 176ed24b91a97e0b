"""Training-config cases of a bug hunt on the overrides and on what a resume compares."""

import os

import pytest

from retnet.train.config import ConfigError, data_changes, load_config


def test_a_resume_reads_a_path_written_with_tilde_as_its_expansion():
    """Every path setting is read with ``~`` expanded, but a resume compared them as written: a run started with
    ``data.dataset = "~/corpus/*.jsonl"`` (a TOML file's) and resumed with ``$HOME/corpus/*.jsonl`` (the shell's) was
    refused as trained on other data, the same files; so was ``data.tokenizer`` and a mixture source's dataset."""
    home = os.path.expanduser("~")
    saved = load_config("tiny", ["--data.dataset=~/corpus/*.jsonl", "--data.tokenizer=~/tok/"]).to_dict()
    now = load_config("tiny", [f"--data.dataset={home}/corpus/*.jsonl", f"--data.tokenizer={home}/tok"])
    assert data_changes(saved, now, tokenizer_reused=False) == []
    saved = load_config("tiny", ["--data.mixture.code={dataset='~/code', weight=1}"]).to_dict()
    now = load_config("tiny", [f"--data.mixture.code={{dataset='{home}/code', weight=1}}"])
    assert data_changes(saved, now, tokenizer_reused=True) == []
    # another directory is still another dataset
    other = load_config("tiny", [f"--data.dataset={home}/other/*.jsonl"])
    saved = load_config("tiny", ["--data.dataset=~/corpus/*.jsonl"]).to_dict()
    assert data_changes(saved, other, tokenizer_reused=True) == [
        f"data.dataset: checkpoint '~/corpus/*.jsonl', now '{home}/other/*.jsonl'"]


def test_a_resume_reads_an_empty_tokenizer_as_none():
    """``data.tokenizer = ""`` (a TOML file, which has no null) and unset (``none``) both train a BPE, but a resume
    whose run's ``tokenizer/`` copy is gone refused the one after the other as another tokenizer."""
    saved = load_config("tiny", ["--data.tokenizer="]).to_dict()
    assert data_changes(saved, load_config("tiny"), tokenizer_reused=False) == []
    assert data_changes(load_config("tiny").to_dict(), load_config("tiny", ["--data.tokenizer="]),
                        tokenizer_reused=False) == []
    changes = data_changes(saved, load_config("tiny", ["--data.tokenizer=tok"]), tokenizer_reused=False)
    assert changes == ["data.tokenizer: checkpoint '', now 'tok'"]


@pytest.mark.parametrize("override, expected", [
    ("--model.extra={use_xpos = true}", ("model", "extra", {"use_xpos": True})),
    ('--model.extra={"use_xpos": true}', ("model", "extra", {"use_xpos": True})),  # JSON, as before
    ("--model.extra={}", ("model", "extra", {})),
    ('--data.mixture={code = {dataset = "src", weight = 0.3}, web = 0.7}',
     ("data", "mixture", {"code": {"dataset": "src", "weight": 0.3}, "web": {"dataset": "web", "weight": 0.7}})),
])
def test_a_whole_table_override_takes_a_toml_inline_table(override, expected):
    """``--model.extra.use_xpos=true`` and ``--data.mixture.code='{dataset="src", weight=0.3}'`` read TOML, as the
    file does, but the whole table (``--model.extra='{use_xpos = true}'``) was read as JSON only and refused:
    "model.extra expects dict"."""
    section, name, value = expected
    assert getattr(getattr(load_config("tiny", [override]), section), name) == value


@pytest.mark.parametrize("text", ["use_xpos", "[]", "null", "{use_xpos = }", "{a = 1}\nb = 2"])
def test_a_whole_table_override_that_is_no_table_is_refused_naming_it(text):
    with pytest.raises(ConfigError, match=r"^model\.extra expects dict; got"):
        load_config("tiny", [f"--model.extra={text}"])


@pytest.mark.parametrize("preset", ["retnet-1.3b", "retnet-2.7b", "retnet-6.7b"])
def test_a_preset_is_read_as_utf8_whatever_the_locale(preset):
    """A preset was read in the locale's encoding: with UTF-8 mode off in an ASCII locale, the paper presets (whose
    comments hold "×" and "β") failed with a UnicodeDecodeError traceback, where a TOML file given by path (read as
    UTF-8) loaded. (A mistyped key ends the command once the preset is read, before torch is imported.)"""
    import subprocess
    import sys

    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    result = subprocess.run([sys.executable, "-m", "retnet.train", "--config", preset, "--train.stepz=1"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "unknown config key 'train.stepz' (did you mean 'train.steps'?)" in result.stderr
