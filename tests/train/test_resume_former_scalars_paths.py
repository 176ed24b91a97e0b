"""A training checkpoint written before SAU's and a trainable gSmeLU's parameters became one-element tensors
(FSDP2 shards no 0-dim parameter) resumes: those parameters, and their AdamW moments, were saved 0-dim."""

import shutil

import pytest
import torch

from retnet.train.__main__ import main
from retnet.train.checkpoint import (
    commit_checkpoint,
    load_checkpoint,
    new_temp_dir,
    save_checkpoint,
    save_sharded_state,
)

ACTIVATIONS = ['--model.hidden_act=["sau", "gsmelu"]',
               "--model.extra.hidden_act_kwargs=[{trainable_sigma = true}, {trainable = true}]"]


def _as_written_before(path, layout):
    """The checkpoint at ``path`` rewritten as the code before wrote it: the activations' parameters and their
    optimizer state (exp_avg, exp_avg_sq; ``step`` was 0-dim anyway) 0-dim."""
    state = load_checkpoint(path)
    model = {key: value.reshape(()) if ".act_fn." in key else value.clone() for key, value in state["model"].items()}
    assert sum(value.dim() == 0 for value in model.values()) == 2 + 5  # SAU: alpha, log_sigma; gSmeLU: five
    optimizer = state["optimizer"]
    reshaped = 0
    for entry in optimizer["state"].values():
        for key, value in entry.items():
            if torch.is_tensor(value) and key != "step" and value.shape == (1,):  # no other weight is [1] here
                entry[key] = value.reshape(())
                reshaped += 1
    assert reshaped == 2 * 7
    if layout == "full":
        save_checkpoint(path.parent, state["step"], model=model, optimizer=optimizer, trainer=state["trainer"],
                        keep_last=1)
        return
    shutil.rmtree(path)
    tmp = new_temp_dir(path.parent, state["step"])
    hashed = save_sharded_state(tmp, model, optimizer, rank=0, distributed=False)
    commit_checkpoint(path.parent, state["step"], tmp, trainer=state["trainer"], keep_last=1, layout="sharded",
                      hashed=hashed)


@pytest.mark.parametrize("layout", ["full", "sharded"])
def test_a_checkpoint_with_0_dim_activation_parameters_resumes(layout, micro, tmp_path):
    # Refused as 'checkpoint [], model [1]' by the fit check; past it, the full layout's 0-dim AdamW moments
    # failed the first step ('output with shape [] doesn't match the broadcast shape [1]') and torch's sharded
    # loader refused the parameters ('Size mismatch between saved torch.Size([]) and current: torch.Size([1])')
    args = lambda out: [*micro(out, train__steps=3, checkpoint__interval=2, checkpoint__layout=layout,
                               train__eval_blocks=2), *ACTIVATIONS]
    first = tmp_path / "first"
    assert main(args(first)) == 0
    old = shutil.copytree(first, tmp_path / "old")
    shutil.rmtree(old / "checkpoints" / "step_00000003")
    _as_written_before(old / "checkpoints" / "step_00000002", layout)
    assert main(args(old)) == 0
    # The same step 3 as the run that went on: the parameters and moments resumed as saved, only reshaped
    resumed = load_checkpoint(old / "checkpoints" / "step_00000003")
    went_on = load_checkpoint(first / "checkpoints" / "step_00000003")
    assert resumed["layout"] == layout
    assert all(value.shape == (1,) for key, value in resumed["model"].items() if ".act_fn." in key)
    for key, value in went_on["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
