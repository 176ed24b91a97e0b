"""Preference rows with an implicit prompt (TRL's ``chosen``/``rejected`` without a ``prompt`` column, the format of
TRL's reward datasets): the prompt is the two's common beginning, TRL's ``extract_prompt``, and the pairs are those
of the same rows with the prompt given; rows that cannot be split are refused naming the row."""

from __future__ import annotations

import numpy as np
import pytest

from retnet.train.config import ConfigError
from retnet.train.preference import extract_prompt

from .test_preference import PAIRS, build, conversational, standard, toy, write_jsonl  # noqa: F401 - toy: the fixture


def _same_pairs(left, right) -> None:
    for a, b in ((left.train, right.train), (left.val, right.val)):
        assert np.array_equal(a.lengths, b.lengths) and np.array_equal(a.rows, b.rows)
        assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_trls_extract_prompt():
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert extract_prompt("It is blue", "It is black") == ("It is bl", "ue", "ack")
    user = {"role": "user", "content": "Q?"}
    yes, no = {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}
    assert extract_prompt([user, yes], [user, no]) == ([user], [yes], [no])


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_an_implicit_prompt_gives_the_pairs_of_the_explicit_one(toy, tmp_path, kind):  # noqa: F811
    row = {"standard": standard, "conversational": conversational}[kind]
    explicit, implicit = [], []
    for i in range(PAIRS):
        r = row(i)
        if kind == "standard":  # TRL's split: the completion keeps the space before the first differing word
            explicit.append({"prompt": r["prompt"] + " Maybe,", "chosen": " yes", "rejected": " no"})
            implicit.append({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]})
        else:
            explicit.append(r)
            implicit.append({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]})
    given = build(toy, write_jsonl(tmp_path / "explicit.jsonl", explicit))
    extracted = build(toy, write_jsonl(tmp_path / "implicit.jsonl", implicit))
    _same_pairs(given, extracted)


@pytest.mark.parametrize(("rows", "problem"), [
    ([{"chosen": "Yes.", "rejected": "No."}], "'chosen' and 'rejected' of {path}, row 3 have no common beginning"),
    ([{"chosen": [{"role": "assistant", "content": "y"}], "rejected": [{"role": "assistant", "content": "n"}]}],
     "'chosen' and 'rejected' of {path}, row 3 have no common beginning"),
])
def test_rows_without_a_common_beginning_are_refused(toy, tmp_path, rows, problem):  # noqa: F811
    conversation = isinstance(rows[0]["chosen"], list)
    good = [conversational(i) if conversation else standard(i) for i in range(6)]
    good = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in good]
    good[3] = rows[0]
    path = write_jsonl(tmp_path / "bad.jsonl", good)
    with pytest.raises(ConfigError) as refused:
        build(toy, path)
    message = str(refused.value)
    assert problem.format(path=repr(str(path))) in message and "give a 'prompt' column" in message, message


def test_a_row_of_mismatched_formats_is_refused_naming_it():
    from retnet.train.preference import implicit_pair

    with pytest.raises(ConfigError, match=r"'chosen' and 'rejected' of 'p.jsonl', row 2: hold str and list; expected "
                                          r"two strings \(standard format\) or two lists of messages"):
        implicit_pair("p.jsonl", 2, "Q? yes", [{"role": "user", "content": "Q?"}])


def test_a_text_prompt_beside_whole_conversations_is_taken_from_them(toy, tmp_path):  # noqa: F811
    """HuggingFaceH4/ultrafeedback_binarized's shape: a string prompt, and chosen/rejected conversations that hold it
    (TRL's maybe_extract_prompt ignores the string): the pairs of the conversational rows."""
    explicit = [conversational(i) for i in range(PAIRS)]
    restated = [{"prompt": r["prompt"][0]["content"], "chosen": r["prompt"] + r["chosen"],
                 "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    given = build(toy, write_jsonl(tmp_path / "explicit.jsonl", explicit))
    extracted = build(toy, write_jsonl(tmp_path / "restated.jsonl", restated))
    _same_pairs(given, extracted)


def test_a_text_prompt_beside_answers_alone_is_refused_as_mixed_formats(toy, tmp_path):  # noqa: F811
    rows = [{"prompt": f"Q{i}?", "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]} for i in range(6)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ConfigError, match=r"'chosen' of .*, row 0: holds list .*expected a string, as the prompt is"):
        build(toy, path)
