"""retnet-convert-fla carries a tokenizer's named chat templates (transformers' additional_chat_templates/) over."""

import pytest
from safetensors.torch import save_file
from transformers import AutoTokenizer

from retnet.model.convert_fla import convert_fla_checkpoint

from .fla_checkpoints import _synthetic_fla_checkpoint

TEMPLATES = {"default": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
             "tool_use": "TOOLS:{% for m in messages %}{{ m['content'] }}{% endfor %}"}


@pytest.fixture
def fla_with_templates(tmp_path, bpe_tokenizer):
    source = tmp_path / "fla"
    save_file(_synthetic_fla_checkpoint(source), source / "model.safetensors")
    bpe_tokenizer.chat_template = dict(TEMPLATES)
    bpe_tokenizer.save_pretrained(source)
    assert (source / "additional_chat_templates" / "tool_use.jinja").is_file()  # where transformers keeps it
    return source


def test_named_chat_templates_are_copied(fla_with_templates, tmp_path):
    convert_fla_checkpoint(fla_with_templates, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    # Only chat_template.jinja was copied: the converted model rendered a request with tools with the default one.
    assert tokenizer.chat_template == TEMPLATES
    # Converting again into its own output is still fine.
    convert_fla_checkpoint(fla_with_templates, tmp_path / "out")


def test_another_tokenizers_named_template_in_the_destination_is_refused(fla_with_templates, tmp_path):
    stale = tmp_path / "out" / "additional_chat_templates"
    stale.mkdir(parents=True)
    (stale / "rag.jinja").write_text("another model's template")
    with pytest.raises(ValueError, match=r"would not overwrite \(additional_chat_templates/rag\.jinja\)"):
        convert_fla_checkpoint(fla_with_templates, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
