"""A run resumed from another run's checkpoint (``train.resume=PATH``) into its own ``train.output_dir`` keeps a
checkpoint of its final step there, as every finished run does, even when it ends at the checkpoint's step."""

from __future__ import annotations

from retnet.train.checkpoint import list_checkpoints


def test_a_resume_from_another_run_at_its_final_step_saves_it_in_its_own_output_dir(
    micro, tmp_path, run_here, read_metrics
):
    """Resumed at ``train.steps`` from another run's checkpoint at that step, the run evaluated and exported, but its own
    ``checkpoints/`` stayed empty: the step counted as saved because the other run had saved it. A relaunch with
    ``train.resume=auto`` then found nothing to resume and trained from step 0 over its records."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_here(micro(first, train__steps=2)).returncode == 0
    resumed = run_here(micro(second, train__steps=2, train__resume=first / "checkpoints" / "step_00000002"))
    assert resumed.returncode == 0, resumed.stderr
    assert [p.name for p in list_checkpoints(second / "checkpoints")] == ["step_00000002"]
    before_relaunch = read_metrics(second, "train") + read_metrics(second, "val")
    assert [r["step"] for r in read_metrics(second, "val")] == [2]
    again = run_here(micro(second, train__steps=2))  # resume=auto: the finished run, nothing to train
    assert again.returncode == 0, again.stderr
    assert read_metrics(second, "train") + read_metrics(second, "val") == before_relaunch
