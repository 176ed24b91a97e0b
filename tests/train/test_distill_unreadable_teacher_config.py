"""A teacher whose config.json cannot be read is refused as that, naming distill.teacher and its config.json, before
the data is read: with data.tokenizer unset the teacher's tokenizer was loaded first, and transformers' tokenizer
loader, reading the same config.json, failed first, so the refusal said the teacher's tokenizer could not be the run's
and advised setting data.tokenizer."""

from __future__ import annotations

import shutil

import pytest

from retnet.train.__main__ import EXIT_CONFIG, main


@pytest.mark.parametrize(("content", "error"), [(b"{", "JSONDecodeError"), (b"\xff\xfe{}", "UnicodeDecodeError")])
def test_an_unreadable_teacher_config_is_named_not_its_tokenizer(content, error, micro, tokenizer_dir, tmp_path,
                                                                 capsys, monkeypatch):
    teacher = tmp_path / "teacher"
    shutil.copytree(tokenizer_dir, teacher)  # a tokenizer beside it: the run takes the teacher's
    (teacher / "config.json").write_bytes(content)

    def unread(*args, **kwargs):
        raise AssertionError("the data was built before the teacher was checked")

    monkeypatch.setattr("retnet.train.trainer.build_data", unread)
    out = tmp_path / "out"
    args = [a for a in micro(out) if not a.startswith("--data.tokenizer=")]
    assert main([*args, f"--distill.teacher={teacher}"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"distill.teacher {str(teacher)!r}: its config.json could not be read: {error}" in err, err
    assert "tokenizer" not in err.splitlines()[-1].replace(str(teacher), "") and "Traceback" not in err, err
    assert not (out / "checkpoints").exists()
