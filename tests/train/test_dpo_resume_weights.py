"""``dpo.loss_weights`` are compared on a resume as the loss uses them: unset is 1 for each loss type, the same as
those ones written out, either way round; other weights are still a changed objective, refused."""

from __future__ import annotations

import pytest

from retnet.train.__main__ import main
from retnet.train.config import build_config, dpo_changes

from .test_preference import dpo_args, toy  # noqa: F401 - toy: the module-scoped fixture, shared


def job(**dpo) -> dict:
    return {"data": {"format": "preference", "dataset": "p.jsonl"}, "model": {"init_from": "base"}, "dpo": dpo}


@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid", "bco_pair", "sft"]], ids=str)
def test_unset_weights_are_ones_either_way_round(loss_type):
    ones = [1.0] * (len(loss_type) if isinstance(loss_type, list) else 1)
    unset, spelled = build_config(job(loss_type=loss_type)), build_config(job(loss_type=loss_type, loss_weights=ones))
    assert dpo_changes(unset.to_dict(), spelled) == []
    assert dpo_changes(spelled.to_dict(), unset) == []
    older = unset.to_dict()
    del older["dpo"]["loss_weights"]  # a checkpoint written before the setting
    assert dpo_changes(older, spelled) == []


def test_other_weights_are_still_refused():
    unset = build_config(job(loss_type=["sigmoid", "sft"]))
    other = build_config(job(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]))
    assert dpo_changes(unset.to_dict(), other) == ["dpo.loss_weights: checkpoint None, now [1.0, 0.5]"]
    assert dpo_changes(other.to_dict(), unset) == ["dpo.loss_weights: checkpoint [1.0, 0.5], now None"]
    # another list of loss types: ones of another length are other weights too
    three = build_config(job(loss_type=["sigmoid", "sft", "hinge"]))
    assert dpo_changes(unset.to_dict(), three) == [
        "dpo.loss_type: checkpoint ['sigmoid', 'sft'], now ['sigmoid', 'sft', 'hinge']"]
    spelled = build_config(job(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]))
    assert dpo_changes(spelled.to_dict(), three) == [
        "dpo.loss_type: checkpoint ['sigmoid', 'sft'], now ['sigmoid', 'sft', 'hinge']",
        "dpo.loss_weights: checkpoint [1.0, 1.0], now None"]


def test_a_run_resumes_with_its_unset_weights_written_out_and_back(toy, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"

    def start(steps: int, **weights) -> int:
        return main(dpo_args(toy, out, dpo__loss_type="[sigmoid,sft]", train__steps=steps, checkpoint__interval=1,
                             train__eval_interval=0, **weights))

    assert start(1) == 0
    assert start(2, dpo__loss_weights="1.0,1") == 0
    assert start(3) == 0
    capsys.readouterr()
    assert start(4, dpo__loss_weights="1,0.5") == 2
    assert "dpo.loss_weights: checkpoint None, now [1.0, 0.5]" in capsys.readouterr().err
