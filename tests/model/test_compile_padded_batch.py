"""A padded batch through the whole model under torch.compile: one graph, the eager model's results."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from .conftest import make_model

# Row 1's padding: in front (runs unpacked eagerly), behind, on both sides, inside; row 0 is whole.
MASKS = {
    "left": [0, 0, 0, 0] + [1] * 9,
    "right": [1] * 9 + [0, 0, 0, 0],
    "both": [0, 0] + [1] * 8 + [0, 0, 0],
    "inside": [1] * 5 + [0, 0] + [1] * 6,
    "none": [0] * 13,
}


@pytest.mark.parametrize("xpos", [False, True], ids=["rope", "xpos"])
def test_compiled_padded_batch_is_one_graph_with_the_eager_results(xpos):
    # _pack_padded_rows read the mask on the host (is anything padded, is a pad behind a real token): each read
    # a graph break, so a compiled training step of a padded batch ran in ~5 frames (17 with padding behind).
    torch._dynamo.reset()
    settings = (
        dict(num_hidden_layers=1, use_xpos=True, xpos_scale_base=4) if xpos else dict(num_hidden_layers=1)
    )
    model, eager = (make_model(**settings).train() for _ in range(2))
    ids = torch.randint(2, 101, (2, 13), generator=torch.Generator().manual_seed(0))
    # (the layers' ln γ, kept per device from the first forward: filled before the count)
    with torch.no_grad():
        model(input_ids=ids)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    for case, row in MASKS.items():
        mask = torch.ones_like(ids)
        mask[1] = torch.tensor(row)
        labels = ids.masked_fill(mask == 0, -100)
        model.zero_grad(), eager.zero_grad()
        out = compiled(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True)
        out.loss.backward()
        want = eager(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True)
        want.loss.backward()
        real = mask.bool()
        torch.testing.assert_close(out.logits[real], want.logits[real], msg=case)
        torch.testing.assert_close(out.loss, want.loss, msg=case)
        # the final states a generation would continue from (padding neither writes nor decays them)
        for got, expected in zip(out.past_key_values.states, want.past_key_values.states, strict=True):
            torch.testing.assert_close(got, expected, msg=case)
        for (name, got), expected in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(got.grad, expected.grad, msg=f"{case}: {name}")
    assert counter.frame_count == 1, f"{counter.frame_count} frames compiled for padded batches"
    torch._dynamo.reset()


def test_padding_runs_in_front_only_when_compiled_on_a_fresh_state():
    from retnet.model.modeling_retnet import _pack_padded_rows, _PaddingInFront

    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    assert isinstance(_pack_padded_rows(mask, has_state=True), tuple)  # eager: packed, as before
    order = torch.compile(
        lambda m: _pack_padded_rows(m, has_state=False).order, backend="eager", fullgraph=True
    )(mask)
    assert order.tolist() == [[2, 4, 0, 1, 3], [0, 1, 2, 3, 4]]  # padding first, real tokens in their order
    assert not isinstance(_pack_padded_rows(mask, has_state=False), _PaddingInFront)
    torch._dynamo.reset()
