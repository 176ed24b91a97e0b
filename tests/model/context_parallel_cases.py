"""The rows split across ranks (by tests/train/context_parallel_pieces_worker.py, checked in
test_context_parallel_grpo_paths.py): each case's model and inputs, built alike in the test process (the whole row)
and in every torchrun rank (its piece)."""

from __future__ import annotations

import torch

from retnet.model import RetNetConfig, RetNetForCausalLM

# Three pieces of 37 tokens: not a multiple of the chunk size (8). The documents cross the pieces' boundaries:
# "through" has one spanning the whole middle piece (its state passes through it to the last piece),
# "aligned" one starting exactly at the last piece's start (nothing comes in there) and two inside a piece.
# On two pieces (the xPos cases), "through" has one cut at token 37 and "aligned" one starting there.
PIECE, PIECES = 37, 3
DOCUMENTS = {"through": {3: [5, 90, 16], 2: [5, 60, 9]}, "aligned": {3: [5, 69, 20, 17], 2: [5, 32, 20, 17]}}

CASES = {
    "through_chunkwise": dict(documents="through", mode="chunkwise", fused=False),
    "aligned_parallel_fused": dict(documents="aligned", mode="parallel", fused=True),
    "rows_chunkwise": dict(documents=None, mode="chunkwise", fused=False),
    # activation checkpointing replays each layer, its all-gather included, inside the backward
    "through_checkpointed": dict(documents="through", mode="chunkwise", fused=False, checkpointing=True),
}

# xPos, on 2 or 3 ranks. At xpos_scale_base 2 one frame covers 8 positions, so a plain row's piece runs in 5 frames
# (the incoming state moves 4 times inside it); at base 1 in 10 frames of 4, and the scales ζ^(±n) of positions up to
# 110 lie beyond fp32's range from any one origin (ζ^110 ≈ 1e-60 on the smallest ζ).
XPOS_CASES = {
    "xpos_packed_chunkwise": dict(documents="through", mode="chunkwise", fused=False, xpos_scale_base=2),
    "xpos_packed_parallel_fused": dict(documents="aligned", mode="parallel", fused=True, xpos_scale_base=2),
    "xpos_rows_chunkwise": dict(documents=None, mode="chunkwise", fused=False, xpos_scale_base=2),
    "xpos_rows_far_parallel": dict(documents=None, mode="parallel", fused=False, xpos_scale_base=1),
    "xpos_packed_checkpointed": dict(documents="through", mode="chunkwise", fused=False, xpos_scale_base=2,
                                     checkpointing=True),
}
ALL_CASES = {**CASES, **XPOS_CASES}


def build_case(name: str, pieces: int = PIECES):
    """``(model, input_ids, labels, cu_seqlens or None, retention_mode)``: a row of ``pieces`` pieces."""
    case = ALL_CASES[name]
    torch.manual_seed(0)
    xpos = {"use_xpos": True, "xpos_scale_base": case["xpos_scale_base"]} if "xpos_scale_base" in case else {}
    config = RetNetConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          chunk_size=8, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                          fuse_linear_cross_entropy=case["fused"], ffn_glu=True, **xpos)
    model = RetNetForCausalLM(config).train()
    if case.get("checkpointing"):
        # transformers 5.2x's name; 5.17 has only the older one
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    generator = torch.Generator().manual_seed(1)
    documents = case["documents"]
    rows = 2 if documents is None else 1
    input_ids = torch.randint(2, 101, (rows, PIECE * pieces), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100  # labels that do not count, across a piece's end too
    labels[:, PIECE - 1: PIECE + 2] = -100
    cu_seqlens = None
    if documents is not None:
        lengths = torch.tensor(DOCUMENTS[documents][pieces])
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        labels[0, cu_seqlens[:-1].long()] = -100  # no document is predicted from the one before it
    return model, input_ids, labels, cu_seqlens, case["mode"]
