"""The CUDA images can run the Triton kernels: no Docker engine here, so the Dockerfiles are read as text."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def cuda_stage(name: str) -> str:
    """The text of the Dockerfile's ``base-cuda`` stage, up to the next ``FROM``."""
    text = (REPO / "docker" / name).read_text()
    stage = re.search(r"^FROM nvidia/cuda:\S+ AS base-cuda\n(.*?)(?=^FROM |^# hadolint ignore=DL3006)", text,
                      re.M | re.S)
    assert stage, f"{name} has no base-cuda stage"
    return stage.group(1)


@pytest.mark.parametrize("name", ["Dockerfile.serve", "Dockerfile.train"])
def test_cuda_stage_installs_what_triton_builds_its_launcher_with(name):
    # Triton compiles a small C launcher at a kernel's first call (gcc, the C library's headers and
    # Python.h); a CUDA runtime image has none of them, so the first forward on the GPU failed there.
    stage = cuda_stage(name)
    installed = set(re.findall(r"[\w.+-]+", " ".join(re.findall(r"apt-get install[^&]*", stage))))
    assert "python3-dev" in installed
    devel = re.search(r"^FROM nvidia/cuda:\S+-devel-", (REPO / "docker" / name).read_text(), re.M)
    assert devel or {"gcc", "libc6-dev"} <= installed, installed
