"""The rows ``test_context_parallel`` splits across ranks: each case's model and inputs, built alike in the
test process (the whole row) and in every torchrun rank (its piece)."""

from __future__ import annotations

import torch

from retnet.model import RetNetConfig, RetNetForCausalLM

# Three pieces of 37 tokens: not a multiple of the chunk size (8). The documents cross the pieces' boundaries:
# "through" has one spanning the whole middle piece (its state passes through it to the last piece),
# "aligned" one starting exactly at the last piece's start (nothing comes in there) and two inside a piece.
PIECE, PIECES = 37, 3
DOCUMENTS = {"through": [5, 90, 16], "aligned": [5, 69, 20, 17]}

CASES = {
    "through_chunkwise": dict(documents="through", mode="chunkwise", fused=False),
    "aligned_parallel_fused": dict(documents="aligned", mode="parallel", fused=True),
    "rows_chunkwise": dict(documents=None, mode="chunkwise", fused=False),
    # activation checkpointing replays each layer, its all-gather included, inside the backward
    "through_checkpointed": dict(documents="through", mode="chunkwise", fused=False, checkpointing=True),
}


def build_case(name: str):
    """``(model, input_ids, labels, cu_seqlens or None, retention_mode)``: a row of ``PIECES`` pieces."""
    case = CASES[name]
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          chunk_size=8, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                          fuse_linear_cross_entropy=case["fused"], ffn_glu=True)
    model = RetNetForCausalLM(config).train()
    if case.get("checkpointing"):
        # transformers 5.2x's name; 5.17 has only the older one
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    generator = torch.Generator().manual_seed(1)
    rows = 2 if case["documents"] is None else 1
    input_ids = torch.randint(2, 101, (rows, PIECE * PIECES), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100  # labels that do not count, across a piece's end too
    labels[:, PIECE - 1: PIECE + 2] = -100
    cu_seqlens = None
    if case["documents"] is not None:
        lengths = torch.tensor(DOCUMENTS[case["documents"]])
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        labels[0, cu_seqlens[:-1].long()] = -100  # no document is predicted from the one before it
    return model, input_ids, labels, cu_seqlens, case["mode"]
