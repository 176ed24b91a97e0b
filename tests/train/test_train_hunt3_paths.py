"""User paths of the training launcher (``retnet.train``) that went wrong, third hunt: each test is one bug's case,
kept small (the config loader, ``--print-config``'s checks, the data reader: no training)."""

import re

import pytest

from retnet.train.config import ConfigError, DataConfig, build_config, load_config


def test_print_config_names_every_bad_mixture_source_as_a_start_does(tmp_path):
    """``--print-config`` checked a mixture's sources through ``data.dataset``'s words and stopped at the first bad
    one: ``data.dataset: glob '...' matches no files``, where the start says ``data.mixture.web (dataset '...'):
    ...``, and a second bad source was not reported at all (the README: every path a start would refuse, in the
    start's words)."""
    from retnet.train.__main__ import start_problems

    (tmp_path / "good.jsonl").write_text('{"text": "a document"}\n')
    config = load_config("tiny", [
        f"--data.mixture.web={{dataset=\"{tmp_path / 'web' / '*.jsonl'}\", weight=1}}",
        f"--data.mixture.ok={{dataset=\"{tmp_path / 'good.jsonl'}\", weight=1}}",
        f"--data.mixture.code={{dataset=\"{tmp_path / 'src'}\", weight=2}}",
        f"--train.output_dir={tmp_path / 'run'}",
    ])
    problems = start_problems(config)
    assert len(problems) == 2, problems
    web, code = problems
    assert web.startswith(f"data.mixture.web (dataset {str(tmp_path / 'web' / '*.jsonl')!r}): ") and "matches no files" in web
    assert code.startswith(f"data.mixture.code (dataset {str(tmp_path / 'src')!r}): ") and "no such file" in code
    # a single dataset keeps its own words
    single = load_config("tiny", [f"--data.dataset={tmp_path / 'none.jsonl'}", f"--train.output_dir={tmp_path / 'run'}"])
    assert start_problems(single) == [f"data.dataset: no such file or directory: {str(tmp_path / 'none.jsonl')!r}"]


@pytest.mark.parametrize("override, meant", [
    # the closest spelling was another field, one a user would set by mistake: a save cadence as the run's length
    ("--train.save_steps=100", "checkpoint.interval"),
    ("--train.eval_steps=50", "train.eval_interval"),
    ("--train.save_interval=100", "checkpoint.interval"),
    ("--data.max_seq_length=512", "data.seq_len"),  # was data.max_prompt_length
    ("--data.val_split=0.1", "data.val_fraction"),  # was data.split
    # no hint at all, though the name without a section got one
    ("--optim.learning_rate=3e-4", "optim.lr"),
    ("--optim.max_grad_norm=1", "optim.grad_clip"),
    ("--checkpoint.save_total_limit=2", "checkpoint.keep_last"),
    ("--data.text_column=content", "data.text_field"),
])
def test_another_launchers_name_under_a_section_names_the_field_doing_its_work(override, meant):
    """Another launcher's setting written under a section (``--train.save_steps``, HF's ``save_steps`` where one
    would put it) was refused with the closest spelling in that section, ``did you mean 'train.steps'?``, a
    setting that does something else entirely, or with no hint, while ``--save_steps`` names
    ``--checkpoint.interval``."""
    with pytest.raises(ConfigError, match=rf"did you mean {re.escape(repr(meant))}"):
        load_config("tiny", [override])
    section, key = override[2:].split("=")[0].split(".")
    with pytest.raises(ConfigError, match=rf"did you mean {re.escape(repr(meant))}"):  # a TOML file's table too
        build_config({section: {key: 1}})
    # a flat file of HF's names (learning_rate = 3e-4 above every table) names the table and key to write
    table, name = meant.split(".")
    with pytest.raises(ConfigError, match=rf"did you mean {re.escape(repr(meant))}\? A key goes in its table: "
                                          rf"\[{table}\] {name} = "):
        build_config({key: 1})


@pytest.mark.parametrize("second_file, kept", [
    ("text,id\nthird,x3\nfourth,x4\n", True),  # an id of numbers in one file, of words in the next
    ("text,score\nthird,0.5\nfourth,1.5\n", True),  # other columns beside the text
    ("body,id\nthird,3\nfourth,4\n", False),  # no text column: refused naming that file
])
def test_csv_columns_a_text_run_never_reads_do_not_refuse_its_files(second_file, kept, tmp_path):
    """A text run reads one column of its CSV files, yet the other columns, typed by pandas file by file, refused
    the whole set (``Failed to parse string: 'x3' as a scalar of type int64``, ``columns do not match``) unless it
    was streamed, which reads the same files. A hub set's CSV files are read for their text column alone; local
    ones now are too when the whole read fails so. A file without the text column is named."""
    from retnet.train.data import load_documents, local_files

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("text,id\nfirst,1\n007,2\n")
    (data / "b.csv").write_text(second_file)
    config = DataConfig(dataset=str(data))
    if kept:
        assert load_documents(config, local_files(str(data)), tmp_path / "cache") == ["first", "007", "third", "fourth"]
    else:
        with pytest.raises(ConfigError, match=r"data\.text_field 'text' is not a column of CSV file .*b\.csv'"):
            load_documents(config, local_files(str(data)), tmp_path / "cache")
    # a row of a field too many is still refused naming its file (read for one column, pandas would pass it)
    (data / "b.csv").write_text("text,id\nthird,x3\nfourth,4,extra\n")
    with pytest.raises(ConfigError, match=r"b\.csv', not CSV: .*Expected 2 fields in line 3, saw 3"):
        load_documents(config, local_files(str(data)), tmp_path / "cache")


@pytest.mark.parametrize("overrides, unread, read", [
    (["--data.streaming=true", "--data.val_fraction=0.3"], "data.val_fraction (0.3)", "data.val_documents (200)"),
    (["--data.val_documents=7"], "data.val_documents (7)", "data.val_fraction (0.02)"),
])
def test_the_other_modes_validation_setting_is_warned_of_not_ignored(overrides, unread, read, tmp_path, capsys):
    """A stream holds out its first data.val_documents documents and packed data a data.val_fraction of them: the
    other mode's setting, set on purpose, was ignored without a word (``--data.streaming=true
    --data.val_fraction=0.3`` held out 200 documents). The trainer warns of it as it starts, before any data is
    read (here: a train.output_dir that is a file stops it right after)."""
    from retnet.train.trainer import Trainer

    (tmp_path / "out").write_text("")
    config = load_config("tiny", [f"--data.dataset={tmp_path / 'a.jsonl'}", f"--train.output_dir={tmp_path / 'out'}",
                                  *overrides])
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        Trainer(config)
    err = capsys.readouterr().err
    assert f"{unread} is not read" in err and f"its validation split is {read}" in err, err
    # each mode's own setting, or the other's left at its default: no warning
    for own in (["--data.streaming=true", "--data.val_documents=7"], ["--data.val_fraction=0.3"], []):
        config = load_config("tiny", [f"--data.dataset={tmp_path / 'a.jsonl'}",
                                      f"--train.output_dir={tmp_path / 'out'}", *own])
        with pytest.raises(ConfigError):
            Trainer(config)
        assert "is not read" not in capsys.readouterr().err
