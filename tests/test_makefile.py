"""The Makefile's setup recipe, read with ``make -n`` (prints the commands, runs none): the README's
`TORCH_INDEX` knob for a CPU build of torch where pip's index would serve the CUDA one."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _setup_commands(tmp_path: Path, *variables: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    # A venv path that does not exist, so the setup target is out of date and make prints its recipe.
    done = subprocess.run(["make", "-n", "-C", str(REPO), "setup", f"VENV={tmp_path / 'venv'}", *variables],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cpu_torch_install_uses_pip_index_by_default(tmp_path):
    out = _setup_commands(tmp_path)
    assert 'install --quiet "torch==2.13.0"' in out
    assert "--index-url" not in out


def test_torch_index_selects_the_index(tmp_path):
    out = _setup_commands(tmp_path, "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert 'install --quiet --index-url "https://download.pytorch.org/whl/cpu" "torch==2.13.0"' in out


def test_bench_runs_every_benchmark_script():
    """`make bench` is the README's way to reproduce its measured figures: a new benchmark must join it."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    # A present venv marker keeps make from printing the setup recipe; -n runs nothing either way.
    done = subprocess.run(["make", "-n", "-C", str(REPO), "bench"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # (benchmarks/_*.py are the scripts' shared helpers, not benchmarks)
    scripts = {path.name for path in (REPO / "benchmarks").glob("*.py") if not path.name.startswith("_")}
    missing = sorted(name for name in scripts if f"benchmarks/{name}" not in done.stdout)
    assert not missing, f"make bench does not run {missing}"


def test_clean_removes_the_demo_run_not_every_run():
    # runs/ is where the README's walkthrough trains a user's own models (runs/mine, runs/base, runs/domain):
    # `make clean` removed all of them with the demo's.
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    done = subprocess.run(["make", "-n", "-C", str(REPO), "clean"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    removed = done.stdout.split()
    assert "runs/demo" in removed
    assert not {"runs", "runs/", "./runs"} & set(removed), done.stdout
