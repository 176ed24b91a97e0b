"""The whole model under torch.compile, on training batches of several lengths."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from .conftest import make_model

# xpos_scale_base 4: xPos frames of 16 positions, so 21 and 30 tokens run in two pieces, 13 in one
CASES = {"plain": {}, "padded": {}, "xpos": dict(use_xpos=True, xpos_scale_base=4)}


@pytest.mark.parametrize("case", CASES)
def test_compiled_model_is_not_traced_again_for_each_sequence_length(case):
    # The position encoding's pieces ended at slice(…, T) (and xPos counted them with range(0, T, span)): dynamo
    # specializes both on a symbolic length, so a compiled model (HF Trainer's torch_compile) was traced again for
    # every new padded length, up to dynamo's recompile limit, then ran eagerly.
    torch._dynamo.reset()
    model, eager = (make_model(num_hidden_layers=1, **CASES[case]).train() for _ in range(2))
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    generator = torch.Generator().manual_seed(0)
    frames = []
    for length in (13, 21, 30):
        ids = torch.randint(2, 101, (2, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        mask = mask if case == "padded" else None
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        frames.append(counter.frame_count)
        want = eager(input_ids=ids, attention_mask=mask, labels=labels)
        want.loss.backward()
        torch.testing.assert_close(out.loss, want.loss)
        for (name, got), expected in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(got.grad, expected.grad, msg=name)
    torch._dynamo.reset()
    # Each frame is compiled for the first length, then once with the length dynamic: the third compiles nothing.
    # (A padded batch too: its padding is moved in front, no host read of the mask, test_compile_padded_batch.py.)
    assert frames[2] == frames[1] <= 2, f"compiled frames after each length: {frames}"
