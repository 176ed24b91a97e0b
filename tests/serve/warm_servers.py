"""``python -m retnet.serve`` processes forked from a warm interpreter: the suite's server processes without each one's
~10 s of CPU importing torch, transformers and the server's modules (on 2 cores, that start was most of a serve
file's time).

Run as a script, this file is that interpreter (the *zygote*): it imports what a server imports, then reads requests
(one JSON line each: the command's module and arguments, its environment, working directory and output file) and
forks a child for each. The child becomes the command as ``python -m`` would run it (``runpy``, ``sys.argv``, its
stdout and stderr the output file, stdin ``/dev/null``), so an exception, ``SystemExit`` or a signal ends it as it
would end a fresh process. The zygote stays the child's parent: it reaps it and writes its status (``Popen``'s:
``-N`` for signal N) to a file beside the output, which :class:`ForkedProcess` (``subprocess.Popen``'s interface, the
part the tests use) reads.

Only the environment the zygote started with can be forked: torch, transformers and retnet read some variables at
import. :func:`start_server` forks when a server's environment is the zygote's (beyond ``PYTHONPATH`` entries added
after the repository, a test's wrapper module), and starts a fresh process otherwise."""

from __future__ import annotations

import atexit
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
    """In the forked child: the process ``python -m MODULE ARGS`` would be, up to running the module."""
    import random

    random.seed()  # a fresh interpreter's own seed, not the zygote's state shared by every child
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[1:1] = request["python_path"]
    sys.argv = [request["module"], *request["args"]]


# ---------------------------------------------------------------------------------------------------------------
# The test process's side
# ---------------------------------------------------------------------------------------------------------------
class ForkedProcess:
    """A forked server: the parts of ``subprocess.Popen``'s interface the tests use (``pid``, ``stdout``, ``poll``,
    ``wait``, ``send_signal``, ``terminate``, ``kill``, ``returncode``)."""

    def __init__(self, pid: int, out: Path, status: Path):
        self.pid, self._status, self.returncode = pid, status, None
        self.stdout = open(out, "rb")  # noqa: SIM115 - read after the process ends, as Popen's pipe is

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked server {self.pid}", timeout)
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
    """This test process's zygote, started at its first forked server."""

    _lock = threading.Lock()
    _current: _Zygote | None = None

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.dir = Path(tempfile.mkdtemp(prefix="warm-servers-"))
        self.process = subprocess.Popen([sys.executable, __file__], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=None)
        assert self.process.stdout.readline().strip() == b"ready", "the warm server interpreter did not start"
        self.count = 0
        atexit.register(self.close)

    @classmethod
    def of(cls, env: dict[str, str]) -> _Zygote:
        with cls._lock:
            if cls._current is None or cls._current.process.poll() is not None:
                cls._current = cls(env)
            return cls._current

    def fork(self, module: str, args: list[str], env: dict[str, str], python_path: list[str]) -> ForkedProcess:
        with self._lock:
            self.count += 1
            out, status = self.dir / f"{self.count}.log", self.dir / f"{self.count}.status"
            out.touch()  # (the child opens it after the zygote has answered)
            request = {"module": module, "args": args, "env": env, "cwd": str(REPO), "python_path": python_path,
                       "out": str(out), "status": str(status)}
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
            pid = int(self.process.stdout.readline())
        return ForkedProcess(pid, out, status)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def _imported_under(env: dict[str, str]) -> dict[str, str]:
    """What of ``env`` the zygote's imports may have read: all of it but PYTHONPATH (compared on its own) and
    pytest's name of the running test (the child gets the test's own)."""
    return {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}


def start_server(module: str, args: list[str], env: dict[str, str]) -> subprocess.Popen | ForkedProcess:
    """``python -m module *args`` (cwd the repository, stdout and stderr together): forked from this process's
    zygote when ``env`` is the environment the zygote imported under, its ``PYTHONPATH`` perhaps with entries after
    the repository's; otherwise (a test's own variables) a fresh process."""
    base = {**os.environ, "PYTHONPATH": str(REPO)}
    extra = env.get("PYTHONPATH", "").split(os.pathsep)
    if _imported_under(env) == _imported_under(base) and extra[0] == str(REPO):
        zygote = _Zygote.of(base)
        # (a test's monkeypatch of os.environ since the zygote started: a fresh process)
        if _imported_under(zygote.env) == _imported_under(base):
            return zygote.fork(module, args, env, extra[1:])
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # as python -m puts it (not this script's folder)
    _become(_zygote())
    import runpy

    # (at this file's top level, as python -m runs a module: what escapes it ends the process as it would end that one)
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
