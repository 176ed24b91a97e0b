"""Shared fixtures: a micro random RetNet and a small BPE tokenizer saved as the training launcher exports
them (save_pretrained), an in-process app factory, and a real uvicorn server in a subprocess (forked from a warm
interpreter: warm_servers.py) or in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import retnet  # noqa: F401  (registers the Auto classes)
from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.serve.settings import ServeSettings
from tests.launch import free_port
from tests.serve.warm_servers import start_server

REPO = Path(__file__).resolve().parents[2]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "for i in range(10):\n    print(i * i)\n",
    "The retention mechanism replaces attention with a decaying recurrence.\n",
    "Hello world! How are you today? I am fine, thank you.\n",
    "A recurrent state of fixed size carries the whole context from one token to the next.\n",
    "Unicode: café, naïve, 東京, emoji 🙂 and more.\n",
] * 10


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """config.json, model.safetensors, generation_config.json and the tokenizer files of a micro RetNet."""
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("retnet-micro")
    return save_micro_model(path, train_byte_level_bpe(CORPUS, vocab_size=384, min_frequency=1))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    """The micro model's tokenizer, loaded as the server loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    """A grammar compiler over the micro model's vocabulary, EOS ending a text (as the engine builds it)."""
    from retnet.serve.structured import GrammarCompiler

    return GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


def save_micro_model(path: Path, tokenizer) -> Path:
    """A micro random RetNet (seed 0) for ``tokenizer``, saved with it in ``path`` as a training run exports."""
    config = RetNetConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, chunk_size=16,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        # A wider init than training's makes the random model's logits less flat, so greedy choices are far
        # from ties and no test depends on the last bits of a float.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    RetNetForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_settings(model_dir: Path, **overrides) -> ServeSettings:
    values = dict(model=str(model_dir), served_model_name="micro", max_running=64, max_queue=64)
    values.update(overrides)
    return ServeSettings(**values)


@contextlib.asynccontextmanager
async def serve_app(model_dir: Path, model=None, **overrides):
    """An httpx client on an in-process app whose engine runs (lifespan entered, model ready); ``model``: a loaded
    model to serve instead of the directory's."""
    from retnet.serve.app import create_app

    app = create_app(make_settings(model_dir, **overrides), model=model)
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(app.state.engine.wait_ready, 60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            client.app = app
            yield client


class ServerProcess:
    def __init__(self, model_dir: Path, *args: str, env: dict | None = None, module: str = "retnet.serve"):
        """``module``: run instead of ``retnet.serve`` (a test's wrapper around it, on ``env``'s PYTHONPATH)."""
        self._module = module
        self._args = ["--model", str(model_dir), "--served-model-name", "micro", "--log-level", "warning", *args]
        self._env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self._start()

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # forked from a warm interpreter (tests/serve/warm_servers.py) unless the test gives variables of its own
        self.proc = start_server(self._module, [*self._args, "--port", str(self.port)], self._env)

    def wait_healthy(self, timeout: float = 600.0) -> None:
        # A server that exits is seen at once (poll); the deadline only bounds one that hangs, so it leaves a loaded
        # machine (several servers importing torch at once beside the test workers) all the time it needs.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.proc.stdout.read().decode(errors="replace")
                # The port was free when picked, but the server binds it only after importing torch: another
                # process (the other xdist worker's server, a gloo connection) may have taken it meanwhile.
                if "address already in use" in output.lower():
                    self._start()
                    continue
                raise RuntimeError(f"server exited: {output}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError("server did not become healthy")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read().decode(errors="replace")


class ThreadServer:
    """``retnet-serve``'s own server in a thread of the test's process: its flags read as the command reads them,
    its app and ``DrainingServer`` made as it makes them, uvicorn serving them over real HTTP on a loopback port (its
    socket bound here before the thread starts, so no other process can take the port). A ``ServerProcess``'s
    interface (``url``, ``wait_healthy``, ``stop``) without the ~10 CPU-s of a new interpreter importing torch and
    transformers: for a module's second server, whose tests are about what it answers, not about its process."""

    def __init__(self, model_dir, *args: str):
        import uvicorn

        from retnet.serve.__main__ import ANSWER_S, _draining_server, parse_settings

        settings = parse_settings(["--model", str(model_dir), "--served-model-name", "micro", "--log-level",
                                   "warning", *args])
        from retnet.serve.app import create_app

        app = create_app(settings)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # log_config None: uvicorn leaves the test process's logging as it is
        config = uvicorn.Config(app, log_config=None, log_level=settings.log_level,
                                timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + ANSWER_S)
        self.server = _draining_server()(config, app.state.engine, settings.shutdown_grace_s)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()

    def wait_healthy(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the server's thread ended before it was healthy")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError("server did not become healthy")

    def stop(self) -> str:
        self.server.should_exit = True
        self._thread.join(60)
        self._socket.close()
        assert not self._thread.is_alive(), "the server's thread did not stop"
        return ""


def held_serve_env(tmp_path: Path, name: str, hold: str) -> dict:
    """The env of a ``ServerProcess(..., module=name)``: ``python -m retnet.serve`` after ``hold``, a test's Python
    that patches the server's code (written to ``tmp_path / f"{name}.py"``) so that it waits for what the test
    looks at rather than racing it."""
    runner = "\nimport runpy\n\nrunpy.run_module('retnet.serve', run_name='__main__', alter_sys=True)\n"
    (tmp_path / f"{name}.py").write_text(hold + runner)
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}


@contextlib.contextmanager
def running_servers(*procs: ServerProcess):
    """``procs`` (already started, so that their loading overlaps) once each answers /health; stopped after."""
    try:
        for proc in procs:
            proc.wait_healthy()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="session")
def server(model_dir):
    """A real ``python -m retnet.serve`` on a free loopback port, shared by the end-to-end tests."""
    with running_servers(ServerProcess(model_dir, "--max-running", "64", "--max-queue", "64")) as (proc,):
        yield proc


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def open_app(model_dir):
    """``async with open_app(**settings) as client``: a fresh in-process server on the micro model."""
    return lambda **overrides: serve_app(model_dir, **overrides)


@pytest.fixture
def server_process(model_dir):
    """``ServerProcess(*flags)`` factory for tests that need their own uvicorn process."""
    started = []

    def start(*args, **kwargs):
        started.append(ServerProcess(model_dir, *args, **kwargs))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def watch_state_copies(monkeypatch) -> list[int]:
    """The rows each ``RetNetCache.clone`` / ``select`` copies from now on, appended in call order."""
    from retnet.model import RetNetCache

    copied: list[int] = []
    clone, select = RetNetCache.clone, RetNetCache.select

    def watched_clone(self):
        copied.append(self.batch_size)
        return clone(self)

    def watched_select(self, indices):
        out = select(self, indices)
        copied.append(out.batch_size)
        return out

    monkeypatch.setattr(RetNetCache, "clone", watched_clone)
    monkeypatch.setattr(RetNetCache, "select", watched_select)
    return copied


@contextlib.contextmanager
def decoding_held(engine, monkeypatch):
    """Within the block the scheduler waits before each decode step: a request admitted meanwhile is still running
    when looked at, however slowly a loaded machine answers the test's other requests."""
    gate = threading.Event()
    decode_step = engine._decode_step

    def held_step():
        gate.wait(120)
        decode_step()

    monkeypatch.setattr(engine, "_decode_step", held_step)
    try:
        yield
    finally:
        gate.set()
