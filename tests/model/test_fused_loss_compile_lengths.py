"""The fused linear cross-entropy under torch.compile, on batches of several lengths."""

import torch

from retnet.model.loss import linear_cross_entropy


def test_compiled_fused_loss_is_not_traced_again_for_each_token_count():
    # Its chunk loop was range(0, N, chunk): dynamo specializes such a range on N, so every new length compiled
    # the loss again (up to dynamo's recompile limit, then eager with a warning).
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 16, generator=generator, requires_grad=True)
    compiled = torch.compile(linear_cross_entropy, backend=backend)
    for length in (9, 13, 17, 30):
        hidden = torch.randn(2, length, 16, generator=generator, requires_grad=True)
        labels = torch.randint(0, 37, (2, length), generator=generator)
        labels[0, :3] = -100
        loss = compiled(hidden, weight, labels)
        grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
        eager = linear_cross_entropy(hidden, weight, labels)
        want_hidden, want_weight = torch.autograd.grad(eager, (hidden, weight))
        torch.testing.assert_close(loss, eager)
        torch.testing.assert_close(grad_hidden, want_hidden)
        torch.testing.assert_close(grad_weight, want_weight)
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 4 lengths"  # the first static, then one dynamic
