"""A ``model.init_from`` student whose tokenizer is not the teacher's: the refusal's advice fits the case. It said to
leave data.tokenizer unset or give the teacher's, which a run with model.init_from refuses (its tokenizer is the
model's): only a teacher and a student of one tokenizer can be distilled."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from retnet.train.__main__ import EXIT_CONFIG, main

from .conftest import micro_args, save_micro_base
from .test_distill_teacher_vocab import _teacher, tokenizers  # noqa: F401  (the fixture)


@pytest.mark.parametrize("student_first", [True, False])
def test_an_init_from_student_of_another_tokenizer_is_told_to_pick_another_pair(
        tokenizers, corpus, cache_dir, tmp_path, capsys, monkeypatch, student_first):  # noqa: F811
    code, prose = tokenizers
    # (teacher prose: the student's ids are other tokens; teacher code: the student's ids run past its vocabulary)
    mine, theirs = (code, prose) if student_first else (prose, code)
    teacher = _teacher(tmp_path / "teacher", theirs, ("tokenizer.json", "tokenizer_config.json"))
    student = tmp_path / "student"
    save_micro_base(student, AutoTokenizer.from_pretrained(mine))

    def unread(*args, **kwargs):
        raise AssertionError("the data was built before the teacher was checked")

    monkeypatch.setattr("retnet.train.trainer.build_data", unread)
    args = [a for a in micro_args(corpus, Path(mine), cache_dir, tmp_path / "out")
            if not a.startswith(("--data.tokenizer=", "--model."))]
    assert main([*args, f"--model.init_from={student}", f"--distill.teacher={teacher}"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"distill.teacher {str(teacher)!r}: " in err and "Traceback" not in err, err
    assert (f"the student, model.init_from {str(student)!r}, keeps its own tokenizer: pick a teacher and a student "
            "trained with one tokenizer") in err, err
    assert "data.tokenizer" not in err, err
