"""vLLM's --generation-config / --override-generation-config (the model's sampling defaults for requests that
leave them out), --chat-template, and the one-line startup errors of ``retnet-serve`` (in-process: ``main``
with capsys, apps through ``serve_app``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retnet.serve.__main__ import main, parse_settings
from retnet.serve.run_batch import main as run_batch_main
from retnet.serve.settings import StartupError, generation_defaults, resolve_max_tokens
from tests.serve.conftest import make_settings, serve_app

pytestmark = pytest.mark.anyio

PROMPT = "def add(a, b):"
MESSAGES = [{"role": "user", "content": "Hello world"}]
TEMPLATE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"


@pytest.fixture(scope="module")
def greedy_dir(model_dir, tmp_path_factory) -> Path:
    """The micro model with a generation_config.json asking for greedy decoding (do_sample false, as HF writes
    it) and 5 new tokens."""
    path = tmp_path_factory.mktemp("greedy-model")
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(temperature=0.0, do_sample=False, max_new_tokens=5)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def texts(body: dict) -> list[str]:
    return [choice["text"] for choice in body["choices"]]


async def complete(client, **fields) -> dict:
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "ignore_eos": True, **fields})
    assert response.status_code == 200, response.text
    return response.json()


async def test_the_models_generation_config_sets_the_defaults(greedy_dir):
    async with serve_app(greedy_dir, max_tokens_limit=8) as client:
        greedy = await complete(client, temperature=0, max_tokens=5)
        left_out = await complete(client, n=4, seed=1)
        # Left out, or null (the API's "default"), is the model's: greedy, 5 tokens.
        nulls = await complete(client, temperature=None, max_tokens=None, seed=2)
        assert left_out["usage"]["completion_tokens"] == 4 * 5
        assert texts(left_out) == texts(greedy) * 4
        assert texts(nulls) == texts(greedy)
        # An explicit value wins: sampling at 1 gives other choices, max_tokens 7 seven tokens.
        sampled = await complete(client, n=4, seed=1, temperature=1.0, max_tokens=7)
        assert sampled["usage"]["completion_tokens"] == 4 * 7
        assert len(set(texts(sampled))) > 1
        chat = (await client.post("/v1/chat/completions", json={"messages": MESSAGES, "ignore_eos": True})).json()
        explicit = (await client.post("/v1/chat/completions", json={
            "messages": MESSAGES, "ignore_eos": True, "temperature": 0, "max_tokens": 5})).json()
        assert chat["usage"]["completion_tokens"] == 5
        assert chat["choices"][0]["message"] == explicit["choices"][0]["message"]
        # The Responses API runs as chat: the same defaults, echoed as the answer was sampled.
        response = (await client.post("/v1/responses", json={"input": "Hello world", "ignore_eos": True})).json()
        assert response["usage"]["output_tokens"] == 5
        assert response["output"][0]["content"][0]["text"] == explicit["choices"][0]["message"]["content"]
        assert (response["temperature"], response["top_p"]) == (0.0, 1.0)
        sent = (await client.post("/v1/responses", json={"input": "Hello world", "temperature": 0.5,
                                                          "max_output_tokens": 2})).json()
        assert (sent["temperature"], sent["usage"]["output_tokens"] <= 2) == (0.5, True)


async def test_generation_config_vllm_ignores_the_file_and_overrides_go_on_top(greedy_dir):
    async with serve_app(greedy_dir, max_tokens_limit=8, generation_config="vllm") as client:
        body = await complete(client, n=4, seed=1)
        # The server's own defaults: temperature 1, max_tokens --default-max-tokens (lowered to the limit).
        assert body["usage"]["completion_tokens"] == 4 * 8
        assert len(set(texts(body))) > 1
    settings = parse_settings(["--model", str(greedy_dir), "--override-generation-config",
                               '{"temperature": 1.0, "max_new_tokens": 3}'])
    assert generation_defaults(settings) == {"temperature": 1.0, "max_tokens": 3}
    async with serve_app(greedy_dir, override_generation_config='{"max_new_tokens": 3}') as client:
        body = await complete(client, n=2)
        assert body["usage"]["completion_tokens"] == 2 * 3
        assert texts(body)[0] == texts(body)[1]  # the file's temperature 0 still holds


async def test_generation_config_names_another_directory(model_dir, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 4, "top_k": 1}))
    async with serve_app(model_dir, generation_config=str(tmp_path)) as client:
        body = await complete(client, n=3, seed=3)
        assert body["usage"]["completion_tokens"] == 3 * 4
        assert len(set(texts(body))) == 1  # top_k 1: greedy at any temperature
        tokenized = (await client.post("/tokenize", json={"messages": MESSAGES})).json()
        assert tokenized["count"] > 0


def test_max_tokens_default_against_the_settings(greedy_dir):
    def default(file_tokens: int, **settings) -> int:
        config = make_settings(greedy_dir, **settings)
        return resolve_max_tokens(config, {"max_tokens": file_tokens})

    assert default(5) == 5
    assert default(5, default_max_tokens=6) == 6  # an operator's --default-max-tokens wins over the model's file
    assert default(50, max_tokens_limit=8) == 8  # the file's value is held to --max-tokens-limit
    assert default(3, override_generation_config='{"max_new_tokens": 3}', default_max_tokens=6) == 3
    with pytest.raises(StartupError, match="over --max-tokens-limit"):
        default(9, override_generation_config='{"max_new_tokens": 9}', max_tokens_limit=8)
    assert resolve_max_tokens(make_settings(greedy_dir), {}) == 256


def startup_error(capsys, *argv: str) -> str:
    """``retnet-serve ARGV``'s one-line error (exit status 2)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_bad_generation_configs_are_refused_at_startup(greedy_dir, tmp_path, capsys):
    err = startup_error(capsys, "--model", str(greedy_dir), "--override-generation-config", "{temperature: 1}")
    assert "override_generation_config" in err and "JSON object" in err
    err = startup_error(capsys, "--model", str(greedy_dir), "--override-generation-config", '{"temperature": 5}')
    assert err.startswith("retnet-serve: error: --override-generation-config's temperature") and "\n" not in err
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 0}))
    err = startup_error(capsys, "--model", str(greedy_dir), "--generation-config", str(tmp_path))
    assert "generation_config.json's max_new_tokens" in err and "\n" not in err
    err = startup_error(capsys, "--model", str(greedy_dir), "--generation-config", str(tmp_path / "missing"))
    assert err.startswith("retnet-serve: error: --generation-config") and "\n" not in err
    # a value transformers takes but requests may not send (a fine-tune's export carries its base's): the way out
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 2.5}))
    err = startup_error(capsys, "--model", str(greedy_dir), "--generation-config", str(tmp_path))
    assert "generation_config.json's temperature" in err and "--generation-config vllm" in err and \
        "--override-generation-config '{\"temperature\": ...}'" in err


async def test_chat_template_replaces_the_tokenizers(model_dir, tmp_path):
    async with serve_app(model_dir) as client:
        default = (await client.post("/tokenize", json={"messages": MESSAGES})).json()["tokens"]
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    for flag in (str(template_file), TEMPLATE):  # a file, or the template inline
        async with serve_app(model_dir, chat_template=flag) as client:
            tokens = (await client.post("/tokenize", json={"messages": MESSAGES})).json()["tokens"]
            tokenizer = client.app.state.serving.tokenizer
            assert tokens == tokenizer.encode("[user]Hello world>", add_special_tokens=False) != default
            chat = (await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})).json()
            assert chat["usage"]["prompt_tokens"] == len(tokens)


def test_a_broken_chat_template_is_refused_at_startup(model_dir, capsys):
    err = startup_error(capsys, "--model", str(model_dir), "--chat-template", "{% for m in messages %}{{ m }")
    assert err.startswith("retnet-serve: error: --chat-template: the template does not parse") and "\n" not in err
    err = startup_error(capsys, "--model", str(model_dir), "--chat-template", "templates/missing.jinja")
    assert err.startswith("retnet-serve: error: --chat-template") and "could not be read" in err


@pytest.mark.parametrize("case", ["missing", "file", "no-config", "llama", "fla", "refused", "classifier"])
def test_a_model_directory_that_cannot_be_served_is_one_line(case, tmp_path, capsys):
    path = tmp_path / "model"
    if case == "file":
        path.write_text("")
    elif case != "missing":
        path.mkdir()
    configs = {"llama": {"model_type": "llama"}, "fla": {"model_type": "retnet", "expand_k": 1, "num_heads": 4},
               "refused": {"model_type": "retnet", "hidden_size": -3},
               "classifier": {"model_type": "retnet", "architectures": ["RetNetForSequenceClassification"]}}
    if case in configs:
        (path / "config.json").write_text(json.dumps(configs[case]))
    err = startup_error(capsys, "--model", str(path))
    assert err.startswith("retnet-serve: error: --model") and "\n" not in err
    expected = {"missing": "no such directory", "file": "not a directory", "no-config": "no config.json",
                "llama": "is not a RetNet", "fla": "retnet-convert-fla", "refused": "hidden_size",
                # a classifier is served (/classify, /pooling): this one gets as far as its missing tokenizer
                "classifier": "holds no tokenizer (tokenizer.json"}[case]
    assert expected in err


def test_run_batch_takes_the_models_defaults(greedy_dir, tmp_path, capsys):
    lines = [json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": PROMPT, "ignore_eos": True}})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert run_batch_main(["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                           "--model", str(greedy_dir)]) == 0
    body = json.loads((tmp_path / "out.jsonl").read_text())["response"]["body"]
    assert body["usage"]["completion_tokens"] == 5
    with pytest.raises(SystemExit) as exited:
        run_batch_main(["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out2.jsonl"),
                        "--model", str(greedy_dir), "--chat-template", "{% if %}"])
    assert exited.value.code == 2
    assert "--chat-template" in capsys.readouterr().err
