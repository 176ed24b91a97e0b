"""Differential checks found by randomised testing of the model against itself run another way: paths the other
model tests leave out (gradients through a cache passed in, a served batch of fresh and cached rows packed in xPos
frames, padding holes on top of a cache, padded and packed training rows against each row alone). Tiny configs with
a small ``xpos_scale_base`` so that a few dozen tokens already span several xPos frames."""

import pytest
import torch

from retnet.model import RetNetCache

XPOS_SMALL = dict(use_xpos=True, xpos_scale_base=4, chunk_size=5)  # frames of 15 positions (xpos_span)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).abs().max().item() / (1 + expected.abs().max().item())


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("modes", [("chunkwise", "recurrent"), ("parallel", "chunkwise")])
def test_gradients_flow_through_a_passed_cache_as_through_one_forward(model_factory, modes):
    # Truncated backpropagation without the detach: a loss on the second piece reaches the first piece's weights
    # through the state. Row 1 is padded on the left in the first piece and on the right in the second (so the
    # continuation runs packed on top of the state), and 33 tokens cross several xPos frames.
    model = model_factory(**XPOS_SMALL).train()
    torch.manual_seed(0)
    length, split = 33, 14
    ids = torch.randint(3, 101, (2, length))
    first_mask = torch.ones(2, split, dtype=torch.long)
    first_mask[1, :2] = 0
    second_mask = torch.ones(2, length - split, dtype=torch.long)
    second_mask[1, -2:] = 0

    first = model(ids[:, :split], attention_mask=first_mask, use_cache=True, retention_mode=modes[0])
    second = model(ids[:, split:], attention_mask=torch.cat([first_mask, second_mask], 1), use_cache=True,
                   cache=first.past_key_values, retention_mode=modes[1])
    loss = (first.logits[0].pow(2).mean() + first.logits[1, 2:].pow(2).mean()
            + second.logits[0].pow(2).mean() + second.logits[1, :-2].pow(2).mean())
    model.zero_grad()
    loss.backward()
    through_cache = _gradients(model)

    whole = model(ids[:1], retention_mode=modes[0]).logits[0]
    real = model(ids[1:, 2:-2], retention_mode=modes[0]).logits[0]
    expected = (whole[:split].pow(2).mean() + real[:split - 2].pow(2).mean()
                + whole[split:].pow(2).mean() + real[split - 2:].pow(2).mean())
    model.zero_grad()
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    _assert_same_gradients(through_cache, _gradients(model))


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_fresh_and_cached_rows_served_packed_equal_each_sequence_alone(model_factory, mode):
    # The server's batched prefill: rows that start from scratch (RetNetCache.zeros) stacked with rows that have a
    # state, their new tokens packed by cu_seqlens, only each sequence's last logits kept; then batched decoding.
    model = model_factory(**XPOS_SMALL)
    torch.manual_seed(1)
    seen = [0, 6, 0, 40]
    new = [9, 1, 23, 17]
    sequences = [torch.randint(3, 101, (s + n,)) for s, n in zip(seen, new)]
    with torch.no_grad():
        caches = [RetNetCache.zeros(model.config, 1) if s == 0
                  else model(seq[None, :s], use_cache=True, retention_mode=mode).past_key_values
                  for seq, s in zip(sequences, seen)]
        packed = torch.cat([seq[s:] for seq, s in zip(sequences, seen)])[None]
        cu_seqlens = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
        out = model(packed, cu_seqlens=cu_seqlens, cache=RetNetCache.concat(caches), use_cache=True,
                    retention_mode=mode, logits_to_keep=cu_seqlens[1:].long() - 1)
        steps = torch.randint(3, 101, (len(sequences), 3))
        cache = out.past_key_values
        for step in range(steps.shape[1]):
            decoded = model(steps[:, step:step + 1], cache=cache, use_cache=True, retention_mode=mode)
            cache = decoded.past_key_values
        for row, seq in enumerate(sequences):
            alone = model(torch.cat([seq, steps[row]])[None], retention_mode=mode).logits[0]
            assert _relative_error(out.logits[0, row], alone[len(seq) - 1]) < 1e-4, row
            assert _relative_error(decoded.logits[row, -1], alone[-1]) < 1e-4, row
        assert cache.offsets.tolist() == [len(seq) + steps.shape[1] for seq in sequences]


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_padding_holes_on_top_of_a_cache_leave_each_row_its_real_tokens(model_factory, mode):
    model = model_factory(**XPOS_SMALL)
    torch.manual_seed(2)
    prefix = torch.randint(3, 101, (3, 4))
    ids = torch.randint(3, 101, (3, 21))
    mask = (torch.rand(3, 21) < 0.6).long()
    mask[2] = 0  # a row with nothing new: its state and count stay
    with torch.no_grad():
        cache = model(prefix, use_cache=True, retention_mode=mode).past_key_values
        out = model(ids, attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1), cache=cache,
                    use_cache=True, retention_mode=mode)
        for row in range(3):
            real = mask[row].nonzero().squeeze(-1)
            sequence = torch.cat([prefix[row], ids[row, real]])[None]
            alone = model(sequence, use_cache=True, retention_mode=mode)
            if len(real):
                assert _relative_error(out.logits[row, real], alone.logits[0, -len(real):]) < 1e-4, row
            for layer, state in enumerate(out.past_key_values.states):
                assert _relative_error(state[row], alone.past_key_values.states[layer][0]) < 1e-4, (row, layer)
        assert out.past_key_values.offsets.tolist() == [4 + int(m.sum()) for m in mask]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layout", ["left", "right", "packed"])
def test_padded_or_packed_training_rows_give_the_loss_and_gradients_of_each_row_alone(model_factory, layout,
                                                                                      fused):
    model = model_factory(**XPOS_SMALL).train()
    model.config.fuse_linear_cross_entropy = fused
    torch.manual_seed(3)
    lengths, width = [7, 19, 2], 19
    rows = torch.randint(3, 101, (3, width))
    items = sum(lengths) - len(lengths)  # every token but each row's first is predicted
    if layout == "packed":
        ids = torch.cat([row[:n] for row, n in zip(rows, lengths)])[None]
        # a document's first token is predicted by no token of its own (as DataCollatorWithFlattening marks it)
        labels = torch.cat([torch.cat([torch.tensor([-100]), row[1:n]]) for row, n in zip(rows, lengths)])[None]
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        loss = model(ids, labels=labels, cu_seqlens=cu_seqlens, num_items_in_batch=items).loss
    else:
        ids = torch.zeros(3, width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for b, n in enumerate(lengths):
            real = slice(width - n, width) if layout == "left" else slice(0, n)
            ids[b, real], mask[b, real], labels[b, real] = rows[b, :n], 1, rows[b, :n]
            labels[b, real.start] = -100  # the column before it is padding, which predicts nothing
        loss = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=items).loss
    model.zero_grad()
    loss.backward()
    batched = _gradients(model)

    model.zero_grad()
    expected = sum(model(row[None, :n], labels=row[None, :n], num_items_in_batch=items).loss
                   for row, n in zip(rows, lengths))
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    _assert_same_gradients(batched, _gradients(model))
