"""benchmarks/gpu_check.sh's third step (the kernel and model tests compiled for real) spreads its files over
pytest-xdist workers when the GPU image has xdist: compiling ~270 kernel specializations takes more CPU than the
step's 85 s in one process, and the CPU-only model files queue ahead of the kernel tests."""

import os
import subprocess
from pathlib import Path

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"

# Records each call; `import xdist` succeeds or fails as XDIST says; every other step "runs" and does nothing.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in "-c import xdist") [ "$XDIST" = yes ]; exit ;; esac
exit 0
"""


def _pytest_calls(tmp_path, xdist: str) -> list[str]:
    tree, fake_bin = tmp_path / xdist / "tree", tmp_path / xdist / "bin"
    (tree / "benchmarks" / "results").mkdir(parents=True)
    (tree / "benchmarks" / "gpu_check.sh").write_text(GPU_CHECK.read_text())
    fake_bin.mkdir()
    for name, text in [("python", FAKE_PYTHON), ("torchrun", "#!/bin/sh\n"), ("nvidia-smi", "#!/bin/sh\necho H100\n")]:
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    calls = tmp_path / xdist / "calls"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "OUT": str(tmp_path / xdist / "out"),
           "TMPDIR": str(tmp_path), "CALLS": str(calls), "XDIST": xdist}
    done = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line for line in calls.read_text().splitlines() if line.startswith("-m pytest")]


def test_the_compiled_test_step_runs_on_xdist_workers_where_xdist_is_installed(tmp_path):
    bf16_step, rest = _pytest_calls(tmp_path, "yes")
    assert "-k bf16 or model_on_triton" in bf16_step and " -n " not in bf16_step  # (the first step stays as it was)
    assert "not bf16" in rest and " -n 8 --dist loadfile " in rest, rest
    # without xdist the step still runs, in one process
    bf16_step, rest = _pytest_calls(tmp_path, "no")
    assert "not bf16" in rest and " -n " not in rest
