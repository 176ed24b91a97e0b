"""Compiled decoder layers under non-reentrant activation checkpointing."""

import torch


def test_a_fresh_model_with_compiled_checkpointed_layers_runs_its_first_backward(model_factory):
    # The first forward is the one that fills each retention's ln γ cache: filled inside a compiled layer, the
    # checkpoint's recomputation (cache filled by then) traced another graph and failed the first backward.
    model = model_factory(use_xpos=False).train()
    # transformers 5.2x renamed gradient_checkpointing_enable (and its kwargs argument); 5.17 has the old names
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    for layer in model.model.layers:
        layer.compile(backend="aot_eager")
    ids = torch.randint(2, 101, (2, 24), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids, use_cache=False, retention_mode="chunkwise")
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.model.layers.parameters())
