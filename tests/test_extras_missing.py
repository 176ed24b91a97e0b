"""A command run without the extra it needs (``pip install retnet-stack`` alone) says which extra to install, on one
line with exit status 2, instead of an import's traceback (``retnet/extras.py``).

The missing package is simulated by ``sys.modules[name] = None``, which makes ``import name`` raise the
ModuleNotFoundError an absent package raises. ``--help`` runs in a fresh interpreter started as the console script:
there the command's own module was imported before its ``main`` ran.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _refusal(extra: str) -> re.Pattern:
    return re.compile(rf"^\S+( -m \S+)?: error: \w+ is not installed; it comes with the \[{extra}\] extra: "
                      rf"pip install 'retnet-stack\[{extra}\]'$")


def test_each_extras_modules_are_its_pyproject_packages():
    from retnet.extras import EXTRA_MODULES

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRA_MODULES.items():
        names = {re.match(r"[A-Za-z0-9_.-]+", spec).group().lower().replace("-", "_") for spec in declared[extra]}
        assert set(modules) == names, extra


# The console script's import and call with `blocked` uninstalled, as the installed script runs them.
_AS_SCRIPT = """
import json, sys
blocked, script, module, args = json.loads(sys.argv[1])
for name in blocked:
    sys.modules[name] = None
sys.argv = [script, *args]
sys.exit(__import__(module, fromlist=["main"]).main())
"""


@pytest.mark.parametrize(("script", "module"), [
    ("retnet-serve", "retnet.serve.__main__"),
    ("retnet-run-batch", "retnet.serve.run_batch"),
])
def test_a_serve_command_without_pydantic_names_the_serve_extra_even_for_help(script, module):
    process = subprocess.run([sys.executable, "-c", _AS_SCRIPT, json.dumps([["pydantic"], script, module, ["--help"]])],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2, process.stderr
    assert _refusal("serve").match(process.stderr.strip()), process.stderr
    assert process.stderr.startswith(f"{script}: error: pydantic is not installed")


def test_a_package_the_settings_validation_imports_names_the_serve_extra(tmp_path):
    # the settings' validators import the engine (prometheus_client): it was "invalid settings: No module named ..."
    args = ["prometheus_client"], "retnet-serve", "retnet.serve.__main__", ["--model", str(tmp_path)]
    process = subprocess.run([sys.executable, "-c", _AS_SCRIPT, json.dumps(args)], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert process.returncode == 2, process.stderr
    assert process.stderr.startswith("retnet-serve: error: prometheus_client is not installed"), process.stderr


def test_the_demo_without_pydantic_names_the_serve_extra(monkeypatch, capsys, tmp_path):
    from retnet.serve import demo

    monkeypatch.setitem(sys.modules, "pydantic", None)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--model", str(tmp_path)])
    assert exit_.value.code == 2
    assert _refusal("serve").match(capsys.readouterr().err.strip())


def test_another_missing_module_keeps_its_traceback(monkeypatch):
    from retnet.extras import needs_extra

    with pytest.raises(ModuleNotFoundError), needs_extra("retnet-serve", "serve"):
        import no_such_module_of_any_extra  # noqa: F401


@pytest.fixture
def jsonl(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} of a few words"}) + "\n" for i in range(8)))
    return path


def test_training_on_a_jsonl_without_datasets_names_the_train_extra(monkeypatch, capsys, tmp_path, jsonl):
    from retnet.train.__main__ import main

    monkeypatch.setitem(sys.modules, "datasets", None)
    status = main(["--config", "tiny", f"--data.dataset={jsonl}", f"--train.output_dir={tmp_path / 'run'}"])
    assert status == 2
    assert _refusal("train").match(capsys.readouterr().err.strip().splitlines()[-1])


def test_evaluating_a_jsonl_without_datasets_names_the_train_extra(monkeypatch, capsys, tmp_path, jsonl):
    import torch

    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.tokenization import train_byte_level_bpe
    from retnet.train.evaluate import main

    tokenizer = train_byte_level_bpe([jsonl.read_text()], vocab_size=300, min_frequency=1)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    RetNetForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    capsys.readouterr()  # (save_pretrained's progress bar)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path / "model"), "--dataset", str(jsonl), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert _refusal("train").match(err), err
    assert err.startswith("retnet-eval: error: datasets is not installed")


def test_transformers_bars_hidden_by_overlapping_blocks_come_back():
    """Two threads' loads overlapping (an engine's and a pooling engine's, a draft's): the block opened second read
    the bars as hidden and, ending last, left them off for good. The last block to end restores what the first
    found."""
    from transformers.utils import logging as transformers_logging

    from retnet.extras import transformers_bars_hidden

    assert transformers_logging.is_progress_bar_enabled()
    first, second = transformers_bars_hidden(), transformers_bars_hidden()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not transformers_logging.is_progress_bar_enabled()  # the second is still open
    second.__exit__(None, None, None)
    assert transformers_logging.is_progress_bar_enabled()
