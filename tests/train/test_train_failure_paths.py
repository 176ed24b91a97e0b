"""What ``retnet-train`` does when something fails mid-run and how the run recovers: a full disk or a permission
while a checkpoint or the export is written (a message naming where, the last good checkpoint kept, the next run
resuming from it with every step logged once), an old checkpoint that cannot be pruned, a resume whose saved
tokenizer was replaced or damaged, and a leading chat file whose conversations are null in every row (skipped as
a leading text file of null text is). In-process micro runs (``main`` returns the exit status)."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest

from retnet.train import checkpoint as ckpt_module
from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.checkpoint import list_checkpoints, verify_checkpoint
from retnet.train.config import DataConfig
from retnet.train.data import build_data, load_conversations, local_files


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------------------
# A checkpoint or export that cannot be written
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["full", "sharded"])
def test_a_full_disk_while_saving_names_where_and_the_run_resumes_from_the_last_good_one(
        layout, micro, tmp_path, monkeypatch, capsys, read_metrics):
    """The write of step 4 fails with ENOSPC: the run exits 2 (not a traceback of a bare "[Errno 28] No space left on
    device", which names no path; under the sharded layout torch's CheckpointException wraps it) naming the
    checkpoints directory, the step and the last good checkpoint, which still verifies; no half-written copy is
    left. Rerun, the run resumes from step 2 and logs every step once."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    out = tmp_path / "run"
    args = micro(out, checkpoint__interval=2, checkpoint__layout=layout)
    if layout == "full":
        real = ckpt_module._write_durable
        monkeypatch.setattr(ckpt_module, "_write_durable", lambda path, obj: _full_disk() if "step_00000004" in
                            str(path) and path.name == "optimizer.pt" else real(path, obj))
    else:  # inside torch's distributed save, which raises its CheckpointException
        from retnet.train import trainer as trainer_module

        real_save, real_item, armed = trainer_module.save_sharded_state, dcp_filesystem._write_item, [False]

        def save(directory, *a, **k):
            armed[0] = "step_00000004" in directory.name
            return real_save(directory, *a, **k)

        monkeypatch.setattr(trainer_module, "save_sharded_state", save)
        monkeypatch.setattr(dcp_filesystem, "_write_item", lambda *a, **k: _full_disk() if armed[0]
                            else real_item(*a, **k))
    assert main(args) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 4 in" in err and str(out / "checkpoints") in err, err
    assert "No space left on device" in err and "step_00000002" in err and "Traceback" not in err
    assert _names(out / "checkpoints") == ["step_00000002"]
    assert verify_checkpoint(out / "checkpoints" / "step_00000002")["step"] == 2
    monkeypatch.undo()
    assert main(args) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(out, "val")] == [0, 6]


def test_a_permission_denied_names_the_checkpoints_directory(micro, tmp_path, monkeypatch, capsys):
    """A checkpoints directory the run may not write into (its temporary directory cannot be made): exit 2 naming
    it, and with no checkpoint yet the message says so."""
    out = tmp_path / "run"
    real = Path.mkdir

    def denied(self, *args, **kwargs):
        if self.name.startswith(".tmp-step_"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    assert main(micro(out, train__steps=2)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "Permission denied" in err and str(out / "checkpoints") in err and "none (no checkpoint yet)" in err, err


def test_a_full_disk_while_exporting_keeps_the_checkpoint_and_a_rerun_exports(micro, tmp_path, monkeypatch, capsys):
    """The final checkpoint is saved before the export: an export that fails (ENOSPC while it is synced) exits 2
    naming the export and the saved checkpoint, its half-written copy is removed (it would keep the disk full until
    the next start), and rerunning the command only exports."""
    out = tmp_path / "run"
    args = micro(out, train__steps=2, checkpoint__export=True)
    real = ckpt_module.fsync_tree
    monkeypatch.setattr(ckpt_module, "fsync_tree",
                        lambda root: _full_disk() if Path(root).name.startswith(".tmp-export") else real(root))
    assert main(args) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"could not write the export {str(out / 'export')!r}" in err and "step_00000002" in err, err
    assert "No space left on device" in err and "Traceback" not in err
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-export")]
    assert not (out / "export").exists()
    assert verify_checkpoint(out / "checkpoints" / "step_00000002")["step"] == 2
    monkeypatch.undo()
    assert main(args) == 0
    assert (out / "export" / "config.json").is_file() and (out / "export" / "tokenizer_config.json").is_file()


def test_a_replaced_directory_whose_write_fails_leaves_no_copy(tmp_path):
    def write(tmp: Path) -> None:
        (tmp / "model.safetensors").parent.mkdir()
        (tmp / "model.safetensors").write_bytes(b"x" * 1024)
        _full_disk()

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    with pytest.raises(OSError, match="No space"):
        ckpt_module.replace_directory(tmp_path / "export", write)
    assert _names(tmp_path) == ["export"] and _names(tmp_path / "export") == ["config.json"]


def test_an_old_checkpoint_that_cannot_be_pruned_does_not_stop_the_run(micro, tmp_path, monkeypatch, caplog):
    """keep_last=1: removing step 2 fails (a busy NFS file, a permission) once the new checkpoint is committed. The
    run goes on with a warning naming it (as HF's Trainer ignores a failed rotation), and a later save prunes it."""
    out = tmp_path / "run"
    real = shutil.rmtree
    failed = []

    def busy(path, *args, **kwargs):
        if Path(path).name == "step_00000002" and not failed:
            failed.append(path)
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.shutil, "rmtree", busy)
    with caplog.at_level(logging.WARNING, logger="retnet"):
        assert main(micro(out, checkpoint__interval=2, checkpoint__keep_last=1)) == 0
    assert failed and "could not remove old checkpoint" in caplog.text and "step_00000002" in caplog.text
    assert _names(out / "checkpoints") == ["step_00000006"]


# ----------------------------------------------------------------------------------------------------------
# A resume whose saved tokenizer was replaced or damaged
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def resumable(micro, tmp_path):
    out = tmp_path / "run"
    assert main(micro(out, train__steps=2, checkpoint__interval=2)) == 0
    return out


def test_a_resume_with_another_saved_tokenizer_is_refused_naming_it(resumable, micro, corpus, tmp_path, monkeypatch,
                                                                    capsys):
    """output_dir/tokenizer replaced by a BPE of another vocabulary: refused before the data is read or tokenized
    again, naming that directory (it blamed data.dataset's files as "documents added, removed or edited", after
    tokenizing them)."""
    from retnet.tokenization import train_byte_level_bpe
    from retnet.train import data as data_module

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    shutil.rmtree(resumable / "tokenizer")
    train_byte_level_bpe(texts[:40], vocab_size=400).save_pretrained(resumable / "tokenizer")
    monkeypatch.setattr(data_module, "load_documents", lambda *a, **k: pytest.fail("the data was read"))
    assert main(micro(resumable, train__steps=4)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"the tokenizer this run saved in {str(resumable / 'tokenizer')!r}" in err, err
    assert "not the tokenizer the checkpoint trained with" in err and "step_00000002" in err
    assert "documents added" not in err


def test_a_damaged_saved_tokenizer_is_named_as_the_runs_copy(resumable, micro, capsys):
    (resumable / "tokenizer" / "tokenizer.json").write_text("{not json")
    assert main(micro(resumable, train__steps=4)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"the tokenizer this run saved in {str(resumable / 'tokenizer')!r} for its resumes cannot be read" in err
    assert "remove it to resume with the configured tokenizer" in err


def test_a_removed_saved_tokenizer_resumes_with_the_configured_one(resumable, micro, read_metrics):
    """The way out the refusals give: without output_dir/tokenizer the resume takes data.tokenizer, the same one."""
    shutil.rmtree(resumable / "tokenizer")
    assert main(micro(resumable, train__steps=4)) == 0
    assert [r["step"] for r in read_metrics(resumable)] == [1, 2, 3, 4]
    assert (resumable / "tokenizer" / "tokenizer.json").is_file()


def test_a_checkpoint_from_before_the_tokenizer_fingerprint_still_resumes(resumable, micro, read_metrics):
    """trainer.pt without ``tokenizer_vocab_sha256`` (written by an older version): nothing to compare, it resumes;
    its own checkpoints hold the fingerprint of the tokenizer it trained with."""
    import hashlib

    import torch

    from retnet.train.data import load_tokenizer
    from retnet.train.trainer import _vocab_fingerprint

    step = resumable / "checkpoints" / "step_00000002"
    trainer = torch.load(step / "trainer.pt", weights_only=False)
    assert trainer.pop("tokenizer_vocab_sha256") == _vocab_fingerprint(load_tokenizer(resumable / "tokenizer"))
    torch.save(trainer, step / "trainer.pt")
    manifest = json.loads((step / "manifest.json").read_text())
    data = (step / "trainer.pt").read_bytes()
    manifest["files"]["trainer.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (step / "manifest.json").write_text(json.dumps(manifest))
    assert main(micro(resumable, train__steps=4)) == 0
    assert [r["step"] for r in read_metrics(resumable)] == [1, 2, 3, 4]
    saved = torch.load(resumable / "checkpoints" / "step_00000004" / "trainer.pt", weights_only=False)
    assert saved["tokenizer_vocab_sha256"] == _vocab_fingerprint(load_tokenizer(resumable / "tokenizer"))


def test_data_tokenizer_retrained_in_place_is_refused_naming_it(micro, corpus, tmp_path, capsys):
    """Without the run's copy, data.tokenizer is read: the same path holding another tokenizer is named."""
    from retnet.tokenization import train_byte_level_bpe

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tokenizer = tmp_path / "tok"
    train_byte_level_bpe(texts, vocab_size=512).save_pretrained(tokenizer)
    out = tmp_path / "run"
    assert main(micro(out, train__steps=2, data__tokenizer=tokenizer)) == 0
    shutil.rmtree(out / "tokenizer")
    shutil.rmtree(tokenizer)
    train_byte_level_bpe(texts[:30], vocab_size=400).save_pretrained(tokenizer)
    assert main(micro(out, train__steps=4, data__tokenizer=tokenizer)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"the tokenizer of data.tokenizer {str(tokenizer)!r} is not the tokenizer the checkpoint" in err, err


# ----------------------------------------------------------------------------------------------------------
# A leading chat file whose conversations are null in every row
# ----------------------------------------------------------------------------------------------------------
def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {i} plus {i}? " * 3},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " * 3}]


@pytest.mark.parametrize("column", ["messages", "conversations"])
def test_a_first_jsonl_file_of_null_conversations_is_skipped(column, tmp_path, caplog):
    """As a leading file of null text is: its rows hold no conversation (a null one is dropped), so nothing is lost
    (it was refused: datasets typed the column null from it and could not read the later files). ShareGPT's
    ``conversations`` too, read in place of the default ``messages``."""
    def row(i):
        if column == "messages":
            return {"messages": _chat(i)}
        return {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({column: None}) + "\n" for _ in range(2)))
    (folder / "b.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(5)))
    config = DataConfig(dataset=str(folder), format="chat", cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="retnet"):
        conversations = load_conversations(config, local_files(config.dataset), tmp_path / "cache")
    assert [index for index, _ in conversations] == list(range(5))
    assert conversations[3][1][0]["content"] == row(3)["messages"][0]["content"] if column == "messages" else \
        conversations[3][1][0] == {"role": "user", "content": "q3"}
    assert "skipping 1 leading JSON file(s)" in caplog.text and "a.jsonl" in caplog.text


def test_a_first_parquet_file_of_null_typed_conversations_is_skipped(tmp_path):
    """pandas writes an all-None column as Parquet's null type: skipped as a leading null text file is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.table({"messages": pa.array([None, None], pa.null())}), folder / "a.parquet")
    pq.write_table(pa.table({"messages": [_chat(i) for i in range(3)]}), folder / "b.parquet")
    config = DataConfig(dataset=str(folder), format="chat", cache_dir=str(tmp_path / "cache"))
    conversations = load_conversations(config, local_files(config.dataset), tmp_path / "cache")
    assert [c for _, c in conversations] == [_chat(i) for i in range(3)]


def test_a_first_file_of_null_conversations_is_skipped_when_streamed(tokenizer_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"messages": None}) + "\n" for _ in range(2)))
    (folder / "b.jsonl").write_text("".join(json.dumps({"messages": _chat(i)}) + "\n" for i in range(8)))
    config = DataConfig(dataset=str(folder), format="chat", streaming=True, val_documents=2, seq_len=64,
                        tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path / "cache"))
    data = build_data(config, vocab_size=512, seed=0, micro_batch=1, global_batch=1, rank=0, local_rank=0,
                      world_size=1, tokenizer_dir=None, barrier=lambda: None)
    tokens, flags = data.micro_batches(1)[0]
    assert tokens.shape == (1, 64) and flags.any()


def test_a_first_file_of_null_prompts_is_still_named(tmp_path):
    """A prompt-completion row with a null completion is refused anyway: such a file is named, not skipped."""
    from retnet.train.config import ConfigError

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"prompt": "q", "completion": None}) + "\n" for _ in range(2)))
    (folder / "b.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                            for i in range(3)))
    config = DataConfig(dataset=str(folder), format="chat", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"'completion' is null in every row of '.*a\.jsonl'"):
        load_conversations(config, local_files(config.dataset), tmp_path / "cache")


def test_list_checkpoints_after_a_failed_save_holds_no_temporary_directory(micro, tmp_path, monkeypatch):
    """The half-written checkpoint never looks like one: resume=auto and keep_last see only the good ones."""
    out = tmp_path / "run"
    real = ckpt_module._write_durable
    monkeypatch.setattr(ckpt_module, "_write_durable", lambda path, obj: _full_disk() if path.name == "trainer.pt"
                        and "step_00000004" in str(path) else real(path, obj))
    assert main(micro(out, checkpoint__interval=2)) == EXIT_CONFIG
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]
    assert _names(out / "checkpoints") == ["step_00000002"]


# ----------------------------------------------------------------------------------------------------------
# A checkpoint that cannot be read
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def unreadable_step_4(micro, tmp_path, monkeypatch):
    """A run saved steps 2 and 4; step 4's model.pt cannot be read now (another user's 0600 file on a shared
    filesystem: root, which runs the suite, reads anything, so the read is what fails)."""
    out = tmp_path / "run"
    assert main(micro(out, train__steps=4, checkpoint__interval=2)) == 0
    ckpt_module._checked.clear()  # as a new process: nothing verified yet
    real = ckpt_module._sha256

    def denied(path):
        if Path(path) == out / "checkpoints" / "step_00000004" / "model.pt":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(ckpt_module, "_sha256", denied)
    return out


def test_resume_auto_skips_a_checkpoint_it_cannot_read(unreadable_step_4, micro, caplog, read_metrics):
    """As a corrupt one: resume=auto warns naming the file and its error and resumes from step 2 (the PermissionError
    ended the run with a traceback); reaching step 4 again, the unreadable one is moved aside, not overwritten."""
    out = unreadable_step_4
    with caplog.at_level(logging.WARNING, logger="retnet"):
        assert main(micro(out, train__steps=4, checkpoint__interval=2)) == 0
    assert "cannot be read" in caplog.text and "Permission denied" in caplog.text and "step_00000004" in caplog.text
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    names = _names(out / "checkpoints")
    assert "step_00000004" in names and any(name.startswith("step_00000004.corrupt-") for name in names), names


def test_an_explicit_resume_from_a_checkpoint_it_cannot_read_names_it(unreadable_step_4, micro, capsys):
    out = unreadable_step_4
    status = main(micro(out, train__steps=6, train__resume=out / "checkpoints" / "step_00000004"))
    err = capsys.readouterr().err
    assert status == EXIT_CONFIG and "cannot be read" in err and "Permission denied" in err, err
    assert "Traceback" not in err


def test_a_file_pairing_null_conversations_with_prompts_is_not_skipped(tmp_path):
    """Rows {prompt, completion, messages: null}: skipped, the set would lose its messages column and be read as
    prompt-completion pairs without this file's (its rows silently gone). It stays, and the set is read as it was."""

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}", "messages": None})
                                            + "\n" for i in range(3)))
    (folder / "b.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n"
                                            for i in range(3, 6)))
    config = DataConfig(dataset=str(folder), format="chat", cache_dir=str(tmp_path / "cache"))
    texts = [json.dumps(c) for _, c in load_conversations(config, local_files(config.dataset), tmp_path / "cache")]
    # read as before: the messages column's null rows dropped (the run then finds nothing to train on), never b's
    # pairs alone
    assert not any("p3" in text for text in texts) or any("p0" in text for text in texts), texts


# ----------------------------------------------------------------------------------------------------------
# What a real full disk raises, and the tokenizer's fingerprint
# ----------------------------------------------------------------------------------------------------------
def test_the_os_error_is_found_behind_what_real_writers_raise():
    """torch.save into a full file raises RuntimeError "unexpected pos" with the OSError as its context; torch's
    distributed checkpoint wraps the ranks' failures; safetensors raises its own SafetensorError "(os error 28)". An
    interrupt raised while an OSError was handled stays an interrupt."""
    from retnet.train.trainer import _os_error

    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as error:
        assert _os_error(error) is full

    class CheckpointException(BaseException):
        def __init__(self, failures):
            self.failures = failures

    wrapped = RuntimeError("unexpected pos")
    wrapped.__context__ = full
    assert _os_error(CheckpointException({0: (wrapped, "traceback")})) is full

    SafetensorError = type("SafetensorError", (Exception,), {})
    found = _os_error(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert isinstance(found, OSError) and found.errno == errno.ENOSPC

    interrupt = KeyboardInterrupt()
    interrupt.__context__ = full
    assert _os_error(interrupt) is None
    assert _os_error(RuntimeError("a bug")) is None


def test_the_tokenizer_fingerprint_does_not_depend_on_the_vocabularys_order():
    """get_vocab comes from a Rust HashMap, in another order in each process: tokens sharing an id (an aliased
    vocabulary) must hash the same whatever the order, or a resume with the same tokenizer is refused at random."""
    from retnet.train.trainer import _vocab_fingerprint

    class Tokenizer:
        eos_token_id = 0

        def __init__(self, items):
            self.items = items

        def get_vocab(self):
            return dict(self.items)

    items = [("<eos>", 0), ("a", 1), ("A", 1), ("b", 2), ("B", 2), ("c", 3)]
    assert _vocab_fingerprint(Tokenizer(items)) == _vocab_fingerprint(Tokenizer(items[::-1]))
    assert _vocab_fingerprint(Tokenizer(items)) != _vocab_fingerprint(Tokenizer([*items[:-1], ("d", 3)]))
