"""``retnet-run-batch`` interrupted: a second Ctrl-C while the first one's cleanup runs, or that cleanup running
past its deadline, ends the process at once with status 130, the output cut back to its complete lines. A second
Ctrl-C that cut asyncio's cleanup short left AnyIO's worker threads (not daemons: FastAPI runs every route's
API-key check there, a sync dependency) waiting for a stop the event loop never sent, and the interpreter waited
for them at exit for good. Each run is a real process, its Ctrl-Cs sent by itself at fixed points: the first once line 0 is written, the
second from inside the engine's shutdown."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.serve.conftest import CORPUS, save_micro_model
from tests.serve.warm_servers import run_python

REPO = Path(__file__).resolve().parents[2]

# argv[1]: a JSON list of [mode, output path, retnet-run-batch's arguments]. Each run is a child forked once the
# imports are done (torch's and transformers' take seconds of CPU: paid once), ending as the command's process ends
# (sys.exit: the interpreter's exit, where the old code hung). mode "again": a second Ctrl-C during the engine's
# shutdown; "stuck": that shutdown never ends. The shutdown first leaves a line cut short in the output, as a write
# interrupted half-way would. The parent prints each run's exit status (None: it had not ended 30 s later, killed).
INTERRUPTED_RUNS = """import json, os, signal, sys, time
import retnet
retnet.register()
import retnet.serve.app, retnet.serve.run_batch as run_batch, retnet.serve.sequence as sequence

run_batch.INTERRUPTED_STOP_S = 1.0  # (an attribute the old code did not read)
put, shutdown = run_batch.OrderedWriter.put, sequence.ModelThread.shutdown

def put_then_ctrl_c(self, index, line):
    put(self, index, line)
    if index == 0:
        os.kill(os.getpid(), signal.SIGINT)

def interrupted_shutdown(self, grace_s=0.0):
    with open(output, "a") as file:
        file.write('{"custom_id": "cut sho')
    if mode == "again":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)
    else:
        time.sleep(60)
    shutdown(self, grace_s)

run_batch.OrderedWriter.put = put_then_ctrl_c
sequence.ModelThread.shutdown = interrupted_shutdown
children = {}
for mode, output, args in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        stderr = os.open(output + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(stderr, 2)
        sys.exit(run_batch.main(args))
    children[pid] = mode
statuses, deadline = {}, time.monotonic() + 30
while children and time.monotonic() < deadline:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            statuses[children.pop(pid)] = os.waitstatus_to_exitcode(status)
    time.sleep(0.05)
for pid, mode in children.items():
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    statuses[mode] = None
print(json.dumps(statuses))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int | None, str, str]]:
    """Both runs, by mode: the exit status (None: the process did not end), its stderr and its output's text."""
    from retnet.tokenization import train_byte_level_bpe

    root = tmp_path_factory.mktemp("second_ctrl_c")
    model = save_micro_model(root / "micro", train_byte_level_bpe(CORPUS, vocab_size=384, min_frequency=1))
    requests = root / "requests.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                            "body": {"prompt": "x", "max_tokens": 2}}) + "\n" for i in range(4)))
    spec = [[mode, str(root / f"{mode}.jsonl"), ["--model", str(model), "-i", str(requests), "-o",
                                                 str(root / f"{mode}.jsonl"), "--max-concurrency", "1"]]
            for mode in ("again", "stuck")]
    # (forked from the suite's warm interpreter, warm_servers.py: the imports INTERRUPTED_RUNS makes are done there)
    parent = run_python(["-c", INTERRUPTED_RUNS, json.dumps(spec)], {**os.environ, "PYTHONPATH": str(REPO)},
                        timeout=120)
    assert parent.returncode == 0, parent.stderr[-3000:]
    statuses = json.loads(parent.stdout.splitlines()[-1])

    def text(path: Path) -> str:
        return path.read_text() if path.exists() else ""

    return {mode: (statuses[mode], text(Path(f"{output}.stderr")), text(Path(output))) for mode, output, _ in spec}


def complete_lines(text: str) -> list[dict]:
    assert text.endswith("\n"), f"a line cut short: {text[-80:]!r}"
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize(("mode", "says"), [
    ("again", "retnet-run-batch: interrupted again; stopped at once"),
    ("stuck", "retnet-run-batch: the interrupted run did not stop within 1 s; stopped at once"),
])
def test_an_interrupted_run_ends_at_once_on_a_second_ctrl_c_or_its_deadline(runs, mode, says):
    status, stderr, text = runs[mode]
    assert status is not None, f"the process did not end: {stderr[-2000:]}"
    assert status == 130, stderr[-3000:]
    assert says in stderr
    assert [line["custom_id"] for line in complete_lines(text)][:1] == ["c0"]
