"""tool_choice "auto" through the Hermes tool-call parser (``--tool-call-parser hermes``): the parser alone, fed
whole and in every split, and the server end to end. The micro random model writes no calls of its own, so the
end-to-end tests serve a tiny RetNet overfitted (a few dozen steps, about a second on CPU) to answer fixed
conversations with fixed texts: Hermes calls after some content, a call to a tool the request does not have,
plain text."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch

from retnet.serve.tool_parsers import HermesToolParser

from .conftest import CORPUS, ServerProcess, ThreadServer
from .test_extras import CHAT, sse_events

TOOLS = ("add", "paint")


def parsed(text: str, parallel: bool = True) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = HermesToolParser(TOOLS, parallel).parse(text)
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
    return content, [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def call(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


ADD_CALL = call('{"name": "add", "arguments": {"a": 1, "b": 2}}')
PAINT_CALL = call('{"name": "paint", "parameters": {"color": "réd"}}')  # vLLM's hermes reads "parameters" too


def test_calls_after_content_and_between_them_whitespace():
    assert parsed(f"Let me see.\n{ADD_CALL}\n{PAINT_CALL}\n") == (
        "Let me see.\n", [("add", {"a": 1, "b": 2}), ("paint", {"color": "réd"})])
    # Only calls, the newlines around them: no content (null).
    assert parsed(f"\n{ADD_CALL}\n\n{PAINT_CALL}") == (None, [("add", {"a": 1, "b": 2}), ("paint", {"color": "réd"})])
    assert parsed(f"{ADD_CALL}\nDone.") == ("Done.", [("add", {"a": 1, "b": 2})])
    # Arguments are written as json.dumps writes them (vLLM's), not as the model spaced them.
    (tool,) = HermesToolParser(TOOLS).parse('<tool_call>{"name":"add","arguments":{"a":1}}</tool_call>')[1]
    assert tool.function.arguments == '{"a": 1}'


def test_text_without_calls_is_the_content_as_it_is():
    for text in ("", "  \n", "Hello <b>world</b> <tool", "a <tool_call> never closed", "</tool_call> alone"):
        assert parsed(text) == (text, [])


@pytest.mark.parametrize("body", [
    '{"name": "add", "arguments": {"a": 1,}}',  # no JSON
    '{"name": "divide", "arguments": {}}',  # not one of the request's tools
    '{"name": ["add"], "arguments": {}}',
    '{"name": "add", "arguments": "{\\"a\\": 1}"}',  # arguments must be an object
    '{"name": "add"}',
    '["add", {}]',
])
def test_a_call_that_does_not_parse_stays_in_the_content(body):
    assert parsed(call(body)) == (call(body), [])
    # the calls beside it are still calls; the whitespace after a call is dropped before the text
    assert parsed(f"{ADD_CALL}\n{call(body)}\n{PAINT_CALL}") == (
        call(body) + "\n", [("add", {"a": 1, "b": 2}), ("paint", {"color": "réd"})])


def test_parallel_tool_calls_false_keeps_the_first_call():
    assert parsed(f"Hi\n{ADD_CALL}\n{PAINT_CALL}", parallel=False) == ("Hi\n", [("add", {"a": 1, "b": 2})])


def test_a_call_left_open_is_content():
    text = f"Hi\n{ADD_CALL}\n<tool_call>\n" + '{"name": "paint", "argu'
    assert parsed(text) == ('Hi\n<tool_call>\n{"name": "paint", "argu', [("add", {"a": 1, "b": 2})])


def test_a_possible_tag_is_held_back_until_it_is_decided():
    parser = HermesToolParser(TOOLS)
    assert parser.feed("Hi <tool_") == ("Hi ", [])
    assert parser.feed("s> and <") == ("<tool_s> and ", [])
    assert parser.feed("tool_call>\n{") == ("", [])  # inside a call: nothing given out
    content, calls = parser.feed('"name": "add", "arguments": {}}\n</tool_call>')
    assert content == "" and [c.function.name for c in calls] == ["add"]
    assert parser.feed("\n<") == ("", [])
    assert parser.finish() == "<"


TEXTS = [
    f"Let me see.\n{ADD_CALL}\n{PAINT_CALL}\n",
    f"\n {ADD_CALL}\n{PAINT_CALL}",
    f"{ADD_CALL}\n{call('{bad')}\nthen <tool_ and <tool_call \n{PAINT_CALL}\nend",
    f"a <tool_call>{ADD_CALL}",  # an opening tag inside a call's body: the body is no JSON
    f"x {ADD_CALL}\n<tool_call>\n" + '{"name": "pai',
    "  \n\t",
    "<<tool_call<tool_call>>",
    call('{"name": "divide", "arguments": {}}') + "\n" + ADD_CALL,
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("parallel", [True, False])
def test_any_split_streams_what_the_whole_text_parses_to(text, parallel):
    """Fed in two pieces at every split point, a character at a time, and in random pieces: the content given
    out adds up to the whole text's, and the same calls come out, each in the feed that closes it."""
    content, calls = parsed(text, parallel)
    rng = random.Random(0)
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        splits.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    for pieces in splits:
        parser = HermesToolParser(TOOLS, parallel)
        streamed, got = "", []
        for piece in pieces:
            delta, closed = parser.feed(piece)
            streamed += delta
            got += [(c.function.name, json.loads(c.function.arguments)) for c in closed]
            # What is given out is never taken back: none of a call's text (not in the whole text's content).
            assert (content or "").startswith(streamed), pieces
        streamed += parser.finish()
        assert (streamed, got) == (content or "", calls), pieces


# -- end to end -------------------------------------------------------------------------------------------------

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}}}
PAINT = {"type": "function", "function": {"name": "paint", "parameters": {
    "type": "object", "properties": {"color": {"enum": ["red", "green"]}, "glossy": {"type": "boolean"}},
    "required": ["color", "glossy"], "additionalProperties": False}}}
PAINT_ARGS, ADD_ARGS = {"color": "red", "glossy": True}, {"a": 2, "b": 3}
ASKED = "Paint it red, then add 2 and 3."
ANSWER = ("I will paint it.\n" + call(json.dumps({"name": "paint", "arguments": PAINT_ARGS})) + "\n"
          + call(json.dumps({"name": "add", "arguments": ADD_ARGS})))
UNKNOWN = "Fly away."
UNKNOWN_ANSWER = call('{"name": "fly", "arguments": {}}')
PLAIN = "Say hi."
PLAIN_ANSWER = "Hello there!"
CONVERSATIONS = {ASKED: ANSWER, UNKNOWN: UNKNOWN_ANSWER, PLAIN: PLAIN_ANSWER}


@pytest.fixture(scope="module")
def hermes_model_dir(tmp_path_factory):
    """A micro RetNet trained to answer each of CONVERSATIONS' user messages, under the default chat template,
    with its fixed text then EOS: greedy decoding then writes those texts."""
    import retnet  # noqa: F401
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("retnet-hermes")
    tokenizer = train_byte_level_bpe(CORPUS + list(CONVERSATIONS.values()) * 10, vocab_size=384, min_frequency=1)
    return micro_hermes_model(path, tokenizer)


@pytest.fixture(scope="module")
def special_tags_model_dir(tmp_path_factory):
    """As ``hermes_model_dir``, with a tokenizer that makes the call tags special tokens (as Hermes 2 Pro's)."""
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("retnet-hermes-special")
    tokenizer = train_byte_level_bpe(CORPUS + list(CONVERSATIONS.values()) * 10, vocab_size=384, min_frequency=1)
    tokenizer.add_special_tokens({"additional_special_tokens": list(HermesToolParser.OPEN_CLOSE)})
    return micro_hermes_model(path, tokenizer)


def micro_hermes_model(path, tokenizer):
    """Train a micro RetNet on CONVERSATIONS with ``tokenizer``; both saved in ``path``."""
    from retnet.model import RetNetConfig, RetNetForCausalLM

    rows, labels = [], []
    for asked, answer in CONVERSATIONS.items():
        # As the server templates and encodes a chat (add_special_tokens false).
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": asked}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    targets = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          chunk_size=16, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = RetNetForCausalLM(config)
    # One thread: a model this small gains nothing from more, and on a busy machine their waits for each
    # other made the training ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        learn(model, ids, targets)
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def learn(model, ids, targets) -> None:
    """Train ``model`` on the rows ``ids`` [B, T] until it predicts each ``targets`` token (-100: none)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    known = targets[:, 1:] != -100
    for _ in range(400):
        out = model(input_ids=ids, labels=targets)
        # Learnt: every answer token the argmax under teacher forcing, by a margin (no near tie for the
        # server's recurrent decoding to break the other way).
        logits = out.logits.detach()[:, :-1]
        top2 = logits.topk(2, dim=-1).values
        right = logits.argmax(-1) == targets[:, 1:]
        if bool(right[known].all()) and bool((top2[..., 0] - top2[..., 1])[known].min() > 1.0):
            break
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    else:
        raise AssertionError("the micro model did not learn its answers")


@pytest.fixture(scope="module")
def hermes_server(request, hermes_model_dir):
    """A real uvicorn process serving the trained model with vLLM's flags for "auto". While it starts (one core),
    the module's other server is made too when a selected test uses it: its model trains on one thread, then it
    starts (in this process)."""
    proc = ServerProcess(hermes_model_dir, "--tool-call-parser", "hermes", "--enable-auto-tool-choice")
    try:
        if any(getattr(item, "module", None) is request.module and "special_tags_server" in item.fixturenames
               for item in request.session.items):
            request.getfixturevalue("special_tags_server")
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def special_tags_server(special_tags_model_dir):
    """uvicorn serving the model whose tokenizer makes the call tags special tokens, with the hermes parser (and not
    --enable-auto-tool-choice), in this process as ``retnet-serve`` would (``ThreadServer``; the module's real
    process is ``hermes_server``'s): started, not waited for."""
    proc = ThreadServer(special_tags_model_dir, "--tool-call-parser", "hermes")
    yield proc
    proc.stop()


def chat(server, asked: str, **extra) -> httpx.Response:
    body = {"model": "micro", "messages": [{"role": "user", "content": asked}], "tools": [ADD, PAINT],
            "temperature": 0, "max_tokens": 120, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def calls_of(tool_calls: list) -> list[tuple[str, dict]]:
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in tool_calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in tool_calls]


def streamed(events: list) -> dict[int, dict]:
    """Per choice: its content, its calls (by their index), its finish reasons; the chunks' deltas checked."""
    out: dict[int, dict] = {}
    for event in events:
        for choice in event["choices"]:
            mine = out.setdefault(choice["index"], {"content": "", "calls": {}, "finish": [], "logprobs": 0})
            delta = choice["delta"]
            mine["content"] += delta.get("content") or ""
            for tool_call in delta.get("tool_calls") or []:
                assert tool_call["index"] not in mine["calls"]  # each call whole, in one chunk
                mine["calls"][tool_call["index"]] = tool_call
            mine["logprobs"] += len((choice.get("logprobs") or {}).get("content") or [])
            if choice["finish_reason"]:
                mine["finish"].append(choice["finish_reason"])
    return out


def test_auto_answers_the_models_hermes_calls_whole_and_streamed(hermes_server):
    r = chat(hermes_server, ASKED, n=2, logprobs=True)
    assert r.status_code == 200, r.text
    body = r.json()
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "I will paint it.\n"
        assert calls_of(choice["message"]["tool_calls"]) == [("paint", PAINT_ARGS), ("add", ADD_ARGS)]
        assert len(choice["logprobs"]["content"]) == body["usage"]["completion_tokens"] // 2  # still per token
    events = sse_events(chat(hermes_server, ASKED, n=2, logprobs=True, stream=True).text)
    whole = body["choices"][0]
    for index, mine in streamed(events).items():
        assert mine["content"] == whole["message"]["content"] and mine["finish"] == ["tool_calls"]
        assert list(mine["calls"]) == [0, 1]
        assert calls_of(list(mine["calls"].values())) == calls_of(whole["message"]["tool_calls"])
        assert mine["logprobs"] == len(whole["logprobs"]["content"])
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"] and e["choices"][0]["index"] == index]
        # The content streams before the calls, none of their text in it; each call has its own chunk.
        assert not any("<" in (d.get("content") or "") for d in deltas)
        assert [len(d["tool_calls"]) for d in deltas if "tool_calls" in d] == [1, 1]
        assert sum(bool(d.get("content")) for d in deltas) > 1


def test_auto_through_the_official_client(hermes_server):
    openai = pytest.importorskip("openai", reason="the openai client is in the [dev] extra")
    from typing import Literal

    from pydantic import BaseModel

    class Paint(BaseModel):
        color: Literal["red", "green"]
        glossy: bool

    class Add(BaseModel):
        a: int
        b: int

    tools = [openai.pydantic_function_tool(Paint, name="paint"), openai.pydantic_function_tool(Add, name="add")]
    asked = {"model": "micro", "messages": [{"role": "user", "content": ASKED}], "max_tokens": 120, "temperature": 0,
             "tools": tools}
    with openai.OpenAI(base_url=hermes_server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        whole = client.chat.completions.create(**asked).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.content == "I will paint it.\n"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == [
            ("paint", PAINT_ARGS), ("add", ADD_ARGS)]
        with client.chat.completions.stream(**asked) as stream:
            events = list(stream)
            final = stream.get_final_completion().choices[0]
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.name, e.parsed_arguments) for e in done] == [("paint", Paint(**PAINT_ARGS)), ("add", Add(**ADD_ARGS))]
    assert "".join(e.delta for e in events if e.type == "content.delta") == "I will paint it.\n"
    assert final.finish_reason == "tool_calls" and final.message.content == "I will paint it.\n"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


@pytest.mark.parametrize("extra", [
    {"parallel_tool_calls": False},  # the first call only
    {"max_tokens": 24},  # cut inside the first call (it closes at the 47th token): its raw text is content
    {"stop": ["</tool_call>"]},  # no call closes: the text is content, finish "stop"
    {"tools": [ADD]},  # paint is no tool of this request: its call stays text
], ids=["parallel_false", "max_tokens", "stop", "unknown_tool"])
def test_what_is_no_whole_call_stays_text_streamed_the_same(hermes_server, extra):
    choice = chat(hermes_server, ASKED, **extra).json()["choices"][0]
    content, calls = choice["message"]["content"], calls_of(choice["message"].get("tool_calls") or [])
    if "parallel_tool_calls" in extra:
        assert (content, calls, choice["finish_reason"]) == ("I will paint it.\n", [("paint", PAINT_ARGS)],
                                                             "tool_calls")
    elif "max_tokens" in extra:
        assert ANSWER.startswith(content) and content.startswith("I will paint it.\n<tool_call>\n{")
        assert "</tool_call>" not in content
        assert (calls, choice["finish_reason"]) == ([], "length")
    elif "stop" in extra:
        assert (content, calls, choice["finish_reason"]) == (ANSWER.split("</tool_call>")[0], [], "stop")
    else:
        assert content == ANSWER.split("\n<tool_call>\n{\"name\": \"add\"")[0] + "\n"
        assert (calls, choice["finish_reason"]) == ([("add", ADD_ARGS)], "tool_calls")
    (mine,) = streamed(sse_events(chat(hermes_server, ASKED, stream=True, **extra).text)).values()
    assert (mine["content"] or None, calls_of(list(mine["calls"].values())), mine["finish"]) == (
        content, calls, [choice["finish_reason"]])


def test_call_tags_that_are_special_tokens_are_kept_for_the_parser(special_tags_server):
    """A tokenizer whose call tags are special tokens would drop them from the text: with "auto" the server
    keeps special tokens' text unless the request says otherwise (vLLM's rule), so the calls are still read."""
    proc = special_tags_server
    try:
        proc.wait_healthy()
        choice = chat(proc, ASKED).json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("I will paint it.\n", "tool_calls")
        assert calls_of(choice["message"]["tool_calls"]) == [("paint", PAINT_ARGS), ("add", ADD_ARGS)]
        (mine,) = streamed(sse_events(chat(proc, ASKED, stream=True).text)).values()
        assert calls_of(list(mine["calls"].values())) == [("paint", PAINT_ARGS), ("add", ADD_ARGS)]
        # Asked to skip them, the tags are gone from the text, and with them the calls.
        choice = chat(proc, ASKED, skip_special_tokens=True).json()["choices"][0]
        assert "tool_calls" not in choice["message"] and "<tool_call>" not in choice["message"]["content"]
        assert '"name": "paint"' in choice["message"]["content"]
        # Plain text (the EOS is a special token too) is unchanged.
        assert chat(proc, PLAIN).json()["choices"][0]["message"]["content"] == PLAIN_ANSWER
    finally:
        proc.stop()


def test_call_tags_added_as_special_tokens_not_named_ones_are_kept_too(tmp_path):
    """Tags that are added tokens marked special but not among the tokenizer's named special tokens (Llama 3's
    reserved tokens, which Hermes 2 Pro renames to its tags) are skipped by decoding all the same: "auto" must
    keep special tokens' text for them too, or the tags, and with them the calls, are gone."""
    from tokenizers import AddedToken

    from retnet.serve.app import create_app
    from retnet.serve.tools import ToolCalling
    from retnet.tokenization import train_byte_level_bpe

    from .conftest import make_settings, save_micro_model

    tokenizer = train_byte_level_bpe(CORPUS, vocab_size=384, min_frequency=1)
    tokenizer.add_tokens([AddedToken(tag, special=True) for tag in HermesToolParser.OPEN_CLOSE])
    path = save_micro_model(tmp_path, tokenizer)
    serving = create_app(make_settings(path, tool_call_parser="hermes")).state.serving
    tag = serving.tokenizer.convert_tokens_to_ids(HermesToolParser.OPEN)
    assert HermesToolParser.OPEN not in serving.tokenizer.all_special_tokens  # not a named one
    assert serving.engine._decode([tag]) == ""  # but skipped by the default decoding
    assert serving._special_tool_tags(ToolCalling([("add", None)], None, True, "hermes"))


def test_auto_without_calls_answers_text(hermes_server):
    for asked, answer in ((PLAIN, PLAIN_ANSWER), (UNKNOWN, UNKNOWN_ANSWER)):
        choice = chat(hermes_server, asked).json()["choices"][0]
        assert choice["message"]["content"] == answer and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "stop"
        (mine,) = streamed(sse_events(chat(hermes_server, asked, stream=True).text)).values()
        assert (mine["content"], mine["calls"], mine["finish"]) == (answer, {}, ["stop"])


@pytest.mark.anyio
async def test_auto_needs_the_parser_setting(open_app):
    async with open_app() as client:
        for extra in ({"tools": [ADD]}, {"tools": [ADD], "tool_choice": "auto"}):
            error = (await client.post("/v1/chat/completions", json={**CHAT, **extra})).json()["error"]
            assert error["param"] == "tools" and error["code"] == "unsupported_parameter", error
            assert "tool_call_parser" in error["message"] and "--tool-call-parser hermes" in error["message"]


@pytest.mark.anyio
async def test_auto_with_the_parser_on_a_model_that_writes_no_calls(open_app):
    """The random micro model's text has no tag: "auto" answers it as without tools, and /tokenize counts it."""
    body = {**CHAT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    async with open_app() as client:
        plain = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
    async with open_app(tool_call_parser="hermes") as client:
        choice = (await client.post("/v1/chat/completions", json={**body, "tools": [ADD]})).json()["choices"][0]
        assert choice == plain
        r = await client.post("/tokenize", json={"messages": CHAT["messages"], "tools": [ADD]})
        assert r.status_code == 200, r.text


@pytest.mark.anyio
@pytest.mark.parametrize(("extra", "param"), [
    ({"echo": True}, "echo"),
    ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),
    ({"chat_template_kwargs": {"continue_final_message": True, "add_generation_prompt": False}},
     "continue_final_message"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [ADD, {"type": "custom"}]}, "tools[1].type"),
])
async def test_what_auto_cannot_do_is_refused_by_name(open_app, extra, param):
    async with open_app(tool_call_parser="hermes") as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "tools": [ADD], **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and param.split("[")[0] in r.json()["error"]["message"]


def test_enable_auto_tool_choice_without_a_parser_is_refused_at_startup():
    from retnet.serve.__main__ import parse_settings

    settings = parse_settings(["--model", "m", "--tool-call-parser", "hermes", "--enable-auto-tool-choice"])
    assert (settings.tool_call_parser, settings.enable_auto_tool_choice) == ("hermes", True)
    assert parse_settings(["--model", "m", "--tool-call-parser", "none"]).tool_call_parser is None
    with pytest.raises(SystemExit):
        parse_settings(["--model", "m", "--enable-auto-tool-choice"])
