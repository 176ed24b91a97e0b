"""The suite's forked server processes (tests/serve/warm_servers.py): a server of the suite's own environment is
forked from the warm interpreter, not started afresh (the point of it), and ends as the command would: its output,
its exit status, a signal's negative status; a test's own variables get a fresh process, but for retnet-serve's
settings' variables, which the child reads; ``-c`` code runs as ``python -c`` runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess

from tests.serve.warm_servers import REPO, ForkedProcess, run_python, start_server


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def test_a_server_of_the_suites_environment_is_forked_and_ends_as_the_command_would():
    helped = start_server("retnet.serve", ["--help"], _env())
    assert isinstance(helped, ForkedProcess)
    assert helped.wait(60) == 0
    assert "usage:" in helped.stdout.read().decode()
    refused = start_server("retnet.serve", ["--no-such-flag"], _env())
    assert refused.wait(60) == 2 and b"--no-such-flag" in refused.stdout.read()
    # a module that waits: the signal ends it, reported as Popen reports it
    waiting = start_server("http.server", ["--bind", "127.0.0.1", "0"], _env())
    assert waiting.poll() is None
    waiting.send_signal(signal.SIGKILL)
    assert waiting.wait(60) == -signal.SIGKILL


def test_a_tests_own_variables_get_a_fresh_process():
    # (transformers reads its verbosity when the zygote imports it)
    process = start_server("retnet.serve", ["--help"], _env(TRANSFORMERS_VERBOSITY="error"))
    assert isinstance(process, subprocess.Popen)
    assert process.wait(60) == 0 and b"usage:" in process.stdout.read()


def test_a_servers_setting_variable_is_forked_and_read_by_the_child():
    """retnet-serve's settings read their RETNET_* variables when the command builds them (in the child, under the
    test's environment), not at import: a server given one is forked, and the variable is the child's."""
    process = start_server("retnet.serve", ["--model", str(REPO / "no-such-model")], _env(RETNET_MAX_RUNNING="0"))
    assert isinstance(process, ForkedProcess)
    assert process.wait(60) == 2
    assert b"max_running (RETNET_MAX_RUNNING, --max-running)" in process.stdout.read()


def test_code_runs_as_python_dash_c_would_run_it():
    code = ("import json, os, sys\nprint(json.dumps([sys.argv, sys.path[0], os.getcwd(), __name__]))\n"
            "print('to stderr', file=sys.stderr)\nraise SystemExit(int(sys.argv[1]))")
    run = run_python(["-c", code, "3"], _env(), timeout=60, cwd=REPO / "tests")
    assert run.returncode == 3
    assert json.loads(run.stdout) == [["-c", "3"], "", str(REPO / "tests"), "__main__"]
    assert run.stderr == "to stderr\n"
    # what escapes the code: a traceback and status 1
    failed = run_python(["-c", "raise ValueError('no')"], _env(), timeout=60)
    assert failed.returncode == 1 and failed.stderr.rstrip().endswith("ValueError: no")
