"""xPos on packed rows: a document longer than one packed frame stops the run in one line (warned at the start)."""


def test_a_document_past_a_packed_xpos_frame_stops_the_run_in_one_line(micro, run_here, tmp_path):
    # xpos_scale_base 0.5: a packed frame of 16 positions, where the micro model's packed rows hold longer
    # documents: the forward's refusal came out of the trainer as a traceback, after a silent start
    xpos = {"model__extra__use_xpos": "true", "model__extra__xpos_scale_base": 0.5}
    done = run_here(micro(tmp_path / "run", **xpos))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "retnet-train: error: use_xpos: a packed or padded sequence reaches position" in done.stderr
    assert "Traceback" not in done.stderr
    warning = next((line for line in done.stderr.splitlines() if "packed xPos frame" in line), "")
    assert "16 positions" in warning and "data.document_boundaries=false" in warning, done.stderr[-2000:]

    # a frame of 48 positions: a packed row of 2 blocks holds 64 tokens, but no sequence in it more than a block's 32
    done = run_here(micro(tmp_path / "within", model__extra__use_xpos="true", model__extra__xpos_scale_base=0.9,
                          train__steps=2))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "packed xPos frame" not in done.stderr

    # unpacked, every row runs in frames of its own: the same data trains, and nothing is warned
    done = run_here(micro(tmp_path / "unpacked", **xpos, data__document_boundaries="false", train__steps=2))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "packed xPos frame" not in done.stderr
