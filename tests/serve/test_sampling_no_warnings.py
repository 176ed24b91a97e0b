"""A sampled step warns of nothing: torch.searchsorted was given a column slice of the CDF (not contiguous) and
printed a UserWarning about copying it on the first sampled request of every server. torch warns once a process, so
the searchsorted calls are also checked for contiguous inputs directly."""

import warnings

import pytest
import torch

from retnet.serve.sampling import RowSampler, SamplingParams, sample_step

VOCAB = 300

PARAMS = {
    "plain": SamplingParams(temperature=0.8, seed=1),
    "top_k": SamplingParams(temperature=0.8, top_k=20, seed=2),
    "top_p": SamplingParams(temperature=1.0, top_p=0.9, seed=3),
    "min_p": SamplingParams(temperature=1.0, min_p=0.01, seed=4),
}


@pytest.mark.parametrize("names", [["plain"], ["top_k"], ["top_p", "min_p"], list(PARAMS)], ids="+".join)
def test_sampled_step_warns_nothing_and_searches_contiguous_tensors(names, monkeypatch):
    search = torch.searchsorted

    def contiguous_only(sorted_sequence, values, *args, **kwargs):
        assert sorted_sequence.is_contiguous() and values.is_contiguous()
        return search(sorted_sequence, values, *args, **kwargs)

    monkeypatch.setattr(torch, "searchsorted", contiguous_only)
    logits = torch.randn(len(names), VOCAB, generator=torch.Generator().manual_seed(0))
    rows = [RowSampler(PARAMS[name], [5, 6, 7], VOCAB) for name in names]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = sample_step(logits, rows).tokens
    assert len(tokens) == len(names) and all(0 <= t < VOCAB for t in tokens)
