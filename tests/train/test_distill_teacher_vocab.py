"""The teacher's own tokenizer is checked against the run's whatever files hold it: a teacher directory with only a
``tokenizer.json`` (no ``tokenizer_config.json``) of another vocabulary is refused, by name, as any other is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from retnet.train.config import ConfigError


def _tokenizer(texts: list[str], directory: Path):
    from transformers import AutoTokenizer

    from retnet.tokenization import train_byte_level_bpe

    train_byte_level_bpe(texts, vocab_size=300).save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    """Two BPE tokenizers of the same EOS id whose ids mean other tokens (the second's vocabulary the larger)."""
    root = tmp_path_factory.mktemp("teacher-vocab")
    _tokenizer(["def f(x):\n    return x\n" * 50, "class A:\n    pass\n" * 50], root / "code")
    _tokenizer(["the cat sat on the mat\n" * 50, "a dog ran in the sun\n" * 50], root / "prose")
    return root / "code", root / "prose"


def _teacher(directory: Path, tokenizer_dir: Path, files: tuple[str, ...]) -> Path:
    """A teacher's config.json over ``tokenizer_dir``'s vocabulary, with only ``files`` of that tokenizer."""
    from transformers import AutoTokenizer

    from retnet.model import RetNetConfig
    from retnet.train.data import vocab_bound

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    directory.mkdir()
    RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             vocab_size=vocab_bound(tokenizer), eos_token_id=tokenizer.eos_token_id
                             ).save_pretrained(directory)
    for name in files:
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.mark.parametrize("files", [("tokenizer.json",), ("tokenizer.json", "tokenizer_config.json")])
def test_a_teacher_tokenizer_of_another_vocabulary_is_refused(tokenizers, tmp_path, files):
    from transformers import AutoTokenizer

    from retnet.train.data import vocab_bound
    from retnet.train.distill import teacher_config

    code, prose = tokenizers
    run = AutoTokenizer.from_pretrained(code)
    other = AutoTokenizer.from_pretrained(prose)
    # what tokenizer_mismatch reads alone cannot tell them apart: the EOS id, the run's ids within the teacher's
    assert run.eos_token_id == other.eos_token_id and vocab_bound(run) <= vocab_bound(other)
    teacher = _teacher(tmp_path / "teacher", prose, files)
    with pytest.raises(ConfigError) as refused:
        teacher_config(teacher, run)
    message = str(refused.value)
    assert f"distill.teacher {str(teacher)!r}: its tokenizer is not the run's" in message, message
    assert teacher_config(teacher, other).vocab_size == vocab_bound(other)  # its own tokenizer fits


def test_a_teacher_tokenizer_json_that_cannot_be_read_is_refused_by_name(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    from retnet.train.distill import teacher_config

    code, _ = tokenizers
    teacher = _teacher(tmp_path / "teacher", code, ())
    (teacher / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"distill.teacher .*: its tokenizer could not be read"):
        teacher_config(teacher, AutoTokenizer.from_pretrained(code))


def test_a_teacher_tokenizer_without_an_eos_is_refused_naming_the_teacher(tokenizers, tmp_path):
    """data.tokenizer unset, the teacher's tokenizer is the run's: a tokenizer.json alone names no EOS token, and
    the refusal names distill.teacher (the setting given), not data.tokenizer (unset)."""
    from retnet.train.distill import teacher_tokenizer

    code, _ = tokenizers
    teacher = _teacher(tmp_path / "teacher", code, ("tokenizer.json",))
    with pytest.raises(ConfigError) as refused:
        teacher_tokenizer(teacher)
    message = str(refused.value)
    assert message.startswith(f"distill.teacher {str(teacher)!r}: its tokenizer cannot be the run's") and \
        "has no EOS token" in message and "set data.tokenizer" in message, message
    whole = _teacher(tmp_path / "whole", code, ("tokenizer.json", "tokenizer_config.json"))
    assert teacher_tokenizer(whole) == whole
