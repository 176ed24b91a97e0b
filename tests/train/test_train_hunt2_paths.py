"""User paths of the training launcher (``retnet.train``) that went wrong, second hunt: each test is one bug's case,
kept small (the config loader, or the data alone: no training)."""

import json

import pytest

from retnet.train.config import ConfigError, DataConfig, load_config
from retnet.train.data import build_data

KWARGS = dict(vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
              tokenizer_dir=None, barrier=lambda: None)


@pytest.mark.parametrize("overrides, meant", [
    # both keys of a source set one by one: refused as code.dataset's "weight" being no number (the directory)
    (["--data.mixture.code.dataset=src", "--data.mixture.code.weight=0.3"], ("dataset", "code")),
    # a lone weight: a source labelled "code.weight", read as a hub dataset of that name
    (["--data.mixture.code.weight=0.3", "--data.mixture.web.weight=0.7"], ("weight", "code")),
])
def test_a_mixture_source_set_key_by_key_names_the_whole_source_form(overrides, meant, tmp_path, monkeypatch):
    """``--data.mixture.LABEL.KEY=VALUE`` sets no key of a source: the override makes a source labelled
    ``LABEL.KEY``. Only beside a source ``LABEL`` was that refused with the form that works; with no such source,
    ``code.weight=0.3`` became a hub dataset named "code.weight" (found only when the hub refused it), and
    ``code.dataset=src`` was refused as a weight that is no number (``got 'src'``)."""
    monkeypatch.chdir(tmp_path)
    part, owner = meant
    with pytest.raises(ConfigError, match=rf"data\.mixture\.{owner}\.{part} looks like the '{part}' of source "
                                          rf"'{owner}'; set that source whole: --data\.mixture\.{owner}="):
        load_config("tiny", overrides)
    # a label is also a local file's name (--data.mixture.notes.jsonl=2): one ending like a source key that names
    # a file is that file, as before
    (tmp_path / f"{owner}.{part}").write_text("a document\n")
    config = load_config("tiny", [f"--data.mixture.{owner}.{part}=2", "--data.mixture.stdlib=1"])
    assert config.data.mixture[f"{owner}.{part}"] == {"dataset": f"{owner}.{part}", "weight": 2}


@pytest.mark.parametrize("override, key, expected", [
    ("--lora.target_modules=[q_proj,v_proj]", ("lora", "target_modules"), ["q_proj", "v_proj"]),
    # what an unquoted --model.hidden_act=["sau","smelu"] reaches the program as (the shell took the quotes)
    ("--model.hidden_act=[sau,smelu]", ("model", "hidden_act"), ["sau", "smelu"]),
    ("--logging.wandb_tags=[a, 'b c']", ("logging", "wandb_tags"), ["a", "b c"]),
])
def test_a_bracketed_list_of_unquoted_names_is_that_list(override, key, expected):
    """A list setting written in brackets was read as TOML only: names without their quotes (``[q_proj,v_proj]``,
    or ``["sau","smelu"]`` unquoted in a shell, which drops the quotes) were refused as ``expects list; got
    '[q_proj,v_proj]'``, although it is the list ``q_proj,v_proj`` already gives."""
    section, name = key
    extra = ["--lora.rank=4"] if section == "lora" else []
    config = load_config("tiny", [override, *extra])
    assert getattr(getattr(config, section), name) == expected
    # the list as TOML and as comma-separated names (model.hidden_act: one name, by design), as before; an unclosed
    # bracket still refused
    for spelt in ['["' + '","'.join(expected) + '"]', *([",".join(expected)] if section != "model" else [])]:
        assert getattr(getattr(load_config("tiny", [f"--{section}.{name}={spelt}", *extra]), section), name) == expected
    with pytest.raises(ConfigError, match=rf"{section}\.{name} expects list; got '\[{expected[0]}'"):
        load_config("tiny", [f"--{section}.{name}=[{expected[0]}", *extra])
    # an empty item is no list (a lost name is refused, not dropped: [,] would have been every module)
    for spelt in ["[,]", f"[{expected[0]},,{expected[-1]}]"]:
        with pytest.raises(ConfigError, match=rf"{section}\.{name} expects list"):
            load_config("tiny", [f"--{section}.{name}={spelt}", *extra])

def _write(folder, kind, texts):
    if kind == "jsonl":
        (folder / "a.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    elif kind == "txt":
        for index, text in enumerate(texts):
            (folder / f"{index}.txt").write_text(text)
    else:
        import pandas as pd

        frame = pd.DataFrame({"text": texts})
        frame.to_parquet(folder / "a.parquet") if kind == "parquet" else frame.to_csv(folder / "a.csv", index=False)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet", "csv"])
def test_files_under_a_path_with_glob_characters_are_read(kind, streaming, tokenizer_dir, tmp_path):
    """datasets takes data_files as glob patterns: the files of a directory named ``data[v1]`` (a character class
    there) matched nothing, and the set was refused as ``datasets could not read it (StopIteration (no rows in any
    file?))``, named as a directory, a file or the files of a glob alike."""
    folder = tmp_path / "data[v1]"
    folder.mkdir()
    texts = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * 6 for i in range(20)]
    _write(folder, kind, texts)
    config = DataConfig(dataset=str(folder), tokenizer=str(tokenizer_dir), seq_len=32, val_fraction=0.1,
                        streaming=streaming, val_documents=2, cache_dir=str(tmp_path / "cache"))
    data = build_data(config, **KWARGS)
    assert [tuple(b.shape) for b in data.micro_batches(2)] == [(2, 32), (2, 32)]
    if not streaming:  # every document is there: 18 trained, 2 held out
        meta = json.loads(next((tmp_path / "cache").glob("tokens-*/meta.json")).read_text())
        assert meta["documents"] == [18, 2]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_split_of_one_saved_dataset_is_refused_not_ignored(streaming, tokenizer_dir, tmp_path):
    """``data.split`` picks a split of a save_to_disk DatasetDict (and is refused for local files, one set); for a
    saved Dataset, one set too, it was ignored: ``--data.split=validation`` trained on the whole set."""
    import datasets

    texts = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * 6 for i in range(20)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    config = DataConfig(dataset=str(tmp_path / "saved"), tokenizer=str(tokenizer_dir), seq_len=32,
                        val_fraction=0.1, streaming=streaming, val_documents=2, cache_dir=str(tmp_path / "cache"),
                        split="validation")
    with pytest.raises(ConfigError, match=r"data\.split 'validation' picks a split .* is one saved Dataset"):
        build_data(config, **KWARGS)
    # a Dataset saved as that split (Dataset.split) is read under its name, as under the default
    datasets.Dataset.from_dict({"text": texts}, split=datasets.Split("validation")).save_to_disk(
        str(tmp_path / "saved_validation"))
    config = DataConfig(**{**config.to_dict(), "dataset": str(tmp_path / "saved_validation")})
    assert [tuple(b.shape) for b in build_data(config, **KWARGS).micro_batches(2)] == [(2, 32), (2, 32)]


def test_a_bpe_smaller_than_model_vocab_size_is_said(tmp_path, caplog):
    """Without data.tokenizer a BPE of model.vocab_size tokens is trained, and the model's vocabulary is the
    tokenizer's: on data with fewer merges to learn the model silently got a smaller vocabulary than asked for
    (config.json still says model.vocab_size) and only the parameter count told."""
    import logging

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"ab ab ab {i % 3}"}) + "\n" for i in range(40)))
    config = DataConfig(dataset=str(tmp_path / "a.jsonl"), seq_len=8, val_fraction=0.1,
                        cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="retnet.train.data"):
        data = build_data(config, **{**KWARGS, "vocab_size": 4096})
    size = len(data.tokenizer)
    assert size < 4096
    assert f"gave the byte-level BPE {size} tokens, fewer than model.vocab_size 4096" in caplog.text


def test_rows_without_text_are_counted_in_the_log(tokenizer_dir, tmp_path, caplog):
    """Rows whose data.text_field is missing (a JSON row spelling it otherwise), null or empty are no documents and
    were left out without a word: half a set written with another key trained on the other half, unseen."""
    import logging

    rows = [{"text": f"def f_{i}(x):\n    return x * {i}\n" * 4} for i in range(20)]
    rows += [{"body": "other"}, {"text": None}, {"text": "  \n"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(dataset=str(tmp_path / "a.jsonl"), tokenizer=str(tokenizer_dir), seq_len=32,
                        val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="retnet.train.data"):
        build_data(config, **KWARGS)
    assert f"3 of 23 rows of {tmp_path / 'a.jsonl'} hold no text in data.text_field 'text'" in caplog.text
