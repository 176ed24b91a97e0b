"""``python -m retnet.serve.run_batch``: a real process on the micro model, its lines checked against what the
in-process server answers for the same requests; and the engine batching a file's requests together."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retnet.serve.run_batch import OutputError, parse_lines, run_batch, served_urls
from tests.launch import RUN_EACH, finished, logged_run, selected_tests, stop
from tests.serve.warm_servers import start_python

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def line(custom_id, url, body, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def start_clis(runs: list[tuple[str, list[str], Path]], stdin: str, logs: Path) -> subprocess.Popen:
    """``runs`` (each: "-m" for ``python -m retnet.serve.run_batch`` or "script" for the installed
    ``retnet-run-batch``, its arguments, its logs directory) started in one process, reading ``stdin``:
    ``cli_result`` waits for a run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = Path(sys.executable).parent / "retnet-run-batch"
    spec = []
    for command, args, run_logs in runs:
        run_logs.mkdir(parents=True, exist_ok=True)
        spec.append([[str(script)] if command == "script" else ["-m", "retnet.serve.run_batch"], args, str(run_logs)])
    # (forked from the suite's warm interpreter: tests/serve/warm_servers.py)
    return start_python(["-c", RUN_EACH, json.dumps(spec)], env, logs, stdin=stdin)


def cli_result(process: subprocess.Popen, logs: Path, timeout: float) -> subprocess.CompletedProcess:
    """The run of ``process`` logged in ``logs``, once the process has ended, as ``subprocess.run`` returns it."""
    runner = finished(process, timeout=timeout)
    run = logged_run(process.args, logs)
    assert runner.returncode == 0 and run is not None, runner.stderr[-3000:]
    return run


def without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def assert_same(got, want, where="body"):
    """Equal, but for floats (logprobs) to 1e-4: a batch of other rows changes their last bits, not the tokens."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, where


GOOD = {
    "chat-1": (CHAT, {"model": "micro", "messages": [{"role": "user", "content": "Hello world!"}],
                      "max_tokens": 12, **GREEDY}),
    "cmpl-1": (COMPLETIONS, {"prompt": "def add(a, b):", "max_tokens": 10, "logprobs": 2, **GREEDY}),
    "chat-2": (CHAT, {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "How are you?"}], "max_tokens": 6, "n": 2,
                      **GREEDY}),
    "cmpl-2": (COMPLETIONS, {"prompt": ["for i in", "class Stack:"], "max_tokens": 8, "stop": ["\n"], **GREEDY}),
}
LINES = [
    line("chat-1", *GOOD["chat-1"]),
    line("cmpl-1", *GOOD["cmpl-1"]),
    '{"custom_id": "broken", "body": ',                                                    # line 3: not JSON
    line("streamed", COMPLETIONS, {"prompt": "x", "stream": True}),
    "",                                                                                    # blank: skipped
    line("chat-1", COMPLETIONS, {"prompt": "again"}),                                      # duplicate custom_id
    line("audio", "/v1/audio/transcriptions", {"input": "x"}),                             # not a route here
    line("chat-2", *GOOD["chat-2"]),
    line("bad-param", COMPLETIONS, {"prompt": "x", "temperature": -1}),                    # the server's 400
    line("bad-model", CHAT, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),  # its 404
    line("cmpl-2", *GOOD["cmpl-2"]),
]


@pytest.fixture(scope="module")
def cli_runs(request, model_dir, tmp_path_factory):
    """The CLI runs of this module's selected tests, in one process started when the first is needed:
    ``{test name: (process, the run's directory)}``, its logs in ``directory / "logs"``. The batch: stdin in, a file
    out (both of the CLI's less obvious paths, `-`, and the ordinary one). Bad arguments: a missing input file,
    through the installed ``retnet-run-batch``."""
    selected = selected_tests(request)
    root = tmp_path_factory.mktemp("run-batch")
    runs, directories = [], {}
    if "test_batch_file_matches_the_server" in selected:
        out = root / "batch" / "results.jsonl"
        directories["test_batch_file_matches_the_server"] = out.parent
        runs.append(("-m", ["-i", "-", "-o", str(out), "--model", str(model_dir), "--served-model-name", "micro",
                            "--log-level", "warning", "--max-concurrency", "4"], out.parent / "logs"))
    if "test_bad_arguments_exit_2" in selected:
        bad = root / "bad"
        directories["test_bad_arguments_exit_2"] = bad
        runs.append(("script", ["-i", str(bad / "missing.jsonl"), "-o", str(bad / "out.jsonl"), "--model",
                                str(model_dir)], bad / "logs"))
    if "test_a_full_disk_ends_the_run_in_one_line" in selected:
        full = root / "full"
        directories["test_a_full_disk_ends_the_run_in_one_line"] = full
        full.mkdir()
        (full / "requests.jsonl").write_text("\n".join(LINES) + "\n")
        runs.append(("script", ["-i", str(full / "requests.jsonl"), "-o", "/dev/full", "--model", str(model_dir),
                                "--log-level", "warning", "--max-concurrency", "2"], full / "logs"))
    process = start_clis(runs, "\n".join(LINES) + "\n", root / "logs") if runs else None
    yield {name: (process, directory) for name, directory in directories.items()}
    if process is not None:
        stop(process)


async def test_batch_file_matches_the_server(cli_runs, open_app):
    process, directory = cli_runs["test_batch_file_matches_the_server"]
    out = directory / "results.jsonl"
    proc = cli_result(process, directory / "logs", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "run_batch: 10 requests, 6 failed" in proc.stderr  # the summary line
    results = [json.loads(text) for text in out.read_text().splitlines()]

    expected_ids = ["chat-1", "cmpl-1", None, "streamed", "chat-1", "audio", "chat-2", "bad-param", "bad-model",
                    "cmpl-2"]
    assert [r["custom_id"] for r in results] == expected_ids  # one line per request, in input order
    assert len({r["id"] for r in results}) == len(results) and all(r["id"].startswith("batch_req_") for r in results)
    failures = {  # position: (status, param, code)
        2: (400, None, "invalid_json"),
        3: (400, "stream", "unsupported_parameter"),
        4: (400, "custom_id", "duplicate_custom_id"),
        5: (400, "url", "unsupported_url"),
        7: (400, "temperature", "greater_than_equal"),
        8: (404, "model", "model_not_found"),
    }
    for i, result in enumerate(results):
        response = result["response"]
        assert response["request_id"]
        if i not in failures:
            assert response["status_code"] == 200 and result["error"] is None, result
            continue
        status, param, code = failures[i]
        error = response["body"]["error"]
        assert (response["status_code"], error["param"], error["code"]) == (status, param, code), result
        assert result["error"] == {"code": code, "message": error["message"], "param": param,
                                   "line": i + 1 + (i >= 4)}  # the blank line 5 still counts
    assert "line 3" in results[2]["error"]["message"]

    # Each good line's body is what the server answers for the same request, ids and times aside.
    async with open_app() as client:
        for i, custom_id in enumerate(expected_ids):
            if custom_id in GOOD and i not in failures:
                url, body = GOOD[custom_id]
                direct = await client.post(url, json=body)
                assert direct.status_code == 200
                assert_same(without_ids(results[i]["response"]["body"]), without_ids(direct.json()), custom_id)


def test_bad_arguments_exit_2(cli_runs):
    process, directory = cli_runs["test_bad_arguments_exit_2"]
    proc = cli_result(process, directory / "logs", timeout=180)  # after the batch's run where both are selected
    assert proc.returncode == 2
    assert proc.stderr.startswith("retnet-run-batch: error: cannot read the input file") and "missing.jsonl" in proc.stderr
    assert not (directory / "out.jsonl").exists()  # nothing written, the model never loaded


def test_a_full_disk_ends_the_run_in_one_line(cli_runs):
    """``-o`` on a full disk (Linux's /dev/full: every write is ENOSPC), or any other OSError writing it (EIO,
    EACCES): one line naming the output and the error, the bar closed before it, exit status 1. It was a
    traceback, twice over (the file's close at the end flushed the failed text again); only a broken pipe was one
    line."""
    process, directory = cli_runs["test_a_full_disk_ends_the_run_in_one_line"]
    proc = cli_result(process, directory / "logs", timeout=240)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == ("retnet-run-batch: cannot write the output file '/dev/full': No space "
                                            "left on device; the lines after it were not written")


async def test_requests_are_decoded_together(open_app):
    """A file's requests share decode steps: 8 requests of 24 tokens take far fewer steps than 8 × 24."""
    requests, tokens = 8, 24
    text = "\n".join(line(f"r{i}", COMPLETIONS, {"prompt": f"def f{i}(a, b):", "max_tokens": tokens, **GREEDY})
                     for i in range(requests))
    async with open_app() as client:
        app = client.app
        entries = parse_lines(text.splitlines(), served_urls(app))
        out = io.StringIO()
        summary = await run_batch(app, entries, out, max_concurrency=requests, progress=False)
        samples = app.state.metrics.step.collect()[0].samples
        steps = next(sample.value for sample in samples if sample.name.endswith("_count"))
    assert (summary.requests, summary.failed, summary.completion_tokens) == (requests, 0, requests * tokens)
    assert [json.loads(text)["custom_id"] for text in out.getvalue().splitlines()] == [f"r{i}" for i in range(requests)]
    assert 0 < steps <= requests * tokens // 2, steps  # one at a time would take about requests × tokens


async def test_the_summary_counts_every_prompt_token_of_anthropic_and_responses_lines(open_app):
    """Anthropic's ``input_tokens`` leave out the prompt's tokens read from the prefix cache: the summary adds
    ``cache_read_input_tokens`` back, so that a Messages line counts its whole prompt, as a chat line does. One
    line at a time: the second Messages line reads the first's prompt from the cache."""
    ask = [{"role": "user", "content": "def add(a, b):"}]
    text = "\n".join([line("m1", "/v1/messages", {"model": "micro", "messages": ask, "max_tokens": 2, **GREEDY}),
                      line("m2", "/v1/messages", {"model": "micro", "messages": ask, "max_tokens": 2, **GREEDY}),
                      line("c", CHAT, {"messages": ask, "max_tokens": 2, **GREEDY}),
                      line("r", "/v1/responses", {"input": ask, "max_output_tokens": 2, **GREEDY})])
    async with open_app() as client:
        entries = parse_lines(text.splitlines(), served_urls(client.app))
        out = io.StringIO()
        summary = await run_batch(client.app, entries, out, max_concurrency=1, progress=False)
    usage = {item["custom_id"]: item["response"]["body"]["usage"]
             for item in map(json.loads, out.getvalue().splitlines())}
    prompt = usage["c"]["prompt_tokens"]
    assert usage["m2"]["cache_read_input_tokens"] > 0 and usage["m2"]["input_tokens"] < prompt, usage
    for name in ("m1", "m2"):
        assert usage[name]["input_tokens"] + usage[name]["cache_read_input_tokens"] == prompt, usage
    assert usage["r"]["input_tokens"] == prompt, usage
    assert (summary.failed, summary.prompt_tokens, summary.completion_tokens) == (0, 4 * prompt, 8), summary


async def test_a_queue_that_never_frees_is_written_as_its_429(monkeypatch):
    """429s are retried, but not forever: after RETRY_429_S the line gets the server's 429."""
    import httpx

    from retnet.serve import run_batch

    calls = []

    class AlwaysFull:
        async def post(self, url, json):
            calls.append(url)
            return httpx.Response(429, json={"error": {"message": "full", "type": "rate_limit", "param": None,
                                                        "code": "queue_full"}})

    monkeypatch.setattr(run_batch, "RETRY_429_S", 0.1)
    entry = run_batch.BatchLine(line=1, custom_id="a", url="/v1/completions", body={"prompt": "x"})
    status, body = await run_batch.post(AlwaysFull(), entry)
    assert status == 429 and body["error"]["code"] == "queue_full" and len(calls) > 1


def test_a_url_that_is_not_a_string_is_a_400_line_of_its_own():
    """A url the server does not have is its line's 400, whatever JSON it is: a list or an object (unhashable)
    failed the set lookup with a TypeError, which took the whole batch down before any line ran."""
    lines = [json.dumps({"custom_id": f"u{i}", "method": "POST", "url": url, "body": {"prompt": "x"}})
             for i, url in enumerate([[COMPLETIONS], {"path": COMPLETIONS}, 7])]
    entries = parse_lines([*lines, line("ok", COMPLETIONS, {"prompt": "x"})], {COMPLETIONS, CHAT})
    assert [(e.error.status, e.error.param, e.error.code) for e in entries[:3]] == [(400, "url", "unsupported_url")] * 3
    assert entries[3].error is None


async def test_an_output_that_fails_ends_the_run_there(open_app, monkeypatch):
    """``-o - | head -1``: the write that fails (the reader gone) ends the run. The BrokenPipeError stayed in its
    request's task until every line had been sent, so a file ran to its end for output nobody could read."""
    from retnet.serve import run_batch as module

    class ClosedAfterOneLine(io.StringIO):
        def write(self, text):
            if self.getvalue():
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

    posted, post = [], module.post

    async def counting(client, entry):
        posted.append(entry.custom_id)
        return await post(client, entry)

    monkeypatch.setattr(module, "post", counting)
    text = "\n".join(line(f"r{i}", COMPLETIONS, {"prompt": "x", "max_tokens": 2, **GREEDY}) for i in range(24))
    async with open_app() as client:
        entries = parse_lines(text.splitlines(), served_urls(client.app))
        out = ClosedAfterOneLine()
        with pytest.raises(OutputError) as failed:
            await run_batch(client.app, entries, out, max_concurrency=2, progress=False)
        assert isinstance(failed.value.error, BrokenPipeError)
        # the engine serves on: the requests the early end cancelled freed their places
        answer = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2})
    assert answer.status_code == 200
    assert [json.loads(text)["custom_id"] for text in out.getvalue().splitlines()] == ["r0"]
    assert len(posted) <= 4, posted  # the two in flight when the write failed, and at most the two after them


async def test_any_line_that_raises_ends_the_run_there_and_closes_the_bar(open_app, monkeypatch):
    """Not only a failed write: anything a line raises ends the run at once (it ran the whole file first, the later
    answers held in memory), and the progress bar is closed on the way out (the command's error line went on the
    bar's, which then drew itself again below it)."""
    from tqdm import tqdm

    from retnet.serve import run_batch as module

    posted, post, output_line = [], module.post, module.output_line

    async def counting(client, entry):
        posted.append(entry.custom_id)
        return await post(client, entry)

    def failing(entry, status, body):
        if entry.custom_id == "r1":
            raise RuntimeError("a line's own failure")
        return output_line(entry, status, body)

    monkeypatch.setattr(module, "post", counting)
    monkeypatch.setattr(module, "output_line", failing)
    text = "\n".join(line(f"r{i}", COMPLETIONS, {"prompt": "x", "max_tokens": 2, **GREEDY}) for i in range(24))
    async with open_app() as client:
        entries = parse_lines(text.splitlines(), served_urls(client.app))
        with pytest.raises(RuntimeError, match="a line's own failure"):
            await run_batch(client.app, entries, io.StringIO(), max_concurrency=2, progress=True)
    assert len(posted) <= 5, posted
    assert not [bar for bar in tqdm._instances if bar.desc == "run_batch"]


def test_stdin_and_stdout_are_utf_8_whatever_the_locale(monkeypatch):
    """``-i -`` and ``-o -`` under a Latin-1 locale: stdin's text decoded the UTF-8 file as Latin-1 (the requests ran on
    "cafÃ©"), and stdout wrote "é" as one Latin-1 byte on the lines whose text it could encode (the others escaped),
    a results file neither UTF-8 nor Latin-1. Now both are UTF-8, as ``-i FILE`` and ``-o FILE`` are."""
    from retnet.serve.run_batch import OrderedWriter, _read_input

    request = line("café-1", COMPLETIONS, {"prompt": "café"}).replace("\\u00e9", "é")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{request}\n".encode()), encoding="latin-1"))
    (text,) = _read_input("-")
    assert json.loads(text)["body"]["prompt"] == "café"

    stdout = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    writer = OrderedWriter(stdout)
    for index, body in enumerate([{"text": "café"}, {"text": "café ☕"}]):
        writer.put(index, {"id": f"batch_req_{index}", "custom_id": "é", "response": {"status_code": 200,
                                                                                   "request_id": "r", "body": body},
                           "error": None})
    lines = stdout.buffer.getvalue().decode("utf-8").splitlines()
    assert [json.loads(text)["response"]["body"]["text"] for text in lines] == ["café", "café ☕"]


def test_a_byte_that_is_not_utf_8_is_refused_naming_its_line(tmp_path, monkeypatch):
    """The input is refused before the model loads, as before, but naming the line: the codec's own error gave the
    byte's offset in the file, no help finding it in a file of a million lines. Stdin the same."""
    from retnet.serve.run_batch import _read_input

    good = line("a", COMPLETIONS, {"prompt": "café"}).encode()
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n" + good + b"\n" + good.replace(b"caf", b"caf\xe9") + b"\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(path.read_bytes()), encoding="utf-8"))
    for source in (str(path), "-"):
        with pytest.raises(ValueError, match=r"^line 3 is not UTF-8 \(byte 0xe9, invalid continuation byte\)$"):
            _read_input(source)


def test_a_text_stream_in_stdins_place_is_read_by_the_same_rules(monkeypatch):
    """A text stream set as sys.stdin (IDLE's shell, a caller of main() with an io.StringIO) has no bytes: a byte its
    reader could not decode (held as a lone surrogate) reached the requests, where stdin's bytes are refused naming
    the line. Now its text is encoded back and read by the bytes' rules, a byte-order mark and CRLF included."""
    from retnet.serve.run_batch import _read_input

    good = line("a", COMPLETIONS, {"prompt": "café"}).replace("\\u00e9", "é")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"\ufeff{good}\r\n{good}\n"))
    assert _read_input("-") == [good, good]
    undecoded = good.encode().replace(b"caf", b"caf\xe9").decode("utf-8", "surrogateescape")
    for bad, byte in ((undecoded, r"0xe9"), (good.replace("caf", "caf\ud800"), r"0xed")):
        monkeypatch.setattr(sys, "stdin", io.StringIO(f"{good}\n{bad}\n"))
        with pytest.raises(ValueError, match=rf"^line 2 is not UTF-8 \(byte {byte}, invalid continuation byte\)$"):
            _read_input("-")


def test_a_closed_stdin_or_stdout_is_refused(tmp_path, monkeypatch):
    """``-o - >&-`` (a job started with no stdout: Python's sys.stdout is None) wrote the results to a file named "-"
    in the working directory, exit status 0; ``-i - <&-`` was an AttributeError's traceback. Both are now refused
    before the model loads (exit status 2, ``cannot write the output file '-': ...``)."""
    from retnet.serve.run_batch import OutputFile, _read_input

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(OSError, match="standard output is closed"):
        OutputFile("-").open()
    monkeypatch.undo()
    assert not (tmp_path / "-").exists()
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(OSError, match="standard input is closed"):
        _read_input("-")


async def test_the_lines_of_a_session_run_in_order_one_at_a_time(open_app):
    """Lines continuing one session run one after another, in the file's order, the others beside them: run together,
    all but one turn of a session were 409 session_busy (a session serves one request at a time)."""
    turns = {"a": [" def", " add(a, b):", " return"], "b": [" class", " Stack:"]}
    order = [("a", 0), ("b", 0), ("a", 1), (None, 0), ("b", 1), ("a", 2)]
    lines = [line(f"{session}-{turn}", COMPLETIONS, {"prompt": turns[session][turn] if session else "for i in",
                                                     "max_tokens": 4, **GREEDY, **({"session_id": session} if session
                                                                                   else {})})
             for session, turn in order]
    async with open_app() as client:
        entries = parse_lines(lines, served_urls(client.app))
        out = io.StringIO()
        summary = await run_batch(client.app, entries, out, max_concurrency=4, progress=False)
        results = [json.loads(text) for text in out.getvalue().splitlines()]
        assert summary.failed == 0, [r["error"] for r in results]
        # The same turns sent one at a time, on sessions of other names: the same texts.
        for session, texts in turns.items():
            for turn, prompt in enumerate(texts):
                alone = await client.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 4, **GREEDY,
                                                             "session_id": f"{session}-alone"})
                got = results[order.index((session, turn))]["response"]["body"]
                assert got["choices"][0]["text"] == alone.json()["choices"][0]["text"], (session, turn)
                assert got["usage"]["prompt_tokens"] == alone.json()["usage"]["prompt_tokens"], (session, turn)
