"""Known gaps closed: a NaN/Infinity in the JSON of preference pairs and GRPO prompts is refused naming the file,
the line and the column, as for text and chat data; a chat session's pending token that its history also holds
stays counted after a restart; ``--print-config`` reports what a start would refuse."""

from __future__ import annotations

import pytest

from retnet.tokenization import train_byte_level_bpe, wrap_tokenizer
from tests.serve.conftest import CORPUS, save_micro_model, serve_app
from tests.serve.test_session_fuzz_paths import ASK, IM_END, IM_START, NEXT, chat, word_ids


# ----------------------------------------------------------------------------------------------------------
# Session files
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def anyio_backend():
    return "asyncio"


CHATML_BOS = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def bos_is_eos_model_dir(tmp_path_factory):
    """A micro model whose tokenizer knows ChatML's markers as special tokens and whose BOS is its EOS (GPT-2's,
    Phi's)."""
    backend = train_byte_level_bpe(CORPUS, vocab_size=384, min_frequency=1).backend_tokenizer
    backend.add_special_tokens([IM_START, IM_END])
    tokenizer = wrap_tokenizer(backend)
    tokenizer.bos_token = tokenizer.eos_token
    return save_micro_model(tmp_path_factory.mktemp("bos-is-eos"), tokenizer)


@pytest.mark.anyio
async def test_a_pending_token_the_history_also_holds_stays_counted_after_a_restart(bos_is_eos_model_dir, tmp_path):
    """The answer ends on the EOS, which the next chat turn leaves out (ChatML's closer writes nothing of it), but
    the history holds it too, fed as the BOS: the conversation sent fresh penalises it, and so must the session read
    back from its file. (A migration that dropped the pending token from an older file's ``seen`` could not tell
    this history from one that never fed it: no released version wrote the files it was meant for.)"""
    overrides = {"chat_template": CHATML_BOS, "session_dir": str(tmp_path / "sessions")}
    async with serve_app(bos_is_eos_model_dir, **overrides) as client:
        tokenizer = client.app.state.serving.tokenizer
        eos, words = tokenizer.eos_token_id, word_ids(tokenizer)
        first = await chat(client, [{"role": "user", "content": ASK}], session_id="s", max_tokens=8, min_tokens=2,
                           allowed_token_ids=[*words, eos], logit_bias={str(eos): 100})
        assert first["token_ids"][-1] == eos
    following = {"max_tokens": 3, "allowed_token_ids": [*words, eos], "repetition_penalty": 10.0,
                 "logit_bias": {str(eos): 8}}
    async with serve_app(bos_is_eos_model_dir, **overrides) as client:
        continued = await chat(client, [{"role": "user", "content": NEXT}], session_id="s", **following)
        whole = await chat(client, [{"role": "user", "content": ASK},
                                    {"role": "assistant", "content": first["message"]["content"]},
                                    {"role": "user", "content": NEXT}], **following)
    assert continued["token_ids"] == whole["token_ids"]


# ----------------------------------------------------------------------------------------------------------
# NaN/Infinity in preference pairs and GRPO prompts
# ----------------------------------------------------------------------------------------------------------
NON_FINITE = {  # format, the file's text, where the refusal names
    "chosen": ("preference", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                             '{"prompt": "q2", "chosen": NaN, "rejected": "b"}\n', "line 2: 'chosen' holds NaN"),
    "prompt of a pair": ("preference", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                                       '{"prompt": -Infinity, "chosen": "a", "rejected": "b"}\n',
                         "line 2: 'prompt' holds -Infinity"),
    "implicit prompt": ("preference", '[{"chosen": "q a", "rejected": "q b"}, {"chosen": "q a", "rejected": Infinity}]',
                        "row 2: 'rejected' holds Infinity"),
    "message content of a pair": ("preference", '{"prompt": "q", "chosen": [{"role": "assistant", "content": NaN}], '
                                                '"rejected": [{"role": "assistant", "content": "b"}]}\n',
                                  "line 1: 'chosen' holds NaN"),
    "prompt": ("prompts", '{"prompt": "q", "answer": "1"}\n{"prompt": NaN, "answer": "2"}\n',
               "line 2: 'prompt' holds NaN"),
    "message content of a prompt": ("prompts", '{"prompt": [{"role": "user", "content": Infinity}]}\n',
                                    "line 1: 'prompt' holds Infinity"),
}


def _load(fmt: str, text: str, tmp_path):
    from retnet.train.config import DataConfig
    from retnet.train.data import local_files
    from retnet.train.preference import load_pairs
    from retnet.train.prompts import load_prompt_rows

    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / ("rows.json" if text.startswith("[") else "rows.jsonl")
    path.write_text(text)
    config = DataConfig(dataset=str(path), format=fmt, cache_dir=str(tmp_path / "cache"))
    return {"preference": load_pairs, "prompts": load_prompt_rows}[fmt](config, local_files(config.dataset),
                                                                          tmp_path / "cache")


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_a_non_finite_number_in_a_pair_or_prompt_is_named(case, tmp_path):
    """pandas read the NaN as null: the row was refused as holding None, which the file does not say."""
    from retnet.train.config import ConfigError

    fmt, text, where = NON_FINITE[case]
    with pytest.raises(ConfigError, match=r"rows\.jsonl?', " + where + ": not JSON"):
        _load(fmt, text, tmp_path)


def test_a_non_finite_number_elsewhere_keeps_its_row_and_a_margin_its_check(tmp_path):
    """A column the run does not read as text (a score; a prompt row's other columns, for the reward functions) keeps
    its row, as text data's does; a margin is a number, refused by its own check as before."""
    from retnet.train.config import ConfigError

    pairs = '{"prompt": "q", "chosen": "a", "rejected": "b", "score": NaN}\n'
    assert _load("preference", pairs, tmp_path / "pairs") == [(0, ("q", "a", "b"))]
    prompts = _load("prompts", '{"prompt": "q", "answer": 1.5}\n{"prompt": "r", "answer": NaN}\n', tmp_path / "p")
    assert [(row, prompt) for row, prompt, _ in prompts] == [(0, "q"), (1, "r")]
    margin = '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": Infinity}\n'
    with pytest.raises(ConfigError, match=r"'margin' of .*, row 0: holds float inf; expected a finite number"):
        _load("preference", margin, tmp_path / "margin")


# ----------------------------------------------------------------------------------------------------------
# --print-config
# ----------------------------------------------------------------------------------------------------------
def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("retnet-train: error: ")]


PATH_CASES = {  # the overrides, given a folder holding a file "afile"; the words of the refusal
    "dataset glob": (["--data.dataset={d}/none/*.jsonl"], "glob '{d}/none/*.jsonl' matches no files"),
    "output_dir a file": (["--train.output_dir={d}/afile"], "'{d}/afile' exists and is not a directory"),
    "output_dir under a file": (["--train.output_dir={d}/afile/run"], "'{d}/afile' is not a directory"),
    "init_from missing": (["--model.init_from={d}/model"], "model.init_from '{d}/model': no such directory"),
    "resume missing": (["--train.resume={d}/step_00000002"], "'{d}/step_00000002' does not exist"),
    "tokenizer missing": (["--data.tokenizer={d}/tok"], "no such tokenizer directory: '{d}/tok'"),
    "cache_dir a file": (["--data.cache_dir={d}/afile"], "data.cache_dir '{d}/afile' is not a directory"),
    "cache_dir under a file": (["--data.cache_dir={d}/afile/c"], "'{d}/afile/c' cannot be created: '{d}/afile' is"),
}


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_print_config_reports_what_a_start_would_refuse(case, run_here, tmp_path):
    """``--print-config`` printed the configuration and exited 0 for paths the start refuses at once (exit 2): it
    now prints it and then those refusals, in the start's words, exit 2, creating nothing."""
    import json

    (tmp_path / "afile").write_text("not a directory")
    overrides, words = PATH_CASES[case]
    args = ["--config", "tiny", f"--train.output_dir={tmp_path}/run", "--train.steps=1", "--optim.warmup_steps=0",
            *(o.format(d=tmp_path) for o in overrides)]
    printed = run_here([*args, "--print-config"])
    assert printed.returncode == 2
    assert json.loads(printed.stdout)["train"]["steps"] == 1
    assert words.format(d=tmp_path) in printed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    if "under a file" not in case:  # (a start's words are mkdir's OSError's there)
        started = run_here(args)
        assert started.returncode == 2 and _errors(printed.stderr) == _errors(started.stderr)


def test_print_config_reports_every_refusal_and_none_of_a_config_that_starts(run_here, tmp_path):
    import json

    tiny = ["--config", "tiny", f"--train.output_dir={tmp_path}/run"]
    printed = run_here([*tiny, "--print-config", f"--data.dataset={tmp_path}/*.jsonl", f"--model.init_from={tmp_path}/m"])
    assert printed.returncode == 2 and len(_errors(printed.stderr)) == 2
    clean = run_here([*tiny, "--print-config"])
    assert clean.returncode == 0 and not _errors(clean.stderr) and json.loads(clean.stdout)
    assert not (tmp_path / "run").exists()


def test_print_config_reads_data_tokenizer_where_auto_has_no_checkpoint_to_resume(run_here, tmp_path):
    """A run that died before its first checkpoint left output_dir/tokenizer: resume=auto starts afresh and reads
    data.tokenizer, which the start refuses; --print-config took the saved tokenizer as the run's."""
    (tmp_path / "run" / "tokenizer").mkdir(parents=True)
    (tmp_path / "run" / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "docs.jsonl").write_text('{"text": "a document"}\n')
    args = ["--config", "tiny", f"--train.output_dir={tmp_path}/run", f"--data.dataset={tmp_path}/docs.jsonl",
            f"--data.tokenizer={tmp_path}/tok", "--train.steps=1", "--optim.warmup_steps=0"]
    printed = run_here([*args, "--print-config"])
    assert printed.returncode == 2
    assert _errors(printed.stderr) == [f"retnet-train: error: data.tokenizer: no such tokenizer directory: "
                                       f"'{tmp_path}/tok'"]
    started = run_here(args)
    assert started.returncode == 2 and _errors(started.stderr) == _errors(printed.stderr)


@pytest.mark.parametrize(("override", "words"), [
    ("--model.init_from=~nosuchuser-r1/model", "model.init_from '~nosuchuser-r1/model': no such directory"),
    ("--data.dataset=~nosuchuser-r1/docs.jsonl", "no such file or directory: '~nosuchuser-r1/docs.jsonl'"),
    ("--data.tokenizer=~nosuchuser-r1/tok", "no such tokenizer directory: '~nosuchuser-r1/tok'"),
])
def test_print_config_refuses_a_home_of_no_such_user_by_name(override, words, run_here, tmp_path):
    """pathlib's expanduser raises a bare RuntimeError for "~name" of no such user: a traceback, exit 1."""
    printed = run_here(["--config", "tiny", f"--train.output_dir={tmp_path}/run", override, "--print-config"])
    assert printed.returncode == 2 and words in printed.stderr


def test_a_non_finite_number_in_a_message_key_not_read_as_text_keeps_its_row(tmp_path):
    """A per-message number (a "weight", a "score") stays a float when read, and the row trained before the check:
    only what is read as text (role, content, a part's text) is refused."""
    from retnet.train.config import DataConfig
    from retnet.train.data import load_conversations, local_files
    from retnet.train.preference import load_pairs
    from retnet.train.prompts import load_prompt_rows

    def load(fmt, text, loader):
        folder = tmp_path / fmt
        folder.mkdir()
        (folder / "rows.jsonl").write_text(text)
        config = DataConfig(dataset=str(folder / "rows.jsonl"), format=fmt, cache_dir=str(folder / "cache"))
        return loader(config, local_files(config.dataset), folder / "cache")

    pairs = load("preference", '{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", '
                 '"content": "a", "weight": NaN}], "rejected": [{"role": "assistant", "content": "b", "weight": 1.0}]}\n',
                 load_pairs)
    assert len(pairs) == 1
    prompts = load("prompts", '{"prompt": [{"role": "user", "content": "q", "score": NaN}], "answer": "1"}\n',
                   load_prompt_rows)
    assert len(prompts) == 1
    chats = load("chat", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", '
                 '"weight": NaN}]}\n', load_conversations)
    assert len(chats) == 1


# ----------------------------------------------------------------------------------------------------------
# A data.dataset of empty JSON Lines files
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", ["one empty file", "a glob of blank files"])
def test_json_files_without_rows_are_refused_by_name(selection, tmp_path):
    """datasets stops at a set with no rows with a bare StopIteration (or, read before, "Instruction 'train'
    corresponds to no data!"): training and retnet-eval said only that datasets could not read it."""
    from retnet.train.config import ConfigError, DataConfig
    from retnet.train.data import load_documents, local_files
    from retnet.train.evaluate import EvalError, read_documents

    (tmp_path / "a.jsonl").write_text("")
    if selection == "one empty file":
        dataset, held = str(tmp_path / "a.jsonl"), f"its JSON file '{tmp_path}/a.jsonl' holds no rows"
    else:
        (tmp_path / "b.jsonl").write_text("\n \n")
        dataset = str(tmp_path / "*.jsonl")
        held = f"its 2 JSON files hold no rows ('{tmp_path}/a.jsonl', '{tmp_path}/b.jsonl')"
    config = DataConfig(dataset=dataset, cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # the second read finds the first's datasets cache
        with pytest.raises(ConfigError) as refused:
            load_documents(config, local_files(dataset), tmp_path / "cache")
        assert str(refused.value) == f"data.dataset {dataset!r}: {held}"
    with pytest.raises(EvalError) as refused:
        read_documents(dataset, cache_dir=tmp_path / "cache")
    assert str(refused.value) == f"--dataset {dataset!r}: {held}"
