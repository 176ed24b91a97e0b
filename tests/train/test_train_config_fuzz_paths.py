"""Training-config cases found by fuzzing the TOML tables and the overrides."""

import pytest

from retnet.model import RetNetConfig
from retnet.train.config import ConfigError, build_config, load_config


def test_model_hidden_act_takes_one_name_per_layer_as_retnet_config_does(tmp_path):
    """RetNetConfig takes a list of activations, one per layer, but [model] hidden_act was typed str: the list was
    refused from TOML ('expects str') and an override's list reached the model as one unknown name."""
    path = tmp_path / "per_layer.toml"
    path.write_text('[model]\nhidden_act = ["sau", "smelu"]\nextra = {hidden_act_kwargs = [{alpha = 0.2}, {}]}\n')
    config = load_config(str(path))
    assert config.model.hidden_act == ["sau", "smelu"]
    model = RetNetConfig.from_preset("tiny", **config.model.overrides())
    assert model.layer_activations == [("sau", {"alpha": 0.2}), ("smelu", {})]
    assert load_config("tiny", ['--model.hidden_act=["gelu", "relu"]']).model.hidden_act == ["gelu", "relu"]


def test_a_model_hidden_act_override_without_brackets_is_one_name():
    """A list is written [...]: 'relu' is not ['relu'] (one layer's list for a two-layer model), nor is 'gelu,relu'
    split as list fields' overrides are."""
    assert load_config("tiny", ["--model.hidden_act=relu"]).model.hidden_act == "relu"
    assert load_config("tiny", ["--model.hidden_act=none"]).model.hidden_act is None
    with pytest.raises(ConfigError, match=r"hidden_act \(layer 0\): unknown activation 'gelu,relu'"):
        load_config("tiny", ["--model.hidden_act=gelu,relu"])


@pytest.mark.parametrize("table, message", [
    ({"hidden_act": ["gelu"]}, r"hidden_act as a list must have one name per layer \(num_hidden_layers=2\)"),
    ({"hidden_act": 3}, r"^model\.hidden_act expects str; got int 3"),
    ({"hidden_act": ["gelu", 1]}, r"hidden_act \(layer 1\): unknown activation 1"),
])
def test_a_model_hidden_act_that_cannot_work_is_refused_naming_it(table, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model": table})


def test_a_broken_list_override_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^model\.hidden_act expects list; got '\[gelu'"):
        load_config("tiny", ["--model.hidden_act=[gelu"])


@pytest.mark.parametrize("table, message", [
    ({"hidden_size": 1}, r"hidden_size must be divisible by num_attention_heads=4; got 1"),
    ({"num_hidden_layers": 2**62, "hidden_act": "nope"}, r"hidden_act \(layer 0\): unknown activation 'nope'"),
    ({"intermediate_size": 2**60}, r"intermediate_size must keep the FFN weight"),
])
def test_model_sizes_found_by_fuzzing_are_refused_as_config_errors_naming_the_field(table, message):
    """hidden_size 1 was refused naming head_dim (never set); 2**62 layers raised a MemoryError past the CLI's
    ConfigError handling; an FFN of 2**60 x 128 weights was accepted and failed in torch when the model was built."""
    with pytest.raises(ConfigError, match=message):
        build_config({"model": table})


HUGE = 10**400  # TOML reads an int of any length; float() of it raises OverflowError


@pytest.mark.parametrize("override, message", [
    (f"--train.steps={HUGE}", r"^train\.steps expects an int in \[-2\*\*63, 2\*\*63\); got 1000"),
    (f"--optim.warmup_steps={2**63}", r"^optim\.warmup_steps expects an int in \[-2\*\*63, 2\*\*63\)"),
    (f"--grpo.reward_weights=[{HUGE}]", r"^grpo\.reward_weights must be finite numbers"),
    (f"--model.extra.rope_theta={HUGE}", r"RetNetConfig\.rope_theta must be a finite number"),
])
def test_ints_beyond_float_and_int64_are_refused_naming_the_key(override, message, tmp_path, capsys):
    """Each ended in a traceback (OverflowError: int too large to convert to float), not the CLI's config error."""
    from retnet.train.__main__ import EXIT_CONFIG, main

    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])
    assert main(["--config", "tiny", override, f"--train.output_dir={tmp_path / 'run'}"]) == EXIT_CONFIG
    assert "Traceback" not in capsys.readouterr().err


def test_a_generation_kwargs_number_beyond_float_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"^grpo\.generation_kwargs\.top_p must be in \(0, 1\]"):
        build_config({"grpo": {"generation_kwargs": {"top_p": HUGE}}})


@pytest.mark.parametrize("table, message", [
    ({"optim": {"lr": HUGE}}, r"^optim\.lr expects a finite float; got int 1000"),
    ({"train": {"steps": HUGE}}, r"^train\.steps expects an int in \[-2\*\*63, 2\*\*63\)"),
])
def test_toml_ints_beyond_float_and_int64_are_refused_naming_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        build_config(table)


TOO_LONG = "a" * 300  # past the OS's 255-byte file name: Path.exists/is_file raised OSError (ENAMETOOLONG) on it


@pytest.mark.parametrize("raw, key", [
    ({"distill": {"teacher": TOO_LONG}}, "distill.teacher"),
    ({"model": {"init_from": "runs/sft/export"}, "data": {"format": "prompts", "dataset": "prompts.jsonl"},
      "grpo": {"reward_model": TOO_LONG}}, "grpo.reward_model"),
])
def test_a_path_too_long_for_the_os_is_refused_as_missing_naming_the_key(raw, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be .*; got 'aaaa"):
        build_config(raw)


def test_a_config_name_too_long_for_the_os_is_refused_as_neither_file_nor_preset(capsys):
    from retnet.train.__main__ import EXIT_CONFIG, main

    with pytest.raises(ConfigError, match=r"^--config 'aaaa.*' is neither a TOML file nor a preset"):
        load_config(TOO_LONG)
    assert main(["--config", TOO_LONG, "--print-config"]) == EXIT_CONFIG
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    ({"id2label": 5}, r"^model: RetNetConfig\.id2label must be a dict"),  # AttributeError past the CLI
    ({"dtype": "auto"}, r"^model: RetNetConfig\.dtype must be a torch dtype"),  # AttributeError past the CLI
    ({"model_type": __import__("datetime").date(2020, 1, 1)}, r"^model\.extra\.model_type must be a JSON value"),
])
def test_model_extra_values_that_crashed_past_the_config_error_are_refused(extra, message):
    """RetNetConfig's to_dict drops model_type's value, so only the run's own JSON (its config, checkpoints)
    failed on the date, after the data had been prepared."""
    with pytest.raises(ConfigError, match=message):
        build_config({"model": {"extra": extra}})


def test_a_run_trains_and_exports_one_activation_per_layer(micro, run_here, tmp_path):
    out = tmp_path / "run"
    args = [*micro(out, train__steps=2, checkpoint__export="true"), '--model.hidden_act=["sau", "smelu"]']
    result = run_here(args)
    assert result.returncode == 0, result.stderr
    exported = RetNetConfig.from_pretrained(out / "export")
    assert exported.layer_activations == [("sau", {}), ("smelu", {})]


@pytest.mark.parametrize("override", ["--data.dataset", "--data.tokenizer", "--train.resume"])
def test_an_over_long_data_tokenizer_or_resume_path_is_refused_not_a_traceback(override, tmp_path, capsys):
    # Path.is_dir/exists raised OSError (ENAMETOOLONG) past the CLI's error handling.
    from retnet.train.__main__ import EXIT_CONFIG, main

    code = main(["--config", "tiny", f"{override}={TOO_LONG}", "--train.steps=1", "--optim.warmup_steps=0",
                 f"--train.output_dir={tmp_path / 'run'}", "--logging.progress=false"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG and err.startswith("retnet-train: error: ") and err.count("\n") == 1, err


def test_one_activation_written_for_all_layers_or_per_layer_is_no_model_change():
    from retnet.train.config import model_changes

    saved = load_config("tiny", ["--model.hidden_act=gelu"]).to_dict()
    layers = load_config("tiny").model.num_hidden_layers or RetNetConfig.from_preset("tiny").num_hidden_layers
    same = load_config("tiny", ["--model.hidden_act=" + str(["gelu"] * layers).replace("'", '"')])
    assert model_changes(saved, same) == []
    other = load_config("tiny", ["--model.hidden_act=relu"])
    assert model_changes(saved, other) == ["model.hidden_act: checkpoint 'gelu', now 'relu'"]
