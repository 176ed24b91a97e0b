"""The commands' ``--help`` as a new user reads it: descriptions without the docstrings' reST markup, each option
with one default, the one it has (``retnet-serve --revision`` printed "(default main) (default None; ...)").

Each parser is built in this process (``main(["--help"])``), not started as a command. ``retnet-lm-eval``'s help is
lm-eval's own (seconds to import), not checked here."""

from __future__ import annotations

import re

import pytest


def _help(module: str, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        __import__(module, fromlist=["main"]).main(["--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


COMMANDS = {
    "retnet-train": "retnet.train.__main__",
    "retnet-serve": "retnet.serve.__main__",
    "retnet-eval": "retnet.train.evaluate",
    "retnet-run-batch": "retnet.serve.run_batch",
    "retnet-convert-fla": "retnet.model.convert_fla",
    "python -m retnet.serve.demo": "retnet.serve.demo",
}


def _options(text: str) -> dict[str, str]:
    """Each option's entry of the help, its wrapped lines joined: ``{"--revision REVISION": "of a hub id ..."}``."""
    entries: dict[str, str] = {}
    name = None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if match:
            name = match.group(1)
            entries[name] = match.group(2) or ""
        elif name is not None and line.startswith("   "):
            entries[name] += " " + line.strip()
        else:  # the epilog
            name = None
    return {name: help_text.strip() for name, help_text in entries.items()}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_has_no_rest_markup_and_one_default_an_option(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = _help(COMMANDS[command], capsys)
    assert f"usage: {command}" in text
    description = text.split("\n\n")[1]
    assert "``" not in text and ":class:" not in text, description
    # a sentence of its own, not the docstring's tail ("offline batch inference.")
    assert description[0].isupper(), description
    options = _options(text)
    assert len(options) >= 2 and "-h, --help" in options
    for option, help_text in options.items():
        assert help_text.count("(default") <= 1, f"{command} {option}: {help_text}"


def test_serve_help_shows_the_true_default_of_the_settings_that_describe_their_own(capsys):
    options = _options(_help("retnet.serve.__main__", capsys))
    assert options["--revision REVISION"] == "of a hub id --model: the branch, tag or commit (default main; env " \
                                             "RETNET_REVISION)"
    assert options["--download-dir DOWNLOAD_DIR"].endswith("(default: the HF cache, HF_HUB_CACHE; env "
                                                           "RETNET_DOWNLOAD_DIR)")
    served = options["--served-model-name SERVED_MODEL_NAME [SERVED_MODEL_NAME ...]"]
    assert "(default: the directory's name" in served and served.endswith("(env RETNET_SERVED_MODEL_NAME)")
    # the others keep the field's default and variable; a required one says so
    assert options["--max-running MAX_RUNNING"].endswith("(default 64; env RETNET_MAX_RUNNING)")
    assert options["--session-dir SESSION_DIR"].endswith("(default None; env RETNET_SESSION_DIR)")
    assert options["--model MODEL"].endswith("(required; env RETNET_MODEL)")


def test_demo_help_describes_every_option_with_its_default(capsys):
    options = _options(_help("retnet.serve.demo", capsys))
    assert set(options) == {"-h, --help", "--model MODEL", "--host HOST", "--port PORT", "--prompt PROMPT",
                            "--max-tokens MAX_TOKENS", "--exit-after"}
    assert all(options.values()), options
    assert options["--host HOST"].endswith("(default: RETNET_HOST, else 127.0.0.1)")
    assert options["--port PORT"].endswith("(default: RETNET_PORT, else 8000)")
    assert options["--prompt PROMPT"].endswith("(default: 'def fibonacci(n):\\n')")
    assert options["--max-tokens MAX_TOKENS"].endswith("(default: 64)")
