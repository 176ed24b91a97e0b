"""Distributed training paths found in a bug hunt (DDP/FSDP2, tensor and context parallelism): each test fails
without its fix."""

from __future__ import annotations

import pytest
import torch

from retnet.train.config import ConfigError
from retnet.train.distributed import init_distributed


@pytest.mark.parametrize("device_kind", ["cuda", "auto"])
def test_more_local_ranks_than_gpus_is_refused_by_name(monkeypatch, device_kind):
    """``torchrun --nproc_per_node=2`` on a node showing one GPU (or CUDA_VISIBLE_DEVICES hiding one): local rank 1
    had no device, and ``torch.cuda.set_device`` raised a bare "invalid device ordinal" traceback on that rank. It is
    a ConfigError (exit status 2, one line) naming the local rank and the GPU count, before any process group."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"set_device({device}) was called"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"local rank 1 \(LOCAL_RANK\), but torch sees 1 CUDA device\(s\).*"
                                          r"--nproc_per_node"):
        init_distributed(device_kind)


@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "2"}, r"environment variable WORLD_SIZE is 2 but RANK is unset: .*unset WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": ""}, r"WORLD_SIZE is 2 but RANK is unset"),
    ({"RANK": "1"}, r"environment variable RANK is 1 but WORLD_SIZE is unset \(1\): a rank must be below"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK is 2 but WORLD_SIZE is 2"),
], ids=["world-without-rank", "empty-rank", "rank-without-world", "rank-past-world"])
def test_launcher_variables_torch_would_not_start_from_are_refused_by_name(monkeypatch, variables, message):
    """torch's ``env://`` start needs RANK and WORLD_SIZE both, as torchrun sets them. A WORLD_SIZE left in the
    environment without RANK trained one plain process as rank 0 of that world: on 1 / WORLD_SIZE of the global batch,
    its logged loss divided by WORLD_SIZE (3.12 for 6.25 at WORLD_SIZE=2), silently; a RANK of 1 without WORLD_SIZE
    stopped on a TypeError traceback when the ranks' answers were gathered. Both are a ConfigError naming the
    variables, before any process group; a lone RANK=0 is still a plain process."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        init_distributed("cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert init_distributed("cpu")[:3] == (0, 0, 1)
