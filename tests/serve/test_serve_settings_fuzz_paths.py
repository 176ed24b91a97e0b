"""Startup settings found by fuzzing flags and their RETNET_* twins: a device that cannot hold the model is refused
at startup naming --device (not a traceback, nor a server whose every request fails), and a variable holding JSON
text a flag would take as plain text (RETNET_API_KEYS=123456, =null) means what the flag means."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from pydantic import ValidationError

from retnet.serve.__main__ import main
from retnet.serve.app import create_app
from retnet.serve.settings import ServeSettings, StartupError


@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:x"])
def test_a_device_torch_does_not_name_or_that_holds_no_data_is_a_settings_error(tmp_path, monkeypatch, device):
    # Was accepted: "bogus" raised torch's RuntimeError out of create_app, "meta" started a server whose every
    # request failed with "Cannot copy out of meta tensor".
    with pytest.raises(ValidationError, match=rf"device \(--device\).*'{device}'"):
        ServeSettings(model=str(tmp_path), device=device)
    monkeypatch.setenv("RETNET_DEVICE", device)
    with pytest.raises(ValidationError, match=rf"device \(--device\).*'{device}'"):
        ServeSettings(model=str(tmp_path))


def test_a_device_name_is_read_whatever_its_case_and_spaces(tmp_path):
    assert ServeSettings(model=str(tmp_path), device=" CPU ").device == "cpu"
    assert ServeSettings(model=str(tmp_path), device="Auto").device == "auto"


def test_a_device_this_machine_lacks_is_refused_at_startup_naming_it(model_dir):
    # One past the last GPU (cuda:0 on a machine without one): it was accepted, and the engine failed loading the
    # model, leaving /health and every request 503 for as long as the server ran.
    absent = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(StartupError, match=rf"--device '{absent}' is not available here"):
        create_app(ServeSettings(model=str(model_dir), device=absent))


def test_retnet_serve_exits_2_with_one_line_for_an_absent_device(model_dir, capsys, monkeypatch):
    import uvicorn

    def serve_forever(self, *args, **kwargs):  # the bug: a server that starts and answers every request 503
        raise AssertionError("retnet-serve started a server on a device this machine lacks")

    monkeypatch.setattr(uvicorn.Server, "run", serve_forever)
    absent = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model_dir), "--device", absent])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"retnet-serve: error: --device '{absent}' is not available here")
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("text", ["123456", "null", "true", "1.50", '"quoted"', "{}"])
def test_an_api_key_from_the_environment_is_the_key_the_flag_would_be(tmp_path, monkeypatch, text):
    # pydantic-settings read the variable as JSON first: 123456 became a number (refused), null no key at all (auth
    # off), 1.50 the key "1.5", '"quoted"' the key without its quotes.
    from_flag = ServeSettings(model=str(tmp_path), api_keys=text).api_keys
    assert from_flag == [text]
    monkeypatch.setenv("RETNET_API_KEYS", text)
    assert ServeSettings(model=str(tmp_path)).api_keys == from_flag


def test_a_list_of_api_keys_from_the_environment_still_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("RETNET_API_KEYS", '["k1", "k2"]')
    assert ServeSettings(model=str(tmp_path)).api_keys == ["k1", "k2"]
    monkeypatch.setenv("RETNET_API_KEYS", "k1, k2")
    assert ServeSettings(model=str(tmp_path)).api_keys == ["k1", "k2"]


def test_a_numeric_api_key_from_the_environment_guards_the_server(model_dir, monkeypatch):
    monkeypatch.setenv("RETNET_API_KEYS", "123456")

    async def statuses():
        app = create_app(ServeSettings(model=str(model_dir)))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            without = await client.get("/v1/models")
            keyed = await client.get("/v1/models", headers={"Authorization": "Bearer 123456"})
        return without.status_code, keyed.status_code

    assert asyncio.run(statuses()) == (401, 200)


@pytest.mark.parametrize("text", ["0", "12", "true"])
def test_lora_modules_from_the_environment_refused_naming_the_setting(tmp_path, monkeypatch, text):
    # Read as JSON, 0 reached the parser as an int: a TypeError ("'int' object is not iterable") naming nothing.
    monkeypatch.setenv("RETNET_LORA_MODULES", text)
    with pytest.raises(ValidationError, match=rf"lora_modules: each entry is name=path .*got '{text}'"):
        ServeSettings(model=str(tmp_path))


def test_lora_modules_from_the_environment_still_read_as_documented(tmp_path, monkeypatch):
    adapter = str(tmp_path / "adapter")
    monkeypatch.setenv("RETNET_LORA_MODULES", f"a={adapter} b={adapter}")
    assert [m["name"] for m in ServeSettings(model=str(tmp_path)).lora_modules] == ["a", "b"]
    monkeypatch.setenv("RETNET_LORA_MODULES", f'[{{"name": "c", "path": "{adapter}"}}]')
    assert [m["name"] for m in ServeSettings(model=str(tmp_path)).lora_modules] == ["c"]


def test_an_override_generation_config_of_null_is_refused_from_either_source(tmp_path, monkeypatch):
    # The variable's null passed as {} (read as JSON, then taken for unset) where the flag's is refused.
    with pytest.raises(ValidationError, match=r"override_generation_config .* must be a JSON object; got null"):
        ServeSettings(model=str(tmp_path), override_generation_config="null")
    monkeypatch.setenv("RETNET_OVERRIDE_GENERATION_CONFIG", "null")
    with pytest.raises(ValidationError, match=r"override_generation_config .* must be a JSON object; got null"):
        ServeSettings(model=str(tmp_path))
    monkeypatch.setenv("RETNET_OVERRIDE_GENERATION_CONFIG", '{"temperature": 0.5}')
    assert ServeSettings(model=str(tmp_path)).override_generation_config == {"temperature": 0.5}


def settings_error(capsys, *argv: str) -> str:
    from retnet.serve.__main__ import parse_settings

    with pytest.raises(SystemExit) as exited:
        parse_settings(list(argv))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "errors.pydantic.dev" not in err, err
    return err


@pytest.mark.parametrize("flag, value, expected", [
    ("--max-running", "0", "max_running (--max-running): Input should be greater than or equal to 1; got '0'"),
    ("--port", "70000", "port (--port): Input should be less than or equal to 65535; got '70000'"),
    ("--shutdown-grace-s", "nan", "shutdown_grace_s (--shutdown-grace-s): Input should be a finite number; got 'nan'"),
    ("--prefix-cache-answers", "maybe", "prefix_cache_answers (--prefix-cache-answers): Input should be a valid "
     "boolean"),
    # The keys are secrets: a refusal names the key by its place, never shows the value.
    ("--api-keys", "[1, 2]", "api_keys (--api-keys) key 1 of 2 is int, not a string (the keys are not shown"),
    ("--api-keys", "[bad", "api_keys (--api-keys) is not a JSON list: Expecting value: line 1 column 2 (char 1) (the "
     "keys are not shown"),
    ("--lora-modules", "{bad", "lora_modules (--lora-modules): Expecting property name"),
    # One that names the setting and the value is shown as it is.
    ("--device", "x", "retnet-serve: error: device (--device) must be auto, cpu, cuda, cuda:N or another torch "
     "device; got 'x' ("),
])
def test_a_refused_flag_is_one_line_naming_the_flag_and_its_value(tmp_path, capsys, flag, value, expected):
    # pydantic's own text named the field alone, over several lines and a link per error.
    err = settings_error(capsys, "--model", str(tmp_path), flag, value)
    assert err.startswith("retnet-serve: error: ") and expected in err


def test_a_refused_variable_is_named_as_the_operator_set_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RETNET_MAX_RUNNING", "0")
    err = settings_error(capsys, "--model", str(tmp_path))
    assert "max_running (RETNET_MAX_RUNNING, --max-running): Input should be greater than or equal to 1; got '0'" in err
    # The flag wins over the variable: its value is the one refused.
    err = settings_error(capsys, "--model", str(tmp_path), "--max-running", "-3")
    assert "max_running (--max-running): " in err and "got '-3'" in err


def test_a_missing_model_is_one_line_naming_the_flag_and_its_variable(capsys, monkeypatch):
    monkeypatch.delenv("RETNET_MODEL", raising=False)
    assert "--model (or RETNET_MODEL) is required" in settings_error(capsys)


def test_a_microsecond_session_ttl_does_not_have_the_writer_sweep_back_to_back(tmp_path, monkeypatch):
    # --session-ttl-s 1e-6 with --session-dir: the writer listed the directory without pause (a core's CPU, idle).
    import time

    from retnet.serve.metrics import ServeMetrics
    from retnet.serve.session_store import MIN_SWEEP_EVERY_S, SessionFiles

    sweeps = []
    monkeypatch.setattr(SessionFiles, "_sweep", lambda self: sweeps.append(time.monotonic()))
    files = SessionFiles(tmp_path / "sessions", {}, 1e-6, ServeMetrics(), (1, 1, 1, 1), 1, lambda slot: None, 8)
    files.start()
    time.sleep(0.5)
    files.close()
    # the start's own sweep, then one per MIN_SWEEP_EVERY_S at most
    assert 2 <= len(sweeps) <= 2 + 0.5 / MIN_SWEEP_EVERY_S, len(sweeps)
