"""The commands answer ``--help`` and a mistyped option before importing torch and transformers (seconds).

``import retnet`` registers RetNet with transformers' Auto classes, which pays torch and transformers; a process
started as one of the commands defers that to its ``main``, after the parse (``retnet/__init__``). Each check
runs a fresh interpreter, started as the console script (its name in ``sys.argv[0]``) or as ``python -m``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The console script's import and call, as the installed script runs them; then what was imported.
_AS_SCRIPT = """
import json, sys
script, module, args = json.loads(sys.argv[1])
sys.argv = [script, *args]
try:
    __import__(module, fromlist=["main"]).main()
except SystemExit as exc:
    status = exc.code
else:
    status = 0
print(json.dumps({"status": status, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}))
"""


def _as_script(script: str, module: str, args: list[str]) -> dict:
    process = subprocess.run([sys.executable, "-c", _AS_SCRIPT, json.dumps([script, module, args])], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert process.stdout.strip(), process.stderr
    return json.loads(process.stdout.splitlines()[-1])


@pytest.mark.parametrize(("script", "module", "args", "status"), [
    ("retnet-train", "retnet.train.__main__", ["--help"], 0),
    ("retnet-serve", "retnet.serve.__main__", ["--help"], 0),
    ("retnet-serve", "retnet.serve.__main__", ["--no-such-option"], 2),
    ("retnet-run-batch", "retnet.serve.run_batch", ["--help"], 0),
    ("retnet-run-batch", "retnet.serve.run_batch", ["--no-such-option"], 2),
    ("/some/venv/bin/retnet-lm-eval", "retnet.harness", ["--help"], 0),
    ("retnet-convert-fla", "retnet.model.convert_fla", ["--help"], 0),
    ("retnet-convert-fla", "retnet.model.convert_fla", ["--no-such-option"], 2),
])
def test_help_and_usage_errors_import_no_torch(script, module, args, status):
    imported = _as_script(script, module, args)
    assert imported == {"status": status, "torch": False, "transformers": False}


def test_retnet_eval_help_imports_no_transformers():
    # (its module computes with torch at the top, so torch comes; transformers and the model no longer)
    imported = _as_script("retnet-eval", "retnet.train.evaluate", ["--help"])
    assert imported["status"] == 0 and not imported["transformers"]


@pytest.mark.parametrize("module", ["retnet.train", "retnet.serve", "retnet.serve.demo"])
def test_python_dash_m_help_imports_no_torch(module):
    process = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0 and "usage:" in process.stdout, process.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in process.stderr.splitlines() if "|" in line}
    assert "retnet" in imported and not {"torch", "transformers"} & imported


def test_a_command_registers_after_its_parse_and_a_library_import_at_once():
    """As a command, ``import retnet`` leaves the Auto classes to ``retnet.register()`` (which ``main`` calls);
    any other import registers them, the documented ``import retnet`` then ``AutoConfig`` (no trust_remote_code)."""
    # One interpreter imports what registering imports (torch, transformers' Auto classes, peft), then forks a
    # child per command line: each child's ``import retnet`` is its first, and nothing is registered before it.
    code = """
import json, os, sys, traceback
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
try:
    import peft.utils.constants
except ImportError:
    pass
assert not any(name == "retnet" or name.startswith("retnet.") for name in sys.modules)
known = lambda: "retnet" in transformers.models.auto.configuration_auto.CONFIG_MAPPING
for name in sys.argv[1:]:
    sys.stdout.flush()
    if os.fork() == 0:
        status = 1
        try:
            sys.argv = [name]
            import retnet
            before = known()
            retnet.register()
            print(json.dumps([name, before, known(), type(AutoConfig.for_model("retnet")).__name__]), flush=True)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(status)
    _, wait_status = os.wait()
    if os.waitstatus_to_exitcode(wait_status) != 0:
        sys.exit(f"the child started as {name} failed")
"""
    process = subprocess.run([sys.executable, "-c", code, "retnet-serve", "my-script.py"], cwd=REPO,
                             capture_output=True, text=True, timeout=240)  # (both children's work)
    assert process.returncode == 0, process.stderr[-2000:]
    results = {name: rest for name, *rest in map(json.loads, (line for line in process.stdout.splitlines()
                                                                if line.startswith('["')))}
    assert results == {"retnet-serve": [False, True, "RetNetConfig"], "my-script.py": [True, True, "RetNetConfig"]}


# A Ctrl-C arriving in torch's import, from the next import on
_CTRL_C_IN_TORCH_FINDER = """
import sys

class CtrlCInTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlCInTorch())
"""

# A console script as installed (pyproject's [project.scripts] target): argv[1] the script, argv[2] its arguments
_RUN_CONSOLE_SCRIPT = """
import importlib, json
try:
    import tomllib
except ModuleNotFoundError:  # (Python 3.10)
    import tomli as tomllib

script, args = sys.argv[1], json.loads(sys.argv[2])
with open("pyproject.toml", "rb") as file:
    module, attr = tomllib.load(file)["project"]["scripts"][script].split(":")
sys.argv = [script, *args]
sys.exit(getattr(importlib.import_module(module), attr)())
"""

# ... with a Ctrl-C arriving in torch's import
_CTRL_C_IN_TORCH = _CTRL_C_IN_TORCH_FINDER + _RUN_CONSOLE_SCRIPT

_SCRIPT_ARGS = {
    "retnet-train": ["--config", "tiny"],
    "retnet-serve": ["--model", "some/model"],
    "retnet-eval": ["--model", "some/model"],
    "retnet-lm-eval": ["--model", "hf", "--model_args", "pretrained=org/name", "--tasks", "x"],
    "retnet-run-batch": ["--model", "some/model", "-i", "requests.jsonl", "-o", "results.jsonl"],
    "retnet-convert-fla": ["fla-checkpoint", "converted"],
}


def test_every_console_script_is_its_one_line_and_status_130_on_a_ctrl_c_in_torchs_import():
    """retnet-eval's and retnet-convert-fla's modules imported torch at their top, before their ``main`` (the
    installed script's import): a Ctrl-C in that second was a traceback, not the other commands' one line."""
    try:
        import tomllib
    except ModuleNotFoundError:  # (Python 3.10)
        import tomli as tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert set(scripts) == set(_SCRIPT_ARGS)  # (a new command is checked too)
    for script, args in _SCRIPT_ARGS.items():
        process = subprocess.run([sys.executable, "-c", _CTRL_C_IN_TORCH, script, json.dumps(args)], cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
        assert (process.returncode, process.stderr) == (130, f"{script}: interrupted\n"), script


def test_python_dash_m_evaluate_is_retnet_evals_script_on_a_ctrl_c_in_torchs_import():
    """``python -m retnet.train.evaluate`` (the README's other name of retnet-eval) imported torch at its top, outside
    the script's Ctrl-C guard: a Ctrl-C in that second was a KeyboardInterrupt traceback, not retnet-eval's line."""
    # (runpy's run as __main__ is what `-m` does, with the finder installed before it; `import retnet` reads the
    # command line `-m` leaves to tell a command's start apart)
    code = _CTRL_C_IN_TORCH_FINDER + """
import runpy
sys.argv = ["-m", "--model", "some/model"]
sys.orig_argv = [sys.executable, "-m", "retnet.train.evaluate", *sys.argv[1:]]
runpy.run_module("retnet.train.evaluate", run_name="__main__", alter_sys=True)
"""
    process = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (process.returncode, process.stderr) == (130, "retnet-eval: interrupted\n"), process.stderr[-2000:]
    help_run = subprocess.run([sys.executable, "-m", "retnet.train.evaluate", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and help_run.stdout.startswith("usage: retnet-eval "), help_run.stderr[-2000:]
