"""Speculative decoding (``--speculative-config``): tokens/s with and without it, in one run.

Two in-process servers on the same random RetNet (``--hidden``, ``--layers``; a byte-level BPE trained on a
small corpus), one plain, one with ``{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
"prompt_lookup_min": 2}`` (``--method draft_model``: ``{"method": "draft_model", "model": the target itself,
"num_speculative_tokens": K}``, a draft whose greedy drafts are the target's own tokens: the ceiling of a draft
model's acceptance, at a draft's cost as large as the target's). Each round sends the same greedy requests to
one, then the other (the order alternating), ``--concurrency`` at once; the ratio is speculative / plain tokens/s
over the rounds' medians. Both give the same text (checked). Cases:

- ``repeats``: prompts that repeat a passage four times, followed by the model's own greedy continuation of
  them (``--lead`` tokens, asked of the plain server first). A random model does not copy the passage; its
  greedy output falls into loops instead, which the lead brings into the prompt: the drafts then hit as they
  would on a trained model continuing a repetitive text (a copying task), which a random model cannot show
  otherwise. The acceptance rate is reported;
- ``distinct``: short prompts that do not repeat, where drafts are rare: what speculation costs when it
  mostly finds nothing;
- ``forced``: the ``repeats`` prompts with a ``logit_bias`` of +100 on one token, which the model then repeats:
  every n-gram draft is accepted, the ceiling of what speculation can gain here (k + 1 tokens a forward). A
  draft model does not see the bias: its drafts are the unbiased model's.

    python benchmarks/speculative.py [--quick] [--method draft_model] [--out benchmarks/results/speculative-cpu.json]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder is sys.path[0], where benchmarks/kernels.py would shadow HuggingFace's `kernels`
# package (transformers probes for it): the repository root takes that place, before any import.
REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)

import httpx
import torch

import retnet  # noqa: F401
from benchmarks._results import BenchmarkParser
from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.serve.app import create_app
from retnet.serve.settings import ServeSettings

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "for i in range(10):\n    print(i * i)\n",
    "The retention mechanism replaces attention with a decaying recurrence.\n",
    "Hello world! How are you today? I am fine, thank you.\n",
    "A recurrent state of fixed size carries the whole context from one token to the next.\n",
] * 20
PASSAGES = [line.strip() + " " for line in CORPUS[:6]]
DISTINCT = ["Hello", "def add(", "class", "The state", "for i in", "A recurrent", "Unicode", "How are"]


def save_model(path: Path, hidden: int, layers: int, tokenizer=None, seed: int = 0) -> Path:
    from retnet.tokenization import train_byte_level_bpe

    tokenizer = tokenizer or train_byte_level_bpe(CORPUS, vocab_size=512, min_frequency=1)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=4, chunk_size=16, tie_word_embeddings=True,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          initializer_range=0.2)
    torch.manual_seed(seed)
    RetNetForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Server:
    """An app whose engine runs, and an httpx client on it."""

    def __init__(self, model_dir: Path, **settings):
        self.app = create_app(ServeSettings(model=str(model_dir), served_model_name="bench", **settings))
        self.lifespan = self.app.router.lifespan_context(self.app)

    async def __aenter__(self):
        await self.lifespan.__aenter__()
        assert await asyncio.to_thread(self.app.state.engine.wait_ready, 120)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://b", timeout=600)
        return self

    async def __aexit__(self, *exc):
        await self.client.aclose()
        await self.lifespan.__aexit__(*exc)

    async def run(self, prompts: list[str], max_tokens: int, **extra) -> tuple[float, list[str], int]:
        """Wall seconds, texts and completion tokens of ``prompts`` sent at once."""
        start = time.perf_counter()
        responses = await asyncio.gather(*(self.client.post("/v1/completions", json={
            "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}) for p in prompts))
        wall = time.perf_counter() - start
        bodies = [r.json() for r in responses]
        return wall, [b["choices"][0]["text"] for b in bodies], sum(b["usage"]["completion_tokens"] for b in bodies)

    async def counters(self) -> dict[str, float]:
        text = (await self.client.get("/metrics")).text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("retnet_spec_decode_") and "_total " in line}


async def measure(model_dir: Path, spec: dict, cases: dict[str, list[str]], concurrencies: list[int],
                  rounds: int, max_tokens: int, lead: int) -> list[dict]:
    rows = []
    async with Server(model_dir) as plain, Server(model_dir, speculative_config=json.dumps(spec)) as fast:
        for case, pool in cases.items():
            for concurrency in concurrencies:
                prompts = [pool[i % len(pool)] + ("" if i < len(pool) else str(i)) for i in range(concurrency)]
                if case == "repeats" and lead:
                    _, continuations, _ = await plain.run(prompts, lead)
                    prompts = [p + c for p, c in zip(prompts, continuations)]
                extra = {}
                if case == "forced":
                    token = (await plain.client.post("/tokenize", json={"prompt": "an", "add_special_tokens": False}))
                    extra = {"logit_bias": {str(token.json()["tokens"][0]): 100}}
                # Warm-up (and the prompts' states cached alike on both).
                await plain.run(prompts, 4, **extra)
                await fast.run(prompts, 4, **extra)
                before = await fast.counters()
                times: dict[str, list[float]] = {"plain": [], "spec": []}
                tokens = 0
                for r in range(rounds):
                    order = [("plain", plain), ("spec", fast)]
                    for name, server in order if r % 2 == 0 else order[::-1]:
                        wall, texts, tokens = await server.run(prompts, max_tokens, **extra)
                        times[name].append(wall)
                        if name == "plain":
                            expected = texts
                        else:
                            spec_texts = texts
                    if spec_texts != expected:
                        raise AssertionError(f"{case} x{concurrency}: speculation changed the greedy text")
                after = await fast.counters()
                drafted = after["retnet_spec_decode_num_draft_tokens_total"] - before[
                    "retnet_spec_decode_num_draft_tokens_total"]
                accepted = after["retnet_spec_decode_num_accepted_tokens_total"] - before[
                    "retnet_spec_decode_num_accepted_tokens_total"]
                steps = after["retnet_spec_decode_num_drafts_total"] - before["retnet_spec_decode_num_drafts_total"]
                plain_tps = tokens / statistics.median(times["plain"])
                spec_tps = tokens / statistics.median(times["spec"])
                row = {"case": case, "concurrency": concurrency, "tokens": tokens,
                       "plain_tokens_per_s": plain_tps, "spec_tokens_per_s": spec_tps,
                       "speedup": spec_tps / plain_tps,
                       "drafts_per_round": steps / rounds, "draft_tokens_per_round": drafted / rounds,
                       "acceptance_rate": accepted / drafted if drafted else None,
                       "accepted_tokens_per_round": accepted / rounds}
                rows.append(row)
                rate = "-" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}"
                print(f"{case:9s} x{concurrency:<3d} plain {plain_tps:8.1f} tok/s  spec {spec_tps:8.1f} tok/s  "
                      f"ratio {row['speedup']:.2f}  acceptance {rate}  "
                      f"accepted/round {row['accepted_tokens_per_round']:.0f} of {tokens}", flush=True)
    return rows


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__.splitlines()[0],
                             quick_help="two small cases (repeats, forced), 1 stream, 2 rounds, 32 tokens: a smoke run")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--method", choices=["ngram", "draft_model"], default="ngram",
                        help="draft_model: the target itself as the draft, unless --draft-hidden is given")
    parser.add_argument("--draft-hidden", type=int, default=None, help="draft_model: a random draft of this "
                        "hidden size (its drafts are another model's: the cost of a draft that is rarely right)")
    parser.add_argument("--draft-layers", type=int, default=1)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_sized("--max-tokens", type=int, full=128, quick=32)
    parser.add_argument("--lead", type=int, default=64, help="repeats: the model's own continuation put in the "
                        "prompt, in tokens (0: the passages alone)")
    parser.add_sized("--rounds", type=int, full=5, quick=2)
    parser.add_sized("--concurrency", type=int, nargs="+", full=[1, 8], quick=[1])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the figures: 1, as lora.py)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: nowhere)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = {"repeats": [p * 4 for p in PASSAGES], "distinct": DISTINCT, "forced": [p * 4 for p in PASSAGES]}
    concurrencies, rounds, max_tokens = args.concurrency, args.rounds, args.max_tokens
    if args.quick:
        # 32 tokens of the repeats case alone may find no n-gram to draft from, leaving the check that speculation
        # keeps the text with nothing to check: the forced case drafts every step (by lookup, all accepted; a
        # draft model, blind to the bias, has them refused).
        cases = {k: cases[k] for k in ("repeats", "forced")}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(Path(tmp) / "target", args.hidden, args.layers)
        if args.method == "draft_model":
            draft, described = model_dir, "the target"
            if args.draft_hidden is not None:
                from transformers import AutoTokenizer

                draft = save_model(Path(tmp) / "draft", args.draft_hidden, args.draft_layers,
                                   AutoTokenizer.from_pretrained(model_dir), seed=1)
                described = f"random, hidden {args.draft_hidden} x {args.draft_layers} layers"
            spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": args.k}
        else:
            spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4,
                    "prompt_lookup_min": 2}
        rows = asyncio.run(measure(model_dir, spec, cases, concurrencies, rounds, max_tokens, args.lead))
    if args.method == "draft_model":  # its path was a temporary directory
        spec = {**spec, "model": described}
    result = {"device": "cpu", "threads": args.threads, "model": {"hidden": args.hidden, "layers": args.layers},
              "speculative_config": spec, "max_tokens": max_tokens, "lead": args.lead, "rounds": rounds,
              "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
