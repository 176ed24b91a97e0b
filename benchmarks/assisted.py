"""transformers' assisted decoding with RetNet as the target: ``generate(prompt_lookup_num_tokens=K)`` and
``generate(assistant_model=draft)`` against plain greedy ``generate``, in one run, on one torch thread.

A random RetNet (``--hidden``, ``--layers``) and prompts of random token ids. Cases:

- ``repeats``: a passage repeated four times, then the model's own greedy continuation of it (``--lead``
  tokens): a random model does not copy the passage, but its greedy output falls into loops, which the lead
  brings into the prompt, so prompt lookup finds what a trained model continuing a repetitive text would give;
- ``distinct``: prompts that do not repeat, where lookup rarely finds a candidate: what it costs then;
- ``forced``: the ``repeats`` prompts with a ``sequence_bias`` of +100 on one token, which the model then
  repeats: every candidate is accepted, the ceiling of what lookup can gain here.

Each case runs plain, prompt lookup, and (unless ``--no-draft``) a copy of the target as its draft (every
candidate accepted but where the bias forces the target, at a draft's cost as large as the target's). Every variant must give plain decoding's tokens
(checked). Reported: tokens/s, the ratio to plain over the rounds' medians, and tokens per target forward.

    python benchmarks/assisted.py [--quick] [--out benchmarks/results/assisted-cpu.json]
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this folder is sys.path[0], where benchmarks/kernels.py would shadow HuggingFace's `kernels`
# package (transformers probes for it): the repository root takes that place, before any import.
REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)

import torch

import retnet  # noqa: F401
from benchmarks._results import BenchmarkParser
from retnet.model import RetNetConfig, RetNetForCausalLM


def _prompts(model, case: str, count: int, lead: int, vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(count):
        if case in ("repeats", "forced"):
            passage = torch.randint(3, vocab, (1, 16), generator=generator)
            prompt = passage.repeat(1, 4)
            prompt = model.generate(prompt, max_new_tokens=lead, do_sample=False, eos_token_id=None)
        else:
            prompt = torch.randint(3, vocab, (1, 24), generator=generator)
        prompts.append(prompt)
    return prompts


def _run(model, prompts, new_tokens: int, **settings) -> tuple[float, list[torch.Tensor], int]:
    forwards = []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        start = time.perf_counter()
        outputs = [model.generate(p, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, **settings)
                   for p in prompts]
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    return len(prompts) * new_tokens / seconds, outputs, len(forwards)


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0],
                             quick_help="small: 32 new tokens, a lead of 32, 2 prompts, 1 round")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lookup", type=int, default=4, help="prompt_lookup_num_tokens")
    parser.add_sized("--new-tokens", type=int, full=128, quick=32)
    parser.add_sized("--lead", type=int, full=64, quick=32)
    parser.add_sized("--prompts", type=int, full=4, quick=2)
    parser.add_sized("--rounds", type=int, full=3, quick=1)
    parser.add_argument("--no-draft", dest="draft", action="store_false", help="skip the self-draft variant")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default: nowhere)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=512, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_attention_heads=max(1, args.hidden // 64), initializer_range=0.5)
    model = RetNetForCausalLM(config).eval()
    variants = {"plain": {}, "prompt_lookup": {"prompt_lookup_num_tokens": args.lookup}}
    if args.draft:  # a copy: the target's forwards are counted alone
        variants["self_draft"] = {"assistant_model": copy.deepcopy(model)}
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "cases": {}}
    with torch.no_grad():
        for case in ("repeats", "distinct", "forced"):
            prompts = _prompts(model, case, args.prompts, args.lead, config.vocab_size)
            bias = {"sequence_bias": {(7,): 100.0}} if case == "forced" else {}
            speeds = {name: [] for name in variants}
            forwards, reference = {}, None
            for _ in range(args.rounds):
                for name, settings in variants.items():
                    speed, outputs, forwards[name] = _run(model, prompts, args.new_tokens, **settings, **bias)
                    speeds[name].append(speed)
                    if reference is None:
                        reference = outputs
                    elif not all(torch.equal(a, b) for a, b in zip(outputs, reference)):
                        raise SystemExit(f"{case}: {name} gave other tokens than plain greedy decoding")
            tokens = args.prompts * args.new_tokens
            plain = statistics.median(speeds["plain"])
            results["cases"][case] = {
                name: {"tokens_per_s": round(statistics.median(s), 1),
                       "ratio_to_plain": round(statistics.median(s) / plain, 2),
                       "tokens_per_target_forward": round(tokens / forwards[name], 2)}
                for name, s in speeds.items()
            }
            for name, row in results["cases"][case].items():
                print(f"{case:9s} {name:14s} {row['tokens_per_s']:8.1f} tok/s  {row['ratio_to_plain']:5.2f}x  "
                      f"{row['tokens_per_target_forward']:5.2f} tokens a target forward", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
