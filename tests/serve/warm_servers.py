"""The suite's ``python -m retnet.serve`` processes (and a few other ``python -m`` / ``python -c`` runs of the suite's
environment) forked from a warm interpreter: without each one's ~10 s of CPU importing torch, transformers and the
server's modules (on 2 cores, that start was most of a serve file's time).

Run as a script, this file is that interpreter (the *zygote*): it imports what a server imports, then reads requests
(one JSON line each: the module or code and its arguments, the environment, working directory, PYTHONPATH and files
for stdin, stdout and stderr) and forks a child for each. The child becomes the command as ``python -m`` (or ``-c``)
would run it: ``runpy`` (or the code in a fresh ``__main__``) at this file's top level, ``sys.argv`` and ``sys.path``
as that command's, its output to the files, stdin ``/dev/null`` (or the file). So an exception, ``SystemExit`` or a
signal ends it as it would end a fresh process. The zygote stays the child's parent: it reaps it and writes its
status (``Popen``'s: ``-N`` for signal N) to a file, which :class:`ForkedProcess` (``subprocess.Popen``'s interface,
the part the tests use) reads.

Only the environment the zygote started with can be forked: torch, transformers and retnet read some variables at
import. :func:`start_server`, :func:`start_python` and :func:`run_python` fork when a command's environment is the
zygote's (PYTHONPATH aside), and start a fresh process otherwise. Not for a test of what a command imports or when
(the zygote has imported it all already)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------------
# The zygote (this file run as a script)
# ---------------------------------------------------------------------------------------------------------------
def _warm_imports() -> None:
    # What retnet-serve's main imports on its way to serving, not the command module itself: imported here, runpy
    # would warn that retnet.serve.__main__ was in sys.modules before it ran. Nothing here starts a thread (a fork
    # keeps only the thread that forks).
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import retnet
    import retnet.serve.app
    import retnet.serve.engine
    import retnet.serve.settings

    retnet.register()


def _write_status(path: str, status: int) -> None:
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    Path(path + ".tmp").write_text(str(code))
    os.replace(path + ".tmp", path)


def _zygote() -> dict:
    """Fork a child for each request read from stdin; return the request in the child. The zygote itself exits
    when stdin closes (the test process ended), leaving its children running as a test's own would be left."""
    _warm_imports()
    statuses: dict[int, str] = {}
    print("ready", flush=True)
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        for pid, path in list(statuses.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                _write_status(path, status)
                del statuses[pid]
        if not readable:
            continue
        chunk = os.read(0, 65536)  # (fd 0 itself: a file object around it would close it in the child)
        if not chunk:
            os._exit(0)
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                return request
            statuses[pid] = request["status"]
            print(pid, flush=True)


def _become(request: dict) -> None:
    """In the forked child: the process ``python -m MODULE ARGS`` (or ``python -c CODE ARGS``) would be, up to running
    its module or code."""
    import random

    random.seed()  # a fresh interpreter's own seed, not the zygote's state shared by every child
    stdin = os.open(request["stdin"] or os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.chdir(request["cwd"])
    # sys.path as that command's: its first entry (-m: the working directory; -c: ""), then its PYTHONPATH's entries
    # in place of the zygote's
    zygote_path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    rest = [entry for entry in sys.path[1:] if entry not in zygote_path]
    sys.path[:] = [os.getcwd() if request["module"] else "", *request["python_path"], *rest]
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["module"] or "-c", *request["args"]]


def _run(request: dict) -> None:
    import runpy

    if request["module"]:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        return
    import types

    main = types.ModuleType("__main__")  # (-c's code runs in a fresh __main__, not among this file's globals)
    sys.modules["__main__"] = main
    exec(compile(request["code"], "<string>", "exec"), main.__dict__)


# ---------------------------------------------------------------------------------------------------------------
# The test process's side
# ---------------------------------------------------------------------------------------------------------------
class ForkedProcess:
    """A forked process: the parts of ``subprocess.Popen``'s interface the tests use (``args``, ``pid``, ``stdout``,
    ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``, ``returncode``); ``stdout`` reads its output file."""

    def __init__(self, args: list[str], pid: int, stdout: Path, status: Path):
        self.args, self.pid, self._status, self.returncode = args, pid, status, None
        self.stdout = open(stdout, "rb")  # noqa: SIM115 - read after the process ends, as Popen's pipe is

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # (as Popen: not to a pid the zygote has reaped, which another process may reuse)
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Zygote:
    """This test process's zygote, started at its first forked process."""

    _lock = threading.Lock()
    _current: _Zygote | None = None

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.dir = Path(tempfile.mkdtemp(prefix="warm-servers-"))
        self.process = subprocess.Popen([sys.executable, __file__], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=None)
        assert self.process.stdout.readline().strip() == b"ready", "the warm interpreter did not start"
        self.count = 0
        atexit.register(self.close)

    @classmethod
    def of(cls, env: dict[str, str]) -> _Zygote:
        with cls._lock:
            if cls._current is None or cls._current.process.poll() is not None:
                cls._current = cls(env)
            return cls._current

    def fork(self, command: list[str], env: dict[str, str], cwd: Path, stdout: Path | None, stderr: Path | None,
             stdin: Path | None) -> ForkedProcess:
        """``command`` (``["-m", module, *args]`` or ``["-c", code, *args]``) forked, its stdout written to
        ``stdout`` (a file of the zygote's when None) and its stderr to ``stderr`` (None: with stdout)."""
        with self._lock:
            self.count += 1
            stdout = stdout or self.dir / f"{self.count}.log"
            for path in (stdout, stderr):
                if path is not None:
                    Path(path).write_bytes(b"")  # (emptied as Popen's "w" would; the child opens them later)
            status = self.dir / f"{self.count}.status"
            kind, first, *args = command
            request = {"module": first if kind == "-m" else None, "code": first if kind == "-c" else None,
                       "args": args, "env": env, "cwd": str(cwd),
                       "python_path": [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry],
                       "stdout": str(stdout), "stderr": str(stderr or stdout),
                       "stdin": None if stdin is None else str(stdin), "status": str(status)}
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
            pid = int(self.process.stdout.readline())
        return ForkedProcess([sys.executable, *command], pid, stdout, status)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def _imported_under(env: dict[str, str]) -> dict[str, str]:
    """What of ``env`` the zygote's imports may have read: all of it but PYTHONPATH (a child's own sys.path is made
    from its own), pytest's name of the running test (the child gets the test's own), the variables of
    ``datasets``, which the zygote does not import, and retnet-serve's settings' (``RETNET_MAX_RUNNING``), which
    its settings read when the command builds them, in the child."""
    settings = _settings_variables()
    return {k: v for k, v in env.items()
            if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST") and not k.startswith("HF_DATASETS_")
            and k.upper() not in settings}


@functools.cache
def _settings_variables() -> frozenset[str]:
    from retnet.serve.settings import ServeSettings

    prefix = ServeSettings.model_config.get("env_prefix", "")
    return frozenset(f"{prefix}{name}".upper() for name in ServeSettings.model_fields)


def _zygote_for(env: dict[str, str]) -> _Zygote | None:
    """This process's zygote when ``env`` is the environment it imported under (the suite's own, the repository on
    PYTHONPATH); None for a test's own variables, or once a test's monkeypatch changed os.environ since it started."""
    base = {**os.environ, "PYTHONPATH": str(REPO)}
    if _imported_under(env) != _imported_under(base):
        return None
    zygote = _Zygote.of(base)
    return zygote if _imported_under(zygote.env) == _imported_under(base) else None


def start_server(module: str, args: list[str], env: dict[str, str]) -> subprocess.Popen | ForkedProcess:
    """``python -m module *args`` (cwd the repository, stdout and stderr together, as a pipe or a file that
    ``.stdout`` reads): forked when :func:`_zygote_for` allows, otherwise a fresh process."""
    zygote = _zygote_for(env)
    if zygote is not None:
        return zygote.fork(["-m", module, *args], env, REPO, None, None, None)
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def start_python(command: list[str], env: dict[str, str], logs: Path, cwd: Path = REPO, stdin: str | None = None,
                 merged: bool = False) -> subprocess.Popen | ForkedProcess:
    """``python *command`` (``-m module ...`` or ``-c code ...``) reading ``stdin`` (None: nothing), its stdout and
    stderr written to ``logs/stdout`` and ``logs/stderr`` (``merged``: both to ``logs/stdout``, in the order written,
    ``logs/stderr`` left empty), as ``tests.launch.start_logged`` writes them (``finished`` waits for it): forked
    when :func:`_zygote_for` allows, otherwise a fresh process."""
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / "stdout", logs / "stderr"
    stderr.touch()
    stdin_file = None
    if stdin is not None:
        stdin_file = logs / "stdin"
        stdin_file.write_text(stdin)
    zygote = _zygote_for(env)
    if zygote is not None:
        process = zygote.fork(command, env, cwd, stdout, None if merged else stderr, stdin_file)
    else:
        with open(stdout, "w") as out, open(stderr, "w") as err, \
                open(stdin_file or os.devnull) as given:
            process = subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, stdin=given, stdout=out,
                                       stderr=out if merged else err, text=True)
    process.logs = logs
    return process


def run_python(command: list[str], env: dict[str, str], timeout: float, cwd: Path = REPO, merged: bool = False
               ) -> subprocess.CompletedProcess:
    """``python *command`` run to its end as ``subprocess.run(..., capture_output=True, text=True)`` returns it
    (``merged``: as with ``stderr=subprocess.STDOUT``), forked when :func:`_zygote_for` allows."""
    from tests.launch import finished

    logs = Path(tempfile.mkdtemp(prefix="warm-run-"))
    try:
        return finished(start_python(command, env, logs, cwd, merged=merged), timeout)
    finally:
        shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # as python -m puts it (not this script's folder)
    # At this file's top level, as python runs a module or -c's code: what escapes it ends the process as it would
    # end that one (a traceback and status 1, SystemExit's status). (A KeyboardInterrupt that escapes ends it with
    # status 1, as it ends a fresh process that imported retnet: peft's and torchao's imports make it so; retnet's
    # commands exit 130 on a Ctrl-C themselves.)
    _request = _zygote()
    _become(_request)
    _run(_request)
