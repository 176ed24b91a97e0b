"""DoRA (``lora.use_dora``) under tensor parallelism: each output row's norm ``||W + s·B A||`` is whole on a
column-parallel rank and summed over the ranks' columns on a row-parallel one, the magnitudes split as the rows they
scale. On two torchrun (gloo) ranks the split model gives one process's loss, logits and every adapter's gradient
(``lora_A``, ``lora_B``, the magnitudes) on every projection, with and without the sequence and vocabulary splits, and
takes back an unsplit state dict; ``retnet-train --lora.use_dora=true --train.tensor_parallel=2`` logs one process's
losses and gradient norms, its checkpoint resumes on 2 ranks to one process's losses and its export is one process's.

The model-level cases (``worker``) and the ``retnet-train`` runs run in one launch of 2 ranks
(tests/train/tensor_parallel_dora_worker.py), each when the session runs its test."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.launch import selected_tests

from .conftest import launch_runs, micro_args

TP = 2
LENGTH = 37  # not a multiple of the chunk size (16); 19 and 18 tokens a rank under sequence parallelism
CASES = {
    # biases on the FFN's projections: the column-parallel gate/up's split with their rows, the row-parallel
    # down_proj's added after the sum, outside DoRA's scaling; SAU's alpha (frozen), parallel form
    "columns_and_rows": dict(config=dict(ffn_glu=True, ffn_bias=True, hidden_act="sau"), mode="parallel"),
    # the row-parallel outputs reduce-scattered along time (DoRA's scale then applies to the rank's tokens and its
    # magnitudes' gradient is summed over the ranks), the vocabulary split, RMSNorm, chunkwise, a padded row, and
    # activation checkpointing (each layer's norm all-reduces replayed in the backward)
    "sequence_vocab": dict(config=dict(ffn_glu=False, norm_type="rmsnorm"), mode="chunkwise", padded=True,
                           sequence_parallel=True, vocab_parallel=True, checkpointing=True),
}


def build_model(name: str):
    """The case's micro model with peft's DoRA (rank 4) on every projection, only the adapters trainable. The
    adapters are drawn at random (``B`` too) and the magnitudes moved off the rows' norms, so that DoRA's scale
    ``m / ||W + s·B A||`` is not 1 and every part changes the outputs."""
    import peft

    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.train.config import LORA_TARGETS

    case = CASES[name]
    torch.manual_seed(0)
    model = RetNetForCausalLM(RetNetConfig(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        chunk_size=16, use_output_gate=True, pad_token_id=0, eos_token_id=1, **case["config"])).train()
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


def build_inputs(name: str) -> dict:
    case = CASES[name]
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


def generation_inputs() -> dict:
    input_ids = torch.randint(2, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=4, do_sample=False)


def other_adapters(state: dict) -> dict:
    """``state`` (an unsplit model's) with every adapter tensor changed: what a checkpoint of a later step holds."""
    return {key: value * 1.1 + 0.01 if ".lora_" in key else value for key, value in state.items()}


def run_case(model, name: str) -> dict:
    """The loss, logits and the trainable parameters' gradients of one forward and backward."""
    output = model(**build_inputs(name))
    output.loss.backward()
    return {"loss": output.loss.detach(), "logits": output.logits.detach(),
            "grads": {n: _whole(p.grad) for n, p in model.named_parameters() if p.requires_grad}}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def worker(out_dir: str) -> None:
    """One rank (of the process group the caller started): each case split over the 2 ranks, run, its state dict
    gathered, then an unsplit state dict with other adapters loaded into it and run again; its results written to
    ``OUT_DIR/rank{r}.pt``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from retnet.model.tensor_parallel import full_state_dict, load_full_state_dict, parallelize_retnet

    mesh = init_device_mesh("cpu", (TP,))
    results = {}
    for name, case in CASES.items():
        model = build_model(name)
        unsplit = {key: value.clone() for key, value in model.state_dict().items()}
        parallelize_retnet(model, mesh, vocab_parallel=bool(case.get("vocab_parallel")),
                           sequence_parallel=bool(case.get("sequence_parallel")))
        results[name] = run_case(model, name)
        results[name]["local_magnitudes"] = {
            n: tuple(getattr(p, "_local_tensor", p).shape) for n, p in model.named_parameters()
            if ".lora_magnitude_vector." in n}
        # cloned: the replicated tensors of it are the parameters themselves, which the load below overwrites
        results[name]["state"] = {key: value.clone() for key, value in full_state_dict(model).items()}
        load_full_state_dict(model, other_adapters(unsplit))
        model.zero_grad()
        results[name]["loaded"] = run_case(model, name)
        with torch.no_grad():  # the recurrent decode: under sequence parallelism one token, rank 1's share none
            results[name]["generated"] = model.eval().generate(**generation_inputs())
    torch.save(results, Path(out_dir) / f"rank{dist.get_rank()}.pt")


CASES_TEST = "test_split_dora_gives_one_process_outputs_and_adapter_gradients"
TRAINING_TEST = "test_dora_training_on_split_layers_logs_one_process_resumes_and_exports"


def training_args(micro, base: Path, out: Path, **overrides) -> list[str]:
    """DoRA rank 4 on every projection of ``base``, 4 steps (``micro``: conftest's fixture's function)."""
    from .test_init_from import fine_tune_args

    return fine_tune_args(micro(out, train__steps=4, optim__schedule="constant", checkpoint__interval=2,
                                checkpoint__export=True, **overrides), base, lora__rank=4, lora__alpha=8,
                          lora__use_dora="true", optim__lr=2e-2, optim__weight_decay=0.0)


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory, corpus, tokenizer_dir, cache_dir) -> SimpleNamespace:
    """The module's one launch of 2 ranks (tests/train/tensor_parallel_dora_worker.py), the parts of it whose tests
    the session runs: the model-level cases (``launch``: its process, ``root / "model"`` the ranks' results), then
    the training test's split run (``split``, to ``root / "split"``) and the resume of its step-2 checkpoint
    (``again``, to ``root / "resumed"``), each a finished run as ``run_train_many`` returns it."""
    selected = selected_tests(request)
    root = tmp_path_factory.mktemp("tp-dora")
    runs = []
    if TRAINING_TEST in selected:
        def args(out: Path, **overrides) -> list[str]:
            return training_args(lambda output_dir, **more: micro_args(corpus, tokenizer_dir, cache_dir, output_dir,
                                                                       **more),
                                 request.getfixturevalue("base"), out, **overrides)

        runs = [args(root / "split", train__tensor_parallel=2, train__sequence_parallel=True,
                     train__vocab_parallel=True),
                # on 2 ranks again, without the sequence and vocabulary splits (the row-parallel magnitudes then
                # scale a replicated output): the full checkpoint's column-parallel magnitudes and their AdamW
                # moments cut by rows
                args(root / "resumed", train__tensor_parallel=2,
                     train__resume=root / "split" / "checkpoints" / "step_00000002")]
    launch, finished = launch_runs(runs, TP, root, worker=Path(__file__).with_name("tensor_parallel_dora_worker.py"),
                                   model_cases=CASES_TEST in selected)
    return SimpleNamespace(root=root, launch=launch, **dict(zip(("split", "again"), finished)))


@pytest.fixture(scope="module")
def ranks(two_ranks) -> list[dict]:
    assert two_ranks.launch.returncode == 0, two_ranks.launch.stderr[-4000:]
    return [torch.load(two_ranks.root / "model" / f"rank{rank}.pt", weights_only=False) for rank in range(TP)]


def _assert_run_matches(split: dict, alone: dict) -> None:
    torch.testing.assert_close(split["loss"], alone["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split["logits"], alone["logits"], rtol=1e-5, atol=1e-5)
    assert split["grads"].keys() == alone["grads"].keys()
    for name, grad in alone["grads"].items():  # measured 1.5e-5 of the largest: the split's summation order
        torch.testing.assert_close(split["grads"][name], grad, rtol=1e-4, atol=5e-5 * grad.abs().max().item(),
                                   msg=name)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
@pytest.mark.parametrize("name", list(CASES))
def test_split_dora_gives_one_process_outputs_and_adapter_gradients(ranks, name):
    """Both ranks' loss, logits and gradients of every adapter are one process's: ``lora_A``, ``lora_B`` and the
    magnitudes of the column-parallel ``q/k/v/g/gate/up_proj`` (magnitudes split by rows: 64 or 96 numbers, 32 or 48
    a rank) and the row-parallel ``o/down_proj`` (magnitudes whole on each rank). The gathered state dict is the
    unsplit model's; an unsplit state dict with other adapters loads into the split model, which then computes what
    the unsplit model does with it, and generates its greedy tokens."""
    model = build_model(name)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    alone = run_case(model, name)
    magnitudes = [n for n in alone["grads"] if ".lora_magnitude_vector." in n]
    projections = 8 if CASES[name]["config"]["ffn_glu"] else 7  # gate_proj with the GLU FFN
    assert len(magnitudes) == 2 * projections and all(alone["grads"][n].abs().sum() > 0 for n in magnitudes)
    for split in ranks:
        _assert_run_matches(split[name], alone)
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
    loaded = run_case(model, name)
    assert not torch.allclose(loaded["loss"], alone["loss"])
    with torch.no_grad():
        generated = model.eval().generate(**generation_inputs())
    for split in ranks:
        _assert_run_matches(split[name]["loaded"], loaded)
        assert torch.equal(split[name]["generated"], generated)


def test_the_config_takes_dora_with_tensor_parallelism():
    from retnet.train.config import load_config

    job = load_config("tiny", ["--train.tensor_parallel=2", "--train.sequence_parallel=true", "--lora.rank=4",
                               "--lora.use_dora=true"])
    assert job.lora.use_dora and job.train.tensor_parallel == 2


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir) -> Path:
    """A seeded micro model over the test tokenizer: the ``model.init_from`` the adapters train on."""
    from retnet.train.data import load_tokenizer

    from .conftest import save_micro_base

    path = tmp_path_factory.mktemp("tp-dora-base") / "base"
    save_micro_base(path, load_tokenizer(tokenizer_dir))
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
def test_dora_training_on_split_layers_logs_one_process_resumes_and_exports(micro, base, tmp_path, two_ranks, run_here,
                                                                            read_metrics):
    """DoRA rank 4 on every projection of ``base``, 4 steps: 2 torchrun ranks splitting every layer (the sequence
    and the vocabulary too) log one process's losses and gradient norms; their step-2 checkpoint (the adapters and
    magnitudes gathered whole) resumes on 2 ranks to one process's last losses, and their export (the merged model
    and export/adapter) is one process's."""
    from safetensors.torch import load_file

    from retnet.model import RetNetForCausalLM
    from retnet.train.checkpoint import load_checkpoint

    single, split, resumed = tmp_path / "single", two_ranks.root / "split", two_ranks.root / "resumed"
    alone = run_here(training_args(micro, base, single))
    assert alone.returncode == 0, alone.stderr[-3000:]
    # two_ranks's launch: training_args(split, train__tensor_parallel=2, train__sequence_parallel=True,
    # train__vocab_parallel=True), then the resume of its step-2 checkpoint (training_args(resumed,
    # train__tensor_parallel=2, train__resume=...)) checked below
    two, again = two_ranks.split, two_ranks.again
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    assert "DoRA rank 4 on q_proj" in two.stderr
    expected = [r["loss"] for r in read_metrics(single)]
    assert len(expected) == 4
    assert [r["loss"] for r in read_metrics(split)] == pytest.approx(expected, rel=1e-5)
    assert [r["grad_norm"] for r in read_metrics(split)] == pytest.approx(
        [r["grad_norm"] for r in read_metrics(single)], rel=1e-5)  # measured 6e-8, the losses 8e-8

    saved, reference = (load_checkpoint(out / "checkpoints" / "step_00000002")["model"] for out in (split, single))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    assert sum(".lora_magnitude_vector." in key for key in saved) == 2 * 7
    # the resume on 2 ranks (the launch's second run)
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-2000:]
    assert "at step 2" in again.stderr
    assert [r["loss"] for r in read_metrics(resumed)] == pytest.approx(expected[-2:], rel=1e-5)

    adapters = [load_file(out / "export" / "adapter" / "adapter_model.safetensors") for out in (split, single)]
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[1].items():  # measured 1.5e-4 of the largest (o_proj's A): AdamW's normalized
        # steps amplify the split's summation order in near-zero gradients, as in a plain LoRA run
        torch.testing.assert_close(adapters[0][key], value, rtol=0, atol=1e-3 * value.abs().max().item(), msg=key)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = [RetNetForCausalLM.from_pretrained(out / "export").eval() for out in (split, single)]
    with torch.no_grad():
        torch.testing.assert_close(merged[0](tokens).logits, merged[1](tokens).logits, rtol=0, atol=1e-4)  # 4e-6
