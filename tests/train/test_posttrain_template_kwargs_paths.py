"""A row's ``chat_template_kwargs`` column (TRL's) in DPO, KTO and GRPO: TRL's ``apply_chat_template`` renders a
conversational row's prompt, prompt + chosen, prompt + rejected and prompt + completion with
``**example.get("chat_template_kwargs", {})`` (GRPO's prompt through ``maybe_apply_chat_template``); a standard
row's has no effect (no template). These were read by chat SFT only: a Qwen3-style set with a per-row
``enable_thinking: false`` trained other tokens than TRL's, without a word. Checked in process, on the rows the
loaders read and the texts the encoders render (no run)."""

from __future__ import annotations

import re

import pytest

from retnet.train.config import ConfigError, DataConfig

# Qwen3's shape: a row that turns thinking off gets a marker before the conversation (so a whole conversation's
# rendering differs too, the implicit-prompt path) and an empty think block in the generation prompt, which the
# last assistant turn always renders (so the prompt stays a prefix of prompt + completion either way)
OFF = "enable_thinking is defined and not enable_thinking"
TEMPLATE = ("{% if " + OFF + " %}/no_think\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if " + OFF + " %}<think></think>"
            "{% endif %}{% endif %}")
USER = [{"role": "user", "content": "2 + 2?"}]
OFF_KWARGS = {"enable_thinking": False}


@pytest.fixture(scope="module")
def tokenizer():
    from retnet.tokenization import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(["user assistant 2 + 2? 4 5 think no_think"] * 4, vocab_size=280)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def rows_of(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)  # Arrow's None fills: the row without kwargs gets enable_thinking None


def answer(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def test_dpo_renders_a_conversational_rows_prompt_chosen_and_rejected_with_its_kwargs(tokenizer, tmp_path):
    from retnet.train.preference import PairEncoder, load_pairs

    cfg = DataConfig(dataset="pairs.jsonl", format="preference", seq_len=64)
    rows = rows_of([{"prompt": USER, "chosen": answer("4"), "rejected": answer("5"), "chat_template_kwargs": kwargs}
                    for kwargs in (OFF_KWARGS, None)])
    encoder = PairEncoder(tokenizer, cfg)
    texts = [encoder.texts(row, pair) for row, pair in load_pairs(cfg, None, tmp_path, rows)]
    user = "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert texts[0] == (f"/no_think\n{user}<think></think>", "4<|im_end|>\n", "5<|im_end|>\n")
    assert texts[1] == (user, "<think></think>4<|im_end|>\n", "<think></think>5<|im_end|>\n")  # none: as before
    # an implicit prompt whose chosen and rejected share none: each whole conversation rendered with them
    implicit = rows_of([{"chosen": answer("4"), "rejected": answer("5"), "chat_template_kwargs": OFF_KWARGS}])
    (row, pair), = load_pairs(cfg, None, tmp_path, implicit)
    assert encoder.texts(row, pair) == ("", "/no_think\n<|im_start|>assistant\n<think></think>4<|im_end|>\n",
                                        "/no_think\n<|im_start|>assistant\n<think></think>5<|im_end|>\n")


def test_kto_renders_a_conversational_rows_prompt_and_completion_with_its_kwargs(tokenizer, tmp_path):
    from retnet.train.kto import encode_rows, load_rows
    from retnet.train.preference import PairEncoder

    cfg = DataConfig(dataset="rows.jsonl", format="unpaired", seq_len=64)
    rows = load_rows(cfg, None, tmp_path, rows_of([
        {"prompt": USER, "completion": answer("4"), "label": True, "chat_template_kwargs": OFF_KWARGS},
        {"prompt": USER, "completion": answer("5"), "label": False, "chat_template_kwargs": None}]))
    pairs, _ = encode_rows(PairEncoder(tokenizer, cfg), rows, chunk=2)
    decoded = [[tokenizer.decode(part) for part in pairs.parts(i)] for i in range(2)]
    eos = tokenizer.eos_token
    assert decoded[0][0].startswith("/no_think\n") and decoded[0][0].endswith("<think></think>")
    assert decoded[0][1] == f"4<|im_end|>\n{eos}"
    # the KL completion: the other row's tokens as encoded after its own prompt (without kwargs)
    assert decoded[0][2] == decoded[1][1] == f"<think></think>5<|im_end|>\n{eos}"
    assert not decoded[1][0].startswith("/no_think")


def test_grpo_renders_a_conversational_prompt_with_its_kwargs_and_keeps_the_column(tokenizer, tmp_path):
    from retnet.train.prompts import PromptEncoder, load_prompt_rows

    cfg = DataConfig(dataset="prompts.jsonl", format="prompts")
    rows = load_prompt_rows(cfg, None, tmp_path, rows_of([{"prompt": USER, "chat_template_kwargs": kwargs}
                                                          for kwargs in (OFF_KWARGS, None)]))
    encoder = PromptEncoder(tokenizer, cfg)
    prompts = encoder.split(rows)
    user = "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert [tokenizer.decode(ids) for ids in prompts.tokens] == [f"/no_think\n{user}<think></think>", user]
    assert prompts.template_kwargs == [OFF_KWARGS, None]
    # the column still goes to the reward functions (TRL passes every other column), the prompt stays messages
    assert prompts.columns[0]["chat_template_kwargs"] == OFF_KWARGS and prompts.prompts[0] == USER
    # a reward model's rendering is TRL's, without the row's kwargs (its apply_chat_template of prompt + completion)
    assert encoder.text(prompts.prompts[0]) == user


@pytest.mark.parametrize(("fmt", "row"), [
    ("preference", {"prompt": USER, "chosen": answer("4"), "rejected": answer("5")}),
    ("unpaired", {"prompt": USER, "completion": answer("4"), "label": True}),
    ("prompts", {"prompt": USER}),
])
def test_a_bad_kwargs_value_is_refused_naming_the_format_and_row(tokenizer, tmp_path, fmt, row):
    """Checked as chat SFT checks them (a dict of the template's variables, none of the templating's own arguments);
    a standard row's value is not read (TRL applies no template to it)."""
    from retnet.train.kto import load_rows
    from retnet.train.preference import load_pairs
    from retnet.train.prompts import PromptEncoder, load_prompt_rows

    cfg = DataConfig(dataset="rows.jsonl", format=fmt, seq_len=64)

    def load(rows):
        read = {"preference": load_pairs, "unpaired": load_rows, "prompts": load_prompt_rows}[fmt](
            cfg, None, tmp_path, rows_of(rows))
        if fmt == "prompts":
            PromptEncoder(tokenizer, cfg).split(read)
        return read

    reserved = {"add_generation_prompt": True}
    expected = re.escape(f"data.format {fmt!r}: column 'chat_template_kwargs' of 'rows.jsonl', row 1: "
                         f"'add_generation_prompt' is an argument of the templating, not a template variable")
    with pytest.raises(ConfigError, match=expected):
        load([{**row, "chat_template_kwargs": None}, {**row, "chat_template_kwargs": reserved}])
    standard = {name: (value if isinstance(value, bool) else "x") for name, value in row.items()}
    assert len(load([{**standard, "chat_template_kwargs": reserved}])) == 1
