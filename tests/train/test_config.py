"""Config parsing, overrides, validation; the schedule, FLOPs and optimizer groups."""

import math
import re

import pytest

from retnet.train.config import ConfigError, build_config, load_config, parse_overrides, preset_names
from retnet.train.flops import flops_per_token
from retnet.train.optim import get_lr, no_decay_parameter_names


def test_presets_ship_and_load():
    assert {"tiny", "small", "retnet-1.3b", "retnet-2.7b", "retnet-6.7b"} <= set(preset_names())
    for name in preset_names():
        config = load_config(name)
        assert config.model.preset in ("tiny", "small", name)
    assert load_config("retnet-6.7b").train.parallelism == "fsdp"


def test_overrides_are_coerced_to_field_types():
    config = load_config("tiny", ["--optim.lr=1e-3", "--train.steps", "7", "--optim.warmup_steps=2",
                                  "--train.compile=true", "--data.tokenizer=none", "--model.hidden_size=64",
                                  "--model.extra.use_xpos=true", "--model.extra.rope_theta=500.0"])
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float)
    assert config.train.steps == 7 and config.train.compile is True
    assert config.data.tokenizer is None and config.model.hidden_size == 64
    assert config.model.overrides() == {"hidden_size": 64, "use_xpos": True, "rope_theta": 500.0}
    assert config.to_dict()["optim"]["lr"] == 1e-3


def test_toml_file_and_int_for_float(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optim]\nlr = 1\n[train]\nsteps = 3\nwarmup_steps_missing = 1\n')
    with pytest.raises(ConfigError, match=r"train\.warmup_steps_missing"):
        load_config(str(path))
    path.write_text('[optim]\nlr = 1\nwarmup_steps = 2\n[train]\nsteps = 3\n')
    config = load_config(str(path))
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)


@pytest.mark.parametrize("override, key", [
    ("--optim.learning_rate=1", "optim.learning_rate"),
    ("--trainer.steps=1", "trainer"),
    ("--model.extra=1", "model.extra"),
    ("--model.extra.use_xpso=true", "model.extra.use_xpso"),  # RetNetConfig itself would keep it silently
])
def test_unknown_keys_are_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [override])


@pytest.mark.parametrize("override, key", [
    ("--optim.lr=fast", "optim.lr"),
    ("--train.steps=1.5", "train.steps"),
    ("--train.compile=maybe", "train.compile"),
])
def test_wrong_types_are_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [override])


def test_toml_wrong_type_is_refused():
    with pytest.raises(ConfigError, match=r"train\.steps expects int; got str"):
        build_config({"train": {"steps": "ten"}})
    with pytest.raises(ConfigError, match=r"train\.steps expects int; got bool"):
        build_config({"train": {"steps": True}})


@pytest.mark.parametrize("override, key", [
    ("--optim.lr=-1", "optim.lr"),
    ("--train.parallelism=zero3", "train.parallelism"),
    ("--optim.schedule=step", "optim.schedule"),
    ("--model.preset=huge", "model.preset"),
    ("--data.val_fraction=0.9", "data.val_fraction"),
    ("--train.global_batch_size=10", "train.global_batch_size"),  # micro 16 in tiny
    ("--optim.lr=nan", "optim.lr"),
    ("--optim.grad_clip=nan", "optim.grad_clip"),  # would disable clipping without a word
    ("--logging.peak_flops=inf", "logging.peak_flops"),
    ("--train.seed=-1", "train.seed"),  # the block permutation's seed: a ValueError at the first step
    (f"--train.seed={2**64}", "train.seed"),  # too large for torch.manual_seed
    ("--checkpoint.layout=zip", "checkpoint.layout"),
])
def test_invalid_values_name_the_field(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [override])


def test_batch_that_does_not_divide_across_ranks():
    config = load_config("tiny", ["--train.global_batch_size=48", "--train.micro_batch_size=8"])
    assert config.train.grad_accum_steps(1) == 6 and config.train.grad_accum_steps(2) == 3
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(48\).*8 × 4 = 32"):
        config.train.grad_accum_steps(4)


def test_parse_overrides_and_bad_arguments():
    assert parse_overrides(["--a.b=1", "--c.d", "x=y"]) == [("a.b", "1"), ("c.d", "x=y")]
    with pytest.raises(ConfigError, match="--steps"):
        parse_overrides(["--steps=3"])
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="neither a TOML file nor a preset"):
        load_config("no-such-config")


def test_lr_schedule():
    optim = load_config("tiny", ["--optim.lr=1.0", "--optim.min_lr=0.1", "--optim.warmup_steps=10"]).optim
    assert get_lr(0, optim, 110) == pytest.approx(1 / 10)
    assert get_lr(9, optim, 110) == 1.0  # the last warmup step is the peak
    assert get_lr(59, optim, 110) == pytest.approx(0.55)  # halfway from the peak (step 9) to the end (109)
    assert get_lr(109, optim, 110) == 0.1
    linear = load_config("tiny", ["--optim.lr=1.0", "--optim.min_lr=0.0", "--optim.warmup_steps=0",
                                  "--optim.schedule=linear"]).optim
    assert get_lr(0, linear, 101) == pytest.approx(1.0)
    assert get_lr(50, linear, 101) == pytest.approx(0.5)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("warmup, steps", [(0, 1), (0, 7), (1, 7), (3, 7), (6, 7), (30, 600), (375, 25_000)])
def test_lr_schedule_ends_at_min_lr_on_the_final_step(schedule, warmup, steps):
    """Steps are 0-based: the final one is ``steps - 1``, and it runs at ``min_lr`` exactly (not one step's
    decay above it). The warmup climbs to ``lr`` on its last step and the decay never rises."""
    optim = load_config("tiny", [f"--optim.warmup_steps={warmup}", f"--optim.schedule={schedule}"]).optim
    lrs = [get_lr(step, optim, steps) for step in range(steps)]
    if steps > 1:
        assert lrs[-1] == optim.min_lr
    assert max(lrs) == pytest.approx(optim.lr)
    peak = max(warmup - 1, 0)
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert all(0 < lr <= optim.lr for lr in lrs)


def test_warmup_longer_than_the_run_is_refused():
    """A warmup of more steps than the run has would stop short of ``optim.lr``."""
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps must be <= train\.steps \(10\).*got 11"):
        load_config("tiny", ["--train.steps=10", "--optim.warmup_steps=11"])
    config = load_config("tiny", ["--train.steps=10", "--optim.warmup_steps=10"])
    assert get_lr(9, config.optim, config.train.steps) == config.optim.lr


def test_flops_and_no_decay_groups():
    import retnet  # noqa: F401
    from retnet.model import RetNetConfig, RetNetForCausalLM

    config = RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=300)
    model = RetNetForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(config, 64)
    assert 6 * (n - 300 * 32) < flops < 6 * n * 2 and math.isfinite(flops)
    skip = no_decay_parameter_names(model)
    assert "model.embed_tokens.weight" in skip and "model.norm.weight" in skip
    decayed = [n for n, p in model.named_parameters() if n not in skip]
    assert decayed and all(p.ndim == 2 for n, p in model.named_parameters() if n in decayed)


@pytest.mark.parametrize("extra", [{}, {"use_output_gate": False}, {"ffn_glu": True}])
def test_flops_count_every_projection_the_model_has(extra):
    """6 FLOPs per token per Linear weight (lm_head counted even when tied), plus the retention term."""
    from torch import nn

    import retnet  # noqa: F401
    from retnet.model import RetNetConfig, RetNetForCausalLM

    # (chunkwise: on a CPU auto would run 64 tokens in the parallel form, test_mfu_retention_form_paths.py)
    config = RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=300, retention_mode="chunkwise", **extra)
    model = RetNetForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    heads, k_dim, v_dim, chunk = 2, config.head_dim, config.value_head_dim, min(config.chunk_size, 64)
    retention = 2 * heads * (4 * k_dim * v_dim + 2 * chunk * (k_dim + v_dim))
    assert flops_per_token(config, 64) == pytest.approx(6 * linear + 3 * retention)


def test_a_vocabulary_too_small_for_the_trained_bpe_is_refused_by_name(tmp_path, capsys):
    """Without data.tokenizer a byte-level BPE of model.vocab_size tokens is trained: it needs the 256 bytes and
    its 2 special tokens. A smaller size was a bare ValueError traceback from the tokenizer trainer, after the
    dataset had been read."""
    from retnet.train.__main__ import EXIT_CONFIG, main

    with pytest.raises(ConfigError, match=r"model\.vocab_size must be >= 258 .*data\.tokenizer.*got 257"):
        load_config("tiny", ["--model.vocab_size=257"])
    assert load_config("tiny", ["--model.vocab_size=258"]).model.vocab_size == 258
    # with a tokenizer given, vocab_size pads the embedding; the trainer checks it against the tokenizer's size
    assert load_config("tiny", ["--model.vocab_size=100", "--data.tokenizer=tok"]).model.vocab_size == 100

    out = tmp_path / "run"
    assert main(["--config", "tiny", "--model.vocab_size=100", f"--train.output_dir={out}"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "model.vocab_size" in err and "100" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("--model.num_attention_heads=3", r"hidden_size must be divisible by num_attention_heads=3; got 128"),
    ("--model.dropout=1.5", r"dropout must be in \[0, 1\); got 1\.5"),
    ("--model.hidden_act=nope", r"hidden_act"),
    ("--model.extra.vocab_size=300", r"model\.extra\.vocab_size.*model\.vocab_size"),
    ("--model.extra.eos_token_id=3", r"model\.extra\.eos_token_id.*tokenizer"),
])
def test_a_model_that_cannot_be_built_is_refused_at_load(override, message, tmp_path, capsys):
    """The model is built after the dataset has been read and tokenized (hours for a large one): a model setting
    it refuses must be refused when the config is loaded, with the field named."""
    from retnet.train.__main__ import EXIT_CONFIG, main

    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])
    out = tmp_path / "run"
    assert main(["--config", "tiny", override, f"--train.output_dir={out}", f"--data.cache_dir={tmp_path}"]) \
        == EXIT_CONFIG
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("token*"))


def test_a_stream_needs_validation_documents():
    """A stream's validation split is its first data.val_documents documents; 0 was taken as 1."""
    with pytest.raises(ConfigError, match=r"data\.val_documents must be > 0 with data\.streaming.*; got 0"):
        load_config("tiny", ["--data.streaming=true", "--data.val_documents=0"])
    assert load_config("tiny", ["--data.val_documents=0"]).data.val_documents == 0  # unused by packed data


def test_an_empty_tokenizer_path_is_no_tokenizer():
    """TOML has no null: ``tokenizer = ""`` is how a file says "train a BPE", as the trainer reads it. The
    vocabulary check (and what a resume compares) must read it so too."""
    from retnet.train.config import data_changes

    with pytest.raises(ConfigError, match=r"model\.vocab_size must be >= 258"):
        build_config({"data": {"tokenizer": ""}, "model": {"vocab_size": 100}})
    saved = build_config({"data": {"tokenizer": ""}, "model": {"vocab_size": 300}}).to_dict()
    now = build_config({"data": {"tokenizer": ""}, "model": {"vocab_size": 400}})
    assert data_changes(saved, now, tokenizer_reused=False) == ["model.vocab_size: checkpoint 300, now 400"]


def test_an_override_without_its_value_does_not_take_the_next_override_as_it():
    """``--train.output_dir --train.steps=5`` (a value forgotten) set output_dir to the text "--train.steps=5",
    silently, and dropped the steps override."""
    with pytest.raises(ConfigError, match=r"--train\.output_dir.*no value.*--train\.steps=5"):
        parse_overrides(["--train.output_dir", "--train.steps=5"])
    with pytest.raises(ConfigError, match=r"--train\.compile.*no value.*--optim\.lr=1e-3.*=true"):
        load_config("tiny", ["--train.compile", "--optim.lr=1e-3"])
    assert parse_overrides(["--optim.lr", "-1e-3"]) == [("optim.lr", "-1e-3")]  # (refused later, by value)


@pytest.mark.parametrize("args, suggestion", [
    (["--optim.lrr=1"], r"did you mean 'optim\.lr'"),
    (["--optm.lr=1"], r"did you mean 'optim'"),
    (["--train.warmup_steps=5"], r"did you mean 'optim\.warmup_steps'"),  # another section's field
    (["--steps=5"], r"did you mean --train\.steps"),
    (["--lr", "1e-3"], r"did you mean --optim\.lr"),
    (["--conifg", "small"], r"did you mean --config\?"),
])
def test_a_misspelt_key_is_refused_with_the_key_it_most_likely_meant(args, suggestion):
    with pytest.raises(ConfigError, match=suggestion):
        load_config("tiny", args)


def test_a_misspelt_key_in_a_toml_file_is_refused_with_the_key_it_most_likely_meant():
    with pytest.raises(ConfigError, match=r"unknown config key train\.step\b.*did you mean 'train\.steps'"):
        build_config({"train": {"step": 3}})
    with pytest.raises(ConfigError, match=r"unknown config section 'optimizer'.*did you mean 'optim'"):
        build_config({"optimizer": {"lr": 1e-3}})


def test_home_in_the_output_and_resume_paths_is_expanded(monkeypatch, tmp_path):
    """``output_dir = "~/runs/x"`` in a TOML file (a shell expands no ~ there, nor after ``=`` in an argument)
    made a directory named ``~`` in the working directory, where every other path setting reads the home one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config("tiny", ["--train.output_dir=~/runs/x", "--train.resume=~/runs/y/checkpoints/step_1"])
    assert config.train.output_dir == str(tmp_path / "runs" / "x")
    assert config.train.resume == str(tmp_path / "runs" / "y" / "checkpoints" / "step_1")
    assert load_config("tiny", ["--train.resume=auto"]).train.resume == "auto"


@pytest.mark.parametrize("override, key", [
    ("--data.text_field=", r"data\.text_field"),
    ("--data.split=", r"data\.split"),
])
def test_an_empty_column_or_split_is_refused_at_load(override, key):
    """An empty column or split name cannot be read: it was refused only once the dataset had been loaded, in
    words about a missing column or a hub split."""
    with pytest.raises(ConfigError, match=key + r" must .*; got ''"):
        load_config("tiny", [override])


def test_an_empty_dataset_configuration_name_is_no_name():
    """TOML has no null: ``name = ""`` is how a file leaves the hub configuration out (as ``tokenizer = ""``); local
    files refused it as a configuration they do not have."""
    assert build_config({"data": {"name": ""}}).data.name is None



@pytest.mark.parametrize("value", ["true", "True", "latest", "None", "AUTO", "false", "1"])
def test_a_resume_keyword_of_another_launcher_is_refused_at_load(value, tmp_path, monkeypatch):
    """``--train.resume=true`` (HF's resume_from_checkpoint=True), ``latest`` or ``None`` was taken as the path of a
    checkpoint directory named so, and refused only after the output directory had been made, without the
    setting's name."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"train\.resume must be 'auto', 'none' or a checkpoint directory.*"
                                          rf"got '{value}'"):
        load_config("tiny", [f"--train.resume={value}"])
    (tmp_path / value).mkdir()  # a checkpoint directory may be named so
    assert load_config("tiny", [f"--train.resume={value}"]).train.resume == value


@pytest.mark.parametrize("overrides, key", [
    (["--data.split=validation"], r"data\.split"),
    (["--data.name=wikitext-2-raw-v1"], r"data\.name"),
    (["--data.mixture.std={dataset=\"stdlib\", weight=1, split=\"test\"}"], r"data\.mixture\.std\.split"),
    (["--data.mixture.stdlib=1", "--data.name=en"], r"data\.name"),
    (["--data.mixture.notes.jsonl=1", "--data.mixture.lib={dataset=\"stdlib\", weight=1, name=\"x\"}"],
     r"data\.mixture\.lib\.name"),  # (a label may hold dots)
])
def test_a_hub_selection_on_the_stdlib_corpus_is_refused_not_ignored(overrides, key):
    """``stdlib`` has no splits nor configurations: ``--data.split=validation`` trained on the whole corpus, silently
    (local files refuse it, once read)."""
    with pytest.raises(ConfigError, match=key + r" .*'stdlib'"):
        load_config("tiny", overrides)


def test_a_flat_toml_file_is_refused_with_the_table_each_key_belongs_in():
    """A key above every table (``steps = 100``, as a flat nanoGPT-style config writes it) was refused as an unknown
    section, without a word about the table it belongs in."""
    with pytest.raises(ConfigError, match=r"unknown config section 'steps' .*did you mean 'train\.steps'"):
        build_config({"steps": 100})


def test_a_glob_the_shell_expanded_is_refused_with_how_to_quote_it():
    """``--data.dataset corpus/*.jsonl`` unquoted reaches the launcher as one path per file: the second was refused
    as a malformed override, with no word of the shell or of the setting it came after."""
    with pytest.raises(ConfigError, match=r"got 'c/b\.jsonl'.*--data\.dataset.*quote.*--data\.dataset='c/\*\.jsonl'"):
        parse_overrides(["--data.dataset", "c/a.jsonl", "c/b.jsonl"])
    with pytest.raises(ConfigError, match=r"got 'c/b\.jsonl'.*--data\.dataset.*quote"):
        parse_overrides(["--data.dataset=c/a.jsonl", "c/b.jsonl"])


@pytest.mark.parametrize("overrides, key", [
    (["--model.extra.hidden_size=64", "--model.hidden_size=32"], "hidden_size"),  # the extra one won, silently
    (["--model.extra.num_hidden_layers=4", "--model.init_from=runs/base/export"], "num_hidden_layers"),
    (["--model.extra.dropout=0.1", "--model.dropout=0"], "dropout"),
])
def test_a_model_field_set_through_model_extra_is_refused_naming_its_own_setting(overrides, key):
    """``model.extra`` took ``[model]``'s own fields too: over ``model.hidden_size`` without a word, and past the
    refusal of shape settings beside ``model.init_from`` (refused only once its weights did not load)."""
    with pytest.raises(ConfigError, match=rf"model\.extra\.{key} cannot be set; use model\.{key}"):
        load_config("tiny", overrides)
    # alone, and without init_from for a shape, it is the same setting (DPO reads model.extra.dropout so)
    assert load_config("tiny", [overrides[0]]).model.overrides()[key] == pytest.approx(float(overrides[0].split("=")[1]))


@pytest.mark.parametrize("name, text", [("config.json", '{"train": {"steps": 3}}'),
                                        ("run.yaml", "train:\n  steps: 3\n")])
def test_a_config_file_of_another_format_is_refused_saying_configs_are_toml(name, text, tmp_path):
    """A run's own ``config.json`` (or a YAML file, as other launchers take) was refused as "invalid TOML: Invalid
    statement (at line 1, column 1)", which says nothing of the format expected."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(name) + r".*is not TOML.*\[train\]"):
        load_config(str(path))


def test_a_config_file_written_with_a_byte_order_mark_loads(tmp_path):
    """A Windows editor's UTF-8 starts with a BOM, which was refused as "invalid TOML: Invalid statement (at line 1,
    column 1)"; a byte that is no UTF-8 after one is still refused at its offset in the file."""
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xef\xbb\xbf[optim]\nlr = 2e-3\n[train]\nsteps = 300\n")
    config = load_config(str(path))
    assert config.optim.lr == 2e-3 and config.train.steps == 300
    path.write_bytes(b"\xef\xbb\xbf[optim]\nlr = 2e-3 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"--config .*run.toml' is not UTF-8 text, as TOML is: .* at byte 26$"):
        load_config(str(path))


@pytest.mark.parametrize("arg, meant", [
    ("--learning_rate=3e-4", "--optim.lr"),  # HF TrainingArguments
    ("--max_steps=100", "--train.steps"),
    ("--per_device_train_batch_size=8", "--train.micro_batch_size"),
    ("--gradient_accumulation_steps=4", "--train.global_batch_size"),
    ("--max_iters=100", "--train.steps"),  # nanoGPT
    ("--block_size=512", "--data.seq_len"),
    ("--n_embd=256", "--model.hidden_size"),
])
def test_another_launchers_setting_is_refused_with_this_ones_name(arg, meant):
    with pytest.raises(ConfigError, match=rf"did you mean {re.escape(meant)}\b"):
        parse_overrides([arg])


def test_a_fine_tunes_lr_below_the_presets_min_lr_says_what_to_set():
    # small.toml's min_lr is 1e-4: the README's fine-tunes at 5e-5 were refused with no hint of the fix
    with pytest.raises(ConfigError, match=r"optim.min_lr.*needs optim.min_lr set too"):
        load_config("small", ["--optim.lr=5e-5"])
    assert load_config("small", ["--optim.lr=5e-5", "--optim.min_lr=0"]).optim.min_lr == 0


def test_a_bare_number_beside_a_configured_mixture_source_is_refused_with_the_whole_source(tmp_path):
    """``--data.mixture.code=2`` beside a file's source ``code`` of another dataset replaced that source with a
    dataset named "code" (a bare number is short for {dataset = <label>, weight = <number>}), silently, where its
    weight was meant; the refusal gives the source whole with the new weight, which loads."""
    import shlex

    path = tmp_path / "mix.toml"
    path.write_text('[data.mixture]\ncode = {dataset = "stdlib", weight = 0.3, text_field = "body"}\nweb = 1\n')
    with pytest.raises(ConfigError, match=r"data\.mixture\.code: --data\.mixture\.code=2 .* would replace the "
                                          r"configured source 'code', \{dataset=\"stdlib\"") as refused:
        load_config(str(path), ["--data.mixture.code=2"])
    suggested = shlex.split(str(refused.value).rsplit("set it whole: ", 1)[1])
    assert suggested == ['--data.mixture.code={dataset="stdlib", weight=2, text_field="body"}']
    assert load_config(str(path), suggested).data.mixture["code"] == {"dataset": "stdlib", "weight": 2,
                                                                      "text_field": "body"}
    # the shorthand's own source, and a bare weight, take a new number as before
    path.write_text('[data.mixture]\ncode = {dataset = "code", weight = 0.3}\nstdlib = 1\n')
    mixture = load_config(str(path), ["--data.mixture.code=2", "--data.mixture.stdlib=3"]).data.mixture
    assert mixture == {"code": {"dataset": "code", "weight": 2}, "stdlib": {"dataset": "stdlib", "weight": 3}}


def test_a_dotted_mixture_label_in_toml_is_refused_with_how_to_quote_it():
    """TOML reads ``notes.jsonl = 2`` under [data.mixture] as the key ``jsonl`` of a source ``notes``: refused as
    "unknown keys ['jsonl']" without a word of the quotes the label needs."""
    import tomllib

    with pytest.raises(ConfigError, match=r"data\.mixture\.notes has unknown keys \['jsonl'\] \(a label holding a "
                                          r"dot is quoted in TOML: \"notes\.jsonl\" = 2\)"):
        build_config(tomllib.loads("[data.mixture]\nnotes.jsonl = 2\n"))
    quoted = build_config(tomllib.loads('[data.mixture]\n"notes.jsonl" = 2\n')).data.mixture
    assert quoted == {"notes.jsonl": {"dataset": "notes.jsonl", "weight": 2}}


def test_build_config_leaves_the_callers_dict_as_it_was():
    """An override of one key of a table (``model.extra.X``, ``data.mixture.X``) was set in the caller's own dict."""
    raw = {"model": {"extra": {"use_xpos": True}}, "data": {"mixture": {"a": 1}}}
    config = build_config(raw, [("model.extra.rope_theta", "5.0"), ("data.mixture.b", "2")])
    assert config.model.extra == {"use_xpos": True, "rope_theta": 5.0} and list(config.data.mixture) == ["a", "b"]
    assert raw == {"model": {"extra": {"use_xpos": True}}, "data": {"mixture": {"a": 1}}}
