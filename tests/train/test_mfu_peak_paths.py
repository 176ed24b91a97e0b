"""The MFU figure's peak: the card's own dense bf16 peak, or logging.peak_flops."""

from __future__ import annotations

import pytest
import torch

from retnet.train.flops import peak_flops


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H800 PCIe", 756e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10", 125e12), ("NVIDIA L40S", 362e12), ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA B200", 2250e12), ("NVIDIA GB200", 2500e12),
])
def test_the_mfu_peak_is_the_cards_own(monkeypatch, name, peak):
    """The PCIe and NVL H100s have a lower dense bf16 peak than the SXM module (756 and 835 TFLOP/s, not 989): taken
    for an SXM's, their MFU came out a quarter too low."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), 0.0) == peak
    assert peak_flops(torch.device("cuda", 0), 1e12) == 1e12  # logging.peak_flops wins
