"""Weighted data mixtures (``data.mixture``): several datasets blended into one block stream by share.

Each source is read, split, tokenized and cached exactly as a single ``data.dataset`` is (:func:`build_data`
with the source's settings), so a source shared by two runs shares its token cache, and with the same
tokenizer a new weight tokenizes nothing again. One tokenizer serves every source: ``data.tokenizer``, the copy a resumed run saved,
or a byte-level BPE trained once on a sample of all the sources' training documents in proportion to their
shares.

The blend is a fixed schedule, no random draw (Megatron's ``BlendedDataset`` rule): block ``b`` of the stream
comes from the source furthest behind its share, ``argmax_i share_i · (b + 1) − taken_i`` (ties to the first
source), so after any ``n`` blocks each source has supplied its share of them to within one block when there are
two or three sources. With more, the greedy rule can leave one a little further behind (shares 4, 1, 42, 49 and 4
in 100: 1.06 blocks; random draws of up to 32 sources, at most 1.29): a bound of one block needs another rule, which
would move every block of a resumed mixture. Each source
hands out its own blocks in the order of its own per-epoch permutation (:class:`PackedData`'s, seeded by
``train.seed``, so a mixture of one source is that dataset's run): a source
whose share outruns its size is repeated epoch after epoch, a large one only partly read. The stream is cut
into global batches and rank slices as :class:`PackedData` cuts its own, so the data position is still one
integer, and the global batch does not depend on the world size.

Streamed (``data.streaming``): each source streams as a single dataset does, and each rank blends its own
per-source block streams with the same rule over its own block index.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retnet.train.chat import (
    CHAT_COLUMNS,
    COMPLETION,
    PROMPT,
    check_conversations,
    check_prompt_completions,
    messages_column,
    prompt_completion,
    render_default,
    target_count,
)
from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import (
    MaskedBlocks,
    _atomic_dir,
    _check_text_field,
    _field,
    _hash,
    _hf_dataset,
    _hub_changed,
    _hub_stream,
    _reading,
    build_data,
    data_cache_dir,
    data_fingerprint,
    load_conversations,
    load_documents,
    load_hub,
    local_files,
    masked_micro_batches,
    split_documents,
    stdlib_files,
    train_tokenizer,
)
from retnet.train.streaming import stream_columns

logger = logging.getLogger(__name__)

# The schedule repeats after as many blocks as the shares' common denominator; shares whose denominator is
# larger (weights of many digits) are rounded to multiples of 1 / MAX_PERIOD.
MAX_PERIOD = 1 << 16


class MixtureSchedule:
    """Which source each block of the stream comes from: the greedy rule over integer counts ``counts`` per
    period of ``period = sum(counts)`` blocks. After a whole period every source has exactly its count, so
    the schedule repeats, and the source and place of any block is found without walking the stream."""

    def __init__(self, shares: list[Fraction]):
        period = math.lcm(*(share.denominator for share in shares))
        if period <= MAX_PERIOD:
            counts = [int(share * period) for share in shares]
        else:  # largest remainders, each source at least one block a period
            period = MAX_PERIOD
            exact = [share * period for share in shares]
            counts = [max(1, math.floor(value)) for value in exact]
            by_remainder = sorted(range(len(shares)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
            for i in by_remainder[: max(period - sum(counts), 0)]:
                counts[i] += 1
            period = sum(counts)
        self.counts, self.period = counts, period
        self.source = np.empty(period, dtype=np.int64)  # of each block of a period
        self.index = np.empty(period, dtype=np.int64)  # its place among that source's blocks of the period
        taken = [0] * len(counts)
        for block in range(period):  # integers: share_i · (b + 1) − taken_i, times the period
            behind = [count * (block + 1) - period * took for count, took in zip(counts, taken, strict=True)]
            chosen = behind.index(max(behind))
            self.source[block], self.index[block] = chosen, taken[chosen]
            taken[chosen] += 1

    def shares(self) -> list[float]:
        return [count / self.period for count in self.counts]

    def place(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, the index of the block among that source's blocks) of each of the stream's ``blocks``."""
        cycles, within = np.divmod(np.asarray(blocks, dtype=np.int64), self.period)
        source = self.source[within]
        return source, cycles * np.asarray(self.counts, dtype=np.int64)[source] + self.index[within]


# ----------------------------------------------------------------------------------------------------------
# Packed (cached) sources
# ----------------------------------------------------------------------------------------------------------
class MixedData:
    """:class:`~retnet.train.data.PackedData`'s interface over several of them (``sources``, in the mixture's
    order), blended by ``schedule``. The data position ``consumed`` counts blocks of the blended stream."""

    step_targets_per_rank = False  # as PackedData's: every rank counts the whole global batch

    def __init__(self, labels: list[str], sources: list, schedule: MixtureSchedule, *, micro_batch: int,
                 global_batch: int, rank: int, world_size: int):
        self.labels, self.sources, self.schedule = labels, sources, schedule
        self.micro_batch, self.global_batch, self.rank, self.world_size = micro_batch, global_batch, rank, world_size
        self.tokenizer = sources[0].tokenizer
        self.consumed = 0
        self.step_targets: int | None = None
        self.hub_fingerprint: dict[str, str | None] = {}

    @property
    def seq_len(self) -> int:
        return self.sources[0].seq_len

    @property
    def masked(self) -> bool:
        return self.sources[0].masked

    @property
    def train_tokens(self) -> int:
        return sum(source.train_tokens for source in self.sources)

    def global_blocks(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, row of that source's training array) of the stream's blocks ``start .. start + count``."""
        which, index = self.schedule.place(np.arange(start, start + count))
        rows = np.empty(count, dtype=np.int64)
        for i, source in enumerate(self.sources):
            mine = np.flatnonzero(which == i)
            if len(mine):  # a source's blocks within a run of the stream are consecutive places of its own
                rows[mine] = source.block_rows(int(index[mine[0]]), len(mine))
        return which, rows

    def _rows(self, which: np.ndarray, rows: np.ndarray, flags: bool = False) -> np.ndarray:
        """``[len(rows), seq_len]``: the tokens (or, with ``flags``, the chat flags) of each source's row."""
        arrays = [source.train_flags if flags else source.train for source in self.sources]
        return np.stack([arrays[i][row] for i, row in zip(which.tolist(), rows.tolist(), strict=True)])

    def micro_batches(self, accum: int) -> list:
        """This rank's ``accum`` micro-batches ``[micro_batch, seq_len]`` (int64) of the next step: slice
        ``(m · world + rank)`` of the global batch, as PackedData's; :class:`MaskedBlocks` for chat data."""
        which, rows = self.global_blocks(self.consumed, self.global_batch)
        self.consumed += self.global_batch
        if self.masked:
            self.step_targets = target_count(self._rows(which, rows, flags=True))
        out = []
        for m in range(accum):
            part = slice((m * self.world_size + self.rank) * self.micro_batch,
                         (m * self.world_size + self.rank + 1) * self.micro_batch)
            tokens = torch.from_numpy(self._rows(which[part], rows[part]).astype(np.int64))
            if self.masked:
                tokens = MaskedBlocks(tokens, torch.from_numpy(self._rows(which[part], rows[part], flags=True)))
            out.append(tokens)
        return out

    def val_groups(self, max_blocks: int) -> dict[str, list]:
        """This rank's validation micro-batches of each source (label -> batches), ``max_blocks`` shared
        equally by the sources (at least one block each), so a source of a small share is measured as well as a
        large one. Each source's part is rounded as a single dataset's ``max_blocks`` is (down to a multiple of
        the world size)."""
        each = max(1, max_blocks // len(self.sources))
        return {label: source.val_batches(each) for label, source in zip(self.labels, self.sources, strict=True)}

    def val_batches(self, max_blocks: int) -> list:
        """Every source's validation micro-batches (:meth:`val_groups`), pooled."""
        return [batch for batches in self.val_groups(max_blocks).values() for batch in batches]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "packed", "consumed": self.consumed, "mixture": list(self.labels)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "packed" or state.get("mixture") != self.labels:
            raise ValueError(f"data state of kind {state.get('kind')!r}, mixture {state.get('mixture')!r} cannot "
                             f"resume the mixture {self.labels} (non-streaming)")
        self.consumed = int(state["consumed"])


# ----------------------------------------------------------------------------------------------------------
# Streamed sources
# ----------------------------------------------------------------------------------------------------------
class MixedStreamingData:
    """Streamed sources (:class:`~retnet.train.streaming.StreamingData`, one per source, each split by node) blended
    on each rank by ``schedule`` over this rank's own block index ``position``. A checkpoint holds every
    source's stream state and the position; a resume continues each stream where it stood."""

    step_targets_per_rank = True  # each rank reads its own part of every stream: the trainer sums the counts

    def __init__(self, labels: list[str], sources: list, schedule: MixtureSchedule, *, micro_batch: int):
        self.labels, self.sources, self.schedule, self.micro_batch = labels, sources, schedule, micro_batch
        self.tokenizer = sources[0].tokenizer
        self.seq_len = sources[0].seq_len
        self.masked = sources[0].masked
        self.train_tokens = None
        self.position = 0
        self.step_targets: int | None = None
        self.hub_fingerprint: dict[str, str | None] = {}

    def _next_block(self):
        which = int(self.schedule.place(np.asarray([self.position]))[0][0])
        self.position += 1
        source = self.sources[which]
        # a stream fails only when read (a rank without training documents, a later file that does not fit, a bad
        # chat row): named by its source's key, as the build's errors are, not by a data.dataset the run never set
        with _naming(self.labels[which], source.dataset):
            return source._next_block()

    def micro_batches(self, accum: int) -> list:
        if not self.masked:
            return [torch.from_numpy(np.stack([self._next_block() for _ in range(self.micro_batch)]))
                    for _ in range(accum)]
        batches = masked_micro_batches(self._next_block, self.micro_batch, accum)
        self.step_targets = sum(target_count(batch.flags.numpy()) for batch in batches)
        return batches

    val_groups = MixedData.val_groups
    val_batches = MixedData.val_batches

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "streaming", "position": self.position, "mixture": list(self.labels),
                "sources": {label: source.state_dict() for label, source in zip(self.labels, self.sources,
                                                                                 strict=True)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "streaming" or state.get("mixture") != self.labels:
            raise ValueError(f"data state of kind {state.get('kind')!r}, mixture {state.get('mixture')!r} cannot "
                             f"resume the streamed mixture {self.labels}")
        self.position = int(state["position"])
        for label, source in zip(self.labels, self.sources, strict=True):
            source.load_state_dict(state["sources"][label])


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------
def build_mixture(cfg: DataConfig, *, vocab_size: int, seed: int, micro_batch: int, global_batch: int, rank: int,
                  local_rank: int, world_size: int, tokenizer_dir: Path | None, barrier: Callable[[], None],
                  hub_fingerprint: dict[str, str | None] | str | None = None):
    """:func:`~retnet.train.data.build_data` of a ``data.mixture`` (it calls this one): every source built by
    build_data with its own settings and one tokenizer, blended. ``hub_fingerprint``: a resumed checkpoint's,
    label -> that source's."""
    sources = cfg.sources()
    labels = [label for label, _, _ in sources]
    expected = hub_fingerprint if isinstance(hub_fingerprint, dict) else {}
    tokenizer_path = tokenizer_dir  # else data.tokenizer, which every source's settings hold, or the mixture's BPE
    if tokenizer_path is None and not cfg.tokenizer:
        tokenizer_path = _mixture_tokenizer(cfg, vocab_size=vocab_size, local_rank=local_rank, barrier=barrier,
                                            hub_fingerprint=expected)
    built = []
    for label, _, source_cfg in sources:
        with _naming(label, source_cfg.dataset):
            # train.seed as a single dataset's: a source's order depends on nothing else (not the other sources
            # or the weights), and a mixture of one source is that dataset's run, batch for batch
            built.append(build_data(source_cfg, vocab_size=vocab_size, seed=seed,
                                    micro_batch=micro_batch, global_batch=global_batch, rank=rank,
                                    local_rank=local_rank, world_size=world_size, tokenizer_dir=tokenizer_path,
                                    barrier=barrier, hub_fingerprint=expected.get(label)))
    schedule = MixtureSchedule([share for _, share, _ in sources])
    if cfg.streaming:
        data = MixedStreamingData(labels, built, schedule, micro_batch=micro_batch)
    else:
        data = MixedData(labels, built, schedule, micro_batch=micro_batch, global_batch=global_batch, rank=rank,
                         world_size=world_size)
    data.hub_fingerprint = {label: source.hub_fingerprint for label, source in zip(labels, built, strict=True)}
    _log_shares(labels, built, schedule)
    return data


def _log_shares(labels: list[str], built: list, schedule: MixtureSchedule) -> None:
    """Each source's share and, cached, its blocks and how many times over one pass of the mixture (as many
    blocks as all the sources hold) reads it."""
    shares = schedule.shares()
    if built[0].train_tokens is None:  # streamed: sizes unknown
        for label, share in zip(labels, shares, strict=True):
            logger.info("data: mixture source %s: %.1f%% of the blocks (streamed)", label, 100 * share)
        return
    total = sum(len(source.train) for source in built)
    for label, share, source in zip(labels, shares, built, strict=True):
        logger.info("data: mixture source %s: %.1f%% of the blocks, %d train + %d val blocks, read %.2f times "
                    "per pass of the mixture (%d blocks)", label, 100 * share, len(source.train), len(source.val),
                    share * total / len(source.train), total)


@contextlib.contextmanager
def _naming(label: str, dataset: str) -> Iterator[None]:
    """A source's errors prefixed with its key, ``data.mixture.<label>``: build_data (and a stream as it is read)
    names the settings (``data.dataset``, ``data.text_field``) it reads as if they were the run's."""
    try:
        yield
    except (ConfigError, FileNotFoundError) as error:
        if str(error).startswith("data.mixture."):
            raise
        message = f"data.mixture.{label} (dataset {dataset!r}): {error}"
        try:
            renamed = type(error)(message)
        except TypeError:  # a subclass whose constructor takes more (huggingface_hub's IncompleteSnapshotError)
            renamed = (ConfigError if isinstance(error, ConfigError) else FileNotFoundError)(message)
        raise renamed from error


def _mixture_tokenizer(cfg: DataConfig, *, vocab_size: int, local_rank: int, barrier: Callable[[], None],
                       hub_fingerprint: dict[str, str | None]) -> Path:
    """The directory of the BPE the mixture trains when no tokenizer is given: trained once by local rank 0 on
    up to ``tokenizer_train_chars`` characters of the sources' training documents, each source's part its
    share, cached under a key of the sources, their shares and the vocabulary size. ``hub_fingerprint``: a
    resumed checkpoint's, label -> that source's."""
    cache_dir = data_cache_dir(cfg)
    sources = cfg.sources()
    read = []
    for label, _, source_cfg in sources:
        with _naming(label, source_cfg.dataset):
            read.append(_source_reader(source_cfg, cache_dir, local_rank, barrier, hub_fingerprint.get(label)))
    # What the sample is made of, in order; not the labels, which name the sources and read nothing
    key = _hash([(str(share), fingerprint) for (_, share, _), (fingerprint, _) in zip(sources, read, strict=True)],
                vocab_size, cfg.tokenizer_train_chars, cfg.format)
    path = cache_dir / f"tokenizer-mixture-{key}"
    if local_rank == 0 and not (path / "tokenizer.json").exists():
        texts = []
        for (label, share, source_cfg), (_, documents) in zip(sources, read, strict=True):
            budget = math.floor(share * cfg.tokenizer_train_chars)
            with _naming(label, source_cfg.dataset):
                for text in documents():
                    texts.append(text[:budget])
                    budget -= len(texts[-1])
                    if budget <= 0:
                        break
        logger.info("data: training a %d-token byte-level BPE on %d characters of the mixture's sources", vocab_size,
                    sum(map(len, texts)))
        trained = train_tokenizer(texts, vocab_size, cfg.tokenizer_train_chars)
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_dir(path, lambda tmp: trained.save_pretrained(tmp))
    barrier()
    return path


def _source_reader(cfg: DataConfig, cache_dir: Path, local_rank: int, barrier: Callable[[], None],
                   expected: str | None) -> tuple[str, Callable[[], Iterator[str]]]:
    """(the source's data fingerprint, its training documents as a BPE is trained on them: the text, or the
    conversation rendered with the default template), read as build_data reads them. ``expected``: the
    fingerprint of the hub data a resumed checkpoint was trained on, which the source is held to."""
    chat = cfg.format == "chat"
    files = stdlib_files()[: cfg.max_documents or None] if cfg.dataset == "stdlib" else local_files(cfg.dataset)
    # As build_data's: a resume knows its hub data by the fingerprint, and with the BPE cached needs no copy of
    # a non-streamed set (offline, the HF cache cleared); it loads one only to read its documents
    hub, loaded = expected, None
    if files is None and cfg.streaming:
        stream, hub = _hub_stream(cfg, cache_dir, check_files=local_rank == 0)
    elif files is None and expected is None:
        loaded, hub = load_hub(cfg, cache_dir, local_rank, barrier)
    if files is None and expected is not None and hub != expected:
        raise _hub_changed(cfg)  # before a BPE is trained on the other data, only for build_data to refuse it
    fingerprint = data_fingerprint(cfg, files, hub)

    def cached() -> Iterator[str]:
        nonlocal loaded
        if files is None and loaded is None:
            loaded = _hf_dataset(cfg, None, cache_dir, streaming=False)
            if getattr(loaded, "_fingerprint", None) != hub:  # datasets' private identity, as build_data reads it
                raise _hub_changed(cfg)
        read = load_conversations if chat else load_documents
        train, _ = split_documents(read(cfg, files, cache_dir, loaded), cfg.val_fraction, dataset=cfg.dataset,
                                   max_documents=cfg.max_documents)
        yield from (render_default(c) for _, c in train) if chat else train

    def streamed() -> Iterator[str]:
        # The stream's first val_documents rows are its validation split (build_data also holds their
        # repeats out; for a tokenizer's sample that makes no difference worth a second pass).
        rows = stream if files is None else _hf_dataset(cfg, files, cache_dir, streaming=True)
        if cfg.max_documents:
            rows = rows.take(cfg.max_documents)
        # TRL's ShareGPT column stands in for a missing default one; TRL's prompt-completion rows for either
        with _reading(cfg.dataset, *_field(cfg)):  # (stream_columns may read the first row)
            columns = stream_columns(rows)
        pairs = chat and prompt_completion(cfg.messages_field, columns)
        field = messages_column(cfg.messages_field, columns) if chat else cfg.text_field
        if not chat:  # refused as build_data refuses it, not after a read of the whole stream finding no text
            _check_text_field(cfg, columns)
        with _reading(cfg.dataset, field, "data.messages_field" if chat else "data.text_field"):
            for index, row in enumerate(rows):
                if index < cfg.val_documents or not row.get(COMPLETION if pairs else field):
                    continue
                if chat:
                    columns = {name: [row[name]] for name in CHAT_COLUMNS if name in row}
                    kept = (
                        [c for _, c in check_prompt_completions(cfg.dataset, [row[PROMPT]], [row[COMPLETION]],
                                                                first_row=index, columns=columns)]
                        if pairs else check_conversations(cfg.dataset, field, [row[field]], first_row=index,
                                                          columns=columns))
                    yield from (render_default(c) for c in kept)
                elif isinstance(row[field], str):
                    yield row[field]

    return fingerprint, streamed if cfg.streaming else cached


__all__ = ["MAX_PERIOD", "MixedData", "MixedStreamingData", "MixtureSchedule", "build_mixture"]

