"""Score an exported RetNet on whole documents: ``retnet-eval`` / ``python -m retnet.train.evaluate``.

    retnet-eval --model runs/demo/export                                   # the stdlib sources
    python -m retnet.train.evaluate --model runs/demo/export --dataset 'held_out/*.jsonl' --json
    retnet-eval --model runs/demo/export --quantization int8             # the loss retnet-serve's int8 costs
    retnet-eval --model out/export --dataset wikitext --name wikitext-103-raw-v1 --split test \\
        --segment-tokens 4096 --batch-size 8 --device cuda --dtype bfloat16

``--model`` is a ``save_pretrained`` directory with its tokenizer (what training writes to
``train.output_dir/export``). The data is read as training reads it (``--dataset``, ``--name``, ``--split``,
``--text-field``, ``--max-documents`` are ``data.dataset`` ... of the training config): ``stdlib``, a local
file, directory or glob, a ``save_to_disk`` directory or a hub dataset.

Each document is scored as training presents it: the tokenizer's EOS opens it (every packed training
segment starts at an EOS, so that is the state a document starts from), or the BOS of a tokenizer that puts
one before every text (Llama's, Mistral's: training's documents start with it, as a server's prompts do), and
the model predicts its tokens and the EOS that closes it, so a document of n tokens counts n + 1 targets. The
loss is the mean next-token cross-entropy over every target of every document (nats), the perplexity its exponential.

No context window: a document is run in pieces of ``--segment-tokens`` tokens, each continuing the recurrent
state the previous piece left, so every token is conditioned on the whole document before it, at memory
that grows with the segment, not the document. ``--batch-size`` documents run together, packed into one row;
when one ends, the next document takes its place from a fresh state, so the row stays full (the loss is the
same as one document at a time).

``--position-edges 128,512,2048`` also reports the loss by position in the document (the targets' index,
0 = its first token): here [0, 128), [128, 512), [512, 2048) and [2048, ∞). A RetNet trained on 128-token
blocks scored past them shows how it extrapolates in length.

A reward model (``--model`` a ``*ForSequenceClassification`` with one label: what ``reward.enabled`` exports) is
scored on preference pairs instead, by :mod:`retnet.train.evaluate_reward`: its accuracy and margins, with the names
the reward trainer logs. ``--seq-len``/``--max-prompt-length`` are its options, ``--segment-tokens``,
``--position-edges`` and ``--text-field`` the causal LM's; either given to the other model is refused.

Exit status: 0 on success, 2 for bad options or input (a missing model directory, a dataset without
documents, a non-positive size ...), with a message naming the option; 1 when the output's reader went away
(``| head -1``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import pickle
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__":
    # `python -m retnet.train.evaluate` is retnet-eval's script, before this file's imports of torch (seconds): a
    # Ctrl-C in them is its one line and status 130, not a traceback. The script imports this module again as
    # retnet.train.evaluate, whose EvalError is the one evaluate_reward's imports raise (run as `__main__`, this
    # file's own was another class, which escaped main's `except` as a traceback).
    from retnet.extras import retnet_eval

    sys.exit(retnet_eval())

import numpy as np
import torch
import torch.nn.functional as F

from retnet.model.quantization import QUANTIZATION_METHODS, check_quantization, quantize_model

EXIT_OK, EXIT_BROKEN_PIPE, EXIT_USAGE = 0, 1, 2
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class EvalError(ValueError):
    """Input this command cannot evaluate; the message names the option."""


@dataclass
class EvalResult:
    documents: int
    tokens: int  # targets scored: each document's tokens and its closing EOS
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    tokens_per_second: float
    seconds: float
    # With position edges: one {"start", "end" (None: no end), "tokens", "loss", "perplexity"} per bucket.
    by_position: list[dict] | None = None


def _perplexity(loss: float) -> float:
    return math.exp(loss) if not loss >= 700 else math.inf  # NaN stays NaN


class PositionBuckets:
    """Loss sums and target counts by position in the document, in buckets cut at ``edges`` (increasing
    positive token positions): [0, e1), [e1, e2), ..., [e_last, ∞). Summed on the device, in float64."""

    def __init__(self, edges: Sequence[int], device: torch.device | str = "cpu"):
        edges = list(edges)
        if not edges or any(not isinstance(e, int) or e <= 0 for e in edges) or edges != sorted(set(edges)):
            raise ValueError(f"position edges must be increasing positive integers; got {edges}")
        self.edges = edges
        self._edges = torch.tensor(edges, device=device)
        self.sums = torch.zeros(len(edges) + 1, dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(edges) + 1, dtype=torch.long, device=device)

    def add(self, positions: torch.Tensor, losses: torch.Tensor) -> None:
        """``positions`` ``[N]`` (each target's index in its document) and their ``losses`` ``[N]``."""
        bucket = torch.bucketize(positions.to(self._edges.device), self._edges, right=True)
        self.sums.index_add_(0, bucket, losses.to(self.sums.device, torch.float64))
        self.counts += torch.bincount(bucket, minlength=len(self.counts))

    def rows(self) -> list[dict]:
        sums, counts = self.sums.tolist(), self.counts.tolist()
        starts, ends = [0, *self.edges], [*self.edges, None]
        rows = []
        for start, end, total, count in zip(starts, ends, sums, counts):
            loss = total / count if count else math.nan
            rows.append({"start": start, "end": end, "tokens": count, "loss": loss, "perplexity": _perplexity(loss)})
        return rows


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------
def encode(tokenizer, texts: list[str], batch: int = 512) -> list[np.ndarray]:
    """Each document encoded as training encodes it (whole, special tokens' text as text): the sequence whose every
    token after the first is a target. A tokenizer whose post-processor puts a BOS before a text (Llama's, Mistral's:
    :func:`~retnet.train.data.document_prefix`) gives ``[BOS, *ids, EOS]``, the BOS the first token, context only,
    as a server's prompt starts (a prefix of several tokens: those after its first are targets too); others
    ``[EOS, *ids, EOS]``, the EOS that opens a document in training. int32 arrays: 4 bytes a token where a list of
    Python ints takes about 36, the difference between fitting an evaluation set in memory or not."""
    from retnet.train.data import document_encoder, document_prefix

    eos = tokenizer.eos_token_id
    encoder = document_encoder(tokenizer)
    prefix = document_prefix(tokenizer) or [eos]
    out = []
    for start in range(0, len(texts), batch):
        for encoding in encoder.encode_batch(texts[start:start + batch], add_special_tokens=False):
            ids = np.empty(len(prefix) + len(encoding.ids) + 1, dtype=np.int32)
            ids[:len(prefix)] = prefix
            ids[len(prefix):-1] = encoding.ids
            ids[-1] = eos
            out.append(ids)
    return out


@torch.no_grad()
def score_documents(model, documents: Sequence[Sequence[int]], *, segment_tokens: int = 2048, batch_size: int = 1,
                    progress=None, buckets: PositionBuckets | None = None) -> tuple[float, int]:
    """(summed cross-entropy, targets) of ``documents`` (token id lists, each predicting ``ids[1:]`` from
    ``ids[:-1]``), run ``segment_tokens`` at a time with the recurrent cache carried between segments.

    Up to ``batch_size`` documents run together in one packed row (``cu_seqlens``), each continuing its own
    cache row, so no padding is run and no state leaks between them. When a document ends, the next one in the
    queue takes over its cache row in the next segment, from a fresh state (zero, position 0: what a document
    scored alone starts from), so the row holds ``batch_size`` documents until the queue is empty (continuous
    batching). The result is batch_size=1's, up to the rounding of the sums. ``buckets`` also gets each
    target's loss by its position in its document. An xPos model's segments are at most one packed xPos frame."""
    if segment_tokens < 1 or batch_size < 1:
        raise ValueError(f"segment_tokens and batch_size must be >= 1; got {segment_tokens}, {batch_size}")
    config = getattr(model, "config", None)
    if getattr(config, "use_xpos", False):
        # The packed forward runs each piece in one xPos frame and refuses a longer one (XPosFrameError, a traceback
        # after the model had loaded); shorter pieces carry the same state, so the loss is the same
        from retnet.model.modeling_retnet import XPOS_PACKED_MAX_GROWTH, xpos_span

        segment_tokens = min(segment_tokens, xpos_span(config, XPOS_PACKED_MAX_GROWTH))
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per segment
    targets = 0
    # Longest first: the documents still running once the queue is empty (the row then shrinks) are the
    # shortest, and a document too long for the memory fails at the start, not after the rest was scored.
    queue = iter(sorted((d for d in documents if len(d) >= 2), key=len, reverse=True))
    # One [ids, tokens scored] per cache row, in the order of the packed row's sequences.
    rows = [[torch.as_tensor(d, dtype=torch.long), 0] for d in itertools.islice(queue, batch_size)]
    cache = None
    while rows:
        pieces = [ids[start:start + segment_tokens + 1] for ids, start in rows]  # a piece's inputs and targets
        lengths = torch.tensor([0, *(len(p) - 1 for p in pieces)])
        out = model(input_ids=torch.cat([p[:-1] for p in pieces])[None].to(device),
                    cu_seqlens=lengths.cumsum(0).to(device), cache=cache, use_cache=True, return_dict=True)
        want = torch.cat([p[1:] for p in pieces]).to(device)
        if buckets is None:
            total += F.cross_entropy(out.logits[0].float(), want, reduction="sum")
        else:
            losses = F.cross_entropy(out.logits[0].float(), want, reduction="none")
            total += losses.sum(dtype=torch.float64)
            positions = torch.cat([torch.arange(start, start + len(p) - 1) for p, (_, start) in zip(pieces, rows)])
            buckets.add(positions, losses)
        targets += len(want)
        if progress is not None:
            progress.update(len(want))
        cache = out.cache
        del out  # its logits would otherwise live through the next forward: two segments' worth at the peak
        for row in rows:
            row[1] += segment_tokens
        ended = [i for i, (ids, start) in enumerate(rows) if start >= len(ids) - 1]
        if not ended:
            continue
        following = list(itertools.islice(queue, len(ended)))
        for i, ids in zip(ended, following):
            rows[i] = [torch.as_tensor(ids, dtype=torch.long), 0]
        _restart_rows(cache, ended[:len(following)])
        if len(following) < len(ended):  # the queue is empty: the rows of the other ended documents leave
            keep = [i for i in range(len(rows)) if i not in ended[len(following):]]
            rows = [rows[i] for i in keep]
            cache = cache.select(keep) if keep else None
    return total.item(), targets


def _restart_rows(cache, rows: list[int]) -> None:
    """Cache rows ``rows`` set, in place, to what a sequence that has seen nothing holds (the rows of
    ``RetNetCache.zeros``: zero states, offset 0), for new documents to start from."""
    if not rows:
        return
    index = torch.tensor(rows, device=cache.offsets.device)
    for state in cache.states:
        state.index_fill_(0, index.to(state.device), 0.0)
    cache.offsets.index_fill_(0, index, 0)


def evaluate(model, documents: Sequence[Sequence[int]], *, segment_tokens: int = 2048, batch_size: int = 1,
             progress=None, position_edges: Sequence[int] | None = None) -> EvalResult:
    # CUDA runs asynchronously: the clock must start and stop with the device idle.
    device_sync = next(model.parameters()).device.type == "cuda"
    if device_sync:
        torch.cuda.synchronize()
    buckets = PositionBuckets(position_edges, next(model.parameters()).device) if position_edges else None
    began = time.perf_counter()
    loss_sum, tokens = score_documents(model, documents, segment_tokens=segment_tokens, batch_size=batch_size,
                                       progress=progress, buckets=buckets)
    if device_sync:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    loss = loss_sum / tokens if tokens else math.nan
    return EvalResult(documents=len(documents), tokens=tokens, loss=loss, perplexity=_perplexity(loss),
                      tokens_per_second=tokens / seconds if seconds > 0 else math.inf, seconds=seconds,
                      by_position=None if buckets is None else buckets.rows())


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------
# data.py's messages name the training config's keys; here the same settings are options.
_OPTION_OF_KEY = {"dataset": "--dataset", "name": "--name", "split": "--split", "text_field": "--text-field",
                  "max_documents": "--max-documents", "cache_dir": "--cache-dir", "seq_len": "--seq-len",
                  "max_prompt_length": "--max-prompt-length"}


# Training's refusals of a split point at the validation documents a run holds out; retnet-eval holds none out (it
# scores the whole set) and has no such option, so that aside would mislead here.
_HELD_OUT_ASIDE = re.compile(r" \(its validation documents are held out by data\.val_fraction[^)]*\)")


def _as_options(message: str) -> str:
    message = _HELD_OUT_ASIDE.sub("", message)
    return re.sub(rf"\bdata\.({'|'.join(_OPTION_OF_KEY)})\b", lambda m: _OPTION_OF_KEY[m.group(1)], message)


def read_documents(dataset: str, *, name: str | None = None, split: str = "train", text_field: str = "text",
                   max_documents: int = 0, cache_dir: str | Path | None = None) -> list[str]:
    """The non-empty documents of ``dataset``, read by training's own readers (same sources, same order,
    same ``max_documents`` cut, no validation split held out)."""
    from retnet.train.config import ConfigError, DataConfig
    from retnet.train.data import (
        data_cache_dir,
        default_cache_dir,
        load_documents,
        local_files,
        saved_dataset_dir,
    )

    try:
        cfg = DataConfig(dataset=dataset, name=name, split=split, text_field=text_field,
                         max_documents=max_documents, cache_dir=str(cache_dir or ""))
        files = None if dataset == "stdlib" else local_files(dataset)
        # Checked before datasets reads: a --cache-dir that is a file failed inside it, blamed on --dataset's
        # columns. stdlib and a save_to_disk directory are read in place: no cache to make (a read-only home)
        cached = dataset != "stdlib" and (files is None or not saved_dataset_dir(files[0]))
        docs = load_documents(cfg, files, data_cache_dir(cfg) if cached else default_cache_dir())
    except (ConfigError, FileNotFoundError) as error:
        raise EvalError(_as_options(str(error))) from None
    if not docs:
        # (text of whitespace alone is no document, as in training: it would train only its EOS)
        raise EvalError(f"--dataset {dataset!r} holds no documents (every {text_field!r} value is empty or "
                        f"whitespace{'' if dataset == 'stdlib' else ', or the selection is empty'})")
    return docs


def load_model(path: str, *, device: str | None = None, dtype: str = "float32", quantization: str = "none"):
    """(model, tokenizer) of an export directory (or hub id), the model in eval mode on ``device``: a causal LM,
    or a reward model (:func:`is_reward_model`) when config.json's ``architectures`` names a
    ``*ForSequenceClassification`` with one label (what ``reward.enabled`` exports). ``quantization``: its
    decoder's Linear weights quantized as ``retnet-serve --quantization`` does (:mod:`retnet.model.quantization`)."""
    import retnet

    retnet.register()  # (a retnet-eval process registers here, its first import of transformers: see there)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from retnet.model.hub import HubError, holds_tokenizer, resolve_pretrained, training_output
    from retnet.train.config import ConfigError
    from retnet.train.data import load_tokenizer, tokenizer_mismatch

    try:
        root = resolve_pretrained(path)
    except HubError as error:
        raise EvalError(f"--model {error}") from None
    if not root.is_dir():
        raise EvalError(f"--model {path!r} is not a directory; give a save_pretrained directory "
                        f"(train.output_dir/export)")
    written = training_output(root)
    if written is not None:
        raise EvalError(f"--model {path!r} is {written}")
    if not (root / "config.json").is_file():
        raise EvalError(f"--model {path!r} holds no config.json; give a save_pretrained directory "
                        f"(train.output_dir/export)")
    target = _device(device)
    if dtype not in DTYPES:
        raise EvalError(f"--dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    try:  # before the model loads: a missing torchao is said at once
        check_quantization(quantization)
    except ValueError as error:
        raise EvalError(str(error)) from None
    if not holds_tokenizer(root):
        # transformers' own error for it is a paragraph on converting slow tokenizers, cut mid-word
        raise EvalError(f"--model {path!r} holds no tokenizer (no tokenizer.json, tokenizer_config.json, "
                        f"*.model or vocab.* file); export the model with its tokenizer")
    try:
        tokenizer = load_tokenizer(root)  # training's loader: local only, an EOS required
    except (ConfigError, FileNotFoundError) as error:
        raise EvalError(f"--model {path!r}: {str(error).replace('data.tokenizer ', 'tokenizer ')}; export the "
                        f"model with its tokenizer") from None
    try:
        config = AutoConfig.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError) as error:
        raise EvalError(f"--model {path!r} could not be loaded: {type(error).__name__}: "
                        f"{str(error).strip()[:300]}") from None
    architectures = config.architectures or []
    classifier = [name for name in architectures if name.endswith("ForSequenceClassification")]
    if classifier and config.num_labels != 1:
        raise EvalError(f"--model {path!r} is a {classifier[0]} with {config.num_labels} labels, not a reward model "
                        f"(one label: a score per sequence); retnet-eval scores causal LMs and reward models")
    if architectures and not classifier and not any(name.endswith("ForCausalLM") for name in architectures):
        # a backbone (RetNetModel) has no LM head: AutoModelForCausalLM would start one at random, or take the
        # tied embedding for a head it never trained, and score that
        raise EvalError(f"--model {path!r} holds a {', '.join(map(str, architectures))} (config.json architectures), "
                        f"neither a causal LM nor a reward model: it has no head to score with; give a "
                        f"RetNetForCausalLM's or reward model's export")
    auto_class = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    from safetensors import SafetensorError

    try:
        # other-shaped weights are named below with the rest (transformers' own error points at a log report)
        model, info = auto_class.from_pretrained(str(root), config=config, dtype=DTYPES[dtype], local_files_only=True,
                                                 output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as error:  # a damaged weight file too
        raise EvalError(f"--model {path!r} could not be loaded: {type(error).__name__}: "
                        f"{str(error).strip()[:300]}") from None
    wrong = _weights_not_matching(model, info)
    if wrong:
        # transformers starts missing weights at random and drops unexpected ones: a model loaded in part scores
        # random layers (or fewer layers than it was trained with) without a word
        raise EvalError(f"--model {path!r}: its weights do not match its config.json ({wrong}); give a "
                        f"save_pretrained directory whose config.json and weights were written together (train.output_dir/export)")
    problem = tokenizer_mismatch(tokenizer, model.config)
    if problem is not None:
        raise EvalError(f"--model {path!r}: {problem}")
    model = model.to(target).eval()
    if quantization != "none":  # on the device: torchao quantizes where the weight is
        quantize_model(model, quantization)
    return model, tokenizer


def _weights_not_matching(model, info: dict) -> str:
    """The missing, unexpected and other-shaped weights of ``from_pretrained``'s loading ``info``, named ("" when
    every weight of the model was loaded and no other was there). A tied head is the embedding, not a weight of
    its own (older transformers list it as missing)."""
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if model.config.tie_word_embeddings else set()
    problems = {"missing": sorted(set(info.get("missing_keys", ())) - tied),
                "unexpected": sorted(info.get("unexpected_keys", ())),
                "other-shaped": sorted(_shapes(key) for key in info.get("mismatched_keys", ()))}
    return "; ".join(f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                     for what, keys in problems.items() if keys)


def _shapes(mismatched) -> str:
    """A ``mismatched_keys`` entry of transformers, (name, the file's shape, the config's shape), as text."""
    if isinstance(mismatched, tuple) and len(mismatched) == 3:
        name, saved, expected = mismatched
        return f"{name} {list(saved)} in the file, {list(expected)} by config.json"
    return str(mismatched)


def is_reward_model(model) -> bool:
    """Whether ``model`` (as :func:`load_model` returns it) is a one-label sequence classifier: scored on
    preference pairs (:mod:`retnet.train.evaluate_reward`), not documents."""
    return type(model).__name__.endswith("ForSequenceClassification") and model.config.num_labels == 1


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise EvalError(f"--device {name!r} is no torch device (cpu, cuda, cuda:1 ...)") from None
    if device.type == "meta":  # every torch has it, but it holds no data: the scoring failed in a traceback
        raise EvalError(f"--device {name!r} holds no data to compute with (use cpu, or cuda:N below the GPU count)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name!r}: CUDA is not available here")
    try:  # (as retnet-serve checks it) cuda:3 on a machine with fewer GPUs, or xpu/mps torch was not built with,
        # failed only as the loaded model moved there, a traceback
        torch.empty(1, device=device)
    except (AssertionError, RuntimeError, NotImplementedError, ImportError) as error:
        raise EvalError(f"--device {name!r} is not available here: {(str(error).strip() or type(error).__name__).splitlines()[0][:200]} "
                        f"(use cpu, or cuda:N below the GPU count)") from None
    return device


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        # (--batch-size 2**63 reached itertools.islice, which takes none past sys.maxsize: a ValueError traceback
        # after the whole model had loaded)
        if value is None or not minimum <= value <= sys.maxsize:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum} and below 2**63; got {text!r}")
        return value

    return parse


def _edges(text: str) -> list[int]:
    try:
        edges = [int(part) for part in text.split(",")]
    except ValueError:
        edges = []
    # (an edge past int64 reached torch.tensor: an OverflowError traceback after the whole model had loaded)
    if not edges or any(e <= 0 or e >= 2**63 for e in edges) or edges != sorted(set(edges)):
        raise argparse.ArgumentTypeError(f"must be increasing positive token positions below 2**63, comma-separated "
                                         f"(e.g. 128,512,2048); got {text!r}")
    return edges


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retnet-eval", description="Per-token loss and perplexity of an exported RetNet over whole documents; "
                                        "for a reward model, its accuracy and margins on preference pairs.")
    parser.add_argument("--model", required=True, help="save_pretrained directory with its tokenizer "
                                                       "(train.output_dir/export)")
    parser.add_argument("--dataset", default="stdlib", help="as data.dataset: stdlib, a local file, directory or "
                                                            "glob, a save_to_disk directory or a hub name (default: stdlib)")
    parser.add_argument("--name", default=None, help="as data.name: the hub dataset's configuration")
    parser.add_argument("--split", default="train", help="as data.split (default: train)")
    # None: not given (the defaults are set in main), so a reward model can refuse the LM's options by name
    parser.add_argument("--text-field", default=None, help="as data.text_field (default: text)")
    parser.add_argument("--max-documents", type=_count(0), default=0,
                        help="as data.max_documents: the first N rows of --dataset (stdlib: files), those without "
                             "text among them then left out; a reward model's first N pairs (default 0: all)")
    parser.add_argument("--segment-tokens", type=_count(1), default=None,
                        help="tokens per forward; the recurrent state carries across (default: 2048)")
    parser.add_argument("--batch-size", type=_count(1), default=1,
                        help="documents run together, or a reward model's pairs per forward (default: 1)")
    parser.add_argument("--seq-len", type=_count(2), default=None,
                        help="reward model: cut each sequence to N tokens, as data.seq_len cuts them in training "
                             "(the prompt, then each completion's first tokens; default: no cut)")
    parser.add_argument("--max-prompt-length", type=_count(1), default=None,
                        help="reward model: keep a prompt's last N tokens, as data.max_prompt_length (default: "
                             "the whole prompt)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype (default: float32)")
    parser.add_argument("--quantization", default="none", choices=QUANTIZATION_METHODS,
                        help="weight-only quantization of the decoder's Linear layers, as retnet-serve's: int8 "
                        "(torchao: pip install 'retnet-stack[quant]'); compare the loss with none's (default: none)")
    parser.add_argument("--cache-dir", default=None, help="as data.cache_dir: where datasets caches what it "
                                                          "reads (default: $XDG_CACHE_HOME/retnet/train)")
    parser.add_argument("--position-edges", type=_edges, default=None, metavar="E1,E2,...",
                        help="also report the loss by position in the document, in buckets cut at these token "
                             "positions (e.g. 128,512,2048: [0,128) [128,512) [512,2048) [2048,∞))")
    parser.add_argument("--json", action="store_true", help="print one JSON record instead of a line of text")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


@contextlib.contextmanager
def _library_bars(shown: bool) -> Iterator[None]:
    """transformers (loading weights) and datasets (reading files) draw bars of their own: hidden with ours,
    then restored, since ``main`` also runs inside other programs (the tests)."""
    from retnet.extras import transformers_bars_hidden

    try:
        import datasets
    except ImportError:  # the standard library is read without it (the GPU image lacks it)
        datasets = None
    if shown:
        yield
        return
    datasets_shown = datasets is not None and not datasets.are_progress_bars_disabled()
    if datasets_shown:
        datasets.disable_progress_bars()
    try:
        with transformers_bars_hidden():
            yield
    finally:
        if datasets_shown:
            datasets.enable_progress_bars()


def _finite_or_null(value):
    """NaN and Infinity are not JSON (jq, JSON.parse and most loaders refuse the line): null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def _refuse_options(args: argparse.Namespace, names: Sequence[str], what: str) -> None:
    """EvalError naming the first of ``names`` (``args`` attributes, None when not given) that was given: it
    means nothing for ``what`` the model is."""
    for name in names:
        value = getattr(args, name)
        if value is not None:
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            raise EvalError(f"--{name.replace('_', '-')} {shown} means nothing for --model {args.model!r}, {what}")


def main(argv: list[str] | None = None) -> int:
    from retnet.extras import BROKEN_PIPE, exits_on_ctrl_c, needs_extra, to_devnull, warnings_above_bars

    # datasets (a local file, a hub dataset) and tqdm come with the [train] extra; the bars are ours and a reward
    # model's (evaluate_reward)
    with exits_on_ctrl_c("retnet-eval"), needs_extra("retnet-eval", "train"), warnings_above_bars():
        try:
            status = _run_command(argv)
            # Flushed here, not by Python at exit: a reader gone then (`retnet-eval ... | head -1`) was "Exception
            # ignored ... BrokenPipeError" and status 120, or a traceback with PYTHONUNBUFFERED set
            if sys.stdout is not None:  # (closed: `>&-`)
                sys.stdout.flush()
            return status
        except BrokenPipeError:
            to_devnull(sys.stdout)
            try:
                print(f"retnet-eval: {BROKEN_PIPE}", file=sys.stderr)
            except OSError:  # (`2>&1 | head -1`: stderr went with it)
                to_devnull(sys.stderr)
            return EXIT_BROKEN_PIPE


def _run_command(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    args = parser.parse_args(argv)
    with _library_bars(not args.no_progress):
        try:
            model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                          quantization=args.quantization)
            if is_reward_model(model):
                from retnet.train import evaluate_reward

                pairs = evaluate_reward.read_args_pairs(args, tokenizer)
            else:
                _refuse_options(args, ("seq_len", "max_prompt_length"), "a causal LM (they cut preference pairs "
                                "for a reward model)")
                args.text_field = "text" if args.text_field is None else args.text_field
                args.segment_tokens = 2048 if args.segment_tokens is None else args.segment_tokens
                texts = read_documents(args.dataset, name=args.name, split=args.split, text_field=args.text_field,
                                       max_documents=args.max_documents, cache_dir=args.cache_dir)
        except EvalError as error:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return EXIT_USAGE
    if is_reward_model(model):
        # the tokenizer's EOS closed the completions; the model config's may be unset (a cut pair went uncounted)
        return evaluate_reward.report(args, model, pairs, tokenizer.eos_token_id)
    documents = encode(tokenizer, texts)
    del texts  # the documents are their tokens from here on
    from tqdm.auto import tqdm

    with tqdm(total=sum(len(d) - 1 for d in documents), desc="eval", unit="tok", unit_scale=True,
              disable=args.no_progress, file=sys.stderr) as bar:
        result = evaluate(model, documents, segment_tokens=args.segment_tokens, batch_size=args.batch_size,
                          progress=bar, position_edges=args.position_edges)
    if args.json:
        # Every setting that selects the documents: records of two splits (or fields) of one dataset must differ.
        record = {"model": args.model, "dataset": args.dataset, "name": args.name, "split": args.split,
                  "text_field": args.text_field, "max_documents": args.max_documents, **asdict(result),
                  "segment_tokens": args.segment_tokens, "batch_size": args.batch_size,
                  "device": str(next(model.parameters()).device), "dtype": str(DTYPES[args.dtype]).split(".")[-1],
                  "quantization": args.quantization}
        if result.by_position is None:
            del record["by_position"]
        print(json.dumps(_finite_or_null(record), allow_nan=False))
    else:
        quantized = "" if args.quantization == "none" else f", --quantization {args.quantization}"
        print(f"{result.documents} documents, {result.tokens} tokens: loss {result.loss:.4f}, perplexity "
              f"{result.perplexity:.2f} ({result.tokens_per_second:,.0f} tokens/s{quantized})")
        for row in result.by_position or []:
            span = f"[{row['start']}, {'∞' if row['end'] is None else row['end']})"
            print(f"  positions {span:>16}: {row['tokens']:>10} tokens, loss {row['loss']:.4f}, "
                  f"perplexity {row['perplexity']:.2f}")
    return EXIT_OK
