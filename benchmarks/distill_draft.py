"""Draft models for speculative decoding, distilled (``[distill]``) or not: how many of their drafts the target takes.

A target is trained (``retnet-train --config tiny``: hidden 128 × 2 layers, vocab 4096, on the standard library's
sources; or ``--target DIR``, an export), then two drafts of one size (``--draft-hidden`` × ``--draft-layers``) on
the same data, steps, seed and learning rate: one on the plain next-token loss, one distilled from the target
(``--distill.teacher``, alpha 1). Each is then served as the target's draft (``--speculative-config '{"model":
DRAFT, "num_speculative_tokens": K}'``, greedy) on prompts the runs did not train on (the openings of this
repository's ``retnet/**/*.py`` sources), and the server's counters give the acceptance rate (accepted / draft
tokens). Also reported: the drafts' top-1 agreement with the target and KL(target ‖ draft), teacher-forced on the
same sources, and the drafts' validation loss.

    python benchmarks/distill_draft.py [--quick] [--out benchmarks/results/distill-draft-cpu.json]
"""

from __future__ import annotations

import asyncio
import json
import subprocess
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
import torch.nn.functional as F

import retnet  # noqa: F401
from benchmarks._results import BenchmarkParser
from retnet.serve.app import create_app
from retnet.serve.settings import ServeSettings


def train(work: Path, name: str, args: list[str]) -> Path:
    """``retnet-train ARGS`` into ``work/name`` (its log beside it); returns the run's directory."""
    out = work / name
    started = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "retnet.train", *args, f"--train.output_dir={out}",
                        f"--data.cache_dir={work / 'cache'}", "--logging.progress=false",
                        "--logging.tensorboard=false"], cwd=REPO, stdout=log, stderr=log, check=True)
    print(f"trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def last_val_loss(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "val"][-1]["val_loss"]


def sources(count: int, chars: int) -> list[str]:
    """The openings of this repository's own sources: Python the standard library does not hold."""
    files = sorted(p for p in (REPO / "retnet").rglob("*.py") if p.stat().st_size > 2 * chars)
    return [p.read_text()[:chars] for p in files[:count]]


@torch.no_grad()
def agreement(target_dir: Path, draft_dir: Path, texts: list[str]) -> dict[str, float]:
    """Teacher-forced on ``texts``: the share of positions where the draft's greedy token is the target's, and the
    mean KL(target ‖ draft)."""
    from transformers import AutoTokenizer

    from retnet.model import RetNetForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target, draft = (RetNetForCausalLM.from_pretrained(d).eval() for d in (target_dir, draft_dir))
    same = total = 0
    divergence = 0.0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        log_p = F.log_softmax(target(input_ids=ids).logits.float(), -1)
        log_q = F.log_softmax(draft(input_ids=ids).logits.float(), -1)
        same += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        divergence += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        total += ids.shape[1]
    return {"top1_agreement": same / total, "kl_target_draft": divergence / total}


async def acceptance(target_dir: Path, draft_dir: Path, prompts: list[str], k: int, max_tokens: int) -> dict:
    """The server's speculative counters over greedy completions of ``prompts`` (four at a time)."""
    spec = json.dumps({"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": k})
    app = create_app(ServeSettings(model=str(target_dir), served_model_name="bench", speculative_config=spec))
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        assert await asyncio.to_thread(app.state.engine.wait_ready, 120)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b",
                                     timeout=600) as client:
            for start in range(0, len(prompts), 4):
                responses = await asyncio.gather(*(client.post("/v1/completions", json={
                    "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
                    for p in prompts[start:start + 4]))
                assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            text = (await client.get("/metrics")).text
    finally:
        await lifespan.__aexit__(None, None, None)
    counters = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("retnet_spec_decode_") and "_total " in line}
    drafted = counters["retnet_spec_decode_num_draft_tokens_total"]
    accepted = counters["retnet_spec_decode_num_accepted_tokens_total"]
    steps = counters["retnet_spec_decode_num_drafts_total"]
    return {"acceptance_rate": accepted / drafted, "accepted_per_step": accepted / steps,
            "draft_tokens": int(drafted)}


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__.splitlines()[0],
                             quick_help="short runs (target 60 steps, drafts 30), 4 prompts of 16 tokens (a smoke run)")
    parser.add_argument("--target", type=Path, default=None, help="a trained export to draft for (default: train "
                        "--config tiny for --target-steps)")
    parser.add_sized("--target-steps", type=int, full=600, quick=60)
    parser.add_argument("--draft-hidden", type=int, default=64)
    parser.add_argument("--draft-layers", type=int, default=1)
    parser.add_sized("--draft-steps", type=int, full=300, quick=30)
    parser.add_argument("--temperature", type=float, default=1.0, help="distill.temperature")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_sized("--prompts", type=int, full=24, quick=4)
    parser.add_sized("--max-tokens", type=int, full=64, quick=16)
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: nowhere)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        common = ["--config", "tiny", "--checkpoint.interval=0", "--train.eval_interval=0"]
        target = args.target
        if target is None:
            target = train(work, "target", [*common, f"--train.steps={args.target_steps}",
                                            f"--optim.warmup_steps={min(30, args.target_steps)}"]) / "export"
        draft = [*common, f"--model.hidden_size={args.draft_hidden}", f"--model.num_hidden_layers={args.draft_layers}",
                 f"--train.steps={args.draft_steps}", f"--optim.warmup_steps={min(30, args.draft_steps)}"]
        drafts = {
            "plain": train(work, "draft-plain", [*draft, f"--data.tokenizer={target}"]),
            "distilled": train(work, "draft-distilled", [*draft, f"--distill.teacher={target}",
                                                         f"--distill.temperature={args.temperature}"]),
        }
        texts = sources(args.prompts, 400)
        rows = {}
        for name, run in drafts.items():
            row = {"val_loss": last_val_loss(run), **agreement(target, run / "export", texts),
                   **asyncio.run(acceptance(target, run / "export", texts, args.k, args.max_tokens))}
            rows[name] = row
            print(f"{name:9s} val loss {row['val_loss']:.3f}  top-1 agreement {row['top1_agreement']:.3f}  "
                  f"KL {row['kl_target_draft']:.3f}  acceptance {row['acceptance_rate']:.3f}  "
                  f"accepted/step {row['accepted_per_step']:.2f}", flush=True)
    result = {"device": "cpu", "target": str(args.target or f"tiny, {args.target_steps} steps"),
              "draft": {"hidden": args.draft_hidden, "layers": args.draft_layers, "steps": args.draft_steps,
                        "distill.temperature": args.temperature},
              "k": args.k, "prompts": args.prompts, "max_tokens": args.max_tokens, "drafts": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
