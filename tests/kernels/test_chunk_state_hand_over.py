"""The chunkwise reference's hand-over of the state from chunk to chunk, for states at or above
``naive.SMALL_STATE_ELEMENTS``: one [n, n] matmul per head and block, not a loop of a multiply-add per chunk."""

from __future__ import annotations

import pytest
import torch

from retnet.kernels import naive

TOL = 1e-5


def _graph_nodes(output: torch.Tensor) -> int:
    seen, todo = set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def test_large_states_hand_over_in_a_fixed_number_of_ops(kt):
    """Twice the chunks, the same autograd graph: the loop added two nodes per chunk (and its backward a
    parallel pass over the whole state each, and a copy of all the states), which on a 2-core machine made the
    small preset's layers' backward ~20% slower than Llama's."""
    nodes = []
    for length in (64, 128):
        q, k, v, log_decay, _ = kt.make_inputs(1, length, 2, 128, 128, seed=0)  # a 2^15-element state
        for x in (q, k, v):
            x.requires_grad_()
        o, _ = naive.chunk_retention(q, k, v, log_decay, chunk_size=16)  # (one block: at most C chunks)
        nodes.append(_graph_nodes(o))
    assert nodes[0] == nodes[1], f"graph nodes at 4 and 8 chunks: {nodes}"


@pytest.mark.parametrize("bounds", [None, [0, 5, 5, 40, 71, 100], [0, 100]])
@pytest.mark.parametrize("initial_state", [False, True])
def test_matmul_hand_over_matches_the_recurrent_form(kt, monkeypatch, bounds, initial_state):
    """Every state taken by the matmul (small ones too), in blocks of 3 chunks, then of 2: sequences
    starting and ending inside and across blocks, with and without initial states, empty ones included."""
    cu_seqlens = None if bounds is None else torch.tensor(bounds)
    batch, n = (2, 2) if bounds is None else (1, len(bounds) - 1)
    q, k, v, log_decay, h0 = kt.make_inputs(batch, 100, 3, 8, 4, initial_state=initial_state, num_states=n, seed=5)
    ref = kt.run_with_grads(naive.recurrent_retention, q, k, v, log_decay, h0, True, cu_seqlens=cu_seqlens)
    monkeypatch.setattr(naive, "SMALL_STATE_ELEMENTS", 0)
    for block_bytes, hand_over in ((3 * batch * 3 * 8 * 4 * 4, 2**10), (2**30, 2)):
        monkeypatch.setattr(naive, "STATE_BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(naive, "HAND_OVER_CHUNKS", hand_over)
        got = kt.run_with_grads(lambda *a, **kw: naive.chunk_retention(*a, chunk_size=16, **kw), q, k, v, log_decay,
                                h0, True, cu_seqlens=cu_seqlens)
        kt.compare(got, ref, TOL, f"blocks of {block_bytes} bytes, hand-over of {hand_over}")


def test_matmul_hand_over_matches_the_loop_closely(kt, monkeypatch):
    """The paper's fastest and slowest decays over 32 chunks: the matmul's γ^(sum of exponents) against the
    loop's product of per-chunk factors, outputs and gradients within float32 rounding."""
    q, k, v, log_decay, h0 = kt.make_inputs(2, 512, 4, 16, 16, initial_state=True, seed=7)
    form = lambda *a, **kw: naive.chunk_retention(*a, chunk_size=16, **kw)
    loop = kt.run_with_grads(form, q, k, v, log_decay, h0, True)
    monkeypatch.setattr(naive, "SMALL_STATE_ELEMENTS", 0)
    kt.compare(kt.run_with_grads(form, q, k, v, log_decay, h0, True), loop, 2e-6, "matmul vs loop")
