"""``optim.name``: AdamW, or Muon on the decoder layers' matrices with AdamW on the rest (``retnet.train.muon``).
In-process runs of the micro model (``main(micro(...))``); multi-rank runs were checked by hand (README)."""

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.config import ConfigError, load_config
from retnet.train.trainer import Trainer

needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")

MATRICES = ("retention.q_proj", "retention.k_proj", "retention.v_proj", "retention.g_proj", "retention.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _model(**overrides):
    from retnet.model import RetNetConfig, RetNetForCausalLM

    config = RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=300, **overrides)
    return RetNetForCausalLM(config)


def _losses(out, read_metrics, kind="train"):
    return [r["loss" if kind == "train" else "val_loss"] for r in read_metrics(out, kind)]


@needs_muon
@pytest.mark.parametrize("overrides", [
    {},  # tied LM head, no FFN biases, no GLU
    {"tie_word_embeddings": False, "ffn_glu": True, "ffn_bias": True},
])
def test_muon_trains_the_decoder_layers_matrices_and_adamw_the_rest(overrides):
    """The recipe: Muon gets every Linear weight of the decoder layers (q/k/v/g/o, FFN), nothing else; the
    embeddings, an untied LM head (decayed), norms and biases (not decayed) stay AdamW's, grouped as under
    optim.name=adamw."""
    from retnet.train.muon import MuonWithAdamW, muon_parameter_names
    from retnet.train.optim import build_optimizer, no_decay_parameter_names, optimizer_note

    model = _model(**overrides)
    names = {param: name for name, param in model.named_parameters()}
    cfg = load_config("tiny", ["--optim.name=muon", "--optim.weight_decay=0.05"]).optim
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    expected = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in MATRICES}
    if not model.config.ffn_glu:
        expected -= {f"model.layers.{i}.mlp.gate_proj.weight" for i in range(2)}
    (muon,) = optimizer.muon_groups
    assert {names[p] for p in muon["params"]} == expected == set(muon_parameter_names(model))
    assert muon["weight_decay"] == 0.05 and muon["momentum"] == 0.95 and muon["ns_steps"] == 5
    assert muon["adjust_lr_fn"] == "match_rms_adamw" and muon["lr"] == cfg.lr
    decay, no_decay = optimizer.adamw_groups
    assert {names[p] for p in decay["params"]} == ({"lm_head.weight"} if overrides else set())
    assert {names[p] for p in no_decay["params"]} == no_decay_parameter_names(model) - {"lm_head.weight"}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    if overrides:  # FFN biases are 1-D: AdamW's
        assert "model.layers.0.mlp.up_proj.bias" in {names[p] for p in no_decay["params"]}
    every = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(every) == len(set(every)) == len(list(model.parameters()))
    counted = f"Muon on the decoder layers' matrices ({len(expected)} tensors"
    assert optimizer_note(model, optimizer).startswith(counted)

    adamw = build_optimizer(model, load_config("tiny").optim, torch.device("cpu"))
    assert type(adamw) is torch.optim.AdamW and len(adamw.param_groups) == 2  # as before optim.name existed


@needs_muon
def test_muon_state_round_trips_and_steps_like_the_original():
    """state_dict()/load_state_dict() of the combined optimizer: a fresh one loaded from it steps exactly as
    the original does (the inner Muon and AdamW read the loaded groups and state); Muon's learning rate
    follows the schedule scaled to optim.muon_lr."""
    from retnet.train.optim import build_optimizer, set_lr

    cfg = load_config("tiny", ["--optim.name=muon", "--optim.muon_lr=0.02"]).optim
    torch.manual_seed(0)
    first, second = _model(), _model()
    second.load_state_dict(first.state_dict())
    optimizers = [build_optimizer(m, cfg, torch.device("cpu")) for m in (first, second)]

    def step(model, optimizer, seed):
        torch.manual_seed(seed)
        for param in model.parameters():
            param.grad = torch.randn_like(param)
        set_lr(optimizer, 1e-3, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for seed in (1, 2):
        step(first, optimizers[0], seed)
    saved = copy.deepcopy(optimizers[0].state_dict())  # else the two share the state tensors
    assert {"momentum_buffer"} in [set(s) for s in saved["state"].values()]  # Muon's
    assert {"step", "exp_avg", "exp_avg_sq"} in [set(s) for s in saved["state"].values()]  # AdamW's
    second.load_state_dict(first.state_dict())
    optimizers[1].load_state_dict(saved)
    assert optimizers[1]._muon.state is optimizers[1].state and optimizers[1]._adamw.state is optimizers[1].state
    step(first, optimizers[0], 3)
    step(second, optimizers[1], 3)
    for (name, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name
    muon, decay, no_decay = optimizers[1].param_groups
    assert muon["lr"] == pytest.approx(1e-3 * 0.02 / cfg.lr) and decay["lr"] == no_decay["lr"] == 1e-3


@needs_muon
def test_a_muon_run_learns_other_losses_than_adamw_and_resumes_bit_for_bit(micro, tmp_path, capsys, read_metrics):
    """A short Muon run: the startup log names the split, the training and validation losses fall, the loss after the first
    update is not AdamW's, the checkpoint holds Muon's momentum for the matrices; resuming from its mid-run
    checkpoint retraces the losses bit for bit; resuming it with optim.name=adamw is refused."""
    muon, adamw = tmp_path / "muon", tmp_path / "adamw"
    # muon_lr: the micro model's matrices are at most 64 wide, where the AdamW-matched update is small
    common = {"train__steps": 6, "checkpoint__interval": 3, "optim__lr": 1e-2}
    assert main(micro(muon, optim__name="muon", optim__muon_lr=0.1, **common)) == 0
    assert "optimizer: Muon on the decoder layers' matrices (14 tensors" in capsys.readouterr().err
    losses, val = _losses(muon, read_metrics), _losses(muon, read_metrics, "val")
    for record in read_metrics(muon, "train"):  # Muon's own rate is logged beside AdamW's, at its share
        assert record["muon_lr"] == pytest.approx(record["lr"] * 0.1 / 1e-2), record
    assert val[-1] < val[0] - 0.1 and sum(losses[3:]) < sum(losses[:3]) - 0.2, (losses, val)
    # step 2's loss follows one update at optim.lr (warmup 1) whatever train.steps is: 2 steps of AdamW suffice
    assert main(micro(adamw, **{**common, "train__steps": 2})) == 0
    baseline = _losses(adamw, read_metrics)
    assert losses[0] == baseline[0] and abs(losses[1] - baseline[1]) > 1e-3, (losses, baseline)

    optimizer = torch.load(muon / "checkpoints" / "step_00000006" / "optimizer.pt", weights_only=False)
    kinds = sorted(tuple(sorted(state)) for state in optimizer["state"].values())
    assert kinds.count(("momentum_buffer",)) == 14 and kinds.count(("exp_avg", "exp_avg_sq", "step")) == 13

    again = tmp_path / "again"
    shutil.copytree(muon, again)
    shutil.rmtree(again / "checkpoints" / "step_00000006")
    assert main(micro(again, optim__name="muon", optim__muon_lr=0.1, **common)) == 0
    assert "resumed from" in capsys.readouterr().err
    assert _losses(again, read_metrics) == losses
    assert _losses(again, read_metrics, "val") == val

    assert main(micro(muon, **{**common, "train__steps": 8})) == EXIT_CONFIG
    assert "optim.name: checkpoint 'muon', now 'adamw'" in capsys.readouterr().err


@needs_muon
def test_a_muon_resume_takes_the_muon_settings_configured_now(micro, tmp_path):
    """optim.* may change on resume: Muon's group takes the configured momentum, Newton-Schulz steps,
    learning-rate adjustment and weight decay over the checkpoint's. From the sharded layout, whose AdamW group
    without parameters (the LM head is tied) comes back without its settings: it gets AdamW's defaults, so the
    next step runs."""
    from retnet.train.trainer import Trainer

    out = tmp_path / "run"
    assert main(micro(out, optim__name="muon", train__steps=1, checkpoint__layout="sharded")) == 0
    args = micro(out, optim__name="muon", train__steps=2, optim__muon_momentum=0.9, optim__muon_ns_steps=3,
                 optim__muon_adjust_lr="original", optim__weight_decay=0.2, checkpoint__layout="sharded")
    trainer = Trainer(load_config("tiny", args[2:]))
    try:
        muon, decay, no_decay = trainer.optimizer.param_groups
        assert (muon["momentum"], muon["ns_steps"], muon["adjust_lr_fn"]) == (0.9, 3, "original")
        assert (muon["weight_decay"], decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.2, 0.0)
        assert decay["params"] == [] and decay["amsgrad"] is False
        assert trainer.step == 1 and trainer.optimizer.state  # Muon's momentum and AdamW's moments, loaded
        trainer.train()
        assert trainer.step == 2
    finally:
        trainer.close()


@needs_muon
@pytest.mark.parametrize("overrides, message", [
    (["--optim.name=sgd"], r"optim\.name must be one of \('adamw', 'muon'\); got 'sgd'"),
    (["--optim.name=muon", "--lora.rank=8"], r"optim\.name 'muon' cannot be used with lora\.rank 8"),
    (["--optim.muon_lr=0.02"], r"optim\.muon_lr is set but optim\.name is 'adamw'"),
    (["--optim.muon_momentum=0.9"], r"optim\.muon_momentum is set but optim\.name is 'adamw'"),
    (["--optim.name=muon", "--optim.muon_lr=0"], r"optim\.muon_lr must be > 0"),
    (["--optim.name=muon", "--optim.muon_momentum=1"], r"optim\.muon_momentum must be in \[0, 1\)"),
    (["--optim.name=muon", "--optim.muon_ns_steps=0"], r"optim\.muon_ns_steps must be in \[1, 100\)"),
    (["--optim.name=muon", "--optim.muon_adjust_lr=rms"], r"optim\.muon_adjust_lr must be one of"),
])
def test_optimizer_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


@needs_muon
def test_muon_loads_with_its_settings_and_under_fsdp():
    config = load_config("tiny", ["--optim.name=muon", "--optim.muon_lr=none", "--train.parallelism=fsdp"]).optim
    assert (config.name, config.muon_lr, config.muon_momentum, config.muon_ns_steps) == ("muon", None, 0.95, 5)
    assert load_config("tiny", ["--optim.name=muon", "--optim.muon_lr=0.02"]).optim.muon_lr == 0.02


def test_muon_without_torch_optim_muon_is_refused_at_startup(micro, tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(torch.optim, "Muon")
    assert main(micro(tmp_path / "run", optim__name="muon")) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "optim.name 'muon' needs torch >= 2.9 (torch.optim.Muon)" in err and torch.__version__ in err
    assert not (tmp_path / "run").exists()  # refused before anything was made


def _stepped_muon(model):
    from retnet.train.optim import build_optimizer

    optimizer = build_optimizer(model, load_config("tiny", ["--optim.name=muon"]).optim, torch.device("cpu"))
    torch.manual_seed(1)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    return optimizer


@needs_muon
def test_a_copied_muon_optimizer_steps_as_the_original():
    """copy.deepcopy and pickle keep what the combined optimizer steps with (torch's Optimizer copies only its
    defaults, state and groups): the copy's inner Muon and AdamW read the copy's groups and state."""
    import pickle

    torch.manual_seed(0)
    model = _model()
    optimizer = _stepped_muon(model)
    clone = pickle.loads(pickle.dumps(optimizer))
    assert clone._muon.state is clone.state and clone._adamw.state is clone.state
    assert clone._muon.param_groups[0] is clone.param_groups[0] and clone._adamw.param_groups[-1] is \
        clone.param_groups[-1]
    copied_model, copied = copy.deepcopy((model, optimizer))  # the parameters and the state keyed by them
    for net, optim in ((model, optimizer), (copied_model, copied)):
        torch.manual_seed(2)
        for param in net.parameters():
            param.grad = torch.randn_like(param)
        optim.step()
    for (name, a), b in zip(model.named_parameters(), copied_model.parameters(), strict=True):
        assert torch.equal(a, b), name


@needs_muon
def test_a_param_group_added_to_the_muon_optimizer_is_adamws():
    """add_param_group after construction: the group gets AdamW's defaults and AdamW steps it (before, neither
    inner optimizer did: the parameter never moved)."""
    torch.manual_seed(0)
    model = _model()
    optimizer = _stepped_muon(model)
    extra = torch.nn.Parameter(torch.ones(3))
    optimizer.add_param_group({"params": [extra], "weight_decay": 0.0})
    assert optimizer.adamw_groups[-1] is optimizer.param_groups[-1] and len(optimizer.muon_groups) == 1
    assert optimizer.param_groups[-1]["betas"] == (0.9, 0.95) and optimizer.param_groups[-1]["weight_decay"] == 0.0
    extra.grad = torch.ones(3)
    optimizer.step()
    assert set(optimizer.state[extra]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.all(extra < 1)
    assert len(optimizer.state_dict()["param_groups"]) == 4


def test_the_resume_guard_compares_optim_name_alone():
    """optim_changes: a checkpoint from before optim.name is AdamW's; a saved config that writes every muon_*
    default (JobConfig.to_dict()) resumes under adamw and, read back as a config, is not refused; another
    optimizer is refused."""
    from retnet.train.config import build_config, optim_changes

    adamw = load_config("tiny")
    saved = adamw.to_dict()
    assert {key for key in saved["optim"] if key.startswith("muon_")} == {
        "muon_lr", "muon_momentum", "muon_ns_steps", "muon_adjust_lr"}
    assert optim_changes(saved, adamw) == []
    older = {**saved, "optim": {k: v for k, v in saved["optim"].items() if k != "name" and not k.startswith("muon")}}
    assert optim_changes(older, adamw) == [] and optim_changes({}, adamw) == []
    # the defaults written out explicitly (TOML has no null: muon_lr is left out) are not "set"
    explicit = build_config({"optim": {k: v for k, v in saved["optim"].items() if v is not None}})
    assert explicit.optim == adamw.optim
    if hasattr(torch.optim, "Muon"):
        muon = load_config("tiny", ["--optim.name=muon"])
        assert optim_changes(older, muon) == ["optim.name: checkpoint 'adamw', now 'muon'"]
        assert optim_changes(muon.to_dict(), adamw) == ["optim.name: checkpoint 'muon', now 'adamw'"]


@needs_muon
def test_learnable_activation_parameters_stay_adamws():
    """SAU's learnable α and σ live in the decoder layers but are no Linear weight: AdamW's, not decayed."""
    from retnet.train.muon import muon_parameter_names
    from retnet.train.optim import no_decay_parameter_names

    model = _model(hidden_act="sau", hidden_act_kwargs={"trainable_sigma": True})
    learned = {name for name, _ in model.named_parameters() if "act_fn" in name}
    assert learned and not learned & set(muon_parameter_names(model)) and learned <= no_decay_parameter_names(model)
    optimizer = _stepped_muon(model)
    names = {id(param): name for name, param in model.named_parameters()}
    assert learned <= {names[id(param)] for param in optimizer.adamw_groups[1]["params"]}  # no decay
    assert all(optimizer.state[param]["step"] == 1 for param in model.parameters() if names[id(param)] in learned)


def test_adamw_over_a_tensor_parallel_model_takes_the_per_parameter_loop(tmp_path):
    """Fused and foreach AdamW refuse a mix of DTensor (split) and plain (replicated) parameters in one call, and
    CUDA would pick them: over a split model the optimizer takes the loop, and steps."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from retnet.model.tensor_parallel import parallelize_retnet
    from retnet.train.optim import build_optimizer

    assert build_optimizer(_model(), load_config("tiny").optim, torch.device("cuda")).defaults["fused"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = parallelize_retnet(_model(), init_device_mesh("cpu", (1,)))
        optimizer = build_optimizer(model, load_config("tiny").optim, torch.device("cuda"))
        assert optimizer.defaults["foreach"] is False and not optimizer.defaults["fused"]
        model(torch.randint(0, 300, (2, 9)), labels=torch.randint(0, 300, (2, 9))).loss.backward()
        before = model.lm_head.weight.detach().clone()
        optimizer.step()
        assert not torch.equal(model.lm_head.weight, before)
        # A resume loads the checkpoint's groups, kernel included: fused, as FSDP2 over the same split writes them
        # on CUDA. The settings applied after the load put this split's loop back.
        state = optimizer.state_dict()
        for group in state["param_groups"]:
            group.update(fused=True, foreach=None)
        optimizer.load_state_dict(state)
        assert all(group["fused"] for group in optimizer.param_groups)
        resumed = SimpleNamespace(cfg=load_config("tiny"), optimizer=optimizer, model=model, device=torch.device("cuda"))
        Trainer._apply_optim_settings(resumed)
        assert all(group["foreach"] is False and not group["fused"] for group in optimizer.param_groups)
    finally:
        dist.destroy_process_group()
