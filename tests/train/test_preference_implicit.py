"""Preference rows with an implicit prompt (TRL's ``chosen``/``rejected`` without a ``prompt`` column, the format of
TRL's reward datasets): the prompt is the two's common beginning, TRL's ``extract_prompt``, and the pairs are those
of the same rows with the prompt given. Rows whose two share no beginning have no prompt: a reward model trains on
them, each sequence the whole text (conversation rendered whole), as TRL's RewardTrainer; DPO refuses them naming
the rows."""

from __future__ import annotations

import numpy as np
import pytest

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.config import ConfigError, DpoConfig
from retnet.train.preference import extract_prompt

from .conftest import metrics
from .test_preference import (  # noqa: F401 - toy: the fixture
    PAIRS,
    build,
    conversational,
    dpo_args,
    question,
    standard,
    tokenizer_of,
    toy,
    write_jsonl,
)


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


def _unprompted(kind: str, i: int) -> dict:
    """A row whose chosen and rejected share no beginning (their first character, or first message, differs)."""
    if kind == "standard":
        return {"chosen": f"Yes: {question(i)}", "rejected": f"No: {question(i)}"}
    answer = lambda word: {"role": "assistant", "content": f"Maybe, {word}"}
    if kind == "answers":
        return {"chosen": [answer("yes")], "rejected": [answer("no")]}
    return {"chosen": [{"role": "user", "content": question(i)}, answer("yes")],
            "rejected": [{"role": "user", "content": question(i + 1)}, answer("no")]}


def _parts_of_row(data, row: int) -> list[list[int]]:
    """(prompt, chosen, rejected) ids of dataset row ``row``, in whichever split holds it."""
    for pairs in (data.train, data.val):
        found = np.flatnonzero(np.asarray(pairs.rows) == row)
        if len(found):
            return [part.tolist() for part in pairs.parts(int(found[0]))]
    raise AssertionError(f"row {row} is in no split")


@pytest.mark.parametrize("kind", ["standard", "conversational", "answers"])
def test_rows_without_a_common_beginning_are_scored_whole_and_refused_by_dpo(toy, tmp_path, kind):  # noqa: F811
    """No prompt: chosen and rejected are TRL's RewardTrainer's ids of the row (the tokenizer on the text and EOS;
    apply_chat_template of the whole conversation, no generation prompt, then the EOS every completion here
    ends with), as the server's /classify scores those messages; rows with a common beginning beside them keep
    their prompt. DPO refuses the run by the rows when it starts."""
    from retnet.serve.classify import pair_token_ids
    from retnet.tokenization import render_pair
    from retnet.train.chat import chat_template

    extracted = standard if kind == "standard" else conversational
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in map(extracted, range(6))]
    rows[3] = _unprompted(kind, 3)
    path = write_jsonl(tmp_path / "unprompted.jsonl", rows)
    data = build(toy, path)
    tokenizer = tokenizer_of(toy)
    eos = tokenizer.eos_token_id
    prompt, chosen, rejected = _parts_of_row(data, 3)
    assert prompt == []
    render = lambda messages, **options: tokenizer.apply_chat_template(
        messages, tokenize=False, chat_template=chat_template(tokenizer), **options)
    for side, ids in (("chosen", chosen), ("rejected", rejected)):
        whole = rows[3][side]
        if kind == "standard":  # TRL's add_eos, then the tokenizer on the text
            assert ids == tokenizer(text=whole + tokenizer.eos_token)["input_ids"], side
            continue
        trl = tokenizer.apply_chat_template(whole, tokenize=True, return_dict=True,
                                            chat_template=chat_template(tokenizer))["input_ids"]
        # then the EOS, unless the template closed the conversation with it already (the default's): not twice
        assert ids == (trl if trl[-1] == eos else [*trl, eos]) and ids[-2] != eos, side
        # /classify's messages (ClassifyServing._conversation_ids): the history and the last assistant message
        # encoded apart, a lone message rendered whole
        head, completion = render_pair(whole[:-1], [whole[-1:]], render) if len(whole) > 1 else (render(whole), "")
        assert pair_token_ids(tokenizer, head, [completion], False) == [ids], side
    assert all(_parts_of_row(data, row)[0] for row in (0, 1, 2, 4, 5))  # the others keep their prompts

    with pytest.raises(ConfigError) as refused:
        data.start(DpoConfig(), None, None, None, output_dir=tmp_path, checkpoint=None, progress=False,
                   barrier=lambda: None)
    message = str(refused.value)
    assert f"'chosen' and 'rejected' of {str(path)!r}, row(s) 3 have no common beginning" in message, message
    assert "give a 'prompt' column" in message and "reward.enabled=true" in message, message


def test_dpo_on_rows_without_a_common_beginning_is_refused_by_the_cli(toy, tmp_path, capsys):  # noqa: F811
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in map(standard, range(6))]
    rows[2], rows[5] = _unprompted("standard", 2), _unprompted("standard", 5)
    path = write_jsonl(tmp_path / "unprompted.jsonl", rows)
    assert main(dpo_args(toy, tmp_path / "out", data__dataset=path)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "row(s) 2, 5 have no common beginning" in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "reference_logps.pt").exists()


def test_a_reward_model_trains_on_rows_without_a_common_beginning(toy, tmp_path):  # noqa: F811
    """TRL's RewardTrainer takes them (it never extracts a prompt): a short run on rows half without a common
    beginning, packed beside pairs with a prompt, trains with finite losses and metrics, validation included."""
    rows = [_unprompted("standard", i) if i % 2 else
            {"chosen": standard(i)["prompt"] + " Maybe, yes", "rejected": standard(i)["prompt"] + " Maybe, no"}
            for i in range(12)]
    path = write_jsonl(tmp_path / "unprompted.jsonl", rows)
    out = tmp_path / "rm"
    assert main(dpo_args(toy, out, reward__enabled="true", data__dataset=path, train__steps=2,
                         train__eval_interval=2, checkpoint__interval=2)) == 0
    train, val = metrics(out), metrics(out, "val")
    assert [r["step"] for r in train] == [1, 2] and val, (train, val)
    for record in (*train, *val):
        numbers = {k: v for k, v in record.items() if k.endswith(("loss", "accuracy", "margin"))}
        assert numbers and all(np.isfinite(v) for v in numbers.values()), record


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
