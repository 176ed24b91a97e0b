"""A Responses message's text parts reach the chat template as chat's do: as parts under
--chat-template-content-format openai (a template that loops over a message's content), joined under string, so
the same conversation is the same prompt as the chat route's either way."""

from __future__ import annotations

import pytest

from tests.serve.conftest import serve_app

pytestmark = pytest.mark.anyio

# Each part in its own brackets: two parts are more tokens than their joined text in one pair.
PARTS = ("{% for message in messages %}<{{ message['role'] }}>{% for part in message['content'] %}"
         "[[{{ part['text'] }}]]{% endfor %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")

CHAT = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "4"}, {"type": "text", "text": "2"}]}]
INPUT = [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}, {"type": "input_text", "text": "world"}]},
         {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
         {"type": "function_call_output", "call_id": "c1",
          "output": [{"type": "input_text", "text": "4"}, {"type": "input_text", "text": "2"}]}]


async def prompt_tokens(client, route: str, body: dict) -> int:
    r = await client.post(route, json={**body, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    return usage.get("prompt_tokens", usage.get("input_tokens"))


@pytest.mark.parametrize("form", ["openai", "string"])
async def test_a_responses_messages_parts_are_templated_as_chats(model_dir, form):
    async with serve_app(model_dir, chat_template=PARTS, chat_template_content_format=form) as client:
        tokens = await client.post("/tokenize", json={"messages": CHAT})
        chat = await prompt_tokens(client, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1})
        responses = await prompt_tokens(client, "/v1/responses", {"input": INPUT, "max_output_tokens": 1})
        assert chat == responses == tokens.json()["count"]
        if form == "openai":  # each part its own, as sent, not their joined text
            rendered = client.app.state.serving.tokenizer.decode(tokens.json()["tokens"], skip_special_tokens=False)
            assert rendered.startswith("<user>[[Hello]][[world]]")
