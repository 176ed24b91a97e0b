import json

import pytest
import torch
from transformers import AutoConfig

import retnet  # noqa: F401
from retnet.model import PRESETS, RetNetConfig


def test_defaults_follow_the_paper():
    config = RetNetConfig.from_preset("retnet-1.3b")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 24, 8)
    assert config.head_dim == 256  # the paper's key head dim
    assert config.value_head_dim * config.num_attention_heads == 2 * config.hidden_size
    assert config.intermediate_size == 2 * config.hidden_size
    assert config.norm_type == "layernorm" and config.use_output_gate and config.use_head_norm
    assert config.decay_schedule == "paper"
    # γ_h = 1 − 2^(−5−h)
    gammas = torch.tensor(config.log_decays(), dtype=torch.float64).exp()
    expected = 1 - 2.0 ** (-5 - torch.arange(8, dtype=torch.float64))
    torch.testing.assert_close(gammas, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_valid_configs(name):
    config = RetNetConfig.from_preset(name)
    assert config.hidden_size % config.num_attention_heads == 0


def test_paper_sizes():
    assert RetNetConfig.from_preset("retnet-2.7b").head_dim == 256
    big = RetNetConfig.from_preset("retnet-6.7b")
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.head_dim) == (4096, 32, 16, 256)


def test_log_decays_stay_below_one_in_fp32_for_many_heads():
    # 1 − 2^(−5−h) rounds to 1.0 in fp32 from head 20; its log must not.
    config = RetNetConfig(hidden_size=256, num_attention_heads=32, num_hidden_layers=1, vocab_size=10)
    log_decay = torch.tensor(config.log_decays(), dtype=torch.float32)
    assert (log_decay < 0).all()
    assert len(set(log_decay.tolist())) == 32


def test_linspace_schedule():
    config = RetNetConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=10,
                          decay_schedule="linspace", decay_exponent_min=5, decay_exponent_max=8)
    gammas = torch.tensor(config.log_decays(), dtype=torch.float64).exp()
    torch.testing.assert_close(gammas, 1 - 2.0 ** -torch.tensor([5.0, 6, 7, 8], dtype=torch.float64))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=100, num_attention_heads=3), "hidden_size"),
        (dict(hidden_act="not_an_activation"), "hidden_act"),
        (dict(hidden_act=["gelu", "relu", "gelu"]), "hidden_act"),
        (dict(hidden_act_kwargs=[{}, {}, {}]), "hidden_act_kwargs"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(intermediate_size=-5), "intermediate_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(retention_mode="magic"), "retention_mode"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(decay_schedule="cosine"), "decay_schedule"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(head_dim=15), "head_dim"),
        (dict(value_factor=0.3), "value_factor"),
        (dict(dropout=1.5), "dropout"),
        (dict(hidden_act="smelu", hidden_act_kwargs={"beta": -1.0}), "hidden_act"),
        (dict(use_xpos=True, xpos_scale_base=0), "xpos_scale_base"),
        (dict(use_xpos=True, xpos_scale_base=float("nan")), "xpos_scale_base"),
        (dict(initializer_range=-0.02), "initializer_range"),
        (dict(pad_token_id=10), "pad_token_id"),
        # A negative id indexes the embedding from its end, but generate pads finished rows with it: IndexError.
        (dict(pad_token_id=-1), r"pad_token_id.*-1"),
        # A string is truthy; only real bools (JSON true/false) are accepted for the switches.
        (dict(use_head_norm="no"), r"use_head_norm.*'no'"),
        (dict(use_xpos=1), r"use_xpos.*1"),
        (dict(tie_word_embeddings="false"), r"tie_word_embeddings.*'false'"),
        # Numbers given as strings (or bools) are refused by name, not with a bare TypeError.
        (dict(value_factor="2"), r"value_factor.*'2'"),
        (dict(value_factor=True), r"value_factor.*True"),
        (dict(rms_norm_eps="1e-6"), r"rms_norm_eps.*'1e-6'"),
        (dict(dropout="0.1"), r"dropout.*'0.1'"),
        (dict(hidden_size="64"), r"hidden_size.*'64'"),
        (dict(pad_token_id="3"), r"pad_token_id.*'3'"),
        (dict(rope_theta=float("inf")), r"rope_theta.*inf"),
        (dict(rope_theta=float("nan")), r"rope_theta.*nan"),
        # Beyond the retention ops' largest head dim (512) nothing could run it, on CPU or GPU.
        (dict(num_attention_heads=1, head_dim=514), r"head_dim.*<= 512.*514"),
        (dict(num_attention_heads=1, hidden_size=300, value_factor=2), r"value_factor.*now 600.*<= 512"),
        # Neither one dict nor a list of them: a string was read character by character, "" built no layer.
        (dict(hidden_act_kwargs="alpha=0.2"), r"hidden_act_kwargs.*'alpha=0.2'"),
        (dict(hidden_act_kwargs=""), r"hidden_act_kwargs.*''"),
        (dict(hidden_act_kwargs=3), r"hidden_act_kwargs.*3"),
        (dict(hidden_act_kwargs=[{}, "beta=2"]), r"hidden_act_kwargs.*\[\{\}, 'beta=2'\]"),
        (dict(eos_token_id="x"), r"eos_token_id.*'x'"),
        (dict(eos_token_id=[1, "2"]), r"eos_token_id.*\[1, '2'\]"),
        (dict(eos_token_id=True), r"eos_token_id.*True"),
        (dict(eos_token_id=10), r"eos_token_id.*10"),
        (dict(bos_token_id=1.0), r"bos_token_id.*1.0"),
        (dict(bos_token_id=-1), r"bos_token_id.*-1"),
        # 2^−1e−300 rounds to 1: γ = 0, whose log (the first forward's) is a bare "math domain error".
        (dict(decay_schedule="linspace", decay_exponent_min=1e-300), r"decay_exponent_min.*1e-300"),
    ],
)
def test_invalid_configs_name_the_field_and_value(overrides, field):
    settings = dict(vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    settings.update(overrides)
    with pytest.raises(ValueError, match=field):
        RetNetConfig(**settings)


def test_bad_config_file_is_refused_at_load(tmp_path):
    config = RetNetConfig(vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["num_attention_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"hidden_size.*64"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("override", [dict(num_attention_heads=5), dict(chunk_size=0), dict(hidden_act="nope")])
def test_from_pretrained_overrides_are_validated(tmp_path, override):
    # transformers applies from_pretrained's keyword overrides after building (and validating) the config
    RetNetConfig(vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path)
    field = next(iter(override))
    with pytest.raises(ValueError, match=field if field != "num_attention_heads" else "hidden_size"):
        AutoConfig.from_pretrained(tmp_path, **override)


def test_null_activation_parameters_in_a_list_build_a_model():
    from retnet.model import RetNetForCausalLM

    config = RetNetConfig(vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          hidden_act=["smelu", "gelu"], hidden_act_kwargs=[None, {}])
    assert type(RetNetForCausalLM(config).model.layers[0].mlp.act_fn).__name__ == "SmeLU"


def test_auto_config_roundtrip(tmp_path):
    config = RetNetConfig(vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          hidden_act=["sau", "identity"], hidden_act_kwargs=[{"alpha": 0.2}, {}])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RetNetConfig)
    assert loaded.hidden_act == ["sau", "identity"]
    assert loaded.layer_activations == [("sau", {"alpha": 0.2}), ("identity", {})]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("chunk_size", 0, r"chunk_size.*0"),
        ("num_attention_heads", 7, r"hidden_size.*num_attention_heads=7"),
        ("head_dim", 15, r"head_dim.*15"),
        ("use_xpos", "yes", r"use_xpos.*'yes'"),
    ],
)
@pytest.mark.parametrize("model_class", ["RetNetForCausalLM", "RetNetModel"])
def test_config_mutated_after_construction_is_revalidated_by_the_model(field, value, message, model_class):
    import retnet.model as model_module

    config = RetNetConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        getattr(model_module, model_class)(config)


def test_a_model_whose_config_would_not_load_is_refused_before_saving(tmp_path):
    from retnet.model import RetNetForCausalLM

    model = RetNetForCausalLM(RetNetConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           pad_token_id=80))
    # transformers only warns that the pad id is now outside the vocabulary; the model still runs.
    model.resize_token_embeddings(50)
    with pytest.raises(ValueError, match=r"save_pretrained.*pad_token_id.*80"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    model.config.pad_token_id = 0
    model.save_pretrained(tmp_path)
    assert RetNetForCausalLM.from_pretrained(tmp_path).config.vocab_size == 50


def test_from_pretrained_still_loads_with_transformers_own_settings(tmp_path):
    from retnet.model import RetNetForCausalLM

    config = RetNetConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    RetNetForCausalLM(config).save_pretrained(tmp_path)
    # transformers sets _attn_implementation, dtype and architectures on the config while loading.
    model = RetNetForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config.architectures == ["RetNetForCausalLM"]
    with pytest.raises(ValueError, match=r"chunk_size.*0"):
        RetNetForCausalLM.from_pretrained(tmp_path, chunk_size=0)


def test_the_configs_head_dim_limit_is_the_kernels():
    from retnet.kernels.checks import MAX_HEAD_DIM
    from retnet.model.configuration_retnet import MAX_HEAD_DIM as CONFIG_MAX_HEAD_DIM

    assert CONFIG_MAX_HEAD_DIM == MAX_HEAD_DIM


def test_special_token_ids_within_the_vocabulary_are_accepted():
    config = RetNetConfig(vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          bos_token_id=0, eos_token_id=[9, 1], pad_token_id=2)
    assert config.eos_token_id == [9, 1]


@pytest.mark.parametrize("hidden_size, heads, value_factor, value_head_dim",
                         [(1600, 8, 1.1, 220), (1440, 8, 0.7, 126), (800, 8, 2.3, 230), (640, 8, 1.1, 88)])
def test_value_factor_is_not_refused_for_float_rounding(hidden_size, heads, value_factor, value_head_dim):
    # 1600 * 1.1 is 1760.0000000000002 and 1440 * 0.7 is 1007.9999999999999 in floating point: 1760 and 1008
    # value dims, split evenly over 8 heads.
    config = RetNetConfig(vocab_size=10, hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=heads,
                          value_factor=value_factor)
    assert config.value_head_dim == value_head_dim
    with pytest.raises(ValueError, match=r"value_factor.*1.0001"):  # not a whole number of value dims
        RetNetConfig(vocab_size=10, hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=heads,
                     value_factor=1.0001)
