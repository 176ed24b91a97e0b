"""retnet-eval's ``--max-documents`` counts rows, as training's data.max_documents does: its help says so (it said
documents, and a row without text among the first N leaves fewer than N documents)."""

from __future__ import annotations

from retnet.train.evaluate import _parser, read_documents


def test_max_documents_counts_rows_and_its_help_says_so(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a b"}\n{"text": ""}\n{"text": "c d"}\n')
    assert read_documents(str(rows), max_documents=2, cache_dir=tmp_path / "cache") == ["a b"]
    (action,) = [a for a in _parser()._actions if "--max-documents" in a.option_strings]
    assert "as data.max_documents: the first N rows of --dataset (stdlib: files), those without text among them " \
           "then left out" in action.help
