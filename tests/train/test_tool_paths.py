"""The smaller command-line tools as a user runs them: retnet-convert-fla, the demo client, retnet-eval,
retnet-lm-eval's argument checks and the tokenizer helpers, on inputs off their main path. Each input used to
end in a traceback or a wrong answer."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import torch
from safetensors.torch import save_file

from retnet.model.convert_fla import main as convert_main
from retnet.serve import demo


def _fla_checkpoint(directory, hidden: int = 32, layers: int = 1) -> None:
    """A tiny random fla RetNet (config.json and weights), no fla needed."""
    fla = {"model_type": "retnet", "hidden_size": hidden, "num_heads": 2, "expand_k": 1.0, "expand_v": 2.0,
           "num_hidden_layers": layers, "vocab_size": 50, "tie_word_embeddings": True}
    weights = {"model.embeddings.weight": torch.randn(50, hidden), "model.norm.weight": torch.ones(hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        weights.update({
            p + "attn_norm.weight": torch.ones(hidden), p + "mlp_norm.weight": torch.ones(hidden),
            p + "attn.q_proj.weight": torch.randn(hidden, hidden), p + "attn.k_proj.weight": torch.randn(hidden, hidden),
            p + "attn.v_proj.weight": torch.randn(2 * hidden, hidden),
            p + "attn.g_proj.weight": torch.randn(2 * hidden, hidden),
            p + "attn.o_proj.weight": torch.randn(hidden, 2 * hidden), p + "attn.g_norm.weight": torch.ones(hidden),
            p + "mlp.gate_proj.weight": torch.randn(48, hidden), p + "mlp.up_proj.weight": torch.randn(48, hidden),
            p + "mlp.down_proj.weight": torch.randn(hidden, 48),
        })
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(fla))
    save_file(weights, directory / "model.safetensors")


# ----------------------------------------------------------------------------------------------------------
# retnet-convert-fla
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("under", [False, True])
def test_convert_fla_refuses_a_destination_that_is_a_file(tmp_path, capsys, under):
    # It converted the whole checkpoint, then died in mkdir with a FileExistsError (NotADirectoryError under
    # a file) traceback.
    _fla_checkpoint(tmp_path / "fla")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    destination = afile / "out" if under else afile
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(tmp_path / "fla"), str(destination)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"destination {str(destination)!r}" in err and ("a file" in err)
    assert afile.read_text() == "keep me"


def test_convert_fla_into_a_new_nested_directory_or_again_into_its_own_output_works(tmp_path):
    _fla_checkpoint(tmp_path / "fla")
    (tmp_path / "fla" / "tokenizer_config.json").write_text("{}")
    for _ in range(2):  # the second run overwrites every file of the first
        convert_main([str(tmp_path / "fla"), str(tmp_path / "a" / "b")])
    assert {path.name for path in (tmp_path / "a" / "b").iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"}


def test_convert_fla_refuses_a_destination_holding_another_models_files(tmp_path, capsys):
    # They stayed beside the converted weights: an earlier model's tokenizer.json was then loaded with them.
    _fla_checkpoint(tmp_path / "fla")
    (tmp_path / "fla" / "tokenizer.model").write_text("sentencepiece")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(tmp_path / "fla"), str(out)])
    assert exit_info.value.code == 2
    assert "would not overwrite (tokenizer.json)" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["tokenizer.json"]


def test_convert_fla_into_a_clone_of_a_hub_repository_works(tmp_path):
    # A clone's .git, README.md and .gitattributes are nothing transformers loads: no reason to refuse.
    _fla_checkpoint(tmp_path / "fla")
    out = tmp_path / "clone"
    (out / ".git").mkdir(parents=True)
    (out / "README.md").write_text("# model card")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs")
    convert_main([str(tmp_path / "fla"), str(out)])
    assert (out / "model.safetensors").is_file() and (out / "README.md").read_text() == "# model card"


# ----------------------------------------------------------------------------------------------------------
# python -m retnet.serve.demo
# ----------------------------------------------------------------------------------------------------------
def test_demo_with_a_missing_model_exits_2_naming_it(tmp_path, capsys):
    # create_app's StartupError escaped as a traceback (retnet-serve itself prints the one line and exits 2).
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--model", str(tmp_path / "nope"), "--port", "0", "--exit-after"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--model" in err and "nope" in err and "Traceback" not in err


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_demo_refuses_a_port_out_of_range_by_name(port, capsys):
    # 70000 reached socket.bind: an OverflowError traceback.
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--model", "unused", "--port", port])
    assert exit_info.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_demo_serves_an_ipv6_host():
    # An AF_INET socket cannot bind "::1" (gaierror), and "http://::1:8000" is no URL to httpx.
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6: the test needs ::1")
    port = demo.pick_port("::1", 0)
    url = httpx.URL(demo.base_url("::1", port) + "/health")
    assert url.host == "::1" and url.port == port
    assert demo.base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"


# ----------------------------------------------------------------------------------------------------------
# retnet.tokenization
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_render():
    """The default chat template as transformers renders it (the reward trainer's and the server's render)."""
    from retnet.tokenization import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(["find x, let me look."] * 4, vocab_size=300)
    return lambda messages, **options: tokenizer.apply_chat_template(messages, tokenize=False, **options)


def test_a_tool_call_completion_continues_a_prefilled_assistant_turn(chat_render):
    # A completion of content None that only calls a tool hit `str + None`: a TypeError, and its calls would
    # have been dropped from the merged message anyway.
    from retnet.tokenization import render_pair

    call = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}
    prompt = [{"role": "user", "content": "find x"}, {"role": "assistant", "content": "Let me look."}]
    head, text = render_pair(prompt, [[{"role": "assistant", "content": None, "tool_calls": [call]}]], chat_render)
    assert head == "<|user|>\nfind x<|endoftext|><|assistant|>\nLet me look."
    assert text == '<tool_call>\n{"name": "lookup", "arguments": {"q": "x"}}\n</tool_call><|endoftext|>'
    with pytest.raises(ValueError, match="completion 0's first message has content of type list"):
        render_pair(prompt, [[{"role": "assistant", "content": [{"type": "text", "text": "y"}]}]], chat_render)


def test_a_completions_none_keys_keep_the_prefills_values():
    # datasets gives every message each key, None where unused: the completion's name None must not drop the
    # prefill's name (the merged turn would no longer start with the head, and the row be refused).
    from retnet.tokenization import render_pair

    def render(messages, **_options):
        return "".join(f"<{m['role']}:{m.get('name') or ''}>{m['content']}" for m in messages)

    prompt = [{"role": "user", "content": "q", "name": None}, {"role": "assistant", "content": "Sure", "name": "bot"}]
    head, text = render_pair(prompt, [[{"role": "assistant", "content": ", done", "name": None}]], render)
    assert (head, text) == ("<user:>q<assistant:bot>Sure", ", done")


# ----------------------------------------------------------------------------------------------------------
# retnet-eval
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
    from retnet.tokenization import train_byte_level_bpe
    from tests.serve.conftest import CORPUS, save_micro_model

    return save_micro_model(tmp_path_factory.mktemp("export"), train_byte_level_bpe(CORPUS, vocab_size=300))


def test_eval_of_a_model_exported_without_its_tokenizer_says_so(micro_export, tmp_path, capsys):
    # The message was transformers' paragraph on converting slow tokenizers, cut mid-word.
    import shutil

    from retnet.train.evaluate import EXIT_USAGE, load_model
    from retnet.train.evaluate import main as eval_main

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(micro_export / name, bare / name)
    (tmp_path / "docs.jsonl").write_text('{"text": "def f(): pass"}\n')
    assert eval_main(["--model", str(bare), "--dataset", str(tmp_path / "docs.jsonl"), "--no-progress",
                      "--device", "cpu"]) == EXIT_USAGE
    assert f"--model {str(bare)!r} holds no tokenizer" in capsys.readouterr().err
    assert load_model(str(micro_export), device="cpu")[1].eos_token_id is not None  # an export with it loads


# ----------------------------------------------------------------------------------------------------------
# retnet-lm-eval
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["mapping", "string"])
def test_lm_eval_refuses_a_reward_model_named_in_its_config_file(tmp_path, form):
    # lm-eval takes model_args from `--config FILE.yaml` too: a reward model named there was scored as an LM
    # (its score head dropped) without a word, as one on the command line is not.
    from retnet.harness import check_pretrained

    reward = tmp_path / "rm"
    reward.mkdir()
    (reward / "config.json").write_text(json.dumps({"model_type": "retnet",
                                                    "architectures": ["RetNetForSequenceClassification"]}))
    model_args = {"pretrained": str(reward), "dtype": "float32"} if form == "mapping" \
        else f"pretrained={reward},dtype=float32"
    (tmp_path / "run.yaml").write_text(json.dumps({"model": "hf", "model_args": model_args, "tasks": ["x"]}))
    for argv in (["run", "--config", str(tmp_path / "run.yaml")], ["-C", str(tmp_path / "run.yaml")],
                 [f"--config={tmp_path / 'run.yaml'}"]):
        with pytest.raises(SystemExit, match="RetNetForSequenceClassification"):
            check_pretrained(argv)
    # the command line's model_args replace the file's: a causal LM there is what runs
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model_type": "retnet", "architectures": ["RetNetForCausalLM"]}))
    check_pretrained(["run", "--config", str(tmp_path / "run.yaml"), "--model_args", f"pretrained={lm}"])


# test_python_m_evaluate_reports_a_reward_models_bad_pairs_as_an_error moved to test_evaluate.py: its `python -m` run
# shares one interpreter with that module's own (the python_m_evaluate fixture)


@pytest.mark.parametrize(("field", "value"), [("expand_k", "1"), ("expand_v", None), ("norm_eps", None),
                                              ("initializer_range", "0.02"), ("num_kv_heads", -1),
                                              ("num_kv_heads", 0), ("num_kv_heads", 1.5)])
def test_convert_fla_refuses_malformed_numbers_by_field(field, value):
    # A string expand_k was repeated by `hidden * "1"`, a null norm_eps reached float(None), a negative
    # num_kv_heads divided the heads into -G groups: TypeErrors and RuntimeErrors, not the field's name.
    from retnet.model.convert_fla import retnet_config_from_fla

    fla = {"model_type": "retnet", "hidden_size": 64, "num_heads": 2, "expand_k": 1.0, "expand_v": 2.0,
           "num_hidden_layers": 2, "vocab_size": 101, "intermediate_size": 96, field: value}
    with pytest.raises(ValueError, match=rf"^flash-linear-attention RetNet config field {field}="):
        retnet_config_from_fla(fla)
    fla[field] = {"num_kv_heads": None}.get(field, 1)
    assert retnet_config_from_fla(fla).hidden_size == 64


def test_eval_refuses_a_position_edge_past_int64_by_name(capsys):
    from retnet.train.evaluate import main as eval_main

    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--model", "unused", "--position-edges", "128,99999999999999999999"])
    assert exit_info.value.code == 2
    assert "--position-edges: " in capsys.readouterr().err
