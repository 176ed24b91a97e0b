"""The benchmark scripts start as scripts (``python benchmarks/NAME.py``): run that way, their folder is
sys.path[0], where ``benchmarks/kernels.py`` would shadow HuggingFace's ``kernels`` package, which
transformers probes for on import. ``--help`` imports everything a run imports and measures nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_script_starts(script):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout
