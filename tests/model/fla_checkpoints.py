"""A synthetic flash-linear-attention checkpoint for the conversion tests, in a module of its own: test_convert_fla.py
skips itself without fla, and a test file importing from it would skip (or stop collecting) with it."""

import json
from pathlib import Path

import torch


def _synthetic_fla_checkpoint(directory: Path, width: int = 96) -> dict:
    """A 2-layer fla RetNet's config.json and weights (random, no fla needed), written to ``directory``."""
    hidden = 64
    fla = {"model_type": "retnet", "hidden_size": hidden, "num_heads": 2, "expand_k": 1.0, "expand_v": 2.0,
           "num_hidden_layers": 2, "vocab_size": 101, "tie_word_embeddings": True}
    weights = {"model.embeddings.weight": torch.randn(101, hidden), "model.norm.weight": torch.ones(hidden)}
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        weights.update({
            prefix + "attn_norm.weight": torch.ones(hidden), prefix + "mlp_norm.weight": torch.ones(hidden),
            prefix + "attn.q_proj.weight": torch.randn(64, hidden), prefix + "attn.k_proj.weight": torch.randn(64, hidden),
            prefix + "attn.v_proj.weight": torch.randn(128, hidden), prefix + "attn.g_proj.weight": torch.randn(128, hidden),
            prefix + "attn.o_proj.weight": torch.randn(hidden, 128), prefix + "attn.g_norm_swish_gate.weight": torch.ones(64),
            prefix + "mlp.gate_proj.weight": torch.randn(width, hidden), prefix + "mlp.up_proj.weight": torch.randn(width, hidden),
            prefix + "mlp.down_proj.weight": torch.randn(hidden, width),
        })
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(fla))
    return weights
