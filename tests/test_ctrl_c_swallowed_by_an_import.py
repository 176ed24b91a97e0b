"""A Ctrl-C that a library's import swallows still ends each command with its one line and status 130.

A SIGINT in transformers' import (``retnet-convert-fla a b``, 1.5-2 s in) was swallowed below it and left numpy
half-imported: what failed next (a RecursionError in numpy's ``__getattr__``, which transformers raises as
"Could not import module 'GenerationMixin'") was a traceback and status 1. Each check runs the console script's
``main`` in a fresh interpreter whose import of torch sends the process a SIGINT, swallows the interrupt and fails.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from retnet import extras
from tests.test_cli_startup import _RUN_CONSOLE_SCRIPT, _SCRIPT_ARGS

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = """
import os, signal, sys

send_sigint, name = sys.argv.pop(3) == "1", sys.argv.pop(3) or None

class SwallowedCtrlCInTorch:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        try:
            if send_sigint:
                os.kill(os.getpid(), signal.SIGINT)  # (the handler runs before os.kill returns)
        except BaseException:  # a library's import that swallows the KeyboardInterrupt
            pass
        raise ModuleNotFoundError("Could not import module 'GenerationMixin'", name=name)

sys.meta_path.insert(0, SwallowedCtrlCInTorch())
""" + _RUN_CONSOLE_SCRIPT


def _run(script: str, send_sigint: bool, name: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SCRIPT, script, json.dumps(_SCRIPT_ARGS[script]),
                           "1" if send_sigint else "0", name], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_every_console_script_is_checked():
    try:
        import tomllib
    except ModuleNotFoundError:  # (Python 3.10)
        import tomli as tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert set(scripts) == set(_SCRIPT_ARGS)  # (a new command is checked too)


@pytest.mark.parametrize("script", list(_SCRIPT_ARGS))
def test_a_console_script_is_its_one_line_and_130_after_a_ctrl_c_an_import_swallowed(script):
    process = _run(script, send_sigint=True)
    assert (process.returncode, process.stderr) == (130, f"{script}: interrupted\n"), process.stderr[-2000:]


@pytest.mark.parametrize("script", ["retnet-train", "retnet-serve"])
def test_a_half_imported_module_after_a_ctrl_c_is_no_missing_extra(script):
    # (the failing import's name one of the extra's modules: "tqdm is not installed", status 2, was the answer)
    process = _run(script, send_sigint=True, name="tqdm")
    assert (process.returncode, process.stderr) == (130, f"{script}: interrupted\n"), process.stderr[-2000:]


def test_the_same_error_without_a_ctrl_c_is_its_traceback():
    process = _run("retnet-convert-fla", send_sigint=False)
    assert process.returncode == 1, process.stderr[-2000:]
    assert process.stderr.rstrip().endswith("ModuleNotFoundError: Could not import module 'GenerationMixin'")
    assert "interrupted" not in process.stderr


def test_the_block_leaves_a_programs_own_sigint_handler_and_restores_pythons():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with extras.exits_on_ctrl_c("prog"):
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        with extras.exits_on_ctrl_c("prog"):  # (nested: retnet-eval's script around its main's)
            pass
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def own(signum, frame):
        pass

    for handler in (own, signal.SIG_IGN):
        before = signal.signal(signal.SIGINT, handler)
        try:
            with extras.exits_on_ctrl_c("prog"):
                assert signal.getsignal(signal.SIGINT) is handler
            assert signal.getsignal(signal.SIGINT) is handler
        finally:
            signal.signal(signal.SIGINT, before)


def test_a_real_error_passes_through_and_a_block_off_the_main_thread_installs_nothing():
    with pytest.raises(ValueError, match="real"), extras.exits_on_ctrl_c("prog"):
        raise ValueError("real")
    with pytest.raises(SystemExit) as exited, extras.exits_on_ctrl_c("prog"):
        raise KeyboardInterrupt
    assert exited.value.code == 130
    errors, seen = [], []

    def in_thread():
        try:
            with extras.exits_on_ctrl_c("prog"):
                seen.append(signal.getsignal(signal.SIGINT))
        except BaseException as error:  # (signal.signal outside the main thread: ValueError)
            errors.append(error)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert errors == [] and seen == [signal.default_int_handler]
