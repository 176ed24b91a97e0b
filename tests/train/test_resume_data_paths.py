"""Data that changed under the same name since a run began: a GRPO resume on prompts edited in place is refused
(its checkpoints hold a digest of the prompts, as DPO's reference file holds one of its pairs), and a hub dataset's
CSV file with an unquoted comma in a row is refused naming the file and line, as a local file is, not read with
that row's text cut at the comma."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.config import ConfigError, DataConfig

from .conftest import one_thread, save_micro_base

ROWS = 20


def _prompts(path: Path, word: str = "Say", solution: str = "aaa") -> None:
    rows = [{"prompt": f"{word} a word {i}:", "solution": solution} for i in range(ROWS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _grpo_args(root: Path, steps: int) -> list[str]:
    values = {"model.init_from": root / "base", "data.format": "prompts", "data.dataset": root / "p.jsonl",
              "data.val_fraction": 0.1, "data.cache_dir": root / "cache", "train.output_dir": root / "run",
              "grpo.reward_funcs": "retnet.train.rewards:exact_match", "grpo.num_generations": 2,
              "grpo.max_completion_length": 4, "grpo.beta": 0.0, "train.steps": steps,
              "train.global_batch_size": 4, "train.micro_batch_size": 4, "train.eval_interval": 0,
              "optim.warmup_steps": 1, "checkpoint.interval": 2, "checkpoint.export": False,
              "logging.progress": False, "logging.tensorboard": False}
    return ["--config", "tiny", *[f"--{key}={value}" for key, value in values.items()]]


def test_a_grpo_resume_on_prompts_changed_in_place_is_refused(tmp_path, capsys):
    """README (Training, GRPO): a resume whose data changed is refused. The same path holding other prompts (or
    other columns, which the reward functions get) went on from the checkpoint's position in them without a word;
    the same rows written again resume. A checkpoint from before the digest resumes unchecked."""
    from retnet.tokenization import train_byte_level_bpe
    from retnet.train.data import build_data

    _prompts(tmp_path / "p.jsonl")
    save_micro_base(tmp_path / "base", train_byte_level_bpe([f"Say Tell a word {i}: aaa bbb" for i in range(ROWS)],
                                                            vocab_size=300))
    with one_thread():
        assert main(_grpo_args(tmp_path, 2)) == 0
        for word, solution in (("Tell", "aaa"), ("Say", "bbb")):  # the prompts edited; only another column
            _prompts(tmp_path / "p.jsonl", word, solution)
            capsys.readouterr()
            assert main(_grpo_args(tmp_path, 4)) == EXIT_CONFIG
            err = capsys.readouterr().err
            assert "the prompts changed since the checkpoint was written: it was trained on 18 train + 2 " \
                   "validation prompts" in err, err
            assert "Restore the data, or start a new run in another train.output_dir" in err
        _prompts(tmp_path / "p.jsonl")  # the same rows again (a new mtime): the run goes on
        assert main(_grpo_args(tmp_path, 4)) == 0

    cfg = DataConfig(dataset=str(tmp_path / "p.jsonl"), format="prompts", val_fraction=0.1,
                     cache_dir=str(tmp_path / "cache"))

    def data():
        return build_data(cfg, vocab_size=300, seed=0, micro_batch=4, global_batch=4, rank=0, local_rank=0,
                          world_size=1, tokenizer_dir=tmp_path / "base", barrier=lambda: None)

    state = data().state_dict()
    _prompts(tmp_path / "p.jsonl", "Tell")
    with pytest.raises(ConfigError, match="the prompts changed since the checkpoint was written"):
        data().load_state_dict(state)
    del state["prompts"]  # a checkpoint written before GRPO's held the digest: resumed unchecked
    data().load_state_dict(state)


def test_a_hub_csv_row_with_an_unquoted_comma_is_refused_naming_the_file(tmp_path, monkeypatch):
    """A hub set's CSV files are read for the text column alone (usecols), where pandas takes a row of a field
    too many and cuts its text at the comma: "b, with a comma" was the document "b". Its files in the HF hub
    cache are parsed as a local file's read parses them (its first row too, which pandas cuts without a warning)."""
    import datasets
    import huggingface_hub.constants

    from retnet.train.data import load_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = tmp_path / "hub"
    snapshot = hub / "datasets--someone--csvset" / "snapshots" / commit / "data"
    snapshot.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    real_load = datasets.load_dataset

    class Builder:  # the hub's csv builder of the repository at the commit (its files resolved as datasets does)
        name = "csv"
        config = type("Config", (), {"data_files": {"train": [f"hf://datasets/someone/csvset@{commit}/data/a.csv"]}})

    def load_dataset(path, name=None, split=None, streaming=False, cache_dir=None, **options):
        assert path == "someone/csvset" and not streaming
        sep = getattr(Builder.config, "pd_read_csv_kwargs", {}).get("sep", ",")
        return real_load("csv", data_files=str(snapshot / "a.csv"), split=split, cache_dir=cache_dir, sep=sep,
                         **options)

    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: Builder)  # (offline: no hub call)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(dataset="someone/csvset", cache_dir=str(tmp_path / "cache"))
    (snapshot / "a.csv").write_text('text,id\na,1\n"b, quoted",2\n')
    loaded, _ = load_hub(cfg, tmp_path / "cache", 0, lambda: None)
    assert loaded["text"] == ["a", "b, quoted"]
    (snapshot / "a.csv").write_text("text,id\na,1\nb, with a comma,2\n")
    with pytest.raises(ConfigError, match=r"data\.dataset 'someone/csvset': its CSV file 'data/a\.csv' \(.*a\.csv\), "
                                          r"not CSV: .*Expected 2 fields in line 3, saw 3"):
        load_hub(cfg, tmp_path / "cache", 0, lambda: None)
    (snapshot / "a.csv").write_text("text,id\nb, with a comma,2\na,1\n")  # the first row: no pandas error at all
    with pytest.raises(ConfigError, match=r"'data/a\.csv' \(.*\), its first row holds more fields than its header"):
        load_hub(cfg, tmp_path / "cache", 0, lambda: None)
    Builder.config.pd_read_csv_kwargs = {"sep": "\t"}  # a repository of .tsv files: its commas are text
    (snapshot / "a.csv").write_text("text\tid\nb, with a comma\t2\n")
    assert load_hub(cfg, tmp_path / "cache", 0, lambda: None)[0]["text"] == ["b, with a comma"]
