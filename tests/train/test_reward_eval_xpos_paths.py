"""``retnet-eval`` of an xPos reward model: a pair's sequence longer than one packed xPos frame is scored alone,
unpacked, not refused with the whole batch (XPosFrameError)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retnet.model import RetNetConfig, RetNetForSequenceClassification
from retnet.model.modeling_retnet import XPOS_PACKED_MAX_GROWTH, xpos_span
from retnet.train.evaluate_reward import score_pairs
from retnet.train.preference import Pairs


@pytest.fixture(scope="module")
def model():
    # xpos_scale_base 1: a packed frame of 48 positions at chunk_size 16
    config = RetNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, chunk_size=16,
                          pad_token_id=0, eos_token_id=1, use_xpos=True, xpos_scale_base=1.0, num_labels=1,
                          initializer_range=0.2)
    torch.manual_seed(0)
    return RetNetForSequenceClassification(config).eval()


def _alone(model, ids: list[int]) -> float:
    """A sequence scored by itself: packed alone when it fits a packed frame, else unpacked in the model's frames."""
    row = torch.tensor([ids])
    with torch.no_grad():
        if len(ids) <= xpos_span(model.config, XPOS_PACKED_MAX_GROWTH):
            out = model(input_ids=row, cu_seqlens=torch.tensor([0, len(ids)]), use_cache=False, return_dict=True)
        else:
            out = model(input_ids=row, attention_mask=torch.ones_like(row), use_cache=False, return_dict=True)
    return float(out.logits[0, 0])


def test_a_sequence_past_a_packed_xpos_frame_is_scored_alone(model):
    frame = xpos_span(model.config, XPOS_PACKED_MAX_GROWTH)
    # (prompt, chosen, rejected): pair 1's chosen and both of pair 3's sequences are past the frame
    lengths = np.array([[5, 7, 6], [10, 70, 8], [4, 9, 3], [30, 25, 20]])
    assert (lengths[:, :1] + lengths[:, 1:] > frame).sum() == 3
    tokens = np.random.default_rng(0).integers(2, 64, lengths.sum()).astype(np.int64)
    pairs = Pairs(tokens, lengths, np.arange(len(lengths)))
    expected = torch.tensor([[_alone(model, [*pairs.parts(i)[0], *pairs.parts(i)[side]]) for side in (1, 2)]
                             for i in range(len(pairs))])
    for batch_size in (1, 4):  # 4: pair 1's long sequence beside short ones; 1: pair 3's, both long, alone
        rewards = score_pairs(model, pairs, batch_size=batch_size).cpu()
        torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=1e-5)
