"""Randomised differential tests of evaluation: ``retnet-eval``'s whole-document loss against a full forward over
model variants (xPos, retention modes, tied heads), what it refuses to load (a backbone, weights that do not match
config.json, a damaged file), a reward model's cut count, and ``retnet-lm-eval``'s reading of ``--model_args`` in
every form lm-eval's own parser takes."""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from retnet.train.evaluate import EXIT_USAGE, evaluate, main

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n",
         "for i in range(3):\n    print(i * 2)\n"] * 3


@pytest.fixture(scope="module")
def tokenizer():
    from retnet.tokenization import train_byte_level_bpe

    return train_byte_level_bpe(TEXTS, vocab_size=300, min_frequency=1)


def _config(tokenizer, **fields):
    from retnet.model import RetNetConfig

    values = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  chunk_size=16, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  initializer_range=0.2)
    return RetNetConfig(**{**values, **fields})


def _save(model, tokenizer, path: Path) -> Path:
    torch.manual_seed(0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_export(tokenizer, tmp_path_factory) -> Path:
    from retnet.model import RetNetForCausalLM

    torch.manual_seed(0)
    return _save(RetNetForCausalLM(_config(tokenizer)), tokenizer, tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS[:3]))
    return path


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*argv, "--no-progress", "--device", "cpu"])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Scoring: segments, refilled rows and position buckets against one full forward, over model variants
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_loss_and_buckets_equal_a_full_forward_over_model_variants(seed):
    from retnet.model import RetNetConfig, RetNetForCausalLM

    rng = random.Random(seed)
    torch.manual_seed(seed)
    vocab = rng.choice([50, 97])
    config = RetNetConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=rng.choice([1, 2]),
                          num_attention_heads=2, chunk_size=rng.choice([4, 16]), eos_token_id=0, initializer_range=0.2,
                          use_xpos=seed % 2 == 0, xpos_scale_base=rng.choice([8.0, 512.0]),
                          retention_mode=rng.choice(["auto", "parallel", "chunkwise", "recurrent"]),
                          tie_word_embeddings=rng.random() < 0.5, ffn_glu=rng.random() < 0.5,
                          norm_type=rng.choice(["layernorm", "rmsnorm"]))
    model = RetNetForCausalLM(config).eval()
    documents = [[0, *(rng.randrange(vocab) for _ in range(rng.choice([0, 1, rng.randint(2, 40), 150]))), 0]
                 for _ in range(rng.randint(1, 7))]
    edges = sorted(rng.sample(range(1, 160), rng.randint(1, 3)))
    sums, counts = [0.0] * (len(edges) + 1), [0] * (len(edges) + 1)
    with torch.no_grad():
        for ids in documents:
            row = torch.tensor(ids)[None]
            losses = F.cross_entropy(model(input_ids=row[:, :-1]).logits[0].float(), row[0, 1:], reduction="none")
            for position, loss in enumerate(losses.tolist()):
                bucket = sum(position >= edge for edge in edges)
                sums[bucket] += loss
                counts[bucket] += 1
    result = evaluate(model, documents, segment_tokens=rng.choice([1, 3, 16, 17, 1000]),
                      batch_size=rng.choice([1, 2, 3, 8]), position_edges=edges)
    assert result.tokens == sum(counts)
    assert result.loss == pytest.approx(sum(sums) / sum(counts), abs=2e-5)
    assert [row["tokens"] for row in result.by_position] == counts
    for row, total, count in zip(result.by_position, sums, counts):
        if count:
            assert row["loss"] == pytest.approx(total / count, abs=2e-5)


# ----------------------------------------------------------------------------------------------------------
# Loading: a model with no head to score with, or weights that are not those of config.json, is refused
# ----------------------------------------------------------------------------------------------------------
def test_a_backbone_export_is_refused_not_scored_with_a_random_head(tokenizer, docs, tmp_path):
    """A RetNetModel's export loaded through AutoModelForCausalLM with its lm_head started at random (or the tied
    embedding as a head it never trained), and retnet-eval printed that head's loss."""
    from retnet.model import RetNetModel

    for tied in (False, True):
        backbone = _save(RetNetModel(_config(tokenizer, tie_word_embeddings=tied)), tokenizer, tmp_path / f"bb{tied}")
        code, out, err = _run(["--model", str(backbone), "--dataset", str(docs), "--cache-dir", str(tmp_path / "c")])
        assert code == EXIT_USAGE and not out, err
        assert f"--model {str(backbone)!r} holds a RetNetModel" in err and "no head to score with" in err


def _edited_copy(export: Path, directory: Path, **fields) -> Path:
    import shutil

    shutil.copytree(export, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_weights_that_do_not_match_config_json_are_refused_by_name(lm_export, docs, tmp_path):
    """Missing weights were started at random and unexpected ones dropped without a word (a config.json of fewer
    layers scored a truncated model; a reward model's config over an LM's weights a random score head); other-shaped
    and damaged weights were tracebacks, not status 2 naming --model."""
    common = ["--dataset", str(docs), "--cache-dir", str(tmp_path / "cache")]
    fewer = _edited_copy(lm_export, tmp_path / "fewer", num_hidden_layers=1)
    code, _, err = _run(["--model", str(fewer), *common])
    assert code == EXIT_USAGE and "its weights do not match its config.json (unexpected: model.layers.1." in err, err

    # an LM's weights under a reward model's config.json: its score head is not in the file
    scoreless = _edited_copy(lm_export, tmp_path / "scoreless", architectures=["RetNetForSequenceClassification"],
                             id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "def", "chosen": " f(x)", "rejected": " pass"}) + "\n")
    code, _, err = _run(["--model", str(scoreless), "--dataset", str(pairs), "--cache-dir", str(tmp_path / "cache")])
    assert code == EXIT_USAGE and "missing: score.weight" in err, err

    wider = _edited_copy(lm_export, tmp_path / "wider", intermediate_size=96)
    code, _, err = _run(["--model", str(wider), *common])
    assert code == EXIT_USAGE and "Traceback" not in err, err
    assert "other-shaped: model.layers.0.mlp.down_proj.weight [32, 64] in the file, [32, 96] by config.json" in err

    damaged = _edited_copy(lm_export, tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    code, _, err = _run(["--model", str(damaged), *common])
    assert code == EXIT_USAGE and f"--model {str(damaged)!r} could not be loaded: SafetensorError" in err, err

    code, out, err = _run(["--model", str(lm_export), *common, "--json"])  # the export itself still scores
    assert code == 0 and json.loads(out)["documents"] == 3, err


def test_a_training_runs_output_dir_is_refused_naming_its_export(lm_export, docs, tmp_path):
    """A run's train.output_dir given for its export (its config.json the run's configuration, no model's) was
    refused as holding no tokenizer, "export the model with its tokenizer", or with transformers' words on
    converting a slow tokenizer (the run's tokenizer/ directory): the export it holds went unnamed."""
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"hidden_size": 32}, "train": {"output_dir": str(run)}}))
    shutil.copytree(lm_export, run / "tokenizer", ignore=shutil.ignore_patterns("model*", "config.json"))
    common = ["--dataset", str(docs), "--cache-dir", str(tmp_path / "cache")]
    code, _, err = _run(["--model", str(run), *common])
    assert code == EXIT_USAGE, err
    assert (f"--model {str(run)!r} is a training run's train.output_dir, not a model (its export, "
            f"{str(run / 'export')!r}, is not written yet") in err
    shutil.copytree(lm_export, run / "export")
    code, _, err = _run(["--model", str(run), *common])
    assert code == EXIT_USAGE and f"(did you mean {str(run / 'export')!r}, the run's export?)" in err, err
    code, _, err = _run(["--model", str(run / "export"), *common])
    assert code == 0, err


def test_a_dataset_of_whitespace_rows_says_they_are_no_documents(lm_export, tmp_path):
    """Rows of whitespace alone are no documents (as in training): the refusal said every value was empty."""
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({"text": text}) + "\n" for text in ("", " ", "\n\t", "\r\n")))
    code, _, err = _run(["--model", str(lm_export), "--dataset", str(blank), "--cache-dir", str(tmp_path / "cache")])
    assert code == EXIT_USAGE and "holds no documents (every 'text' value is empty or whitespace" in err, err


# ----------------------------------------------------------------------------------------------------------
# Reward model: the pairs cut by --seq-len are counted at the tokenizer's EOS
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_eos", ["none", "list"])
def test_cut_pairs_are_counted_whatever_the_configs_eos(tokenizer, tmp_path, config_eos):
    """The cut count read the model config's eos_token_id: unset, every cut pair went uncounted (no notice, "cut":
    0); a list (generate's form) counted a completion cut at one of its other ids as whole. The completions end
    with the tokenizer's EOS, what the trainer counts by."""
    from retnet.model import RetNetForSequenceClassification
    from retnet.train.evaluate_reward import read_pairs

    eos = tokenizer.eos_token_id
    rows = [{"prompt": "def f(x):", "chosen": " return x + 1\n    print(i * 2)", "rejected": " pass"},
            {"prompt": "import", "chosen": " os", "rejected": " os\nprint"},
            {"prompt": "class A:", "chosen": "\n    pass", "rejected": " import os\nprint(os.getcwd())"}]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = read_pairs(str(pairs_file), tokenizer, seq_len=8, cache_dir=tmp_path / "cache")
    last_tokens = {int(pairs.parts(i)[side][-1]) for i in range(len(pairs)) for side in (1, 2)}
    cut = sum(any(int(part[-1]) != eos for part in pairs.parts(i)[1:]) for i in range(len(pairs)))
    assert 0 < cut < len(rows)
    # a list holding the tokenizer's EOS and the last token of every cut completion
    config_eos_id = None if config_eos == "none" else [eos, *sorted(last_tokens - {eos})]
    reward = RetNetForSequenceClassification(_config(tokenizer, num_labels=1, eos_token_id=config_eos_id))
    export = _save(reward, tokenizer, tmp_path / "rm")
    code, out, err = _run(["--model", str(export), "--dataset", str(pairs_file), "--seq-len", "8", "--json",
                           "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, err
    assert json.loads(out)["cut"] == cut
    assert f"{cut} of {len(rows)} pairs were cut to --seq-len 8 before their EOS" in err


# ----------------------------------------------------------------------------------------------------------
# retnet-lm-eval: a reward model named in any form of --model_args lm-eval accepts is refused
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_and_lm_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("configs")
    for name, architecture in (("rm", "RetNetForSequenceClassification"), ("lm", "RetNetForCausalLM")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"model_type": "retnet", "architectures": [architecture]}))
    return root / "rm", root / "lm"


def _model_args_forms(value: str) -> list[list[str]]:
    """Every way argparse reads ``value`` into lm-eval's --model_args: the name or an abbreviation of it, with the
    value following or after "=", and -a with the value following, attached or after "="."""
    forms = [[name, value] for name in ("--model_args", "--model_arg", "--model_a", "--model_")]
    forms += [[f"{name}={value}"] for name in ("--model_args", "--model_arg", "--model_")]
    return [*forms, ["-a", value], [f"-a{value}"], [f"-a={value}"]]


def test_lm_eval_refuses_a_reward_model_in_every_form_of_model_args(reward_and_lm_dirs, tmp_path):
    """argparse takes a long option's unambiguous prefix (``--model_arg``) and a short option's attached value
    (``-apretrained=...``): lm-eval ran those with the reward model as an LM, score head dropped, without a word."""
    from retnet.harness import check_pretrained

    reward, lm = reward_and_lm_dirs
    for value in (f"pretrained={reward}", f"dtype=float32,pretrained={reward}", json.dumps({"pretrained": str(reward)})):
        for form in _model_args_forms(value):
            with pytest.raises(SystemExit, match="RetNetForSequenceClassification"):
                check_pretrained(["--model", "hf", *form, "--tasks", "x"])
    # model_args given in any of those forms replace the --config file's, whose reward model then does not run
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": "hf", "model_args": {"pretrained": str(reward)}}))
    for form in _model_args_forms(f"pretrained={lm}"):
        for config_form in (["-C", str(config)], [f"-C{config}"], [f"-C={config}"], ["--config", str(config)],
                            [f"--config={config}"]):
            check_pretrained([*config_form, *form, "--tasks", "x"])
    for config_form in ([f"-C{config}"], [f"-C={config}"]):
        with pytest.raises(SystemExit, match="RetNetForSequenceClassification"):
            check_pretrained(["--model", "hf", *config_form, "--tasks", "x"])


def test_model_args_read_as_lm_evals_own_parser_reads_them(reward_and_lm_dirs, monkeypatch):
    """Seeded argument lists (options in any order, several --model_args, abbreviations, attached values): the
    ``pretrained`` lm-eval's own parser ends with is among those retnet-lm-eval checks."""
    cli = pytest.importorskip("lm_eval._cli", reason="lm-eval's parser (the [eval] extra) is the reference")
    from retnet.harness import _pretrained_values

    names = ["--model_args", "--model_arg", "--model_a", "--model_", "-a"]
    checked = 0
    for seed in range(300):
        rng = random.Random(seed)
        pieces = [["--model", "hf"], ["--tasks", "x"], *rng.sample([["-b", "4"], ["--device", "cpu"], ["-s"]], 2)]
        for index in range(rng.choice([1, 2])):
            value = rng.choice([f"pretrained=P{index}", f"dtype=float32,pretrained=P{index}"])
            name = rng.choice(names)
            piece = rng.choice([[name, value], [f"{name}={value}"], [f"{name}{value}"] if name == "-a" else
                                [name, value, "trust_remote_code=False"]])
            pieces.append(piece)
        rng.shuffle(pieces)
        argv = [word for piece in pieces for word in piece]
        monkeypatch.setattr(sys, "argv", ["lm-eval", *argv])
        parsed = cli.HarnessCLI().parse_args()
        assert parsed.model_args["pretrained"] in _pretrained_values(argv), argv
        checked += 1
    assert checked == 300


def test_model_args_after_short_options_that_take_no_value(tmp_path):
    """argparse reads "-sa v" as "-s -a v" (-s, -w and -x take no value): lm-eval ran such a reward model as an LM."""
    from retnet.harness import _config_pretrained, _pretrained_values

    assert _pretrained_values(["-sa", "pretrained=A"]) == ["A"]
    assert _pretrained_values(["-wxapretrained=A"]) == ["A"]
    assert _pretrained_values(["-s"]) == [] and _pretrained_values(["-va"]) == []  # -v takes a value: "a"
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": "hf", "model_args": {"pretrained": "B"}}))
    assert _config_pretrained(["-sC", str(config)]) == ["B"]


@pytest.mark.parametrize("content", [b"", b"not a pickle"], ids=["empty", "garbage"])
def test_a_damaged_pytorch_model_bin_is_refused_by_name(lm_export, docs, tmp_path, content):
    """A hub repository without safetensors brings pytorch_model.bin: an empty or garbage one was an EOFError or
    UnpicklingError traceback."""
    damaged = _edited_copy(lm_export, tmp_path / "damaged")
    (damaged / "model.safetensors").unlink()
    (damaged / "pytorch_model.bin").write_bytes(content)
    code, _, err = _run(["--model", str(damaged), "--dataset", str(docs), "--cache-dir", str(tmp_path / "cache")])
    assert code == EXIT_USAGE and "Traceback" not in err and f"--model {str(damaged)!r} could not be loaded" in err, err
