"""Paths where following the README's kernels section as written gave something else than it says.

Tiny shapes: the Triton ops run under the interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_kernel_fuzz_paths import ALL_OPS, DEVICE, _name


@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
@pytest.mark.parametrize("position", ["q", "k", "v", "log_decay"])
def test_a_nested_input_is_refused_by_the_rule(op, position):
    """The README: "every tensor dense (a sparse or nested one is refused naming it)". A nested q, k, v or log_decay
    of torch's default (strided) nested layout raised torch's "Internal error: NestedTensorImpl doesn't support
    sizes" from the rules' fast path, which read its shape before asking whether it was nested."""
    q = torch.randn(1, 3, 2, 4, device=DEVICE)
    args = {"q": q, "k": q, "v": q, "log_decay": torch.tensor([-0.1, -0.5], device=DEVICE)}
    args[position] = torch.nested.nested_tensor([args[position][0] if position != "log_decay" else args[position]])
    with pytest.raises(ValueError, match=rf"^{op.__name__}: {position} must be a dense \(torch.strided\) tensor; "
                                         r"got a nested tensor"):
        op(*args.values())


def test_aot_under_the_interpreter_is_a_usage_error_not_a_traceback(capsys, monkeypatch):
    """``python -m retnet.kernels.aot`` (``make aot``) in a shell that exported ``TRITON_INTERPRET=1``, as the
    kernels need on CPU, raised a RuntimeError traceback from inside ``check``; now the usage line and the way out,
    exit status 2, as its other refusals."""
    from unittest import mock

    from retnet.kernels import aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    recorder = mock.patch.object(aot, "record_launches", side_effect=AssertionError("recorded under the interpreter"))
    with recorder, pytest.raises(SystemExit) as exit_info:
        aot.main(["--arch", "90", "--kernels", "recurrent"])
    assert exit_info.value.code == 2
    assert "TRITON_INTERPRET=1 is set" in capsys.readouterr().err
