"""The README's Data paragraph walked as a newcomer reads it: refusals that named the wrong place."""

import json

import pytest

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import build_data

KWARGS = dict(vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
              tokenizer_dir=None, barrier=lambda: None)


@pytest.mark.parametrize("named", ["directory", "glob"])
def test_a_row_that_is_not_utf8_names_the_one_file_of_a_directory_or_glob(named, tokenizer_dir, tmp_path):
    """The refusal named the directory (or the glob) the file was found through, not the file to re-encode."""
    folder = tmp_path / "export"
    folder.mkdir()
    lines = [json.dumps({"text": f"document {i} " * 8}) for i in range(6)]
    lines[3] = json.dumps({"text": "caf\u00e9 au lait " * 8}, ensure_ascii=False)
    (folder / "rows.jsonl").write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    spec = str(folder) if named == "directory" else str(folder / "*.jsonl")
    config = DataConfig(dataset=spec, tokenizer=str(tokenizer_dir), seq_len=32, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"data\.text_field 'text' of '[^']*rows\.jsonl', row 3: not UTF-8 text"):
        build_data(config, **KWARGS)


def test_a_json_lines_row_cut_short_is_named_at_the_end_of_its_line(tmp_path):
    """A row cut short (a copy interrupted, a hand edit) was placed at "column 1" of its line, where its `{` is:
    json read the line with its newline and stopped on the line after it."""
    from retnet.train.data import _malformed_file

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    error = _malformed_file(str(path))
    assert error is not None
    assert "line 2, column 15: not JSON (Expecting ',' delimiter)" in str(error)
    (tmp_path / "crlf.jsonl").write_bytes(b'{"text": "one"}\r\n{"text": "two"\r\n')
    assert "line 2, column 15:" in str(_malformed_file(str(tmp_path / "crlf.jsonl")))
