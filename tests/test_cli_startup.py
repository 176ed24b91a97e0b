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
    code = """
import json, sys
sys.argv = [sys.argv[1]]
import retnet
from transformers import AutoConfig
known = lambda: "retnet" in __import__("transformers").models.auto.configuration_auto.CONFIG_MAPPING
before = known()
retnet.register()
print(json.dumps([before, known(), type(AutoConfig.for_model("retnet")).__name__]))
"""
    results = {}
    for name in ("retnet-serve", "my-script.py"):
        process = subprocess.run([sys.executable, "-c", code, name], cwd=REPO, capture_output=True, text=True,
                                 timeout=120)
        assert process.returncode == 0, process.stderr[-2000:]
        results[name] = json.loads(process.stdout.splitlines()[-1])
    assert results == {"retnet-serve": [False, True, "RetNetConfig"], "my-script.py": [True, True, "RetNetConfig"]}
