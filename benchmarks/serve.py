"""Serving throughput and latency: retnet-serve (continuous batching) vs a one-at-a-time HF server.

Everything runs on loopback in one invocation:

- ``retnet``: ``python -m retnet.serve`` on a RetNet (random weights, ~matched to the Llama below);
- ``baseline``: the usual small server: the same RetNet through HF ``generate`` + ``TextIteratorStreamer``,
  one request at a time (a FastAPI app in this file, started with ``--baseline-server``);
- ``llama``: the same baseline server on a matched-size HF Llama, at long contexts.

For 1, 8, 32 and 64 concurrent streaming clients it reports aggregate tokens/s, p50/p99 time to first
token and inter-token latency, and the server's peak RSS; then single-stream long-context runs. Ratios
are retnet / baseline for throughput, baseline / retnet for latency (> 1: retnet better).

    python benchmarks/serve.py [--quick] [--model DIR] [--out PATH]
    # writes benchmarks/results/serve-<device>.json (--quick writes only to an --out given)

``--engine-only`` leaves HTTP out: the engine is made in-process (as the tests make it) and its scheduler driven
on this thread, each decode step timed (``_decode_step``) with the model's forward inside it, so that the
per-token cost of the scheduler itself (sampling, stopping rules, detokenisation, delivery) shows apart from
the model's (``serve-engine-<device>.json``; ``--structured``: ``serve-structured-<device>.json``; under
``--quick`` either only to an ``--out`` given).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from fastapi import Request

# Run as a script, this folder is sys.path[0]: put the repository there instead, so `retnet` imports from
# the source tree (as on the GPU machine) and no script here can shadow a package transformers probes for.
REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "benchmarks":
    sys.path[0] = str(REPO)

from benchmarks._results import BenchmarkParser, output_help, results_path


# ----------------------------------------------------------------------------------------------------------
# The baseline server (runs in its own process)
# ----------------------------------------------------------------------------------------------------------
def baseline_server(model_dir: str, port: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    import retnet  # noqa: F401

    class TokenStreamer(TextIteratorStreamer):
        """TextIteratorStreamer flushes on word boundaries; random weights rarely write one, so flush every
        token (as a real server's client would see them)."""

        def put(self, value):
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            for token in value.reshape(-1).tolist():
                self.on_finalized_text(self.tokenizer.decode([token]) or "\ufffd")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    app = FastAPI()
    lock = asyncio.Lock()  # one generation at a time: how a plain HF server behaves

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body["prompt"]
        ids = torch.tensor([prompt if isinstance(prompt, list) else tokenizer.encode(prompt)])
        max_tokens = int(body.get("max_tokens", 16))

        async def stream():
            async with lock:
                streamer = TokenStreamer(tokenizer, skip_prompt=True)
                kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                              pad_token_id=tokenizer.pad_token_id)
                thread = threading.Thread(target=lambda: model.generate(**kwargs), daemon=True)
                thread.start()
                iterator = iter(streamer)
                while True:
                    text = await asyncio.to_thread(next, iterator, None)
                    if text is None:
                        break
                    if text:
                        yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text}]})}\n\n"
                await asyncio.to_thread(thread.join)
            usage = {"completion_tokens": max_tokens}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
def build_models(out: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, Path, dict]:
    """A RetNet and a matched Llama (random weights) with one BPE tokenizer, saved as the trainer exports."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import retnet  # noqa: F401
    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.tokenization import train_byte_level_bpe

    texts = [p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:60]]
    tokenizer = train_byte_level_bpe(texts, vocab_size=vocab)
    torch.manual_seed(0)
    retnet_model = RetNetForCausalLM(RetNetConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    # Matched per layer: RetNet's q,k (2d²) + v,g (4d²) + o (2d²) + FFN (4d²) = 12d² = Llama's 4d² + 3·d·I.
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=8, intermediate_size=hidden * 8 // 3, tie_word_embeddings=True,
        max_position_embeddings=65536, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    dirs = (out / "retnet", out / "llama")
    for model, path in zip((retnet_model, llama), dirs):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    params = {"retnet": sum(p.numel() for p in retnet_model.parameters()),
              "llama": sum(p.numel() for p in llama.parameters())}
    return dirs[0], dirs[1], params


# ----------------------------------------------------------------------------------------------------------
# Load generation
# ----------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], port: int):
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode(errors="replace"))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.peak = 0
        self._sampling = False

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def sample_rss(self):
        self.peak, self._sampling = self.rss(), True

        def loop():
            while self._sampling:
                self.peak = max(self.peak, self.rss())
                time.sleep(0.05)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def stop_sampling(self) -> int:
        self._sampling = False
        return self.peak

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_stream(client: httpx.AsyncClient, url: str, prompt, max_tokens: int, extra: dict | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    done = time.perf_counter()
    # Mean time per generated token after the first: robust to streamers that flush several tokens at once.
    per_token = (done - stamps[0]) / max(tokens - 1, 1)
    return {"ttft": stamps[0] - start, "itl": [b - a for a, b in itertools.pairwise(stamps)], "tokens": tokens,
            "chunks": len(stamps), "per_token": per_token}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def load(server: Server, concurrency: int, prompt, max_tokens: int, extra: dict | None = None) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        await one_stream(client, server.url, prompt, 2)  # warm-up
        sampler = server.sample_rss()
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, server.url, prompt, max_tokens, extra)
                                         for _ in range(concurrency)))
        wall = time.perf_counter() - start
        peak = server.stop_sampling()
        sampler.join()
    ttft = [r["ttft"] for r in results]
    # Tokens per chunk can exceed 1 for the baseline's streamer (it flushes on word boundaries): inter-token
    # latency is each gap divided by the tokens it carried, on average.
    itl = [gap * r["chunks"] / max(r["tokens"], 1) for r in results for gap in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1000 * pct(ttft, 0.5), "ttft_p99_ms": 1000 * pct(ttft, 0.99),
            "itl_p50_ms": 1000 * pct(itl, 0.5), "itl_p99_ms": 1000 * pct(itl, 0.99),
            "decode_ms_per_token": 1000 * pct([r["per_token"] for r in results], 0.5), "peak_rss_mb": peak / 2**20}


def serve_cmd(model_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "retnet.serve", "--model", str(model_dir), "--port", str(port),
            "--log-level", "warning", "--max-running", "64", "--max-queue", "256", "--prefix-cache-entries", "0",
            "--max-prompt-tokens", "65536", "--max-body-bytes", "8388608"]


def baseline_cmd(model_dir: Path, port: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--baseline-server", str(model_dir), "--port", str(port)]


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__.splitlines()[0],
                             quick_help="small model (hidden 256 x 4 layers, vocab 2048), 32 tokens a request, contexts "
                             "512 and 2048 (CPU, a few minutes); writes only to an --out given")
    parser.add_argument("--model", help="a saved RetNet to serve instead of a random one (no Llama run then)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-tokens", type=int, help="new tokens a request (default 128; --quick 32; --engine-only "
                        "64)")
    parser.add_sized("--contexts", type=int, nargs="+", full=[1024, 4096, 16384], quick=[512, 2048],
                     help="the single-stream runs' prompt lengths")
    parser.add_argument("--structured", action="store_true",
                        help="retnet-serve alone: streams held to a JSON schema against free ones, alternated")
    parser.add_argument("--engine-only", action="store_true",
                        help="no HTTP: time the engine's decode steps in-process (ms per step, and outside the forward)")
    parser.add_argument("--sampling", choices=["greedy", "mixed"], default="greedy",
                        help="--engine-only: every stream greedy, or a mix (seeded sampling, top-p/top-k, penalties, "
                             "logprobs, stop strings)")
    parser.add_argument("--out", "--output", type=Path, metavar="PATH", help=output_help(
        "serve-<device>.json, serve-engine-<device>.json with --engine-only, serve-structured-<device>.json with "
        "--structured"))
    parser.add_argument("--baseline-server", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.baseline_server:
        return baseline_server(args.baseline_server, args.port)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, layers, vocab = (256, 4, 2048) if args.quick else (512, 6, 8192)
    max_tokens = args.max_tokens or (32 if args.quick else 128)
    contexts = args.contexts
    tmp = Path(tempfile.mkdtemp(prefix="retnet-serve-bench-"))
    if args.model:
        retnet_dir, llama_dir, params = Path(args.model), None, {}
    else:
        retnet_dir, llama_dir, params = build_models(tmp, hidden, layers, vocab)
    prompt = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    report = {"device": device, "quick": args.quick, "max_tokens": max_tokens, "params": params,
              "model": {"hidden": hidden, "layers": layers, "vocab": vocab}, "load": {}, "long_context": {}}
    if args.structured:
        structured_load(report, retnet_dir, prompt, args.concurrency, max_tokens)
        write_report(report, args.out, args.quick, f"serve-structured-{device}.json")
        return
    if args.engine_only:
        engine_steps(report, retnet_dir, prompt, args.concurrency, args.max_tokens or 64, args.sampling)
        write_report(report, args.out, args.quick, f"serve-engine-{device}.json")
        return

    for name, cmd, model in (("retnet", serve_cmd, retnet_dir), ("baseline", baseline_cmd, retnet_dir)):
        port = free_port()
        server = Server(cmd(model, port), port)
        try:
            rows = []
            for c in args.concurrency:
                row = asyncio.run(load(server, c, prompt, max_tokens))
                rows.append(row)
                print(f"{name:9s} c={c:3d}  {row['tokens_per_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:8.1f} "
                      f"p99 {row['ttft_p99_ms']:8.1f} ms  ITL p50 {row['itl_p50_ms']:6.1f} p99 {row['itl_p99_ms']:7.1f}"
                      f" ms  RSS {row['peak_rss_mb']:6.0f} MB", flush=True)
            report["load"][name] = rows
        finally:
            server.stop()

    print("\nratios (retnet vs baseline; > 1: retnet better)")
    report["ratios"] = []
    for ours, base in zip(report["load"]["retnet"], report["load"]["baseline"]):
        ratio = {"concurrency": ours["concurrency"],
                 "throughput": ours["tokens_per_s"] / base["tokens_per_s"],
                 "ttft_p50": base["ttft_p50_ms"] / ours["ttft_p50_ms"],
                 "ttft_p99": base["ttft_p99_ms"] / ours["ttft_p99_ms"]}
        report["ratios"].append(ratio)
        print(f"  c={ratio['concurrency']:3d}  throughput x{ratio['throughput']:.2f}  TTFT p50 x{ratio['ttft_p50']:.2f}"
              f"  p99 x{ratio['ttft_p99']:.2f}")

    if llama_dir is not None:
        print(f"\nlong contexts, one stream, {max_tokens} new tokens")
        long_tokens = max_tokens
        for name, cmd, model in (("retnet", serve_cmd, retnet_dir), ("baseline", baseline_cmd, retnet_dir),
                                 ("llama", baseline_cmd, llama_dir)):
            port = free_port()
            server = Server(cmd(model, port), port)
            try:
                rows = []
                for ctx in contexts:
                    ids = [(i * 7919) % (vocab - 2) + 2 for i in range(ctx)]
                    row = asyncio.run(load(server, 1, ids, long_tokens))
                    row["context"] = ctx
                    rows.append(row)
                    print(f"  {name:9s} ctx={ctx:6d}  TTFT {row['ttft_p50_ms']:9.1f} ms  decode "
                          f"{row['decode_ms_per_token']:6.1f} ms/token  RSS {row['peak_rss_mb']:6.0f} MB",
                          flush=True)
                report["long_context"][name] = rows
            finally:
                server.stop()
        print("  ratios llama / retnet-serve (> 1: retnet better)")
        for ours, llama in zip(report["long_context"]["retnet"], report["long_context"]["llama"]):
            print(f"    ctx={ours['context']:6d}  decode x{llama['decode_ms_per_token'] / ours['decode_ms_per_token']:.2f}  "
                  f"TTFT x{llama['ttft_p50_ms'] / ours['ttft_p50_ms']:.2f}  "
                  f"RSS x{llama['peak_rss_mb'] / ours['peak_rss_mb']:.2f}")

    write_report(report, args.out, args.quick, f"serve-{device}.json")


def write_report(report: dict, given: Path | None, quick: bool, recorded: str) -> None:
    """``report`` to the path given, else (not under --quick) to ``benchmarks/results/<recorded>``."""
    out = results_path(given, quick, REPO / "benchmarks" / "results" / recorded, flag="--out")
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


# --engine-only --sampling mixed: the streams take these in turn (seeded, so that two runs sample alike). The stop
# string is searched for at every token but never met: every stream runs its max_tokens.
MIXED_SAMPLING = [{"temperature": 0.0}, {"temperature": 0.8}, {"temperature": 0.7, "top_p": 0.9},
                  {"temperature": 1.0, "top_k": 20, "logprobs": 3},
                  {"temperature": 0.0, "logprobs": 0, "stop": ["<|not in any text|>"]},
                  {"temperature": 0.9, "repetition_penalty": 1.2, "presence_penalty": 0.3}]


def engine_steps(report: dict, model_dir: Path, prompt: str, concurrency: list[int], max_tokens: int,
                 sampling: str) -> None:
    """For each concurrency, that many streams of ``max_tokens`` tokens (EOS ignored) decoded together by an
    in-process engine: the median time of a decode step (after the first few, while every stream runs), and of
    what the step spends outside the model's forward."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import retnet  # noqa: F401
    from retnet.serve.engine import Engine
    from retnet.serve.metrics import ServeMetrics
    from retnet.serve.sampling import SamplingParams
    from retnet.serve.settings import ServeSettings

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer.encode(prompt)

    def params(i: int) -> SamplingParams:
        kind = {"temperature": 0.0} if sampling == "greedy" else MIXED_SAMPLING[i % len(MIXED_SAMPLING)]
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=i, **kind)

    async def run(streams: int) -> dict:
        settings = ServeSettings(model=str(model_dir), served_model_name="bench", max_running=max(streams, 1),
                                 max_queue=streams, prefix_cache_entries=0)
        engine = Engine(settings, tokenizer, ServeMetrics(), model=model)
        engine._load()
        engine.ready = True
        handles = [engine.submit([ids], params(i)) for i in range(streams)]
        steps = []  # (streams in the batch, the step's time, its forward's)
        forward = [0.0]
        decode_step = engine._decode_step

        def timed_step():
            forward[0] = 0.0
            start = time.perf_counter()
            decode_step()
            steps.append((len(engine.running), time.perf_counter() - start, forward[0]))

        def before(module, args, kwargs):
            forward[0] -= time.perf_counter()

        def after(module, args, kwargs, output):
            forward[0] += time.perf_counter()

        engine._decode_step = timed_step
        hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
                 model.register_forward_hook(after, with_kwargs=True)]
        try:
            with torch.inference_mode():
                while engine.waiting or engine.prefilling or engine.joining or engine.running:
                    engine._iteration()
                    await asyncio.sleep(0)  # the outputs are delivered on this loop: read them as a client would
                    for handle in handles:
                        while not handle.queue.empty():
                            handle.queue.get_nowait()
        finally:
            for hook in hooks:
                hook.remove()
        # The steps with every stream in the batch, less the first few (caches warming).
        full = [(t, t - f) for n, t, f in steps if n == streams][3:]
        step = statistics.median(t for t, _ in full)
        outside = statistics.median(o for _, o in full)
        return {"concurrency": streams, "steps": len(full), "ms_per_step": 1000 * step,
                "ms_outside_forward": 1000 * outside, "tokens_per_s": streams / step}

    report["engine"] = {"sampling": sampling, "max_tokens": max_tokens, "rows": []}
    for c in concurrency:
        row = asyncio.run(run(c))
        report["engine"]["rows"].append(row)
        print(f"c={c:3d}  {row['ms_per_step']:7.2f} ms/step  {row['tokens_per_s']:8.1f} tok/s  outside the forward "
              f"{row['ms_outside_forward']:6.2f} ms/step ({100 * row['ms_outside_forward'] / row['ms_per_step']:.0f}%)",
              flush=True)


# A JSON string the grammar cannot close before max_tokens: every step of every stream is masked, to the
# characters a JSON string may hold.
STRUCTURED = {"guided_json": {"type": "object", "properties": {"text": {"type": "string", "minLength": 100000}},
                              "required": ["text"]}}


def structured_load(report: dict, model_dir: Path, prompt: str, concurrency: list[int], max_tokens: int) -> None:
    """Throughput and latency of streams held to a JSON schema against free ones on one server, alternated
    (free, held, free, held) so the shared machine's drift falls on both; the better of each pair is kept."""
    port = free_port()
    server = Server(serve_cmd(model_dir, port), port)
    report["structured"] = []
    try:
        for c in concurrency:
            runs = {"free": [], "json": []}
            for _ in range(2):
                for kind, extra in (("free", None), ("json", STRUCTURED)):
                    runs[kind].append(asyncio.run(load(server, c, prompt, max_tokens, extra)))
            best = {kind: max(rows, key=lambda row: row["tokens_per_s"]) for kind, rows in runs.items()}
            row = {"concurrency": c, "free": best["free"], "json": best["json"],
                   "throughput_ratio": best["json"]["tokens_per_s"] / best["free"]["tokens_per_s"]}
            report["structured"].append(row)
            print(f"c={c:3d}  free {best['free']['tokens_per_s']:7.1f} tok/s (ITL p50 {best['free']['itl_p50_ms']:5.1f} ms)"
                  f"  JSON schema {best['json']['tokens_per_s']:7.1f} tok/s (ITL p50 {best['json']['itl_p50_ms']:5.1f} ms)"
                  f"  x{row['throughput_ratio']:.2f}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
