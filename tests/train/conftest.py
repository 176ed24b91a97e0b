"""Shared pieces of the training tests: a small JSONL corpus, one trained tokenizer, one token cache, and
helpers that launch real ``python -m retnet.train`` / ``torchrun`` processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import TORCHRUN_STANDALONE

REPO = Path(__file__).resolve().parents[2]
RUNS_WORKER = Path(__file__).with_name("runs_worker.py")


def micro_args(corpus: Path, tokenizer: Path, cache: Path, output_dir: Path, **overrides) -> list[str]:
    """CLI arguments of a micro model (hidden 32, 2 layers, 32-token blocks) on the test corpus."""
    values = {
        "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
        "model.chunk_size": 16, "data.dataset": corpus, "data.tokenizer": tokenizer, "data.cache_dir": cache,
        "data.seq_len": 32, "data.val_fraction": 0.1, "train.output_dir": output_dir, "train.steps": 6,
        "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.eval_interval": 0,
        "train.eval_blocks": 8, "optim.lr": 3e-3, "optim.warmup_steps": 1, "checkpoint.interval": 0,
        "checkpoint.export": False, "logging.progress": False, "logging.tensorboard": False,
        "logging.log_interval": 1,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", "tiny", *[f"--{k}={v}" for k, v in values.items()]]


def train_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def train_command(args: list[str], nproc: int | None = None) -> list[str]:
    """``python -m retnet.train ARGS`` or, with ``nproc``, a real torchrun of that many processes."""
    if nproc is None:
        return [sys.executable, "-m", "retnet.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *TORCHRUN_STANDALONE,
            "-m", "retnet.train", *args]


# A launch's bound, not its expected time: 4 ranks starting on a loaded 2-core CI machine take minutes
def run_train(args: list[str], nproc: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(args, nproc), cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_train_many(runs: list[list[str]], nproc: int, out: Path, timeout: float = 600
                   ) -> list[subprocess.CompletedProcess]:
    """``runs`` (each a ``retnet-train`` argument list), one after another in one torchrun launch of ``nproc``
    ranks (tests/train/runs_worker.py): each returned as ``run_train`` returns its own launch, stdout and stderr
    the ranks' in rank order; a run after one that failed was not run (returncode -1, the launch's stderr).
    Two ranks take them in this test process's launch kept up for its session (``RunsPool``)."""
    if nproc in POOLED_WORLD_SIZES:
        return RunsPool.of(nproc).run(runs, out, timeout)
    return launch_runs(runs, nproc, out, timeout=timeout)[1]


def _launch_command(nproc: int, *worker_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *TORCHRUN_STANDALONE,
            *worker_args]


def _launch_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    return dict(train_env(environ), OMP_NUM_THREADS="1")


def launch_runs(runs: list[list[str]], nproc: int, out: Path, worker: Path = RUNS_WORKER, timeout: float = 600,
                **plan) -> tuple[subprocess.CompletedProcess, list[subprocess.CompletedProcess]]:
    """``run_train_many`` through ``worker`` (runs_worker.py or a script that ends in its ``main``), ``plan``'s
    other keys in its PLAN.json, in a launch of its own: (the launch, each run finished)."""
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps({**plan, "runs": runs, "out": str(out)}))
    command = _launch_command(nproc, str(worker), str(plan_path))
    try:
        launch = subprocess.run(command, cwd=REPO, env=_launch_env(), capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as expired:  # the runs that finished still report, the rest as not run
        launch = subprocess.CompletedProcess(command, -9, _text(expired.stdout),
                                             _text(expired.stderr) + f"\n(launch killed after {timeout} s)")
    return launch, _finished_runs(runs, nproc, out, launch)


def _finished_runs(runs: list[list[str]], nproc: int, out: Path, launch: subprocess.CompletedProcess
                   ) -> list[subprocess.CompletedProcess]:
    """Each of ``runs`` as its ranks reported it under ``out`` (``launch``: the launch that ran them, or their job
    in a pool's, its output appended where a rank did not report)."""
    finished = []
    for index, args in enumerate(runs):
        directory = out / f"run_{index}"
        codes = [(directory / f"rank_{rank}.status").read_text() if (directory / f"rank_{rank}.status").exists()
                 else None for rank in range(nproc)]
        if all(code is None for code in codes):  # not run: the launch ended before it
            finished.append(subprocess.CompletedProcess(args, -1, launch.stdout, launch.stderr))
            continue
        # a rank without a status was stopped by torchrun when another failed (or the launch's timeout)
        failed = [code for code in codes if code != "0"]
        reported = [code for code in failed if code not in (None, "raised")]
        returncode = 0 if not failed else int(reported[0]) if reported else 1
        stdout, stderr = ("".join(path.read_text() for path in (directory / f"rank_{rank}.{name}"
                                                                 for rank in range(nproc)) if path.exists())
                          for name in ("stdout", "stderr"))
        finished.append(subprocess.CompletedProcess(args, returncode, stdout, stderr + ("" if all(codes) else
                                                                                        launch.stderr)))
    if launch.returncode != 0 and finished and all(run.returncode == 0 for run in finished):
        # every run reported success, yet the launch failed (a rank's end after its last run): not a pass
        last = finished[-1]
        finished[-1] = subprocess.CompletedProcess(last.args, launch.returncode, last.stdout,
                                                   last.stderr + launch.stderr)
    return finished


# The world sizes whose runs go to a launch kept up for the test process's session: each of the 2-rank launches
# in eight modules cost ~22 s of CPU to start (torchrun, then torch and transformers imported in each rank), a
# micro run a second or two. (4 ranks: a launch of their own, one module checks a warning torch gives once a
# process.)
POOLED_WORLD_SIZES = (2,)


# The environment as the session began (before any test's monkeypatch): a kept launch starts with it, and each job
# carries its own differences (a test's PYTHONPATH entry, say).
_SESSION_ENVIRON = dict(os.environ)
# Set by torchrun in each rank, or fixed for the launch: a job never carries them.
_LAUNCH_KEYS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"}


class RunsPool:
    """One torchrun launch of ``nproc`` ranks (runs_worker.py ``--pool``) that runs each test's runs as a job when
    it comes, for the rest of this test process: the process group, the imports and the worker kept between them.
    A job whose run fails ends the launch (as a launch of its own ends), the next job starts another; so does a
    job past its timeout (the launch and its ranks killed)."""

    _pools: dict[int, RunsPool] = {}

    @classmethod
    def of(cls, nproc: int) -> RunsPool:
        pool = cls._pools.get(nproc)
        if pool is None or pool.process.poll() is not None:
            if pool is not None:
                pool.stop()
            pool = cls._pools[nproc] = cls(nproc)
        return pool

    @classmethod
    def stop_all(cls) -> None:
        for pool in cls._pools.values():
            pool.stop()
        cls._pools.clear()

    def __init__(self, nproc: int):
        import tempfile

        self.nproc, self.jobs = nproc, 0
        self.directory = Path(tempfile.mkdtemp(prefix=f"runs-pool-{nproc}-"))
        self.env = _launch_env(_SESSION_ENVIRON)
        self.log = self.directory / "launch.log"
        output = open(self.log, "wb")  # noqa: SIM115 - the launch's; never moved here (it shares the offset)
        self.command = _launch_command(nproc, str(RUNS_WORKER), "--pool", str(self.directory), str(os.getpid()))
        self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=output,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        output.close()

    def run(self, runs: list[list[str]], out: Path, timeout: float, retry: bool = True
            ) -> list[subprocess.CompletedProcess]:
        import time

        out.mkdir(parents=True, exist_ok=True)
        now = train_env()
        environment = {key: value for key, value in now.items() if self.env.get(key) != value}
        environment.update({key: None for key in self.env if key not in now})
        environment = {key: value for key, value in environment.items()
                       if key not in _LAUNCH_KEYS and not key.startswith("TORCHELASTIC_")}
        job, self.jobs = self.directory / f"job_{self.jobs}", self.jobs + 1
        log_start = self.log.stat().st_size
        written = job.with_suffix(".tmp")
        written.write_text(json.dumps({"runs": runs, "out": str(out), "environment": environment}))
        written.rename(job.with_suffix(".json"))  # whole when the ranks see it
        done = [job.with_name(f"{job.name}.rank_{rank}.done") for rank in range(self.nproc)]
        deadline = time.monotonic() + timeout
        while not all(path.exists() for path in done):
            if self.process.poll() is not None:
                break
            if time.monotonic() > deadline:
                self._kill()
                break
            time.sleep(0.05)
        else:
            if all(path.read_text() == "0" for path in done):
                return _finished_runs(runs, self.nproc, out, subprocess.CompletedProcess(self.command, 0, "", ""))
            self._wait_for_end()  # a run failed: its ranks end the launch, as they end a launch of its own
        output = self.log.read_bytes()[log_start:].decode(errors="replace")
        if self.process.returncode == -9:
            output += f"\n(launch killed after {timeout} s)"
        elif retry and not any(path.exists() for path in done) and not any(out.glob("run_*/rank_*.status")):
            # the launch ended before a rank took the job (between two jobs): the job on a new one
            return RunsPool.of(self.nproc).run(runs, out, timeout, retry=False)
        return _finished_runs(runs, self.nproc, out,
                              subprocess.CompletedProcess(self.command, self.process.returncode, output, output))

    def _kill(self) -> None:
        import signal

        # torchrun starts each rank in a session of its own: each is killed by its pid, then the launch
        for pid_file in self.directory.glob("rank_*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def _wait_for_end(self) -> None:
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._kill()

    def stop(self) -> None:
        if self.process.poll() is None:
            (self.directory / "stop").touch()
            self._wait_for_end()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _stop_runs_pools():
    yield
    RunsPool.stop_all()


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def save_micro_base(directory: Path, tokenizer) -> None:
    """A seeded micro RetNetForCausalLM (hidden 32, 2 layers) over ``tokenizer``, saved with it to ``directory``:
    the ``model.init_from`` of the fine-tuning tests."""
    import torch

    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.train.data import vocab_bound

    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      chunk_size=16, vocab_size=vocab_bound(tokenizer),
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    RetNetForCausalLM(config).save_pretrained(directory)


def train_fsdp_in_process(args: list[str], resumed_step: int) -> None:
    """Train ``retnet-train`` ``args`` (after ``--config tiny``) under FSDP2 in this process, a one-rank gloo group,
    checking that it resumed at ``resumed_step``."""
    import torch.distributed as dist

    from retnet.train.config import load_config
    from retnet.train.trainer import Trainer

    # a store in this process: no port, which another process could take between its pick and its bind
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainer = Trainer(load_config("tiny", [*args, "--train.parallelism=fsdp"]))
        try:
            assert trainer.fsdp and trainer.step == resumed_step
            trainer.train()
        finally:
            trainer.close()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as every torchrun rank computes (torchrun sets OMP_NUM_THREADS=1): an in-process run
    compared to launched ranks must not depend on how pytest was started (one process has both cores, an xdist
    worker one). A sampled token is discrete: weights a thread count's summation order moves by 1e-6 can flip one
    after a few updates, and that run then draws other completions."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def metrics(output_dir: Path, kind: str = "train") -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def timeless(records: list[dict]) -> list[dict]:
    """``records`` without the fields a clock measures (mfu: from tokens/s): what a resumed run logs again alike."""
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "mfu")} for r in records]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~150 documents of real Python (stdlib sources cut to 3000 characters) as JSONL."""
    from retnet.train.data import stdlib_files

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as handle:
        for file in stdlib_files()[:150]:
            handle.write(json.dumps({"text": file.read_text(errors="replace")[:3000]}) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    from retnet.tokenization import train_byte_level_bpe

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    path = tmp_path_factory.mktemp("tokenizer")
    train_byte_level_bpe(texts, vocab_size=512).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture
def micro(corpus, tokenizer_dir, cache_dir):
    """``micro(output_dir, **overrides)`` -> CLI arguments (``section__key=value`` overrides)."""
    return lambda output_dir, **overrides: micro_args(corpus, tokenizer_dir, cache_dir, output_dir, **overrides)


@pytest.fixture
def run():
    """``run(args, nproc=None)``: a finished training process (CompletedProcess)."""
    return run_train


@pytest.fixture
def run_many(tmp_path):
    """``run_many(runs, nproc)``: ``runs`` in one torchrun launch, each a finished run (see ``run_train_many``)."""
    launches = iter(range(1_000))
    return lambda runs, nproc: run_train_many(runs, nproc, tmp_path / f"launch_{next(launches)}")


@pytest.fixture
def run_here(capsys):
    """``run_here(args)``: ``retnet-train ARGS`` as ``main(args)`` in this process, returned as ``run`` returns a
    process (returncode, stdout, stderr): a single-process run that needs no process of its own (no signal, no exit
    status of the interpreter, no process group) starts without importing torch and transformers again (~6 s)."""
    from retnet.train.__main__ import main

    def start(args: list[str]) -> subprocess.CompletedProcess:
        capsys.readouterr()  # this run's output only
        status = main(args)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, status, out.out, out.err)

    return start


def wait_while_running(predicate, process, timeout=600.0):
    """Poll ``predicate`` while ``process`` runs; the deadline only bounds a run that hangs (a loaded CI machine
    takes minutes to import torch and tokenize)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        assert process.poll() is None, f"training exited early with {process.returncode}"
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture
def read_metrics():
    return metrics
