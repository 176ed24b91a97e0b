"""What the data pipeline takes for a document, and where its blocks start and end."""

import json

import numpy as np
import torch

from retnet.train.config import DataConfig
from retnet.train.data import load_documents, local_files

BLANKS = ["", " ", "\n\n", " \t\r\n", "\u3000\u00a0"]  # no text: each would be a lone EOS (only "" was dropped)
TEXTS = ["def f(x):\n    return x\n", "  indented text  ", "print(1)\n"]


def test_whitespace_only_documents_are_dropped(tmp_path, monkeypatch):
    import retnet.train.data as data

    rows = [text for pair in zip(BLANKS, [*TEXTS, *TEXTS]) for text in pair]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    config = DataConfig(dataset=str(path), cache_dir=str(tmp_path / "cache"))
    assert load_documents(config, local_files(config.dataset), tmp_path / "cache") == [*TEXTS, *TEXTS][:len(BLANKS)]

    files = []
    for i, text in enumerate([" \n", "import os\n", "\n\n\n"]):
        files.append(tmp_path / f"m{i}.py")
        files[-1].write_text(text)
    monkeypatch.setattr(data, "stdlib_files", lambda: files)
    assert load_documents(DataConfig(dataset="stdlib"), files, tmp_path) == ["import os\n"]


def test_streamed_whitespace_only_documents_are_dropped(tokenizer_dir):
    import datasets

    from retnet.train.data import encode_documents, load_tokenizer
    from retnet.train.streaming import StreamingData

    tokenizer = load_tokenizer(tokenizer_dir)
    rows = [text for pair in zip(BLANKS, [*TEXTS, *TEXTS]) for text in pair] * 10
    stream = datasets.Dataset.from_dict({"text": rows}).to_iterable_dataset()
    streamed = StreamingData(stream, np.zeros((1, 16), dtype=np.int64), tokenizer, text_field="text", seq_len=16,
                             micro_batch=4, rank=0, world_size=1)
    blocks = torch.cat(streamed.micro_batches(2)).flatten()
    want = encode_documents(tokenizer, [t for t in rows if t.strip()])
    assert torch.equal(blocks, torch.from_numpy(want[: blocks.numel()].astype(np.int64)))
