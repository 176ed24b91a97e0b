"""Bugs found hunting the tokenizer, retnet-convert-fla and distillation paths: each test failed before its fix."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from retnet.model.convert_fla import main


def _fake_fla_checkpoint(directory: Path) -> None:
    """A 1-layer flash-linear-attention RetNet as fla saves it (its config.json fields and tensor names), random."""
    hidden, vocab, width = 32, 64, 48
    config = {"model_type": "retnet", "hidden_size": hidden, "num_heads": 2, "expand_k": 1.0, "expand_v": 2.0,
              "num_hidden_layers": 1, "vocab_size": vocab, "intermediate_size": width, "tie_word_embeddings": True}
    prefix = "model.layers.0."
    weights = {"model.embeddings.weight": torch.randn(vocab, hidden), "model.norm.weight": torch.ones(hidden),
               prefix + "attn_norm.weight": torch.ones(hidden), prefix + "mlp_norm.weight": torch.ones(hidden),
               prefix + "attn.q_proj.weight": torch.randn(hidden, hidden),
               prefix + "attn.k_proj.weight": torch.randn(hidden, hidden),
               prefix + "attn.v_proj.weight": torch.randn(2 * hidden, hidden),
               prefix + "attn.g_proj.weight": torch.randn(2 * hidden, hidden),
               prefix + "attn.o_proj.weight": torch.randn(hidden, 2 * hidden),
               prefix + "attn.g_norm_swish_gate.weight": torch.ones(hidden),
               prefix + "mlp.gate_proj.weight": torch.randn(width, hidden),
               prefix + "mlp.up_proj.weight": torch.randn(width, hidden),
               prefix + "mlp.down_proj.weight": torch.randn(hidden, width)}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    save_file(weights, directory / "model.safetensors")


def test_a_destination_that_cannot_be_written_is_refused_in_a_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """An existing destination directory the user cannot write (or a disk that fills up): mkdir(exist_ok=True)
    passes it, and save_pretrained's PermissionError came out of retnet-convert-fla as a traceback (exit 1), where a
    destination that cannot be created is an error line (exit 2)."""
    from retnet.model.modeling_retnet import RetNetForCausalLM

    _fake_fla_checkpoint(tmp_path / "fla")
    (tmp_path / "out").mkdir()

    def unwritable(self, directory, *args, **kwargs):  # (root writes through chmod: the failure is simulated)
        raise PermissionError(13, "Permission denied", str(Path(directory) / "config.json"))

    monkeypatch.setattr(RetNetForCausalLM, "save_pretrained", unwritable)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "fla"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"retnet-convert-fla: error: destination {str(tmp_path / 'out')!r} cannot be "
                                       f"written ({tmp_path / 'out' / 'config.json'}): Permission denied\n")


def test_an_empty_destination_is_refused_not_the_working_directory(tmp_path, capsys, monkeypatch):
    """``retnet-convert-fla SRC "$DST"`` with DST unset: Path("") is ".", and the converted config.json and weights
    were written into the working directory ("wrote : 1 layers ..."), where an empty source is refused."""
    _fake_fla_checkpoint(tmp_path / "fla")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "fla"), ""])
    assert exit_info.value.code == 2
    assert "retnet-convert-fla: error: destination is empty" in capsys.readouterr().err
    assert list((tmp_path / "cwd").iterdir()) == []


def test_a_destination_under_home_is_expanded_as_the_source_is(tmp_path, monkeypatch):
    """``~/out`` (quoted, or from Python) named a directory "~" made in the working directory, while the source's
    ``~`` is expanded (resolve_pretrained)."""
    from retnet.model import RetNetForCausalLM

    _fake_fla_checkpoint(tmp_path / "fla")
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")
    main([str(tmp_path / "fla"), "~/converted"])
    assert not (tmp_path / "cwd" / "~").exists()
    assert RetNetForCausalLM.from_pretrained(tmp_path / "home" / "converted").config.hidden_size == 32


def test_an_unreadable_source_file_is_named_as_the_source(tmp_path, capsys, monkeypatch):
    """A tokenizer file of the source that cannot be read was reported as the destination that cannot be written."""
    import shutil

    _fake_fla_checkpoint(tmp_path / "fla")
    (tmp_path / "fla" / "tokenizer.json").write_text("{}")

    def unreadable(source, target, *args, **kwargs):  # (root reads through chmod: the failure is simulated)
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(shutil, "copy2", unreadable)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "fla"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"source file {str(tmp_path / 'fla' / 'tokenizer.json')!r} cannot be read" in err, err
