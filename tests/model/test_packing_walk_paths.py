"""Packed documents as transformers' padding-free collator marks them, walked from the README's Packed documents."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

from retnet.model import RetNetForSequenceClassification

LENGTHS = (7, 13, 5)


def _documents():
    return [torch.randint(2, 101, (n,), generator=torch.Generator().manual_seed(n)) for n in LENGTHS]


@torch.no_grad()
@pytest.mark.parametrize("mode", ("parallel", "chunkwise", "recurrent"))
def test_documents_marked_only_by_seq_idx_run_apart(model_factory, mode):
    # DataCollatorWithFlattening(return_position_ids=False, return_seq_idx=True) marks its documents by seq_idx
    # alone (what transformers' Mamba-2 reads): it was taken as a keyword and ignored, each document's state carried
    # into the next (logits 0.36 off the second document run alone).
    model = model_factory(use_xpos=True)
    docs = _documents()
    batch = DataCollatorWithFlattening(return_position_ids=False, return_seq_idx=True)(
        [{"input_ids": d.tolist()} for d in docs])
    assert set(batch) == {"input_ids", "labels", "seq_idx"}
    alone = [model(d[None], labels=d[None], retention_mode=mode) for d in docs]
    out = model(**batch, retention_mode=mode)
    torch.testing.assert_close(out.logits[0], torch.cat([a.logits[0] for a in alone]), atol=1e-5, rtol=1e-5)
    # the collator's labels leave each document's first token out: the mean of the documents' own losses
    expected = sum(a.loss * (n - 1) for a, n in zip(alone, LENGTHS)) / sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(out.loss, expected)


@torch.no_grad()
def test_the_classifier_scores_each_document_marked_by_seq_idx(model_factory):
    lm = model_factory()
    classifier = RetNetForSequenceClassification(lm.config).eval()
    classifier.model.load_state_dict(lm.model.state_dict())
    docs = _documents()
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(LENGTHS)])[None]
    scores = classifier(torch.cat(docs)[None], seq_idx=seq_idx).logits
    torch.testing.assert_close(scores, torch.cat([classifier(d[None]).logits for d in docs]))


def test_seq_idx_that_cannot_mark_one_packed_row_is_refused_by_name(model_factory):
    model = model_factory()
    ids = torch.randint(2, 101, (2, 6))
    with pytest.raises(ValueError, match=r"seq_idx marks packed sequences in one row \(B=1\)"):
        model(ids, seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1]] * 2))
    with pytest.raises(ValueError, match="seq_idx must be an integer tensor"):
        model(ids[:1], seq_idx=[[0, 0, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="seq_idx must be an integer tensor"):
        model(ids[:1], seq_idx=torch.zeros(6))
    # one number throughout marks no boundary: a plain batch, whatever its rows
    with torch.no_grad():
        torch.testing.assert_close(model(ids, seq_idx=torch.zeros(2, 6, dtype=torch.int32)).logits,
                                   model(ids).logits)


@torch.no_grad()
def test_the_classifier_scores_each_document_of_restarting_position_ids(model_factory):
    # DataCollatorWithFlattening's default marks its documents by position_ids alone; the backbone runs them apart
    # as cu_seqlens, but the classifier scored only the row's last token: one score for three documents.
    lm = model_factory()
    classifier = RetNetForSequenceClassification(lm.config).eval()
    classifier.model.load_state_dict(lm.model.state_dict())
    docs = _documents()
    batch = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs])
    batch.pop("labels")
    expected = torch.cat([classifier(d[None]).logits for d in docs])
    torch.testing.assert_close(classifier(**batch).logits, expected)
    labels = torch.tensor([0, 1, 0])
    torch.testing.assert_close(classifier(**batch, labels=labels).loss,
                               torch.nn.functional.cross_entropy(expected, labels))
    # counting on (no restart), the positions score the row's last token as before
    ids = torch.cat(docs)[None]
    torch.testing.assert_close(classifier(ids, position_ids=torch.arange(ids.shape[1])[None]).logits,
                               classifier(ids).logits)
