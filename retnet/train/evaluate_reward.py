"""``retnet-eval`` of a reward model: accuracy and margins on preference pairs.

    retnet-eval --model runs/rm/export --dataset pairs.jsonl --batch-size 16 --json

What :mod:`retnet.train.evaluate` runs when ``--model`` is a one-label ``*ForSequenceClassification`` (what
``retnet-train --reward.enabled=true`` exports). ``--dataset`` holds TRL's ``prompt``/``chosen``/``rejected`` rows
(or ``chosen``/``rejected`` alone, the prompt implicit; a ``margin`` column too), read and tokenized as training
reads them (:func:`~retnet.train.preference.load_pairs`,
:class:`~retnet.train.preference.PairEncoder`: the same chat template, the completions closed by EOS), every row
scored (no validation split is held out; ``--max-documents`` keeps the first N pairs). A sequence's reward is the
model's score at its last token, as in training (:func:`~retnet.train.reward.sequence_rewards`).

No cut by default: the model is recurrent and has no context window, so each sequence is scored whole (memory grows
with the longest pair). ``--seq-len N`` cuts as ``data.seq_len`` does in training (the prompt, then each
completion's first tokens, as many as the prompt leaves of N: a cut completion loses its EOS and is scored at its
last kept token), and ``--max-prompt-length`` keeps a prompt's last tokens as ``data.max_prompt_length``: give a
run's own values to score pairs as its validation scored them.

Reported, with the names the reward trainer logs (:data:`~retnet.train.reward.METRICS`): ``accuracy`` (the share of
pairs with r_chosen > r_rejected), ``margin`` (the mean of r_chosen - r_rejected), ``rewards/chosen`` and
``rewards/rejected`` (the means), and ``loss``, the mean -logsigmoid(r_chosen - r_rejected - margin) (``margin``: the
dataset's ``margin`` column, 0 without one; the trainer's ``val_loss`` without
``reward.center_rewards_coefficient``'s term). ``--batch-size`` pairs run in one forward,
their 2B sequences packed into one row with ``cu_seqlens`` (chosen then rejected, as training packs them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retnet.train.evaluate import DTYPES, EXIT_OK, EvalError, _as_options, _finite_or_null, _refuse_options
from retnet.train.preference import Pairs
from retnet.train.reward import METRICS, cut_pairs, scores_within_frames

NO_CUT = 2**62  # the seq_len that cuts no pair: PairEncoder's room for the completions after the prompt


@dataclass
class RewardEvalResult:
    pairs: int
    metrics: dict[str, float]  # METRICS' means (the trainer's names), then "loss"
    cut: int  # pairs with a completion cut before its EOS by --seq-len
    seconds: float
    pairs_per_second: float


def read_pairs(dataset: str, tokenizer, *, name: str | None = None, split: str = "train", max_pairs: int = 0,
               seq_len: int | None = None, max_prompt_length: int = 0, cache_dir: str | Path | None = None) -> Pairs:
    """Every row of ``dataset`` (the first ``max_pairs`` when > 0) as training tokenizes preference pairs, cut to
    ``seq_len`` tokens a sequence (None: no cut) with prompts kept to their last ``max_prompt_length`` (0: whole).
    EvalError, naming the option, for what training would refuse."""
    from retnet.train.config import ConfigError, DataConfig
    from retnet.train.data import _kind, data_cache_dir, default_cache_dir, local_files, saved_dataset_dir
    from retnet.train.preference import FIELDS, PairEncoder, load_pairs

    try:
        cfg = DataConfig(dataset=dataset, name=name, split=split, format="preference", max_documents=max_pairs,
                         seq_len=NO_CUT if seq_len is None else seq_len, max_prompt_length=max_prompt_length,
                         cache_dir=str(cache_dir or ""))
        files = local_files(dataset)
        if files is not None and not saved_dataset_dir(files[0]) and _kind(files[0]) in ("text", "csv"):
            # as build_preference_data refuses them
            raise ConfigError(f"data.dataset {dataset!r} is {_kind(files[0])} files; a reward model is scored on "
                              f"the {list(FIELDS)} columns of JSON/JSONL/Parquet rows, a save_to_disk directory or "
                              f"a hub dataset")
        # checked before datasets reads: a --cache-dir that is a file failed inside it, blamed on --dataset's
        # columns. A save_to_disk directory is read in place: no cache to make (a read-only home)
        saved = files is not None and saved_dataset_dir(files[0])
        rows = load_pairs(cfg, files, default_cache_dir() if saved else data_cache_dir(cfg))
        pairs = PairEncoder(tokenizer, cfg).encode(rows)
    except (ConfigError, FileNotFoundError) as error:
        message = _as_options(str(error))
        for said, meant in (("with data.format 'preference'", "for a reward model"),
                            ("data.format 'preference' reads", "a reward model is scored on"),
                            ("data.format 'preference'", "preference pairs")):
            message = message.replace(said, meant)
        raise EvalError(message) from None
    if not len(pairs):
        raise EvalError(f"--dataset {dataset!r} holds no preference pairs")
    return pairs


@torch.no_grad()
def score_pairs(model, pairs: Pairs, *, batch_size: int = 1, progress=None) -> torch.Tensor:
    """``[N, 2]`` fp32 on the model's device: each pair's (chosen, rejected) rewards, ``batch_size`` pairs a
    forward packed as training packs them (:meth:`Pairs.batch`: one row of 2B ``cu_seqlens`` sequences). With xPos
    a sequence longer than one packed frame runs alone, unpacked (:func:`~retnet.train.reward.scores_within_frames`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = next(model.parameters()).device
    out = torch.empty(len(pairs), 2, dtype=torch.float32, device=device)
    for lo in range(0, len(pairs), batch_size):
        ids = np.arange(lo, min(lo + batch_size, len(pairs)))
        batch = pairs.batch(ids).to(device)
        chosen, rejected = scores_within_frames(model, batch.input_ids, batch.cu_seqlens).chunk(2)
        out[lo:lo + len(ids)] = torch.stack([chosen, rejected], dim=1)
        if progress is not None:
            progress.update(len(ids))
    return out


def reward_metrics(rewards: torch.Tensor, margins: torch.Tensor | None = None) -> dict[str, float]:
    """:data:`~retnet.train.reward.METRICS` and ``loss`` of ``[N, 2]`` (chosen, rejected) rewards: means over the
    pairs (in float64), as the reward trainer's ``_pair_loss`` sums and its evaluation divides them. ``margins``
    ``[N]``: the pairs' ``margin`` column, which the loss subtracts (the metrics are of the rewards alone, TRL's)."""
    chosen, rejected = rewards.double().unbind(1)
    difference = chosen - rejected
    if margins is not None:
        difference = difference - torch.as_tensor(margins, device=difference.device).double()
    values = [(chosen > rejected).double().mean(), (chosen - rejected).mean(), chosen.mean(), rejected.mean(),
              -F.logsigmoid(difference).mean()]
    return dict(zip((*METRICS, "loss"), torch.stack(values).tolist(), strict=True))


def evaluate_pairs(model, pairs: Pairs, *, batch_size: int = 1, progress=None,
                   eos_token_id: int | None = None) -> RewardEvalResult:
    """``pairs`` scored; ``cut`` counts those with a completion that does not end with ``eos_token_id``, the EOS the
    tokenizer closed them with (default: the model config's, which may be unset or a list of others)."""
    device_sync = next(model.parameters()).device.type == "cuda"  # the clock starts and stops with it idle
    if device_sync:
        torch.cuda.synchronize()
    began = time.perf_counter()
    rewards = score_pairs(model, pairs, batch_size=batch_size, progress=progress)
    margins = None if pairs.margins is None else torch.from_numpy(np.asarray(pairs.margins))
    metrics = reward_metrics(rewards, margins) if len(pairs) else dict.fromkeys((*METRICS, "loss"), math.nan)
    seconds = time.perf_counter() - began
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    return RewardEvalResult(pairs=len(pairs), metrics=metrics, cut=cut_pairs(pairs, eos) if eos is not None else 0,
                            seconds=seconds, pairs_per_second=len(pairs) / seconds if seconds > 0 else math.inf)


# ----------------------------------------------------------------------------------------------------------
# Command line (retnet.train.evaluate's main dispatches here)
# ----------------------------------------------------------------------------------------------------------
def read_args_pairs(args: argparse.Namespace, tokenizer) -> Pairs:
    """The pairs ``args`` select; EvalError for the causal LM's options, which mean nothing here."""
    _refuse_options(args, ("position_edges", "segment_tokens", "text_field"),
                    "a reward model (scored on preference pairs, each sequence in one forward)")
    return read_pairs(args.dataset, tokenizer, name=args.name, split=args.split, max_pairs=args.max_documents,
                      seq_len=args.seq_len, max_prompt_length=args.max_prompt_length or 0, cache_dir=args.cache_dir)


def report(args: argparse.Namespace, model, pairs: Pairs, eos_token_id: int | None = None) -> int:
    """Score ``pairs`` and print the line (or ``--json`` record) of the result; ``eos_token_id``: the tokenizer's,
    which closed the completions (:func:`evaluate_pairs`)."""
    from tqdm.auto import tqdm

    with tqdm(total=len(pairs), desc="eval", unit="pair", disable=args.no_progress, file=sys.stderr) as bar:
        result = evaluate_pairs(model, pairs, batch_size=args.batch_size, progress=bar, eos_token_id=eos_token_id)
    if result.cut:
        print(f"retnet-eval: {result.cut} of {result.pairs} pairs were cut to --seq-len {args.seq_len} before "
              f"their EOS; their rewards are read at the last kept token", file=sys.stderr)
    metrics = result.metrics
    if args.json:
        record = {"model": args.model, "dataset": args.dataset, "name": args.name, "split": args.split,
                  "max_documents": args.max_documents, "pairs": result.pairs, **metrics, "cut": result.cut,
                  # as given, null when not (the whole prompt): --max-prompt-length refuses 0
                  "seq_len": args.seq_len, "max_prompt_length": args.max_prompt_length,
                  "pairs_per_second": result.pairs_per_second, "seconds": result.seconds,
                  "batch_size": args.batch_size, "device": str(next(model.parameters()).device),
                  "dtype": str(DTYPES[args.dtype]).split(".")[-1], "quantization": args.quantization}
        print(json.dumps(_finite_or_null(record), allow_nan=False))
    else:
        print(f"{result.pairs} pairs: accuracy {metrics['accuracy']:.4f}, margin {metrics['margin']:.4f}, "
              f"rewards/chosen {metrics['rewards/chosen']:.4f}, rewards/rejected {metrics['rewards/rejected']:.4f}, "
              f"loss {metrics['loss']:.4f} ({result.pairs_per_second:,.1f} pairs/s"
              f"{'' if args.quantization == 'none' else ', --quantization ' + args.quantization})")
    return EXIT_OK


__all__ = ["NO_CUT", "RewardEvalResult", "evaluate_pairs", "read_pairs", "report", "reward_metrics", "score_pairs"]
