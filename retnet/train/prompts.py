"""Prompt rows for GRPO (``data.format = "prompts"``): reading, checking and encoding them.

A row's ``prompt`` is a string (*standard*: its tokens are the string's) or a conversation, a list of ``{"role",
"content"}`` messages (*conversational*: rendered with the tokenizer's chat template and the generation prompt, as
the DPO path and the server render a prompt: :func:`~retnet.tokenization.render_pair`, which leaves a final
assistant message open, ``continue_final_message``), with the row's ``chat_template_kwargs`` (TRL's column: a dict
of the template's variables, Qwen3's ``enable_thinking``), as TRL's ``maybe_apply_chat_template`` renders it; a
standard prompt's has no effect. Every other column of the row, ``chat_template_kwargs`` too, is kept as it is, for
the reward functions (TRL's rule). A prompt longer than ``data.max_prompt_length`` (when > 0) keeps its last tokens
(TRL's ``keep_end``: the end is what the completion answers). The rows are held in memory, tokens and columns.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from retnet.tokenization import render_pair
from retnet.train.chat import (
    KWARGS_COLUMN,
    ChatEncoder,
    check_template_kwargs,
    conversation_problem,
    template_messages,
)
from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import _hf_dataset, _kind, column_values, first_rows, saved_dataset_dir

FIELD = "prompt"  # TRL's column name
# the reward functions' own arguments (rewards.py)
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")


def check_prompt(dataset: str, row: int, value: Any) -> str | list[dict[str, Any]]:
    """A row's prompt as the template reads it, or a ConfigError naming the dataset and the row."""
    if isinstance(value, str):
        return value
    problem = "is an empty list" if value == [] else conversation_problem(value)
    if problem:
        raise ConfigError(f"data.format 'prompts': 'prompt' of {dataset!r}, row {row}: {problem}; expected a string "
                          f"(standard format) or a list of {{'role': str, 'content': str}} messages (conversational)")
    return template_messages(value)


class Prompts:
    """A split's prompts: ``prompts[i]`` (as checked), ``columns[i]`` (the row's other columns), ``tokens[i]``
    (int64 ids), ``rows[i]`` (the dataset row), ``template_kwargs[i]`` (the template variables its conversational
    prompt was rendered with, its ``chat_template_kwargs``; None: none)."""

    def __init__(self, prompts: list, columns: list[dict[str, Any]], tokens: list[np.ndarray], rows: list[int],
                 template_kwargs: list[dict[str, Any] | None] | None = None):
        self.prompts, self.columns, self.tokens, self.rows = prompts, columns, tokens, rows
        self.template_kwargs = [None] * len(prompts) if template_kwargs is None else template_kwargs

    def __len__(self) -> int:
        return len(self.prompts)


def _opaque(value: Any) -> str:
    """A column value JSON has no form for, as :func:`prompts_digest` hashes it: bytes by their digest, anything
    else by its type alone (its repr may hold an address, which would refuse the same rows read again)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes-sha256:" + hashlib.sha256(bytes(value)).hexdigest()
    return f"<{type(value).__name__}>"


def prompts_digest(splits: list[Prompts]) -> str:
    """SHA-256 of the splits' prompts as a run trains on them, split by split: their count, each prompt's token
    ids and the row's other columns (which the reward functions get: a changed ``solution`` is other data too), in
    order; not the files they came from. What a GRPO checkpoint's data position counts prompts of, which a resume
    compares with the data it reads: the same rows read again from a rewritten file hash alike, other rows under
    the same path do not."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(np.int64(len(split)).tobytes())
        for tokens, columns in zip(split.tokens, split.columns, strict=True):
            digest.update(np.int64(len(tokens)).tobytes())
            digest.update(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
            try:  # (sorted: the same rows with their keys in another order are the same rows)
                text = json.dumps(columns, sort_keys=True, default=_opaque)
            except TypeError:  # keys of several types (a map column's), which do not sort: in their order
                text = json.dumps(columns, default=_opaque)
            digest.update(text.encode())
            digest.update(b"\0")
    return digest.hexdigest()


def load_prompt_rows(cfg: DataConfig, files: list[Path] | None, cache_dir: Path, loaded=None) -> list[tuple]:
    """(row index, checked prompt, the other columns) of every row (at most ``max_documents``), in row order."""
    if files is not None and not saved_dataset_dir(files[0]) and _kind(files[0]) in ("text", "csv"):
        raise ConfigError(f"data.dataset {cfg.dataset!r} is {_kind(files[0])} files; data.format 'prompts' reads the "
                          f"'prompt' column of JSON/JSONL/Parquet rows, a save_to_disk directory or a hub dataset")
    dataset = loaded if loaded is not None else _hf_dataset(cfg, files, cache_dir, streaming=False)
    if FIELD not in dataset.column_names:
        raise ConfigError(f"data.dataset {cfg.dataset!r} has no {FIELD!r} column (columns: {dataset.column_names}); "
                          f"data.format 'prompts' reads TRL's 'prompt' (the other columns go to the reward "
                          f"functions)")
    if cfg.max_documents:
        dataset = first_rows(dataset, cfg.max_documents)
    others = [name for name in dataset.column_names if name != FIELD]
    for name in RESERVED:
        if name in others:  # a reward function would get it twice: a TypeError at the first step, after sampling
            raise ConfigError(f"data.dataset {cfg.dataset!r} has a {name!r} column, the name of an argument the "
                              f"reward functions get beside the other columns ({list(RESERVED)}); rename it")
    columns = {name: column_values(dataset, name, cfg.dataset, "data.format 'prompts' column" if name == FIELD
                                   else "column") for name in [FIELD, *others]}
    return [(row, check_prompt(cfg.dataset, row, prompt), {name: columns[name][row] for name in others})
            for row, prompt in enumerate(columns[FIELD])]


class PromptEncoder:
    """Prompts -> ids with ``tokenizer``, the prompt rendered as the DPO path renders one (see the module)."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.chat = ChatEncoder(tokenizer, dataset=cfg.dataset)
        self.dataset, self.max_prompt_length = cfg.dataset, cfg.max_prompt_length

    def text(self, prompt: str | list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt's text: a standard one's own, a conversation rendered with ``template_kwargs`` (the row's
        checked ``chat_template_kwargs``; None: without, as TRL's GRPOTrainer renders the conversation its reward
        model scores)."""
        if isinstance(prompt, str):
            return prompt
        return render_pair(prompt, [], self.chat.renderer(template_kwargs))[0]

    def ids(self, prompts: list, texts: list[str]) -> list[list[int]]:
        """The ids of ``prompts``' ``texts`` (:meth:`text`), uncut: a standard prompt's with the tokenizer's added
        special tokens (a BOS), as DPO's and ``/v1/completions`` encode a text prompt; a rendered conversation's its
        template's own (:meth:`~retnet.train.chat.ChatEncoder.encode_texts`)."""
        return [ids for ids, _ in self.chat.encode_texts(texts, [isinstance(prompt, str) for prompt in prompts])]

    def template_kwargs(self, row: int, prompt: str | list[dict[str, Any]], columns: dict[str, Any]
                        ) -> dict[str, Any] | None:
        """The template variables a row's prompt is rendered with: its ``chat_template_kwargs`` column's, checked
        (a ConfigError naming the row), for a conversational prompt; None for a standard one (no template)."""
        if isinstance(prompt, str):
            return None
        return check_template_kwargs(self.dataset, row, columns.get(KWARGS_COLUMN), "prompts")

    def split(self, rows: list[tuple], batch: int = 256) -> Prompts:
        tokens, variables = [], []
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            texts = []
            for row, prompt, columns in chunk:
                variables.append(self.template_kwargs(row, prompt, columns))
                try:
                    texts.append(self.text(prompt, variables[-1]))
                except Exception as error:  # jinja's own errors, raise_exception in a template
                    raise ConfigError(f"data.format 'prompts': the tokenizer's chat template cannot render row {row}"
                                      f" of {self.dataset!r}: {type(error).__name__}: {error}") from None
            for (row, _, _), whole in zip(chunk, self.ids([prompt for _, prompt, _ in chunk], texts), strict=True):
                ids = whole[-self.max_prompt_length:] if self.max_prompt_length else whole
                if not ids:
                    raise ConfigError(f"data.format 'prompts': row {row} of {self.dataset!r}: its prompt encodes to "
                                      f"no tokens: the first completion token would be sampled from nothing")
                tokens.append(np.asarray(ids, dtype=np.int64))
        return Prompts([p for _, p, _ in rows], [c for _, _, c in rows], tokens, [r for r, _, _ in rows], variables)


__all__ = ["FIELD", "RESERVED", "PromptEncoder", "Prompts", "check_prompt", "load_prompt_rows", "prompts_digest"]
