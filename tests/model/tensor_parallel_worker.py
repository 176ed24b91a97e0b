"""One rank of ``test_tensor_parallel``'s torchrun launch of 4 ranks (gloo): all four run the 2-D (dp, tp) mesh's cases
(FSDP2 over dp, tensor parallelism over tp; then a (cp, tp) mesh), then each tp pair its share of the cases on the
model split by :func:`~retnet.model.tensor_parallel.parallelize_retnet` over it (the compiled layers on the second,
the rest on the first, side by side); each rank saves what the test compares with the unsharded model in one
process. The cases (models and inputs, built alike on both sides) are defined here too; DoRA's (``DORA_CASES``) with
them, run on the first pair after its other cases."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from retnet.model import RetNetConfig, RetNetForCausalLM, RetNetForSequenceClassification

TP = 2
DP = 2  # the 2-D launch: DP x TP ranks
# 37 tokens: not a multiple of the chunk size (16). Four heads, two per rank.
LENGTH, CHUNK = 37, 16
CASES = {
    # GLU FFN with biases and SAU (a trainable alpha acting on each rank's slice of the FFN), parallel form
    "glu_parallel": dict(config=dict(ffn_glu=True, ffn_bias=True, hidden_act="sau"), mode="parallel"),
    # plain FFN, RMSNorm, untied head with the fused loss, a right-padded row (packed real tokens), chunkwise
    "plain_chunkwise": dict(config=dict(ffn_glu=False, norm_type="rmsnorm", tie_word_embeddings=False,
                                        fuse_linear_cross_entropy=True), mode="chunkwise", padded=True),
    # activation checkpointing replays each layer's collectives inside the backward
    "glu_chunkwise_checkpointed": dict(config=dict(ffn_glu=True), mode="chunkwise", checkpointing=True),
    "classifier": dict(config=dict(ffn_glu=True, num_labels=3), mode="parallel", classifier=True),
    # a trainable gSmeLU (five parameters acting on each rank's slice of the FFN), frozen when the model is split
    # and unfrozen after: its gradients are summed over the ranks all the same
    "gsmelu_unfrozen_later": dict(config=dict(ffn_glu=False, hidden_act="gsmelu",
                                              hidden_act_kwargs={"trainable": True}),
                                  mode="parallel", unfreeze_activation_later=True),
    # vocabulary-parallel embedding and head (101 rows: 51 on rank 0, 50 on rank 1): tied, the fused loss
    "vocab_tied_fused": dict(config=dict(ffn_glu=True, fuse_linear_cross_entropy=True), mode="chunkwise",
                             padded=True, vocab_parallel=True),
    # untied, the loss on the gathered logits; the padding row (60) is rank 1's
    "vocab_untied_logits": dict(config=dict(ffn_glu=False, tie_word_embeddings=False, pad_token_id=60),
                                mode="parallel", vocab_parallel=True),
    "vocab_sequence_classifier": dict(config=dict(ffn_glu=True, num_labels=3), mode="parallel", classifier=True,
                                      vocab_parallel=True, sequence_parallel=True),
}
CASES.update({
    # sequence parallelism: the residual stream split along time (37 tokens: 19 and 18), LayerNorm, SAU
    "sequence_glu": dict(config=dict(ffn_glu=True, ffn_bias=True, hidden_act="sau"), mode="parallel",
                         sequence_parallel=True),
    # ... RMSNorm, the fused loss on the vocabulary-parallel head, a padded row, chunkwise, checkpointed
    "sequence_vocab_rms": dict(config=dict(ffn_glu=False, norm_type="rmsnorm", fuse_linear_cross_entropy=True),
                               mode="chunkwise", padded=True, vocab_parallel=True, sequence_parallel=True,
                               checkpointing=True),
    # LoRA on every projection (adapters drawn at random, not B = 0): a PeftModel around the model, GLU with SAU
    # (frozen with the rest), parallel form; its adapters' gradients the unsplit model's
    "lora_peft_model": dict(config=dict(ffn_glu=True, hidden_act="sau"), mode="parallel", lora="peft_model"),
    # ... injected in place (as the trainer does) under the vocabulary and sequence splits, RMSNorm, the fused loss,
    # a padded row, chunkwise, checkpointed: the norms stay frozen, the row-parallel adapters reduce-scatter
    "lora_sequence_vocab": dict(config=dict(ffn_glu=False, norm_type="rmsnorm", fuse_linear_cross_entropy=True),
                                mode="chunkwise", padded=True, vocab_parallel=True, sequence_parallel=True,
                                checkpointing=True, lora="injected"),
})
# the cases whose generation and export are checked too
SPLIT_IO_CASES = [name for name, case in CASES.items()
                  if (case.get("vocab_parallel") or case.get("sequence_parallel")) and not case.get("classifier")]
GENERATE_TOKENS = 6
COMPILED_CASE = "sequence_glu"  # run again with each layer compiled
SHORTER = 29  # ... and then on rows of this many tokens
# Context parallelism over tensor parallelism (the 2-D launch as a (cp, tp) mesh): one packed row of 74 tokens in
# 2 pieces of 37 (each split 19 / 18 again under sequence parallelism), a document crossing the pieces' boundary.
CP = 2
CP_TP_DOCUMENTS = [5, 50, 19]
CP_TP_CASES = {
    "cp_tp_parallel": dict(config=dict(ffn_glu=True, ffn_bias=True, hidden_act="sau"), mode="parallel"),
    # the vocabulary and the sequence split, the fused loss, checkpointed: the layers' collectives of both replayed
    "cp_tp_vocab_sequence": dict(config=dict(ffn_glu=False, norm_type="rmsnorm", fuse_linear_cross_entropy=True),
                                 mode="chunkwise", vocab_parallel=True, sequence_parallel=True, checkpointing=True),
}
MAX_NORM = 0.05  # below the gradients' norm, so clipping scales them
# the cases whose collectives of one training step are counted too (2 layers, SAU's alpha), each split: the key of
# their counts in the results
COUNTED_CASES = {"glu_parallel": "collectives", "vocab_tied_fused": "vocab_collectives",
                 "sequence_glu": "sequence_collectives"}


def build_model(name: str, seed: int = 0):
    case = CASES[name]
    settings = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, chunk_size=CHUNK,
                    use_output_gate=True, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    settings.update(case["config"])
    torch.manual_seed(seed)
    cls = RetNetForSequenceClassification if case.get("classifier") else RetNetForCausalLM
    model = cls(RetNetConfig(**settings)).train()
    if case.get("checkpointing"):
        # transformers 5.2x's name; 5.17 has only the older one
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if case.get("lora"):
        model = add_lora(model, wrapped=case["lora"] == "peft_model")
    return model


def add_lora(model, wrapped: bool):
    """peft's LoRA (rank 4) on each of the model's projections, only the adapters trainable: a ``PeftModel``
    around it (``wrapped``) or injected in place. The adapters start at random (``B`` too, not zeros), so that they
    change the outputs and every adapter gets a gradient."""
    import peft

    from retnet.train.config import LORA_TARGETS

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS), init_lora_weights=False,
                             task_type="CAUSAL_LM")
    torch.manual_seed(7)
    if wrapped:
        return peft.get_peft_model(model, config)
    peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def parallelize_case(name: str, model, tp_mesh):
    """``parallelize_retnet`` with the case's splits of the vocabulary and the sequence."""
    from retnet.model.tensor_parallel import parallelize_retnet

    case = CASES[name]
    return parallelize_retnet(model, tp_mesh, vocab_parallel=bool(case.get("vocab_parallel")),
                              sequence_parallel=bool(case.get("sequence_parallel")))


def build_inputs(name: str) -> dict:
    case = CASES[name]
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 101, (2, LENGTH), generator=generator)
    if case.get("vocab_parallel"):
        input_ids[0, 5:8] = torch.tensor([50, 51, 60])  # the last row of rank 0, the first of rank 1, a padding row
    inputs = dict(input_ids=input_ids, retention_mode=case["mode"], use_cache=False)
    if case.get("classifier"):
        inputs["labels"] = torch.tensor([2, 0])
        return inputs
    labels = input_ids.clone()
    labels[:, :3] = -100
    if case.get("padded"):
        mask = torch.ones_like(input_ids)
        mask[1, -9:] = 0
        labels[1, -9:] = -100
        inputs["attention_mask"] = mask
    inputs["labels"] = labels
    return inputs


def build_cp_tp_case(name: str):
    """``(model, input_ids, labels, cu_seqlens)`` of a CP_TP_CASES case: the whole row, as one process runs it."""
    case = CP_TP_CASES[name]
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=96, chunk_size=8, pad_token_id=0, eos_token_id=1, **case["config"])
    model = RetNetForCausalLM(config).train()
    if case.get("checkpointing"):
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    input_ids = torch.randint(2, 101, (1, sum(CP_TP_DOCUMENTS)), generator=torch.Generator().manual_seed(4))
    cu_seqlens = torch.tensor([0, *torch.tensor(CP_TP_DOCUMENTS).cumsum(0).tolist()], dtype=torch.int32)
    labels = input_ids.clone()
    labels[0, cu_seqlens[:-1].long()] = -100  # no document is predicted from the one before it
    return model, input_ids, labels, cu_seqlens


def dp_batch(dp_rank: int) -> dict:
    """Data-parallel rank ``dp_rank``'s two rows of a four-row batch (the 2-D launch)."""
    input_ids = torch.randint(2, 101, (2 * DP, LENGTH), generator=torch.Generator().manual_seed(3))
    rows = input_ids[2 * dp_rank:2 * dp_rank + 2]
    labels = rows.clone()
    labels[:, :3] = -100
    return dict(input_ids=rows, labels=labels, retention_mode="parallel", use_cache=False)


def loss_alone_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden [2, 9, 16], weight [101, 16], labels [2, 9])`` for the fused loss on a vocabulary-parallel head
    alone, in several chunks."""
    generator = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(2, 9, 16, generator=generator), torch.randn(101, 16, generator=generator)
    labels = torch.randint(0, 101, (2, 9), generator=generator)
    labels[0, :2] = -100
    labels[1, 3:5] = torch.tensor([50, 51])  # either side of the cut
    return hidden, weight, labels


def set_activation_trainable(model, trainable: bool) -> None:
    for layer in model.model.layers:
        layer.mlp.act_fn.requires_grad_(trainable)


def generation_inputs() -> dict:
    """Two left-padded prompts (the second 5 tokens shorter)."""
    input_ids = torch.randint(2, 101, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    input_ids[1, :5] = 0
    return dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=GENERATE_TOKENS, do_sample=False)


# DoRA (peft's ``use_dora``) split with its projections: each output row's norm ``||W + s·B A||`` is whole on a
# column-parallel rank and summed over the ranks' columns on a row-parallel one, the magnitudes split as the rows
# they scale. (Run on the first pair, beside the compiled layers on the second: a launch of its own cost another
# torchrun start.)
DORA_CASES = {
    # biases on the FFN's projections: the column-parallel gate/up's split with their rows, the row-parallel
    # down_proj's added after the sum, outside DoRA's scaling; SAU's alpha (frozen), parallel form
    "columns_and_rows": dict(config=dict(ffn_glu=True, ffn_bias=True, hidden_act="sau"), mode="parallel"),
    # the row-parallel outputs reduce-scattered along time (DoRA's scale then applies to the rank's tokens and its
    # magnitudes' gradient is summed over the ranks), the vocabulary split, RMSNorm, chunkwise, a padded row, and
    # activation checkpointing (each layer's norm all-reduces replayed in the backward)
    "sequence_vocab": dict(config=dict(ffn_glu=False, norm_type="rmsnorm"), mode="chunkwise", padded=True,
                           sequence_parallel=True, vocab_parallel=True, checkpointing=True),
}


def build_dora_model(name: str):
    """The DoRA case's micro model with peft's DoRA (rank 4) on every projection, only the adapters trainable. The
    adapters are drawn at random (``B`` too) and the magnitudes moved off the rows' norms, so that DoRA's scale
    ``m / ||W + s·B A||`` is not 1 and every part changes the outputs."""
    import peft

    from retnet.train.config import LORA_TARGETS

    case = DORA_CASES[name]
    torch.manual_seed(0)
    model = RetNetForCausalLM(RetNetConfig(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        chunk_size=CHUNK, use_output_gate=True, pad_token_id=0, eos_token_id=1, **case["config"])).train()
    if case.get("checkpointing"):
        # transformers 5.2x's name; 5.17 has only the older one
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    torch.manual_seed(7)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS),
                                                 init_lora_weights=False, use_dora=True), model)
    for param_name, param in model.named_parameters():
        param.requires_grad_(".lora_" in param_name)
        if ".lora_magnitude_vector." in param_name:
            with torch.no_grad():
                param.mul_(1 + 0.2 * torch.randn(param.shape))
    return model


def build_dora_inputs(name: str) -> dict:
    case = DORA_CASES[name]
    input_ids = torch.randint(2, 101, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :3] = -100
    inputs = dict(input_ids=input_ids, labels=labels, retention_mode=case["mode"], use_cache=False)
    if case.get("padded"):
        mask = torch.ones_like(input_ids)
        mask[1, -9:] = 0
        labels[1, -9:] = -100
        inputs["attention_mask"] = mask
    return inputs


def dora_generation_inputs() -> dict:
    input_ids = torch.randint(2, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=4, do_sample=False)


def other_adapters(state: dict) -> dict:
    """``state`` (an unsplit model's) with every adapter tensor changed: what a checkpoint of a later step holds."""
    return {key: value * 1.1 + 0.01 if ".lora_" in key else value for key, value in state.items()}


def run_dora_case(model, name: str) -> dict:
    """The loss, logits and the trainable parameters' gradients of one forward and backward."""
    output = model(**build_dora_inputs(name))
    output.loss.backward()
    return {"loss": output.loss.detach(), "logits": output.logits.detach(),
            "grads": {n: gathered(p.grad) for n, p in model.named_parameters() if p.requires_grad}}


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives run while it is active, by name (``all_reduce``), forward and backward alike.
    (torch's ``CommDebugMode`` trips over the model's module hooks.)"""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(kind, DTensor) for kind in types):
            return NotImplemented  # DTensor's own dispatch runs first; its collectives come back here on plain tensors
        if func.namespace == "_c10d_functional" and not func.__name__.startswith(("wait_tensor", "_wrap")):
            self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    assert dist.get_world_size() == DP * TP, f"run with --nproc_per_node={DP * TP}"
    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    main_2d(Path(out_dir), mesh)
    # Tensor parallelism alone (a launch of its own cost another torchrun start, ~25 s of CPU), shared by the two
    # tensor-parallel pairs, side by side: every case but the compiled one, then DoRA's, on the first (ranks 0 and 1:
    # transformers' save_pretrained writes the weights on global rank 0 only; ~11 s of CPU a rank), the compiled
    # layers (dynamo, ~25 s) on the second (ranks 2 and 3); each rank saves its results under tp/, the test takes a
    # tp rank's from both pairs
    out = Path(out_dir) / "tp"
    out.mkdir(exist_ok=True)
    if mesh["dp"].get_local_rank() == 0:
        results = main_tp(out, mesh["tp"])
        results["dora"] = dora_tp(mesh["tp"])
    else:
        results = compiled_tp(mesh["tp"])
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


def dora_tp(tp_mesh) -> dict:
    """Each DoRA case split over ``tp_mesh`` (a pair of ranks), run, its state dict gathered, then an unsplit state
    dict with other adapters loaded into it and run again, then its greedy tokens: ``{case: its results}``."""
    from retnet.model.tensor_parallel import full_state_dict, load_full_state_dict, parallelize_retnet

    results = {}
    for name, case in DORA_CASES.items():
        model = build_dora_model(name)
        unsplit = {key: value.clone() for key, value in model.state_dict().items()}
        parallelize_retnet(model, tp_mesh, vocab_parallel=bool(case.get("vocab_parallel")),
                           sequence_parallel=bool(case.get("sequence_parallel")))
        results[name] = run_dora_case(model, name)
        results[name]["local_magnitudes"] = {
            n: tuple(getattr(p, "_local_tensor", p).shape) for n, p in model.named_parameters()
            if ".lora_magnitude_vector." in n}
        # cloned: the replicated tensors of it are the parameters themselves, which the load below overwrites
        results[name]["state"] = {key: value.clone() for key, value in full_state_dict(model).items()}
        load_full_state_dict(model, other_adapters(unsplit))
        model.zero_grad()
        results[name]["loaded"] = run_dora_case(model, name)
        with torch.no_grad():  # the recurrent decode: under sequence parallelism one token, rank 1's share none
            results[name]["generated"] = model.eval().generate(**dora_generation_inputs())
    return results


def compiled_tp(tp_mesh) -> dict:
    """Per-layer torch.compile of the split layers, as the trainer's train.compile does them (the aot_eager backend:
    dynamo's and AOTAutograd's traces of the DTensor layers, without inductor's C++ build): sequence parallelism,
    SAU's alpha summed over the ranks; static shapes, as the trainer compiles under sequence parallelism (a dynamic
    recompile fails in torch), then a second, shorter row compiled for its own length. On ``tp_mesh``, a pair of
    ranks: their results."""
    from torch._dynamo.utils import counters

    model = parallelize_case(COMPILED_CASE, build_model(COMPILED_CASE), tp_mesh)
    for layer in model.model.layers:
        layer.compile(backend="aot_eager", dynamic=False)
    output = model(**build_inputs(COMPILED_CASE))
    output.loss.backward()
    results = {"compiled": {"loss": output.loss.detach(), "graphs": counters["stats"]["unique_graphs"],
                            "graph_breaks": [reason.splitlines()[0:4] for reason in counters["graph_break"]],
                            "grads": {n: gathered(p.grad) for n, p in model.named_parameters() if p.grad is not None}}}
    model.zero_grad()
    shorter = {key: value[:, :SHORTER] if torch.is_tensor(value) else value
               for key, value in build_inputs(COMPILED_CASE).items()}
    output = model(**shorter)
    output.loss.backward()
    results["compiled_shorter"] = {"loss": output.loss.detach(), "grads": {
        n: gathered(p.grad) for n, p in model.named_parameters() if p.grad is not None}}
    return results


def main_tp(out: Path, tp_mesh) -> dict:
    """Tensor parallelism alone: every case but the compiled one on ``tp_mesh``, a pair of ranks; their results
    (the exported model under ``out``)."""
    import contextlib

    import torch.distributed as dist

    from retnet.model.tensor_parallel import (
        clip_grad_norm_,
        full_state_dict,
        load_full_state_dict,
        parallelize_retnet,
    )

    rank = dist.get_rank()
    results = {}
    for name in CASES:
        model = build_model(name)
        if CASES[name].get("unfreeze_activation_later"):
            set_activation_trainable(model, False)
        model = parallelize_case(name, model, tp_mesh)
        if CASES[name].get("unfreeze_activation_later"):
            set_activation_trainable(model, True)
        # (COUNTED_CASES: their collectives counted too, the layouts of sequence_glu's hidden states kept)
        with CollectiveCounter() if name in COUNTED_CASES else contextlib.nullcontext() as collectives:
            output = model(**build_inputs(name), output_hidden_states=name == "sequence_glu")
            forward = collectives.counts.copy() if collectives else None
            output.loss.backward()
        if name in COUNTED_CASES:
            results[COUNTED_CASES[name]] = {"forward": forward, "backward": collectives.counts - forward}
        if name == "sequence_glu":
            sequence_output = output
        results[name] = {
            "loss": output.loss.detach(),
            "logits": None if output.logits is None else output.logits.detach(),
            "grads": {n: gathered(p.grad) for n, p in model.named_parameters() if p.grad is not None},
            "local_grad_shapes": {n: tuple(getattr(p.grad, "_local_tensor", p.grad).shape)
                                  for n, p in model.named_parameters() if p.grad is not None},
        }
        if name in SPLIT_IO_CASES:
            model.eval()
            with torch.no_grad():
                results[name]["generated"] = model.generate(**generation_inputs())
            results[name]["full_state_dict"] = full_state_dict(model)
        if name == "glu_parallel":
            results["clip"] = {"norm": clip_grad_norm_(model.parameters(), MAX_NORM),
                               "grads": {n: gathered(p.grad) for n, p in model.named_parameters()}}
            try:
                parallelize_retnet(model, tp_mesh)
            except ValueError as error:
                results["twice"] = str(error)

    # LoRA under sequence parallelism and bf16 autocast: every tensor saved that holds the block's gathered input is
    # kept as the rank's shard, the adapters' too (peft's own cast of their input would save a whole copy each)
    from retnet.model import tensor_parallel

    packed = Counter()
    pack, init = tensor_parallel._ShardOfSavedInput.pack, tensor_parallel._ShardOfSavedInput.__init__

    def keeping_init(self, shard, whole):
        init(self, shard, whole)
        self.whole_for_test = whole

    def counting_pack(self, tensor):
        result = pack(self, tensor)
        local = getattr(tensor, "_local_tensor", tensor)
        copy = local.shape[-1] == self.whole_for_test.shape[-1] and local.numel() == self.numel and torch.equal(
            local.reshape(self.whole_for_test.shape).to(self.whole_for_test.dtype), self.whole_for_test)
        packed["shard" if result[0] is self else "whole copy" if copy else "other"] += 1
        return result

    tensor_parallel._ShardOfSavedInput.__init__ = keeping_init
    tensor_parallel._ShardOfSavedInput.pack = counting_pack
    model = build_model("lora_sequence_vocab")
    # (not checkpointed: non-reentrant activation checkpointing keeps the layer's input alone, the hooks stand aside)
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model = parallelize_case("lora_sequence_vocab", model, tp_mesh)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**build_inputs("lora_sequence_vocab")).loss
    loss.backward()
    tensor_parallel._ShardOfSavedInput.pack, tensor_parallel._ShardOfSavedInput.__init__ = pack, init
    results["lora_autocast_packed"] = dict(packed)
    try:  # peft's merge of split adapters into split weights: refused before anything is merged
        model.model.layers[0].retention.q_proj.merge()
    except ValueError as error:
        results["lora_merge_refused"] = (str(error), model.model.layers[0].retention.q_proj.merged)

    # The fused loss on a vocabulary-parallel head alone: 4 chunks of 5 tokens, a given denominator; ids outside the
    # vocabulary, which no rank holds, fail as an unsplit lookup does.
    from torch.distributed.tensor import Shard, distribute_tensor

    from retnet.model.loss import linear_cross_entropy

    hidden, weight, labels = loss_alone_inputs()
    hidden.requires_grad_()
    weight = distribute_tensor(weight, tp_mesh, [Shard(0)]).requires_grad_()
    loss = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=13, chunk_tokens=5)
    loss.backward()
    results["loss_alone"] = {"loss": loss.detach(), "hidden": hidden.grad, "weight": weight.grad.full_tensor()}
    refused = results["out_of_vocabulary"] = []
    for bad_labels in (labels.clone().fill_(101), labels.clone().fill_(-1)):
        try:
            linear_cross_entropy(hidden, weight, bad_labels)
        except IndexError as error:
            refused.append(str(error))
    try:
        parallelize_case("vocab_tied_fused", build_model("vocab_tied_fused"), tp_mesh)(
            input_ids=torch.tensor([[5, 101]]))
    except IndexError as error:
        refused.append(str(error))

    # The collectives of sequence_glu's training step (counted above) under bf16 autocast, where the blocks' inputs
    # are cast before their gathers (else each projection would save a cast copy of its own, and the gathered input
    # would not be what they keep)
    model = parallelize_case("sequence_glu", build_model("sequence_glu"), tp_mesh)
    with CollectiveCounter() as collectives, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**build_inputs("sequence_glu")).loss
        forward = collectives.counts.copy()
        loss.backward()
    results["sequence_collectives_autocast"] = {"forward": forward, "backward": collectives.counts - forward}
    results["sequence_autocast_loss"] = loss.detach().float()
    output = sequence_output
    results["sequence_hidden"] = [(type(h).__name__, getattr(h, "placements", None),
                                   tuple(getattr(h, "_local_tensor", h).shape)) for h in output.hidden_states]
    results["sequence_norm_grad"] = [type(model.model.layers[0].ffn_norm.weight.grad).__name__,
                                     model.model.layers[0].ffn_norm.weight.grad.placements]

    # Generation: greedy, left-padded prompts, recurrent steps on each rank's heads.
    model = parallelize_retnet(build_model("glu_parallel"), tp_mesh).eval()
    with torch.no_grad():
        results["generated"] = model.generate(**generation_inputs())
        prompt = generation_inputs()
        cache = model(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], use_cache=True).cache
        results["cache_state_shape"] = tuple(cache.states[0].shape)

    # Save: one SGD step (so the weights are not the seed's), then gather the full state dict and export it.
    model = parallelize_retnet(build_model("glu_parallel"), tp_mesh)
    inputs = build_inputs("glu_parallel")
    model(**inputs).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    with torch.no_grad():
        results["stepped_logits"] = model(**inputs).logits
    try:  # without state_dict=, before anything is written
        model.save_pretrained(out / f"refused{rank}")
    except ValueError as error:
        results["save_refused"] = str(error)
        results["save_refused_wrote"] = (out / f"refused{rank}").exists()
    try:  # with the model's own (still sharded) state dict, as refused
        model.save_pretrained(out / f"refused_own{rank}", state_dict=model.state_dict())
    except ValueError as error:
        results["save_own_refused"] = str(error)
        results["save_own_refused_wrote"] = (out / f"refused_own{rank}").exists()
    state = full_state_dict(model)
    results["state_dict_types"] = sorted({type(value).__name__ for value in state.values()})
    results["state_dict_shapes"] = {key: tuple(value.shape) for key, value in state.items()}
    if rank == 0:
        model.save_pretrained(out / "export", state_dict=dict(state))  # transformers empties the dict it writes
    dist.barrier(group=tp_mesh.get_group())

    # Load the gathered state dict into another split model (other seed): gathered again, it is the same.
    other = parallelize_retnet(build_model("glu_parallel", seed=5), tp_mesh)
    passed = dict(state)
    keys = load_full_state_dict(other, passed)
    results["load_keys"] = (keys.missing_keys, keys.unexpected_keys)
    reloaded = full_state_dict(other)
    results["reload_differs"] = sorted(key for key in state if not torch.equal(reloaded[key], state[key]))
    results["load_left_input"] = passed.keys() == state.keys() and all(passed[key] is state[key] for key in state)
    other.eval()
    with torch.no_grad():
        results["reloaded_logits_equal"] = torch.equal(other(**inputs).logits, results["stepped_logits"])
    return results


def main_2d(out: Path, mesh) -> None:
    """FSDP2 over the dp dimension of a (dp, tp) mesh after tensor parallelism over its tp dimension: each dp rank
    trains on its own rows; what the test compares with the unsharded model on the dp-averaged batch."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from retnet.model.tensor_parallel import clip_grad_norm_, parallelize_retnet

    model = parallelize_retnet(build_model("glu_parallel"), mesh["tp"])
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    dp_rank = mesh["dp"].get_local_rank()
    output = model(**dp_batch(dp_rank))
    output.loss.backward()
    results = {"dp_rank": dp_rank, "loss": output.loss.detach(),
               "grads": {n: gathered(p.grad) for n, p in model.named_parameters() if p.grad is not None},
               "grad_meshes": sorted({str(p.grad.device_mesh.mesh_dim_names) for p in model.parameters()})}
    results["norm"] = clip_grad_norm_(model.parameters(), MAX_NORM)
    results["clipped"] = {n: gathered(p.grad) for n, p in model.named_parameters()}

    # The same 4 ranks as a (cp, tp) mesh: each tensor-parallel pair runs one piece of the row, the pieces' states
    # exchanged over the cp group for the pair's heads.
    from retnet.model.context_parallel import shard_sequences

    cp_mesh = init_device_mesh("cpu", (CP, TP), mesh_dim_names=("cp", "tp"))
    cp_rank = cp_mesh["cp"].get_local_rank()
    results["cp_rank"] = cp_rank
    for name, case in CP_TP_CASES.items():
        model, input_ids, labels, cu_seqlens = build_cp_tp_case(name)
        parallelize_retnet(model, cp_mesh["tp"], vocab_parallel=case.get("vocab_parallel", False),
                           sequence_parallel=case.get("sequence_parallel", False))
        inputs, shard, targets = shard_sequences(input_ids, labels, cp_rank, CP, cu_seqlens,
                                                 cp_mesh["cp"].get_group())
        output = model(**inputs, context_parallel=shard, num_items_in_batch=targets, retention_mode=case["mode"],
                       use_cache=False)
        output.loss.backward()
        results[name] = {"loss": output.loss.detach(),
                         "grads": {n: gathered(p.grad) for n, p in model.named_parameters()}}
    torch.save(results, out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1])
