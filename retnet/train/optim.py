"""The learning-rate schedule and the optimizer: AdamW, or Muon on the decoder layers' matrices beside AdamW on
the rest (``optim.name``, :mod:`retnet.train.muon`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from retnet.train.config import ConfigError, OptimConfig
from retnet.train.muon import MUON_TORCH, MuonWithAdamW, muon_available, muon_parameter_names


def get_lr(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based, the last one ``total_steps - 1``): a linear warmup
    whose ``warmup_steps``-th step reaches ``lr``, then ``schedule`` (cosine / linear / constant) from ``lr``
    down to ``min_lr``, reached exactly on the final step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    peak = max(cfg.warmup_steps - 1, 0)  # the decay starts from the step at lr: the warmup's last, or step 0
    progress = min(1.0, (step - peak) / max(1, total_steps - 1 - peak))
    # min_lr plus a share of the range: exactly min_lr at progress 1 (lr - (lr - min_lr) can miss it by an ulp)
    share = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + share * (cfg.lr - cfg.min_lr)


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Parameters without weight decay: norm weights/biases, biases, embeddings (and the output head tied
    to them), and any 1-D parameter (e.g. SAU's α, σ). Decaying embeddings pulls rare tokens towards 0 for
    no gain in a byte-level vocabulary; most recent LLM recipes exempt them too."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.Embedding) or param.ndim < 2 or param_name.endswith("bias"):
                names.add(full)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        names.update(n for n, _ in model.named_parameters(remove_duplicate=False) if n.startswith("lm_head."))
    return names


def adamw_kernel(model: nn.Module, device: torch.device) -> dict:
    """AdamW's implementation (its ``fused`` or ``foreach`` argument): fused on CUDA, except over a tensor-parallel
    model's mix of DTensor (split) and plain (replicated) parameters, which the fused and foreach kernels refuse to
    take in one call: the per-parameter loop (all DTensors, as under FSDP2 or with the vocabulary and the sequence
    split too, take the fused kernel). A resume sets it again over the checkpoint's (another split's) choice."""
    from torch.distributed.tensor import DTensor

    split = [isinstance(param, DTensor) for param in model.parameters() if param.requires_grad]
    if any(split) and not all(split):
        return {"foreach": False}
    return {"fused": True} if device.type == "cuda" else {}


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """``optim.name``'s optimizer over the trainable parameters. ``adamw``: AdamW, its groups the decayed
    parameters then the others (``no_decay_parameter_names``). ``muon``: a :class:`~retnet.train.muon.MuonWithAdamW`
    whose groups are Muon's one (the decoder layers' matrices, ``muon_parameter_names``; decayed by
    ``optim.weight_decay``) then AdamW's two over the rest, as above."""
    skip = no_decay_parameter_names(model)
    muon_names = set(muon_parameter_names(model)) if cfg.name == "muon" else set()
    decay, no_decay, matrices = [], [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (matrices if name in muon_names else no_decay if name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, **adamw_kernel(model, device)}
    if cfg.name != "muon":
        return torch.optim.AdamW(groups, **adamw)
    if not muon_available():  # the config refuses it first; a config built otherwise gets as clear an error
        raise ConfigError(f"optim.name 'muon' needs torch >= {MUON_TORCH} (torch.optim.Muon); this is torch "
                          f"{torch.__version__}")
    muon = {"lr": cfg.muon_lr or cfg.lr, "weight_decay": cfg.weight_decay, "momentum": cfg.muon_momentum,
            "ns_steps": cfg.muon_ns_steps, "adjust_lr_fn": cfg.muon_adjust_lr}
    return MuonWithAdamW([{"params": matrices}], groups, muon=muon, adamw=adamw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, cfg: OptimConfig) -> None:
    """Every group's learning rate at a step whose (AdamW) rate is ``lr`` (``get_lr``): Muon's groups follow
    the same schedule scaled to their peak, ``optim.muon_lr`` over ``optim.lr``."""
    muon = {id(group) for group in getattr(optimizer, "muon_groups", ())}
    scale = (cfg.muon_lr or cfg.lr) / cfg.lr
    for group in optimizer.param_groups:
        group["lr"] = lr * scale if id(group) in muon else lr


def optimizer_note(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """What the start-up log says of the optimizer: which parameters each algorithm trains (count, size)."""
    def counted(groups) -> str:
        params = [param for group in groups for param in group["params"]]
        return f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.3f}M parameters"

    if not isinstance(optimizer, MuonWithAdamW):
        return f"AdamW on all trainable ({counted(optimizer.param_groups)})"
    return (f"Muon on the decoder layers' matrices ({counted(optimizer.muon_groups)}), AdamW on the rest "
            f"({counted(optimizer.adamw_groups)})")
