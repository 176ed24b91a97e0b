"""A ln γ tensor whose data is swapped without an in-place write (``x.data = other``, what ``nn.Module.to()`` /
``.cuda()`` / ``.half()`` do to a parameter, keeping the object) is a new ln γ to every op: its values are checked
again and the recurrent reference's kept γ is formed again. By the version counter alone (which such a swap leaves
as it was) both were taken from the old values. Tiny shapes: the Triton ops run under the interpreter on CPU."""

from __future__ import annotations

import os

import pytest
import torch

from retnet.kernels import chunk, naive, recurrent

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"

ALL_OPS = [
    naive.parallel_retention,
    naive.chunk_retention,
    naive.recurrent_retention,
    chunk.chunk_retention,
    recurrent.recurrent_retention,
]


def _name(op) -> str:
    return f"{op.__module__.rsplit('.', 1)[-1]}.{op.__name__}"


class _Decays(torch.nn.Module):
    """ln γ held as a frozen parameter, as a module of one's own would."""

    def __init__(self, values):
        super().__init__()
        self.log_decay = torch.nn.Parameter(torch.tensor(values, device=DEVICE), requires_grad=False)


def test_recurrent_reference_uses_the_swapped_in_decay(kt):
    """The recurrent reference keeps γ = exp(ln γ) on the tensor between decode steps: after a swap it kept the old
    γ, and its final state was 0.9 off the other forms' (which form γ^n from the new values) at T = 1."""
    q, k, v, _, h0 = kt.make_inputs(1, 3, 2, 4, 3, initial_state=True, device=DEVICE)
    decays = _Decays([-0.1, -0.2])
    with torch.no_grad():
        naive.recurrent_retention(q, k, v, decays.log_decay, None, h0, True)
        decays.log_decay.data = torch.tensor([-5.0, -0.01], device=DEVICE)
        got = naive.recurrent_retention(q, k, v, decays.log_decay, None, h0, True)
        want = naive.parallel_retention(q, k, v, decays.log_decay, None, h0, True)
    kt.assert_close_scaled(got[0], want[0], 1e-5, "o")
    kt.assert_close_scaled(got[1], want[1], 1e-5, "final state")


@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
def test_a_positive_decay_swapped_in_is_refused(kt, op):
    """A checked ln γ given positive values through ``.data`` kept its mark and was computed with (a state growing as
    γ^T); it is now read again and refused like any positive ln γ."""
    q, k, v, _, _ = kt.make_inputs(1, 2, 2, 4, 3, device=DEVICE)
    decays = _Decays([-0.1, -0.2])
    with torch.no_grad():
        op(q, k, v, decays.log_decay)
        decays.log_decay.data = torch.tensor([0.5, -0.2], device=DEVICE)
        with pytest.raises(ValueError, match=r"log_decay must be ln γ <= 0 .* got \[0\.5, -0\.2\]"):
            op(q, k, v, decays.log_decay)


def test_a_checked_decay_is_still_read_once(monkeypatch):
    """The mark still spares the read (a device sync) of an unchanged ln γ, and the recurrent reference still keeps
    its γ."""
    q = torch.randn(1, 1, 2, 4, device=DEVICE)
    log_decay = torch.tensor([-0.1, -0.2], device=DEVICE)
    naive.recurrent_retention(q, q, q, log_decay)
    factors = log_decay._retnet_marked_decay_factors[1]
    reads, original = [], torch.Tensor.all
    monkeypatch.setattr(torch.Tensor, "all", lambda self, *a, **k: reads.append(self.shape) or original(self, *a, **k))
    naive.recurrent_retention(q, q, q, log_decay)
    monkeypatch.undo()
    assert reads == []
    assert log_decay._retnet_marked_decay_factors[1] is factors


def test_a_used_decay_still_saves_and_copies(kt):
    """The marks kept on a used ln γ (they hold its data, so no new allocation can take its address) neither stop
    ``torch.save`` of a module holding it nor make a loaded or copied one skip its own check."""
    import copy
    import io

    q, k, v, _, _ = kt.make_inputs(1, 2, 2, 4, 3, device=DEVICE)
    decays = _Decays([-0.1, -0.2])
    with torch.no_grad():
        naive.recurrent_retention(q, k, v, decays.log_decay)
        buffer = io.BytesIO()
        torch.save(decays, buffer)
        buffer.seek(0)
        for other in (torch.load(buffer, weights_only=False), copy.deepcopy(decays)):
            other.log_decay.data.fill_(0.5)  # (a write the counter does not see; a new tensor is read anyway)
            with pytest.raises(ValueError, match="log_decay must be"):
                naive.recurrent_retention(q, k, v, other.log_decay)
