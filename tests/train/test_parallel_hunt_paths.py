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
