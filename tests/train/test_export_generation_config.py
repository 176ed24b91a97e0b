"""What the export (``train.output_dir/export``) saves beside the weights: a fine-tune keeps its base's generation
config (sampling defaults, stop ids), completed from the tokenizer; a chat run's tokenizer holds the template its
conversations were rendered with; ``generate()`` without input ids starts from a ``bos_token_id``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retnet.train.__main__ import main

from .conftest import save_micro_base
from .test_init_from import fine_tune_args

# A chat base's generation config: its EOS and a second stop id (a chat model's end of turn), sampling defaults
# without do_sample (what vLLM and retnet-serve read all the same; transformers refuses to save such a config it
# sees changed)
BASE_GENERATION = {"eos_token_id": [0, 5], "temperature": 0.6, "top_p": 0.8, "top_k": 20, "max_new_tokens": 77}
LORA = {"lora__rank": 4, "lora__alpha": 8}


def conversation(i: int) -> list[dict[str, str]]:
    a, b = i % 7, (i * 3) % 5
    return [{"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]


def no_template_tokenizer(tokenizer_dir: Path):
    """The test BPE (EOS ``<|endoftext|>`` id 0, pad id 1, no BOS) without a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = None
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    return tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir) -> Path:
    """A micro model whose tokenizer has no chat template, with a chat base's ``generation_config.json``."""
    path = tmp_path_factory.mktemp("export-base") / "base"
    save_micro_base(path, no_template_tokenizer(tokenizer_dir))
    (path / "generation_config.json").write_text(json.dumps(BASE_GENERATION))
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export-chats") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(120)))
    return path


@pytest.fixture(scope="module")
def chat_tuned(tmp_path_factory, base, chats, tokenizer_dir, cache_dir) -> Path:
    """A 2-step chat fine-tune of ``base``, exported: its output directory."""
    from .conftest import micro_args

    out = tmp_path_factory.mktemp("export-chat") / "tuned"
    args = micro_args(chats, tokenizer_dir, cache_dir, out, train__steps=2, data__format="chat", data__seq_len=64,
                      checkpoint__export=True)
    assert main(fine_tune_args(args, base)) == 0
    return out


def saved_generation(export: Path) -> dict:
    return json.loads((export / "generation_config.json").read_text())


def generates_without_inputs(export: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        out = model.generate(max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] >= 2
    return out


def assert_bases_generation(export: Path) -> None:
    saved = saved_generation(export)
    for key, value in BASE_GENERATION.items():
        assert saved.get(key) == value, (key, saved)
    assert saved["pad_token_id"] == 1 and saved["bos_token_id"] == 0, saved


# ----------------------------------------------------------------------------------------------------------
# Bug 1: a fine-tune's export keeps its base's generation config
# ----------------------------------------------------------------------------------------------------------
def test_a_fine_tune_exports_its_bases_generation_config(chat_tuned):
    """Its stop ids (the tokenizer's EOS and the base's second one) and sampling defaults, not ``eos_token_id: 0``
    alone; transformers loads it back as such."""
    from transformers import GenerationConfig

    export = chat_tuned / "export"
    assert_bases_generation(export)
    loaded = GenerationConfig.from_pretrained(export)
    assert loaded.eos_token_id == [0, 5] and loaded.temperature == pytest.approx(0.6) and loaded.top_k == 20


def test_a_lora_fine_tune_exports_its_bases_generation_config(base, micro, tmp_path):
    from retnet.train.lora import ADAPTER_DIR

    out = tmp_path / "lora"
    assert main(fine_tune_args(micro(out, checkpoint__export=True, train__steps=2), base, **LORA)) == 0
    assert (out / "export" / ADAPTER_DIR / "adapter_config.json").is_file()
    assert_bases_generation(out / "export")
    generates_without_inputs(out / "export")


def test_prepare_export_puts_the_tokenizers_eos_first_among_the_bases_stop_ids(base, tokenizer_dir, tmp_path):
    """A base whose stop ids lack the tokenizer's EOS gets it first; one that lists it keeps its order; without a
    base generation config the stop id is the tokenizer's EOS alone (an int, as before)."""
    from transformers import AutoModelForCausalLM

    from retnet.model import RetNetForCausalLM
    from retnet.train.checkpoint import prepare_export

    tokenizer = no_template_tokenizer(tokenizer_dir)
    for stops, expected in (([5, 7], [0, 5, 7]), ([5, 0], [5, 0]), (0, 0)):
        other = tmp_path / f"base-{stops}"
        other.mkdir()
        (other / "generation_config.json").write_text(json.dumps({**BASE_GENERATION, "eos_token_id": stops}))
        model = AutoModelForCausalLM.from_pretrained(base)
        prepare_export(model, tokenizer, other)
        assert model.generation_config.eos_token_id == expected
        assert model.generation_config.top_p == pytest.approx(0.8)
        model.save_pretrained(tmp_path / f"saved-{stops}")  # a temperature without do_sample: saved all the same
        assert saved_generation(tmp_path / f"saved-{stops}")["temperature"] == pytest.approx(0.6)
    fresh = RetNetForCausalLM(model.config)  # a generation config of its model config's alone
    prepare_export(fresh, tokenizer, None)
    assert fresh.generation_config.eos_token_id == 0 and fresh.generation_config.temperature in (None, 1.0)
    assert fresh.generation_config.bos_token_id == 0 and fresh.generation_config.pad_token_id == 1


# ----------------------------------------------------------------------------------------------------------
# Bug 2: a chat run's export holds the template its conversations were rendered with
# ----------------------------------------------------------------------------------------------------------
def test_a_chat_runs_export_holds_the_template_it_trained_with(chat_tuned, base):
    """Its tokenizer had none: training rendered with the default template (``retnet.train.chat.chat_template``),
    and ``apply_chat_template`` on the export renders what training rendered (it raised without a template). The
    run's own ``output_dir/tokenizer`` (what a resume reads) stays as it was."""
    from transformers import AutoTokenizer

    from retnet.tokenization import DEFAULT_CHAT_TEMPLATE
    from retnet.train.chat import ChatEncoder

    exported = AutoTokenizer.from_pretrained(chat_tuned / "export")
    assert exported.chat_template == DEFAULT_CHAT_TEMPLATE
    trained = ChatEncoder(AutoTokenizer.from_pretrained(base))  # the base's tokenizer, without a template
    messages = conversation(3)
    assert exported.apply_chat_template(messages, tokenize=False) == trained.render(messages)
    assert (exported.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            == trained.render(messages[:1], add_generation_prompt=True))
    assert not AutoTokenizer.from_pretrained(chat_tuned / "tokenizer").chat_template
    # the template added, nothing else: the vocabulary and special tokens are the run's
    assert (chat_tuned / "export" / "tokenizer.json").read_text() == (chat_tuned / "tokenizer" / "tokenizer.json").read_text()
    assert exported.special_tokens_map == AutoTokenizer.from_pretrained(chat_tuned / "tokenizer").special_tokens_map


def test_a_text_runs_export_adds_no_template(base, micro, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "text"
    assert main(fine_tune_args(micro(out, checkpoint__export=True, train__steps=1), base)) == 0
    assert not AutoTokenizer.from_pretrained(out / "export").chat_template


# ----------------------------------------------------------------------------------------------------------
# Bug 3: generate() without input ids
# ----------------------------------------------------------------------------------------------------------
def test_an_export_generates_without_input_ids(micro, tmp_path, chat_tuned):
    """The tokenizer has no BOS: the export's ``bos_token_id`` is its EOS (training starts every document after
    one), so ``generate()`` with no inputs starts from it (it raised: "bos_token_id has to be defined")."""
    out = tmp_path / "scratch"
    assert main(micro(out, checkpoint__export=True, train__steps=1)) == 0
    saved = saved_generation(out / "export")
    assert saved["bos_token_id"] == 0 and saved["eos_token_id"] == 0 and saved["pad_token_id"] == 1
    assert generates_without_inputs(out / "export")[0, 0].item() == 0
    assert generates_without_inputs(chat_tuned / "export")[0, 0].item() == 0


def test_prepare_export_takes_the_tokenizers_bos_when_it_has_one(base, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from retnet.train.checkpoint import prepare_export

    tokenizer = no_template_tokenizer(tokenizer_dir)
    tokenizer.bos_token = "<|pad|>"  # any token: id 1
    model = AutoModelForCausalLM.from_pretrained(base)
    prepare_export(model, tokenizer, base)
    assert model.generation_config.bos_token_id == 1


def test_a_distilled_students_export_takes_its_teachers_generation_config(base, micro, tmp_path):
    """A student distilled into a new model (no model.init_from) stops on its teacher's stop ids and samples with
    its defaults: it learned the teacher's next tokens, the chat teacher's end-of-turn token among them."""
    from .test_distill import distill_args

    out = tmp_path / "student"
    args = distill_args(micro(out, checkpoint__export=True, train__steps=2), base)
    assert main(args) == 0
    assert_bases_generation(out / "export")
    generates_without_inputs(out / "export")
