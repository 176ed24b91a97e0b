"""Tensor parallelism (retnet/model/tensor_parallel.py): the model split across two real torchrun (gloo) ranks (the
two tensor-parallel pairs of one launch of four, each running its share of the cases) gives the unsharded model's
logits, loss, gradients, clipped gradients and greedy tokens with 2 all-reduces a layer each way, and its gathered
state dict exports a model that reproduces it and loads back; DoRA's adapters split with their projections give one
process's loss, logits and adapter gradients and take back an unsplit state dict; on the four ranks, FSDP2 over the
dp dimension of a (dp, tp) mesh gives the unsharded model's gradients and clipped norm on the dp-averaged batch; the
refusals in one process."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import Replicate

from retnet.model import RetNetForCausalLM
from retnet.model.tensor_parallel import parallelize_retnet
from tests.launch import launch_worker

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the cases, shared with the torchrun worker (pytest runs in importlib mode)
from tensor_parallel_worker import (  # noqa: E402
    CASES,
    COMPILED_CASE,
    CP,
    CP_TP_CASES,
    DORA_CASES,
    DP,
    MAX_NORM,
    SHORTER,
    SPLIT_IO_CASES,
    TP,
    build_cp_tp_case,
    build_dora_model,
    build_inputs,
    build_model,
    dora_generation_inputs,
    dp_batch,
    generation_inputs,
    loss_alone_inputs,
    other_adapters,
    run_dora_case,
)


def _results(out: Path, ranks: int) -> list[dict]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(ranks)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """The one torchrun launch of DP x TP ranks (the worker's cases on both meshes): its output directory."""
    out = tmp_path_factory.mktemp("tp")
    launch_worker(HERE / "tensor_parallel_worker.py", out, DP * TP)
    return out


@pytest.fixture(scope="module")
def run(launched):
    """Every case on a tensor-parallel pair: ``(results per tp rank, their output directory)``; the launch's second
    pair (ranks 2 and 3) ran the compiled layers, the first (ranks 0 and 1) the other cases and DoRA's (under
    ``"dora"``), side by side."""
    pairs = _results(launched / "tp", DP * TP)
    assert all(pairs[tp_rank].keys().isdisjoint(pairs[TP + tp_rank]) for tp_rank in range(TP))  # neither hides one
    return [{**pairs[tp_rank], **pairs[TP + tp_rank]} for tp_rank in range(TP)], launched / "tp"


@pytest.fixture(scope="module")
def run_2d(launched):
    """The launch's DP x TP ranks: FSDP2 over dp after tensor parallelism over tp."""
    return _results(launched, DP * TP)


def _unsharded(name: str):
    model = build_model(name)
    output = model(**build_inputs(name))
    output.loss.backward()
    return model, output


@pytest.mark.parametrize("name", list(CASES))
def test_split_model_gives_the_unsharded_logits_loss_and_gradients(run, name):
    ranks, _ = run
    model, whole = _unsharded(name)
    for rank, results in enumerate(ranks):
        got = results[name]
        torch.testing.assert_close(got["loss"], whole.loss.detach(), rtol=1e-5, atol=1e-6)
        if whole.logits is not None:
            torch.testing.assert_close(got["logits"], whole.logits.detach(), rtol=1e-5, atol=1e-5)
        assert set(got["grads"]) == {n for n, p in model.named_parameters() if p.grad is not None}
        for param_name, param in model.named_parameters():
            if param.grad is not None:  # (LoRA: the adapters')
                torch.testing.assert_close(got["grads"][param_name], param.grad, rtol=1e-4, atol=1e-6,
                                           msg=f"rank {rank} {param_name}")


def test_compiled_split_layers_give_the_unsharded_loss_and_gradients(run):
    """Each split layer compiled (``layer.compile()``, as ``train.compile`` does; the aot_eager backend here) gives
    the unsharded model's loss and gradients: dynamo traces the DTensor layers, the sequence split's hooks and the
    summed gradient of SAU's alpha."""
    ranks, _ = run
    model, whole = _unsharded(COMPILED_CASE)
    for rank, results in enumerate(ranks):
        assert results["compiled"]["graphs"] >= 2  # dynamo compiled (a graph a layer at least), not only eager
        # the sequence split's saved-tensor hooks stand aside while compiling: they broke each layer in ~6 graphs
        assert not [reason for reason in results["compiled"]["graph_breaks"]
                    if re.search(r"saved_tensors|data_ptr", " ".join(reason))], results["compiled"]["graph_breaks"]
        torch.testing.assert_close(results["compiled"]["loss"], whole.loss.detach(), rtol=1e-5, atol=1e-6)
        grads = results["compiled"]["grads"]
        assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
        for name, param in model.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
    # a second row length, compiled for itself (static shapes, as the trainer compiles under sequence parallelism)
    model = build_model(COMPILED_CASE)
    inputs = {key: value[:, :SHORTER] if torch.is_tensor(value) else value
              for key, value in build_inputs(COMPILED_CASE).items()}
    whole = model(**inputs)
    whole.loss.backward()
    for rank, results in enumerate(ranks):
        torch.testing.assert_close(results["compiled_shorter"]["loss"], whole.loss.detach(), rtol=1e-5, atol=1e-6)
        for name, param in model.named_parameters():
            torch.testing.assert_close(results["compiled_shorter"]["grads"][name], param.grad, rtol=1e-4, atol=1e-6,
                                       msg=f"rank {rank} {name}")


def test_lora_under_autocast_keeps_the_gathered_input_sharded_and_refuses_merging(run):
    """Sequence parallelism keeps each block's gathered input as the rank's shard for the backward, the adapters'
    ``lora_A`` inputs included under bf16 autocast (peft's cast of their input is skipped there: autocast casts it
    anyway), not a whole copy of it each; peft's merge of a split adapter is refused and merges nothing."""
    ranks, _ = run
    for results in ranks:
        packed = results["lora_autocast_packed"]
        assert packed.get("whole copy", 0) == 0 and packed.get("shard", 0) >= 2 * 5, packed  # 5 a layer (measured)
        message, merged = results["lora_merge_refused"]
        assert "cannot be merged into the split projections" in message and not merged


def test_lora_adapters_split_with_their_projections(run):
    """Under a column-parallel projection ``B`` is cut by rows and ``A`` whole (its gradient the same on both ranks,
    summed over them); under a row-parallel one ``A`` by columns and ``B`` whole; the frozen weights get no
    gradient, the norms under sequence parallelism included."""
    ranks, _ = run
    for name, prefix in (("lora_peft_model", "base_model.model.model.layers.0."),
                         ("lora_sequence_vocab", "model.layers.0.")):
        shapes = ranks[0][name]["local_grad_shapes"]
        assert shapes[prefix + "retention.q_proj.lora_B.default.weight"] == (32, 4)  # of 64 rows
        assert shapes[prefix + "retention.q_proj.lora_A.default.weight"] == (4, 64)
        assert shapes[prefix + "retention.o_proj.lora_A.default.weight"] == (4, 64)  # of 128 columns
        assert shapes[prefix + "retention.o_proj.lora_B.default.weight"] == (64, 4)
        assert all(".lora_" in key for key in shapes)
        for key in (prefix + "retention.q_proj.lora_A.default.weight", prefix + "mlp.down_proj.lora_B.default.weight"):
            assert torch.equal(ranks[0][name]["grads"][key], ranks[1][name]["grads"][key])


def test_each_rank_holds_half_of_the_sharded_gradients(run):
    ranks, _ = run
    shapes = ranks[0]["glu_parallel"]["local_grad_shapes"]
    layer = "model.layers.0."
    # 4 heads of K=16 (q/k) and V=32 (v, g, the head norm), 128-wide FFN: each rank holds half
    assert shapes[layer + "retention.q_proj.weight"] == (32, 64)
    assert shapes[layer + "retention.g_proj.weight"] == (64, 64)
    assert shapes[layer + "retention.o_proj.weight"] == (64, 64)
    assert shapes[layer + "retention.head_norm.weight"] == (64,)
    assert shapes[layer + "mlp.up_proj.weight"] == (64, 64) and shapes[layer + "mlp.up_proj.bias"] == (64,)
    assert shapes[layer + "mlp.down_proj.weight"] == (64, 64) and shapes[layer + "mlp.down_proj.bias"] == (64,)
    # replicated: whole on each rank, and equal across the ranks (SAU's alpha summed over them by its hook)
    assert shapes["model.embed_tokens.weight"] == (101, 64) and shapes[layer + "mlp.act_fn.alpha"] == (1,)
    for name in ("model.embed_tokens.weight", "model.norm.weight", layer + "mlp.act_fn.alpha",
                 layer + "retention_norm.weight"):
        assert torch.equal(ranks[0]["glu_parallel"]["grads"][name], ranks[1]["glu_parallel"]["grads"][name])


def test_clip_grad_norm_over_sharded_and_replicated_gradients(run):
    ranks, _ = run
    model, _ = _unsharded("glu_parallel")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    assert norm > MAX_NORM  # the check below tests a scaling, not a no-op
    for results in ranks:
        torch.testing.assert_close(results["clip"]["norm"], norm, rtol=1e-5, atol=1e-7)
        for param_name, param in model.named_parameters():
            torch.testing.assert_close(results["clip"]["grads"][param_name], param.grad, rtol=1e-4, atol=1e-7,
                                       msg=param_name)


def test_greedy_generation_and_the_cache_of_local_heads(run):
    ranks, _ = run
    model = build_model("glu_parallel").eval()
    with torch.no_grad():
        expected = model.generate(**generation_inputs())
    for results in ranks:
        assert torch.equal(results["generated"], expected)
        assert results["cache_state_shape"] == (2, 2, 16, 32)  # [B, H/tp, K, V]


def test_full_state_dict_exports_an_unsharded_model(run):
    ranks, out = run
    model = build_model("glu_parallel")
    assert ranks[0]["state_dict_types"] == ["Tensor"]
    assert ranks[0]["state_dict_shapes"] == {key: tuple(value.shape) for key, value in model.state_dict().items()}
    exported = RetNetForCausalLM.from_pretrained(out / "export").eval()
    with torch.no_grad():
        logits = exported(**build_inputs("glu_parallel")).logits
        seed_logits = model.eval()(**build_inputs("glu_parallel")).logits
    torch.testing.assert_close(logits, ranks[0]["stepped_logits"], rtol=1e-5, atol=1e-5)
    assert (logits - seed_logits).abs().max() > 1e-3  # the SGD step moved the weights that were saved


def test_full_state_dict_loads_back_into_a_split_model(run):
    ranks, _ = run
    for results in ranks:
        assert results["load_keys"] == ([], [])  # nothing missing or unexpected
        assert results["reload_differs"] == []  # gathered again, every tensor is the one loaded, bit for bit
        assert results["load_left_input"]  # the caller's dict still holds its own (full) tensors
        assert results["reloaded_logits_equal"]


def test_save_pretrained_without_a_state_dict_is_refused_before_writing(run):
    ranks, _ = run
    for results in ranks:
        assert "model.layers.0.retention.q_proj.weight is a DTensor" in results["save_refused"]
        assert "state_dict = retnet.model.tensor_parallel.full_state_dict(model)" in results["save_refused"]
        assert "on rank 0 only" in results["save_refused"]
        assert results["save_refused_wrote"] is False  # not even the directory
        # model.state_dict() given is still the rank's shards (failed after config.json, "invalid python storage")
        assert "model.layers.0.retention.q_proj.weight is a DTensor" in results["save_own_refused"]
        assert results["save_own_refused_wrote"] is False


def test_two_all_reduces_per_layer_each_way(run):
    ranks, _ = run
    # 2 layers: after retention and after the FFN, forward; each block's input gradient once, backward, plus SAU's
    # alpha once per layer
    assert ranks[0]["collectives"] == {"forward": {"all_reduce": 4}, "backward": {"all_reduce": 6}}


def test_vocab_parallel_splits_the_embedding_and_head_by_rows(run):
    """101 rows: 51 on rank 0, 50 on rank 1; a tied head stays one parameter (its gradient the sum of both uses,
    compared above); the untied head's rows too."""
    ranks, _ = run
    for rank, results in enumerate(ranks):
        rows = 51 if rank == 0 else 50
        tied = results["vocab_tied_fused"]["local_grad_shapes"]
        assert tied["model.embed_tokens.weight"] == (rows, 64) and "lm_head.weight" not in tied
        untied = results["vocab_untied_logits"]["local_grad_shapes"]
        assert untied["model.embed_tokens.weight"] == untied["lm_head.weight"] == (rows, 64)
        assert results["vocab_sequence_classifier"]["local_grad_shapes"]["model.embed_tokens.weight"] == (rows, 64)


@pytest.mark.parametrize("name", SPLIT_IO_CASES)
def test_vocab_and_sequence_parallel_generate_and_export_the_unsharded_model(run, name):
    """Greedy generation (a left-padded prefill, then one token a step: under sequence parallelism rank 1's share
    of a step is no token) and the gathered state dict, bit for bit."""
    ranks, _ = run
    model = build_model(name).eval()
    with torch.no_grad():
        expected = model.generate(**generation_inputs())
    for results in ranks:
        assert torch.equal(results[name]["generated"], expected)
        state = results[name]["full_state_dict"]
        assert state.keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(state[key], value), key


def test_vocab_parallel_fused_loss_in_chunks_and_ids_outside_the_vocabulary(run):
    """Several chunks (the per-chunk exchange) with a given denominator equal the unsplit fused loss; a label or an
    input id that no rank holds raises as the unsplit lookup does, instead of counting as a zero logit or row."""
    from retnet.model.loss import linear_cross_entropy

    ranks, _ = run
    hidden, weight, labels = loss_alone_inputs()
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=13, chunk_tokens=5)
    loss.backward()
    for results in ranks:
        got = results["loss_alone"]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["hidden"], hidden.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["weight"], weight.grad, rtol=1e-5, atol=1e-7)
        assert results["out_of_vocabulary"] == [
            "labels hold id 101, outside the vocabulary [0, 101)", "labels hold id -1, outside the vocabulary [0, 101)",
            "input_ids hold id 101, outside the vocabulary [0, 101)"]


def test_vocab_parallel_collectives(run):
    ranks, _ = run
    # forward: the layers' 4 all-reduces, the embedding's sum, the hidden states' gradient (computed with the fused
    # loss); the loss's one all-gather of each rank's log-sum-exp and target logits (one chunk). Backward: the layers'.
    assert ranks[0]["vocab_collectives"] == {"forward": {"all_reduce": 6, "all_gather_into_tensor": 1},
                                             "backward": {"all_reduce": 4}}


def test_sequence_parallel_collectives_and_layouts(run):
    """Between the layers each rank holds its tokens (37: 19 and 18); every block all-gathers its input and
    reduce-scatters its output instead of one all-reduce (and the reverse backward), the final norm's output is
    gathered for the head, and each norm's weight and bias (LayerNorm: 2 layers x 2 + the final norm) gets its
    gradient summed over the ranks, a Replicate DTensor like the parameter; SAU's alpha as without it. The blocks'
    gathered inputs are kept sharded for the backward, which gathers each again (4 all-gathers more): the gradients
    equal the unsplit model's all the same (test_split_model_gives_the_unsharded_logits_loss_and_gradients)."""
    ranks, _ = run
    for rank, results in enumerate(ranks):
        assert results["sequence_collectives"] == {
            "forward": {"all_gather_into_tensor": 5, "reduce_scatter_tensor": 4},
            "backward": {"all_gather_into_tensor": 5 + 4, "reduce_scatter_tensor": 4, "all_reduce": 2 + 10}}
        # under bf16 autocast too (the inputs cast before their gathers, so the projections keep the gathered one)
        assert results["sequence_collectives_autocast"] == results["sequence_collectives"]
        assert abs(results["sequence_autocast_loss"] - results["sequence_glu"]["loss"]) < 0.05
        embedded, between, last = results["sequence_hidden"]
        assert embedded == ("Tensor", None, (2, 37, 64)) and last == ("Tensor", None, (2, 37, 64))
        assert between[0] == "DTensor" and between[2] == (2, 19 if rank == 0 else 18, 64)
        assert results["sequence_norm_grad"][1] == (Replicate(),)


@pytest.mark.parametrize("name", list(CP_TP_CASES))
def test_context_parallelism_over_tensor_parallelism(run_2d, name):
    """A (cp, tp) mesh of 4 ranks: each tensor-parallel pair runs one of the row's 2 pieces (a document crossing
    their boundary), its heads' states exchanged with the other pair's same heads. The pieces' losses add up to the
    whole row's, and their gradients (each rank's gathered whole) to the whole row's, on both ranks of a pair."""
    model, input_ids, labels, cu_seqlens = build_cp_tp_case(name)
    whole = model(input_ids=input_ids, labels=labels, cu_seqlens=cu_seqlens, retention_mode=CP_TP_CASES[name]["mode"],
                  use_cache=False)
    whole.loss.backward()
    assert [results["cp_rank"] for results in run_2d] == [0, 0, 1, 1]
    for tp_rank in range(TP):
        pieces = [run_2d[cp_rank * TP + tp_rank][name] for cp_rank in range(CP)]
        assert all(piece["loss"] > 0.1 * whole.loss for piece in pieces)  # both pieces count
        torch.testing.assert_close(sum(piece["loss"] for piece in pieces), whole.loss.detach(), rtol=1e-5,
                                   atol=1e-6)
        for param_name, param in model.named_parameters():
            torch.testing.assert_close(sum(piece["grads"][param_name] for piece in pieces), param.grad, rtol=1e-4,
                                       atol=1e-6, msg=f"tp rank {tp_rank} {param_name}")


def test_parallelizing_twice_is_refused(run):
    ranks, _ = run
    assert "already parallelized" in ranks[0]["twice"]


def test_fsdp2_over_dp_after_tensor_parallelism_over_tp(run_2d):
    """Each dp rank's loss is the unsharded model's on its rows; the gradients (FSDP2 averages them over dp; SAU's
    alpha summed over tp inside the graph though fully_shard replaced the parameter) are those of the mean of the
    dp ranks' losses, and clip_grad_norm_ over gradients on the (dp, tp) and the dp mesh gives its clipped norm."""
    model = build_model("glu_parallel")
    losses = [model(**dp_batch(dp_rank)).loss for dp_rank in range(DP)]
    (sum(losses) / DP).backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    assert norm > MAX_NORM
    for rank, results in enumerate(run_2d):
        assert results["dp_rank"] == rank // TP
        assert results["grad_meshes"] == ["('dp', 'tp')", "('dp',)"]  # the mix the clipping has to take
        torch.testing.assert_close(results["loss"], losses[results["dp_rank"]].detach(), rtol=1e-5, atol=1e-6)
        assert set(results["grads"]) == set(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(results["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
        torch.testing.assert_close(results["norm"], norm, rtol=1e-5, atol=1e-7)
        for name, param in model.named_parameters():
            torch.testing.assert_close(results["clipped"][name], param.grad, rtol=1e-4, atol=1e-7,
                                       msg=f"rank {rank} {name}")


def _assert_dora_run_matches(split: dict, alone: dict) -> None:
    torch.testing.assert_close(split["loss"], alone["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split["logits"], alone["logits"], rtol=1e-5, atol=1e-5)
    assert split["grads"].keys() == alone["grads"].keys()
    for name, grad in alone["grads"].items():  # measured 1.5e-5 of the largest: the split's summation order
        torch.testing.assert_close(split["grads"][name], grad, rtol=1e-4, atol=5e-5 * grad.abs().max().item(),
                                   msg=name)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
@pytest.mark.parametrize("name", list(DORA_CASES))
def test_split_dora_gives_one_process_outputs_and_adapter_gradients(run, name):
    """DoRA (``lora.use_dora``) under tensor parallelism (its training runs: tests/train/
    test_tensor_parallel_dora_paths.py): both ranks' loss, logits and gradients of every adapter are one process's:
    ``lora_A``, ``lora_B`` and the magnitudes of the column-parallel ``q/k/v/g/gate/up_proj`` (magnitudes split by
    rows: 64 or 96 numbers, 32 or 48 a rank) and the row-parallel ``o/down_proj`` (magnitudes whole on each rank).
    The gathered state dict is the unsplit model's; an unsplit state dict with other adapters loads into the split
    model, which then computes what the unsplit model does with it, and generates its greedy tokens."""
    ranks = [results["dora"] for results in run[0]]
    model = build_dora_model(name)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    alone = run_dora_case(model, name)
    magnitudes = [n for n in alone["grads"] if ".lora_magnitude_vector." in n]
    projections = 8 if DORA_CASES[name]["config"]["ffn_glu"] else 7  # gate_proj with the GLU FFN
    assert len(magnitudes) == 2 * projections and all(alone["grads"][n].abs().sum() > 0 for n in magnitudes)
    for split in ranks:
        _assert_dora_run_matches(split[name], alone)
        shapes = split[name]["local_magnitudes"]
        for key in magnitudes:
            rows = state[key].shape[0]
            row_parallel = ".o_proj." in key or ".down_proj." in key
            assert shapes[key] == ((rows,) if row_parallel else (rows // TP,)), key
        assert split[name]["state"].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(split[name]["state"][key], value, rtol=0, atol=0, msg=key)

    model.load_state_dict(other_adapters(state))
    model.zero_grad()
    loaded = run_dora_case(model, name)
    assert not torch.allclose(loaded["loss"], alone["loss"])
    with torch.no_grad():
        generated = model.eval().generate(**dora_generation_inputs())
    for split in ranks:
        _assert_dora_run_matches(split[name]["loaded"], loaded)
        assert torch.equal(split[name]["generated"], generated)


# -- refusals, in one process (a stand-in for the mesh: they are checked before anything is sharded) ------------
def _mesh(size: int = 2, ndim: int = 1):
    return SimpleNamespace(ndim=ndim, shape=(size,) * ndim, size=lambda: size ** ndim, device_type="cpu")


@pytest.mark.parametrize("overrides, message", [
    (dict(num_attention_heads=2, hidden_size=64), "num_attention_heads divisible by 4; got 2"),
    (dict(intermediate_size=130), "intermediate_size divisible by 4; got 130"),
    (dict(dropout=0.1), "got config.dropout=0.1, model.layers.0.dropout.p=0.1 and 1 more nn.Dropout"),
])
def test_config_refusals_name_the_field_and_value(model_factory, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parallelize_retnet(model_factory(**overrides), _mesh(4))


def test_vocab_parallel_refusals_name_the_field_and_value(model_factory):
    with pytest.raises(ValueError, match=re.escape("cuts 2 rows a rank, which leaves the last rank none (pad the "
                                                   "vocabulary to a multiple of 4) of config.vocab_size=5")):
        parallelize_retnet(model_factory(vocab_size=5), _mesh(4), vocab_parallel=True)
    model = model_factory()
    model.model.embed_tokens.scale_grad_by_freq = True  # the other ranks' tokens, looked up as row 0, would count
    with pytest.raises(ValueError, match=re.escape("embed_tokens has max_norm=None, scale_grad_by_freq=True")):
        parallelize_retnet(model, _mesh(), vocab_parallel=True)
    model = model_factory(tie_word_embeddings=False)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(101))
    with pytest.raises(ValueError, match=re.escape("vocab_parallel splits a bias-free nn.Linear LM head")):
        parallelize_retnet(model, _mesh(), vocab_parallel=True)


def test_dropout_modules_are_checked_not_only_the_config(model_factory):
    model = model_factory(dropout=0.1)
    model.config.dropout = 0.0  # the built nn.Dropout modules keep p=0.1
    with pytest.raises(ValueError, match=re.escape("got config.dropout=0.0, model.layers.0.dropout.p=0.1")) as error:
        parallelize_retnet(model, _mesh())
    assert "from_pretrained(path, dropout=0.0)" in str(error.value)


@pytest.mark.parametrize("settings, message", [
    (dict(alora_invocation_tokens=[5]), "layers.0.retention.q_proj has another LoRA variant on adapter(s) "
                                        "['default']"),
    (dict(lora_bias=True), "splits bias-free nn.Linear LoRA adapters; layers.0.retention.q_proj adapter 'default'"),
    (dict(merged=True), "cannot split layers.0.retention.q_proj: its adapters are merged into the weight"),
    (dict(lora_dropout=0.1), "model.layers.0.retention.q_proj.lora_dropout.default.p=0.1 and 1 more nn.Dropout. Make "
                             "the LoRA adapters with lora_dropout=0"),
], ids=["variant", "bias", "merged", "dropout"])
def test_lora_the_split_cannot_take_is_refused(model_factory, settings, message):
    """Plain LoRA and DoRA split with their projections (the torchrun cases here); other LoRA variants (aLoRA here:
    each computes its own way), biased adapters, adapters merged into the weights and LoRA's dropout (each rank would
    draw its own mask on the replicated input) are refused, naming the module."""
    peft = pytest.importorskip("peft")
    merged = settings.pop("merged", False)
    model = peft.get_peft_model(model_factory(), peft.LoraConfig(target_modules=["q_proj"], r=4, **settings,
                                                                      task_type="CAUSAL_LM"))
    if merged:
        model.merge_adapter()
    with pytest.raises(ValueError, match=re.escape(message)):
        parallelize_retnet(model, _mesh())


def test_mesh_and_model_refusals(model_factory):
    with pytest.raises(ValueError, match="must be 1-D"):
        parallelize_retnet(model_factory(), _mesh(2, ndim=2))
    with pytest.raises(ValueError, match="expects a RetNetModel"):
        parallelize_retnet(torch.nn.Linear(2, 2), _mesh())
    cuda_mesh = SimpleNamespace(ndim=1, shape=(2,), size=lambda: 2, device_type="cuda")
    with pytest.raises(ValueError, match=re.escape("'cuda' mesh but model.embed_tokens.weight is on cpu")):
        parallelize_retnet(model_factory(), cuda_mesh)


def test_adapters_and_quantized_weights_are_refused(model_factory):
    model = model_factory()
    model.model.layers[1].mlp.up_proj = torch.nn.Sequential(torch.nn.Linear(64, 128))
    with pytest.raises(ValueError, match=re.escape("layers.1.mlp.up_proj is Sequential")):
        parallelize_retnet(model, _mesh())
    pytest.importorskip("torchao")
    from retnet.model.quantization import quantize_model

    model = model_factory()
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match=re.escape("cannot shard quantized weights; layers.0.retention.q_proj.weight")):
        parallelize_retnet(model, _mesh())


def test_select_heads_takes_those_heads_decays(model_factory):
    model = model_factory()
    retention = model.model.layers[0].retention
    whole = retention.log_decay(torch.device("cpu"))
    retention.select_heads(2, 2)
    assert torch.equal(retention.log_decay(torch.device("cpu")), whole[2:])
    with pytest.raises(ValueError, match=re.escape("heads 3..5 are not within the 4")):
        retention.select_heads(3, 2)
