"""Context parallelism: under ``torch.compile`` of each decoder layer (what ``train.compile`` does) a packed row's
pieces begin with sequences of every length, and a new length must not compile the layer again; ``shard_sequences``
refuses offsets that are no 1-D integer tensor by name."""

from __future__ import annotations

import pytest
import torch

from retnet.model.context_parallel import shard_sequences
from tests.launch import fake_two_rank_group


def test_a_pieces_first_sequence_of_a_new_length_compiles_nothing_new():
    """The second piece of a packed row of 40 tokens, whose first sequence (the one going on from the first piece) is
    a different length each micro-batch, as packed documents make it. The incoming state's share over that sequence
    ran compiled, its chunks of time counted from the length in Python, so dynamo guarded on the exact length: every
    new one compiled that part of the layer again, until torch's recompile limit (8) sent it back to eager with a
    warning (with inductor, 8 builds in the first steps). It runs eagerly now, as the state exchange before it does:
    after the first two micro-batches (the second makes the lengths dynamic) nothing is compiled again. One rank in
    a fake two-rank group: the traced graphs matter, not the values."""
    compiled = []

    def counting(graph_module, example_inputs):
        compiled.append(graph_module)
        return graph_module.forward

    with fake_two_rank_group(rank=1) as model:
        for layer in model.model.layers:
            layer.compile(backend=counting)
        generator = torch.Generator().manual_seed(1)
        counts = []
        for first in (3, 7, 11, 5, 9, 14, 2, 17, 6, 12):  # the second piece's first sequence: tokens 20 .. 20 + first
            input_ids = torch.randint(2, 61, (1, 40), generator=generator)
            cu_seqlens = torch.tensor([0, 20 + first, 40], dtype=torch.int32)
            inputs, shard, targets = shard_sequences(input_ids, input_ids, 1, 2, cu_seqlens)
            assert shard.first_length == first
            model(**inputs, context_parallel=shard, num_items_in_batch=targets, use_cache=False).loss.backward()
            counts.append(len(compiled))
    assert counts[0] > 0, "no layer was compiled"
    assert counts[2:] == [counts[1]] * 8, counts


@pytest.mark.parametrize("cu_seqlens, got", [
    ([0, 4, 10], "got list"),  # was an AttributeError ('list' object has no attribute 'tolist')
    (torch.tensor([[0, 4, 10]]), r"got torch.int64 of shape \(1, 3\)"),
    (torch.tensor([0.0, 4.0, 10.0]), r"got torch.float32 of shape \(3,\)"),  # was a shard of float offsets
], ids=["list", "2-d", "float"])
def test_offsets_that_are_no_1d_integer_tensor_are_refused_by_name(cu_seqlens, got):
    input_ids = torch.arange(10)[None]
    with pytest.raises(ValueError, match=r"shard_sequences: cu_seqlens must be a 1-D integer torch.Tensor .*" + got):
        shard_sequences(input_ids, input_ids, 1, 2, cu_seqlens)
    inputs, shard, _ = shard_sequences(input_ids, input_ids, 1, 2, torch.tensor([0, 4, 10], dtype=torch.int32))
    assert (shard.offsets, shard.first_length, inputs["cu_seqlens"].tolist()) == ((0, 1), 5, [0, 5])
