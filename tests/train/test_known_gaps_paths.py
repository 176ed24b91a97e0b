"""Known gaps closed: a NaN/Infinity in the JSON of preference pairs and GRPO prompts is refused naming the file,
the line and the column, as for text and chat data; a chat session's file written before ``seen`` left the pending
token out is read without it; ``--print-config`` reports what a start would refuse."""

from __future__ import annotations

import pytest
import torch

from retnet.tokenization import train_byte_level_bpe, wrap_tokenizer
from tests.serve.conftest import CORPUS, save_micro_model, serve_app
from tests.serve.test_session_fuzz_paths import ASK, BOS, CHATML, IM_END, IM_START, NEXT, chat, word_ids


# ----------------------------------------------------------------------------------------------------------
# Session files of older versions
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def chatml_model_dir(tmp_path_factory):
    """A micro model whose tokenizer knows ChatML's markers as special tokens, its EOS ``<|endoftext|>`` (Qwen's)."""
    backend = train_byte_level_bpe(CORPUS, vocab_size=384, min_frequency=1).backend_tokenizer
    backend.add_special_tokens([IM_START, IM_END, BOS])
    tokenizer = wrap_tokenizer(backend)
    tokenizer.bos_token = BOS
    return save_micro_model(tmp_path_factory.mktemp("retnet-known-gaps"), tokenizer)


def _as_written_before(path, pending: int) -> None:
    """Rewrite a session file as the versions before ``seen`` left the pending token out wrote it: ``seen``
    the distinct ids of every token fed and sampled, the pending one among them, and no ``seen_counts_pending``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    metadata.pop("seen_counts_pending", None)
    tensors["seen"] = torch.cat([tensors["seen"], torch.tensor([pending])]).unique()
    save_file(tensors, str(path), metadata)


@pytest.mark.anyio
async def test_an_older_session_file_does_not_count_its_pending_token(chatml_model_dir, tmp_path):
    """A file of the versions before counted the answer's last token (the EOS here) in ``seen``: read back, the next
    chat turn, which leaves that token out (ChatML's closer writes nothing of it), penalised it, where the
    conversation sent fresh has it nowhere and answers the EOS at once."""
    overrides = {"chat_template": CHATML, "session_dir": str(tmp_path / "sessions")}
    async with serve_app(chatml_model_dir, **overrides) as client:
        tokenizer = client.app.state.serving.tokenizer
        eos, words = tokenizer.eos_token_id, word_ids(tokenizer)
        first = await chat(client, [{"role": "user", "content": ASK}], session_id="s", max_tokens=8, min_tokens=2,
                           allowed_token_ids=[*words, eos], logit_bias={str(eos): 100})
        assert first["token_ids"][-1] == eos and eos not in first["token_ids"][:-1]
    _as_written_before(tmp_path / "sessions" / "s.safetensors", eos)
    following = {"max_tokens": 3, "allowed_token_ids": [*words, eos], "repetition_penalty": 10.0}
    async with serve_app(chatml_model_dir, **overrides) as client:
        continued = await chat(client, [{"role": "user", "content": NEXT}], session_id="s", **following)
        whole = await chat(client, [{"role": "user", "content": ASK},
                                    {"role": "assistant", "content": first["message"]["content"]},
                                    {"role": "user", "content": NEXT}], **following)
    assert whole["token_ids"] == [eos]
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
