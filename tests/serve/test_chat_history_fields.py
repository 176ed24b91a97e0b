"""An assistant message's reasoning in a chat history (DeepSeek's and vLLM's ``reasoning_content``, vLLM's newer
``reasoning``) reaches the chat template as the message's ``reasoning_content``, as training passes a row's
messages, so that every chat route prompts a model with the conversation it was trained on; and a developer message
is templated as a system message when the template has no developer role (OpenAI's reading of it)."""

import pytest

from retnet.serve.protocol import ChatMessage
from retnet.serve.tools import developer_role, template_message
from retnet.train.chat import template_messages

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
# Qwen3's and DeepSeek-R1's way: an assistant turn's reasoning in <think> tags, when the message has one.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>"
            "{% if m['role'] == 'assistant' and m.reasoning_content is defined %}"
            "<think>{{ m.reasoning_content }}</think>{% endif %}{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Qwen3's way with roles it does not know: the message is left out.
DROPS_DEVELOPER = ("{% for m in messages %}{% if m['role'] in ('system', 'user', 'assistant') %}<|{{ m['role'] }}|>"
                   "{{ m['content'] }}\n{% endif %}{% endfor %}")
REFUSES_DEVELOPER = ("{% for m in messages %}{% if m['role'] not in ('system', 'user', 'assistant') %}"
                     "{{ raise_exception('unknown role') }}{% endif %}{{ m['content'] }}{% endfor %}")
HISTORY = [
    {"role": "user", "content": "What is 1 + 2?"},
    {"role": "assistant", "content": "3", "reasoning_content": "One and two make three."},
    {"role": "user", "content": "And 2 + 2?"},
]


@pytest.fixture
async def client(open_app):
    async with open_app(chat_template=TEMPLATE) as c:
        yield c


def template_ids(client, messages, **kwargs) -> list[int]:
    """The ids of ``tokenizer.apply_chat_template`` on the messages as given (the chat routes' defaults: a
    generation prompt, no special tokens added), as training renders a row."""
    tokenizer = client.app.state.serving.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=TEMPLATE,
                                         add_generation_prompt=kwargs.get("add_generation_prompt", True))
    return tokenizer.encode(text, add_special_tokens=False)


async def tokenize(client, **body) -> list[int]:
    r = await client.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


async def chat_prompt_ids(client, **body) -> list[int]:
    r = await client.post("/v1/chat/completions", json={**body, "max_tokens": 1, "return_token_ids": True, **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["prompt_token_ids"]


async def test_reasoning_content_is_templated_as_training_renders_it(client):
    ids = await tokenize(client, messages=HISTORY)
    assert ids == template_ids(client, HISTORY) == template_ids(client, template_messages(HISTORY))
    assert "<think>One and two make three.</think>3" in client.app.state.serving.tokenizer.decode(ids)
    # /v1/chat/completions runs those ids; so does a session's first turn.
    assert await chat_prompt_ids(client, messages=HISTORY) == ids
    assert await chat_prompt_ids(client, messages=HISTORY, session_id="reasoning-1") == ids


async def test_vllms_reasoning_is_the_same_field(client):
    expected = template_ids(client, HISTORY)
    renamed = [*HISTORY[:1], {"role": "assistant", "content": "3", "reasoning": "One and two make three."}, HISTORY[2]]
    assert await tokenize(client, messages=renamed) == expected
    # Some vLLM versions' responses carry both, with the same text; null is no reasoning.
    both = [*HISTORY[:1], {**HISTORY[1], "reasoning": "One and two make three."}, HISTORY[2]]
    assert await tokenize(client, messages=both) == expected
    nulls = [*HISTORY[:1], {"role": "assistant", "content": "3", "reasoning_content": None, "reasoning": None},
             HISTORY[2]]
    plain = [*HISTORY[:1], {"role": "assistant", "content": "3"}, HISTORY[2]]
    assert await tokenize(client, messages=nulls) == template_ids(client, plain)


async def test_without_reasoning_the_template_sees_no_field(client):
    # "is defined" stays false: no empty <think></think> where the history has no reasoning.
    plain = [*HISTORY[:1], {"role": "assistant", "content": "3"}, HISTORY[2]]
    ids = await tokenize(client, messages=plain)
    assert ids == template_ids(client, plain)
    assert "<think>" not in client.app.state.serving.tokenizer.decode(ids)
    assert "reasoning_content" not in template_message(ChatMessage(role="assistant", content="3"))


async def test_an_empty_reasoning_is_passed_as_sent(client):
    messages = [*HISTORY[:1], {**HISTORY[1], "reasoning_content": ""}, HISTORY[2]]
    ids = await tokenize(client, messages=messages)
    assert ids == template_ids(client, messages)
    assert "<think></think>3" in client.app.state.serving.tokenizer.decode(ids)


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": "hi", "reasoning_content": "x"}, "messages[0].reasoning_content"),
    ({"role": "tool", "content": "3", "tool_call_id": "c", "reasoning": "x"}, "messages[0].reasoning"),
    ({"role": "assistant", "content": "3", "reasoning_content": "x", "reasoning": "y"}, "messages[0].reasoning"),
    ({"role": "assistant", "content": "3", "reasoning_content": ["x"]}, "messages[0].reasoning_content"),
])
@pytest.mark.parametrize("route", ["/tokenize", "/v1/chat/completions"])
async def test_misplaced_or_conflicting_reasoning_is_refused(client, message, param, route):
    r = await client.post(route, json={"messages": [message], "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_a_developer_message_is_a_system_one_where_the_template_has_no_developer_role(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def render(template):
        return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)

    # A template that renders any role (this project's default, a training run's) keeps it: as trained.
    assert developer_role(render(TEMPLATE)) == "developer"
    # One that drops it (Qwen3's) or refuses it (Mistral's) gets OpenAI's reading: its instructions as a system's.
    assert developer_role(render(DROPS_DEVELOPER)) == "system"
    assert developer_role(render(REFUSES_DEVELOPER)) == "system"
    message = ChatMessage(role="developer", content="Be exact.")
    assert template_message(message) == {"role": "developer", "content": "Be exact."}
    assert template_message(message, "system") == {"role": "system", "content": "Be exact."}
    assert template_message(ChatMessage(role="user", content="hi"), "system")["role"] == "user"


async def test_the_server_templates_a_developer_message_as_system_where_the_template_drops_that_role(open_app):
    messages = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
    async with open_app(chat_template=DROPS_DEVELOPER) as client:
        tokenizer = client.app.state.serving.tokenizer
        text = tokenizer.decode(await tokenize(client, messages=messages))
    assert "<|system|>Answer in French." in text  # dropped by the template as "developer"
    async with open_app(chat_template=TEMPLATE) as client:  # a template that renders the role keeps it
        tokenizer = client.app.state.serving.tokenizer
        assert "<|developer|>Answer in French." in tokenizer.decode(await tokenize(client, messages=messages))


async def test_the_developer_role_is_probed_in_the_template_a_request_with_tools_gets(open_app):
    # A tokenizer with named templates renders a request with tools with its "tool_use" one: probed in the default
    # alone, a developer message was dropped there without a word.
    messages = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
    tool = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
    async with open_app() as client:
        tokenizer = client.app.state.serving.tokenizer
        tokenizer.chat_template = {"default": TEMPLATE, "tool_use": DROPS_DEVELOPER}
        with_tools = tokenizer.decode(await tokenize(client, messages=messages, tools=[tool], tool_choice="required"))
        plain = tokenizer.decode(await tokenize(client, messages=messages))
    assert "<|system|>Answer in French." in with_tools
    assert "<|developer|>Answer in French." in plain
