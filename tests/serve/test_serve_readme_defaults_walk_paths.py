"""The README's *Startup errors* claims, walked as a newcomer runs them: every refusal of ``retnet-run-batch`` is
one line ``retnet-run-batch: error: ...`` and exit status 2, as ``retnet-serve``'s are."""

import pytest

from retnet.serve.run_batch import main as run_batch_main


def test_run_batch_refuses_a_model_that_is_a_file_in_its_error_line(tmp_path, capsys):
    # A --model that is a file passed the hub resolution and was refused without the "error:" every other refusal
    # (and retnet-serve's for the same path) carries.
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", '
                     '"body": {"prompt": "hi", "max_tokens": 1}}\n')
    with pytest.raises(SystemExit) as exit_info:
        run_batch_main(["--model", str(model), "-i", str(lines), "-o", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.splitlines() == [f"retnet-run-batch: error: --model {str(model)!r} is not a directory (expected "
                                "save_pretrained's output)"]
    assert not (tmp_path / "out.jsonl").exists()
