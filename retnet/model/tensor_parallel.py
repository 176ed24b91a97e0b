"""Tensor parallelism for RetNet (Megatron-style, on torch's DTensor tensor-parallel API).

Each decoder layer is split across the ranks of a 1-D device mesh the way torchtitan splits Llama's: the
projections into heads (retention's ``q_proj``, ``k_proj``, ``v_proj``, ``g_proj``) and the FFN's ``gate_proj``
and ``up_proj`` are column-parallel, each rank computing its own heads' (or its own slice of the FFN's width)
outputs; the projections back to the model width (``o_proj``, ``down_proj``) are row-parallel, their partial
sums all-reduced. Retention runs per head, so a rank runs its ``H / tp`` heads from end to end (their decays,
their head norm's rows, their recurrent state ``[B, H / tp, K, V]``) with no communication inside it. A layer
costs two all-reduces in the forward (after retention, after the FFN) and two in the backward (the input
gradients of retention's and of the FFN's column-parallel projections, each block's summed once: Megatron's
count without sequence parallelism), plus one for an activation's trainable parameters (SAU's ``alpha``),
whose gradient from each rank's slice of the FFN is summed over the mesh in the autograd graph.

The final norm, a classifier's ``score`` and the residual stream stay replicated: every rank holds them whole and
computes them alike, so their gradients agree without communication. The embedding and the LM head (tied or not)
stay replicated too, unless ``vocab_parallel=True``: then each rank holds ``1 / tp`` of the vocabulary's rows of
them (:class:`VocabParallelEmbedding`, the LM head column-parallel), the embedding's output is all-reduced once,
the fused loss (:func:`~retnet.model.loss.linear_cross_entropy`) computes each rank's logits only and exchanges
two numbers a token, and the logits that ``forward`` returns without it are gathered whole. At vocabulary 32k
and width 2048 the two tables are 134M parameters (tied, 67M): the largest share of a small model.

With ``sequence_parallel=True`` (Megatron's sequence parallelism) the residual stream between the blocks is split
along time instead of replicated: a ``Shard(1)`` DTensor, ``ceil(T / tp)`` tokens a rank, the norms (torch's
``SequenceParallel``, weights ``Replicate`` DTensors) running on each rank's tokens. Each block all-gathers its
normed input and reduce-scatters its output where it all-reduced it (the same bytes on a ring), so the residual
stream's and the norms' activations take ``1 / tp`` of the memory, and so does the gathered input that the
projections keep for the backward (:class:`_GatheredInputSavedSharded` keeps the rank's shard and gathers it again
there, as Megatron does); the first layer cuts the embedding's output (no
communication) and the final norm's output is gathered whole for the head. Each norm's parameter gradient is
all-reduced over the mesh (a small all-reduce a parameter a micro-batch, as for SAU's ``alpha``). A decode step's
one token leaves the other ranks none, which works.

LoRA: a model with peft's LoRA layers injected (``peft.get_peft_model`` or ``inject_adapter_in_model`` on the
decoder layers' projections, before this) is split as the plain one, each frozen projection as it would be, and
each adapter (``B A``, rank ``r``) so that its output takes its base's layout (:func:`_split_lora`): ``B`` by rows
under a column-parallel base, ``A`` whole on every rank; ``A`` by columns under a row-parallel one, its ``r``
partial sums a token all-reduced (one more small collective a row-parallel projection), ``B`` whole. The
adapters' names, and :func:`full_state_dict`'s, are the unsplit model's, so peft's merge and adapter files work
on the gathered state dict. DoRA's magnitudes ``m`` (one per output row) split as their base's output rows
(:func:`_split_dora`): by rows under a column-parallel base, whose rank holds each of its rows whole; whole on every
rank under a row-parallel one, where each row's norm ``||W + s·B A||`` sums the ranks' squared partial norms (one
all-reduce of ``out`` numbers a projection; the norm is detached, as in peft, so its backward costs nothing) and
``m / norm`` scales the summed output.

``model.state_dict()`` then holds DTensors for the sharded weights; :func:`full_state_dict` gathers the full
tensors, which ``save_pretrained(..., state_dict=...)`` writes as an unsharded export (``save_pretrained`` without
``state_dict`` is refused); :func:`load_full_state_dict` loads an unsharded state dict back into the split model.

Data parallelism over tensor parallelism: FSDP2, ``fully_shard(layer, mesh=mesh["dp"])`` for each layer and then
``fully_shard(model, mesh=mesh["dp"])``, after ``parallelize_retnet(model, mesh["tp"])`` on a 2-D (dp, tp) mesh;
:func:`clip_grad_norm_` takes the gradients on both meshes. ``DistributedDataParallel`` over the dp group is not
supported: it refuses the mix of DTensor and plain parameters ("got mixed torch.Tensor and DTensor").

Optimizers: the parameters are usually a mix of DTensors (the sharded weights) and plain tensors (the replicated
ones), which torch's multi-tensor paths refuse (``foreach=True``, ``fused=True``: "got mixed torch.Tensor and
DTensor"). The for-loop path works: pass ``foreach=False`` on CUDA, where torch picks ``foreach`` by default (it
counts DTensors among the types foreach supports, not the mix); on the CPU the for-loop path is the default. Under
FSDP2 over the dp mesh every parameter is a DTensor, and so with ``vocab_parallel`` and ``sequence_parallel`` when
no activation or classifier head holds parameters: then ``foreach`` and ``fused`` work (checked on the CPU).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from retnet.model.loss import check_token_ids, vocab_shard_start

# Module paths inside a RetNetDecoderLayer, by how they are split (absent optional ones are skipped).
COLUMN_PARALLEL = ("retention.q_proj", "retention.k_proj", "retention.v_proj", "retention.g_proj", "mlp.gate_proj",
                   "mlp.up_proj")
ROW_PARALLEL = ("retention.o_proj", "mlp.down_proj")


def parallelize_retnet(model: nn.Module, tp_mesh: DeviceMesh, *, vocab_parallel: bool = False,
                       sequence_parallel: bool = False) -> nn.Module:
    """Shard every decoder layer of ``model`` across ``tp_mesh`` in place and return ``model``.

    Args:
        model: a ``RetNetModel``, ``RetNetForCausalLM`` or ``RetNetForSequenceClassification``, on the mesh's
            device type, the same on every rank (built with the same seed or loaded with ``from_pretrained``;
            the sharded weights are cut from rank 0's, the replicated ones are used as each rank holds them).
        tp_mesh: a 1-D :class:`~torch.distributed.device_mesh.DeviceMesh` of the tp ranks.
        vocab_parallel: also split the embedding and the LM head by vocabulary rows (``Shard(0)`` DTensors,
            tied ones staying one parameter; uneven shards as torch cuts them, ``ceil(vocab / tp)`` rows a rank).
        sequence_parallel: Megatron's sequence parallelism: between the blocks the residual stream is split along
            time (a ``Shard(1)`` DTensor, ``ceil(T / tp)`` tokens a rank), and the norms run on each rank's tokens
            (their weights ``Replicate`` DTensors); each block all-gathers its normed input and reduce-scatters its
            output instead of all-reducing it (the same bytes). The final norm's output is gathered whole for the
            head.

    After it, each layer's retention runs heads ``r·H/tp .. (r+1)·H/tp`` on mesh rank ``r`` (``q/k/v/g_proj``
    column-parallel, ``o_proj`` row-parallel, the head norm's weight a ``Shard(0)`` DTensor) and its FFN a
    ``1/tp`` slice of ``intermediate_size`` (``gate/up_proj`` column-parallel, ``down_proj`` row-parallel);
    inputs, outputs and the residual stream are plain, replicated tensors (``sequence_parallel``: the residual stream
    between the blocks a ``Shard(1)`` DTensor), and a cache holds each rank's heads, ``[B, H/tp, K, V]`` per layer.
    The embedding, the norms around the layers, the LM head (or ``score``) stay replicated plain parameters, except
    the embedding and LM head with ``vocab_parallel`` (``Shard(0)`` DTensors) and the norms with
    ``sequence_parallel`` (``Replicate`` DTensors). An activation's parameters (``sau``'s ``alpha``, a trainable ``gsmelu``'s) stay
    replicated too; as they act on the rank's slice of the FFN, their gradients are summed over the mesh inside
    the autograd graph (in the activation's forward, so frozen or unfrozen later, or under FSDP2, alike).

    For data parallelism on top, shard with FSDP2 over the other dimension of a 2-D (dp, tp) mesh after this
    (``fully_shard(layer, mesh=mesh["dp"])`` per layer, then the model); ``DistributedDataParallel`` refuses the
    DTensor parameters. Save with ``save_pretrained(directory, state_dict=full_state_dict(model))``
    (:func:`full_state_dict` on every rank, the save on rank 0), load with :func:`load_full_state_dict`.

    Raises:
        ValueError, naming the field and value: a mesh that is not 1-D or not on the model's device type,
            ``num_attention_heads`` or ``intermediate_size`` not divisible by the mesh size, ``dropout`` > 0 (each
            rank would draw its own mask on the replicated stream; the config's and every ``nn.Dropout``'s),
            a projection that is neither a plain ``nn.Linear`` nor peft's LoRA layer around one (merged or biased
            adapters and LoRA variants other than DoRA refused) or holds quantized (int8) weights, or a model
            already parallelized; with ``vocab_parallel``, a ``vocab_size`` that leaves a rank no rows, or an
            embedding or LM head that is not a plain ``nn.Embedding`` / bias-free ``nn.Linear``.

    Context parallelism combines with it: on a (cp, tp) mesh, split the model over ``mesh["tp"]`` and pass the
    forward the piece :func:`~retnet.model.context_parallel.shard_sequences` cuts for the rank's cp index, with the
    group ``mesh["cp"].get_group()``; each rank then exchanges its heads' states with the ranks holding the same
    heads of the other pieces.
    """
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        # a PeftModel: the RetNet model inside it, its LoRA layers injected in place, is split; the wrapper returned
        parallelize_retnet(model.get_base_model(), tp_mesh, vocab_parallel=vocab_parallel,
                           sequence_parallel=sequence_parallel)
        return model
    backbone = getattr(model, "base_model", model)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(backbone, "config"):
        raise ValueError(f"parallelize_retnet expects a RetNetModel, RetNetForCausalLM or "
                         f"RetNetForSequenceClassification; got {type(model).__name__}")
    config = backbone.config
    _check(model, layers, config, tp_mesh)
    if vocab_parallel:
        _check_vocab(model, backbone, config, tp_mesh)
    size, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    heads = config.num_attention_heads // size
    for layer in layers:
        output = dict(output_layouts=Shard(1), use_local_output=False) if sequence_parallel else {}
        plan, adapted = {}, []
        for paths, style in ((COLUMN_PARALLEL, ColwiseParallel), (ROW_PARALLEL, functools.partial(RowwiseParallel,
                                                                                                   **output))):
            for path in paths:
                module = _submodule(layer, path)
                if module is None:
                    continue
                if _is_lora(module):  # the frozen projection split as it would be, its adapters below
                    adapted.append((module, path in ROW_PARALLEL))
                    path += ".base_layer"
                plan[path] = style()
        if sequence_parallel:
            plan.update({"retention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()})
            layer.register_forward_pre_hook(functools.partial(_split_sequence, mesh=tp_mesh))
        _parallelize_keeping_frozen(layer, tp_mesh, plan)
        for module, row_parallel in adapted:
            _split_lora(module, row_parallel, tp_mesh, sequence_parallel)
        if sequence_parallel:
            for norm in (layer.retention_norm, layer.ffn_norm):
                _GradsSummedOverMesh(norm, tp_mesh)
        # Each sub-block's input enters as one replicated DTensor: the partial input gradients of its
        # column-parallel projections add up on it and are all-reduced once where it turns back into the plain
        # residual stream (2 backward all-reduces a layer rather than one per projection).
        for block in (layer.retention, layer.mlp):
            if sequence_parallel:
                _GatheredInputSavedSharded(block, tp_mesh)
            else:
                block.register_forward_pre_hook(functools.partial(_replicated_first_input, mesh=tp_mesh))
        retention = layer.retention
        retention.select_heads(rank * heads, heads)
        if retention.head_norm is not None:
            weight = retention.head_norm.weight
            retention.head_norm.weight = nn.Parameter(distribute_tensor(weight.detach(), tp_mesh, [Shard(0)]),
                                                      requires_grad=weight.requires_grad)
        if any(True for _ in layer.mlp.act_fn.parameters()):
            _GradsSummedOverMesh(layer.mlp.act_fn, tp_mesh)
    if vocab_parallel:
        _split_vocabulary(model, backbone, tp_mesh)
    if sequence_parallel:
        _parallelize_keeping_frozen(backbone.norm, tp_mesh, SequenceParallel())
        _GradsSummedOverMesh(backbone.norm, tp_mesh)
        backbone.norm.register_forward_hook(_gather_sequence)
    return model


class VocabParallelEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose ``weight`` is a ``Shard(0)`` DTensor: each rank looks up the tokens of its rows of
    the vocabulary (zeros for the others') and the ranks' lookups are summed, one all-reduce; the gradient, the
    same on every rank, reaches each rank's rows alone. ``padding_idx`` keeps its row's gradient zero on the rank
    that holds it. (torch's ``RowwiseParallel`` on an embedding would apply ``padding_idx`` to the local row of that
    number on every rank, freezing another token's row.) Made by :func:`parallelize_retnet` from the model's own
    embedding, whose class it takes (as FSDP2's ``fully_shard`` does)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight  # read at each call: FSDP2 swaps in its unsharded DTensor for the forward
        check_token_ids(input_ids, weight.shape[0], "input_ids")  # else zeros for an id no rank holds
        start, local = vocab_shard_start(weight), weight.to_local()
        local_ids = input_ids - start
        here = (local_ids >= 0) & (local_ids < local.shape[0])
        padding = None
        if self.padding_idx is not None and 0 <= self.padding_idx - start < local.shape[0]:
            padding = self.padding_idx - start
        # (max_norm and scale_grad_by_freq are refused: the other ranks' tokens, looked up as row 0, would count)
        embedded = F.embedding(torch.where(here, local_ids, 0), local, padding)
        return _SumOverMesh.apply(embedded * here.unsqueeze(-1).to(embedded.dtype), weight.device_mesh)


def full_state_dict(model: nn.Module, *, cpu_offload: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a parallelized model with every DTensor gathered whole (plain tensors, the names and
    shapes of the unsharded model's): what ``save_pretrained(directory, state_dict=...)`` writes as an unsharded
    export, or an unsharded model's ``load_state_dict`` takes. A collective: every rank of the mesh calls it.
    ``cpu_offload``: the tensors are moved to the CPU and only rank 0 gets them (the others an empty dict).
    transformers' ``save_pretrained`` empties the dict it writes: pass it a copy to use the state dict again."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    return get_model_state_dict(model, options=options)


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]):
    """Load an unsharded state dict (the unsharded model's names and shapes: what :func:`full_state_dict` or an
    unsharded model's ``state_dict()`` gives) into a parallelized model, each rank keeping its slice of the sharded
    weights; ``model.load_state_dict`` cannot copy full tensors into DTensors. A collective: every rank calls it
    with the same state dict (the sharded weights are cut from rank 0's, the replicated ones taken as each rank
    passes them). Strict: a missing or unexpected key raises. ``state_dict`` itself is left as it was (torch's
    ``set_model_state_dict`` puts the model's tensors into the dict it is given)."""
    options = StateDictOptions(full_state_dict=True)
    return set_model_state_dict(model, dict(state_dict), options=options)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a parallelized model, whose gradients are DTensors (the sharded
    weights) and plain tensors (the replicated ones), which torch's refuses to mix; under FSDP2 over the dp mesh of
    a 2-D (dp, tp) mesh, DTensors on two meshes (the tp-sharded weights on (dp, tp), the others on dp). The total
    norm is the unsharded model's (each DTensor part reduced over its mesh, the replicated gradients counted once);
    every gradient is scaled by ``min(1, max_norm / total)``. Returns the total norm, a plain tensor. A collective:
    every rank calls it, with its parameters in the same order."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    # torch stacks the per-gradient norms, which needs them on one mesh with one layout: the gradients are grouped
    # by mesh and placements (plain ones under None) and each group's norm is gathered whole.
    groups: dict[tuple | None, list[torch.Tensor]] = {}
    for param in parameters:
        grad = param.grad
        if grad is not None:
            key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
            groups.setdefault(key, []).append(param)
    norms = []
    for group in groups.values():
        norm = nn.utils.get_total_norm([p.grad for p in group], norm_type, error_if_nonfinite, foreach)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    total = nn.utils.get_total_norm(norms, norm_type, error_if_nonfinite, foreach)
    for group in groups.values():
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
    # The modules decide, not the config: setting config.dropout on a built model leaves its nn.Dropout(p) as built.
    dropouts = [f"{name}.p={module.p}" for name, module in model.named_modules()
                if isinstance(module, nn.Dropout) and module.p > 0]
    if config.dropout > 0 or dropouts:
        adapters = config.dropout == 0 and all(".lora_dropout." in dropout for dropout in dropouts)
        raise ValueError(f"tensor parallelism needs dropout 0 (each rank would draw its own mask on the replicated "
                         f"residual stream); got config.dropout={config.dropout}"
                         + (f", {dropouts[0]}" if dropouts else "")
                         + (f" and {len(dropouts) - 1} more nn.Dropout" if len(dropouts) > 1 else "")
                         + (". Make the LoRA adapters with lora_dropout=0" if adapters else
                            ". Load the model with from_pretrained(path, dropout=0.0) or build it with dropout=0.0"))
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
            if _is_lora(module):
                _check_lora(module, where)
                continue
            if type(module) is not nn.Linear:
                raise ValueError(f"tensor parallelism shards plain nn.Linear projections; {where} is "
                                 f"{type(module).__name__} (merge adapters first)")
            if type(module.weight) not in (torch.Tensor, nn.Parameter):
                raise ValueError(f"tensor parallelism cannot shard quantized weights; {where}.weight is "
                                 f"{type(module.weight).__name__} (parallelize the unquantized model)")


def _check_vocab(model: nn.Module, backbone: nn.Module, config, tp_mesh: DeviceMesh) -> None:
    problem = vocab_split_problem(config.vocab_size, tp_mesh.size())
    if problem:
        raise ValueError(f"{problem} of config.vocab_size={config.vocab_size}")
    embedding, head = backbone.embed_tokens, getattr(model, "lm_head", None)
    if type(embedding) is not nn.Embedding or type(embedding.weight) not in (torch.Tensor, nn.Parameter):
        raise ValueError(f"vocab_parallel splits a plain nn.Embedding; embed_tokens is {type(embedding).__name__} "
                         f"with a {type(embedding.weight).__name__} weight")
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        raise ValueError(f"vocab_parallel splits an embedding without max_norm, scale_grad_by_freq or sparse; "
                         f"embed_tokens has max_norm={embedding.max_norm}, scale_grad_by_freq="
                         f"{embedding.scale_grad_by_freq}, sparse={embedding.sparse}")
    if head is not None and (type(head) is not nn.Linear or head.bias is not None
                             or type(head.weight) not in (torch.Tensor, nn.Parameter)):
        raise ValueError(f"vocab_parallel splits a bias-free nn.Linear LM head; lm_head is {head!r} with a "
                         f"{type(head.weight).__name__} weight")


def vocab_split_problem(vocab_size: int, ranks: int) -> str | None:
    """Why a vocabulary of ``vocab_size`` rows cannot be split over ``ranks`` (the last rank would hold none, as
    torch cuts ``ceil(vocab / ranks)`` rows a rank), or None."""
    rows = -(-vocab_size // ranks)
    if rows * (ranks - 1) < vocab_size:
        return None
    return (f"a vocabulary-parallel split over {ranks} ranks cuts {rows} rows a rank, which leaves the last rank none "
            f"(pad the vocabulary to a multiple of {ranks})")


def _split_vocabulary(model: nn.Module, backbone: nn.Module, tp_mesh: DeviceMesh) -> None:
    """The embedding and the LM head by vocabulary rows (see :class:`VocabParallelEmbedding`); a tied pair stays one
    parameter. The head is column-parallel: its logits (what ``forward`` returns without the fused loss) are gathered
    whole, the fused loss takes its local rows."""
    embedding, head = backbone.embed_tokens, getattr(model, "lm_head", None)
    tied = head is not None and head.weight is embedding.weight
    if head is not None:
        parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    if tied:
        embedding.weight = head.weight
    else:
        embedding.weight = nn.Parameter(distribute_tensor(embedding.weight.detach(), tp_mesh, [Shard(0)]),
                                        requires_grad=embedding.weight.requires_grad)
    embedding.__class__ = VocabParallelEmbedding


def _parallelize_keeping_frozen(module: nn.Module, mesh: DeviceMesh, plan) -> None:
    """``parallelize_module``, the parameters frozen before still frozen after: torch's ``SequenceParallel`` makes
    a norm's new ``Replicate`` parameters trainable, which would train the norms of a LoRA run (or any frozen
    one) under sequence parallelism."""
    frozen = {name for name, param in module.named_parameters() if not param.requires_grad}
    parallelize_module(module, mesh, plan)
    for name, param in module.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


def _is_lora(module: nn.Module) -> bool:
    """Whether ``module`` is peft's LoRA layer around a Linear (``lora.Linear``: ``base_layer``, ``lora_A``,
    ``lora_B``), as :func:`retnet.train.lora.apply_lora` injects it."""
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def _check_lora(module: nn.Module, where: str) -> None:
    """ValueError for a LoRA layer the split cannot take: the base not a plain Linear, adapters merged into it, a
    LoRA variant other than DoRA (each computes its own way, which the split does not know), or biased adapters."""
    base = module.base_layer
    if type(base) is not nn.Linear or type(base.weight) not in (torch.Tensor, nn.Parameter):
        raise ValueError(f"tensor parallelism shards LoRA layers around plain nn.Linear projections; {where}."
                         f"base_layer is {type(base).__name__} with a {type(base.weight).__name__} weight")
    if getattr(module, "merged", False):
        raise ValueError(f"tensor parallelism cannot split {where}: its adapters are merged into the weight "
                         f"(unmerge them first)")
    dora = {name for name, on in getattr(module, "use_dora", {}).items() if on}
    others = sorted(name for name in getattr(module, "lora_variant", {}) or {} if name not in dora)
    if others:
        raise ValueError(f"tensor parallelism splits plain LoRA and DoRA adapters; {where} has another LoRA variant "
                         f"on adapter(s) {others}: train them with tensor_parallel=1")
    for name in module.lora_A:
        for part in (module.lora_A[name], module.lora_B[name]):
            if type(part) is not nn.Linear or part.bias is not None:
                raise ValueError(f"tensor parallelism splits bias-free nn.Linear LoRA adapters; {where} adapter "
                                 f"{name!r} has {part!r}")


def _split_lora(module: nn.Module, row_parallel: bool, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Split the adapters of a LoRA layer (``y = W x + s·B A x``) whose base is split already, so that the adapter's
    output has its base's layout and the ranks' sum is the unsplit adapter's (one small collective of ``r`` numbers
    a token, for the row-parallel ones).

    Column-parallel base (``W`` by output rows): ``B`` is cut by rows as ``W`` is, ``A`` (``r × in``) is whole on
    every rank, a ``Replicate`` DTensor applied to the block's replicated input; each rank's ``A`` gradient is its
    own rows' share, summed over the mesh in the autograd graph.
    Row-parallel base (``W`` by input columns): ``A`` is cut by columns, its partial products all-reduced (under
    sequence parallelism reduce-scattered along time, as the base's output is: :class:`_AdapterOnLocalTokens`),
    and ``B`` is whole on every rank."""
    output = dict(output_layouts=Shard(1), use_local_output=False) if sequence_parallel else {}
    _AdapterInputUncastUnderAutocast(module)
    # peft's merge would fold a split B A into a split W as plain matrices (it fails half-way, at the first
    # row-parallel projection, the column-parallel ones merged already): refused before anything changes
    module.merge = _refuse_merge
    for name in module.lora_A:
        lora_A, lora_B = module.lora_A[name], module.lora_B[name]
        if not row_parallel:
            parallelize_module(lora_B, mesh, ColwiseParallel())
            _replicate_parameters(lora_A, mesh)
        else:
            parallelize_module(lora_A, mesh, RowwiseParallel(**output))
            if sequence_parallel:
                _AdapterOnLocalTokens(lora_A, lora_B, mesh)
        if name in getattr(module, "lora_magnitude_vector", {}):
            _split_dora(module.lora_magnitude_vector[name], row_parallel, mesh)


def _split_dora(dora: nn.Module, row_parallel: bool, mesh: DeviceMesh) -> None:
    """Split a DoRA adapter's magnitudes ``m`` (peft's ``DoraLinearLayer``, ``weight`` ``[out]``) as its base's
    output rows are, and make its forward the split one (:func:`_split_dora_forward`): column-parallel, each rank's
    rows of ``m`` (a ``Shard(0)`` DTensor, as ``W``'s rows); row-parallel, ``m`` whole on every rank, as the summed
    output it scales is."""
    if not row_parallel:
        magnitude = dora.weight
        dora.weight = nn.Parameter(distribute_tensor(magnitude.detach(), mesh, [Shard(0)]),
                                   requires_grad=magnitude.requires_grad)
    dora.forward = functools.partial(_split_dora_forward, dora, mesh=mesh, row_parallel=row_parallel)


def _split_dora_forward(dora: nn.Module, x: torch.Tensor, *, lora_A: nn.Module, lora_B: nn.Module, scaling: float,
                        base_layer: nn.Module, base_result: torch.Tensor | None = None, adapter_name: str = "",
                        mesh: DeviceMesh, row_parallel: bool) -> torch.Tensor:
    """peft's ``DoraLinearLayer.forward`` on a split layer: what DoRA adds to the base output ``base_result``,
    ``(m / n - 1) ⊙ (W x) + m / n ⊙ s·B A x`` with ``n = ||W + s·B A||`` per output row, in the base output's
    layout. ``n`` is detached, as peft does (DoRA §4.3), so it is computed without a graph from the rank's local
    slices: a column-parallel rank holds its rows whole, a row-parallel one a slice of every row's columns, whose
    squared norms are summed over the mesh (one all-reduce of ``out`` numbers). Row-parallel, ``m / n`` scales the
    summed (all-reduced) output, and the bias, added after the sum, stays out of the scaling as in peft."""
    if base_result is None:  # peft passes none only under an active lora_dropout, which the split refuses
        raise ValueError("tensor parallelism: DoRA needs its base layer's output (lora_dropout must be 0)")
    lora_result = lora_B(lora_A(x))
    with torch.no_grad():
        # The dtype peft's forward computes the norm in: its input's, cast to the adapters' dtype. The product under
        # the caller's autocast, as peft's lora_B(lora_A(eye)) is.
        dtype = lora_A.weight.dtype
        delta = (_local(lora_B.weight) @ _local(lora_A.weight)).to(dtype)
        rows = _local(base_layer.weight).to(dtype) + scaling * delta
        squares = rows.float().square().sum(dim=1)
        if row_parallel:
            squares = DTensor.from_local(squares, mesh, [Partial()], run_check=False).full_tensor()
        norm = squares.sqrt().to(dtype)
    scale = _local(dora.weight) / norm
    bias = base_layer.bias
    if isinstance(base_result, DTensor):  # row-parallel under sequence parallelism: the rank's tokens
        # m's gradient, from the rank's tokens, comes back Partial and is summed over the mesh (from_local's backward)
        scale = DTensor.from_local(scale, mesh, [Replicate()], run_check=False)
    elif bias is not None:
        bias = _local(bias)
    if bias is not None:
        base_result = base_result - bias
    return (scale - 1) * base_result + scale * lora_result * scaling


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as the rank holds it: a DTensor's local part (its gradient flowing back to the DTensor), else the
    tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _refuse_merge(*args, **kwargs):
    raise ValueError("tensor parallelism: LoRA adapters cannot be merged into the split projections; merge them in "
                     "an unsplit model that loads full_state_dict(model)")


class _AdapterInputUncastUnderAutocast:
    """Hooks on a LoRA layer: under autocast, peft's cast of the input to the adapters' dtype is skipped (autocast
    casts it for ``lora_A`` anyway, to the same values), so that ``lora_A`` saves the block's gathered input itself,
    which sequence parallelism keeps as the rank's shard (:class:`_GatheredInputSavedSharded`), rather than a whole
    copy of its own (an fp32 cast, then autocast's bf16 one): six whole copies a layer."""

    def __init__(self, module: nn.Module):
        self.saved: bool | None = None
        module.register_forward_pre_hook(self.before)
        module.register_forward_hook(self.after, always_call=True)

    def before(self, module: nn.Module, args: tuple) -> None:
        if args and torch.is_autocast_enabled(args[0].device.type):
            self.saved = getattr(module, "cast_input_dtype_enabled", True)
            module.cast_input_dtype_enabled = False

    def after(self, module: nn.Module, args: tuple, output) -> None:
        if self.saved is not None:
            module.cast_input_dtype_enabled, self.saved = self.saved, None


class _AdapterOnLocalTokens:
    """Forward hooks on a row-parallel LoRA adapter under sequence parallelism: ``A``'s output, reduce-scattered
    along time (a ``Shard(1)`` DTensor ``[B, T, r]``), goes through ``B`` (whole on every rank) as the rank's tokens,
    a plain tensor, and ``B``'s output is made the ``Shard(1)`` DTensor its base's is. DTensor's own ``linear``
    flattens ``[B, T]``, which it refuses for a time-sharded input when the ranks' tokens are uneven (a decode step's
    one token). ``B``'s gradient, from the rank's tokens only, is summed over the mesh."""

    def __init__(self, lora_A: nn.Module, lora_B: nn.Module, mesh: DeviceMesh):
        self.layout: tuple | None = None
        lora_A.register_forward_hook(self.from_A)
        lora_B.register_forward_hook(self.from_B)
        _GradsSummedOverMesh(lora_B, mesh)

    def from_A(self, module: nn.Module, args: tuple, output: DTensor) -> torch.Tensor:
        self.layout = (output.device_mesh, output.placements, output.shape[:-1])
        # .contiguous(): the reduce-scatter leaves uneven ranks' tokens a narrowed view of a padded tensor
        return output.to_local().contiguous()

    def from_B(self, module: nn.Module, args: tuple, output: torch.Tensor) -> DTensor:
        mesh, placements, leading = self.layout
        shape = torch.Size((*leading, output.shape[-1]))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(output, mesh, placements, run_check=False, shape=shape, stride=stride)


def _replicate_parameters(module: nn.Module, mesh: DeviceMesh) -> None:
    """``module``'s parameters as ``Replicate`` DTensors (the same whole tensor on every rank), to take the DTensor
    inputs of a split block, their gradients summed over the mesh (:class:`_GradsSummedOverMesh`)."""
    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(distribute_tensor(param.detach(), mesh, [Replicate()]),
                                           requires_grad=param.requires_grad))
    _GradsSummedOverMesh(module, mesh)


def _submodule(layer: nn.Module, path: str) -> nn.Module | None:
    module = layer
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _replicated_first_input(module: nn.Module, args: tuple, *, mesh: DeviceMesh) -> tuple:
    """Forward pre-hook: the block's first input (the normed residual stream, the same on every rank) as a
    ``Replicate`` DTensor. Its gradient, the projections' partial sums, is all-reduced in ``from_local``'s
    backward; under sequence parallelism the input is a ``Shard(1)`` DTensor, all-gathered here, and its gradient
    reduce-scattered."""
    hidden_states = args[0]
    if isinstance(hidden_states, DTensor):
        if hidden_states.placements == (Replicate(),):
            return args
        return (hidden_states.redistribute(mesh, [Replicate()]), *args[1:])
    return (DTensor.from_local(hidden_states, mesh, [Replicate()], run_check=False), *args[1:])


class _GatheredInputSavedSharded:
    """Forward hooks on a block (retention, the FFN) under sequence parallelism: its input, a ``Shard(1)`` DTensor,
    is all-gathered for the column-parallel projections, and the gathered tensor, which they save for their weight
    gradients, is kept for the backward as the rank's shard alone and gathered again there (Megatron's sequence
    parallelism does the same). Saved whole, the block's input would cost every rank ``T`` tokens of width
    ``hidden_size`` twice a layer, the part of a layer's activations that the split does not divide: 12% more at
    ``tp = 2``, 82% more at ``tp = 8`` on Megatron's count (``34·s·b·h / tp`` bytes a layer in 16 bits). The
    backward's all-gather is one a block, its result shared by the block's projections.

    Under autocast the input is cast to the autocast dtype before the gather (which then moves half the bytes): each
    projection would otherwise cast the gathered input to a copy of its own and save that, four copies in retention,
    none of them the gathered tensor. It works through saved-tensor hooks for the length of the block's forward,
    and stands aside when other ones are in force (non-reentrant activation checkpointing, which keeps the layer's
    input alone anyway, or offloading to the CPU), as the innermost hooks would take the tensors from them. Tensors
    changed in place after they were saved are refused in the backward, as autograd refuses them without hooks."""

    def __init__(self, block: nn.Module, mesh: DeviceMesh):
        self.mesh = mesh
        self.hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        block.register_forward_pre_hook(self.before)
        block.register_forward_hook(self.after, always_call=True)

    def before(self, module: nn.Module, args: tuple) -> tuple:
        if self.hooks is not None:  # a forward stopped by a KeyboardInterrupt, which skips `after`, left them pushed
            self.after(module, args, None)
        shard = args[0]
        if not isinstance(shard, DTensor) or shard.placements != (Shard(1),):
            return _replicated_first_input(module, args, mesh=self.mesh)
        dtype = _autocast_dtype(shard)
        if dtype is not None:
            shard = shard.to(dtype)
        whole = shard.redistribute(self.mesh, [Replicate()])
        # Compiled (train.compile), the hooks would see AOTAutograd's plain tensors, not the gathered DTensor, and
        # keep them all whole: the compiled graph decides what it saves, and pushing hooks would break it in pieces.
        if (not torch.compiler.is_compiling() and torch.is_grad_enabled() and _no_saved_tensor_hooks_in_force()
                and whole.to_local().is_contiguous()):
            saved = _ShardOfSavedInput(shard.detach(), whole.to_local())
            self.hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack_saved_input)
            self.hooks.__enter__()
        return (whole, *args[1:])

    def after(self, module: nn.Module, args: tuple, output) -> None:
        if self.hooks is not None:
            hooks, self.hooks = self.hooks, None
            hooks.__exit__(None, None, None)


def _autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would cast ``tensor`` to for a matmul, None when it would not cast it."""
    device = tensor.device.type
    if not tensor.is_floating_point() or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype != tensor.dtype else None


def _no_saved_tensor_hooks_in_force() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is None


class _ShardOfSavedInput:
    """A block's gathered input as its saved tensors keep it: the rank's ``Shard(1)`` part, gathered again (once)
    when the backward first needs it. Tensors saved that are views of the gathered input's storage whole
    (``linear`` saves its input flattened to ``[B·T, D]``) are packed as their shape; any other saved tensor is kept
    as it is. Each is kept with its version, checked when the backward reads it: saved-tensor hooks turn off
    autograd's own check of tensors changed in place."""

    def __init__(self, shard: DTensor, whole: torch.Tensor):
        self.shard = shard
        self.version = shard._version
        self.storage = whole.untyped_storage().data_ptr()
        self.numel = whole.numel()
        self.regathered: torch.Tensor | None = None

    def pack(self, tensor: torch.Tensor):
        if isinstance(tensor, DTensor) and tensor.placements == (Replicate(),):
            local = tensor.to_local()
            if (local.untyped_storage().data_ptr() == self.storage and local.numel() == self.numel
                    and local.storage_offset() == 0 and local.is_contiguous()):
                return self, local.shape, tensor.device_mesh
        return tensor, tensor._version

    def regather(self) -> torch.Tensor:
        _check_version(self.shard, self.version)
        if self.regathered is None:
            with torch.no_grad():
                self.regathered = self.shard.redistribute(self.shard.device_mesh, [Replicate()]).to_local()
        return self.regathered


def _unpack_saved_input(packed: tuple) -> torch.Tensor:
    if isinstance(packed[0], _ShardOfSavedInput):
        saved, shape, mesh = packed
        return DTensor.from_local(saved.regather().reshape(shape), mesh, [Replicate()], run_check=False)
    tensor, version = packed
    _check_version(tensor, version)
    return tensor


def _check_version(tensor: torch.Tensor, version: int) -> None:
    if tensor._version != version:
        raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an inplace "
                           f"operation: a {type(tensor).__name__} of shape {list(tensor.shape)} saved at version "
                           f"{version} is at version {tensor._version} (under sequence parallelism's saved-tensor "
                           f"hooks)")


def _split_sequence(module: nn.Module, args: tuple, *, mesh: DeviceMesh) -> tuple:
    """Forward pre-hook on a decoder layer under sequence parallelism: the residual stream as it enters the first
    layer (the embedding's output, whole on every rank) cut along time, each rank keeping its tokens (no
    communication; the gradient is all-gathered back). Later layers receive the ``Shard(1)`` DTensor already."""
    hidden_states = args[0]
    if isinstance(hidden_states, DTensor):
        return args
    whole = DTensor.from_local(hidden_states, mesh, [Replicate()], run_check=False)
    return (whole.redistribute(mesh, [Shard(1)]), *args[1:])


def _gather_sequence(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the final norm under sequence parallelism: its output gathered whole along time, a plain
    tensor for the head (the gradient, the same on every rank, is cut back to each rank's tokens)."""
    return output.redistribute(output.device_mesh, [Replicate()]).to_local()


class _SumOverMesh(torch.autograd.Function):
    """The tensor summed (all-reduced) over the mesh in the forward; identity in the backward, the gradient being the
    same on every rank: Megatron's ``g``, after a row-split lookup."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        return DTensor.from_local(tensor, mesh, [Partial()], run_check=False).full_tensor()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _SumGradOverMesh(torch.autograd.Function):
    """Identity in the forward; the gradient summed (all-reduced) over the mesh in the backward: Megatron's ``f``,
    for a replicated parameter that each rank applies to its own slice of the FFN, or (a ``Replicate`` DTensor
    whose gradient comes back ``Partial``) to its own tokens under sequence parallelism."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        ctx.mesh = mesh
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if isinstance(grad, DTensor):
            return grad.redistribute(grad.device_mesh, [Replicate()]), None
        return DTensor.from_local(grad, ctx.mesh, [Partial()]).full_tensor(), None


class _GradsSummedOverMesh:
    """Forward hooks on a module whose replicated parameters each rank applies to its own part of the work (SAU's
    ``alpha``, a trainable gSmeLU's five, on the rank's slice of the FFN; a norm's weight and bias on the rank's
    tokens under sequence parallelism): for the length of its forward, each parameter that requires a gradient is
    replaced by :class:`_SumGradOverMesh` of it, so the gradient the parameter receives is summed over the ranks,
    a replicated one like its parameter (without it a sequence-parallel norm's would be left ``Partial``, which
    neither the optimizer nor FSDP2 reduces). Being part of the graph
    rather than a hook on a parameter object, it acts on whatever parameter the module holds when it runs: FSDP2's
    unsharded one (``fully_shard`` replaces the parameter objects), or one unfrozen after parallelizing."""

    def __init__(self, module: nn.Module, mesh: DeviceMesh):
        self.mesh = mesh
        self.swapped: dict[str, torch.Tensor] = {}
        module.register_forward_pre_hook(self.before)
        module.register_forward_hook(self.after, always_call=True)

    def before(self, module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            return
        self.swapped = {name: param for name, param in module._parameters.items()
                        if param is not None and param.requires_grad}
        for name, param in self.swapped.items():
            # Written to the dict: nn.Module's setattr takes only a Parameter under a parameter's name, its getattr
            # reads the dict (FSDP2 and torch.func swap parameters the same way).
            module._parameters[name] = _SumGradOverMesh.apply(param, self.mesh)

    def after(self, module: nn.Module, args: tuple, output) -> None:
        module._parameters.update(self.swapped)
        self.swapped = {}


__all__ = ["VocabParallelEmbedding", "clip_grad_norm_", "full_state_dict", "load_full_state_dict",
           "parallelize_retnet"]
