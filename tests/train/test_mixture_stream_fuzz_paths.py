"""Data mixtures and streamed data, kept from a randomised hunt: the schedule's bound by number of sources, the blocks a
resume continues with (any world size and accumulation for cached data; streamed, at drawn steps, through every kind
of saved stream state), the validation blocks by world size, the tokens a stream packs against the cached encoder,
and the errors a streamed source raises when read."""

from __future__ import annotations

import io
import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import build_data, encode_documents, is_document, load_tokenizer
from retnet.train.mixture import MixtureSchedule

# Edges of text a document may hold: empty and whitespace-only rows (dropped), one-token rows, rows many blocks long,
# combining marks, astral characters, a quoted special token, NUL, line and paragraph separators, a byte order mark.
PIECES = ["a", "retention", "héllo", "a\u0301", "日本語", "🙂🙃", "\U0010ffff", "<|endoftext|>", "\x00", "\r\n",
          "\u2028", "\ufeff", "\u200b", "\u00a0", "ß", "x" * 50]


def draw_document(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.1:
        return ""
    if roll < 0.15:
        return " \n\t"
    if roll < 0.25:
        return rng.choice(["a", "z"])
    return " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60 if rng.random() < 0.9 else 400)))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("fuzz-tokenizer")
    train_byte_level_bpe([" ".join(PIECES)] * 4, vocab_size=300).save_pretrained(path)
    return path


def build(cfg: DataConfig, tokenizer: Path, *, rank: int = 0, world: int = 1, micro: int = 1, global_batch: int = 1):
    return build_data(cfg, vocab_size=300, seed=7, micro_batch=micro, global_batch=global_batch, rank=rank,
                      local_rank=0, world_size=world, tokenizer_dir=tokenizer, barrier=lambda: None)


def flat(batches: list) -> np.ndarray:
    """A step's micro-batches as one array of rows: tokens, and for chat data their flags beside them."""
    rows = [torch.cat([b.tokens, b.flags.long()], 1) if hasattr(b, "flags") else b for b in batches]
    return torch.cat(rows).numpy()


def through_torch_save(state: dict) -> dict:
    """A data state as the trainer's checkpoint holds it: through torch.save and back."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# ----------------------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------------------
def trail(counts: list[int]) -> float:
    """The furthest any source's blocks are from its share over one period of the schedule of ``counts``."""
    period = sum(counts)
    source, _ = MixtureSchedule([Fraction(c, period) for c in counts]).place(np.arange(period))
    return max(np.abs(np.cumsum(source == i) * period - c * np.arange(1, period + 1)).max() / period
               for i, c in enumerate(counts))


def test_two_or_three_sources_stay_within_one_block_of_their_shares():
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(1, rng.choice([5, 60, 400])) for _ in range(rng.choice([2, 3]))]
        assert trail(counts) < 1, counts


def test_more_sources_can_trail_by_a_little_over_one_block():
    # the greedy rule's limit (README "Data mixtures"): shares 4, 1, 42, 49, 4 in 100
    assert 1 < trail([4, 1, 42, 49, 4]) < 1.5


def test_every_period_holds_each_source_exactly_its_count():
    rng = random.Random(1)
    for _ in range(30):
        digits = 10 ** rng.randint(0, 6)  # weights as written, 0.3 or 1.234567: shares of large denominators too
        weights = [Fraction(rng.randint(1, 5 * digits), digits) for _ in range(rng.randint(1, 6))]
        schedule = MixtureSchedule([w / sum(weights) for w in weights])
        source, index = schedule.place(np.arange(2 * schedule.period))
        for i, count in enumerate(schedule.counts):
            assert (source[:schedule.period] == i).sum() == (source[schedule.period:] == i).sum() == count
            assert index[source == i].tolist() == list(range(2 * count))  # each source's blocks in its own order


# ----------------------------------------------------------------------------------------------------------
# Cached mixtures: any world size, accumulation and global batch on a resume
# ----------------------------------------------------------------------------------------------------------
def global_step(ranks: list, accum: int) -> np.ndarray:
    """The global batch of one step, reassembled from every rank's micro-batches (slice m · world + rank)."""
    per_rank = [data.micro_batches(accum) for data in ranks]
    return np.concatenate([flat([per_rank[r][m]]) for m in range(accum) for r in range(len(ranks))])


def test_a_cached_mixture_resumes_with_the_same_blocks_for_any_split(tokenizer, tmp_path):
    rng = random.Random(2)
    mixture = {f"s{i}": {"dataset": str(write_jsonl(tmp_path / f"s{i}.jsonl",
                                                    [{"text": draw_document(rng)} for _ in range(rng.randint(6, 40))])),
                         "weight": weight} for i, weight in enumerate((0.25, 1, 1.5))}
    cfg = DataConfig(mixture=mixture, seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    reference = build(cfg, tokenizer, micro=4, global_batch=4)
    stream = np.concatenate([global_step([reference], 1) for _ in range(40)])  # past every source's end
    for _ in range(6):
        micro, world, accum = rng.choice([1, 2]), rng.choice([1, 2, 4]), rng.choice([1, 2])
        batch = micro * world * accum
        ranks = [build(cfg, tokenizer, rank=r, world=world, micro=micro, global_batch=batch) for r in range(world)]
        stop = rng.randint(0, 6)
        before = np.concatenate([global_step(ranks, accum) for _ in range(stop)] or [stream[:0]])
        assert np.array_equal(before, stream[:stop * batch])
        state = through_torch_save(ranks[0].state_dict())
        assert all(data.state_dict() == state for data in ranks)  # one position, whichever rank saves it
        micro2, world2, accum2 = rng.choice([1, 2]), rng.choice([1, 2, 4]), rng.choice([1, 2, 3])
        batch2 = micro2 * world2 * accum2
        resumed = [build(cfg, tokenizer, rank=r, world=world2, micro=micro2, global_batch=batch2)
                   for r in range(world2)]
        for data in resumed:
            data.load_state_dict(state)
        after = np.concatenate([global_step(resumed, accum2) for _ in range(4)])
        assert np.array_equal(after, stream[stop * batch: stop * batch + 4 * batch2])


def test_mixture_validation_blocks_by_world_size(tokenizer, tmp_path):
    rng = random.Random(3)
    large = write_jsonl(tmp_path / "large.jsonl", [{"text": draw_document(rng)} for _ in range(200)])
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": f"small {i}"} for i in range(50)])
    cfg = DataConfig(mixture={"large": {"dataset": str(large), "weight": 1}, "small": {"dataset": str(small),
                                                                                          "weight": 1}},
                     seq_len=8, val_fraction=0.1, cache_dir=str(tmp_path / "cache"))

    def blocks(world: int, eval_blocks: int) -> dict[str, list[bytes]]:
        groups = [build(cfg, tokenizer, rank=r, world=world, micro=2, global_batch=2 * world).val_groups(eval_blocks)
                  for r in range(world)]
        return {label: sorted(row.tobytes() for g in groups for batch in g[label] for row in batch.numpy())
                for label in groups[0]}

    sizes = {label: len(data.val) for label, data in zip(["large", "small"], build(cfg, tokenizer).sources,
                                                          strict=True)}
    assert sizes["small"] < 8 <= sizes["large"]
    # eval_blocks a multiple of the sources times the world size: the same blocks while each source holds its part
    assert blocks(1, 4)["large"] == blocks(2, 4)["large"]
    one, two = blocks(1, 16), blocks(2, 16)
    assert one["large"] == two["large"]
    # a source with fewer validation blocks than its part is read whole, rounded down to a multiple of the ranks
    # as a single small split is (README "Data mixtures", "Validation")
    assert len(one["small"]) == sizes["small"]
    assert len(two["small"]) == sizes["small"] - sizes["small"] % 2


# ----------------------------------------------------------------------------------------------------------
# Streams: resume at drawn steps, every kind of saved state
# ----------------------------------------------------------------------------------------------------------
def stream_source(rng: random.Random, directory: Path, chat: bool) -> str:
    directory.mkdir()
    for part in range(rng.choice([1, 2, 3])):
        rows = []
        for _ in range(rng.randint(4, 16)):
            if not chat:
                rows.append({"text": draw_document(rng)})
            elif rng.random() < 0.1:
                rows.append({"messages": []})  # an empty row, read and skipped
            else:
                rows.append({"messages": [{"role": "user", "content": rng.choice(["q", "héllo?", "日本語"])},
                                          {"role": "assistant", "content": draw_document(rng) or "ok"}]})
        write_jsonl(directory / f"part{part}.jsonl", rows)
    return str(directory / "*.jsonl")


def saved_as(state: dict, kind: str) -> dict:
    """``state`` as a checkpoint of another kind would hold it: of another datasets version, without datasets'
    own stream state, or from before the stream's place was saved (the position alone)."""
    if "sources" in state:
        return {**state, "sources": {label: saved_as(s, kind) for label, s in state["sources"].items()}}
    return {"exact": state, "version": {**state, "datasets_version": "0.0"}, "no stream": {**state, "stream": None},
            "position only": {"kind": "streaming", "position": state["position"]}}[kind]


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_a_stream_resumed_at_a_drawn_step_continues_with_the_blocks_of_one_never_stopped(chat, tokenizer, tmp_path):
    rng = random.Random(4 + chat)
    kinds, resumed = ["exact", "version", "no stream", "position only"], 0
    for trial in range(4):
        labels = ["a", "b"][: rng.choice([1, 2])]
        mixture = {label: {"dataset": stream_source(rng, tmp_path / f"{trial}{label}", chat),
                           "weight": rng.choice([1, 2, 0.3])} for label in labels}
        settings = {"seq_len": 48 if chat else rng.choice([4, 16, 33]), "streaming": True,
                    "val_documents": 3, "cache_dir": str(tmp_path / "cache"), **({"format": "chat"} if chat else {})}
        if rng.random() < 0.3:
            settings["max_documents"] = rng.randint(8, 30)
        cfg = (DataConfig(mixture=mixture, **settings) if len(labels) > 1 or rng.random() < 0.5
               else DataConfig(dataset=mixture["a"]["dataset"], **settings))
        world, micro, accum = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([1, 2])

        def ranks(cfg=cfg, world=world, micro=micro, accum=accum):
            return [build(cfg, tokenizer, rank=r, world=world, micro=micro, global_batch=micro * accum * world)
                    for r in range(world)]

        try:
            first = ranks()
            steps = 10
            whole = [[flat(data.micro_batches(accum)) for _ in range(steps)] for data in first]
        except ConfigError as error:  # a drawn set with too little to read (each named): another draw
            assert "data.dataset" in str(error) or "data.mixture" in str(error)
            continue
        stop, kind = rng.randint(0, steps), kinds[trial % len(kinds)]
        stopped = ranks()
        for data in stopped:
            for _ in range(stop):
                data.micro_batches(accum)
        states = [saved_as(through_torch_save(data.state_dict()), kind) for data in stopped]
        for rank, (data, state) in enumerate(zip(ranks(), states, strict=True)):
            data.load_state_dict(state)
            for step in range(stop, steps):
                assert np.array_equal(flat(data.micro_batches(accum)), whole[rank][step]), (trial, kind, rank, step)
        resumed += 1
    assert resumed >= 3  # the draws are seeded: most of them read enough to resume


def test_a_stream_packs_the_tokens_the_cached_encoder_gives(tokenizer, tmp_path):
    rng = random.Random(6)
    documents = ["the validation document " * 3] + [draw_document(rng) for _ in range(150)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents])
    cfg = DataConfig(dataset=str(path), seq_len=16, streaming=True, val_documents=1, cache_dir=str(tmp_path / "c"))
    data = build(cfg, tokenizer)
    expected = encode_documents(load_tokenizer(tokenizer), [d for d in documents[1:] if is_document(d)])
    blocks = len(expected) // 16
    got = np.concatenate([data.micro_batches(1)[0].numpy()[0] for _ in range(blocks)])
    assert np.array_equal(got, expected[: blocks * 16])


# ----------------------------------------------------------------------------------------------------------
# Errors a stream raises: named as the run set its data
# ----------------------------------------------------------------------------------------------------------
def test_a_streamed_source_failing_when_read_is_named_by_its_mixture_key(tokenizer, tmp_path):
    web = write_jsonl(tmp_path / "web.jsonl", [{"text": f"web document {i} " * 6} for i in range(20)])
    # one validation row and one training row: split between two ranks, rank 1 reads only the validation one
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "held out " * 9}, {"text": "trained on " * 9}])
    cfg = DataConfig(mixture={"web": {"dataset": str(web), "weight": 1}, "tiny": {"dataset": str(tiny), "weight": 1}},
                     seq_len=8, streaming=True, val_documents=1, cache_dir=str(tmp_path / "cache"))
    data = build(cfg, tokenizer, rank=1, world=2, micro=2, global_batch=4)
    with pytest.raises(ConfigError, match=r"^data\.mixture\.tiny \(dataset '.*tiny\.jsonl'\): .*streams no training "
                                          r"documents to rank 1 of 2"):
        data.micro_batches(1)


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_a_streamed_validation_split_too_short_is_refused_naming_the_data_and_its_size(chat, tokenizer, tmp_path):
    rows = ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(6)] if chat else [{"text": f"d{i}"} for i in range(6)])
    path = write_jsonl(tmp_path / "short.jsonl", list(rows))
    cfg = DataConfig(dataset=str(path), seq_len=512, streaming=True, val_documents=2, cache_dir=str(tmp_path / "c"),
                     **({"format": "chat"} if chat else {}))
    held = r"2 documents" if chat else r"2 documents, \d+ tokens"
    with pytest.raises(ConfigError, match=rf"^data\.dataset '.*short\.jsonl': the validation split \(the first "
                                          rf"data\.val_documents \(2\) rows: {held}\) is shorter than one block of "
                                          rf"data\.seq_len \(512\) tokens"):
        build(cfg, tokenizer)


def test_a_renamed_error_whose_constructor_takes_more_keeps_its_kind():
    """A source's FileNotFoundError subclass that needs more than a message (huggingface_hub's
    IncompleteSnapshotError) is renamed as a FileNotFoundError, not turned into a TypeError (which would miss the
    launcher's exit status 2 and end in a traceback)."""
    from retnet.train.mixture import _naming

    class IncompleteSnapshot(FileNotFoundError):
        def __init__(self, message, snapshot_path):
            super().__init__(message)
            self.snapshot_path = snapshot_path

    renamed = pytest.raises(FileNotFoundError, match=r"^data.mixture.web \(dataset 'org/set'\): incomplete")
    with renamed as caught, _naming("web", "org/set"):
        raise IncompleteSnapshot("incomplete", "/cache/x")
    assert isinstance(caught.value.__cause__, IncompleteSnapshot)
    with pytest.raises(ConfigError, match=r"^data.mixture.web \(dataset 'x'\): bad"), _naming("web", "x"):
        raise ConfigError("bad")
