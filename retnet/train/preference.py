"""Preference pairs and Direct Preference Optimization (``data.format = "preference"``), as TRL's DPOTrainer.

    retnet-train --config small --model.init_from=runs/sft/export --data.format=preference \\
        --data.dataset=pairs.jsonl --dpo.beta=0.1 --train.output_dir=runs/dpo

Rows are TRL's preference formats, the columns ``prompt``, ``chosen`` and ``rejected``; without ``prompt`` (TRL's
*implicit prompt*) a row's prompt is its chosen and rejected's common beginning, split off as TRL's
``extract_prompt`` splits it (:func:`extract_prompt`); so it is for a row whose ``prompt`` is a string while its
``chosen`` and ``rejected`` are whole conversations (TRL's ``maybe_extract_prompt``). A prompt-less row whose two
share no beginning has no prompt (None): each completion is the whole text, or the whole conversation rendered
with the chat template (no generation prompt), as TRL's RewardTrainer tokenizes every row; a reward model scores
it so, and DPO refuses it when it starts (:meth:`PreferenceData.check_prompted`: no token would predict the first
completion token). *Standard*: three strings; a sequence is the prompt's tokens, then the completion's, then
EOS, the prompt (or a prompt-less row's whole texts) encoded with the special tokens the tokenizer adds, as
``/v1/completions`` encodes a prompt and the SFT and pretraining data start (a Llama-style BOS; TRL's DPOTrainer
leaves it out) (:meth:`PairEncoder.encode_texts`) (in either format, a completion whose tokens already end with the EOS, as a conversation's rendered with a
template that ends each message with it, the default's, gets no second). *Conversational*: three lists of ``{"role", "content"}`` messages (``chosen``/``rejected`` normally one assistant message). The prompt is rendered with the
tokenizer's chat template and the generation prompt, as the server renders a chat request, and a completion is
what ``render(prompt + chosen)`` adds after it (the template must render the prompt as a prefix, or the row is
refused). A prompt that ends with an assistant message (a prefill) is rendered as TRL renders it, with
``continue_final_message=True`` and no generation prompt, the message left open; a completion whose first
message is an assistant one then continues it (its content appended to the prefill's, as the server continues a
``continue_final_message`` request) instead of opening a second assistant turn. Templates and special tokens as
the chat SFT path takes them (:class:`~retnet.train.chat.ChatEncoder`'s ``render`` and tokenizer backend); a
conversational row's ``chat_template_kwargs`` (TRL's column, a dict of the template's variables: Qwen3's
``enable_thinking``) goes to the template with each of its renderings, as TRL's ``apply_chat_template`` passes it
(a standard row's has no effect). The
prompt and each completion are encoded apart, as TRL does, so the two sequences of a pair share the prompt's
tokens and a completion starts where the server's generation would.

Long pairs, as TRL cuts them: a prompt longer than ``data.max_prompt_length`` (when > 0) keeps its last tokens
(TRL's ``keep_end`` for the prompt: the end is what the completion answers), then each completion (EOS included)
keeps its first tokens, as many as the prompt leaves of ``data.seq_len``. With ``data.max_prompt_length`` 0 a
prompt is not cut. Refused, naming the dataset and row: a missing or mistyped field, a prompt with no tokens or
none left for a completion, and a pair whose chosen and rejected tokens are the same. An optional ``margin`` column
(a finite number in every row) is kept with the pairs for the reward model (TRL's RewardTrainer); DPO ignores it.

A micro-batch of ``micro_batch`` pairs is ``2 × micro_batch`` sequences (the chosen ones, then the rejected ones)
packed into one row, each its own ``cu_seqlens`` segment (the retention state and positions start fresh at each:
no padding is computed); logits are taken only where a completion token is predicted (``logits_to_keep``), and a
sequence's log-probability is the sum over its completion tokens. The pairs are batched as :class:`PackedData`
batches blocks: a per-epoch seeded permutation, ``global_batch_size`` pairs a step, rank ``r``'s micro-batch ``m``
slice ``m · world + r``, the position one integer.

The reference policy is the model as the run starts (``model.init_from``; with LoRA its zero-initialized adapters
change nothing, so the base model): before the first step the reference log-probs of every train and validation
pair are computed once (TRL's ``precompute_ref_log_probs``; no second model), in eval mode, the pairs split across
the ranks (each runs the same number of forwards, as FSDP needs) and all-gathered. Under tensor parallelism they are
split across the data-parallel ranks: the ranks of a tensor-parallel group run the split model on the same pairs
(the batches, the reference pass and the evaluation alike), and each pair's log-probs and metrics count once. So
under context parallelism, whose ranks each hold a piece of every row of the same pairs (the row padded with a
sequence of its own to a length they divide): each rank sums the log-probs of the completion tokens its piece
predicts, and an all-reduce over the group adds them up (its backward hands every piece the sum's gradient). The
policy trains without dropout (TRL's ``disable_dropout``, :func:`policy_overrides`), so at step 1 it is the
reference. Rank 0 writes them to ``<output_dir>/reference_logps.pt`` with a content hash of the tokenized pairs
they are of (:func:`pairs_digest`); checkpoints hold the file's digest, and a resume loads that file (or the one
beside the checkpoint's run), refuses one of another digest, and one computed for other pairs than the data now
gives: it never recomputes them from the resumed weights. With ``dpo.reference_free`` (TRL's) the reference
log-probs are 0: none are computed, written or read back; checkpoints also hold the pairs' hash, which a resume
without a reference file compares with the data it reads (:meth:`PreferenceData.check_pairs`).

The loss is TRL's ``dpo.loss_type`` (:func:`dpo_loss`, every parallel layout's; a list of them weighted by
``dpo.loss_weights``, TRL's combined losses), ``dpo.rpo_alpha`` adding RPO's NLL of the chosen completions
(:func:`chosen_nll`, logged as TRL's ``nll_loss``, as for the ``sft`` loss type). ``bco_pair``'s running mean of
the rewards (:class:`RunningMean`) is part of the data state in the checkpoints. ``simpo`` (TRL's CPOTrainer's,
``dpo.cpo_alpha`` its NLL weight) and ``orpo`` (TRL's ORPOTrainer's, the NLL part of it, ``log_odds_ratio`` and
``log_odds_chosen`` logged) compare the policy's length-averaged log-probs alone: no reference is computed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import numbers
import os
import pickle
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from retnet.tokenization import closed_by_eos, render_pair
from retnet.train.chat import (
    KWARGS_COLUMN,
    ChatEncoder,
    Conversation,
    check_template_kwargs,
    conversation_problem,
    template_messages,
)
from retnet.train.chat import template_identity as chat_template_identity
from retnet.train.checkpoint import _fsync_dir, _write_durable
from retnet.train.config import ConfigError, DataConfig, DpoConfig, ModelConfig
from retnet.train.data import (
    PackedData,
    _atomic_dir,
    _hash,
    _hf_dataset,
    _hub_changed,
    _kind,
    _remove_abandoned_temp_dirs,
    column_values,
    data_cache_dir,
    data_fingerprint,
    first_rows,
    load_hub,
    load_tokenizer,
    local_files,
    saved_dataset_dir,
    split_documents,
    tokenizer_fingerprint,
    vocab_bound,
)
from retnet.train.distributed import is_distributed

if TYPE_CHECKING:  # (the model package imports transformers: evaluate_reward reads Pairs without it)
    from retnet.model.context_parallel import ContextGroup

logger = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")  # TRL's column names
# TRL's RewardTrainer's optional column: the reward difference each pair's loss asks for (DPO ignores it, as TRL's)
MARGIN = "margin"
REFERENCE_FILE = "reference_logps.pt"
# Bumped when the cached pairs change for the same key, so an old cache is not misread.
# 2: a prefilled prompt is continued (continue_final_message), not given a second turn; 3: the margin column kept;
# 4: a conversational row's chat_template_kwargs column rendered with it (a cache of before rendered without)
PAIRS_VERSION = 4
# What each step and evaluation records beside the loss (TRL's names): means over the global batch of pairs.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
# ORPO's beside them (TRL's ORPOTrainer's names): the means of log σ(log odds ratio) and of the log odds ratio
ORPO_METRICS = ("log_odds_ratio", "log_odds_chosen")


# ----------------------------------------------------------------------------------------------------------
# Rows -> tokens
# ----------------------------------------------------------------------------------------------------------
def check_pair(dataset: str, row: int, values: tuple[Any, Any, Any], *, implicit: bool = False,
               template_kwargs: Any = None) -> tuple[Any, Any, Any]:
    """A row's (prompt, chosen, rejected), messages as the template reads them; a ConfigError naming the dataset,
    the row and the field when they are neither three strings nor three non-empty lists of messages. ``implicit``:
    the dataset has no ``prompt`` column, and a prompt of None (:func:`implicit_pair`: the row has none) stays None,
    chosen and rejected checked alone; a given prompt column's null is refused as any mistyped field.
    ``template_kwargs``: the row's ``chat_template_kwargs`` value (TRL's column): a conversational row's lists are
    then :class:`~retnet.train.chat.Conversation` s carrying them (checked by ``check_template_kwargs``), which
    :meth:`PairEncoder.texts` renders with; a standard row's has no effect (no template), as TRL's."""
    prompted = not (implicit and values[0] is None)
    standard = isinstance(values[0] if prompted else values[1], str)
    checked = [] if prompted else [None]
    for name, value in zip(FIELDS, values, strict=True):
        if name == "prompt" and not prompted:
            continue
        problem = field_problem(name, value, standard, "the prompt, chosen and rejected")
        if problem:
            raise ConfigError(f"data.format 'preference': {name!r} of {dataset!r}, row {row}: {problem}")
        checked.append(value if standard else template_messages(value))
    variables = None if standard else check_template_kwargs(dataset, row, template_kwargs, "preference")
    if variables:
        checked = [_with_variables(value, variables) for value in checked]
    return tuple(checked)


def field_problem(name: str, value: Any, standard: bool, alike: str) -> str | None:
    """What is wrong with a row's field ``name`` (this module's rows' and :mod:`retnet.train.kto`'s), and what was
    expected, in the row's format (``standard``: strings, else non-empty lists of messages; ``alike``: the fields
    that share it); None when nothing is."""
    if standard:
        problem = None if isinstance(value, str) else f"holds {type(value).__name__} {value!r:.80}"
    else:
        problem = "is an empty list" if value == [] else conversation_problem(value)
    if not problem:
        return None
    expected = ("a string, as the prompt is (standard format)" if standard and name != "prompt" else
                "a string (standard format) or a list of {'role': str, 'content': str} messages "
                f"(conversational format), {alike} alike")
    return f"{problem}; expected {expected}"


def _with_variables(messages: list[dict[str, Any]] | None, variables: dict[str, Any]) -> Conversation | None:
    """``messages`` as a :class:`~retnet.train.chat.Conversation` carrying a row's template variables (None: a
    prompt-less row's prompt, kept None)."""
    if messages is None:
        return None
    conversation = Conversation(messages)
    conversation.template_kwargs = variables
    return conversation


def check_margin(dataset: str, row: int, value: Any) -> float:
    """A row's ``margin`` as a float; a ConfigError naming the dataset and the row unless it is a finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"data.format 'preference': {MARGIN!r} of {dataset!r}, row {row}: holds "
                          f"{type(value).__name__} {value!r:.80}; expected a finite number (the reward difference "
                          f"the pair asks for, TRL's RewardTrainer's margin), in every row")
    return float(value)


def extract_prompt(chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) of an implicit-prompt row, TRL's ``extract_prompt``: the prompt is the two's
    common beginning (characters, or messages), and a completion of text keeps the space before its first differing
    word. When one is a beginning of the other, each keeps its last character (message), as TRL's."""
    shortest = min(len(chosen), len(rejected))
    cut = next((i for i in range(shortest) if chosen[i] != rejected[i]), None)
    if cut is None:
        cut = max(shortest - 1, 0)
    elif cut > 0 and isinstance(chosen, str) and chosen[cut - 1] == " ":
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def implicit_pair(dataset: str, row: int, chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) of a row without a ``prompt`` (TRL's implicit prompt, :func:`extract_prompt`); a
    ConfigError naming the dataset and the row when the two are not of one format. Two that share no beginning
    give (None, chosen, rejected), the row's texts (messages) whole: no prompt, as TRL's RewardTrainer scores them
    (it never extracts one). DPO refuses such pairs when it starts (:meth:`PreferenceData.start`)."""
    where = f"data.format 'preference': 'chosen' and 'rejected' of {dataset!r}, row {row}"
    if not any(isinstance(chosen, kind) and isinstance(rejected, kind) for kind in (str, list)):
        raise ConfigError(f"{where}: hold {type(chosen).__name__} and {type(rejected).__name__}; expected two strings "
                          f"(standard format) or two lists of messages (conversational format), the prompt their "
                          f"common beginning (the dataset has no 'prompt' column)")
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    # None, not the empty prompt: a given prompt that encodes to nothing is still refused (PairEncoder), and DPO
    # tells such pairs by it (an empty prompt would leave the first completion token predicted from nothing)
    return (prompt or None), chosen, rejected


def load_pairs(cfg: DataConfig, files: list[Path] | None, cache_dir: Path, loaded=None) -> list[tuple]:
    """(row index, checked pair) of every row (at most ``max_documents``), in row order; (row index, checked pair,
    margin) when the dataset has a ``margin`` column. Without a ``prompt`` column each row's prompt is its chosen
    and rejected's common beginning (TRL's implicit prompt, :func:`implicit_pair`), None when they share none."""
    dataset = loaded if loaded is not None else _hf_dataset(cfg, files, cache_dir, streaming=False)
    missing = [name for name in FIELDS if name not in dataset.column_names]
    if set(missing) - {"prompt"}:
        raise ConfigError(f"data.dataset {cfg.dataset!r} has no {missing} column(s) (columns: {dataset.column_names}); "
                          f"data.format 'preference' reads TRL's {list(FIELDS)} (or 'chosen' and 'rejected' alone, "
                          f"the prompt implicit: their common beginning)")
    if cfg.max_documents:
        dataset = first_rows(dataset, cfg.max_documents)
    # TRL's apply_chat_template renders a conversational row's prompt, prompt + chosen and prompt + rejected (an
    # implicit prompt's chosen and rejected) with the row's chat_template_kwargs
    variables = (column_values(dataset, KWARGS_COLUMN, cfg.dataset) if KWARGS_COLUMN in dataset.column_names
                 else [None] * len(dataset))
    if missing:  # TRL's implicit prompt
        rows = zip(*(column_values(dataset, name, cfg.dataset) for name in ("chosen", "rejected")), strict=True)
        triples = [implicit_pair(cfg.dataset, row, chosen, rejected) for row, (chosen, rejected) in enumerate(rows)]
    else:
        triples, restated = [], 0
        for row, (prompt, chosen, rejected) in enumerate(zip(*(column_values(dataset, name, cfg.dataset)
                                                                  for name in FIELDS), strict=True)):
            if isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list) \
                    and extract_prompt(chosen, rejected)[0]:
                # A text prompt beside whole conversations (HuggingFaceH4/ultrafeedback_binarized's rows): the
                # conversations hold the prompt, which TRL's maybe_extract_prompt takes from them, as here. (Ones
                # that share no beginning hold no prompt: check_pair refuses the row's mixed formats.)
                triples.append(implicit_pair(cfg.dataset, row, chosen, rejected))
                restated += 1
            else:
                triples.append((prompt, chosen, rejected))
        if restated:
            logger.info("data: %d of %d rows of %s have a text 'prompt' beside conversations in 'chosen' and "
                        "'rejected': their prompt is the conversations' common beginning (TRL's "
                        "maybe_extract_prompt), the text column unused", restated, len(triples), cfg.dataset)
    pairs = [(row, check_pair(cfg.dataset, row, values, implicit=bool(missing), template_kwargs=variables[row]))
             for row, values in enumerate(triples)]
    if MARGIN not in dataset.column_names:
        return pairs
    margins = column_values(dataset, MARGIN, cfg.dataset)
    return [(row, pair, check_margin(cfg.dataset, row, margins[row])) for row, pair in pairs]


class Pairs:
    """Tokenized pairs: ``tokens`` holds each pair's prompt, chosen completion and rejected completion back to back
    (completions end with EOS), ``lengths`` ``[N, 3]`` their lengths, ``rows`` ``[N]`` the dataset rows,
    ``margins`` ``[N]`` float32 their ``margin`` column's values (None: the dataset has none)."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, rows: np.ndarray, margins: np.ndarray | None = None):
        self.tokens, self.lengths, self.rows = tokens, np.asarray(lengths, dtype=np.int64).reshape(-1, 3), rows
        self.margins = None if margins is None else np.asarray(margins, dtype=np.float32)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths.sum(axis=1))[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def parts(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt, chosen, rejected) ids of pair ``index``."""
        prompt, chosen, _ = self.lengths[index]
        start = self.starts[index]
        cut = np.cumsum([start, prompt, chosen, self.lengths[index, 2]])
        return tuple(np.asarray(self.tokens[lo:hi], dtype=np.int64) for lo, hi in itertools.pairwise(cut))

    def batch(self, ids: np.ndarray) -> PairBatch:
        return pack([self.parts(i) for i in ids], ids)

    def sequence_tokens(self, ids: np.ndarray) -> int:
        """The tokens of the pairs' 2 sequences each: the prompt twice, both completions."""
        lengths = self.lengths[ids]
        return int(2 * lengths[:, 0].sum() + lengths[:, 1:].sum())

    def completion_tokens(self, ids: np.ndarray) -> int:
        """The tokens of the pairs' completions: the positions whose logits :func:`completion_logps` computes."""
        return int(self.lengths[ids, 1:].sum())

    def save(self, directory: Path, name: str) -> None:
        np.save(directory / f"{name}.tokens.npy", self.tokens)
        np.save(directory / f"{name}.lengths.npy", self.lengths)
        np.save(directory / f"{name}.rows.npy", self.rows)
        if self.margins is not None:
            np.save(directory / f"{name}.margins.npy", self.margins)

    @classmethod
    def load(cls, directory: Path, name: str) -> Pairs:
        parts = ("tokens", "lengths", "rows")
        margins = directory / f"{name}.margins.npy"
        return cls(*(np.load(directory / f"{name}.{part}.npy", mmap_mode="r") for part in parts),
                   np.load(margins) if margins.is_file() else None)


class PairEncoder:
    """(row, pair) -> :class:`Pairs` with ``tokenizer``, cut to ``cfg.seq_len`` (see the module's docstring)."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.chat = ChatEncoder(tokenizer, dataset=cfg.dataset)
        self.eos, self.dataset = tokenizer.eos_token_id, cfg.dataset
        self.format = cfg.format  # what the refusals name: KTO's unpaired rows are encoded as pairs too
        self.seq_len, self.max_prompt_length = cfg.seq_len, cfg.max_prompt_length
        self.dtype = np.uint16 if vocab_bound(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32

    def texts(self, row: int, pair: tuple) -> tuple[str, str, str]:
        """(prompt, chosen, rejected) as text: a standard row's own, a conversational row rendered
        (:func:`render_pair`). Without a prompt (None) the prompt is "" and each completion the whole text, or the
        whole conversation rendered without a generation prompt (TRL's RewardTrainer's ``apply_chat_template``).
        Every rendering with the row's template variables (:func:`check_pair`'s, TRL's ``chat_template_kwargs``)."""
        prompt, chosen, rejected = pair
        if prompt is None and isinstance(chosen, str):
            return "", chosen, rejected
        if isinstance(prompt, str):
            return pair
        render = self.chat.renderer(getattr(chosen, "template_kwargs", None))
        try:
            if prompt is None:
                # Not render_pair of an empty prompt: a template may render [] as text of its own (a BOS, a
                # system turn) that the whole conversation's rendering does not begin with.
                return "", render(chosen), render(rejected)
            return render_pair(prompt, (chosen, rejected), render)
        except Exception as error:  # jinja's own errors, raise_exception in a template, render_pair's check
            raise ConfigError(f"data.format {self.format!r}: the tokenizer's chat template cannot render row {row} of "
                              f"{self.dataset!r} as prompt + completion: {type(error).__name__}: {error}") from None

    @staticmethod
    def added(pair: tuple) -> tuple[bool, bool, bool]:
        """Which of :meth:`texts`' three get the tokenizer's added special tokens (:meth:`encode_texts`): a
        standard row's prompt, or, without one, its two whole texts; none of a conversation's renderings."""
        if not isinstance(pair[1], str):
            return False, False, False
        return (True, False, False) if pair[0] is not None else (False, True, True)

    def encode_texts(self, texts: list[str], added: list[bool]) -> list[list[int]]:
        """The ids of :meth:`~retnet.train.chat.ChatEncoder.encode_texts`."""
        return [ids for ids, _ in self.chat.encode_texts(texts, added)]

    def encode(self, pairs: list[tuple], batch: int = 256) -> Pairs:
        """``pairs``: (row, pair) or, as :func:`load_pairs` reads a ``margin`` column, (row, pair, margin) each."""
        tokens, lengths = [], []
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            texts = [text for row, pair, *_ in chunk for text in self.texts(row, pair)]
            encodings = self.encode_texts(texts, [added for _, pair, *_ in chunk for added in self.added(pair)])
            for number, (row, pair, *_) in enumerate(chunk):
                prompt, chosen, rejected = (encodings[3 * number + i] for i in range(3))
                # a completion the template already closed with the EOS (the default's ends each message so) gets
                # no second one
                parts = self._cut(row, prompt, closed_by_eos(chosen, self.eos), closed_by_eos(rejected, self.eos),
                                  prompted=pair[0] is not None)
                tokens += [np.asarray(part, dtype=self.dtype) for part in parts]
                lengths.append([len(part) for part in parts])
        rows = np.asarray([row for row, *_ in pairs], dtype=np.int64)
        flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=self.dtype)
        margins = None
        if pairs and len(pairs[0]) > 2:
            margins = np.asarray([item[2] for item in pairs], dtype=np.float32)
        return Pairs(flat, np.asarray(lengths, dtype=np.int64).reshape(-1, 3), rows, margins)

    def _cut(self, row: int, prompt: list[int], chosen: list[int], rejected: list[int],
             prompted: bool = True, distinct: bool = True) -> tuple[list, list, list]:
        """``prompted`` False: a row without a prompt (its ``prompt`` is no tokens, and that is no error).
        ``distinct`` False: the two completions may be the same (KTO's completion and KL completion)."""
        where = f"data.format {self.format!r}: row {row} of {self.dataset!r}"
        if self.max_prompt_length and len(prompt) > self.max_prompt_length:
            prompt = prompt[-self.max_prompt_length:]  # TRL's prompt truncation: the end is what is answered
        if not prompt and prompted:
            every = "pair" if self.format == "preference" else "row"
            raise ConfigError(f"{where}: its prompt encodes to no tokens: the first completion token would be "
                              f"predicted from nothing; give every {every} a prompt")
        room = self.seq_len - len(prompt)
        if room < 1:
            raise ConfigError(f"{where}: its prompt is {len(prompt)} tokens, which leaves no room for a completion "
                              f"within data.seq_len {self.seq_len}: raise data.seq_len, or set data.max_prompt_length "
                              f"(< data.seq_len) to keep the prompts' last tokens")
        cut = chosen[:room], rejected[:room]
        if distinct and cut[0] == cut[1]:
            how = "" if chosen == rejected else (f" once cut to the {room} tokens data.seq_len {self.seq_len} leaves "
                                                 f"after the prompt")
            raise ConfigError(f"{where}: its chosen and rejected completions are the same {len(cut[0])} tokens{how}: "
                              f"the pair prefers nothing; remove it{', or raise data.seq_len' if how else ''}")
        return prompt, *cut


# ----------------------------------------------------------------------------------------------------------
# Batches, log-probs, loss
# ----------------------------------------------------------------------------------------------------------
class PairBatch(NamedTuple):
    """A micro-batch of B pairs as one packed row of 2B sequences (B chosen, then B rejected).

    ``input_ids`` ``[1, N]``; ``cu_seqlens`` ``[2B + 1]`` int32; ``keep`` ``[M]``: the positions whose next token
    is a completion token, ``labels`` ``[M]`` that token, ``sequence`` ``[M]`` its sequence; ``lengths`` ``[2B]``
    the completions' token counts; ``pairs`` ``[B]`` the pairs' indices in their split."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    keep: torch.Tensor
    labels: torch.Tensor
    sequence: torch.Tensor
    lengths: torch.Tensor
    pairs: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> PairBatch:
        return PairBatch(*(t.to(device, non_blocking=non_blocking) for t in self))


def pack_completions(sequences: list[tuple[np.ndarray, np.ndarray]]) -> tuple:
    """(prompt, completion) id arrays packed into one row: ``(input_ids [1, N], bounds, keep, labels, sequence,
    lengths)``, ``bounds`` the ``cu_seqlens`` values as a list; ``keep`` the positions whose next token is a
    completion token, ``labels`` that token, ``sequence`` its sequence, ``lengths`` each completion's token count.
    DPO's pairs and GRPO's completions are both packed so."""
    pieces, keep, labels, sequence, bounds = [], [], [], [], [0]
    for number, (prompt, completion) in enumerate(sequences):
        offset = bounds[-1]
        pieces += [prompt, completion]
        # the logits at position t predict token t + 1: the last prompt token predicts the first completion token
        keep.append(np.arange(offset + len(prompt) - 1, offset + len(prompt) + len(completion) - 1))
        labels.append(completion)
        sequence.append(np.full(len(completion), number))
        bounds.append(offset + len(prompt) + len(completion))
    as_long = lambda arrays: torch.from_numpy(np.concatenate(arrays).astype(np.int64))
    return (as_long(pieces)[None], bounds, as_long(keep), as_long(labels), as_long(sequence),
            torch.tensor([len(c) for _, c in sequences]))


def pack(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], pairs: np.ndarray) -> PairBatch:
    """The :class:`PairBatch` of (prompt, chosen, rejected) ids; ``pairs``: their indices, for the reference."""
    sequences = [(p, c) for p, c, _ in parts] + [(p, r) for p, _, r in parts]
    input_ids, bounds, keep, labels, sequence, lengths = pack_completions(sequences)
    return PairBatch(input_ids, torch.tensor(bounds, dtype=torch.int32), keep, labels, sequence, lengths,
                     torch.as_tensor(np.asarray(pairs, dtype=np.int64)))


def completion_logps(model: torch.nn.Module, batch: PairBatch, context: ContextGroup | None = None) -> torch.Tensor:
    """``[2B]`` fp32: each sequence's summed log-probability of its completion tokens (EOS included) under
    ``model`` (a RetNetForCausalLM, or DDP/FSDP around one: called through its forward). ``context``: the row is
    split along time across its ranks (context parallelism), each summing the tokens its piece predicts; the sums
    are added up over them, every rank returning the whole sequences' (the gradient reaching every piece)."""
    inputs, keep, labels, sequence = {"input_ids": batch.input_ids, "cu_seqlens": batch.cu_seqlens}, batch.keep, \
        batch.labels, batch.sequence
    if context is not None:
        inputs, shard, start = context.shard(batch.input_ids, batch.cu_seqlens)
        inputs["context_parallel"] = shard
        # the positions predicting a completion token on this piece (the last one's token may lie on the next)
        mine = (keep >= start) & (keep < start + shard.length)
        keep, labels, sequence = keep[mine] - start, labels[mine], sequence[mine]
    logits = model(**inputs, logits_to_keep=keep, use_cache=False, return_dict=True).logits[0].float()
    # log_softmax gathered at the label, without the [M, vocab] log-probs a full log_softmax would write
    token = logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    sums = torch.zeros(len(batch.lengths), dtype=torch.float32, device=token.device).index_add(0, sequence, token)
    return sums if context is None else context.sum(sums)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor, cfg: DpoConfig,
             bco_shift: Callable[[torch.Tensor], torch.Tensor] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses ``[B]``, chosen rewards ``[B]``, rejected rewards ``[B]``) of B pairs from the ``[2B]`` summed
    completion log-probs (chosen then rejected) of the policy and the reference (zeros for ``reference_free``), as
    TRL's ``DPOTrainer.dpo_loss`` (0.15 to 0.19; ``bco_pair``, ``sft`` and a list of loss types as 0.20 to 0.28's)
    computes each ``loss_type``. IPO compares length-averaged log-probs (``lengths``: the completions' token
    counts), as TRL's ``ipo`` does (every type of a list holding it, as TRL's). ``aot``/``aot_pair`` sort the
    log-ratios over the B pairs, as TRL over its per-device batch: their losses depend on the micro-batch's pairs,
    not one pair alone. ``bco_pair`` shifts the rewards by ``bco_shift`` of the batch's mean reward (the running
    mean, :class:`RunningMean`, that mean taken in; None: a fresh one's, the batch's own mean). ``sft`` is
    :func:`chosen_nll`, the same for every pair. A list of loss types (TRL's combined losses) sums their losses
    weighted by ``cfg.weights``. With ``rpo_alpha`` every pair's loss adds that times :func:`chosen_nll` (RPO). The
    rewards are ``beta`` times the policy's log-ratio to the reference, as TRL's (not, for a list, the weights'
    sum times it, as TRL's combined metrics are).

    ``simpo`` (TRL's ``CPOTrainer.cpo_loss``) and ``orpo`` (``ORPOTrainer.odds_ratio_loss``) read the policy's
    length-averaged log-probs alone (``reference`` is not read; their rewards are ``beta`` times those averages):
    SimPO adds ``cpo_alpha`` times :func:`chosen_nll`, ORPO the NLL itself (:attr:`DpoConfig.nll_weight`). Under
    context or tensor parallelism ``policy`` and ``lengths`` are the whole sequences' sums and counts, so each
    average, and ORPO's log(1 − p) of it, is the sequence's, never a piece's."""
    raw = policy
    if cfg.loss_type in ("simpo", "orpo"):  # TRL's CPO and ORPO trainers hold no reference model
        reference = torch.zeros_like(policy)
    if cfg.length_averaged:  # length-averaged log-probs, as TRL's average_log_prob
        policy, reference = policy / lengths, reference / lengths
    chosen, rejected = (policy - reference).chunk(2)  # each completion's log-ratio to the reference
    logits = chosen - rejected  # (π_c − π_r) − (ref_c − ref_r)
    beta = cfg.beta
    losses = 0
    for kind, weight in zip(cfg.types, cfg.weights, strict=True):
        losses = losses + _type_losses(kind, chosen, rejected, logits, policy, reference, raw, lengths, cfg,
                                       bco_shift) * weight
    if cfg.nll_weight is not None:  # RPO (the paper's v3), CPO-SimPO, ORPO: the chosen completions' NLL beside
        losses = losses + cfg.nll_weight * chosen_nll(raw, lengths)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def _type_losses(kind: str, chosen: torch.Tensor, rejected: torch.Tensor, logits: torch.Tensor, policy: torch.Tensor,
                 reference: torch.Tensor, raw: torch.Tensor, lengths: torch.Tensor, cfg: DpoConfig,
                 bco_shift: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """:func:`dpo_loss`'s ``[B]`` losses of one loss type, from its log-ratios (``chosen``, ``rejected``, their
    difference ``logits``), the log-probs they are of (``policy``, ``reference``; averaged where the loss is) and
    the summed ones (``raw``)."""
    beta, smoothing = cfg.beta, cfg.label_smoothing
    if kind == "sigmoid":  # label smoothing ε: conservative DPO, labels flipped with probability ε
        return -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
    if kind == "robust":  # Robust DPO: unbiased under labels flipped with probability ε
        return (-F.logsigmoid(beta * logits) * (1 - smoothing)
                + F.logsigmoid(-beta * logits) * smoothing) / (1 - 2 * smoothing)
    if kind == "exo_pair":  # EXO, eq. 16: KL of the policy's pair distribution to (1 − ε, ε); TRL's ε 0 is 1e-3
        epsilon = smoothing or 1e-3
        return (torch.sigmoid(beta * logits) * (F.logsigmoid(beta * logits) - math.log(1 - epsilon))
                + torch.sigmoid(-beta * logits) * (F.logsigmoid(-beta * logits) - math.log(epsilon)))
    if kind == "hinge":  # SLiC
        return torch.relu(1 - beta * logits)
    if kind == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if kind == "sppo_hard":  # SPPO with the hard probabilities: 1 for the chosen, 0 for the rejected
        return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    if kind == "nca_pair":
        return -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)
    if kind in ("aot", "aot_pair"):  # AOT: the sorted policy margins against the sorted reference margins
        if kind == "aot":
            policy_chosen, policy_rejected = policy.chunk(2)
            reference_chosen, reference_rejected = reference.chunk(2)
            delta = (torch.sort(policy_chosen - policy_rejected, dim=0).values
                     - torch.sort(reference_chosen - reference_rejected, dim=0).values)
        else:  # unpaired: the chosen and the rejected log-ratios sorted apart
            delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
        return -F.logsigmoid(beta * delta) * (1 - smoothing) - F.logsigmoid(-beta * delta) * smoothing
    if kind == "apo_zero":  # APO, eq. 7: raise the chosen likelihood, lower the rejected one
        return (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
    if kind == "apo_down":  # APO, eq. 8: lower both, the rejected more
        return torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * logits))
    if kind == "discopop":  # DiscoPOP, eq. 5: logistic and exponential losses mixed by the scaled margin
        scaled = beta * logits
        mixing = torch.sigmoid(scaled / cfg.discopop_tau)
        return -F.logsigmoid(scaled) * (1 - mixing) + torch.exp(-scaled) * mixing
    if kind == "bco_pair":  # BCO on pairs: chosen rewards above, rejected below the rewards' running mean δ
        mean = torch.cat([beta * chosen, beta * rejected]).mean().detach()
        delta = (bco_shift or RunningMean().update)(mean).to(chosen.dtype)
        return -F.logsigmoid(beta * chosen - delta) - F.logsigmoid(-(beta * rejected - delta))
    if kind == "sft":  # the chosen completions' NLL (MPO's generation loss), each pair's the batch's
        return chosen_nll(raw, lengths).expand(len(chosen))
    if kind == "simpo":  # SimPO: the averaged margin beyond the target γ, as TRL's CPO computes it
        logits = logits - cfg.simpo_gamma / beta
        return -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
    if kind == "orpo":  # ORPO: λ times the log-sigmoid of the log odds ratio (TRL subtracts beta · log σ)
        return -beta * F.logsigmoid(orpo_log_odds(chosen, rejected))
    raise ValueError(f"dpo.loss_type {kind!r} is not one of DPO's")  # (the config refuses any other)


class RunningMean:
    """The running mean of the rewards that ``bco_pair`` shifts them by: TRL's ``RunningMoments`` (its
    ``trl.trainer.utils``) as its DPOTrainer updates it, once per micro-batch with the batch's mean reward (of its
    2B chosen and rejected rewards), the mean over the ranks when distributed (its ``get_global_statistics``: the
    ranks' means summed by an all-reduce, divided by their count) and a count starting at 1e-24. Its arithmetic:
    each increment computed in float32, added to a float64 mean (TRL's Python float). Only the mean and the count:
    TRL's variance and std are not read by the loss. Part of the data state: a resume goes on with it."""

    def __init__(self):
        self.mean: float | torch.Tensor = 0.0  # a float64 tensor once updated: no host read per micro-batch
        self.count = 1e-24

    def update(self, value: torch.Tensor, group=None, world_size: int = 1) -> torch.Tensor:
        """The mean with ``value`` (this rank's micro-batch's mean reward, a scalar) taken in, over the
        ``world_size`` ranks of ``group`` (None: the world) when distributed; every rank holds the same after."""
        value = value.detach().float()
        if world_size > 1 and is_distributed():
            value = value.clone()
            torch.distributed.all_reduce(value, group=group)
            value = value / world_size
        total = self.count + world_size
        current = self.value(value.device)
        self.mean = current + ((value - current.float()) * world_size / total).double()
        self.count = total
        return self.mean

    def value(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The mean as a float64 scalar on ``device`` (not updated: what an evaluation shifts by)."""
        return torch.as_tensor(self.mean, dtype=torch.float64, device=device)

    def state_dict(self) -> dict[str, float]:
        return {"mean": float(self.mean), "count": float(self.count)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), float(state["count"])


def orpo_log_odds(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds ratio of ``[B]`` length-averaged log-probs: log(p_c / (1 − p_c)) − log(p_r / (1 − p_r)),
    TRL's ``(c − r) − (log1p(−exp(c)) − log1p(−exp(r)))``, its log(1 − p) taken without that form's cancellation
    where p is near 1 (an average near 0, a confident completion)."""
    return (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) of x ≤ 0: log(−expm1(x)) above −ln 2, log1p(−eˣ) below (Mächler's split, each accurate where
    used); each branch reads only its own inputs, so the other's infinities put no NaN in the gradient. x is taken
    as at most −tiny (the dtype's smallest normal): an average of exactly 0 (p = 1: every token's float32 log-prob
    rounds to 0 once the model is sure of a short completion) would give TRL's −inf, a NaN gradient for a chosen
    completion (0 · ∞ through log σ) and an infinite loss for a rejected one; here log(1 − p) ≈ −87 in float32,
    finite, and the clamp passes no gradient to such an average (it moves through the NLL and c − r alone)."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near = x > -math.log(2)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, x))))


def chosen_nll(policy: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The chosen completions' mean token negative log-likelihood over the micro-batch (a scalar): TRL's RPO
    ``nll_loss``, the cross-entropy of every chosen completion token of its batch at once (so a long completion
    weighs more than a short one). ``policy``: the ``[2B]`` summed log-probs, not length-averaged."""
    pairs = len(policy) // 2
    return -policy[:pairs].sum() / lengths[:pairs].sum()


def _metric_sums(chosen: torch.Tensor, rejected: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """The sums over a batch's pairs of :data:`METRICS`, in that order; ``policy``: the ``[2B]`` log-probs the
    loss compared (length-averaged for IPO)."""
    policy_chosen, policy_rejected = policy.detach().chunk(2)
    return torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum(),
                        policy_chosen.sum(), policy_rejected.sum()]).float()


# ----------------------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_reference(model: torch.nn.Module, splits: list[Pairs], *, micro_batch: int, rank: int, world_size: int,
                      device: torch.device, autocast, progress: bool, group=None,
                      context: ContextGroup | None = None) -> list[torch.Tensor]:
    """Each split's ``[N, 2]`` fp32 (chosen, rejected) summed completion log-probs under ``model`` in eval mode.
    Rank ``r`` computes the ``r``-th contiguous share of the pairs of all splits; every rank runs the same number
    of forwards (the last share is padded with repeats), and the shares are all-gathered over ``group`` (None: the
    world), whose ``world_size`` ranks ``rank`` numbers: every rank returns all. Under tensor parallelism ``rank``
    and ``world_size`` are the data-parallel ones: the ranks of a tensor-parallel group run the split model on the
    same share, their forwards' collectives in step, and each gathers over its ``mesh["dp"]``. Under context
    parallelism (``context``: each row split along time across its ranks) likewise: ``group`` links the ranks
    holding the same piece in every data-parallel group."""
    from tqdm.auto import tqdm

    items = [(split, index) for split, pairs in enumerate(splits) for index in range(len(pairs))]
    share = -(-len(items) // world_size)
    mine = items[rank * share:(rank + 1) * share]
    mine += [items[-1]] * (share - len(mine))
    out = torch.zeros(share, 2, dtype=torch.float32, device=device)
    training = model.training
    model.eval()  # the reference without dropout: the policy of a run without dropout equals it at step 0
    try:
        for lo in tqdm(range(0, share, micro_batch), desc="reference log-probs", unit="batch", disable=not progress,
                       dynamic_ncols=True, mininterval=0.5):
            chunk = mine[lo:lo + micro_batch]
            batch = pack([splits[split].parts(index) for split, index in chunk], np.arange(len(chunk))).to(device)
            with autocast:
                logps = completion_logps(model, batch, context)
            out[lo:lo + len(chunk)] = torch.stack(logps.chunk(2), dim=1)
    finally:
        model.train(training)
    if is_distributed():
        gathered = [torch.empty_like(out) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, out, group=group)
        out = torch.cat(gathered)
    out = out[:len(items)].cpu()
    bounds = np.cumsum([0, *(len(pairs) for pairs in splits)])
    return [out[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def pairs_digest(splits: list[Pairs]) -> str:
    """SHA-256 of tokenized pairs, split by split: their count, (prompt, chosen, rejected) lengths and tokens, in
    order (not the dataset rows they came from): what reference log-probs are of. The same pairs read again
    from a rewritten file (a new cache key) hash alike; other pairs under the same path do not."""
    digest = hashlib.sha256()
    chunk = 1 << 22
    for pairs in splits:
        digest.update(np.int64(len(pairs)).tobytes())
        digest.update(np.ascontiguousarray(pairs.lengths, dtype=np.int64).tobytes())
        for lo in range(0, len(pairs.tokens), chunk):  # as int64: the ids, whatever dtype the cache stores
            digest.update(np.asarray(pairs.tokens[lo:lo + chunk], dtype=np.int64).tobytes())
    return digest.hexdigest()


class SavedReference(NamedTuple):
    """``reference_logps.pt``: the pairs' cache key and :func:`pairs_digest`, the train and val ``[N, 2]``."""

    key: str
    pairs: str
    reference: list[torch.Tensor]


def reference_digest(saved: SavedReference) -> str:
    """SHA-256 of the reference file's content (the pairs' cache key and content hash, the log-probs' bytes):
    what a checkpoint names its reference by."""
    digest = hashlib.sha256(saved.key.encode())
    digest.update(saved.pairs.encode())
    for values in saved.reference:
        digest.update(values.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_reference(path: Path, saved: SavedReference) -> None:
    """``path`` written whole or not at all (a crash leaves the previous file), and durably: a resume trusts the
    file by its digest, so its bytes are on disk before the rename, and the rename before the run goes on."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    _write_durable(tmp, {"key": saved.key, "pairs": saved.pairs, "train": saved.reference[0],
                         "val": saved.reference[1]})
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_reference(path: Path) -> SavedReference | None:
    """The reference file at ``path``, or None when it is absent, cut short, damaged or no reference file (the
    caller refuses the resume with a ConfigError naming it)."""
    try:
        with warnings.catch_warnings():  # torch's warning on a damaged file's pickle protocol: it is refused anyway
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # absent, cut short, no weights
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("key"), str) or not isinstance(saved.get("pairs"), str):
        return None
    reference = [saved.get("train"), saved.get("val")]
    if not all(isinstance(values, torch.Tensor) and values.dtype == torch.float32 and values.ndim == 2
               and values.shape[1] == 2 for values in reference):
        return None
    return SavedReference(saved["key"], saved["pairs"], reference)


def policy_overrides(model: ModelConfig, init_from: Path | None, lora_dropout: float = 0.0,
                     objective: str = "DPO") -> dict[str, Any]:
    """The RetNetConfig settings of a DPO policy on top of ``model.init_from``'s: ``{"dropout": 0.0}``, as TRL's
    ``DPOConfig.disable_dropout`` (on by default), unless ``model.dropout`` (or ``model.extra.dropout``) is set
    in the TOML or on the command line, which then wins. The reference log-probs are computed in eval mode: a
    policy trained with dropout is not the reference at step 1 (the loss is not log 2, the rewards are noise).
    ``dropout`` is RetNetConfig's one dropout field (the decoder blocks' residual branches). ``lora.dropout`` is
    the adapters' own input dropout and stays as configured (TRL's ``disable_dropout`` zeroes it too). Logged."""
    explicit = model.dropout if model.dropout is not None else model.extra.get("dropout")
    lora = (f"; lora.dropout {lora_dropout} applies to the adapters as configured (set lora.dropout=0 for none)"
            if lora_dropout else "")
    if explicit is not None:
        logger.info("%s: the policy trains with dropout %s, as model.dropout sets it (the reference log-probs are "
                    "computed without dropout)%s", objective, explicit, lora)
        return {}
    try:
        pretrained = json.loads((Path(init_from) / "config.json").read_text()).get("dropout", 0.0)
    except (OSError, TypeError, ValueError, AttributeError):  # the model's loading refuses such a directory
        pretrained = "?"
    logger.info("%s: dropout off in the policy (model.init_from's %s -> 0; TRL's disable_dropout): at step 1 it "
                "is the reference, computed without dropout; set model.dropout to train with one%s", objective,
                pretrained, lora)
    return {"dropout": 0.0}


# ----------------------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------------------
class PreferenceData:
    """The pairs of a DPO run, their reference log-probs, the loss and its metrics; the trainer's hooks call
    :meth:`start` once the model is built (and a checkpoint loaded), :meth:`loss` per micro-batch, :meth:`step_stats`
    and :meth:`record_step` around the step's all-reduce, :meth:`window_metrics` per log record and
    :meth:`evaluate` for the validation record. The log window of the metrics is part of the data state, so a
    resumed run's records are those of a run never stopped."""

    preference = True
    masked = False  # (chat data's flag: these batches are PairBatch, whose loss is this class's)
    metrics = METRICS  # the names of _pair_loss's metric sums (a subclass's objective logs its own)
    changed = "pairs edited, added or removed"  # what makes _content_digest differ, as check_pairs says it
    rows_called = "pairs"  # what its messages call the rows (KTO's are labelled rows, not pairs)
    model_class = None  # what the trainer builds from model.init_from: None, its RetNetForCausalLM
    _permutation = PackedData._permutation
    block_rows = PackedData.block_rows

    def __init__(self, train: Pairs, val: Pairs, tokenizer, *, key: str, seq_len: int, seed: int, micro_batch: int,
                 global_batch: int, rank: int, world_size: int, dataset: str = ""):
        self.train, self.val, self.tokenizer, self.key, self.seq_len = train, val, tokenizer, key, seq_len
        self.dataset = dataset  # data.dataset, which a refused resume names
        self.seed, self.micro_batch, self.global_batch = seed, micro_batch, global_batch
        self.rank, self.world_size = rank, world_size
        # The process group of the world_size data-parallel ranks, which the reference pass and the evaluation
        # gather and sum over: None, the world; under tensor parallelism mesh["dp"] (start() takes it), so that the T
        # ranks of a group, which run the same pairs, count them once.
        self.group = None
        # Context parallelism: the ranks splitting each micro-batch's row along time (start() takes it), which
        # hold the same pairs; None without it.
        self.context: ContextGroup | None = None
        self.consumed = 0  # global pairs consumed: the data position
        self.hub_fingerprint: str | None = None
        self.step_tokens: int | None = None  # the tokens of the last step's global batch (both sequences of each pair)
        self.step_head_tokens: int | None = None  # of those, the ones whose logits are computed (the MFU's head)
        self._perm_epoch, self._perm = -1, None
        self.dpo: DpoConfig | None = None
        self.reference: dict[str, torch.Tensor] = {}
        self.digest: str | None = None  # of the reference: this run's, or the checkpoint's until start() checks it
        self._step: torch.Tensor | None = None  # this rank's metric sums of the step so far
        self._pairs_sha256: str | None = None  # _content_digest, once computed (:meth:`pairs_sha256`)
        self._saved_pairs: dict[str, Any] | None = None  # a resumed checkpoint's (state_dict's "pairs")
        self._window, self._window_steps = [0.0] * len(self.metrics), 0
        self.running = RunningMean()  # bco_pair's shift: the training rewards' running mean (TRL's RunningMoments)

    def model_overrides(self, model: ModelConfig, init_from: Path | None, lora_dropout: float) -> dict[str, Any]:
        """The RetNetConfig settings of the trained model on top of ``model.init_from``'s: :func:`policy_overrides`."""
        return policy_overrides(model, init_from, lora_dropout)

    def val_summary(self, record: dict[str, float]) -> str:
        """What the evaluation's log line shows beside the loss (without a progress bar)."""
        return (f"rewards/accuracies {record['val_rewards/accuracies']:.3f}, rewards/margins "
                f"{record['val_rewards/margins']:.4f}")

    # -- the reference ----------------------------------------------------------------------------------
    def start(self, dpo: DpoConfig, model: torch.nn.Module, autocast, device: torch.device, *, output_dir: Path,
              checkpoint: Path | None, progress: bool, barrier: Callable[[], None], group=None,
              context: ContextGroup | None = None) -> None:
        """Hold the reference log-probs: computed from ``model`` as it is (a run that starts; rank 0 writes them
        to ``output_dir``), or read back (a resume from ``checkpoint``: from ``output_dir``, else from beside the
        checkpoint's run), refusing a file whose digest is not the one the checkpoint holds. ``group``: the
        data-parallel ranks' process group (:attr:`group`); ``context``: the context-parallel ranks splitting each
        row (:attr:`context`). First refuses pairs without a prompt (:meth:`check_prompted`)."""
        self.check_prompted()
        self.dpo, self.device, self.autocast, self.group, self.context = dpo, device, autocast, group, context
        # TRL logs the NLL term of RPO, CPO-SimPO and ORPO beside the rewards, and ORPO's log odds
        self.metrics = (*METRICS, *(("nll_loss",) if dpo.logs_nll else ()),
                        *(ORPO_METRICS if dpo.loss_type == "orpo" else ()))
        # a fresh window (a resumed one has the checkpoint's, of the same objective: dpo_changes holds it)
        self._window += [0.0] * (len(self.metrics) - len(self._window))
        if not dpo.uses_reference:
            self.check_pairs(checkpoint)  # (else the reference file, which holds their digest, is checked)
            # Every reference log-prob is 0: no pass over the pairs at the start, no file, nothing a resume reads
            # (its checkpoints' "reference" is None). The saving is that pass's time; the reference itself, two
            # floats a pair, was never a memory cost (no second model is held).
            self.reference, self.digest = {}, None
            if dpo.loss_type in ("simpo", "orpo"):
                logger.info("DPO: dpo.loss_type %r reads the policy's length-averaged log-probs alone: no reference "
                            "log-probs are computed", dpo.loss_type)
            else:
                logger.info("DPO: dpo.reference_free: the reference log-probs are 0 (TRL's reference_free), not "
                            "computed")
            return
        self._hold_reference(model, output_dir=output_dir, checkpoint=checkpoint, progress=progress, barrier=barrier)

    def _hold_reference(self, model: torch.nn.Module, *, output_dir: Path, checkpoint: Path | None, progress: bool,
                        barrier: Callable[[], None]) -> None:
        """:attr:`reference`: computed from ``model`` and written (a start), or read back (a resume), as
        :meth:`start` says; the device, autocast and process groups are :meth:`start`'s, already held."""
        path = Path(output_dir) / REFERENCE_FILE
        if checkpoint is None:
            started = time.perf_counter()
            reference = compute_reference(model, [self.train, self.val], micro_batch=self.micro_batch, rank=self.rank,
                                          world_size=self.world_size, device=self.device, autocast=self.autocast,
                                          progress=progress, group=self.group, context=self.context)
            saved = SavedReference(self.key, self.pairs_sha256(), reference)  # (the checkpoints' digest too)
            if _first_rank():
                _write_reference(path, saved)
                logger.info("reference log-probs of %d train + %d validation %s computed in %.1fs, saved to %s",
                            len(self.train), len(self.val), self.rows_called, time.perf_counter() - started, path)
            barrier()
            self.digest = reference_digest(saved)
        else:
            reference = self._resumed_reference(path, Path(checkpoint))
        self.reference = {name: values.to(self.device)
                          for name, values in zip(("train", "val"), reference, strict=True)}

    def _content_digest(self) -> str:
        """What the reference file says its log-probs are of, which a resume compares with the data it reads:
        :func:`pairs_digest` of the splits (a subclass may add what else its loss reads of them)."""
        return pairs_digest([self.train, self.val])

    def pairs_sha256(self) -> str:
        """:meth:`_content_digest` of the splits, computed once: what a checkpoint's data position counts pairs of."""
        if self._pairs_sha256 is None:
            self._pairs_sha256 = self._content_digest()
        return self._pairs_sha256

    def check_pairs(self, checkpoint: Path | None) -> None:
        """A ConfigError when a resume (from ``checkpoint``) reads other pairs than its run was trained on: the same
        path edited in place (data_changes compares only the settings; a cache miss re-reads the file). Its position
        counts pairs of the shuffled train split, so it would go on in other pairs, and ones held out for validation
        could now be trained on. A reference file holds the same digest (a DPO run's is checked against it); this is
        what a run without one (a reward model, a reference-free objective) has. A checkpoint written before it held
        the digest resumes unchecked."""
        if checkpoint is not None:
            check_rows_digest(self._saved_pairs, self.pairs_sha256, dataset=self.dataset, kind="preference",
                              rows=self.rows_called, counts=(len(self.train), len(self.val)), changed=self.changed)

    def check_prompted(self) -> None:
        """A ConfigError naming the dataset and its rows when pairs have no prompt (prompt-less rows whose chosen
        and rejected share no beginning, :func:`implicit_pair`). DPO's log-probs are of the completion tokens
        given the prompt: without one nothing predicts the first completion token (TRL's DPOTrainer takes such a
        row's empty extracted prompt and leaves that token out of the log-probs without a word). A reward model
        (:class:`~retnet.train.reward.RewardData`, which starts without this) scores them whole, as TRL's."""
        rows = sorted(int(row) for pairs in (self.train, self.val)
                      for row in np.asarray(pairs.rows)[np.asarray(pairs.lengths)[:, 0] == 0])
        if rows:
            shown = ", ".join(map(str, rows[:10])) + (f" (and {len(rows) - 10} more)" if len(rows) > 10 else "")
            raise ConfigError(
                f"data.format 'preference': 'chosen' and 'rejected' of {self.dataset!r}, row(s) {shown} have no "
                f"common beginning: without a 'prompt' column DPO's prompt is the part the two share (TRL's implicit "
                f"prompt), and these share none, so nothing would predict their first completion token; give a "
                f"'prompt' column, or remove the rows (a reward model, reward.enabled=true, scores such rows whole, "
                f"as TRL's RewardTrainer)")

    def _resumed_reference(self, path: Path, checkpoint: Path) -> list[torch.Tensor]:
        beside = checkpoint.resolve().parent.parent / REFERENCE_FILE  # <its run>/checkpoints/step_N
        for candidate in dict.fromkeys([path, beside]):
            read = _read_reference(candidate)
            if read is not None and reference_digest(read) == self.digest:
                # By content, not the cache key: that changes with the files' mtimes, and the same path may hold
                # other pairs now (of the same count, or not).
                now = self.pairs_sha256()
                if read.pairs != now:
                    counts = [len(values) for values in read.reference]
                    raise ConfigError(
                        f"data.dataset {self.dataset!r}: the {self.rows_called} changed since the reference "
                        f"log-probs were computed: {str(candidate)!r} holds those of {counts[0]} train + "
                        f"{counts[1]} validation {self.rows_called} (sha256 {read.pairs[:16]}…), the data now gives "
                        f"{len(self.train)} + {len(self.val)} other ones (sha256 {now[:16]}…); the resumed run would "
                        f"compare its policy with the reference of other {self.rows_called}. Restore the data, or "
                        f"start a new run in another train.output_dir")
                if candidate != path and _first_rank():  # for this output_dir's own later resumes
                    _write_reference(path, read)
                logger.info("resuming with the reference log-probs of the run's start (%s)", candidate)
                return read.reference
        raise ConfigError(
            f"train.output_dir {str(path.parent)!r}: {REFERENCE_FILE}, the reference log-probs checkpoint "
            f"{str(checkpoint)!r} was trained against (sha256 {str(self.digest)[:16]}…), is missing, unreadable or "
            f"holds others (looked in {str(path)!r} and {str(beside)!r}): a resume does not recompute them from the "
            f"resumed weights, which are no longer the reference model. Restore the file, or start a new run in "
            f"another train.output_dir")

    # -- training ---------------------------------------------------------------------------------------
    def micro_batches(self, accum: int) -> list[PairBatch]:
        """This rank's ``accum`` micro-batches of ``micro_batch`` pairs for the next step."""
        ids = self.block_rows(self.consumed, self.global_batch)
        self.consumed += self.global_batch
        self.step_tokens = self.train.sequence_tokens(ids)
        self.step_head_tokens = self.train.completion_tokens(ids)
        out = []
        for m in range(accum):
            lo = (m * self.world_size + self.rank) * self.micro_batch
            out.append(self._batch(self.train, ids[lo:lo + self.micro_batch]))
        return out

    def _batch(self, pairs: Pairs, ids: np.ndarray) -> PairBatch:
        """The micro-batch of ``pairs``' rows ``ids`` (a subclass may pack other sequences of them)."""
        return pairs.batch(ids)

    def _pair_loss(self, model: torch.nn.Module, batch: PairBatch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the pairs' losses ``[B]``, their metric sums)."""
        policy = completion_logps(model, batch, self.context)
        if not self.dpo.uses_reference:
            reference = torch.zeros_like(policy)
        else:
            pairs = self.reference[split][batch.pairs]
            reference = torch.cat([pairs[:, 0], pairs[:, 1]])
        # bco_pair's running mean takes in the training batches' rewards: an evaluation reads it as it stands, and
        # changes no later step (TRL's evaluation updates it too)
        shift = (lambda mean: self.running.update(mean, self.group, self.world_size)) if split == "train" else \
            (lambda mean: self.running.value(mean.device))
        losses, chosen, rejected = dpo_loss(policy, reference, batch.lengths, self.dpo, shift)
        nll = chosen_nll(policy.detach(), batch.lengths) if self.dpo.logs_nll else None
        if self.dpo.length_averaged:  # TRL logs the length-averaged log-probs they compare
            policy = policy / batch.lengths
        sums = _metric_sums(chosen, rejected, policy)
        if nll is not None:  # the micro-batch's NLL once per pair: the window's mean is over micro-batches, as TRL's
            sums = torch.cat([sums, (nll * len(batch.pairs)).float()[None]])
        if self.dpo.loss_type == "orpo":  # TRL's log_odds_ratio (the mean log σ of the log odds) and log_odds_chosen
            log_odds = orpo_log_odds(*policy.detach().chunk(2))
            sums = torch.cat([sums, torch.stack([F.logsigmoid(log_odds).sum(), log_odds.sum()]).float()])
        return losses, sums

    def loss(self, model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
        """The micro-batch's mean DPO loss (its metrics are summed for :meth:`step_stats`). Every micro-batch has
        ``micro_batch`` pairs: divided by the accumulation count and averaged over the ranks (as DDP/FSDP average
        the gradients), the mean over the global batch. Under context parallelism every rank of a group holds the
        pairs' whole losses, and the backward of the sum over their pieces adds up the ranks' gradients: each
        rank's loss is its share of the mean (1 / C), as a piece's loss of text is its share of the row's."""
        losses, sums = self._pair_loss(model, batch, "train")
        self._step = sums if self._step is None else self._step + sums
        return losses.mean() if self.context is None else losses.mean() / self.context.size

    def step_stats(self) -> torch.Tensor:
        """This rank's metric sums of the step (to be summed over the ranks with the loss), and a fresh count."""
        sums, self._step = self._step, None
        return sums

    def record_step(self, sums: torch.Tensor) -> None:
        """The global batch's metric sums (every rank's): their means go into the log window."""
        self._add_to_window(sums / self.global_batch)

    def _add_to_window(self, values: torch.Tensor) -> None:
        for index, value in enumerate(values.tolist()):
            self._window[index] += value
        self._window_steps += 1

    def window_metrics(self) -> dict[str, float]:
        """The metrics over the steps since the last record (:meth:`_window_record`), and a fresh window."""
        if not self._window_steps:
            return {}
        metrics = self._window_record()
        self._window, self._window_steps = [0.0] * len(self.metrics), 0
        return metrics

    def _window_record(self) -> dict[str, float]:
        """The metrics' means over the window's steps (TRL's names)."""
        return {name: total / self._window_steps for name, total in zip(self.metrics, self._window, strict=True)}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, max_pairs: int) -> dict[str, float]:
        """``val_loss`` and ``val_<metric>`` means over ``max_pairs`` validation pairs (evenly spaced over the split,
        rounded down to a multiple of the world size, so every rank runs the same number of forwards; the same set
        for any world size), ``model`` in the mode the caller set. The sums are taken over :attr:`group`: under tensor
        or context parallelism a group's ranks score the same pairs, counted once."""
        total = min(max_pairs, len(self.val))
        total = max(total - total % self.world_size, self.world_size)
        chosen = np.linspace(0, len(self.val) - 1, total).round().astype(np.int64)
        mine = chosen[self.rank::self.world_size]
        sums = torch.zeros(1 + len(self.metrics), device=self.device)
        for lo in range(0, len(mine), self.micro_batch):
            batch = self._batch(self.val, mine[lo:lo + self.micro_batch]).to(self.device)
            with self.autocast:
                losses, metric_sums = self._pair_loss(model, batch, "val")
            sums += torch.cat([losses.sum().float()[None], metric_sums])
        if is_distributed():
            torch.distributed.all_reduce(sums, group=self.group)
        return self._val_record(sums, total)

    def _val_record(self, sums: torch.Tensor, total: int) -> dict[str, float]:
        """:meth:`evaluate`'s record of the summed losses and metric sums of its ``total`` pairs."""
        means = (sums / total).tolist()
        return {"val_loss": means[0],
                **{f"val_{name}": value for name, value in zip(self.metrics, means[1:], strict=True)}}

    # -- position ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"kind": "preference", "consumed": self.consumed, "reference": self.digest,
                 "window": list(self._window), "window_steps": self._window_steps,
                 "pairs": {"sha256": self.pairs_sha256(), "train": len(self.train), "val": len(self.val)}}
        if self.dpo is not None and "bco_pair" in self.dpo.types:  # its shift: a resume goes on from it
            state["running"] = self.running.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "preference":
            raise ValueError(f"data state of kind {state.get('kind')!r} cannot resume a preference run")
        self.consumed, self.digest = int(state["consumed"]), state["reference"]
        self._window, self._window_steps = [float(v) for v in state["window"]], int(state["window_steps"])
        self._saved_pairs = state.get("pairs")  # (start() compares it with the pairs read now)
        if "running" in state:
            self.running.load_state_dict(state["running"])


def check_rows_digest(saved: dict[str, Any] | None, digest: Callable[[], str], *, dataset: str, kind: str, rows: str,
                      counts: tuple[int, int], changed: str) -> None:
    """A ConfigError when a resume reads other ``rows`` (pairs, prompts) than its checkpoint's run was trained on:
    ``saved`` is the checkpoint's record (``sha256``, ``train``, ``val``; None: written before ``kind`` checkpoints
    held it, resumed unchecked), ``digest`` computes the data's now, ``counts`` its (train, validation) sizes and
    ``changed`` says what makes the digest differ. Its position counts rows of the shuffled train split: it would go
    on in other rows, and rows held out for validation could now be trained on."""
    if saved is None:
        logger.info("the checkpoint was written before %s checkpoints held a digest of their %s: the %s of %s are not "
                    "compared with those it was trained on", kind, rows, rows, dataset)
        return
    now = digest()
    if saved["sha256"] != now:
        raise ConfigError(
            f"data.dataset {dataset!r}: the {rows} changed since the checkpoint was written: it was trained on "
            f"{saved['train']} train + {saved['val']} validation {rows} (sha256 {saved['sha256'][:16]}…), the data "
            f"now gives {counts[0]} + {counts[1]} other ones (sha256 {now[:16]}…): {changed}, or the same rows "
            f"encoded otherwise (a standard row's prompt now starts with the BOS its tokenizer adds, as SFT's and "
            f"/v1/completions' do). Its data position would point into other {rows}, and {rows} held out for "
            f"validation could now be trained on. Restore the data, or start a new run in another train.output_dir")


def _first_rank() -> bool:
    """This process is the world's rank 0 (or alone): the one that writes the run's files. (The data's ``rank`` is
    the data-parallel one, which every rank of a tensor-parallel group shares.)"""
    return not is_distributed() or torch.distributed.get_rank() == 0


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------
def prompt_tokens_key(tokenizer, key: str) -> str:
    """``key``, the token cache's, for a tokenizer whose post-processor adds tokens to a text (a BOS), which a
    standard row's prompt now carries (:meth:`PairEncoder.encode_texts`): a cache of before holds it without them.
    Others' keys stay."""
    backend = tokenizer.backend_tokenizer
    if backend.encode("a", add_special_tokens=True).ids == backend.encode("a", add_special_tokens=False).ids:
        return key
    return _hash(key, {"prompt_special_tokens": 1})


def open_rows(cfg: DataConfig, kind: str, fields: tuple[str, ...], *, local_rank: int, tokenizer_dir: Path | None,
              barrier: Callable[[], None],
              hub_fingerprint: str | None) -> tuple[Path, list[Path] | None, Any, str | None, Any]:
    """What :func:`build_preference_data` and :func:`~retnet.train.kto.build_kto_data` start from, for
    ``data.format = kind`` rows of the ``fields`` columns: (the cache directory, the local files or None, the hub
    dataset loaded or None, its fingerprint or None, the tokenizer). Local rank 0 clears abandoned temp directories
    first; text and CSV files are refused, and so is a hub dataset changed since ``hub_fingerprint`` (a resume's)."""
    cache_dir = data_cache_dir(cfg)
    if local_rank == 0:  # a tokenization killed mid-write (SIGKILL, a lost node) leaves its temp directory
        _remove_abandoned_temp_dirs(cache_dir)
    files = local_files(cfg.dataset)
    if files is not None and not saved_dataset_dir(files[0]) and _kind(files[0]) in ("text", "csv"):
        raise ConfigError(f"data.dataset {cfg.dataset!r} is {_kind(files[0])} files; data.format {kind!r} reads "
                          f"the {list(fields)} columns of JSON/JSONL/Parquet rows, a save_to_disk directory or a "
                          f"hub dataset")
    loaded, fingerprint = None, None
    if files is None:
        loaded, fingerprint = load_hub(cfg, cache_dir, local_rank, barrier)
        if hub_fingerprint is not None and fingerprint != hub_fingerprint:
            raise _hub_changed(cfg)
    source = tokenizer_dir or (Path(cfg.tokenizer).expanduser() if cfg.tokenizer else None)
    if source is None:  # the config refuses it first (model.init_from is required)
        raise ConfigError(f"data.format {kind!r} needs the tokenizer of the model it tunes: set model.init_from")
    return cache_dir, files, loaded, fingerprint, load_tokenizer(source)


def build_preference_data(cfg: DataConfig, *, seed: int, micro_batch: int, global_batch: int, rank: int,
                          local_rank: int, world_size: int, tokenizer_dir: Path | None, barrier: Callable[[], None],
                          hub_fingerprint: str | None = None) -> PreferenceData:
    """:func:`~retnet.train.data.build_data` of ``data.format = "preference"``: the rows read through data.py's
    loaders, a held-out ``val_fraction`` of them, tokenized by local rank 0 into a cache keyed by the data, the
    tokenizer (``tokenizer_dir``: the run's, ``model.init_from``'s), its template, ``seq_len`` and
    ``max_prompt_length``; the other ranks wait at ``barrier`` and read it."""
    cache_dir, files, loaded, fingerprint, tokenizer = open_rows(
        cfg, "preference", FIELDS, local_rank=local_rank, tokenizer_dir=tokenizer_dir, barrier=barrier,
        hub_fingerprint=hub_fingerprint)
    key = prompt_tokens_key(tokenizer, _hash(PAIRS_VERSION, data_fingerprint(cfg, files, fingerprint),
                                             tokenizer_fingerprint(tokenizer), chat_template_identity(tokenizer),
                                             cfg.seq_len, cfg.max_prompt_length))
    cache = cache_dir / f"preferences-{key}"
    if local_rank == 0 and not (cache / "meta.json").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        logger.info("data: reading %s", cfg.dataset)
        train, val = split_documents(load_pairs(cfg, files, cache_dir, loaded), cfg.val_fraction,
                                     dataset=cfg.dataset, max_documents=cfg.max_documents)
        logger.info("data: tokenizing %d + %d preference pairs", len(train), len(val))
        encoder = PairEncoder(tokenizer, cfg)

        def write(tmp: Path) -> None:
            for name, split in (("train", train), ("val", val)):
                encoder.encode(split).save(tmp, name)
            (tmp / "meta.json").write_text(f'{{"pairs": [{len(train)}, {len(val)}]}}')  # last: marks it complete

        _atomic_dir(cache, write)
    barrier()
    data = PreferenceData(Pairs.load(cache, "train"), Pairs.load(cache, "val"), tokenizer, key=key,
                          seq_len=cfg.seq_len, seed=seed, micro_batch=micro_batch, global_batch=global_batch,
                          rank=rank, world_size=world_size, dataset=cfg.dataset)
    logger.info("data: %d train, %d validation preference pairs (cache %s)", len(data.train), len(data.val), cache)
    data.hub_fingerprint = fingerprint
    return data


__all__ = ["FIELDS", "MARGIN", "METRICS", "ORPO_METRICS", "REFERENCE_FILE", "PairBatch", "PairEncoder", "Pairs",
           "PreferenceData", "RunningMean", "SavedReference", "build_preference_data", "check_margin", "check_pair",
           "chosen_nll", "completion_logps", "compute_reference", "dpo_loss", "extract_prompt", "field_problem",
           "implicit_pair", "load_pairs", "open_rows", "orpo_log_odds", "pack", "pairs_digest", "policy_overrides",
           "prompt_tokens_key", "reference_digest"]
