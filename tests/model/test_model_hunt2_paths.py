import pytest
import torch

from tests.model.conftest import make_model


@pytest.mark.parametrize("overrides", [dict(rope_theta=2**64), dict(use_xpos=True, xpos_scale_base=2**64)])
def test_a_whole_number_beyond_int64_in_a_float_field_runs(overrides):
    # The config takes any finite number (config.json may write 1e19 as 10000000000000000000); a Python int of
    # 2**63 or more reached torch as is: OverflowError "int too big to convert" on the first forward.
    model = make_model(**overrides)
    ids = torch.randint(2, 101, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        expected = make_model(**{k: float(v) if k != "use_xpos" else v for k, v in overrides.items()})(ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_activation_checkpointing_every_n_layers_checkpoints_only_those(every):
    # transformers picks every_n_layers' layers among GradientCheckpointingLayer modules only; RetNet's layers are
    # checkpointed by RetNetModel itself, so the option was ignored and every layer recomputed.
    ids = torch.randint(2, 101, (2, 11), generator=torch.Generator().manual_seed(0))
    reference = make_model(num_hidden_layers=5).train()
    reference(ids, labels=ids).loss.backward()
    model = make_model(num_hidden_layers=5).train()
    model.activation_checkpointing_enable(every_n_layers=every)
    checkpoint, calls = model.model._gradient_checkpointing_func, []

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    model.model._gradient_checkpointing_func = counted
    model(ids, labels=ids).loss.backward()
    assert len(calls) == len(range(0, 5, every))
    for param, ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="every_n_layers must be a positive integer; got 0"):
        model.activation_checkpointing_enable(every_n_layers=0)
