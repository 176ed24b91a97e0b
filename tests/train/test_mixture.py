"""Weighted data mixtures (``data.mixture``): the blending schedule, per-source caches and tokenizer, sharding,
exact resume (cached and streamed), chat masks, config refusals, the resume guard, hub sources on resume and one
short training run."""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from retnet.train.chat import TARGET
from retnet.train.config import ConfigError, DataConfig, data_changes, load_config
from retnet.train.data import MaskedBlocks, build_data
from retnet.train.mixture import MixedData, MixedStreamingData, MixtureSchedule


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def text_rows(word: str, count: int) -> list[dict]:
    return [{"text": f"{word} {i}: " + " ".join(f"{word}{j % 7}" for j in range(30 + 3 * i))} for i in range(count)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixture-sources")
    return {"web": write_jsonl(root / "web.jsonl", text_rows("web", 60)),
            "code": write_jsonl(root / "code.jsonl", text_rows("code", 10))}


@pytest.fixture(scope="module")
def tokenizer(sources, tmp_path_factory) -> Path:
    from retnet.tokenization import train_byte_level_bpe

    texts = [json.loads(line)["text"] for path in sources.values() for line in path.read_text().splitlines()]
    path = tmp_path_factory.mktemp("mixture-tokenizer")
    train_byte_level_bpe(texts, vocab_size=300).save_pretrained(path)
    return path


def mixture_config(sources, cache: Path, weights=(0.7, 0.3), **settings) -> DataConfig:
    mixture = {label: {"dataset": str(path), "weight": weight}
               for (label, path), weight in zip(sources.items(), weights, strict=True)}
    return DataConfig(mixture=mixture, cache_dir=str(cache), **{"seq_len": 16, "val_fraction": 0.1, **settings})


def build(cfg: DataConfig, *, rank=0, world=1, micro=2, global_batch=8, tokenizer_dir=None, **kwargs):
    return build_data(cfg, vocab_size=300, seed=5, micro_batch=micro, global_batch=global_batch, rank=rank,
                      local_rank=0, world_size=world, tokenizer_dir=tokenizer_dir, barrier=lambda: None, **kwargs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mixture-cache")


# ----------------------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------------------
def greedy(shares: list[Fraction], blocks: int) -> list[int]:
    """The rule walked block by block: the source furthest behind its share, ties to the first."""
    taken, out = [0] * len(shares), []
    for block in range(blocks):
        behind = [share * (block + 1) - took for share, took in zip(shares, taken, strict=True)]
        out.append(behind.index(max(behind)))
        taken[out[-1]] += 1
    return out


@pytest.mark.parametrize("weights", [(Fraction(3, 10), Fraction(7, 10)), (Fraction(1, 6), Fraction(1, 3),
                                                                          Fraction(1, 2)),
                                     (Fraction(1, 100), Fraction(99, 100))])
def test_schedule_is_the_greedy_rule_and_keeps_each_source_within_a_block_of_its_share(weights):
    schedule = MixtureSchedule(list(weights))
    blocks = 3 * schedule.period + 17
    source, index = schedule.place(np.arange(blocks))
    assert source.tolist() == greedy(list(weights), blocks)
    for i, share in enumerate(weights):
        mine = source == i
        assert index[mine].tolist() == list(range(mine.sum()))  # each source's own blocks in order
        taken = np.cumsum(mine)
        assert np.all(np.abs(taken - float(share) * np.arange(1, blocks + 1)) < 1)


def test_weights_of_many_digits_are_rounded_to_a_bounded_period():
    schedule = MixtureSchedule([Fraction("0.1234567891"), Fraction("0.8765432109")])
    assert schedule.period <= 1 << 16 and abs(schedule.shares()[0] - 0.1234567891) < 1e-4


# ----------------------------------------------------------------------------------------------------------
# Built from files
# ----------------------------------------------------------------------------------------------------------
def test_batches_follow_the_weights_and_a_small_source_repeats(sources, tokenizer, cache):
    data = build(mixture_config(sources, cache, weights=(1, 1)), tokenizer_dir=tokenizer)
    assert isinstance(data, MixedData) and data.labels == ["web", "code"]
    web, code = data.sources
    assert len(code.train) < 60 < len(web.train)
    seen = {0: [], 1: []}
    for _ in range(40):  # 320 blocks: the small source several epochs over, the large one not once
        which, rows = data.global_blocks(data.consumed, 8)
        assert np.bincount(which, minlength=2).tolist() == [4, 4]  # 1:1, within a block in every batch
        batches = data.micro_batches(4)
        got = torch.cat(batches)
        expected = np.stack([data.sources[i].train[r] for i, r in zip(which, rows, strict=True)])
        assert torch.equal(got, torch.from_numpy(expected.astype(np.int64)))
        for i, r in zip(which.tolist(), rows.tolist(), strict=True):
            seen[i].append(r)
    n = len(code.train)
    epochs = [seen[1][k:k + n] for k in range(0, len(seen[1]) - n + 1, n)]
    assert len(epochs) >= 2 and all(sorted(e) == list(range(n)) for e in epochs)  # every block once an epoch
    assert epochs[0] != epochs[1]  # each epoch its own order
    assert len(set(seen[0])) == len(seen[0]) < len(web.train)  # the large source: no repeat yet


def test_the_global_batch_is_the_same_for_any_world_size_and_resumes_exactly(sources, tokenizer, cache):
    cfg = mixture_config(sources, cache)
    single = build(cfg, tokenizer_dir=tokenizer)
    ranks = [build(cfg, rank=r, world=2, tokenizer_dir=tokenizer) for r in range(2)]
    taken = np.zeros(2)
    for _ in range(5):
        which, _ = single.global_blocks(single.consumed, 8)
        counts = np.bincount(which, minlength=2)
        taken += counts
        assert np.all(np.abs(counts - 8 * np.array([0.7, 0.3])) < 2)  # each batch: its share to within 2 blocks
        assert np.all(np.abs(taken - (single.consumed + 8) * np.array([0.7, 0.3])) < 1)  # in all: within 1
        whole = single.micro_batches(4)
        per_rank = [data.micro_batches(2) for data in ranks]
        interleaved = [per_rank[r][m] for m in range(2) for r in range(2)]  # slice m·world + r
        assert torch.equal(torch.cat(whole), torch.cat(interleaved))
    state = single.state_dict()
    assert state == {"kind": "packed", "consumed": 40, "mixture": ["web", "code"]}
    expected = [torch.cat(single.micro_batches(4)) for _ in range(3)]
    resumed = build(cfg, tokenizer_dir=tokenizer)
    resumed.load_state_dict(state)
    assert all(torch.equal(torch.cat(resumed.micro_batches(4)), e) for e in expected)
    with pytest.raises(ValueError, match="mixture"):
        resumed.load_state_dict({"kind": "packed", "consumed": 40})  # a single dataset's position


def test_a_mixture_of_one_source_is_that_dataset(sources, tokenizer, cache):
    alone = build(DataConfig(dataset=str(sources["web"]), seq_len=16, val_fraction=0.1, cache_dir=str(cache)),
                  tokenizer_dir=tokenizer)
    mixed = build(DataConfig(mixture={"web": {"dataset": str(sources["web"]), "weight": 2}}, seq_len=16,
                             val_fraction=0.1, cache_dir=str(cache)), tokenizer_dir=tokenizer)
    for _ in range(30):  # past an epoch
        assert torch.equal(torch.cat(alone.micro_batches(4)), torch.cat(mixed.micro_batches(4)))
    assert torch.equal(torch.cat(alone.val_batches(8)), torch.cat(mixed.val_groups(8)["web"]))


def test_a_new_weight_reuses_every_token_cache(sources, tokenizer, cache, monkeypatch):
    first = build(mixture_config(sources, cache, weights=(1, 1)), tokenizer_dir=tokenizer)
    caches = {p: p.stat().st_mtime_ns for p in cache.glob("tokens-*")}

    def no_encoding(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("retnet.train.data.encode_documents", no_encoding)
    second = build(mixture_config(sources, cache, weights=(1, 5)), tokenizer_dir=tokenizer)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("tokens-*")} == caches
    for a, b in zip(first.sources, second.sources, strict=True):
        assert np.array_equal(a.train, b.train)
    which, _ = second.global_blocks(0, 600)
    assert np.bincount(which).tolist() == [100, 500]


def test_one_bpe_is_trained_on_all_sources_and_cached(sources, tmp_path, monkeypatch):
    import retnet.train.mixture as mixture

    samples = []
    real = mixture.train_tokenizer
    monkeypatch.setattr(mixture, "train_tokenizer", lambda texts, *a: samples.append(texts) or real(texts, *a))
    cfg = mixture_config(sources, tmp_path, tokenizer_train_chars=4000)
    data = build(cfg)
    assert len(samples) == 1
    sample = "".join(samples[0])
    assert 3900 <= len(sample) <= 4000
    # each source's characters in proportion to its share (0.7 / 0.3)
    web = sum(len(t) for t in samples[0] if t.startswith("web"))
    assert abs(web / len(sample) - 0.7) < 0.01
    again = build(cfg)
    assert len(samples) == 1  # cached
    assert again.tokenizer.get_vocab() == data.tokenizer.get_vocab()
    assert len(list(tmp_path.glob("tokenizer-mixture-*"))) == 1


def test_chat_masks_travel_with_their_blocks(tmp_path):
    def conversation(topic: str, i: int) -> list[dict]:
        return [{"role": "user", "content": f"{topic} question {i}?"},
                {"role": "assistant", "content": f"{topic} answer {i} " + "ok " * (i % 5)}]

    chats = {name: write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": conversation(name, i)} for i in range(30)])
             for name in ("math", "poems")}
    data = build(mixture_config(chats, tmp_path / "cache", weights=(2, 1), format="chat", seq_len=64))
    assert data.masked
    for _ in range(4):
        which, rows = data.global_blocks(data.consumed, 8)
        batches = data.micro_batches(4)
        assert all(isinstance(b, MaskedBlocks) for b in batches)
        flags = np.stack([data.sources[i].train_flags[r] for i, r in zip(which, rows, strict=True)])
        assert torch.equal(torch.cat([b.flags for b in batches]), torch.from_numpy(flags))
        assert data.step_targets == int(np.count_nonzero(flags[:, 1:] & TARGET)) > 0
    groups = data.val_groups(8)
    assert list(groups) == ["math", "poems"]
    assert all(isinstance(b, MaskedBlocks) and b.tokens.shape[1] == 64 for g in groups.values() for b in g)


def test_streamed_sources_blend_and_resume_exactly(sources, tmp_path):
    """Also: the mixture's own BPE, trained on a sample of the streams."""
    cfg = mixture_config(sources, tmp_path, weights=(1, 2), streaming=True, val_documents=2)
    data = build(cfg)
    assert isinstance(data, MixedStreamingData) and list(tmp_path.glob("tokenizer-mixture-*"))
    first = [data.micro_batches(2) for _ in range(3)]
    assert first[0][0].shape == (2, 16)
    assert data.position == 12 and [s.position for s in data.sources] == [4, 8]  # 1:2 of this rank's blocks
    state = data.state_dict()
    expected = [torch.cat(data.micro_batches(2)) for _ in range(30)]
    assert data.sources[1]._epoch >= 1  # the small source has been read to its end and started over
    resumed = build(cfg)
    resumed.load_state_dict(state)
    assert all(torch.equal(torch.cat(resumed.micro_batches(2)), e) for e in expected)
    assert resumed.state_dict()["sources"]["code"]["position"] == data.sources[1].position
    assert set(data.val_groups(8)) == {"web", "code"}


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
def test_command_line_forms():
    cfg = load_config("tiny", ["--data.mixture.stdlib=1", "--data.mixture.code={dataset=\"src/*.py\", weight=0.5}",
                               "--data.mixture.chat.v2={dataset=\"a/b\", weight=1, split=\"test\"}"])
    assert cfg.data.mixture == {"stdlib": {"dataset": "stdlib", "weight": 1},
                                "code": {"dataset": "src/*.py", "weight": 0.5},
                                "chat.v2": {"dataset": "a/b", "weight": 1, "split": "test"}}
    (label, share, source), *_ = cfg.data.sources()
    assert (label, share, source.dataset, source.mixture) == ("stdlib", Fraction(2, 5), "stdlib", {})
    assert cfg.data.sources()[2][2].split == "test"


@pytest.mark.parametrize("mixture, settings, key", [
    ({"a": {"dataset": "x.jsonl", "weight": 1, "seq_len": 8}}, {}, "data.mixture.a"),
    ({"a": {"weight": 1}}, {}, "data.mixture.a.dataset"),
    ({"a": {"dataset": "x.jsonl"}}, {}, "data.mixture.a.weight"),
    ({"a": {"dataset": "x.jsonl", "weight": 0}}, {}, "data.mixture.a.weight"),
    ({"a": -1.0}, {}, "data.mixture.a.weight"),
    ({"a": {"dataset": "x.jsonl", "weight": "much"}}, {}, "data.mixture.a.weight"),
    ({"a": True}, {}, "data.mixture.a.weight"),
    ({"a": {"dataset": "x.jsonl", "weight": float("nan")}}, {}, "data.mixture.a.weight"),
    ({"a b": 1}, {}, "data.mixture.a b"),
    ({"a": 1, "a.weight": 2}, {}, "data.mixture.a.weight"),  # --data.mixture.a.weight=2
    ({"a": {"dataset": "x.jsonl", "weight": 1, "split": 3}}, {}, "data.mixture.a.split"),
    ({"a": 1}, {"dataset": "other.jsonl"}, "data.dataset and data.mixture"),
    ({"stdlib": 1}, {"format": "chat"}, "data.mixture.stdlib.dataset"),
    ({"stdlib": 1}, {"streaming": True}, "data.mixture.stdlib.dataset"),
])
def test_bad_mixtures_are_refused_naming_the_field(mixture, settings, key):
    with pytest.raises(ConfigError) as error:
        DataConfig(mixture=mixture, **settings)
    assert str(error.value).startswith(key)


def test_a_source_error_names_its_label(tmp_path):
    cfg = DataConfig(mixture={"docs": {"dataset": str(tmp_path / "missing.jsonl"), "weight": 1}}, seq_len=16)
    with pytest.raises(FileNotFoundError, match=r"^data\.mixture\.docs .*missing\.jsonl"):
        build(cfg)


def test_resume_compares_the_mixture():
    def config(*overrides):
        return load_config("tiny", list(overrides))

    saved = config("--data.mixture.web=1", "--data.mixture.code=2").to_dict()
    assert data_changes(saved, config("--data.mixture.web=2", "--data.mixture.code=4"), tokenizer_reused=True) == []
    changes = data_changes(saved, config("--data.mixture.web=1", "--data.mixture.code=3"), tokenizer_reused=True)
    assert [c.split(":")[0] for c in changes] == ["data.mixture.web.weight", "data.mixture.code.weight"]
    changes = data_changes(saved, config("--data.mixture.web=1", "--data.mixture.code={dataset=\"code\", weight=2, "
                                         "text_field=\"body\"}"), tokenizer_reused=True)
    assert changes == ["data.mixture.code.text_field: checkpoint 'text', now 'body'"]
    changes = data_changes(saved, config("--data.mixture.web=1", "--data.mixture.docs=2"), tokenizer_reused=True)
    assert [c.split(":")[0] for c in changes] == ["data.mixture.code", "data.mixture.docs"]
    older = config().to_dict()
    del older["data"]["mixture"]  # a checkpoint from before mixtures
    assert data_changes(older, config(), tokenizer_reused=True) == []
    assert data_changes(older, config("--data.mixture.web=1"), tokenizer_reused=True)[0].startswith("data.mixture:")


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def test_training_logs_each_source_and_resumes_exactly(sources, tokenizer, tmp_path, capsys):
    from retnet.train.__main__ import EXIT_CONFIG, main
    from tests.train.conftest import metrics, micro_args

    out = tmp_path / "run"
    mixture = {f"data__mixture__{label}": f'{{dataset="{path}", weight={w}}}'
               for (label, path), w in zip(sources.items(), (0.75, 0.25), strict=True)}
    args = micro_args("stdlib", tokenizer, tmp_path / "cache", out, data__seq_len=16, train__steps=4,
                      train__eval_interval=2, checkpoint__interval=2, **mixture)
    assert main(args) == 0
    train, val = metrics(out), metrics(out, "val")
    assert [r["step"] for r in val] == [0, 2, 4]
    for record in val:
        assert {"val_loss.web", "val_loss.code"} <= set(record)
        assert min(record["val_loss.web"], record["val_loss.code"]) <= record["val_loss"] <= \
            max(record["val_loss.web"], record["val_loss.code"])
    # from the step-2 checkpoint: the same blocks, so the same losses
    assert main([*args, f"--train.resume={out / 'checkpoints' / 'step_00000002'}"]) == 0
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in train]
    # another weight: refused before any data is read, naming it
    capsys.readouterr()
    assert main([*args, "--train.steps=6", f'--data.mixture.code={{dataset="{sources["code"]}", weight=0.5}}']) \
        == EXIT_CONFIG
    assert "data.mixture.code.weight" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Resume: the guard's order and fields, the global batch, hub sources; the BPE's cache key
# ----------------------------------------------------------------------------------------------------------
def test_resume_refuses_the_sources_in_another_order():
    # ties go to the first source listed: 1:1 in the other order gives other blocks at the same positions
    saved = load_config("tiny", ["--data.mixture.web=1", "--data.mixture.code=1"]).to_dict()
    changes = data_changes(saved, load_config("tiny", ["--data.mixture.code=1", "--data.mixture.web=1"]),
                           tokenizer_reused=True)
    assert changes == ["data.mixture: checkpoint sources in the order ['web', 'code'], now ['code', 'web']"]


def test_resume_compares_the_fields_each_source_reads_not_the_unread_section_ones():
    own = ["--data.mixture.web={dataset=\"w\", weight=1, text_field=\"body\", split=\"all\"}",
           "--data.mixture.code={dataset=\"c\", weight=1, text_field=\"src\", split=\"all\"}"]
    saved = load_config("tiny", own).to_dict()
    # every source reads its own field and split: the section's are read by none
    assert data_changes(saved, load_config("tiny", [*own, "--data.text_field=content", "--data.split=test"]),
                        tokenizer_reused=True) == []
    bare = ["--data.mixture.web=1", "--data.mixture.code=1"]
    changes = data_changes(load_config("tiny", bare).to_dict(), load_config("tiny", [*bare, "--data.split=test"]),
                           tokenizer_reused=True)
    assert changes == ["data.mixture.web.split: checkpoint 'train', now 'test'",
                       "data.mixture.code.split: checkpoint 'train', now 'test'"]  # each once, by the source


def test_a_mixture_that_is_no_table_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"^data\.mixture must be a table .*got \[1\]"):
        DataConfig(mixture=[1])


def test_the_mixture_bpe_does_not_depend_on_the_labels(sources, tmp_path, monkeypatch):
    import retnet.train.mixture as mixture

    trained = []
    real = mixture.train_tokenizer
    monkeypatch.setattr(mixture, "train_tokenizer", lambda texts, *a: trained.append(1) or real(texts, *a))
    build(mixture_config(sources, tmp_path, tokenizer_train_chars=2000))
    renamed = dict(zip(("news", "python"), sources.values(), strict=True))
    build(mixture_config(renamed, tmp_path, tokenizer_train_chars=2000))
    assert len(trained) == 1  # the same sources and shares: the same sample, the cached BPE


def test_a_resume_may_change_the_global_batch(sources, tokenizer, cache):
    """The position counts blocks of the blended stream, as a single dataset's does: a new batch size goes on
    from the same block."""
    cfg = mixture_config(sources, cache)
    first = build(cfg, tokenizer_dir=tokenizer)
    for _ in range(3):
        first.micro_batches(4)
    state = first.state_dict()
    expected = torch.cat([torch.cat(first.micro_batches(4)) for _ in range(2)])
    smaller = build(cfg, tokenizer_dir=tokenizer, global_batch=4)
    smaller.load_state_dict(state)
    assert torch.equal(torch.cat([torch.cat(smaller.micro_batches(2)) for _ in range(4)]), expected)


def test_a_resume_holds_hub_sources_to_their_fingerprint_without_loading_them(sources, tmp_path, monkeypatch):
    """A resume without the run's saved tokenizer finds the mixture's cached BPE by the checkpoint's hub
    fingerprints (offline, no HF cache), as a single dataset does; a hub that holds other data is refused
    before a BPE is trained on it."""
    import shutil

    import datasets

    import retnet.train.mixture as mixture

    texts = [json.loads(line)["text"] for line in sources["web"].read_text().splitlines()]
    hub: dict = {"text": texts}

    class Builder:
        name = "parquet"

    def online(result):
        if hub["text"] is None:
            raise ConnectionError("offline and not in the HF cache")
        return result()

    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: online(Builder))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: online(lambda: datasets.Dataset.from_dict(hub)))
    cfg = DataConfig(mixture={"hub": {"dataset": "someone/corpus", "weight": 1},
                              "code": {"dataset": str(sources["code"]), "weight": 1}},
                     seq_len=16, val_fraction=0.1, cache_dir=str(tmp_path))
    first = build(cfg)
    hub["text"] = None
    resumed = build(cfg, hub_fingerprint=first.hub_fingerprint)
    assert np.array_equal(resumed.sources[0].train, first.sources[0].train)

    def no_training(*args):
        raise AssertionError("a BPE trained on the hub's other data")

    monkeypatch.setattr(mixture, "train_tokenizer", no_training)
    hub["text"] = [text.replace("web", "new") for text in texts]
    for cache in [*tmp_path.glob("tokenizer-*"), *tmp_path.glob("tokens-*")]:
        shutil.rmtree(cache)
    with pytest.raises(ConfigError, match=r"^data\.mixture\.hub .*now holds other data"):
        build(cfg, hub_fingerprint=first.hub_fingerprint)
