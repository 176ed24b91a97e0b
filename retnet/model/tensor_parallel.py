"""Tensor parallelism for RetNet (Megatron-style, on torch's DTensor tensor-parallel API).

Each decoder layer is split across the ranks of a 1-D device mesh the way torchtitan splits Llama's: the
projections into heads (retention's ``q_proj``, ``k_proj``, ``v_proj``, ``g_proj``) and the FFN's ``gate_proj``
and ``up_proj`` are column-parallel, each rank computing its own heads' (or its own slice of the FFN's width)
outputs; the projections back to the model width (``o_proj``, ``down_proj``) are row-parallel, their partial
sums all-reduced. Retention runs per head, so a rank runs its ``H / tp`` heads from end to end (their decays,
their head norm's rows, their recurrent state ``[B, H / tp, K, V]``) with no communication inside it. A layer
costs one all-reduce after retention and one after the FFN in the forward, and one per column-parallel input
in the backward (torchtitan's count without sequence parallelism).

Embeddings, the final norm, the LM head (or a classifier's ``score``) and the residual stream stay replicated:
every rank holds them whole and computes them alike, so their gradients agree without communication.
A vocab-parallel embedding and loss are not there yet.

``model.state_dict()`` then holds DTensors for the sharded weights; :func:`full_state_dict` gathers the full
tensors, which ``save_pretrained(..., state_dict=...)`` writes as an unsharded export.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

# Module paths inside a RetNetDecoderLayer, by how they are split (absent optional ones are skipped).
COLUMN_PARALLEL = ("retention.q_proj", "retention.k_proj", "retention.v_proj", "retention.g_proj", "mlp.gate_proj",
                   "mlp.up_proj")
ROW_PARALLEL = ("retention.o_proj", "mlp.down_proj")


def parallelize_retnet(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard every decoder layer of ``model`` across ``tp_mesh`` in place and return ``model``.

    Args:
        model: a ``RetNetModel``, ``RetNetForCausalLM`` or ``RetNetForSequenceClassification``, on the mesh's
            device type, the same on every rank (built with the same seed or loaded with ``from_pretrained``;
            the sharded weights are cut from rank 0's, the replicated ones are used as each rank holds them).
        tp_mesh: a 1-D :class:`~torch.distributed.device_mesh.DeviceMesh` of the tp ranks.

    After it, each layer's retention runs heads ``r·H/tp .. (r+1)·H/tp`` on mesh rank ``r`` (``q/k/v/g_proj``
    column-parallel, ``o_proj`` row-parallel, the head norm's weight a ``Shard(0)`` DTensor) and its FFN a
    ``1/tp`` slice of ``intermediate_size`` (``gate/up_proj`` column-parallel, ``down_proj`` row-parallel);
    inputs, outputs and the residual stream are plain, replicated tensors, and a cache holds each rank's heads,
    ``[B, H/tp, K, V]`` per layer. Embeddings, the norms around the layers, the LM head (or ``score``) stay
    replicated plain parameters. An activation's trainable parameters (``sau``'s ``alpha``, a trainable
    ``gsmelu``'s) stay replicated too; as they act on the rank's slice of the FFN, their gradients are summed
    over the mesh by a hook.

    Raises:
        ValueError, naming the field and value: a mesh that is not 1-D or not on the model's device type,
            ``num_attention_heads`` or ``intermediate_size`` not divisible by the mesh size, ``dropout`` > 0 (each
            rank would draw its own mask on the replicated stream), a projection that is not a plain
            ``nn.Linear`` (PEFT adapters) or holds quantized (int8) weights, or a model already parallelized.
            ``context_parallel`` in a forward of the parallelized model is refused there.
    """
    backbone = getattr(model, "base_model", model)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(backbone, "config"):
        raise ValueError(f"parallelize_retnet expects a RetNetModel, RetNetForCausalLM or "
                         f"RetNetForSequenceClassification; got {type(model).__name__}")
    config = backbone.config
    _check(model, layers, config, tp_mesh)
    size, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    heads = config.num_attention_heads // size
    for layer in layers:
        plan = {path: ColwiseParallel() for path in COLUMN_PARALLEL if _submodule(layer, path) is not None}
        plan.update({path: RowwiseParallel() for path in ROW_PARALLEL})
        parallelize_module(layer, tp_mesh, plan)
        retention = layer.retention
        retention.select_heads(rank * heads, heads)
        if retention.head_norm is not None:
            weight = retention.head_norm.weight
            retention.head_norm.weight = nn.Parameter(distribute_tensor(weight.detach(), tp_mesh, [Shard(0)]),
                                                      requires_grad=weight.requires_grad)
        for param in layer.mlp.act_fn.parameters():
            if param.requires_grad:
                param.register_hook(functools.partial(_sum_over_mesh, mesh=tp_mesh))
    return model


def full_state_dict(model: nn.Module, *, cpu_offload: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a parallelized model with every DTensor gathered whole (plain tensors, the names and
    shapes of the unsharded model's): what ``save_pretrained(directory, state_dict=...)`` writes as an unsharded
    export, or an unsharded model's ``load_state_dict`` takes. A collective: every rank of the mesh calls it.
    ``cpu_offload``: the tensors are moved to the CPU and only rank 0 gets them (the others an empty dict)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    return get_model_state_dict(model, options=options)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a parallelized model, whose gradients are DTensors (the sharded
    weights) and plain tensors (the replicated ones), which torch's refuses to mix. The total norm is the
    unsharded model's (the DTensors' part reduced over the mesh, the replicated gradients counted once); every
    gradient is scaled by ``min(1, max_norm / total)``. Returns the total norm, a plain tensor. A collective."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    with_grads = [p for p in parameters if p.grad is not None]
    groups = [[p for p in with_grads if isinstance(p.grad, DTensor)],
              [p for p in with_grads if not isinstance(p.grad, DTensor)]]
    norms = []
    for group in groups:
        if group:
            norm = nn.utils.get_total_norm([p.grad for p in group], norm_type, error_if_nonfinite, foreach)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    total = nn.utils.get_total_norm(norms, norm_type, error_if_nonfinite, foreach)
    for group in groups:
        if group:
            nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach)
    return total


def _check(model: nn.Module, layers: nn.ModuleList, config, tp_mesh: DeviceMesh) -> None:
    if tp_mesh.ndim != 1:
        raise ValueError(f"parallelize_retnet: tp_mesh must be 1-D (the tensor-parallel ranks); got "
                         f"{tp_mesh.ndim} dims {tuple(tp_mesh.shape)} (pass mesh['tp'] of a larger mesh)")
    size = tp_mesh.size()
    for field in ("num_attention_heads", "intermediate_size"):
        value = getattr(config, field)
        if value % size:
            raise ValueError(f"tensor parallelism over {size} ranks needs config.{field} divisible by {size}; "
                             f"got {value}")
    if config.dropout > 0:
        raise ValueError(f"tensor parallelism needs config.dropout = 0 (each rank would draw its own mask on the "
                         f"replicated residual stream); got {config.dropout}. Set config.dropout = 0.0 first")
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            raise ValueError(f"parallelize_retnet: the model is already parallelized ({name} is a DTensor)")
        if param.device.type != tp_mesh.device_type:
            raise ValueError(f"parallelize_retnet: tp_mesh is a {tp_mesh.device_type!r} mesh but {name} is on "
                             f"{param.device}; move the model first")
    for index, layer in enumerate(layers):
        for path in COLUMN_PARALLEL + ROW_PARALLEL:
            module = _submodule(layer, path)
            if module is None:
                continue
            where = f"layers.{index}.{path}"
            if type(module) is not nn.Linear:
                raise ValueError(f"tensor parallelism shards plain nn.Linear projections; {where} is "
                                 f"{type(module).__name__} (merge adapters first)")
            if type(module.weight) not in (torch.Tensor, nn.Parameter):
                raise ValueError(f"tensor parallelism cannot shard quantized weights; {where}.weight is "
                                 f"{type(module.weight).__name__} (parallelize the unquantized model)")


def _submodule(layer: nn.Module, path: str) -> nn.Module | None:
    module = layer
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _sum_over_mesh(grad: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """A replicated parameter's gradient from this rank's slice of the FFN, summed over the mesh (all-reduce)."""
    return DTensor.from_local(grad, mesh, [Partial()]).full_tensor()


__all__ = ["clip_grad_norm_", "full_state_dict", "parallelize_retnet"]
