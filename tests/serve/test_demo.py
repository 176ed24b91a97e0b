"""``python -m retnet.serve.demo``: an error from the server (an error event mid-stream, an error response) is
printed and ends the demo with status 1, not a KeyError traceback."""

import json

import httpx
import pytest

from retnet.serve import demo
from retnet.serve.engine import Engine


def mock_client(status: int, body: str) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(status, text=body)))


def test_an_error_event_mid_stream_is_reported(capsys):
    chunk = {"choices": [{"index": 0, "text": "Hello", "finish_reason": None}]}
    error = {"error": {"message": "engine failed: RuntimeError: boom", "type": "server_error", "param": None,
                       "code": "engine_failure"}}
    body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n"
    with pytest.raises(demo.StreamFailed, match=r"boom.*engine_failure"):
        demo.stream_once("http://test", "Hi", 4, client=mock_client(200, body))
    assert "Hello" in capsys.readouterr().out


def test_an_error_response_is_reported():
    error = {"error": {"message": "the server cannot take requests now", "type": "server_error", "param": None,
                       "code": "unavailable"}}
    with pytest.raises(demo.StreamFailed, match="HTTP 503: the server cannot take requests now"):
        demo.stream_once("http://test", "Hi", 4, client=mock_client(503, json.dumps(error)))


def test_the_demo_exits_with_status_1_when_the_engine_fails(model_dir, monkeypatch, capsys):
    def fail(self, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(Engine, "_spawn", fail)
    with pytest.raises(SystemExit) as exited:
        demo.main(["--model", str(model_dir), "--port", "0", "--max-tokens", "4", "--exit-after"])
    assert exited.value.code == 1
    assert "the completion failed: engine failed: RuntimeError: boom" in capsys.readouterr().err


@pytest.mark.anyio
async def test_the_commands_the_demo_prints_are_answered(model_dir, open_app, capsys):
    """Every curl command the demo prints for a newcomer, sent to a server of the same model: each is answered,
    and the structured one's reply is JSON of its schema."""
    import shlex

    demo.main(["--model", str(model_dir), "--port", "0", "--max-tokens", "4", "--exit-after"])
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.strip().startswith("curl")]
    posts = [(c[c.index("-N") + 1] if "-N" in c else c[1], json.loads(c[c.index("-d") + 1])) for c in commands if "-d" in c]
    assert len(posts) == 3
    async with open_app(served_model_name=model_dir.name) as client:  # the demo's: the directory's name
        for url, body in posts:
            r = await client.post(httpx.URL(url).path, json=body)
            assert r.status_code == 200, r.text
            if "response_format" in body:
                reply = json.loads(r.json()["choices"][0]["message"]["content"])
                assert isinstance(reply["name"], str) and 1 <= reply["lines"] <= 99


def test_a_training_export_is_served_under_its_runs_name_without_the_loading_bar(model_dir, tmp_path, capsys):
    """``make demo`` serves runs/demo/export, which was named 'export' (the folder) in its banner, its curl
    commands and /v1/models; and transformers drew its "Loading weights" bar for the 1M-parameter model."""
    import shutil

    from transformers.utils import logging as transformers_logging

    export = tmp_path / "demo" / "export"
    shutil.copytree(model_dir, export)
    demo.main(["--model", str(export), "--port", "0", "--max-tokens", "4", "--exit-after"])
    captured = capsys.readouterr()
    assert "serving 'demo'" in captured.out
    bodies = [line for line in captured.out.splitlines() if "/v1/completions" in line and "-d" in line]
    assert bodies and all('"model": "demo"' in line for line in bodies)
    assert "Loading weights" not in captured.err
    assert transformers_logging.is_progress_bar_enabled()  # hidden for the load only
    assert demo.run_name(str(model_dir)) is None  # any other directory keeps its own name


def test_ctrl_c_while_the_model_loads_stops_the_server_first_and_exits_130(model_dir, tmp_path):
    """A Ctrl-C while the demo waited for the model to load printed its one line, then the process aborted (status
    134, "terminate called without an active exception"): the server's and the engine's threads were left running
    torch as the interpreter exited. They are stopped first, as at the end; a second Ctrl-C while they stop (the
    load still running) escaped that wait, and aborted the process as before."""
    import signal
    import subprocess
    import sys
    import time

    wrapper, loaded = tmp_path / "slow_load.py", tmp_path / "loaded"
    # The load runs until both Ctrl-Cs were sent and had half a second to land (a minute at most): a fixed 4 s could
    # end before them on a loaded machine, and a quiet one waited all of it.
    wrapper.write_text(
        "import os, sys, time, torch\n"
        "from retnet.serve.engine import Engine\n"
        "load = Engine._load\n"
        "def slow(self, *args, **kwargs):\n"
        "    print('LOADING', file=sys.stderr, flush=True)\n"
        "    x, end = torch.randn(256, 256), time.monotonic() + 60\n"
        f"    while time.monotonic() < end and not os.path.exists({str(loaded)!r}):\n"
        "        x = (x @ x).tanh()  # torch at work in the engine's thread, as a real load is\n"
        "    return load(self, *args, **kwargs)\n"
        "Engine._load = slow\n"
        "from retnet.serve.demo import main\n"
        "main(sys.argv[1:])\n")
    process = subprocess.Popen([sys.executable, str(wrapper), "--model", str(model_dir), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "LOADING" in line:
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    loaded.touch()
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "interrupted" in err and "terminate called" not in err and "Traceback" not in err


def test_an_adapter_named_as_the_run_keeps_its_name(model_dir, tmp_path, monkeypatch, capsys):
    """retnet-serve takes RETNET_LORA_MODULES=demo=... beside runs/demo/export; the demo, naming the model after the
    run, refused it as "the base model's name" although the user named no model 'demo'."""
    import shutil

    export = tmp_path / "demo" / "export"
    shutil.copytree(model_dir, export)
    monkeypatch.setenv("RETNET_LORA_MODULES", f"demo={tmp_path / 'no-adapter-here'}")
    with pytest.raises(SystemExit):  # (the adapter's path holds none: refused as retnet-serve refuses it)
        demo.main(["--model", str(export), "--port", "0", "--max-tokens", "4", "--exit-after"])
    err = capsys.readouterr().err
    assert "base model's name" not in err and "no-adapter-here" in err, err[-1500:]
