"""vLLM's --chat-template-content-format (a message's content as one string, or as a list of text parts, detected
from the template with auto), the startup log of the request defaults naming where each came from, and a refused
RETNET_OVERRIDE_GENERATION_CONFIG value named as the variable."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from retnet.serve.__main__ import parse_settings
from retnet.serve.classify import ClassifyRequest
from retnet.serve.serving import detect_content_format
from retnet.serve.settings import StartupError, generation_defaults
from retnet.tokenization import DEFAULT_CHAT_TEMPLATE
from tests.serve.conftest import make_settings, serve_app
from tests.serve.test_classify import save_classifier

pytestmark = pytest.mark.anyio

# A template that reads content as OpenAI's parts (as multimodal models' do): given a string, it writes no text.
PARTS = ("{% for message in messages %}<{{ message['role'] }}>{% for part in message['content'] %}"
         "{{ part['text'] }}|{% endfor %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief"},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]


def test_auto_detects_a_loop_over_a_messages_content():
    assert detect_content_format(PARTS) == "openai"
    # through a variable set from the messages, and an attribute, a filter
    assert detect_content_format("{% set rest = messages[1:] %}{% for m in rest %}{% for p in m.content | list %}"
                                 "{{ p.text }}{% endfor %}{% endfor %}") == "openai"
    assert detect_content_format(DEFAULT_CHAT_TEMPLATE) == "string"
    # a loop over something else of the message, or over content that is no message's
    assert detect_content_format("{% for m in messages %}{% for c in m.tool_calls %}{{ c }}{% endfor %}"
                                 "{% endfor %}") == "string"
    assert detect_content_format("{% for c in content %}{{ c }}{% endfor %}") == "string"
    assert detect_content_format("{% for m in messages %") == "string"  # not parsed: the default


def test_the_flag_and_its_variable(model_dir, monkeypatch):
    assert parse_settings(["--model", str(model_dir)]).chat_template_content_format == "auto"
    settings = parse_settings(["--model", str(model_dir), "--chat-template-content-format", "openai"])
    assert settings.chat_template_content_format == "openai"
    monkeypatch.setenv("RETNET_CHAT_TEMPLATE_CONTENT_FORMAT", "string")
    assert parse_settings(["--model", str(model_dir)]).chat_template_content_format == "string"
    with pytest.raises(SystemExit):
        parse_settings(["--model", str(model_dir), "--chat-template-content-format", "parts"])


async def tokens(client, messages=MESSAGES, **fields) -> list[int]:
    response = await client.post("/tokenize", json={"messages": messages, **fields})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


async def test_a_template_that_iterates_parts_renders_the_text(model_dir):
    for form in ("auto", "openai", "string"):
        async with serve_app(model_dir, chat_template=PARTS, chat_template_content_format=form) as client:
            tokenizer = client.app.state.serving.tokenizer
            rendered = tokenizer.decode(await tokens(client), skip_special_tokens=False)
            if form == "string":  # each content a string: iterating it gives characters, which have no text
                assert rendered.startswith("<system>|") and "Be" not in rendered and "Hello" not in rendered
                continue
            # every role's content as parts: a string as one part, a list's parts as sent
            assert rendered == "<system>Be brief|<user>Hello|world|<assistant>"
            chat = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
            assert chat.json()["usage"]["prompt_tokens"] == len(await tokens(client))
            responses = await client.post("/v1/responses", json={"input": "Hi there", "max_output_tokens": 1,
                                                                 "instructions": "Be brief"})
            assert responses.status_code == 200, responses.text
            prompt = tokenizer.encode("<system>Be brief|<user>Hi there|<assistant>", add_special_tokens=False)
            assert responses.json()["usage"]["input_tokens"] == len(prompt)


async def test_the_default_template_renders_as_before_under_auto(model_dir):
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No"}]}, {"role": "user", "content": "Go"}]
    found = {}
    for form in ("auto", "string"):
        async with serve_app(model_dir, chat_template_content_format=form) as client:
            found[form] = await tokens(client, history), await tokens(client, add_generation_prompt=False)
    assert found["auto"] == found["string"]
    assert all(found["auto"])


async def test_a_reward_models_messages_are_templated_in_the_form(model_dir, tmp_path):
    reward_dir = save_classifier(tmp_path / "reward", model_dir, 1)
    request = ClassifyRequest(model="micro", messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Yo"}])
    async with serve_app(reward_dir, chat_template=PARTS) as client:
        serving = client.app.state.serving
        text = serving.tokenizer.decode(serving._conversation_ids(request), skip_special_tokens=False)
        assert text.startswith("<user>Hi|<assistant>Yo|")


@pytest.fixture(scope="module")
def sampling_dir(model_dir, tmp_path_factory):
    """The micro model with a generation_config.json that sets a temperature and max_new_tokens."""
    path = tmp_path_factory.mktemp("sampling-model")
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(temperature=0.5, max_new_tokens=5)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


async def startup_line(caplog, directory, **settings) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retnet.serve"):
        async with serve_app(directory, **settings):
            pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Default sampling parameters")]
    assert len(lines) <= 1
    return lines[0] if lines else ""


async def test_the_startup_log_names_where_each_default_came_from(sampling_dir, model_dir, caplog):
    line = await startup_line(caplog, sampling_dir)
    assert "temperature=0.5 (generation_config.json, --generation-config auto)" in line
    assert "max_tokens=5 (generation_config.json, --generation-config auto: its max_new_tokens)" in line
    assert "--generation-config vllm" in line
    # --default-max-tokens wins over the file's max_new_tokens: the server's setting, not the model's
    line = await startup_line(caplog, sampling_dir, default_max_tokens=7)
    assert "max_tokens=7 (--default-max-tokens, over generation_config.json's max_new_tokens 5)" in line
    # already on vllm, the values from the override alone: nothing --generation-config vllm would remove
    line = await startup_line(caplog, sampling_dir, generation_config="vllm",
                              override_generation_config='{"top_k": 3, "max_new_tokens": 4}')
    assert "top_k=3 (--override-generation-config)" in line
    assert "max_tokens=4 (--override-generation-config's max_new_tokens)" in line
    assert "generation_config.json" not in line and "start with" not in line
    assert await startup_line(caplog, sampling_dir, generation_config="vllm") == ""


def test_a_refused_override_from_the_environment_names_the_variable(model_dir, monkeypatch):
    with pytest.raises(StartupError, match=r"^--override-generation-config's temperature"):
        generation_defaults(make_settings(model_dir, override_generation_config='{"temperature": 9}'))
    monkeypatch.setenv("RETNET_OVERRIDE_GENERATION_CONFIG", '{"temperature": 9}')
    with pytest.raises(StartupError, match=r"^RETNET_OVERRIDE_GENERATION_CONFIG's temperature: .*got 9"):
        generation_defaults(make_settings(model_dir))
