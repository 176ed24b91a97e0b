"""LoRA fine-tuning (``lora.rank > 0``): peft adapters on a pretrained model (``model.init_from``), only they
train; checkpoints hold the adapters and resume exactly; the export is the merged model plus peft's adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.checkpoint import list_checkpoints, load_checkpoint
from retnet.train.config import ConfigError, build_config, load_config

from .test_init_from import fine_tune_args

LORA = {"lora__rank": 4, "lora__alpha": 8, "optim__lr": 2e-2, "optim__weight_decay": 0.0}


def train_base(root: Path, corpus, tokenizer_dir, cache_dir) -> Path:
    """A micro model trained 10 steps in this process under ``root`` and exported: the export (the base the
    adapters are trained on)."""
    from .conftest import micro_args

    assert main(micro_args(corpus, tokenizer_dir, cache_dir, root / "run", checkpoint__export=True,
                           train__steps=10, optim__lr=1e-2)) == 0
    return root / "run" / "export"


def write_domain(path: Path) -> Path:
    """A narrow domain to adapt to: 80 documents of near-identical small Python functions."""
    with open(path, "w") as handle:
        for i in range(80):
            text = "".join(f"def f{j}(x):\n    return x + {j}\n\n" for j in range(i % 7, i % 7 + 12))
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def tune(out: Path, domain, tokenizer_dir, pretrained):
    """A LoRA fine-tune of ``pretrained`` on ``domain`` run in this process (8 steps, a checkpoint at 4 and 8,
    exported): its output directory, arguments and the trained model (the trainer's, adapters injected)."""
    return _fine_tune(out, domain, tokenizer_dir, pretrained, interval=4, steps=8)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus, tokenizer_dir, cache_dir):
    """``train_base``'s export."""
    return train_base(tmp_path_factory.mktemp("lora-base"), corpus, tokenizer_dir, cache_dir)


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    return write_domain(tmp_path_factory.mktemp("lora-domain") / "domain.jsonl")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, domain, tokenizer_dir, pretrained):
    """``tune``'s run: (output directory, arguments, the trained model)."""
    return tune(tmp_path_factory.mktemp("lora") / "tuned", domain, tokenizer_dir, pretrained)


def _fine_tune(out: Path, domain, tokenizer_dir, pretrained, *, interval: int, steps: int, **lora):
    """A LoRA fine-tune of ``pretrained`` run in this process, checkpointed every ``interval`` steps and exported:
    (output directory, arguments, the trainer's model with its adapters)."""
    from retnet.train.trainer import Trainer

    from .conftest import micro_args

    args = fine_tune_args(micro_args(domain, tokenizer_dir, out.parent / "cache", out, checkpoint__export=True,
                                     checkpoint__interval=interval, train__steps=steps), pretrained, **LORA, **lora)
    trainer = Trainer(load_config("tiny", args[2:]))
    try:
        trainer.train()
    finally:
        trainer.close()
    return out, args, trainer.raw_model.eval()


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))


def test_only_the_adapters_train(tuned, pretrained, read_metrics):
    """The pretrained weights are bit-identical after training, every adapter moved (lora_B starts at 0), and
    the validation loss fell (5.58 to 5.36 when written)."""
    from safetensors.torch import load_file

    out, _, model = tuned
    base = load_file(pretrained / "model.safetensors")
    state = model.state_dict()
    adapters = [k for k in state if ".lora_" in k]
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapters)
    frozen = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert set(base) <= set(frozen)
    for key, value in base.items():
        assert torch.equal(frozen[key], value), key
    assert all(state[k].abs().sum() > 0 for k in adapters if ".lora_B." in k)
    val = [r["val_loss"] for r in read_metrics(out, "val")]
    assert val[-1] < val[0] - 0.1, val


def test_checkpoints_hold_only_the_adapters(tuned):
    out, _, model = tuned
    saved = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved["model"]) == trainable
    assert len(saved["optimizer"]["state"]) == len(trainable)
    assert saved["trainer"]["lora_base"]["sha256"]


def _assert_exports_compute(model, export: Path, pretrained: Path) -> None:
    """``export`` (merge_and_unload) and ``export/adapter`` loaded by peft onto ``pretrained`` both compute the
    trained ``model``'s logits (1e-5); the merged model holds no LoRA weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokens = _batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(input_ids=tokens, use_cache=False).logits
        merged = AutoModelForCausalLM.from_pretrained(export).eval()
        assert not any("lora" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(input_ids=tokens, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained).eval(),
                                                 export / "adapter").eval()
        torch.testing.assert_close(with_adapter(input_ids=tokens, use_cache=False).logits, expected, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
def test_the_export_is_the_merged_model_and_the_peft_adapter(tuned, pretrained):
    """export/ (merge_and_unload) computes the trained model's logits; export/adapter loaded by peft onto the
    pretrained model does too; its base_model_name_or_path is init_from."""
    out, _, model = tuned
    _assert_exports_compute(model, out / "export", pretrained)
    config = json.loads((out / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(pretrained.resolve())
    # sorted, not in the hash order of peft's set (PYTHONHASHSEED's): an export's bytes are reproducible
    assert config["r"] == 4 and config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "up_proj", "down_proj"])
    assert (out / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "export" / "tokenizer.json").is_file()


def test_a_resume_retraces_the_losses_bit_for_bit(tuned, tmp_path, read_metrics):
    """The step-8 checkpoint gone, the run resumes from step 4 (the adapters over init_from's weights again)."""
    out, args, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    args = [a if not a.startswith("--train.output_dir=") else f"--train.output_dir={copy}" for a in args]
    assert main([*args, "--checkpoint.export=false"]) == 0
    losses = {r["step"]: r["loss"] for r in read_metrics(out)}
    again = {r["step"]: r["loss"] for r in read_metrics(copy)}
    assert sorted(again) == list(range(1, 9))
    assert [again[s] for s in range(5, 9)] == [losses[s] for s in range(5, 9)]


def test_a_resume_with_other_lora_settings_or_base_weights_is_refused(tuned, tmp_path, capsys):
    out, args, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    args = [a if not a.startswith("--train.output_dir=") else f"--train.output_dir={copy}" for a in args]
    assert main([*args, "--lora.rank=8", "--train.steps=9"]) == EXIT_CONFIG
    assert "lora.rank: checkpoint 4, now 8" in capsys.readouterr().err
    # the same architecture and tokenizer, other weights: a resume would put the adapters on another model
    other = tmp_path / "other-base"
    shutil.copytree(copy / "export", other, ignore=shutil.ignore_patterns("adapter"))
    args = [a if not a.startswith("--model.init_from=") else f"--model.init_from={other}" for a in args]
    assert main([*args, "--train.steps=9"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"model.init_from {str(other)!r}: its weights are not those" in err and "Traceback" not in err


@pytest.mark.parametrize(("override", "key"), [
    ({"rank": -1}, "lora.rank"), ({"rank": 4, "alpha": 0.0}, "lora.alpha"), ({"dropout": 1.0}, "lora.dropout"),
    ({"rank": 4, "target_modules": ["q_proj", "lm_head"]}, "lora.target_modules"),
    ({"rank": 4, "target_modules": ["q_proj", "q_proj"]}, "lora.target_modules"),
    ({"target_modules": ["q_proj"]}, "lora.target_modules is set but lora.rank is 0"),
])
def test_nonsense_lora_settings_are_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=key):
        build_config({"lora": override})


def test_target_modules_parse_from_the_command_line():
    cfg = load_config("tiny", ["--lora.rank=8", "--lora.target_modules=q_proj, v_proj"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config("tiny", ["--lora.rank=8", '--lora.target_modules=["o_proj"]']).lora.target_modules == ["o_proj"]


def test_a_target_module_the_model_lacks_is_refused(micro, tmp_path, capsys):
    """g_proj exists only with use_output_gate: named, it is refused before anything trains."""
    out = tmp_path / "run"
    assert main([*micro(out), "--model.extra.use_output_gate=false", "--lora.rank=4",
                 "--lora.target_modules=g_proj,q_proj"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "lora.target_modules names modules this model does not have: ['g_proj']" in err
    assert not (out / "checkpoints").exists()


def test_lora_on_a_random_init_checkpoints_the_whole_model(micro, tmp_path):
    """Without model.init_from there is no base to load again: checkpoints hold every weight, and the exported
    adapter names no base (the merged export is the model)."""
    out = tmp_path / "run"
    assert main([*micro(out, train__steps=2, checkpoint__export=True), "--lora.rank=2",
                 "--lora.target_modules=q_proj,v_proj", "--lora.use_rslora=true"]) == 0
    saved = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert "model.embed_tokens.weight" in saved["model"] and "lora_base" not in saved["trainer"]
    assert {k for k in saved["model"] if ".lora_" in k} == {
        f"model.layers.{i}.retention.{m}.lora_{ab}.default.weight" for i in range(2) for m in ("q_proj", "v_proj")
        for ab in "AB"}
    config = json.loads((out / "export" / "adapter" / "adapter_config.json").read_text())
    # None; peft 0.13 (the floor) writes the fresh model's name_or_path instead: ""
    assert not config["base_model_name_or_path"] and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["use_rslora"] is True and config["r"] == 2


def test_lora_fine_tunes_on_conversations(pretrained, tmp_path, read_metrics):
    """``data.format=chat`` needs nothing of its own: the assistant-only loss trains the adapters."""
    from .conftest import micro_args
    from .test_chat_sft import conversation

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(120)))
    out = tmp_path / "chat"
    # few, long blocks: a chat step costs about as much per block as per token on this micro model
    args = fine_tune_args(micro_args(chats, pretrained, tmp_path / "cache", out, train__steps=6, data__format="chat",
                                     data__seq_len=128, train__global_batch_size=2), pretrained,
                          **{**LORA, "optim__lr": 3e-2})
    assert main(args) == 0
    val = [r["val_loss"] for r in read_metrics(out, "val")]  # over the assistant tokens
    assert val[-1] < val[0] - 0.05, val  # 5.72 to 5.60 (four steps gave only 5.72 to 5.68 once the pad row started at zero)


# test_fsdp_lora_follows_one_process (two gloo ranks under FSDP2 against the one-process run) is in
# test_two_ranks_match_one_process.py (TestLora): its run shares one torchrun launch with other modules' 2-rank runs.


def _in(args: list[str], output_dir) -> list[str]:
    return [a if not a.startswith("--train.output_dir=") else f"--train.output_dir={output_dir}" for a in args]


def test_a_resume_on_the_same_weights_saved_otherwise_is_accepted(tuned, pretrained, tmp_path, read_metrics):
    """The base's fingerprint is of its weights, not of its files: the same weights re-saved in shards are the
    same base, and the resume retraces the losses."""
    from transformers import AutoModelForCausalLM

    out, args, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    other = tmp_path / "resharded"
    shutil.copytree(pretrained, other, ignore=shutil.ignore_patterns("*.safetensors"))
    AutoModelForCausalLM.from_pretrained(pretrained).save_pretrained(other, max_shard_size="20KB")
    assert len(list(other.glob("*.safetensors"))) > 1
    args = [a if not a.startswith("--model.init_from=") else f"--model.init_from={other}" for a in _in(args, copy)]
    assert main([*args, "--checkpoint.export=false"]) == 0
    losses = {r["step"]: r["loss"] for r in read_metrics(out)}
    again = {r["step"]: r["loss"] for r in read_metrics(copy)}
    assert [again[s] for s in range(5, 9)] == [losses[s] for s in range(5, 9)]


def test_a_resume_of_adapters_without_init_from_is_refused_naming_it(tuned, tmp_path, capsys):
    """The checkpoint holds only adapters: without model.init_from there is nothing to put them on, and the
    error says so (not that the model settings differ)."""
    out, args, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    args = [a for a in _in(args, copy) if not a.startswith("--model.init_from=")]
    assert main([*args, "--train.steps=9"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "model.init_from" in err and "only the LoRA adapters" in err and "Traceback" not in err


def test_a_one_process_checkpoint_resumes_under_fsdp(tuned, tmp_path, read_metrics):
    """A full-layout checkpoint of one process (its optimizer state keyed by parameter index) resumed under FSDP2
    (which keys it by name): here in this process, a gloo group of one rank."""
    from .conftest import train_fsdp_in_process

    out, args, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    train_fsdp_in_process([*_in(args, copy)[2:], "--checkpoint.export=false"], resumed_step=4)
    losses = {r["step"]: r["loss"] for r in read_metrics(out)}
    again = {r["step"]: r["loss"] for r in read_metrics(copy)}
    assert [again[s] for s in range(5, 9)] == pytest.approx([losses[s] for s in range(5, 9)], rel=1e-6)


def test_a_resume_whose_base_is_gone_is_refused_naming_init_from(tuned, tmp_path, capsys):
    out, args, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    gone = tmp_path / "moved-away"
    args = [a if not a.startswith("--model.init_from=") else f"--model.init_from={gone}" for a in _in(args, copy)]
    assert main([*args, "--train.steps=9"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"model.init_from {str(gone)!r}: no such directory" in err and "Traceback" not in err


def test_target_modules_named_in_another_order_are_the_same_lora_settings():
    """peft adapts the modules the names match, whatever their order: a resume naming them otherwise is the run."""
    from retnet.train.config import lora_changes

    saved = load_config("tiny", ["--lora.rank=4", "--lora.target_modules=q_proj,v_proj"]).to_dict()
    assert lora_changes(saved, load_config("tiny", ["--lora.rank=4", "--lora.target_modules=v_proj,q_proj"])) == []
    assert lora_changes(saved, load_config("tiny", ["--lora.rank=4", "--lora.target_modules=q_proj"])) == [
        "lora.target_modules: checkpoint ['q_proj', 'v_proj'], now ['q_proj']"]


# -- DoRA (lora.use_dora): the same adapters plus a trained magnitude per output row ---------------------------------
@pytest.fixture(scope="module")
def dora(tmp_path_factory, domain, tokenizer_dir, pretrained):
    """A DoRA fine-tune of ``pretrained`` in this process (4 steps, checkpoints at 2 and 4, exported): its output
    directory, arguments and the trained model."""
    return _fine_tune(tmp_path_factory.mktemp("dora") / "tuned", domain, tokenizer_dir, pretrained, interval=2,
                      steps=4, lora__use_dora="true")


def test_dora_trains_the_magnitudes_and_checkpoints_them(dora, pretrained):
    """Beside lora_A/lora_B, one magnitude vector per adapted Linear trains (from the pretrained rows' norms, so
    the first step computes the pretrained model) and is checkpointed; the pretrained weights stay bit-identical."""
    from safetensors.torch import load_file

    out, _, model = dora
    base = load_file(pretrained / "model.safetensors")
    state = model.state_dict()
    magnitudes = {k: v for k, v in state.items() if ".lora_magnitude_vector." in k}
    assert len(magnitudes) == 7 * 2  # every projection of both layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in state if ".lora_" in k} and set(magnitudes) <= trainable
    for key, value in base.items():
        assert torch.equal(state.get(key, state.get(key.replace(".weight", ".base_layer.weight"))), value), key
    for key, magnitude in magnitudes.items():
        weight = base[key.replace(".lora_magnitude_vector.default.weight", ".weight")]
        assert not torch.allclose(magnitude, torch.linalg.norm(weight, dim=1), rtol=1e-4, atol=1e-5), key
    saved = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert set(saved["model"]) == trainable and len(saved["optimizer"]["state"]) == len(trainable)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
def test_a_dora_resume_is_exact_and_its_export_is_the_peft_model(dora, pretrained, tmp_path, read_metrics, capsys):
    """From the step-2 checkpoint the losses retrace bit for bit; the merged export (peft folds the magnitudes
    in) and export/adapter on the pretrained model compute the trained model; another use_dora is refused."""
    out, args, model = dora
    _assert_exports_compute(model, out / "export", pretrained)
    assert json.loads((out / "export" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000004")
    assert main([*_in(args, copy), "--checkpoint.export=false"]) == 0
    losses = {r["step"]: r["loss"] for r in read_metrics(out)}
    again = {r["step"]: r["loss"] for r in read_metrics(copy)}
    assert sorted(again) == list(range(1, 5)) and [again[s] for s in (3, 4)] == [losses[s] for s in (3, 4)]
    capsys.readouterr()
    assert main([*_in(args, copy), "--lora.use_dora=false", "--train.steps=5"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "lora.use_dora: checkpoint True, now False" in err and "Traceback" not in err


def test_dora_without_a_rank_is_refused():
    with pytest.raises(ConfigError, match=r"lora\.use_dora is set but lora\.rank is 0"):
        build_config({"lora": {"use_dora": True}})


def test_a_checkpoint_from_before_use_dora_resumes_as_plain_lora():
    """A checkpoint's config written before lora.use_dora existed holds no such field: it was plain LoRA, so the
    same run resumes (not refused) and only a DoRA run is told the checkpoint is not one."""
    from retnet.train.config import lora_changes

    saved = load_config("tiny", ["--lora.rank=4"]).to_dict()
    del saved["lora"]["use_dora"]
    assert lora_changes(saved, load_config("tiny", ["--lora.rank=4"])) == []
    assert lora_changes(saved, load_config("tiny", ["--lora.rank=4", "--lora.use_dora=true"])) == [
        "lora.use_dora: checkpoint False, now True"]


def test_dora_export_adapter_served_is_the_merged_export_served(dora, pretrained):
    """Train -> serve: export/adapter served over init_from (retnet-serve --lora-modules) scores prompts as the
    merged export served alone does (echo, nothing generated: no greedy near-tie can make them differ)."""
    import asyncio

    from ..serve.conftest import serve_app

    out, _, _ = dora
    prompts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)"]

    async def scores(model_dir, model=None, **settings) -> list[list[float]]:
        async with serve_app(model_dir, **settings) as client:
            got = []
            for prompt in prompts:
                body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}
                r = await client.post("/v1/completions", json=body if model is None else {**body, "model": model})
                assert r.status_code == 200, r.text
                got.append(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:])
            return got

    served = asyncio.run(scores(pretrained, "tuned", lora_modules=[f"tuned={out / 'export' / 'adapter'}"]))
    merged, base = asyncio.run(scores(out / "export")), asyncio.run(scores(pretrained))
    for got, want, plain in zip(served, merged, base, strict=True):
        assert len(got) > 8 and got == pytest.approx(want, abs=1e-4)
        assert max(abs(g - p) for g, p in zip(got, plain, strict=True)) > 1e-2  # the adapter changes the model
