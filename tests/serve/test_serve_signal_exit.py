"""How ``retnet-serve`` ends on Ctrl-C and SIGTERM with a stream in flight: the stream gets its end, the process
its status (130 after a Ctrl-C, as every retnet-* command; 0 after SIGTERM, as vLLM's server), and stderr no
traceback. uvicorn raised the signal again after its shutdown: a Ctrl-C ended with status 0, a second one with the
tracebacks of a KeyboardInterrupt in the event loop and of the handlers it cancelled, SIGTERM with -15."""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from tests.serve.conftest import ServerProcess, running_servers

# A stream far longer than the test: the drain's grace ends it, with its error event and [DONE].
ENDLESS = {"prompt": "Hello", "max_tokens": 100000, "ignore_eos": True, "stream": True}
FLAGS = ("--shutdown-grace-s", "1", "--max-tokens-limit", "100000")
# The grace of the server given two: the first's drain would outlast the test, the second must end it.
LONG_GRACE = ("--shutdown-grace-s", "60", "--max-tokens-limit", "100000")


@pytest.fixture(scope="module")
def servers(model_dir):
    # Started together, so that their imports of torch overlap.
    procs = {"ctrl_c": ServerProcess(model_dir, *FLAGS), "twice": ServerProcess(model_dir, *LONG_GRACE),
             "sigterm": ServerProcess(model_dir, *FLAGS)}
    with running_servers(*procs.values()):
        yield procs


def stream_until_signalled(proc: ServerProcess, *signals: signal.Signals) -> tuple[list[str], str | None]:
    """The stream's data lines, ``signals[i]`` sent as its line ``2 * i + 1`` came (two sent at once could reach
    the process as one); and the error that cut it, if one did."""
    lines = []
    try:
        with httpx.Client(timeout=60) as client, client.stream("POST", proc.url + "/v1/completions",
                                                               json=ENDLESS) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[len("data: "):])
                    if len(lines) % 2 and len(lines) // 2 < len(signals):
                        proc.proc.send_signal(signals[len(lines) // 2])
    except httpx.TransportError as exc:  # (httpx.ReadTimeout is one: a hang fails below, as an error)
        return lines, type(exc).__name__
    return lines, None


def ended(proc: ServerProcess) -> tuple[int, str]:
    status = proc.proc.wait(timeout=60)
    return status, proc.proc.stdout.read().decode(errors="replace")


def test_ctrl_c_drains_the_stream_then_exits_130_without_a_traceback(servers):
    proc = servers["ctrl_c"]
    lines, error = stream_until_signalled(proc, signal.SIGINT)
    assert error is None and lines[-1] == "[DONE]", (error, lines[-3:])
    assert "shutting down" in json.loads(lines[-2])["error"]["message"], lines[-2]
    status, output = ended(proc)
    assert status == 130, output
    assert "Traceback" not in output and "Exception in ASGI application" not in output, output
    assert "retnet-serve: interrupted" in output, output


def test_a_second_ctrl_c_exits_at_once_130_closing_the_stream_without_a_traceback(servers):
    proc = servers["twice"]
    lines, error = stream_until_signalled(proc, signal.SIGINT, signal.SIGINT)
    assert lines and lines[-1] != "[DONE]" and error is not None, (error, lines[-3:])  # cut, not a hang
    status, output = ended(proc)
    assert status == 130, output
    assert "Traceback" not in output and "CancelledError" not in output, output
    assert "retnet-serve: interrupted again" in output, output


def test_sigterm_drains_the_stream_then_exits_0_without_a_traceback(servers):
    proc = servers["sigterm"]
    lines, error = stream_until_signalled(proc, signal.SIGTERM)
    assert error is None and lines[-1] == "[DONE]", (error, lines[-3:])
    status, output = ended(proc)
    assert status == 0, output
    assert "Traceback" not in output, output
