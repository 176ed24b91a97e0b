"""The training configuration: a small dataclass tree, read from TOML and overridden from the command line.

    config = load_config("tiny", ["--optim.lr=3e-4", "--train.output_dir", "runs/x"])

``name_or_path`` is a preset shipped in ``retnet/train/configs/<name>.toml`` (``tiny``, ``small``,
``retnet-1.3b`` ...) or a path to a TOML file with the tables ``[model]``, ``[data]``, ``[optim]``,
``[train]``, ``[checkpoint]``, ``[logging]`` (and ``[lora]``, ``[dpo]``, ``[kto]``, ``[reward]``, ``[grpo]``, ``[distill]``). Overrides are ``--section.key=value``
(or ``--section.key value``), coerced to the field's type; ``--model.extra.KEY=VALUE`` sets any other
``RetNetConfig`` field (VALUE read as a TOML value). Unknown keys and values of the wrong type are refused with the key's name.
"""

from __future__ import annotations

import ast
import codecs
import copy
import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import sys
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

from retnet.train.config_base import ConfigError, _positive, _refuse, _Section, launch_env_int
from retnet.train.config_tuning import (
    LORA_TARGETS,
    DistillConfig,
    DpoConfig,
    GrpoConfig,
    KtoConfig,
    LoraConfig,
    RewardConfig,
    _check_distill,
    _check_dpo,
    _check_grpo,
    _check_kto,
    _check_reward,
    distill_changes,
    dpo_changes,
    grpo_changes,
    kto_changes,
    lora_changes,
    reward_changes,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport (same API)
    import tomli as tomllib

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "muon")
PARALLELISMS = ("ddp", "fsdp")
PRECISIONS = ("bf16", "fp32")
CHECKPOINT_LAYOUTS = ("auto", "full", "sharded")
DATA_FORMATS = ("text", "chat", "preference", "unpaired", "prompts")
# What a data.mixture source may set for itself; every other data setting is the [data] section's, for each source.
MIXTURE_SOURCE_KEYS = ("dataset", "weight", "name", "split", "text_field", "messages_field")
# A source's label names its metrics (val_loss.<label>) in metrics.jsonl, TensorBoard and W&B.
_MIXTURE_LABEL = re.compile(r"[A-Za-z0-9_.-]+")
_ANY_VOCAB_SIZE = 2**31 - 1  # a stand-in at load, large enough for any token id a tokenizer may hold



# What another launcher's resume setting says, or a boolean: not checkpoint paths (unless such a directory exists).
_RESUME_WORDS = frozenset({"auto", "none", "null", "true", "false", "yes", "no", "on", "off", "1", "0", "latest",
                           "last"})

# The RetNetConfig fields [model] sets itself (model.extra sets the others; vocab_size is the BPE's, refused apart).
_OWN_MODEL_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "chunk_size",
                     "hidden_act", "dropout")

# What shapes the weights: a model fine-tuned from a pretrained one (model.init_from) keeps its values.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass(kw_only=True, slots=True)
class ModelConfig(_Section):
    """The RetNet to train: a preset of ``retnet.model.PRESETS`` plus overrides (None keeps the preset's).

    ``vocab_size``: without ``data.tokenizer``, the size of the BPE trained (default: the preset's vocab_size),
    whose own size (fewer on a small corpus) the model's vocabulary then is; with it, the model's embedding rows,
    at least the tokenizer's size (unset: that size). A larger one pads the embedding as nanoGPT pads GPT-2's
    50257 to 50304: rows the data never produces, for a size that runs faster. A resume keeps its checkpoint's.

    ``init_from``: fine-tuning. A ``save_pretrained`` directory (another run's ``export``) whose architecture,
    weights and tokenizer the run starts from, in place of the preset and a random init; the settings that
    would change its weights' shapes cannot be set with it, the others (``dropout``, ``chunk_size``,
    ``extra``) apply on top of its config. The optimizer and schedule start afresh; a resume continues from
    its checkpoints as any run does.
    """

    preset: str = "tiny"
    init_from: str | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    chunk_size: int | None = None
    hidden_act: str | list | None = None  # one name, or a list of one per layer (as RetNetConfig takes it)
    dropout: float | None = None
    extra: dict = field(default_factory=dict)  # any other RetNetConfig field, e.g. {use_xpos = true}

    def __post_init__(self) -> None:
        from retnet.model import PRESETS, RetNetConfig

        if self.preset not in PRESETS:
            _refuse("model.preset", f"must be one of {sorted(PRESETS)}", self.preset)
        if self.init_from == "":  # how a TOML file (which has no null) leaves it out
            self.init_from = None
        if self.init_from is not None:
            for name in _SHAPE_FIELDS:
                if getattr(self, name) is not None:
                    raise ConfigError(f"model.{name} cannot be set with model.init_from {self.init_from!r}: the "
                                      f"architecture is the pretrained model's (its config.json); got "
                                      f"{getattr(self, name)!r}")
        # RetNetConfig keeps unknown keyword arguments as attributes, so a misspelt field would be ignored
        known = set(RetNetConfig().to_dict())
        for key in self.extra:
            if key not in known:
                raise ConfigError(f"unknown config key model.extra.{key}: not a RetNetConfig field"
                                  f"{_did_you_mean(key, sorted(known), 'model.extra.{}')}")
            try:  # a TOML date or time: the run's config (and checkpoints) are JSON
                json.dumps(self.extra[key])
            except (TypeError, ValueError):
                _refuse(f"model.extra.{key}", "must be a JSON value (a TOML date or time is not)", self.extra[key])
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "chunk_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                _refuse(f"model.{name}", "must be > 0", value)
        for key, instead in (("vocab_size", "model.vocab_size (the size of the BPE trained without data.tokenizer)"),
                             ("eos_token_id", "nothing: the tokenizer sets it"),
                             ("pad_token_id", "nothing: the tokenizer sets it")):
            if key in self.extra:  # the trainer passes these itself: a second value is a TypeError there
                raise ConfigError(f"model.extra.{key} cannot be set; use {instead}; got {self.extra[key]!r}")
        for key in [name for name in _OWN_MODEL_FIELDS if name in self.extra]:
            # Set twice, the extra value won without a word; a shape beside init_from passed the refusal above and
            # was refused only once the pretrained weights did not load, after the data had been prepared
            if getattr(self, key) is not None or (self.init_from is not None and key in _SHAPE_FIELDS):
                raise ConfigError(f"model.extra.{key} cannot be set; use model.{key}; got {self.extra[key]!r}"
                                  + (f" (and model.{key} {getattr(self, key)!r})" if getattr(self, key) is not None
                                     else f" with model.init_from {self.init_from!r}"))
        # Checked here, not only when the trainer builds the model: that comes after the dataset has been read and
        # tokenized. The vocabulary is the tokenizer's, known only then; token ids are checked against it there.
        try:
            RetNetConfig.from_preset(self.preset, **self.overrides(), vocab_size=_ANY_VOCAB_SIZE)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model: {error}") from None

    def overrides(self) -> dict[str, Any]:
        """The RetNetConfig keyword arguments this section sets on top of the preset."""
        fixed = {name: getattr(self, name) for name in _OWN_MODEL_FIELDS}
        return {**{k: v for k, v in fixed.items() if v is not None}, **self.extra}


@dataclass(kw_only=True, slots=True)
class DataConfig(_Section):
    """Where the text comes from and how it becomes token blocks.

    ``dataset``: ``"stdlib"`` (the running interpreter's standard-library ``*.py`` sources: needs no
    download), a local file, directory or glob of .txt/.md/.py/.rst/.json/.jsonl/.parquet/.csv files, a directory
    written by ``datasets``' ``save_to_disk`` (``split`` picks from a DatasetDict), or a hub dataset name
    (with ``name`` and ``split``). ``tokenizer``: a tokenizer directory to load; when empty a
    byte-level BPE of ``model.vocab_size`` tokens is trained on up to ``tokenizer_train_chars`` characters
    of the training split.

    ``format``: ``"text"`` (each row's ``text_field`` is a document) or ``"chat"`` (supervised fine-tuning:
    each row's ``messages_field`` is a conversation, a list of ``{"role", "content"}`` messages, rendered with
    the tokenizer's chat template; with ``assistant_only_loss`` only the assistant messages' tokens are
    targets, see ``retnet.train.chat``; a set without that column but with TRL's ``prompt`` and ``completion`` ones
    is read as prompt-completion rows, two strings or two lists of messages, and ``assistant_only_loss``, TRL's
    ``completion_only_loss`` there, makes the completion's tokens the targets) or ``"preference"`` (DPO on TRL's ``prompt``/``chosen``/``rejected`` rows,
    ``retnet.train.preference``; ``max_prompt_length`` > 0 cuts longer prompts to their last tokens, 0 keeps them
    whole and refuses one that leaves no room for a completion in ``seq_len``) or ``"unpaired"`` (KTO on TRL's
    unpaired ``prompt``/``completion``/``label`` rows, ``retnet.train.kto``; ``max_prompt_length`` as for
    preference pairs) or ``"prompts"`` (GRPO, online RL
    from rewards, on rows with a ``prompt`` column, ``retnet.train.grpo``; ``max_prompt_length`` > 0 cuts longer
    prompts to their last tokens; ``seq_len`` is not read: a sequence is its prompt and at most
    ``grpo.max_completion_length`` sampled tokens).

    ``mixture``: several datasets blended by weight (``retnet.train.mixture``), label -> ``{dataset = "...",
    weight = 0.3}`` with optional ``name``, ``split``, ``text_field``, ``messages_field`` of its own (else the
    section's), or a bare weight, meaning ``{dataset = <label>, weight = <weight>}``. Every other setting
    applies to each source. ``dataset`` is then left at its default.
    """

    dataset: str = "stdlib"
    name: str | None = None
    split: str = "train"
    format: str = "text"
    text_field: str = "text"
    messages_field: str = "messages"
    assistant_only_loss: bool = True
    streaming: bool = False
    max_documents: int = 0  # 0 = all
    tokenizer: str | None = None
    tokenizer_train_chars: int = 5_000_000
    seq_len: int = 256
    max_prompt_length: int = 0  # data.format "preference", "unpaired" and "prompts": 0 = prompts are not cut
    # Reset the retention state (and rotary positions) at every document start inside a packed block (its EOS, or
    # the BOS a tokenizer opens documents with), through the kernels' varlen path, so no document is conditioned on
    # the one before it.
    document_boundaries: bool = True
    val_fraction: float = 0.02  # of the documents (non-streaming); held out before the tokenizer is trained
    val_documents: int = 200  # streaming: the first N documents are the validation split
    cache_dir: str = ""  # "" = $XDG_CACHE_HOME/retnet/train (or ~/.cache/retnet/train)
    mixture: dict = field(default_factory=dict)  # label -> {dataset, weight, ...} or a bare weight

    def __post_init__(self) -> None:
        if self.mixture:
            self.mixture = self._checked_mixture()
        if not self.dataset:
            _refuse("data.dataset", "must name 'stdlib', a local path or a hub dataset", self.dataset)
        if self.name == "":  # how a TOML file (which has no null) leaves it out
            self.name = None
        # Refused here, not once the dataset has been loaded: as a column or split it has not
        for name, what in (("text_field", "the column of the documents"), ("split", "a split (default 'train')")):
            if not getattr(self, name):
                _refuse(f"data.{name}", f"must name {what}", getattr(self, name))
        self._check_stdlib_selection()
        _positive("data", self, "seq_len", "tokenizer_train_chars")
        _positive("data", self, "max_documents", "val_documents", allow_zero=True)
        if self.seq_len < 2:
            _refuse("data.seq_len", "must be >= 2 (a block predicts its own next tokens)", self.seq_len)
        if not 0.0 < self.val_fraction < 0.5:
            _refuse("data.val_fraction", "must be in (0, 0.5)", self.val_fraction)
        if self.streaming and self.val_documents == 0:
            _refuse("data.val_documents", "must be > 0 with data.streaming (its first documents are the validation "
                    "split)", self.val_documents)
        if self.format not in DATA_FORMATS:
            _refuse("data.format", f"must be one of {DATA_FORMATS}", self.format)
        if self.format == "chat":
            if not self.messages_field:
                _refuse("data.messages_field", "must name the column of the conversations", self.messages_field)
            for key, dataset in self._datasets():
                if dataset == "stdlib":
                    _refuse(key, "must hold conversations with data.format 'chat' (rows of JSON/JSONL/Parquet "
                            "files, a save_to_disk directory or a hub dataset); 'stdlib' is plain text", dataset)
        if self.format in ("preference", "unpaired"):
            self._check_preference()
        elif self.format == "prompts":
            self._check_prompts()
        elif self.max_prompt_length:  # most likely a forgotten data.format: that run would not read pairs
            _refuse("data.max_prompt_length", f"is set but data.format is {self.format!r}; it cuts the prompts of "
                    f"data.format 'preference', 'unpaired' and 'prompts'", self.max_prompt_length)
        if self.streaming and self.mixture:
            for key, dataset in self._datasets():
                if dataset == "stdlib":  # build_data's refusal would name data.streaming, not the source
                    _refuse(key, "cannot be 'stdlib' with data.streaming (the stdlib corpus is not streamed)", dataset)

    def _check_stdlib_selection(self) -> None:
        """ConfigError for a hub split or configuration of the stdlib corpus, which has neither: it was read whole,
        whatever they said (local files refuse them when read)."""
        for label, source in self.mixture.items() if self.mixture else [(None, {"dataset": self.dataset})]:
            if source["dataset"] != "stdlib":
                continue
            key = "data.dataset" if label is None else f"data.mixture.{label}.dataset"
            for name, unset in (("split", "train"), ("name", None)):
                value = source.get(name, getattr(self, name))
                if value != unset:
                    where = f"data.mixture.{label}.{name}" if name in source else f"data.{name}"
                    _refuse(where, f"selects from a hub dataset or a save_to_disk DatasetDict; {key} 'stdlib' (the "
                            f"standard library's sources) has no {'splits' if name == 'split' else 'configurations'} "
                            f"(its validation documents are held out by data.val_fraction)", value)

    def _check_preference(self) -> None:
        """ConfigError for what preference data (pairs, or KTO's unpaired rows) cannot be: a row is read whole and
        its reference log-probs are computed over the whole (cached) set before the first step."""
        fmt = repr(self.format)
        paired = self.format == "preference"
        rows = "preference pairs" if paired else "unpaired prompt/completion/label rows"
        if self.mixture:
            _refuse("data.mixture", f"cannot be used with data.format {fmt} (the reference log-probs are "
                    f"precomputed over one dataset); merge the {'pairs' if paired else 'rows'} into one dataset",
                    sorted(self.mixture))
        if self.streaming:
            _refuse("data.streaming", f"cannot be used with data.format {fmt} (the reference log-probs of "
                    f"every {'pair' if paired else 'row'} are precomputed before the first step)", self.streaming)
        if self.dataset == "stdlib":
            _refuse("data.dataset", f"must hold {rows} with data.format {fmt} (rows of JSON/JSONL/Parquet files, "
                    f"a save_to_disk directory or a hub dataset); 'stdlib' is plain text", self.dataset)
        _positive("data", self, "max_prompt_length", allow_zero=True)
        if self.max_prompt_length >= self.seq_len:
            _refuse("data.max_prompt_length", f"must be < data.seq_len ({self.seq_len}): a completion needs room "
                    f"after the prompt", self.max_prompt_length)

    def _check_prompts(self) -> None:
        """ConfigError for what GRPO's prompts cannot be: the rows are read whole (every column goes to the reward
        functions) from one dataset, and sampled in a seeded order."""
        for name, why in (("mixture", "the prompts are read from one dataset; merge them into one"),
                          ("streaming", "the prompts are read whole, in a seeded per-epoch order")):
            if getattr(self, name):
                _refuse(f"data.{name}", f"cannot be used with data.format 'prompts' ({why})", getattr(self, name))
        if self.dataset == "stdlib":
            _refuse("data.dataset", "must hold prompts with data.format 'prompts' (rows with a 'prompt' column: "
                    "JSON/JSONL/Parquet files, a save_to_disk directory or a hub dataset); 'stdlib' is plain text",
                    self.dataset)
        _positive("data", self, "max_prompt_length", allow_zero=True)

    def _datasets(self) -> list[tuple[str, str]]:
        """(the setting's name, the dataset) of each dataset read: ``data.dataset`` or each mixture source's."""
        if not self.mixture:
            return [("data.dataset", self.dataset)]
        return [(f"data.mixture.{label}.dataset", source["dataset"]) for label, source in self.mixture.items()]

    def _checked_mixture(self) -> dict[str, dict[str, Any]]:
        """``mixture`` with every source as a table (a bare weight as ``{dataset = label, weight = ...}``),
        or a ConfigError naming the source's key."""
        if not isinstance(self.mixture, dict):
            _refuse("data.mixture", "must be a table of sources, label -> {dataset = \"...\", weight = ...} or a "
                    "bare weight", self.mixture)
        default = next(f.default for f in dataclasses.fields(DataConfig) if f.name == "dataset")
        if isinstance(self.dataset, str) and not self.dataset.strip():
            # an empty data.dataset is refused without a mixture too, never read as unset
            _refuse("data.dataset", "is empty; with data.mixture leave it out (each source names its own dataset: "
                    "data.mixture.<label>.dataset)", self.dataset)
        if self.dataset != default:
            raise ConfigError(f"data.dataset and data.mixture cannot both be set: a mixture names each source's "
                              f"dataset (data.mixture.<label>.dataset); got data.dataset {self.dataset!r} and "
                              f"data.mixture with {sorted(self.mixture)}")
        tables = {}
        for label, source in self.mixture.items():
            key = f"data.mixture.{label}"
            if not isinstance(label, str) or not _MIXTURE_LABEL.fullmatch(label):
                _refuse(key, "must be labelled with letters, digits, '_', '-' and '.' only (the label names the "
                        "source's metrics, val_loss.<label>)", label)
            owner, _, part = label.rpartition(".")
            # --data.mixture.code.weight=0.5 arrives as a source labelled "code.weight" (an override sets one key of
            # the table), not as code's weight: beside a source "code", or, with no such source, as a bare weight
            # (a label with no table) naming no local file: "code.weight" would be read as a hub dataset of that
            # name, and --data.mixture.code.dataset=DIR was refused as a weight that is no number (DIR). A label
            # naming a local file ("notes.split" ...) stays a bare weight.
            dotted_key = bool(owner) and part in MIXTURE_SOURCE_KEYS and (
                owner in self.mixture or (not isinstance(source, dict) and not Path(label).exists()))
            if dotted_key:
                _refuse(key, f"looks like the {part!r} of source {owner!r}; set that source whole: "
                        f"--data.mixture.{owner}='{{dataset=\"...\", weight=...}}'", source)
            if not isinstance(source, dict):
                source = {"dataset": label, "weight": source}
            unknown = sorted(set(source) - set(MIXTURE_SOURCE_KEYS))
            if unknown:
                # TOML reads `notes.jsonl = 2` as the key jsonl of a table notes: a label with a dot is quoted
                first = source[unknown[0]]
                hint = "" if {"dataset", "weight"} & set(source) else (
                    f" (a label holding a dot is quoted in TOML: \"{label}.{unknown[0]}\" = "
                    f"{json.dumps(first) if isinstance(first, (int, float, str)) else '...'})")
                _refuse(key, f"has unknown keys {unknown}{hint}; a source may set {list(MIXTURE_SOURCE_KEYS)} (every "
                        f"other data setting is the [data] section's, for each source)", source)
            if not source.get("dataset") or not isinstance(source["dataset"], str):
                _refuse(f"{key}.dataset", "must name the source's dataset ('stdlib', a local path or a hub dataset)",
                        source.get("dataset"))
            weight = source.get("weight")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                _refuse(f"{key}.weight", "must be a finite number > 0 (the weights are normalized to shares)", weight)
            for name in ("name", "split", "text_field", "messages_field"):  # name may be absent, not empty
                if name in source and (not isinstance(source[name], str) or not source[name]):
                    _refuse(f"{key}.{name}", "must be a non-empty string", source[name])
            tables[label] = dict(source)
        return tables

    def sources(self) -> list[tuple[str, Fraction, DataConfig]]:
        """The mixture's sources in order, as (label, share, the data settings it is read with: this section's
        with the source's own dataset, name, split and fields); the shares sum to 1. Empty without a mixture."""
        shares = mixture_shares(self.mixture)
        return [(label, shares[label],
                 dataclasses.replace(self, mixture={}, **{k: v for k, v in source.items() if k != "weight"}))
                for label, source in self.mixture.items()]


def mixture_shares(mixture: dict[str, dict[str, Any]]) -> dict[str, Fraction]:
    """Each source's weight over their sum, exactly: the weights as written (0.3 is 3/10, not the nearest
    binary float), so 1 and 2 blend as 0.5 and 1 do, and a resume compares them without rounding."""
    weights = {label: Fraction(str(source["weight"])) for label, source in mixture.items()}
    total = sum(weights.values())
    return {label: weight / total for label, weight in weights.items()}


@dataclass(kw_only=True, slots=True)
class OptimConfig(_Section):
    """The optimizer and the learning-rate schedule: linear warmup to ``lr`` on the ``warmup_steps``-th step (at
    most ``train.steps``; as many, the run ends at ``lr`` and the trainer warns), then cosine/linear decay to
    ``min_lr`` on the final step.

    ``name``: ``"adamw"``, or ``"muon"`` (``retnet.train.muon``, torch >= 2.9): ``torch.optim.Muon`` on the 2-D
    weight matrices of the decoder layers, AdamW on the rest (embeddings, LM head, norms, biases). Muon's peak
    rate is ``muon_lr`` (None: ``lr``, which the default ``muon_adjust_lr="match_rms_adamw"`` makes right: it
    scales each matrix's update to AdamW's RMS), on the same schedule (its floor ``min_lr × muon_lr / lr``);
    its weight decay is ``weight_decay``. Refused with LoRA (``lora.rank > 0``: ``JobConfig``); under FSDP2 (and
    ``train.tensor_parallel``) the Newton-Schulz iteration runs on the sharded matrices as DTensors (collectives
    inside it, the whole matrix's result). The ``muon_*`` settings are refused with ``"adamw"``.
    """

    name: str = "adamw"  # adamw | muon
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings (see optim.build_optimizer)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    muon_lr: float | None = None  # None = lr
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_adjust_lr: str = "match_rms_adamw"  # or "original" (Keller Jordan's; wants a muon_lr of about 0.02)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            _refuse("optim.name", f"must be one of {OPTIMIZERS}", self.name)
        self._check_muon()
        _positive("optim", self, "lr", "eps")
        _positive("optim", self, "min_lr", "weight_decay", "warmup_steps", "grad_clip", allow_zero=True)
        if self.min_lr > self.lr:
            # (a preset's min_lr stays when a fine-tune lowers optim.lr: the message says what to set)
            _refuse("optim.min_lr", f"must be <= optim.lr ({self.lr}); lowering optim.lr below a preset's "
                    "min_lr needs optim.min_lr set too (e.g. 0)", self.min_lr)
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _refuse(f"optim.{name}", "must be in [0, 1)", getattr(self, name))
        if self.schedule not in SCHEDULES:
            _refuse("optim.schedule", f"must be one of {SCHEDULES}", self.schedule)

    def _check_muon(self) -> None:
        if self.name != "muon":
            # most likely a forgotten optim.name: that run would train with AdamW alone
            for spec in dataclasses.fields(OptimConfig):
                if spec.name.startswith("muon_") and getattr(self, spec.name) != spec.default:
                    _refuse(f"optim.{spec.name}", f"is set but optim.name is {self.name!r} (Muon off); set "
                            f"optim.name=muon", getattr(self, spec.name))
            return
        from retnet.train.muon import MUON_ADJUST_LR, MUON_TORCH, muon_available

        if self.muon_lr is not None:
            _positive("optim", self, "muon_lr")
        if not 0.0 <= self.muon_momentum < 1.0:  # nan fails it too
            _refuse("optim.muon_momentum", "must be in [0, 1)", self.muon_momentum)
        if not 1 <= self.muon_ns_steps < 100:  # torch.optim.Muon refuses 100 or more
            _refuse("optim.muon_ns_steps", "must be in [1, 100)", self.muon_ns_steps)
        if self.muon_adjust_lr not in MUON_ADJUST_LR:
            _refuse("optim.muon_adjust_lr", f"must be one of {MUON_ADJUST_LR}", self.muon_adjust_lr)
        # Here, before the data is read and tokenized, not when the trainer builds the optimizer.
        if not muon_available():
            import torch

            _refuse("optim.name", f"'muon' needs torch >= {MUON_TORCH} (torch.optim.Muon); this is torch "
                    f"{torch.__version__}: upgrade torch, or use optim.name=adamw", self.name)


@dataclass(kw_only=True, slots=True)
class TrainConfig(_Section):
    """The loop. One optimizer step sees ``global_batch_size`` blocks of ``data.seq_len`` tokens, split as
    ``micro_batch_size × grad_accum_steps × world_size``; the accumulation count is derived.

    ``context_parallel``: C > 1 splits every micro-batch's row along time across C ranks (consecutive ranks: 0..C-1
    are one group; with ``tensor_parallel`` T too, C pieces of T consecutive ranks), each running its piece through the model (``retnet.model.context_parallel``); the world's
    W ranks are then W / C data-parallel groups, and the global batch splits over those:
    ``micro_batch_size × grad_accum_steps × world_size / context_parallel``.

    ``tensor_parallel``: T > 1 splits every decoder layer's heads and FFN across T ranks (consecutive ranks, as
    for ``context_parallel``; ``retnet.model.tensor_parallel``), which run each micro-batch together; the W / T
    groups are the data-parallel ranks, as above: with ``parallelism = "ddp"`` each group holds the whole split model
    and the trainer averages the gradients over the groups; with ``"fsdp"`` FSDP2 shards it over them too (2-D
    parallelism, each rank holding 1 / W of every split weight). With ``context_parallel`` C > 1 too, a group is
    C × T consecutive ranks: C pieces of T ranks each, a piece's T ranks splitting its layers (each exchanging its
    heads' states with the ranks of the other pieces that hold the same heads); W / (C × T) data-parallel groups.

    ``vocab_parallel`` (with ``tensor_parallel`` > 1): the embedding and the LM head are split by vocabulary rows
    too (``ceil(vocab / T)`` rows a rank), and the fused loss computes each rank's logits only; without it every rank
    of a group holds them whole. Not with distillation (``distill.teacher``).

    ``sequence_parallel`` (with ``tensor_parallel`` > 1): Megatron's sequence parallelism, the residual stream and the
    norms between the blocks split along time across the T ranks (``1 / T`` of their activation memory; each block
    all-gathers and reduce-scatters instead of all-reducing)."""

    output_dir: str = "runs/default"
    steps: int = 1000
    global_batch_size: int = 32
    micro_batch_size: int = 8
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    parallelism: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per decoder layer)
    mixed_precision: str = "bf16"  # bf16 autocast on CUDA; CPU always trains in fp32
    activation_checkpointing: bool = False
    compile: bool = False
    resume: str = "auto"  # auto (latest valid checkpoint in output_dir, else start) | none | a checkpoint dir
    eval_interval: int = 100  # steps; 0 = only at the start and the end
    eval_blocks: int = 128  # validation blocks per evaluation (evenly spaced over the split), shared by the ranks
    context_parallel: int = 1  # ranks that split each row along time (1 = none); must divide the world size
    tensor_parallel: int = 1  # ranks that split each decoder layer (1 = none); must divide the world size
    vocab_parallel: bool = False  # tensor_parallel > 1: also split the embedding and LM head by vocabulary rows
    sequence_parallel: bool = False  # tensor_parallel > 1: also split the residual stream and norms along time

    def __post_init__(self) -> None:
        if not self.output_dir:
            _refuse("train.output_dir", "must be a directory path", self.output_dir)
        _positive("train", self, "steps", "global_batch_size", "micro_batch_size", "eval_blocks")
        _positive("train", self, "eval_interval", allow_zero=True)
        if self.context_parallel < 1:
            _refuse("train.context_parallel", "must be >= 1 (1: no context parallelism)", self.context_parallel)
        if self.tensor_parallel < 1:
            _refuse("train.tensor_parallel", "must be >= 1 (1: no tensor parallelism)", self.tensor_parallel)
        for name, what in (("vocab_parallel", "the vocabulary"), ("sequence_parallel", "each row's tokens")):
            if getattr(self, name) and self.tensor_parallel == 1:
                _refuse(f"train.{name}", f"needs train.tensor_parallel > 1 (it splits {what} across a "
                        f"tensor-parallel group's ranks)", getattr(self, name))
        # numpy's SeedSequence (the block permutation) takes no negative seed, torch.manual_seed none of 2**64
        if not 0 <= self.seed < 2**63:
            _refuse("train.seed", "must be in [0, 2**63)", self.seed)
        if self.global_batch_size % self.micro_batch_size:
            _refuse("train.global_batch_size", f"must be a multiple of train.micro_batch_size "
                    f"({self.micro_batch_size})", self.global_batch_size)
        if self.device not in ("auto", "cpu", "cuda"):
            _refuse("train.device", "must be one of ('auto', 'cpu', 'cuda')", self.device)
        if self.parallelism not in PARALLELISMS:
            _refuse("train.parallelism", f"must be one of {PARALLELISMS}", self.parallelism)
        if self.mixed_precision not in PRECISIONS:
            _refuse("train.mixed_precision", f"must be one of {PRECISIONS}", self.mixed_precision)
        if not self.resume:
            _refuse("train.resume", "must be 'auto', 'none' or a checkpoint directory", self.resume)
        # Other launchers' words (HF's resume_from_checkpoint=True, "latest", None) would be read as the path of a
        # checkpoint named so, and refused only once output_dir has been made, as a missing checkpoint
        if self.resume not in ("auto", "none") and self.resume.lower() in _RESUME_WORDS \
                and not os.path.isdir(self.resume):
            _refuse("train.resume", "must be 'auto', 'none' or a checkpoint directory ('auto': the newest valid "
                    "checkpoint in train.output_dir, else start)", self.resume)
        # As every other path setting is read (data.dataset, data.cache_dir, data.tokenizer, model.init_from): a
        # TOML file's "~/runs/x" (and --train.output_dir=~/runs/x, which no shell expands) made a directory "~"
        self.output_dir = os.path.expanduser(self.output_dir)
        if self.resume not in ("auto", "none"):
            self.resume = os.path.expanduser(self.resume)

    @property
    def group_size(self) -> int:
        """The ranks that run one micro-batch together: a context- or tensor-parallel group (1: each rank alone)."""
        return self.context_parallel * self.tensor_parallel

    def grad_accum_steps(self, world_size: int) -> int:
        """global_batch_size / (micro_batch_size × data-parallel size), refusing a batch that does not divide.
        The data-parallel size is ``world_size / context_parallel`` (or ``/ tensor_parallel``): a context- or
        tensor-parallel group reads one batch."""
        self.check_world_size(world_size)
        groups = world_size // self.group_size
        per_step = self.micro_batch_size * groups
        if self.global_batch_size % per_step:
            split = " × ".join(f"train.{name}" for name in ("context_parallel", "tensor_parallel")
                               if getattr(self, name) > 1)
            ranks = (f"world_size = {self.micro_batch_size} × {world_size}" if not split else
                     f"world_size / {split} = {self.micro_batch_size} × {world_size} / {self.group_size}")
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size × {ranks} = {per_step}"
            )
        return self.global_batch_size // per_step

    def check_world_size(self, world_size: int) -> None:
        """ConfigError unless ``context_parallel`` and ``tensor_parallel`` divide the world into whole groups."""
        for name, what in (("context_parallel", "context"), ("tensor_parallel", "tensor")):
            size = getattr(self, name)
            if world_size % size:
                raise ConfigError(
                    f"train.{name} ({size}) must divide the world size ({world_size}): each {what}-parallel "
                    f"group is that many ranks; launch a multiple of it (torchrun --nproc-per-node), or set another "
                    f"train.{name}")
        if world_size % self.group_size:  # each divides it, their product need not (6 ranks, 2 × 2)
            raise ConfigError(
                f"train.context_parallel × train.tensor_parallel ({self.context_parallel} × {self.tensor_parallel} = "
                f"{self.group_size}) must divide the world size ({world_size}): a group is that many ranks, "
                f"{self.tensor_parallel} for each of its {self.context_parallel} pieces; launch a multiple of it")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig(_Section):
    interval: int = 500  # steps between checkpoints (and one at the end); 0 = only at the end
    keep_last: int = 3
    export: bool = True  # save_pretrained model + tokenizer into <output_dir>/export at the end
    # full: model.pt + optimizer.pt gathered on rank 0; sharded: each rank writes its own shard (torch
    # distributed checkpoint), loadable into any world size; auto: sharded under FSDP, full otherwise
    layout: str = "auto"

    def __post_init__(self) -> None:
        _positive("checkpoint", self, "keep_last")
        _positive("checkpoint", self, "interval", allow_zero=True)
        if self.layout not in CHECKPOINT_LAYOUTS:
            _refuse("checkpoint.layout", f"must be one of {CHECKPOINT_LAYOUTS}", self.layout)


@dataclass(kw_only=True, slots=True)
class LoggingConfig(_Section):
    """Where the records go: ``metrics.jsonl`` always, TensorBoard and Weights & Biases (rank 0 only).

    ``wandb``: every ``metrics.jsonl`` record also goes to a W&B run (``pip install 'retnet-stack[wandb]'``),
    ``wandb_project`` / ``wandb_run_name`` (default: the output_dir's name) / ``wandb_tags`` name it. The
    entity, the mode (``WANDB_MODE=offline``) and the API key are W&B's own environment variables.
    """

    log_interval: int = 10  # steps between metrics.jsonl / TensorBoard / W&B records
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True
    peak_flops: float = 0.0  # per device, for MFU; 0 = from the GPU table (n/a on CPU)
    wandb: bool = False
    wandb_project: str = "retnet-stack"
    wandb_run_name: str | None = None  # None = the name of train.output_dir
    wandb_tags: list = field(default_factory=list)  # of strings; --logging.wandb_tags=a,b

    def __post_init__(self) -> None:
        import importlib.util

        _positive("logging", self, "log_interval")
        _positive("logging", self, "peak_flops", allow_zero=True)
        if self.wandb_run_name == "":  # how a TOML file (which has no null) leaves it out
            self.wandb_run_name = None
        refused = "/\\#?%:"  # by W&B in a project name: checked here, not after the data has been prepared
        if not 0 < len(self.wandb_project) <= 128 or any(char in self.wandb_project for char in refused):
            _refuse("logging.wandb_project", f"must be a W&B project name (1 to 128 characters, none of "
                    f"{refused!r})", self.wandb_project)
        bad = [tag for tag in self.wandb_tags if not isinstance(tag, str) or not 0 < len(tag) <= 64]
        if bad:  # W&B takes tags of 1 to 64 characters
            _refuse("logging.wandb_tags", f"must be strings of 1 to 64 characters (not: {bad})", self.wandb_tags)
        # Here, before the data is read and tokenized (hours, for a large set), not when rank 0 starts the run.
        # find_spec, not an import: wandb takes a second to import, and a config is also built to be printed.
        if self.wandb and importlib.util.find_spec("wandb") is None:
            _refuse("logging.wandb", "needs the wandb package: pip install 'retnet-stack[wandb]' (or "
                    "--logging.wandb=false)", self.wandb)


@dataclass(kw_only=True, slots=True)
class JobConfig(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        _check_optimizer(self)
        _check_context_parallel(self)  # before the post-training checks: it refuses them all
        _check_tensor_parallel(self)  # likewise
        _check_distill(self)  # before the objectives it refuses: its refusal names distill.teacher
        _check_reward(self)  # first of them: its refusals name reward.enabled, not the DPO settings
        _check_dpo(self)
        _check_kto(self)
        _check_grpo(self)
        # Here, not in OptimConfig: the bound is another section's field. The warmup's last step is the one at
        # optim.lr, so a warmup of more steps than the run has would end below it.
        if self.optim.warmup_steps > self.train.steps:
            _refuse("optim.warmup_steps", f"must be <= train.steps ({self.train.steps}): a longer warmup never "
                    f"reaches optim.lr (a shortened run needs a shorter warmup too)", self.optim.warmup_steps)
        # Here rather than when the tokenizer is trained: that comes after the whole dataset has been read, and
        # with a tokenizer given, vocab_size only pads the embedding: the trainer checks it against the tokenizer.
        # not data.tokenizer: "" is how a TOML file (which has no null) leaves it out, and the trainer reads it so
        # The pretrained model's ids are its tokenizer's: another one would feed its embeddings other tokens.
        if self.model.init_from is not None and self.data.tokenizer and \
                Path(self.data.tokenizer).expanduser().resolve() != Path(self.model.init_from).expanduser().resolve():
            _refuse("data.tokenizer", f"cannot be set with model.init_from {self.model.init_from!r}: the run uses "
                    f"that model's tokenizer, saved beside it", self.data.tokenizer)
        # (imports transformers: here, not at the module's import, which retnet-train's check of its overrides makes)
        from retnet.tokenization import MIN_VOCAB_SIZE

        if not self.data.tokenizer and self.model.vocab_size is not None \
                and self.model.vocab_size < MIN_VOCAB_SIZE:
            _refuse("model.vocab_size", f"must be >= {MIN_VOCAB_SIZE} (256 bytes + EOS + pad) for the byte-level "
                    f"BPE trained when data.tokenizer is not given", self.model.vocab_size)


def schedule_warnings(job: JobConfig) -> list[str]:
    """What the trainer warns of in the schedule, which runs but is most likely not the one meant: a warmup as long
    as the run (``optim.warmup_steps == train.steps``) reaches ``optim.lr`` on the final step and never decays.
    Warned, not refused, as HF's and nanoGPT's schedules take it: a smoke test shortened to its warmup, or an LR
    range test, means it; a longer warmup never even reaches ``optim.lr`` and is refused (``JobConfig``)."""
    optim, steps = job.optim, job.train.steps
    if optim.warmup_steps != steps or optim.schedule == "constant" or optim.min_lr == optim.lr:
        return []
    return [f"optim.warmup_steps ({optim.warmup_steps}) equals train.steps ({steps}): the learning rate climbs to "
            f"optim.lr ({optim.lr}) on the final step and the {optim.schedule!r} decay to optim.min_lr "
            f"({optim.min_lr}) never happens; set optim.warmup_steps below train.steps (a few percent of it) for "
            f"the decay, or optim.schedule=constant to mean no decay"]


def validation_split_warnings(job: JobConfig) -> list[str]:
    """What the trainer warns of in the validation split's settings: the other mode's one, set but not read.
    ``data.val_fraction`` holds out a share of the documents only when they are not streamed, and a stream holds out
    its first ``data.val_documents`` documents: either set for the other mode was ignored without a word (a stream
    told ``val_fraction = 0.1`` held out 200 documents). Warned, not refused: a preset may set its own mode's
    (``val_documents`` in the streamed ones) for a run that switches ``data.streaming``."""
    data = job.data
    if data.format not in ("text", "chat"):  # (pairs, prompts: their own splits)
        return []
    unread, read = ("val_fraction", "val_documents") if data.streaming else ("val_documents", "val_fraction")
    default = next(f.default for f in dataclasses.fields(DataConfig) if f.name == unread)
    if getattr(data, unread) == default:
        return []
    mode = "streamed" if data.streaming else "not streamed (data.streaming=false)"
    return [f"data.{unread} ({getattr(data, unread)}) is not read: the data is {mode}, and its validation split is "
            f"data.{read} ({getattr(data, read)})" + (" documents, the first of the stream" if data.streaming
                                                       else " of the documents")]


def _check_context_parallel(job: JobConfig) -> None:
    """ConfigError for ``train.context_parallel`` > 1 with what the pieces cannot be trained under: a row that does not
    cut into equal pieces, and GRPO prompts that do not deal out to its pieces. DPO and reward models train (beside
    tensor parallelism too): a group's ranks each hold a piece of every row of the same pairs, the per-sequence
    log-probs and scores summed over them, the metrics counted once. GRPO trains: a group's ranks sample a share of
    its prompts each (with the cache, whole sequences), all-gather the completions, then split each row along time
    for the log-prob passes."""
    size = job.train.context_parallel
    if size == 1:
        return
    generations = job.grpo.num_generations  # (>= 2: GrpoConfig refused others)
    if job.data.format == "prompts":
        # torchrun sets WORLD_SIZE before the process starts: the split is known before the data is read. Every
        # piece (a tensor-parallel group's ranks together) samples a share of its group's prompts.
        samplers = max(launch_env_int("WORLD_SIZE", 1) // job.train.tensor_parallel, size)
        if job.train.global_batch_size % (generations * samplers):
            _refuse("train.global_batch_size", f"(completions per step) must split into whole groups of "
                    f"grpo.num_generations ({generations}) on each of the {samplers} pieces sampling them "
                    f"(world size / train.tensor_parallel; each of the train.context_parallel {size} pieces of a "
                    f"group samples a share of its prompts): make it a multiple of {generations * samplers}",
                    job.train.global_batch_size)
    # A block, not only a packed micro-batch's row (micro_batch_size blocks): evaluation's last batch may hold
    # fewer blocks, and its row must split too. (Pairs and GRPO's prompts and completions, of any lengths: their
    # rows are padded to split.)
    if job.data.seq_len % size and job.data.format not in ("preference", "unpaired", "prompts"):
        _refuse("train.context_parallel", f"must divide data.seq_len = {job.data.seq_len} into equal pieces (each "
                f"row is cut from whole blocks, packed or not)", size)


def _check_tensor_parallel(job: JobConfig) -> None:
    """ConfigError for ``train.tensor_parallel`` > 1 with what the split layers cannot train under: dropout (each
    rank would draw its own mask on the replicated residual stream) and heads or an FFN width the ranks cannot share.
    LoRA and DoRA split with their projections; so does per-layer ``torch.compile``. DPO, reward models and GRPO
    train: a group's ranks run the same pairs (GRPO: sample the same completions), their metrics counted once. A
    ``model.init_from`` model's own architecture and dropout are checked by the trainer, which reads them."""
    size = job.train.tensor_parallel
    if size == 1:
        return
    if job.lora.enabled and job.lora.dropout:
        _refuse("lora.dropout", f"must be 0 with train.tensor_parallel {size} (each rank would draw its own mask on "
                f"the adapters' replicated input)", job.lora.dropout)
    if job.model.dropout:  # nan too
        _refuse("model.dropout", f"must be 0 with train.tensor_parallel {size} (each rank would draw its own dropout "
                f"mask on the replicated residual stream)", job.model.dropout)
    if job.model.init_from is not None:
        return
    from retnet.model import RetNetConfig

    model = RetNetConfig.from_preset(job.model.preset, **job.model.overrides(), vocab_size=_ANY_VOCAB_SIZE)
    if model.dropout:
        _refuse("model.dropout", f"must be 0 with train.tensor_parallel {size} (each rank would draw its own dropout "
                f"mask on the replicated residual stream; preset {job.model.preset!r} sets it): set "
                f"model.dropout=0", model.dropout)
    for name, what in (("num_attention_heads", "heads"), ("intermediate_size", "FFN's width")):
        value = getattr(model, name)
        if value % size:
            _refuse(f"model.{name}", f"must be divisible by train.tensor_parallel ({size}): each rank holds 1/{size} "
                    f"of the {what}", value)


def _check_optimizer(job: JobConfig) -> None:
    """ConfigError for ``optim.name="muon"`` with a setting it does not train under, naming both."""
    if job.optim.name != "muon":
        return
    if job.lora.enabled:
        # The adapters' low-rank factors are not the hidden matrices Muon is made for (orthogonalizing B's update
        # makes it full-rank in B's small dimension), and AdamW alone would be a silent no-op of the setting.
        _refuse("optim.name", f"'muon' cannot be used with lora.rank {job.lora.rank} (LoRA trains low-rank "
                "adapters, which Muon is not made for): use optim.name=adamw for LoRA", job.optim.name)


def optim_changes(saved: dict[str, Any], current: JobConfig) -> list[str]:
    """``optim.name`` when it differs between a checkpoint's config (``saved``, a ``JobConfig.to_dict()``; one
    from before the setting trained with AdamW) and ``current``: the optimizer state of one is not the other's
    (Muon keeps a momentum per matrix, AdamW two moments and a step per parameter)."""
    old = saved.get("optim", {}).get("name", "adamw")
    return [] if old == current.optim.name else [f"optim.name: checkpoint {old!r}, now {current.optim.name!r}"]


def data_changes(saved: dict[str, Any], current: JobConfig, *, tokenizer_reused: bool) -> list[str]:
    """The settings that define a run's token blocks and their order which differ between a checkpoint's
    config (``saved``, a ``JobConfig.to_dict()``) and ``current``, as ``"data.seq_len: checkpoint 128, now
    256"``. A checkpoint's data position counts blocks of that stream, so a resume with any of them changed
    would go on in other data. ``data.format`` is compared too, and then the field of the current format
    (``text_field``; ``messages_field`` and ``assistant_only_loss``, which decides the targets, for chat;
    ``max_prompt_length`` for preference pairs, whose objective ``dpo_changes`` compares).

    Free to change: everything else. ``train.steps`` (extending a run), logging, evaluation, checkpointing,
    the batch sizes (the position counts blocks, not steps), the optimizer, ``data.cache_dir`` (a cache miss
    rebuilds the same blocks) and ``data.document_boundaries`` (the blocks stay; how the model reads them is a
    training choice, like the learning rate). ``data.streaming`` is left to the trainer, which refuses it from
    the checkpoint's data state. Tokenizer settings count only where the resume cannot use the tokenizer
    saved in its output_dir (``tokenizer_reused`` false); otherwise they are not read. Settings a checkpoint
    from an older version does not hold are skipped. ``data.mixture`` is compared source by source: the
    dataset, name, split and field each reads (its own or the section's), its share, and their order."""
    streaming = current.data.streaming
    # A checkpoint from before data.format trained on text. The field read is the format's own.
    was = saved.get("data", {}).get("format", "text")
    changes = [] if was == current.data.format else [f"data.format: checkpoint {was!r}, now {current.data.format!r}"]
    fields = {"chat": ["data.messages_field", "data.assistant_only_loss"],
              "preference": ["data.max_prompt_length"],
              "unpaired": ["data.max_prompt_length"],
              "prompts": ["data.max_prompt_length"]}.get(current.data.format, ["data.text_field"])
    keys = ["data.dataset", "data.name", "data.split", *fields, "data.max_documents", "data.seq_len"]
    if current.data.format == "prompts":  # not read: a sequence is its prompt and what is sampled after it
        keys.remove("data.seq_len")
    # A stream's validation split is its first val_documents documents; packed data holds out val_fraction of
    # them and shuffles its blocks with train.seed. Each is ignored in the other mode.
    keys += ["data.val_documents"] if streaming else ["data.val_fraction", "train.seed"]
    if not tokenizer_reused:
        keys.append("data.tokenizer")
        if not current.data.tokenizer:  # a BPE is trained (also for ""): its size and sample decide the tokens
            keys += ["data.tokenizer_train_chars", "model.vocab_size"]
    if current.data.mixture and saved.get("data", {}).get("mixture"):
        # What each source reads (its own dataset, name, split and field, else the section's) is compared source
        # by source: a section setting that every source overrides is read by none, and one that some read
        # would be reported twice
        keys = [key for key in keys if key.split(".")[1] not in MIXTURE_SOURCE_KEYS]
    now = current.to_dict()
    for key in keys:
        section, name = key.split(".")
        if name not in saved.get(section, {}):
            continue
        old, new = saved[section][name], now[section][name]
        if key in ("data.dataset", "data.tokenizer"):
            old, new = _path_spelling(old), _path_spelling(new)
        if old != new:
            changes.append(f"{key}: checkpoint {saved[section][name]!r}, now {now[section][name]!r}")
    return changes + _mixture_changes(saved.get("data", {}), current.data)


def _path_spelling(value: Any) -> Any:
    """A path setting as the files it names: './corpus/', 'corpus' and 'corpus//' are one directory (lexically,
    as written: a relative path means the same files only from the same directory, which the blocks' digest
    checks), and so are '~/corpus' and its expansion, which every path setting is read as. Hub ids ('owner/name')
    and 'stdlib' are their own normal form; '' is None (a TOML file's unset data.tokenizer)."""
    return os.path.normpath(os.path.expanduser(value)) if isinstance(value, str) and value else None


def _mixture_changes(saved: dict[str, Any], current: DataConfig) -> list[str]:
    """data_changes of ``data.mixture``: each source's dataset, name, split and field (its own, else its
    section's), share and their order. A checkpoint from before mixtures has none."""
    before, now = saved.get("mixture") or {}, current.mixture
    if bool(before) != bool(now):
        return [f"data.mixture: checkpoint {sorted(before) or 'none'}, now {sorted(now) or 'none'}"]
    fields = ["dataset", "name", "split", "messages_field" if current.format == "chat" else "text_field"]

    def resolved(mixture: dict, section: dict) -> dict[str, dict[str, Any]]:
        shares = mixture_shares(mixture)
        return {label: {**{name: source.get(name, section.get(name)) for name in fields},
                        "weight": (source["weight"], shares[label])} for label, source in mixture.items()}

    old, new = resolved(before, saved), resolved(now, current.to_dict())
    changes = [f"data.mixture.{label}: checkpoint {'absent' if label not in old else old[label]['dataset']!r}, "
               f"now {'absent' if label not in new else new[label]['dataset']!r}"
               for label in sorted(set(old) ^ set(new))]
    if set(old) == set(new) and list(old) != list(new):  # the schedule breaks its ties by the order listed
        changes.append(f"data.mixture: checkpoint sources in the order {list(old)}, now {list(new)}")
    for label in [label for label in new if label in old]:
        for name, value in new[label].items():
            was = old[label][name]
            if name == "weight" and was[1] != value[1]:  # the shares: 1 and 2 is 2 and 4
                changes.append(f"data.mixture.{label}.weight: checkpoint {was[0]!r} ({float(was[1]):.1%}), "
                               f"now {value[0]!r} ({float(value[1]):.1%})")
            elif name != "weight" and (was != value if name != "dataset" else _path_spelling(was) != _path_spelling(value)):
                changes.append(f"data.mixture.{label}.{name}: checkpoint {was!r}, now {value!r}")
    return changes


# How the model is computed or regularized, or only initialized, not what its weights compute: free on a resume.
FREE_MODEL_FIELDS = frozenset({"dropout", "chunk_size", "retention_mode", "use_cache", "initializer_range",
                               "fuse_linear_cross_entropy"})
# Set from the tokenizer: data_changes and the tokenizer a resume keeps cover them.
_TOKENIZER_FIELDS = frozenset({"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"})


def model_changes(saved: dict[str, Any], current: JobConfig) -> list[str]:
    """The RetNetConfig fields that differ between the model of a checkpoint's config (``saved``, a
    ``JobConfig.to_dict()``) and ``current``'s, as ``"model.extra.rope_theta: checkpoint 10000.0, now 500.0"``.
    The trainer checks the shapes on the model; these change what the same weights compute, so a resume would
    train another model. ``FREE_MODEL_FIELDS`` may change. A checkpoint of a version whose model section no
    longer loads is not compared. Where either run has ``model.init_from``, only the settings on top of the
    architecture are compared: a fine-tune's is its ``init_from`` model's, whatever ``model.preset`` says, and
    :func:`architecture_changes` compares it."""
    from retnet.model import RetNetConfig

    try:
        old = ModelConfig(**saved["model"])
    except (KeyError, TypeError, ConfigError):
        return []
    # (a fine-tune's model.preset is read by nothing: another one was refused as another model)
    fine_tune = old.init_from is not None or current.model.init_from is not None
    configs = [RetNetConfig.from_preset(current.model.preset if fine_tune else m.preset, **m.overrides(),
                                        vocab_size=_ANY_VOCAB_SIZE)
               for m in (old, current.model)]
    fixed = {f.name for f in dataclasses.fields(ModelConfig)}
    return [f"{f'model.{name}' if name in fixed else f'model.extra.{name}'}: checkpoint {was!r}, now {now!r}"
            for name, was, now in _differing_fields(*configs)]


def architecture_changes(saved: dict[str, Any], current) -> list[str]:
    """The RetNetConfig fields that differ between the model a checkpoint trained (``saved``, its config's
    ``to_dict()``) and ``current`` (a RetNetConfig), as ``"hidden_act: checkpoint 'gelu', now 'relu'"``,
    ``FREE_MODEL_FIELDS`` and the tokenizer's aside: a fine-tune's architecture is its ``model.init_from``'s
    config.json, which :func:`model_changes` does not see. A saved config that no longer loads is not compared."""
    from retnet.model import RetNetConfig

    try:
        old = RetNetConfig.from_dict(dict(saved))
    except (TypeError, ValueError):
        return []
    return [f"{name}: checkpoint {was!r}, now {now!r}" for name, was, now in _differing_fields(old, current)]


def _differing_fields(old, new) -> list[tuple[str, Any, Any]]:
    """(name, old value, new value) of the RetNetConfig fields that change what the weights compute."""
    from retnet.model import RetNetConfig

    resolved = [old.to_dict(), new.to_dict()]
    # "gelu" and ["gelu", "gelu"] (or kwargs per layer or for all) are the same activations, written two ways
    same_activations = old.layer_activations == new.layer_activations
    changes = []
    for name in RetNetConfig.__annotations__:
        if name in FREE_MODEL_FIELDS | _TOKENIZER_FIELDS or resolved[0].get(name) == resolved[1].get(name):
            continue
        if name in ("hidden_act", "hidden_act_kwargs") and same_activations:
            continue
        changes.append((name, resolved[0].get(name), resolved[1].get(name)))
    return changes


# ----------------------------------------------------------------------------------------------------------
# Loading: presets, TOML files, overrides
# ----------------------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    """The configs shipped as package data (``retnet/train/configs/*.toml``)."""
    folder = resources.files("retnet.train") / "configs"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_toml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path).expanduser()
    if os.path.isfile(path):  # (Path.is_file raised OSError on a name longer than the OS takes)
        try:
            raw = path.read_bytes()
        except OSError as error:  # (no read permission, an I/O error: a traceback before)
            raise ConfigError(f"--config {name_or_path!r} cannot be read: {error.strerror or error}") from None
        # A Windows editor's UTF-8 starts with a byte-order mark, which tomllib refuses as an invalid statement
        bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
        try:
            text = raw[bom:].decode("utf-8")
        except UnicodeDecodeError as error:  # (TOML is UTF-8; a traceback before)
            raise ConfigError(f"--config {name_or_path!r} is not UTF-8 text, as TOML is: {error.reason} at byte "
                              f"{bom + error.start}") from None
    elif name_or_path in preset_names():
        # UTF-8, as TOML is and as a file is read above: the paper presets' comments hold "×" and "β", which the
        # locale's codec (ASCII where UTF-8 mode is off) could not decode
        text = (resources.files("retnet.train") / "configs" / f"{name_or_path}.toml").read_text(encoding="utf-8")
    else:
        raise ConfigError(f"--config {name_or_path!r} is neither a TOML file nor a preset; presets: {preset_names()}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        if path.suffix.lower() in (".json", ".yaml", ".yml"):  # a run's config.json, another launcher's YAML
            raise ConfigError(f"--config {name_or_path!r} is not TOML ({path.suffix} files are not read): a config "
                              f"file is TOML, with the tables [model], [data], [optim], [train], [checkpoint], "
                              f"[logging] ... (see retnet/train/configs/*.toml); every field is also an override "
                              f"--section.key=value") from None
        raise ConfigError(f"--config {name_or_path!r}: invalid TOML: {error}") from None


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(key: str, annotation: Any, value: Any) -> Any:
    """``value`` (from TOML or a coerced override) as ``annotation``, or a ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, option, value)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # 10**400 written out (TOML reads 1e400 as inf, which the range checks refuse)
            raise ConfigError(f"{key} expects a finite float; got int {value!r}") from None
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{key} expects int; got bool {value!r}")
    if expected is int and isinstance(value, int):
        return _int64(key, value)
    if not isinstance(value, expected):
        raise ConfigError(f"{key} expects {expected.__name__}; got {type(value).__name__} {value!r}")
    return value


def _int64(key: str, value: int) -> int:
    """``value``, or a ConfigError naming ``key`` for one beyond int64, numpy's and torch's integers: no step count,
    size or seed can be one (and 10**400 raised OverflowError in the range checks, which compare with floats)."""
    if not -(2**63) <= value < 2**63:
        raise ConfigError(f"{key} expects an int in [-2**63, 2**63); got {value!r}")
    return value


def _coerce_string(key: str, annotation: Any, text: str) -> Any:
    """An override's text as the field's type."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = [o for o in typing.get_args(annotation) if o is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(typing.get_args(annotation)):
            return None
        if str in options and list in options:
            # --model.hidden_act=gelu is one name, not the list "gelu" splits into: a list is written [...] there
            options = [o for o in options if o is not (list if not text.strip().startswith("[") else str)]
        errors = []
        for option in options:
            try:
                return _coerce_string(key, option, text)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    expected = origin or annotation
    try:
        if expected is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if expected is int:
            return _int64(key, int(text))
        if expected is float:
            return float(text)
        if expected is list:  # --lora.target_modules=q_proj,v_proj (or a TOML/JSON list)
            if text.strip().startswith("["):
                value = _parse_toml_value(text)
                if isinstance(value, str):
                    # not TOML: names unquoted, [q_proj,v_proj], or ["sau","smelu"] after the shell took the
                    # quotes (an unquoted --model.hidden_act=["sau","smelu"]): each bare name quoted, then TOML again
                    # (an empty item, [a,,b], is still no list)
                    value = _parse_toml_value(_BARE_LIST_ITEM.sub(r'"\1"', text))
                if not isinstance(value, list):
                    raise ValueError(text)
                return value
            return [item.strip() for item in text.split(",") if item.strip()]
        if expected is dict:
            # A TOML inline table, as the file and --section.table.KEY=VALUE write one ('{use_xpos = true}' was
            # refused as no dict), or a JSON object, as HF's and TRL's launchers take one
            value = _parse_toml_value(text)
            if not isinstance(value, dict):
                value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
    except ConfigError:  # (_int64's, which says more than the one below)
        raise
    except ValueError:
        raise ConfigError(f"{key} expects {expected.__name__}; got {text!r}") from None
    return text


# A list item that is a bare word (no quote, bracket, brace, '=' or space in it), between '[' or ',' and ',' or ']'.
_BARE_LIST_ITEM = re.compile(r"(?<=[\[,])\s*([^\s,\[\]\"'{}=]+)\s*(?=[,\]])")


def _parse_toml_value(text: str) -> Any:
    """``--model.extra.KEY=VALUE``: VALUE as a TOML value (``true``, ``3``, ``[1, 2]``), a number TOML spells
    otherwise (``.9``, as the plain fields take it), None for ``none``/``null`` (TOML has no null), else the
    string. A value that ends one line and writes more keys or tables ('1\\n[x]') is no TOML value: it is the
    string, not 1 with the rest dropped."""
    try:
        document = tomllib.loads(f"v = {text}")
        if list(document) == ["v"]:
            return document["v"]
    except tomllib.TOMLDecodeError:
        pass
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--a.b=1", "--c.d", "2"]`` -> ``[("a.b", "1"), ("c.d", "2")]``."""
    pairs, index = [], 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            hint = _sectioned_hint(arg)
            before, here = (Path(pairs[-1][1]) if pairs else None), Path(arg)
            if before is not None and not arg.startswith("-") and (
                    (here.suffix and here.suffix == before.suffix) or here.parent == before.parent != Path(".")):
                # a second file of a glob the shell expanded (unquoted) into the value before it
                previous = pairs[-1][0]
                hint += (f" (a second value of --{previous}? A glob must be quoted, or the shell expands it into one "
                         f"argument per file: --{previous}='{before.parent / '*'}{before.suffix}')")
            raise ConfigError(f"expected an override --section.key=value; got {arg!r}{hint}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if index + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value; write {arg}=VALUE (a boolean too: =true, not a "
                                  f"bare flag)")
            key, value = arg[2:], args[index + 1]
            if value.startswith("--"):
                # the value was forgotten (or a boolean written as a bare flag): taking the next override as the
                # value would set a path or name to its text, silently, and drop that override
                raise ConfigError(f"override {arg!r} has no value: the argument after it is the override {value!r}; "
                                  f"write {arg}=VALUE (a boolean too: =true, not a bare flag)")
            index += 1
        pairs.append((key, value))
        index += 1
    return pairs


def _did_you_mean(name: str, known: list[str], shown: str = "{}") -> str:
    """``" (did you mean 'optim.lr'?)"`` for the known name closest to a misspelt ``name``, else ``""``."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {shown.format(close[0])!r}?)" if close else ""


def _field_names() -> list[str]:
    """Every ``section.key`` of the configuration."""
    return [f"{section}.{key}" for section, cls in _section_types(JobConfig).items()
            for key in _section_types(cls)]


def _field_hint(section: str, key: str) -> str:
    """A suggestion for an unknown ``section.key``: a field of that name in another section (``train.warmup_steps``
    is ``optim.warmup_steps``), else the closest key of that section."""
    elsewhere = sorted(name for name in _field_names() if name.split(".", 1)[1] == key)
    if elsewhere:
        return f" (did you mean {' or '.join(map(repr, elsewhere))}?)"
    # [model] sets a few RetNetConfig fields itself; model.extra takes any other (but the tokenizer's ids)
    if section == "model" and key in _retnet_config_keys() and key not in ("eos_token_id", "pad_token_id"):
        return f" (did you mean 'model.extra.{key}'? [model] sets the other RetNetConfig fields through extra)"
    if key in _OTHER_LAUNCHERS:
        # Another launcher's name under a section (--train.save_steps, --optim.learning_rate, a TOML [train] table
        # written from HF's TrainingArguments): the field doing its work, as the name without a section gets. The
        # closest spelling was no such field, or a wrong one a user might well set: train.save_steps -> train.steps,
        # train.eval_steps -> train.steps, data.max_seq_length -> data.max_prompt_length
        target, _, note = _OTHER_LAUNCHERS[key].partition(" ")
        return f" (did you mean {target!r}{' ' + note if note else ''}?)"
    return _did_you_mean(key, sorted(_section_types(_section_types(JobConfig)[section])), f"{section}.{{}}")


# The keys PretrainedConfig adds to RetNetConfig's own fields in RetNetConfig().to_dict() (a test keeps them equal).
_PRETRAINED_CONFIG_KEYS = frozenset({
    "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "id2label", "is_encoder_decoder", "label2id",
    "model_type", "output_attentions", "output_hidden_states", "problem_type", "return_dict", "transformers_version"})


def _retnet_config_keys() -> frozenset[str]:
    """RetNetConfig().to_dict()'s keys, read without importing it: its own fields from the annotations of its
    class in its module's source, and PretrainedConfig's. Building one imported torch and transformers (seconds)
    before a mistyped [model] key was answered."""
    source = (resources.files("retnet") / "model" / "configuration_retnet.py").read_text(encoding="utf-8")
    body = next(node.body for node in ast.parse(source).body
                if isinstance(node, ast.ClassDef) and node.name == "RetNetConfig")
    own = {node.target.id for node in body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    return frozenset(own) | _PRETRAINED_CONFIG_KEYS


# Settings of HF's TrainingArguments and nanoGPT's train.py by the field that does their work here.
_OTHER_LAUNCHERS = {
    "learning_rate": "optim.lr", "max_steps": "train.steps", "max_iters": "train.steps", "lr_decay_iters": "train.steps",
    "per_device_train_batch_size": "train.micro_batch_size", "batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (the accumulation is derived: global / (micro × ranks))",
    "max_grad_norm": "optim.grad_clip", "lr_scheduler_type": "optim.schedule", "warmup_iters": "optim.warmup_steps",
    "resume_from_checkpoint": "train.resume", "out_dir": "train.output_dir", "eval_iters": "train.eval_blocks",
    "eval_steps": "train.eval_interval", "save_steps": "checkpoint.interval", "save_total_limit": "checkpoint.keep_last",
    "logging_steps": "logging.log_interval", "block_size": "data.seq_len",
    "max_seq_length": "data.seq_len", "n_layer": "model.num_hidden_layers", "n_head": "model.num_attention_heads",
    "n_embd": "model.hidden_size", "dtype": "train.mixed_precision", "bf16": "train.mixed_precision",
    "gradient_checkpointing": "train.activation_checkpointing", "torch_compile": "train.compile",
    "report_to": "logging.wandb", "wandb_log": "logging.wandb", "adam_beta1": "optim.beta1",
    "adam_beta2": "optim.beta2", "adam_epsilon": "optim.eps", "save_interval": "checkpoint.interval",
    "dataset_text_field": "data.text_field", "text_column": "data.text_field", "text_column_name": "data.text_field",
    "validation_split_percentage": "data.val_fraction (a fraction: 5 percent is 0.05)",
    "validation_split": "data.val_fraction", "val_split": "data.val_fraction",  # (Keras' fraction; not data.split)
    "warmup_ratio": "optim.warmup_steps (a number of steps)", "num_train_epochs": "train.steps (there are no epochs)",
    "model_name_or_path": "model.init_from", "tokenizer_name": "data.tokenizer", "dataset_name": "data.dataset",
    "dataset_config_name": "data.name",
}


def _sectioned_hint(arg: str) -> str:
    """For ``--steps=5`` (no section, as other launchers spell it): the field of that name, ``--train.steps``, or
    the one doing another launcher's setting's work (``--learning_rate``: ``--optim.lr``)."""
    name = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
    if not name or "." in name:
        return ""
    if name in _OTHER_LAUNCHERS:
        return f" (did you mean --{_OTHER_LAUNCHERS[name]}?)"
    option = difflib.get_close_matches(name, ["config", "print_config"], n=1, cutoff=0.7)
    if option:  # the launcher's own options, misspelt, reach the overrides
        return f" (did you mean --{option[0].replace('_', '-')}?)"
    fields = _field_names()
    exact = sorted(f for f in fields if f.split(".", 1)[1] == name)
    if exact:
        return f" (did you mean {' or '.join('--' + f for f in exact)}?)"
    close = difflib.get_close_matches(name, [f.split(".", 1)[1] for f in fields], n=1, cutoff=0.8)
    return f" (did you mean --{next(f for f in fields if f.split('.', 1)[1] == close[0])}?)" if close else ""


def _checked_values(raw: dict[str, Any], overrides: list[tuple[str, str]] = ()) -> dict[str, dict[str, Any]]:
    """Each section's values from a TOML-shaped dict plus ``(dotted key, text)`` overrides, every key a field and
    every value of its field's type, or a ConfigError naming the first that is not; what the sections check when
    built (ranges, combinations) is left to them. Imports neither torch nor transformers (:func:`check_config`)."""
    sections = {f.name: f.type for f in dataclasses.fields(JobConfig)}
    section_types = _section_types(JobConfig)
    values: dict[str, dict[str, Any]] = {name: {} for name in sections}
    # The tables are the caller's own (a file's, a checkpoint's): an override of one key of a table (--model.extra.X,
    # --data.mixture.X) set it in the caller's dict, and the config built shared them
    raw = copy.deepcopy(raw)
    for section, table in raw.items():
        if section not in sections:
            # a key above every table (a flat file's "steps = 100") is the field of that name, in its table
            fields = sorted(name for name in _field_names() if name.split(".", 1)[1] == section)
            if not fields and section in _OTHER_LAUNCHERS:  # a flat file of another launcher's names
                target, _, note = _OTHER_LAUNCHERS[section].partition(" ")
                hint = (f" (did you mean {target!r}{' ' + note if note else ''}? A key goes in its table: "
                        f"[{target.split('.')[0]}] {target.split('.')[1]} = ...)")
            else:
                hint = (f" (did you mean {' or '.join(map(repr, fields))}? A key goes in its table: "
                        f"[{fields[0].split('.')[0]}] {section} = ...)" if fields
                        else _did_you_mean(section, sorted(sections)))
            raise ConfigError(f"unknown config section {section!r}{hint}; "
                              f"known: {sorted(sections)}")
        if not isinstance(table, dict):
            raise ConfigError(f"config section {section!r} must be a table; got {table!r}")
        hints = _section_types(section_types[section])
        for key, value in table.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {section}.{key}{_field_hint(section, key)}; known: "
                                  f"{sorted(hints)}")
            values[section][key] = _check_type(f"{section}.{key}", hints[key], value)
    for dotted, text in overrides:
        section, _, key = dotted.partition(".")
        if section not in sections:
            raise ConfigError(f"unknown config key {dotted!r}: no section {section!r}"
                              f"{_did_you_mean(section, sorted(sections))}; known: {sorted(sections)}")
        hints = _section_types(section_types[section])
        field_name, _, subkey = key.partition(".")
        if field_name not in hints:
            raise ConfigError(f"unknown config key {dotted!r}{_field_hint(section, field_name)}; known in "
                              f"[{section}]: {sorted(hints)}")
        if subkey:
            if hints[field_name] is not dict:
                raise ConfigError(f"unknown config key {dotted!r}: {section}.{field_name} is not a table")
            value = _parse_toml_value(text)
            if (section, field_name) == ("data", "mixture"):
                _check_bare_weight(subkey, value, values[section].get(field_name))
            values[section].setdefault(field_name, {})[subkey] = value
        else:
            values[section][field_name] = _coerce_string(dotted, hints[field_name], text)
    return values


def _check_bare_weight(label: str, weight: Any, mixture: dict[str, Any] | None) -> None:
    """Refuse ``--data.mixture.<label>=<number>`` beside a source ``label`` the file (or an earlier override) sets
    whole: the number is short for ``{dataset = <label>, weight = <number>}`` and replaced that source, its dataset
    and fields, with a dataset named like the label, silently, where its weight was surely meant. A source that is
    itself that shorthand keeps taking a new number."""
    source = (mixture or {}).get(label)
    if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not isinstance(source, dict)
            or "dataset" not in source or {k: v for k, v in source.items() if k != "weight"} == {"dataset": label}):
        return
    def inline(table: dict[str, Any]) -> str:
        return "{" + ", ".join(f"{key}={json.dumps(value)}" for key, value in table.items()) + "}"

    raise ConfigError(f"data.mixture.{label}: --data.mixture.{label}={weight!r} is short for the source "
                      f"{inline({'dataset': label, 'weight': weight})} and would replace the configured source "
                      f"{label!r}, {inline(source)}; to change its weight, set it whole: "
                      f"--data.mixture.{label}={shlex.quote(inline({**source, 'weight': weight}))}")


def build_config(raw: dict[str, Any], overrides: list[tuple[str, str]] = ()) -> JobConfig:
    """A validated JobConfig from a TOML-shaped dict plus ``(dotted key, text)`` overrides."""
    values, section_types = _checked_values(raw, overrides), _section_types(JobConfig)
    try:
        built = {name: section_types[name](**table) for name, table in values.items()}
    except TypeError as error:  # pragma: no cover - keys are checked above
        raise ConfigError(str(error)) from None
    return JobConfig(**built)


def check_config(name_or_path: str, overrides: list[str] | None = None) -> None:
    """:func:`load_config`'s refusals of the TOML and of the overrides' spelling, keys and value types, in its
    words, without importing torch or transformers (seconds): retnet-train answers a mistyped override at once."""
    _checked_values(_read_toml(name_or_path), parse_overrides(list(overrides or [])))


def load_config(name_or_path: str, overrides: list[str] | None = None) -> JobConfig:
    """A preset name or TOML path, plus ``--section.key=value`` overrides, as a validated JobConfig."""
    return build_config(_read_toml(name_or_path), parse_overrides(list(overrides or [])))


__all__ = [
    "LORA_TARGETS", "OPTIMIZERS", "CheckpointConfig", "ConfigError", "DataConfig", "DistillConfig", "DpoConfig",
    "GrpoConfig", "JobConfig", "KtoConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "OptimConfig",
    "RewardConfig", "TrainConfig", "architecture_changes", "build_config", "check_config", "data_changes",
    "distill_changes", "dpo_changes", "grpo_changes", "kto_changes", "load_config", "lora_changes", "mixture_shares",
    "model_changes", "optim_changes", "parse_overrides", "preset_names", "reward_changes", "schedule_warnings",
    "validation_split_warnings",
]
