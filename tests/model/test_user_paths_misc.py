"""Users' paths through int8 quantization, distillation's teacher, and hub-id lookup that used to crash with
unclear errors or accept what cannot work: each test is a bug once found (tiny models, in process)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from retnet.model import RetNetForCausalLM, RetNetForSequenceClassification
from retnet.model.distillation import linear_distillation_loss
from retnet.model.hub import HubError, is_hub_id, resolve_pretrained
from retnet.train.config import ConfigError, DistillConfig

from .conftest import make_model
from .test_quantization import needs_torchao


def _ids(batch=2, length=19, vocab=101):
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------------------------
@needs_torchao
@torch.no_grad()
def test_a_quantized_model_saves_the_weights_it_computes_with(tmp_path):
    """save_pretrained of a quantized model failed inside safetensors ("Attempted to access the data pointer on an
    invalid python storage"). Now the directory holds the dequantized weights: it loads as a plain model (tied head
    still tied) computing the quantized model's logits, and a state dict round trip (int8 or dequantized) keeps the
    int8 codes."""
    from retnet.model.quantization import dequantized_state_dict, quantize_model

    model = make_model()
    quantize_model(model, "int8")
    ids = _ids()
    # as is, given its state dict (transformers' Trainer._save), and as a copy whose weights moved on
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.model.embed_tokens.weight.add_(0.5)
    for saver, kwargs, directory in ((model, {}, tmp_path), (model, {"state_dict": model.state_dict()}, tmp_path / "sd"),
                                     (copied, {}, tmp_path / "copy")):
        saver.save_pretrained(directory, **kwargs)
        loaded = RetNetForCausalLM.from_pretrained(directory).eval()
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        # (int8 matmuls round otherwise than float ones: 2e-7 here, 8e-5 on the copy's larger activations)
        torch.testing.assert_close(loaded(ids).logits, saver(ids).logits, rtol=1e-4, atol=2e-4)
    loaded = RetNetForCausalLM.from_pretrained(tmp_path).eval()
    # not the unquantized weights: those are ~1% away
    assert (loaded(ids).logits - make_model()(ids).logits).abs().max() > 1e-4

    codes = model.model.layers[0].mlp.down_proj.weight.qdata.clone()
    for state in (model.state_dict(), dequantized_state_dict(model)):  # int8 as it is, or the float it computes with
        model.load_state_dict(state)
        assert torch.equal(model.model.layers[0].mlp.down_proj.weight.qdata, codes)
    assert not any(type(value).__name__ != "Tensor" for value in dequantized_state_dict(model).values())
    other = make_model(seed=3)  # a float state dict loaded into a quantized model is quantized as quantize_model does
    model.load_state_dict(other.state_dict())
    quantize_model(other, "int8")
    torch.testing.assert_close(model(ids).logits, other(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# distillation
# ----------------------------------------------------------------------------------------------------------
def test_an_infinite_temperature_is_refused_not_a_nan_loss():
    hidden, teacher = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    weight, labels = torch.randn(11, 8), torch.randint(0, 11, (1, 5))
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0.*got inf"):
        linear_distillation_loss(hidden, weight, teacher, weight, labels, temperature=float("inf"))


def test_a_teacher_named_by_its_run_directory_or_a_file_is_refused_with_the_path_to_give(tmp_path):
    from retnet.train.distill import resolve_teacher

    make_model().save_pretrained(tmp_path / "run" / "export")
    with pytest.raises(ConfigError, match=r"is a training run's train.output_dir, not a model \(did you mean '.*run/export', the "
                       r"run's export"):
        resolve_teacher(DistillConfig(teacher=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match=r"config.json' is a file, not a directory"):
        resolve_teacher(DistillConfig(teacher=str(tmp_path / "run" / "export" / "config.json")))


def test_a_teacher_config_json_that_is_not_json_is_refused_naming_the_setting(tmp_path):
    from retnet.train.distill import teacher_config

    (tmp_path / "config.json").write_text('{"model_type": "retnet",')  # cut short by a failed copy
    with pytest.raises(ConfigError, match=r"distill.teacher '.*': its config.json could not be read"):
        teacher_config(tmp_path, tokenizer=None)


def test_a_reward_model_teacher_is_refused_as_having_no_lm_head(tmp_path):
    """It was refused as "its weights do not match its config.json (unexpected: score.weight)", which they do."""
    from retnet.train.distill import teacher_config

    config = make_model().config
    config.num_labels = 1
    RetNetForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"holds a RetNetForSequenceClassification .*not a RetNetForCausalLM"):
        teacher_config(tmp_path, tokenizer=None)


def test_damaged_teacher_weights_are_refused_naming_the_setting(tmp_path):
    from retnet.model import RetNetConfig
    from retnet.train.distill import load_teacher

    make_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # an interrupted download or copy
    with pytest.raises(ConfigError, match=r"distill.teacher '.*': its weights could not be loaded: SafetensorError"):
        load_teacher(DistillConfig(teacher=str(tmp_path)), tmp_path, RetNetConfig.from_pretrained(tmp_path),
                     torch.device("cpu"), torch.float32)


# ----------------------------------------------------------------------------------------------------------
# hub ids
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["org/name-", "org_/name.git", "modèles/retnet", "org./name"])
def test_what_the_hub_refuses_as_a_repository_id_is_a_path(source):
    """These read as hub ids here, so a missing local directory was reported as a failed download."""
    assert not is_hub_id(source)
    with pytest.raises(HubError, match=r"no such directory \(nor a hub id"):
        resolve_pretrained(source)


def test_an_empty_source_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch):
    make_model().save_pretrained(tmp_path)
    monkeypatch.chdir(tmp_path)  # Path("") is "."; here "." even holds a model
    with pytest.raises(HubError, match=r"'': empty"):
        resolve_pretrained("")


# ----------------------------------------------------------------------------------------------------------
# retnet-lm-eval
# ----------------------------------------------------------------------------------------------------------
def test_lm_eval_refuses_a_reward_model_before_lm_eval_scores_it_as_a_causal_lm(tmp_path, monkeypatch):
    """AutoModelForCausalLM loads a RetNetForSequenceClassification directory without an error (its score head only
    listed as unexpected, the tied embedding standing in for a head), so lm-eval scored a reward model silently."""
    from retnet import harness

    config = make_model().config
    config.num_labels = 1
    RetNetForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    make_model().save_pretrained(tmp_path / "lm")
    ran = []
    monkeypatch.setattr(harness, "lm_eval_cli", lambda: lambda: ran.append(True))
    rm = str(tmp_path / "rm")
    for model_args in (["--model_args", f"pretrained={rm},dtype=float32"], ["-a", "dtype=float32", f"pretrained={rm}"],
                       [f"--model_args={json.dumps({'pretrained': rm})}"]):
        with pytest.raises(SystemExit, match=r"pretrained=.*rm holds a RetNetForSequenceClassification .*not a "
                                             r"RetNetForCausalLM"):
            harness.main(["--model", "hf", *model_args, "--tasks", "hellaswag"])
    assert not ran
    harness.main(["--model", "hf", "--model_args", f"pretrained={tmp_path / 'lm'},dtype=float32", "--tasks", "x"])
    harness.main(["--model", "hf", "--model_args", "pretrained=org/name", "--tasks", "x"])  # a hub id: lm-eval's
    assert ran == [True, True]
