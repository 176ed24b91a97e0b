"""The packed offsets' one rule (``retnet.kernels.checks.is_cu_seqlens``) in ``shard_sequences`` too, and a reward
model's scores from the host lengths a caller already holds."""

from __future__ import annotations

import pytest
import torch

from retnet.model import RetNetConfig, RetNetForSequenceClassification
from retnet.model.context_parallel import shard_sequences
from retnet.train.reward import scores_within_frames


@pytest.mark.parametrize("cu_seqlens, got", [
    (torch.tensor([0, 4, 10]).to(torch.uint16), r"got torch.uint16 of shape \(3,\)"),  # sharded, then the model's refusal
    (torch.tensor([0, 4, 10]).to(torch.uint32), r"got torch.uint32 of shape \(3,\)"),
    (torch.zeros(0, dtype=torch.int32), r"got torch.int32 of shape \(0,\)"),  # was an IndexError
], ids=["uint16", "uint32", "empty"])
def test_shard_sequences_refuses_the_offsets_the_ops_refuse(cu_seqlens, got):
    input_ids = torch.arange(10)[None]
    with pytest.raises(ValueError, match=r"^shard_sequences: cu_seqlens must be a 1-D integer torch.Tensor .*" + got):
        shard_sequences(input_ids, input_ids, 1, 2, cu_seqlens)


def test_scores_from_host_lengths_are_those_read_from_the_offsets():
    # xpos_scale_base 1: a packed frame of 48 positions at chunk_size 16, so the 70-token sequence is scored alone
    config = RetNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, chunk_size=16,
                          pad_token_id=0, eos_token_id=1, use_xpos=True, xpos_scale_base=1.0, num_labels=1,
                          initializer_range=0.2)
    torch.manual_seed(0)
    model = RetNetForSequenceClassification(config).eval()
    lengths = [5, 70, 9, 3]
    input_ids = torch.randint(2, 64, (1, sum(lengths)))
    cu_seqlens = torch.tensor([0, 5, 75, 84, 87])
    with torch.no_grad():
        read = scores_within_frames(model, input_ids, cu_seqlens)
        given = scores_within_frames(model, input_ids, cu_seqlens, lengths)
    assert read.shape == (4,)
    torch.testing.assert_close(given, read, rtol=0, atol=0)
