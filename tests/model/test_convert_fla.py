"""retnet-convert-fla: a flash-linear-attention RetNet, converted, computes what fla computes with it."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.model.convert_fla import convert_fla_checkpoint, main, retnet_config_from_fla

from .fla_checkpoints import _synthetic_fla_checkpoint

# Looked up, not imported: importing fla registers its own `retnet` model type with the Auto classes, over ours,
# for every test that runs after this module in the same process.
if importlib.util.find_spec("fla") is None:
    pytest.skip("flash-linear-attention is a dev dependency (pip install -e .[dev])", allow_module_level=True)


@pytest.fixture(scope="module")
def fla_checkpoints(tmp_path_factory) -> Path:
    """fla's checkpoints and outputs, made by fla itself in a process of its own (see fla_reference.py)."""
    out = tmp_path_factory.mktemp("fla")
    script = Path(__file__).with_name("fla_reference.py")
    subprocess.run([sys.executable, str(script), str(out)], check=True, timeout=300, capture_output=True)
    return out


@pytest.fixture(scope="module")
def reference(fla_checkpoints) -> dict:
    return torch.load(fla_checkpoints / "reference.pt", weights_only=True)


def tolerance(reference: dict) -> dict:
    # On a GPU fla's fp32 kernels multiply in TF32 (10-bit mantissas); the interpreter computes true fp32.
    return dict(atol=2e-4, rtol=1e-4) if reference["device"] == "cpu" else dict(atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("variant", ["default", "grouped", "plain"])
def test_converted_model_computes_fla_logits(fla_checkpoints, reference, tmp_path, variant):
    convert_fla_checkpoint(fla_checkpoints / variant, tmp_path)
    model = RetNetForCausalLM.from_pretrained(tmp_path).eval()
    expected = reference[variant]
    with torch.no_grad():
        for mode in ("parallel", "chunkwise", "recurrent"):
            logits = model(expected["ids"], retention_mode=mode).logits
            torch.testing.assert_close(logits, expected["logits"], **tolerance(reference))


def test_converted_model_generates_fla_tokens(fla_checkpoints, reference, tmp_path):
    convert_fla_checkpoint(fla_checkpoints / "default", tmp_path)
    model = RetNetForCausalLM.from_pretrained(tmp_path).eval()
    expected = reference["default"]
    generated = model.generate(expected["prompt"], max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
    assert generated.tolist() == expected["generated"].tolist()


def test_conversion_keeps_config_dtype_and_tokenizer(fla_checkpoints, bpe_tokenizer, tmp_path):
    source = tmp_path / "fla"
    for path in (fla_checkpoints / "grouped").iterdir():
        (source / path.name).parent.mkdir(exist_ok=True)
        (source / path.name).write_bytes(path.read_bytes())
    bpe_tokenizer.save_pretrained(source)
    main([str(source), str(tmp_path / "ours"), "--dtype", "bfloat16"])

    config = RetNetConfig.from_pretrained(tmp_path / "ours")
    fla = json.loads((source / "config.json").read_text())
    assert (config.num_attention_heads, config.head_dim, config.value_head_dim) == (4, 8, 32)
    assert config.tie_word_embeddings and config.bos_token_id == fla["bos_token_id"]
    weights = load_file(tmp_path / "ours" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    # Grouped keys: heads 0 and 1 share fla's key head 0, so their rows are equal.
    k = weights["model.layers.0.retention.k_proj.weight"].view(4, 8, 64)
    assert torch.equal(k[0], k[1]) and torch.equal(k[2], k[3]) and not torch.equal(k[0], k[2])
    text = "def add(a, b):\n    return a + b\n"
    assert AutoTokenizer.from_pretrained(tmp_path / "ours")(text).input_ids == bpe_tokenizer(text).input_ids


def test_older_flas_fused_gate_and_up_projection_is_split(fla_checkpoints, reference, tmp_path):
    """fla's 2024 releases had one ``gate_proj`` of 2I outputs, ``gate, y = gate_proj(x).chunk(2, -1)``: the same
    model written that way converts to the same logits."""
    source = tmp_path / "fla"
    source.mkdir()
    (source / "config.json").write_bytes((fla_checkpoints / "default" / "config.json").read_bytes())
    weights = load_file(fla_checkpoints / "default" / "model.safetensors")
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp."
        weights[prefix + "gate_proj.weight"] = torch.cat([weights[prefix + "gate_proj.weight"],
                                                          weights.pop(prefix + "up_proj.weight")])
    save_file(weights, source / "model.safetensors")
    convert_fla_checkpoint(source, tmp_path / "ours")
    model = RetNetForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        logits = model(reference["default"]["ids"]).logits
    torch.testing.assert_close(logits, reference["default"]["logits"], **tolerance(reference))


def test_sharded_fla_checkpoint(fla_checkpoints, reference, tmp_path):
    source = tmp_path / "fla"
    source.mkdir()
    (source / "config.json").write_bytes((fla_checkpoints / "default" / "config.json").read_bytes())
    weights = load_file(fla_checkpoints / "default" / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({name: weights[name] for name in shard_names}, source / shard)
    index = {"metadata": {}, "weight_map": {name: shard for shard, ns in shards.items() for name in ns}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    convert_fla_checkpoint(source, tmp_path / "ours")
    model = RetNetForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        logits = model(reference["default"]["ids"]).logits
    torch.testing.assert_close(logits, reference["default"]["logits"], **tolerance(reference))


@pytest.mark.parametrize(("field", "value"), [
    ("use_short_conv", True), ("feature_map", "relu"), ("attn", {"layers": [1], "num_heads": 2}),
    ("hidden_act", "gelu"), ("num_kv_heads", 3), ("expand_v", 0.3),
])
def test_features_without_a_counterpart_are_refused_by_name(field, value):
    fla = {"model_type": "retnet", "hidden_size": 64, "num_heads": 2, "expand_k": 1.0, "expand_v": 2.0,
           "num_hidden_layers": 2, "vocab_size": 101, "intermediate_size": 96, field: value}
    with pytest.raises(ValueError, match=f"field {field}="):
        retnet_config_from_fla(fla)


def test_missing_or_misshapen_tensors_are_refused(fla_checkpoints, tmp_path):
    weights = load_file(fla_checkpoints / "default" / "model.safetensors")
    config = (fla_checkpoints / "default" / "config.json").read_bytes()
    for name, broken, error in (
        ("missing", {k: v for k, v in weights.items() if "layers.1.mlp_norm" not in k}, "no model.layers.1.mlp_norm"),
        ("misshapen", {**weights, "model.layers.1.attn.o_proj.weight": torch.zeros(64, 64)},
         r"o_proj.weight has shape \(64, 64\), expected \(64, 128\)"),
        ("extra", {**weights, "model.layers.0.attn.q_conv1d.weight": torch.zeros(64, 1, 4)}, "q_conv1d"),
    ):
        source = tmp_path / name
        source.mkdir()
        (source / "config.json").write_bytes(config)
        save_file(broken, source / "model.safetensors")
        with pytest.raises(ValueError, match=error):
            convert_fla_checkpoint(source, tmp_path / f"{name}-out")
        assert not (tmp_path / f"{name}-out").exists()  # nothing half written


def test_loading_an_fla_checkpoint_unconverted_points_to_the_converter(fla_checkpoints):
    with pytest.raises(ValueError, match="retnet-convert-fla"):
        RetNetForCausalLM.from_pretrained(fla_checkpoints / "default")


def test_command_line_errors_exit_2_with_the_reason(tmp_path, capsys):
    for source, reason in ((str(tmp_path / "nowhere"), "no such directory"),
                           # HF_HUB_OFFLINE=1 in the suite: the real download path, refused without a network.
                           ("fla-hub/retnet-1.3B-100B", "the hub could not provide it")):
        with pytest.raises(SystemExit) as exit_info:
            main([source, str(tmp_path / "out")])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("retnet-convert-fla: error: ") and reason in error


def test_fla_stays_out_of_this_process():
    """fla ran in its own process: here the Auto classes still map model type `retnet` to ours."""
    from transformers import AutoConfig

    assert "fla" not in sys.modules
    assert type(AutoConfig.for_model("retnet")) is RetNetConfig


@pytest.mark.parametrize(("name", "shape"), [
    ("model.layers.1.mlp.gate_proj.weight", (80, 64)), ("model.layers.1.mlp.up_proj.weight", (96, 65)),
    ("model.layers.1.mlp.down_proj.weight", (64, 80)), ("model.layers.0.mlp.gate_proj.weight", (2 * 96, 64)),
])
def test_misshapen_ffn_tensors_are_refused_by_name(tmp_path, name, shape):
    # The FFN's width comes from layer 0's down_proj: another layer's (or an unfused gate of twice it) must be
    # refused like the other tensors, naming fla's tensor, not fail in load_state_dict with our names (a
    # RuntimeError the command line does not catch).
    source = tmp_path / "fla"
    weights = _synthetic_fla_checkpoint(source)
    weights[name] = torch.zeros(shape)
    save_file(weights, source / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{re.escape(name)} has shape {re.escape(str(shape))}, expected"):
        convert_fla_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_checks_keep_the_fused_gate_and_up_projection(tmp_path):
    weights = _synthetic_fla_checkpoint(tmp_path / "fla")
    save_file(weights, tmp_path / "fla" / "model.safetensors")
    convert_fla_checkpoint(tmp_path / "fla", tmp_path / "out")
    _synthetic_fla_checkpoint(tmp_path / "fused")
    fused = dict(weights)
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp."
        fused[prefix + "gate_proj.weight"] = torch.cat([fused[prefix + "gate_proj.weight"],
                                                        fused.pop(prefix + "up_proj.weight")])
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    convert_fla_checkpoint(tmp_path / "fused", tmp_path / "fused-out")
    unfused_state = load_file(tmp_path / "out" / "model.safetensors")
    fused_state = load_file(tmp_path / "fused-out" / "model.safetensors")
    assert unfused_state.keys() == fused_state.keys()
    assert all(torch.equal(unfused_state[name], fused_state[name]) for name in unfused_state)


def test_converting_a_checkpoint_onto_itself_is_refused_before_anything_is_written(tmp_path, capsys):
    # It overwrote fla's config.json and weights with ours, then died copying a file onto itself (SameFileError,
    # a traceback), leaving neither checkpoint.
    source = tmp_path / "fla"
    save_file(_synthetic_fla_checkpoint(source), source / "model.safetensors")
    (source / "generation_config.json").write_text('{"bos_token_id": 1}')
    before = {path.name: path.read_bytes() for path in source.iterdir()}
    for destination in (source, tmp_path / "." / "fla" / ".." / "fla"):
        with pytest.raises(SystemExit) as exit_info:
            main([str(source), str(destination)])
        assert exit_info.value.code == 2
        assert "is the checkpoint being converted" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in source.iterdir()} == before


@pytest.mark.parametrize(("overrides", "field", "ours"), [
    ({"hidden_size": 2048}, "expand_k", "head_dim"),  # 1024-wide heads: the kernels' largest is 512
    ({"hidden_size": 2048, "expand_k": 0.25}, "expand_v", "value_factor"),
    ({"norm_eps": 0.0}, "norm_eps", "rms_norm_eps"),
    ({"vocab_size": 0}, "vocab_size", "vocab_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers", "num_hidden_layers"),
    ({"num_heads": 0}, "num_heads", None),  # was a ZeroDivisionError
])
def test_values_our_config_refuses_are_refused_under_flas_field_names(overrides, field, ours):
    # They were refused as RetNetConfig.head_dim, .value_factor, ...: fields an fla config.json does not have.
    fla = {"model_type": "retnet", "hidden_size": 64, "num_heads": 2, "expand_k": 1.0, "expand_v": 2.0,
           "num_hidden_layers": 2, "vocab_size": 101, "intermediate_size": 96, **overrides}
    with pytest.raises(ValueError, match=rf"^flash-linear-attention RetNet config field {field}=") as caught:
        retnet_config_from_fla(fla)
    assert ours is None or f"RetNetConfig.{ours} " in str(caught.value)
