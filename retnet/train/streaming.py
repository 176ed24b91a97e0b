"""Streamed data (``data.streaming``): documents or conversations read as they come, packed into blocks on the fly,
each rank reading its own part of the stream, with a data position that resumes without reading the stream again.
:func:`retnet.train.data.build_data` builds it through :func:`build_streaming`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from retnet.train.chat import (
    BOUNDARY,
    COMPLETION,
    PROMPT,
    ROW_COLUMNS,
    TARGET,
    ChatEncoder,
    Completion,
    check_conversations,
    check_prompt_completions,
    messages_column,
    prompt_completion,
    render_default,
    target_count,
    without_spilled_targets,
)
from retnet.train.config import ConfigError
from retnet.train.data import (
    MaskedBlocks,
    PackedData,
    _atomic_dir,
    _blocks,
    _check_text_field,
    _check_texts,
    _field,
    _hash,
    _reading,
    _require_targets,
    chat_blocks,
    document_encoder,
    document_prefix,
    encode_documents,
    indexed_conversations,
    is_document,
    load_tokenizer,
    masked_micro_batches,
    train_tokenizer,
)

logger = logging.getLogger("retnet.train.data")  # the data pipeline's one logger, streamed or not
class StreamingData:
    """On-the-fly packing of a streamed dataset; each rank reads its own part (split by node).

    Its data position is where this rank's stream stands: the epoch, the documents of that epoch read so far,
    ``datasets``' own state of the stream after them (``IterableDataset.state_dict``) and the tokens read but
    not packed into a block yet. A resume restarts the stream from that state and tokenizes none of the
    documents read before: after billions of tokens, tokenizing them again only to find the place takes hours."""

    masked, val_flags = False, None  # text: chat data is StreamingChatData's
    field_key = "data.text_field"  # the setting of text_field, which a read error names

    def __init__(self, stream, val_blocks: np.ndarray, tokenizer, *, text_field: str, seq_len: int,
                 micro_batch: int, rank: int, world_size: int, dataset: str = "", val_documents: int = 0,
                 by_examples: bool = False):
        if len(val_blocks) == 0:  # (build_streaming refuses it first, with its documents and tokens)
            raise _validation_too_short(dataset, val_documents, seq_len)
        # Local files split by example (:func:`_rank_split`); a checkpoint's own split is kept on resume
        self._whole = stream
        self._split = "examples" if by_examples and world_size > 1 and _splits_by_examples() else "auto"
        if by_examples and world_size > 1 and self._split == "auto" and rank == 0:
            logger.warning("data: this datasets' split_dataset_by_node takes no strategy: the ranks are handed "
                           "whole files, of unequal sizes unequal parts (a newer datasets splits them by document)")
        self.stream = _rank_split(stream, rank, world_size, self._split)
        self.val, self.tokenizer, self.text_field = val_blocks, tokenizer, text_field
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world_size = rank, world_size
        self.dataset, self.val_documents = dataset, val_documents  # for the error of a stream without documents
        self.position = 0  # blocks this rank has consumed
        self.hub_fingerprint: str | None = None  # of a hub dataset: a checkpoint keeps it for its resume
        self.train_tokens = None
        self._encoder = document_encoder(tokenizer)
        self._prefix = document_prefix(tokenizer)  # each document's first ids, as encode_documents'
        self._epoch = 0
        self._documents = 0  # examples of this epoch read, empty ones too: they count in the stream's order
        self._seen = False  # a non-empty document in this epoch: an epoch without one would loop for ever
        self._buffer: list[int] = []  # tokens read; those from _head on are not in a block yet
        self._head = 0
        self._examples: Iterator[dict] | None = None  # this epoch's, once opened
        self._stream_state: dict | None = None  # datasets' state of a checkpoint, for the next opening
        self._replay = False  # a checkpoint without the fields above: regenerate its position blocks

    def _open(self) -> None:
        self.stream.set_epoch(self._epoch)
        state, self._stream_state = self._stream_state, None
        if state is not None:
            self.stream.load_state_dict(state)
            self._examples = iter(self.stream)
        else:
            # Read, not tokenized: documents cost their reading only (datasets' state, where usable, skips
            # whole shards without opening them).
            self._examples = itertools.islice(iter(self.stream), self._documents, None)

    def _next_example(self) -> dict:
        """The next example whose ``text_field`` holds a document (:func:`is_document`), from the next epoch at the
        end of this one."""
        while True:
            if self._examples is None:
                self._open()
            try:
                example = next(self._examples, None)
            except OSError:  # a file gone or a hub connection: not a fault of the data
                raise
            except Exception as error:
                # datasets types the stream's columns from its first rows and fails on a later file that does
                # not fit them only when it gets there: named as the build's reads name it, not a bare TypeError
                with _reading(self.dataset, self.text_field, self.field_key):
                    raise error
            if example is None:
                self._end_epoch()
                continue
            self._documents += 1
            if is_document(example[self.text_field]):
                self._seen = True
                return example

    def _end_epoch(self) -> None:
        """The end of this rank's part of the stream: the next epoch starts over it."""
        if not self._seen:  # (an epoch without a document would loop for ever)
            raise _no_training_documents(self.dataset, self.val_documents, self.rank, self.world_size)
        self._epoch, self._documents, self._seen, self._examples = self._epoch + 1, 0, False, None

    def _append(self, example: dict) -> None:
        """Tokenize ``example`` onto the end of the buffer, as :func:`~retnet.train.data.encode_documents` does."""
        ids = self._encoder.encode(example[self.text_field], add_special_tokens=False).ids
        self._buffer.extend([*self._prefix, *ids, self.tokenizer.eos_token_id])

    def _drop_packed(self) -> None:
        # Packed tokens are dropped only here, once per document read: deleting each block from the front
        # shifts the rest of a long document every time, quadratic in its length.
        del self._buffer[: self._head]
        self._head = 0

    def _pack(self) -> np.ndarray:
        while len(self._buffer) - self._head < self.seq_len:
            self._drop_packed()
            self._append(self._next_example())
        block = np.asarray(self._buffer[self._head: self._head + self.seq_len], dtype=np.int64)
        self._head += self.seq_len
        return block

    def _next_block(self):
        if self._replay:
            self._replay = False
            for _ in range(self.position):
                self._pack()
        self.position += 1
        return self._pack()

    def micro_batches(self, accum: int) -> list[torch.Tensor]:
        return [torch.from_numpy(np.stack([self._next_block() for _ in range(self.micro_batch)])) for _ in range(accum)]

    val_batches = PackedData.val_batches

    def state_dict(self) -> dict[str, Any]:
        import datasets

        if self._replay:  # nothing read since the resume from an old checkpoint: still its position
            return {"kind": "streaming", "position": self.position}
        stream = self.stream.state_dict() if self._examples is not None else self._stream_state
        return {"kind": "streaming", "position": self.position, "epoch": self._epoch, "documents": self._documents,
                "seen": self._seen, "buffer": np.asarray(self._buffer[self._head:], dtype=np.uint32), "stream": stream,
                "datasets_version": datasets.__version__, "split": self._split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import datasets

        if state.get("kind") != "streaming":
            raise ValueError(f"data state of kind {state.get('kind')!r} cannot resume a streaming run")
        self.position, self._examples = int(state["position"]), None
        # A checkpoint of before the split by example read its ranks' parts as datasets' default split gave them
        split = state.get("split", "auto") if "documents" in state else "auto"
        if split != self._split:
            if split == "examples" and not _splits_by_examples():
                # (ConfigError: one line from retnet-train, not a traceback on every rank)
                raise ConfigError(f"this streamed checkpoint split its local files between the ranks by example, "
                                 f"which datasets {datasets.__version__} cannot: install the datasets it was "
                                 f"written with ({state.get('datasets_version')})")
            self._split = split
            self.stream = _rank_split(self._whole, self.rank, self.world_size, split)
        if "documents" not in state:
            # Written before the stream's place was saved: tokenize the stream again up to the position.
            if self.position:
                logger.warning("data: this checkpoint holds only the number of blocks read from the stream; "
                               "regenerating %d blocks (every document before them is tokenized again)",
                               self.position)
            self._replay = True
            self._epoch, self._documents, self._seen, self._buffer, self._stream_state = 0, 0, False, [], None
            self._head = 0
            return
        self._replay = False
        self._epoch, self._documents = int(state["epoch"]), int(state["documents"])
        self._seen = bool(state.get("seen", self._documents > 0))  # empty documents are read but not seen
        self._buffer, self._head = [int(t) for t in state["buffer"]], 0
        stream = state.get("stream")
        # datasets' state is its own format: another version may read it otherwise, and an epoch other than
        # ours would make it start the epoch over. The document count holds in any version.
        usable = (stream is not None and state.get("datasets_version") == datasets.__version__
                  and stream.get("epoch") == self._epoch)
        if stream is not None and not usable:
            logger.info("data: the checkpoint's stream state is of datasets %s (this is %s); skipping %d "
                        "documents by reading them", state.get("datasets_version"), datasets.__version__,
                        self._documents)
        self._stream_state = stream if usable else None


def _splits_by_examples() -> bool:
    """Whether this ``datasets``' split_dataset_by_node takes a ``strategy`` (newer ones)."""
    import inspect

    from datasets.distributed import split_dataset_by_node

    return "strategy" in inspect.signature(split_dataset_by_node).parameters


def _rank_split(stream, rank: int, world_size: int, split: str):
    """This rank's part of ``stream``: ``"auto"`` is datasets' default, whole shards (files) per rank when their
    number is a multiple of the world size, else every ``world_size``-th example; ``"examples"`` always the latter.
    Local files of unequal sizes are split by example: by shards, a rank given a small file trained on its few
    documents pass after pass (half of every global batch, on two ranks), while a large file's rank read a part of
    it. Each rank then reads every file, which local files afford; a hub set's shards, streamed over the network
    and written to be of equal sizes, are still handed out whole."""
    from datasets.distributed import split_dataset_by_node

    if split == "auto":
        return split_dataset_by_node(stream, rank=rank, world_size=world_size)
    return split_dataset_by_node(stream, rank=rank, world_size=world_size, strategy=split)


# The column a streamed chat set gets with each row's index in the stream, which its errors name: datasets counts
# it as rows are read, and its stream state keeps the count across a resume.
STREAM_ROW = "__retnet_stream_row__"


def stream_conversation(dataset: str, field: str, example: dict,
                        pairs: bool = False) -> list[dict[str, Any]] | Completion | None:
    """The conversation of a streamed chat row (``example`` of a stream with :data:`STREAM_ROW`), None for an
    empty one; a row that holds no conversation is refused naming its index in the stream. ``pairs``: the stream's
    rows are TRL's prompt-completion ones (``field`` is not read), None for one with an empty completion."""
    # TRL's, for the template, and ShareGPT's, which check_conversations reads where the field is empty
    columns = {name: [example[name]] for name in ROW_COLUMNS if name in example}
    if pairs:
        kept = check_prompt_completions(dataset, [example[PROMPT]], [example[COMPLETION]],
                                        first_row=example[STREAM_ROW], columns=columns)
        return kept[0][1] if kept else None
    kept = check_conversations(dataset, field, [example[field]], first_row=example[STREAM_ROW], columns=columns)
    return kept[0] if kept else None


class StreamingChatData(StreamingData):
    """Streamed chat data: conversations encoded as the token cache encodes them (:class:`ChatEncoder`), their
    flags packed in lockstep with their tokens. Each block's flags are cleared of a conversation's part that
    spills into it as the cached blocks' are (:func:`~retnet.train.chat.without_spilled_targets`), which needs
    only whether the block before ended with a closing EOS; a checkpoint keeps that and the flags of the
    buffered tokens.

    ``stream``'s rows carry :data:`STREAM_ROW`. ``step_targets`` counts the targets of this rank's micro-batches
    only (the other ranks read other rows): the trainer sums it over the ranks. ``pairs``: the rows are TRL's
    prompt-completion ones; ``messages_field`` is then their completion column, which an empty row has empty."""

    masked = True
    step_targets_per_rank = True
    field_key = "data.messages_field"

    def __init__(self, stream, val_blocks: np.ndarray, val_flags: np.ndarray, tokenizer, *, messages_field: str,
                 seq_len: int, micro_batch: int, rank: int, world_size: int, dataset: str = "",
                 val_documents: int = 0, assistant_only_loss: bool = True, pairs: bool = False,
                 by_examples: bool = False):
        super().__init__(stream, val_blocks, tokenizer, text_field=messages_field, seq_len=seq_len,
                         micro_batch=micro_batch, rank=rank, world_size=world_size, dataset=dataset,
                         val_documents=val_documents, by_examples=by_examples)
        _require_targets("validation", val_flags, dataset, "data.val_documents")
        self.val_flags, self.pairs = val_flags, pairs
        self.step_targets: int | None = None
        self._chat = ChatEncoder(tokenizer, assistant_only_loss, dataset)
        self._flags: list[int] = []  # those of _buffer, index for index
        self._continued = False  # the last block packed ended inside a conversation
        self._taught = False  # a block packed so far held a target

    def _append(self, example: dict) -> None:
        conversation = stream_conversation(self.dataset, self.text_field, example, self.pairs)
        ids, flags = self._chat.encode([conversation], rows=[example[STREAM_ROW]])
        self._buffer.extend(ids.tolist())
        self._flags.extend(flags.tolist())

    def _drop_packed(self) -> None:
        del self._flags[: self._head]
        super()._drop_packed()

    def _pack(self) -> tuple[np.ndarray, np.ndarray]:
        tokens = super()._pack()  # (it drops packed tokens and their flags before it cuts a block)
        flags = np.asarray(self._flags[self._head - self.seq_len: self._head], dtype=np.uint8)
        flags = without_spilled_targets(flags[None], continued=self._continued)[0]
        self._continued = not (flags[-1] & BOUNDARY)
        self._taught = self._taught or target_count(flags[None]) > 0
        return tokens, flags

    def _end_epoch(self) -> None:
        # A whole pass without a target trains on nothing (every step's loss 0, its gradient 0), as a cached
        # training split without targets would, which is refused at the start: a stream is known only once read.
        # The buffered tokens, not packed yet, count with their flags as encoded. Only the first pass: a later one
        # packs the stream at other offsets, where its few answers may all spill into a next block.
        if self._seen and not (self._taught or any(f & TARGET for f in self._flags[self._head:])):
            if self.world_size == 1:
                raise _no_training_targets(self.dataset, self.val_documents)
            # One rank's part alone: the others' targets may still teach (the loss is over the global batch's
            # targets), which this rank cannot know without a collective here; its blocks add nothing.
            logger.warning("data: data.dataset %r streamed no target tokens to rank %d of %d in a whole pass: its "
                           "blocks add nothing to the loss (a run whose ranks all say so learns nothing)",
                           self.dataset, self.rank, self.world_size)
        self._taught = True
        super()._end_epoch()

    def micro_batches(self, accum: int) -> list[MaskedBlocks]:
        """This rank's ``accum`` micro-batches of the next step, as :class:`MaskedBlocks`."""
        batches = masked_micro_batches(self._next_block, self.micro_batch, accum)
        self.step_targets = sum(target_count(batch.flags.numpy()) for batch in batches)
        return batches

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if "buffer" in state:
            state.update(flags=np.asarray(self._flags[self._head:], dtype=np.uint8), continued=self._continued,
                         taught=self._taught)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "documents" not in state:  # regenerated from the stream's start, as the blocks are
            self._flags, self._continued, self._taught = [], False, False
            return
        if "flags" not in state or len(state["flags"]) != len(state["buffer"]):
            raise ValueError(f"streamed chat data state without the flags of its {len(state['buffer'])} buffered "
                             f"tokens (a text run's state?): it cannot resume chat data")
        self._flags, self._continued = [int(f) for f in state["flags"]], bool(state["continued"])
        # a checkpoint of before it was kept: its epoch is taken as taught (not refused on a guess)
        self._taught = bool(state.get("taught", True))


def group_micro_batches(data, accum: int, *, source: int, group, device: torch.device) -> list:
    """The next ``accum`` micro-batches of streamed ``data`` (:class:`StreamingData`, :class:`StreamingChatData` or a
    streamed mixture) on every rank of a context-parallel ``group``: global rank ``source``, the group's first, reads
    and tokenizes them, and one broadcast hands them to the others, whose streams stay unread. The ranks of a group
    train on the same blocks, which each would otherwise read and tokenize itself (C times the data pipeline's
    work). Only ``source``'s data position moves: a resume gives every rank of a group its first rank's.

    Returns what ``data.micro_batches`` does, on the CPU: ``[B, T]`` int64 tensors, or for chat data
    :class:`MaskedBlocks` (uint8 flags; ``data.step_targets`` is set on ``source`` only)."""
    import torch.distributed as dist

    masked = data.masked
    batches = data.micro_batches(accum) if dist.get_rank() == source else None
    if batches is not None:
        wire = torch.stack([torch.stack([b.tokens, b.flags.long()]) if masked else b[None] for b in batches])
        wire = wire.to(device)  # NCCL broadcasts device tensors
    else:
        wire = torch.empty(accum, 2 if masked else 1, data.micro_batch, data.seq_len, dtype=torch.int64,
                           device=device)
    dist.broadcast(wire, src=source, group=group)
    if batches is not None:
        return batches
    wire = wire.cpu()
    return [MaskedBlocks(w[0], w[1].to(torch.uint8)) if masked else w[0] for w in wire]


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------


def build_streaming(cfg, stream, cache_dir, fingerprint, source, *, vocab_size, micro_batch, rank, local_rank,
                     world_size, barrier, local_files: bool = False):
    """Streamed data of ``stream`` for this rank. ``local_files``: the stream reads local data files, which the
    ranks split by example (:func:`_rank_split`)."""
    chat = cfg.format == "chat"
    with _reading(cfg.dataset, *_field(cfg)):  # a stream reads its files from here on, lazily
        # text too: a stream of CSV or text files names no columns before it is read, and a data.text_field that is
        # none of them failed at the first row as a bare KeyError
        columns = stream_columns(stream)
    pairs = chat and prompt_completion(cfg.messages_field, columns)  # TRL's prompt-completion rows
    if chat:  # TRL's ShareGPT column stands in for a missing default one
        cfg = dataclasses.replace(cfg, messages_field=messages_column(cfg.messages_field, columns))
    # the column whose empty rows are skipped: a prompt-completion row's completion
    field = COMPLETION if pairs else _field(cfg)[0]
    if not pairs:
        _check_text_field(cfg, columns)
    if cfg.max_documents:
        # One shard, read whole by every rank, which keeps every world_size-th document: split_dataset_by_node
        # would split the taken documents between the ranks' own whole shards, each rank taking max_documents /
        # world_size of its own files, not its part of the first max_documents.
        import datasets

        limited = stream.take(cfg.max_documents)
        stream = datasets.IterableDataset.from_generator(lambda: iter(limited))
    if chat:  # a conversation is refused or fails its template long after it is read: name its row then
        stream = stream.map(lambda _, row: {STREAM_ROW: row}, with_indices=True)
    val_stream = stream.take(cfg.val_documents)
    # Not stream.skip(n): when split_dataset_by_node hands each rank whole shards, datasets splits the n skipped
    # documents between the ranks' own shards, so rank 0 would train on part of the validation split.
    with _reading(cfg.dataset, *_field(cfg)):
        val_rows = list(val_stream)
    val_texts = [e[field] for e in val_rows]
    if chat:
        # read from the rows, as stream_conversation reads a training row's: a stream may not know its columns
        # (None), and a validation row rendered without its tools would not hold its repeats out of training
        val_columns = {name: [e.get(name) for e in val_rows] for name in ROW_COLUMNS
                       if any(name in e for e in val_rows)}
        val_conversations = (
            check_prompt_completions(cfg.dataset, [e[PROMPT] for e in val_rows], val_texts, columns=val_columns)
            if pairs else indexed_conversations(cfg.dataset, field, val_texts, columns=val_columns))
        held_out = frozenset(_conversation_key(c) for _, c in val_conversations)

        def training(example) -> bool:
            # checked before the lookup, as text
            conversation = stream_conversation(cfg.dataset, field, example, pairs)
            return conversation is None or _conversation_key(conversation) not in held_out
    else:
        _check_texts(cfg.dataset, cfg.text_field, val_texts)
        held_out = frozenset(val_texts)

        def training(example) -> bool:
            text = example[cfg.text_field]
            # checked before the lookup: a list or dict would fail in it as an "unhashable type" naming nothing
            _check_texts(cfg.dataset, cfg.text_field, [text])
            return text not in held_out

    train_stream = stream.filter(training)
    # Before a BPE is trained on nothing and the run starts: otherwise the first step finds the stream empty.
    with _reading(cfg.dataset, *_field(cfg)):
        if next((e for e in train_stream if is_document(e[field])), None) is None:
            raise _no_training_documents(cfg.dataset, cfg.val_documents)
    tokenizer_cache = cache_dir / f"tokenizer-{_hash(fingerprint, vocab_size, cfg.tokenizer_train_chars)}"
    if source is None and local_rank == 0 and not (tokenizer_cache / "tokenizer.json").exists():
        def sample() -> Iterator[str]:
            total = 0
            for example in train_stream:
                if chat:  # as the BPE's template (the default) renders it, tags and all, as the cached path does
                    conversation = stream_conversation(cfg.dataset, field, example, pairs)
                    text = render_default(conversation) if conversation else ""
                else:
                    text = example[cfg.text_field] or ""  # checked by the filter training() on the way
                yield text
                total += len(text)
                if total >= cfg.tokenizer_train_chars:
                    return

        with _reading(cfg.dataset, *_field(cfg)):
            texts = list(sample())
        trained = train_tokenizer(texts, vocab_size, cfg.tokenizer_train_chars)
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_dir(tokenizer_cache, lambda tmp: trained.save_pretrained(tmp))
    barrier()
    tokenizer = load_tokenizer(source if source is not None else tokenizer_cache)
    common = dict(seq_len=cfg.seq_len, micro_batch=micro_batch, rank=rank, world_size=world_size,
                  dataset=cfg.dataset, val_documents=cfg.val_documents, by_examples=local_files)
    if chat:
        encoder = ChatEncoder(tokenizer, cfg.assistant_only_loss, cfg.dataset)
        val, val_flags = chat_blocks(encoder, val_conversations, cfg.seq_len)
        if len(val) == 0:
            raise _validation_too_short(cfg.dataset, cfg.val_documents, cfg.seq_len, len(val_conversations))
        return StreamingChatData(train_stream, val, val_flags, tokenizer, messages_field=field,
                                 assistant_only_loss=cfg.assistant_only_loss, pairs=pairs, **common)
    val_documents = [text for text in val_texts if is_document(text)]
    val_ids = encode_documents(tokenizer, val_documents)
    val = _blocks(val_ids, cfg.seq_len)
    if len(val) == 0:
        raise _validation_too_short(cfg.dataset, cfg.val_documents, cfg.seq_len, len(val_documents), len(val_ids))
    return StreamingData(train_stream, val, tokenizer, text_field=cfg.text_field, **common)


def stream_columns(stream) -> list[str] | None:
    """A stream's column names; a stream that names none before it is read (a generator's, a hub set's without
    features) those of its first row, None when it has none. Chat data needs them to tell TRL's prompt-completion
    and ShareGPT layouts from a messages column: without them every row would be read as ``messages``; text data
    checks its ``data.text_field`` against them (CSV and text files name none before they are read)."""
    if stream.column_names is not None:
        return stream.column_names
    first = next(iter(stream.take(1)), None)
    return None if first is None else list(first)


def _conversation_key(conversation: list[dict[str, Any]] | Completion) -> str:
    """A checked conversation (or prompt-completion row) as a hashable value, to hold the validation conversations out
    of the stream. A conversation's tools, template variables and prompt-completion cut are part of it: the same
    messages with others render (or are masked) as another sequence, which is no repeat of a validation one."""
    extra = [getattr(conversation, name, None) for name in ("tools", "template_kwargs", "completion_start")]
    return json.dumps([conversation, *extra], sort_keys=True, default=str)


def _validation_too_short(dataset: str, val_documents: int, seq_len: int, documents: int | None = None,
                          tokens: int | None = None) -> ConfigError:
    """A streamed validation split (the stream's first ``val_documents`` rows) that fills no block, named as a
    cached split too short is (:func:`~retnet.train.data._too_short`): the data, what the split holds, the block."""
    held = "" if documents is None else f": {documents} documents"
    held += "" if tokens is None else f", {tokens} tokens"
    return ConfigError(f"data.dataset {dataset!r}: the validation split (the first data.val_documents "
                       f"({val_documents}) rows{held}) is shorter than one block of data.seq_len ({seq_len}) tokens; "
                       f"raise data.val_documents or lower data.seq_len")


def _no_training_targets(dataset: str, val_documents: int) -> ConfigError:
    return ConfigError(f"data.dataset {dataset!r} streams no target tokens: a whole pass over the stream after "
                       f"its first data.val_documents ({val_documents}) rows held no block with a target (assistant "
                       f"messages' tokens after the first of a block, in a conversation's first block): every step's "
                       f"loss was 0, nothing was learnt; use conversations with assistant messages, or "
                       f"data.assistant_only_loss=false")


def _no_training_documents(dataset: str, val_documents: int, rank: int | None = None,
                           world_size: int = 1) -> ConfigError:
    whose = "" if rank is None else f" to rank {rank} of {world_size}"
    return ConfigError(f"data.dataset {dataset!r} streams no training documents{whose}: every non-empty document "
                       f"is among the first data.val_documents ({val_documents}), the validation split"
                       f"{'' if rank is None else ', or this rank has no part of the stream'}; lower "
                       f"data.val_documents or use more data")


__all__ = ["STREAM_ROW", "StreamingChatData", "StreamingData", "build_streaming", "group_micro_batches",
           "stream_columns", "stream_conversation"]
