"""Serving operations found by a bug hunt: ``python -m retnet.serve.demo`` under the ``RETNET_*`` environment its
settings read as retnet-serve's do (a bad variable, an adapter that cannot be served, API keys)."""

from __future__ import annotations

import pytest

from retnet.serve import demo


def test_the_demo_names_a_bad_variable_in_one_line(model_dir, monkeypatch, capsys):
    # Was a pydantic ValidationError traceback; retnet-serve says it in one line, exit 2.
    monkeypatch.setenv("RETNET_MAX_RUNNING", "0")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--model", str(model_dir), "--port", "0", "--max-tokens", "4", "--exit-after"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "RETNET_MAX_RUNNING" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_demo_names_an_adapter_it_cannot_serve_in_one_line(model_dir, tmp_path, monkeypatch, capsys):
    # Was a LoraError traceback out of create_app.
    monkeypatch.setenv("RETNET_LORA_MODULES", f"a={tmp_path / 'missing'}")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--model", str(model_dir), "--port", "0", "--max-tokens", "4", "--exit-after"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "LoRA adapter 'a'" in err and len(err.strip().splitlines()) == 1


def test_the_demo_sends_a_key_to_a_server_that_requires_one(model_dir, monkeypatch, capsys):
    # RETNET_API_KEYS made the server require a key the demo's own completion did not send: a 401 and exit 1.
    monkeypatch.setenv("RETNET_API_KEYS", "k1,k2")
    demo.main(["--model", str(model_dir), "--port", "0", "--max-tokens", "4", "--exit-after"])
    out = capsys.readouterr().out
    assert "4 tokens" in out
    commands = [line for line in out.splitlines() if line.strip().startswith("curl") and "/v1/" in line]
    assert commands and all('Authorization: Bearer $KEY' in line for line in commands)
    assert "k1" not in out  # the key itself is not printed


def test_the_session_dir_may_not_be_the_draft_models_directory(model_dir, tmp_path):
    # It was refused as --model's directory but not as the draft's: a session "model" was then DELETEd as (or written
    # over) the draft's model.safetensors.
    import shutil

    from retnet.serve.app import create_app
    from retnet.serve.settings import StartupError

    from .conftest import make_settings

    draft = shutil.copytree(model_dir, tmp_path / "draft")
    settings = make_settings(model_dir, session_dir=str(draft / "sessions"),
                             speculative_config={"model": str(draft), "num_speculative_tokens": 2})
    with pytest.raises(StartupError, match=r"--session-dir .* draft model"):
        create_app(settings)


@pytest.mark.anyio
async def test_an_adapter_loaded_at_runtime_may_not_hold_the_session_dir(model_dir, tmp_path):
    # Refused for a --lora-modules adapter at startup, but /v1/load_lora_adapter took one: a session named
    # adapter_model was then written over (or DELETEd as) its weights.
    from retnet.serve.lora import CONFIG_FILE, WEIGHTS_FILE

    from .conftest import serve_app

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / CONFIG_FILE).write_text("{}")
    (adapter / WEIGHTS_FILE).write_bytes(b"")
    async with serve_app(model_dir, allow_runtime_lora_updating=True, max_lora_rank=4,
                         session_dir=str(adapter)) as client:
        response = await client.post("/v1/load_lora_adapter", json={"lora_name": "s", "lora_path": str(adapter)})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_lora_adapter"
        assert "holds --session-dir" in response.json()["error"]["message"]
        assert (adapter / WEIGHTS_FILE).exists()
