"""distill.temperature within the range whose temperature² · KL the float32 loss computes: an absurd one (1e-300,
1e300) is refused at config load, naming it, where the loss was nan; the range's ends compute the loss."""

from __future__ import annotations

import pytest
import torch

from retnet.model.distillation import linear_distillation_loss
from retnet.train.config import ConfigError, load_config


@pytest.mark.parametrize(("temperature", "shown"), [("1e-300", "1e-300"), ("1e-30", "1e-30"), ("1e300", r"1e\+300"),
                                                    ("1e4", "10000.0")])
def test_a_temperature_the_loss_cannot_compute_is_refused_at_load(temperature, shown, tmp_path):
    with pytest.raises(ConfigError, match=r"distill.temperature must be in \[1e-18, 1000\].*; got " + shown + "$"):
        load_config("tiny", [f"--distill.teacher={tmp_path}", f"--distill.temperature={temperature}"])


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
def test_the_ends_of_the_range_compute_the_loss(kind):
    torch.manual_seed(0)
    hidden, teacher = torch.randn(1, 9, 16), torch.randn(1, 9, 16)
    weight, teacher_weight = torch.randn(300, 16) * 0.5, torch.randn(300, 16) * 0.5
    labels = torch.randint(0, 300, (1, 9))
    student, target = (hidden[0, :-1] @ weight.T).double(), (teacher[0, :-1] @ teacher_weight.T).double()
    for temperature in (1e-18, 1e3):  # (DISTILL_TEMPERATURES)
        log_q, log_p = torch.log_softmax(student / temperature, -1), torch.log_softmax(target / temperature, -1)
        divergence = (log_p.exp() * (log_p - log_q)) if kind == "kl" else (log_q.exp() * (log_q - log_p))
        expected = temperature**2 * divergence.sum(-1).mean()
        states = hidden.clone().requires_grad_()
        loss, _ = linear_distillation_loss(states, weight, teacher, teacher_weight, labels, temperature=temperature,
                                           kind=kind)
        loss.backward()
        assert torch.isfinite(states.grad).all()
        torch.testing.assert_close(loss.double(), expected, rtol=0.02, atol=0)
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0, in \[1e-18, 1000\].*got 1e-300"):
        linear_distillation_loss(hidden, weight, teacher, teacher_weight, labels, temperature=1e-300)
