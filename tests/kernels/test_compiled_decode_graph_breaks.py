"""The PyTorch references under torch.compile: traced whole, without graph breaks."""

import torch

from retnet.kernels import naive


def test_recurrent_reference_traces_without_a_graph_break():
    # The per-step decay factors asked is_inference() of ln γ before is_compiling(): dynamo cannot trace that
    # call, so every recurrent call (each layer of a compiled decode step) broke the graph in two.
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=generator) for _ in range(3))
    log_decay = torch.log1p(-torch.tensor([2.0 ** -5, 2.0 ** -6, 2.0 ** -7, 2.0 ** -8]))
    state = torch.randn(2, 4, 8, 8, generator=generator)
    explained = torch._dynamo.explain(naive.recurrent_retention)(q, k, v, log_decay, None, state, True)
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
    eager = naive.recurrent_retention(q, k, v, log_decay, None, state, True)
    compiled = torch.compile(naive.recurrent_retention, backend="eager", fullgraph=True)(
        q, k, v, log_decay, None, state, True)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want)
