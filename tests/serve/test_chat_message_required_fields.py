"""A chat history's messages hold what OpenAI requires of them: a tool message the id of the call it answers, and
every message but an assistant's some content ("" and [] are content, as OpenAI takes them); and a call's arguments
that are JSON but no object reach the chat template as vLLM passes them, a template failing on them a 400."""

import pytest

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 1}
# Reads a call's arguments as an object (Qwen3-Coder's and Mistral's templates iterate them).
ITEMS = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
         "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}"
         "{% for k, v in c.function.arguments.items() %} {{ k }}={{ v }}{% endfor %}</call>{% endfor %}\n"
         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Writes them as JSON (Hermes', Llama 3.1's).
TOJSON = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
          "{% for c in m.tool_calls or [] %}<call>{{ c.function.arguments | tojson }}</call>{% endfor %}\n"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def history(arguments: str = "{}", tool: dict | None = None) -> list[dict]:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok", **(tool or {})}]


async def refused(client, messages: list[dict]) -> list[dict]:
    """The errors of /v1/chat/completions and /tokenize for ``messages`` (both 400)."""
    errors = []
    for path, extra in (("/v1/chat/completions", GREEDY), ("/tokenize", {})):
        r = await client.post(path, json={"messages": messages, **extra})
        assert r.status_code == 400, (path, r.text)
        errors.append(r.json()["error"])
    return errors


async def test_a_tool_message_needs_its_call_id(open_app):
    async with open_app(chat_template=TOJSON) as client:
        for tool, left_out in (({"tool_call_id": None}, True), ({"tool_call_id": None, "content": ""}, False)):
            messages = history(tool=tool)  # (left out, or sent as null)
            if left_out:
                del messages[2]["tool_call_id"]
            for error in await refused(client, messages):
                assert error["param"] == "messages[2].tool_call_id" and error["code"] == "missing", error
                assert "tool_call_id" in error["message"], error
        r = await client.post("/v1/chat/completions", json={"messages": history(), **GREEDY})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("role", ["user", "system", "developer", "tool"])
async def test_a_message_of_no_content_is_refused_by_name(open_app, role):
    async with open_app(chat_template=TOJSON) as client:
        message = {"role": role, **({"tool_call_id": "call_1"} if role == "tool" else {})}
        messages = [*history()[:2], message] if role == "tool" else [message, {"role": "user", "content": "hi"}]
        at = len(messages) - 1 if role == "tool" else 0
        for sent in (message, {**message, "content": None}):
            messages[at] = sent
            for error in await refused(client, messages):
                assert error["param"] == f"messages[{at}].content" and error["code"] == "missing", error
                assert f"a {role} message needs content" in error["message"] and "null" in error["message"], error


async def test_empty_content_is_content(open_app):
    """OpenAI takes "" and [] (a turn of no text); an assistant message with calls needs none."""
    async with open_app(chat_template=TOJSON) as client:
        for content in ("", []):
            for messages in ([{"role": "user", "content": content}],
                             [*history()[:2], {"role": "tool", "tool_call_id": "call_1", "content": content}]):
                r = await client.post("/v1/chat/completions", json={"messages": messages, **GREEDY})
                assert r.status_code == 200, (messages, r.text)


async def test_arguments_that_are_no_object_reach_the_template_parsed(open_app):
    """As vLLM passes them (json.loads, whatever it gives): a template that writes them as JSON shows the model what
    the call held; one that reads them as an object refuses the conversation with a 400, never a 500."""
    async with open_app(chat_template=TOJSON) as client:
        tokenizer = client.app.state.serving.tokenizer
        for arguments in ("[1, 2]", '"x"', "3", '{"a": 1}'):
            r = await client.post("/tokenize", json={"messages": history(arguments), "add_generation_prompt": False})
            assert r.status_code == 200, r.text
            assert f"<call>{arguments}</call>" in tokenizer.decode(r.json()["tokens"]), arguments
    async with open_app(chat_template=ITEMS) as client:
        for arguments in ("[1, 2]", '"x"', "3", "null"):
            for error in await refused(client, history(arguments)):
                assert error["param"] == "messages" and "the chat template rejected the messages" in error["message"]
        r = await client.post("/v1/chat/completions", json={"messages": history('{"a": 1}'), **GREEDY})
        assert r.status_code == 200, r.text
