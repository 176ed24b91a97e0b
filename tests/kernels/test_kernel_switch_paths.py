"""The kernel switch without triton installed (it is the ``triton`` extra): a call the Triton kernels would serve is
refused naming the setting and the ways out, rather than failing on a ModuleNotFoundError inside the op; what the
references serve runs as before."""

from __future__ import annotations

import sys

import pytest
import torch

from retnet import kernels


@pytest.fixture
def without_triton(monkeypatch):
    for name in [name for name in sys.modules if name == "triton" or name.startswith("triton.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton", None)
    kernels._triton_installed.cache_clear()  # (asked once: again without it, and again after)
    yield
    kernels._triton_installed.cache_clear()


def _inputs():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 8)
    return q, k, v, torch.full((2,), -0.1)


def test_forcing_triton_without_it_installed_is_refused_by_name(without_triton, monkeypatch):
    monkeypatch.setenv("RETNET_KERNELS", "triton")
    for op in (kernels.chunk_retention, kernels.parallel_retention, kernels.recurrent_retention):
        with pytest.raises(ValueError, match=r"RETNET_KERNELS=triton: .*triton is not installed.*RETNET_KERNELS=torch"):
            op(*_inputs())


def test_the_references_run_without_triton(without_triton, monkeypatch):
    monkeypatch.setenv("RETNET_KERNELS", "auto")
    o, state = kernels.chunk_retention(*_inputs(), output_final_state=True)
    expected, expected_state = kernels.naive.recurrent_retention(*_inputs(), output_final_state=True)
    torch.testing.assert_close(o, expected)
    torch.testing.assert_close(state, expected_state)
