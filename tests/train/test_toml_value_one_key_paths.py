"""An override value that ends its line and writes more TOML (an injected table or key) is no value: a whole-table
override refused it, but ``--section.table.KEY`` and a list field read its first line and dropped the rest
without a word (``--data.mixture.code=0.5\\nweight = 2`` trained with weight 0.5)."""

import pytest

from retnet.train.config import ConfigError, load_config


@pytest.mark.parametrize("overrides, field", [
    (["--lora.rank=4", '--lora.target_modules=["q_proj"]\ny = 2'], "lora.target_modules"),
    (["--model.extra.use_xpos=true\n[x]"], "use_xpos"),
    (['--data.mixture.code={dataset = "src", weight = 1}\n[x]'], "data.mixture.code"),
    (["--data.mixture.code=0.5\nweight = 2"], "data.mixture.code"),
])
def test_a_value_with_more_toml_after_it_is_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config("tiny", overrides)


def test_one_line_values_are_still_read_as_toml():
    config = load_config("tiny", ["--lora.rank=4", '--lora.target_modules=["q_proj"]  # a comment',
                                  "--model.extra.use_xpos=true", "--data.mixture.code=0.5"])
    assert config.lora.target_modules == ["q_proj"]
    assert config.model.extra == {"use_xpos": True}
    assert config.data.mixture["code"]["weight"] == 0.5
