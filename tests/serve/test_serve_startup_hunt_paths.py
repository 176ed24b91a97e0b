"""retnet-serve's start-up as an operator meets it, found by a bug hunt: a model whose weights do not load stops the
server (and the demo) with one line, and a directory retnet-train wrote that is no model (the run's output
directory, a checkpoint, an adapter) or one without a tokenizer is named with what to serve instead."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from retnet.serve import demo
from retnet.serve.__main__ import STARTUP_FAILURE, main
from retnet.serve.app import create_app
from retnet.serve.settings import ServeSettings, StartupError, check_model_dir


def without(model_dir: Path, destination: Path, *names: str) -> Path:
    """A copy of ``model_dir`` lacking ``names``."""
    shutil.copytree(model_dir, destination, ignore=lambda _, files: [f for f in files if f in names])
    return destination


def test_retnet_serve_stops_when_the_model_does_not_load(model_dir, tmp_path, capsys):
    # It listened on, every request 503 and /health "failed", until someone looked: a missing or corrupt weights
    # file, found only once the engine's thread loaded it.
    broken = without(model_dir, tmp_path / "broken", "model.safetensors")
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    exited = {}

    def serve():
        try:
            main(["--model", str(broken), "--port", "0", "--log-level", "critical"])
        except SystemExit as exc:
            exited["code"] = exc.code

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the server kept serving a model that did not load"
    assert exited.get("code") == STARTUP_FAILURE
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"retnet-serve: error: --model {str(broken)!r} did not load: "), line


def test_the_demo_stops_at_once_when_the_model_does_not_load(model_dir, tmp_path, capsys):
    # It waited out its 120 s for a /health that already said "failed", then blamed the time.
    broken = without(model_dir, tmp_path / "weightless", "model.safetensors")
    with pytest.raises(SystemExit) as exited:
        demo.main(["--model", str(broken), "--port", "0", "--exit-after"])
    assert f"--model {str(broken)!r} did not load" in str(exited.value.code)
    assert "model.safetensors" in str(exited.value.code)


def test_a_training_runs_output_directory_names_its_export(model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "export")
    (run / "config.json").write_text(json.dumps({"train": {"steps": 10}}))  # the run's configuration
    with pytest.raises(StartupError, match=r"training run's train.output_dir.*did you mean .*run/export"):
        check_model_dir(str(run))
    checkpoint = run / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    for name in ("model.pt", "optimizer.pt", "trainer.pt"):
        (checkpoint / name).touch()
    with pytest.raises(StartupError, match=r"is a training checkpoint .*give the run's export, .*run/export"):
        check_model_dir(str(checkpoint))
    shutil.rmtree(run / "export")
    with pytest.raises(StartupError, match=r"its export, .*, is not written yet"):
        check_model_dir(str(run))


def test_an_adapter_directory_says_to_serve_it_with_lora_modules(model_dir, tmp_path):
    adapter = tmp_path / "export" / "adapter"
    shutil.copytree(model_dir, tmp_path / "export")
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(StartupError, match=r"peft adapter .*the merged model a LoRA run exports is beside it.*--lora-modules NAME="):
        check_model_dir(str(adapter))


def test_a_model_directory_without_a_tokenizer_says_so(model_dir, tmp_path):
    # transformers' message asked to install sentencepiece or tiktoken.
    bare = without(model_dir, tmp_path / "bare", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    with pytest.raises(StartupError, match=r"holds no tokenizer .*tokenizer.save_pretrained"):
        create_app(ServeSettings(model=str(bare)))


@pytest.mark.anyio
async def test_vllms_api_key_variable_requires_the_key(open_app, monkeypatch):
    # A vLLM deployment's VLLM_API_KEY was ignored: the server answered anyone.
    monkeypatch.setenv("VLLM_API_KEY", "sekrit")
    async with open_app() as client:
        body = {"prompt": "Hi", "max_tokens": 1}
        assert (await client.post("/v1/completions", json=body)).status_code == 401
        keyed = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"})
        assert keyed.status_code == 200, keyed.text
    # --api-keys (or RETNET_API_KEYS) wins, as vLLM's --api-key does over its variable.
    assert ServeSettings(model="m", api_keys="mine").api_keys == ["mine"]


def test_the_demo_listens_where_retnet_host_and_retnet_port_say(model_dir, monkeypatch, capsys):
    # Its own --host/--port defaults hid the variables it documents reading as retnet-serve does.
    from tests.launch import free_port

    port = free_port()
    monkeypatch.setenv("RETNET_HOST", "127.0.0.2")
    monkeypatch.setenv("RETNET_PORT", str(port))
    demo.main(["--model", str(model_dir), "--max-tokens", "2", "--exit-after"])
    assert f"retnet-serve is up at http://127.0.0.2:{port} " in capsys.readouterr().out
