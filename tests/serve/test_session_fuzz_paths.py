"""Paths a randomised differential driver found or walked (a chat session continued turn by turn against the same
conversation sent fresh, across templates, endings, streams, logprobs and restarts): an answer that ended on a
special token the chat template does not write where it closes the message (Qwen's ``<|endoftext|>`` under ChatML)
is not fed before the closer, so that the session's tokens and next answer are the fresh conversation's; and a few
of the driver's rounds, kept as coverage."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from retnet.tokenization import train_byte_level_bpe, wrap_tokenizer
from tests.serve import test_session_turn_closing as turn_closing
from tests.serve.conftest import CORPUS, save_micro_model, serve_app

pytestmark = pytest.mark.anyio

IM_START, IM_END, BOS = "<|im_start|>", "<|im_end|>", "<s>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A BOS before every user turn, as Llama 2's; the answer's own leading space trimmed, as Llama 2's template does.
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
          "{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
          "{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")
# ChatML with tools, listed in the system message that opens the conversation, and tool results as messages.
TOOLS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
         "{% if m['role'] == 'system' and tools and loop.first %}\nTools: "
         "{{ tools | map(attribute='function.name') | join(',') }}{% endif %}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ADD = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
# One token each, with their leading space: an answer of them decodes to a text that encodes back to its tokens.
WORDS = (" you", " the", " I", " of", " a")
ASK, NEXT = "Hello! How are you?", "Thank you."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A micro model whose tokenizer knows ChatML's markers and a BOS as special tokens (EOS ``<|endoftext|>``,
    as Qwen's), adding none by itself."""
    backend = train_byte_level_bpe(CORPUS, vocab_size=384, min_frequency=1).backend_tokenizer
    backend.add_special_tokens([IM_START, IM_END, BOS])
    tokenizer = wrap_tokenizer(backend)
    tokenizer.bos_token = BOS
    return save_micro_model(tmp_path_factory.mktemp("retnet-session-fuzz"), tokenizer)


def word_ids(tokenizer) -> list[int]:
    return turn_closing.word_ids(tokenizer, WORDS)


async def chat(client, messages: list[dict], **fields) -> dict:
    """One greedy chat choice (a stream's chunks joined), with its prompt ids when not streamed, and usage."""
    r = await client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0,
                                                        "return_token_ids": True, **fields})
    assert r.status_code == 200, r.text
    if not fields.get("stream"):
        return {**r.json()["choices"][0], "usage": r.json()["usage"]}
    joined = {"message": {"content": ""}, "token_ids": [], "logprobs": None, "finish_reason": None}
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[len("data: "):])["choices"]:
                joined["message"]["content"] += choice["delta"].get("content") or ""
                joined["token_ids"] += choice.get("token_ids") or []
                if choice.get("logprobs"):
                    joined["logprobs"] = {"content": (joined["logprobs"] or {"content": []})["content"]
                                          + choice["logprobs"]["content"]}
                joined["finish_reason"] = choice.get("finish_reason") or joined["finish_reason"]
    return joined


def assert_same_answer(session: dict, fresh: dict) -> None:
    assert (session["token_ids"], session["finish_reason"], session["message"]["content"]) == \
        (fresh["token_ids"], fresh["finish_reason"], fresh["message"]["content"])
    if session["logprobs"] or fresh["logprobs"]:
        for ours, theirs in zip(session["logprobs"]["content"], fresh["logprobs"]["content"], strict=True):
            assert ours["token"] == theirs["token"] and ours["logprob"] == pytest.approx(theirs["logprob"], abs=1e-4)
            assert [t["token"] for t in ours["top_logprobs"]] == [t["token"] for t in theirs["top_logprobs"]]


# What a turn generates: the words, then (biased to it) the special token it ends on, unwritten by ChatML's closer.
ENDINGS = {
    "eos": lambda eos, im_start: {"allowed": [eos], "bias": eos, "finish": "stop"},
    "special_stop_token_included": lambda eos, im_start: {
        "allowed": [im_start], "bias": im_start, "finish": "stop",
        "fields": {"stop_token_ids": [im_start], "include_stop_str_in_output": True}},
    "special_token_at_max_tokens": lambda eos, im_start: {
        "allowed": [im_start], "bias": im_start, "finish": "length", "fields": {"max_tokens": 1, "min_tokens": 0}},
}


@pytest.mark.parametrize("ending", list(ENDINGS))
@pytest.mark.parametrize("restarted", [False, True], ids=["in_memory", "restarted"])
async def test_a_special_token_the_template_does_not_write_is_not_fed_before_the_closer(model_dir, tmp_path,
                                                                                          ending, restarted):
    """Before, an answer ended on ``<|endoftext|>`` under ChatML (whose closer is ``<|im_end|>`` and a newline)
    had the EOS in its session's state and then the whole closer: tokens the conversation sent fresh never has
    (its assistant message the returned text, which leaves the special token out), and another next answer."""
    overrides = {"chat_template": CHATML, "session_dir": str(tmp_path / "sessions")}
    async with serve_app(model_dir, **overrides) as client:
        tokenizer = client.app.state.serving.tokenizer
        end = ENDINGS[ending](tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_START))
        first = await chat(client, [{"role": "user", "content": ASK}], session_id="s", **{
            "max_tokens": 8, "min_tokens": 2, "allowed_token_ids": [*word_ids(tokenizer), *end["allowed"]],
            "logit_bias": {str(end["bias"]): 100}, **end.get("fields", {})})
        assert first["finish_reason"] == end["finish"] and first["token_ids"][-1] == end["bias"], first
        assert end["bias"] not in first["token_ids"][:-1] and IM_START not in first["message"]["content"]
        if not restarted:
            await check_next_turn(client, first)
    if restarted:  # the session read back from its file
        async with serve_app(model_dir, **overrides) as client:
            await check_next_turn(client, first)


async def check_next_turn(client, first: dict) -> None:
    """The session's next turn: its tokens and answer are the conversation's sent fresh."""
    tokenizer = client.app.state.serving.tokenizer
    following = {"max_tokens": 6, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    continued = await chat(client, [{"role": "user", "content": NEXT}], session_id="s", **following)
    whole = await chat(client, [{"role": "user", "content": ASK},
                                {"role": "assistant", "content": first["message"]["content"]},
                                {"role": "user", "content": NEXT}], **following)
    # The state holds the first prompt and the answer but its last token; the closer follows whole.
    assert first["prompt_token_ids"] + first["token_ids"][:-1] + continued["prompt_token_ids"] == \
        whole["prompt_token_ids"]
    assert continued["prompt_token_ids"][:2] == tokenizer.encode(IM_END + "\n", add_special_tokens=False)
    assert_same_answer(continued, whole)


async def test_a_repetition_penalty_does_not_count_the_token_left_out(model_dir):
    """Before, a session's history counted its answer's last token when the answer ended (the EOS here): the
    next turn, which leaves that token out, penalised it all the same, where the conversation sent fresh has it
    nowhere (and answers the EOS at once)."""
    async with serve_app(model_dir, chat_template=CHATML) as client:
        tokenizer = client.app.state.serving.tokenizer
        eos, words = tokenizer.eos_token_id, word_ids(tokenizer)
        first = await chat(client, [{"role": "user", "content": ASK}], session_id="s", max_tokens=8, min_tokens=2,
                           allowed_token_ids=[*words, eos], logit_bias={str(eos): 100})
        assert first["token_ids"][-1] == eos and eos not in first["token_ids"][:-1]
        following = {"max_tokens": 3, "allowed_token_ids": [*words, eos], "repetition_penalty": 10.0}
        continued = await chat(client, [{"role": "user", "content": NEXT}], session_id="s", **following)
        whole = await chat(client, [{"role": "user", "content": ASK},
                                    {"role": "assistant", "content": first["message"]["content"]},
                                    {"role": "user", "content": NEXT}], **following)
        assert whole["token_ids"] == [eos]
        assert continued["token_ids"] == whole["token_ids"]


async def test_a_turn_refused_before_it_ran_leaves_the_answers_last_token_to_feed(model_dir):
    """The token a chat turn leaves unfed is given back when the turn is refused before the engine takes it: a
    completion continuing the session afterwards goes on after it, as one that never saw the refused turn."""
    async with serve_app(model_dir, chat_template=CHATML) as client:
        tokenizer = client.app.state.serving.tokenizer
        eos = tokenizer.eos_token_id
        first = {"max_tokens": 8, "min_tokens": 2, "allowed_token_ids": [*word_ids(tokenizer), eos],
                 "logit_bias": {str(eos): 100}}
        completion = {"prompt": " the", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                      "return_token_ids": True, "logprobs": 1}
        answers = []
        for session_id, refused in (("plain", False), ("refused", True)):
            answer = await chat(client, [{"role": "user", "content": ASK}], session_id=session_id, **first)
            assert answer["token_ids"][-1] == eos
            if refused:  # past the templating: the grammar's schema is checked after
                r = await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": NEXT}], "session_id": session_id,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}})
                assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "param", "code"}, r.text
            r = await client.post("/v1/completions", json={**completion, "session_id": session_id})
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0])
        assert answers[0]["token_ids"] == answers[1]["token_ids"]
        assert answers[0]["logprobs"]["token_logprobs"] == pytest.approx(answers[1]["logprobs"]["token_logprobs"],
                                                                         abs=1e-4)


@pytest.mark.parametrize("restarted", [False, True], ids=["in_memory", "restarted"])
async def test_a_turn_cancelled_while_queued_leaves_the_session_as_it_was(model_dir, tmp_path, restarted):
    """A chat turn that would leave the answer's last token unfed, cancelled while it waited for a slot (its client
    left), never ran: the session keeps that token to feed, in memory as in its file. Before, the turn dropped it
    from the session in memory when it was queued, while the file kept it: a completion continuing the session
    went on from another state depending on whether the server had restarted."""
    from retnet.serve.protocol import ChatCompletionRequest

    overrides = {"chat_template": CHATML, "session_dir": str(tmp_path / "sessions"), "max_running": 1}
    completion = {"prompt": " the", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    answers = {}
    async with serve_app(model_dir, **overrides) as client:
        engine, serving = client.app.state.engine, client.app.state.serving
        eos = serving.tokenizer.eos_token_id
        first = {"max_tokens": 8, "min_tokens": 2, "allowed_token_ids": [*word_ids(serving.tokenizer), eos],
                 "logit_bias": {str(eos): 100}}
        for session_id in ("plain", "cancelled"):
            answer = await chat(client, [{"role": "user", "content": ASK}], session_id=session_id, **first)
            assert answer["token_ids"][-1] == eos
        # The only slot busy: the next turn waits in the queue, where its client leaves.
        blocker = asyncio.create_task(client.post("/v1/completions", json={
            "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "temperature": 0}))
        while not engine.running:
            await asyncio.sleep(0.01)
        run = await serving.start_chat(ChatCompletionRequest(
            messages=[{"role": "user", "content": NEXT}], session_id="cancelled", max_tokens=4))
        run.handle.cancel()
        while engine.sessions.sessions["cancelled"].busy:
            await asyncio.sleep(0.01)
        assert (await blocker).status_code == 200
        assert engine.sessions.sessions["cancelled"].pending == [eos]
        if not restarted:
            for session_id in ("plain", "cancelled"):
                r = await client.post("/v1/completions", json={**completion, "session_id": session_id})
                answers[session_id] = r.json()["choices"][0]["token_ids"]
    if restarted:
        async with serve_app(model_dir, **overrides) as client:
            for session_id in ("plain", "cancelled"):
                r = await client.post("/v1/completions", json={**completion, "session_id": session_id})
                answers[session_id] = r.json()["choices"][0]["token_ids"]
    assert answers["cancelled"] == answers["plain"]


def draw_fields(rng: random.Random, words: list[int], eos: int, im_end: int, im_start: int) -> tuple[dict, str]:
    """One turn's sampling fields, the same for the session's turn and the conversation sent fresh."""
    fields = {"max_tokens": rng.randint(1, 6), "allowed_token_ids": list(words)}
    kind = rng.choice(["length", "eos", "stop_string", "special_stop_token", "plain_stop_token"])
    if kind == "eos":
        fields.update(max_tokens=8, min_tokens=rng.randint(0, 3), logit_bias={str(eos): rng.choice([3, 100])})
        fields["allowed_token_ids"].append(eos)
    elif kind == "stop_string":  # a word, or a text across two of them
        word = rng.choice(WORDS)
        fields.update(max_tokens=8, stop=[rng.choice([word, word[-1] + rng.choice(WORDS)[:2]])])
    elif kind == "special_stop_token":
        token = rng.choice([eos, im_end, im_start])
        fields.update(max_tokens=8, min_tokens=rng.randint(0, 2), stop_token_ids=[token],
                      logit_bias={str(token): rng.choice([3, 100])})
        fields["allowed_token_ids"].append(token)
    elif kind == "plain_stop_token":
        fields.update(max_tokens=8, stop_token_ids=[rng.choice(words)])
    if rng.random() < 0.3:
        fields["include_stop_str_in_output"] = True
    if rng.random() < 0.4:
        fields.update(logprobs=True, top_logprobs=rng.randint(0, 3))
    if rng.random() < 0.3:
        fields["stream"] = True
    if rng.random() < 0.15:
        fields["repetition_penalty"] = 1.3
    return fields, kind


def sent_back(tokenizer, answer: dict, kind: str) -> str:
    """The assistant message of the conversation sent fresh: the returned text, and a stop string or a plain stop
    token with the rest of its token (the state holds them)."""
    if answer["finish_reason"] == "stop" and kind in ("stop_string", "plain_stop_token"):
        return tokenizer.decode(answer["token_ids"], skip_special_tokens=True)
    return answer["message"]["content"]


async def driver_turn(client, rng: random.Random, template: str | None, session_id: str, history: list[dict],
                      turn: int, tools: bool) -> bool:
    """One turn of a driver's round: the session's answer and the fresh conversation's are the same, a second
    choice or another model on the session is refused with an OpenAI error. ``history`` (the conversation sent
    fresh) grows by the turn; returns whether the round can go on (false: the answer's text renders as other
    tokens: a special token inside it; under Llama 2, which writes a space before an answer, one ended on the EOS,
    which the closer's space would follow, or one that does not open with a space)."""
    tokenizer = client.app.state.serving.tokenizer
    new = []
    if turn == 0 and template is not None and rng.random() < 0.6:
        new.append({"role": "system", "content": rng.choice(["Be brief.", "You are helpful."])})
    if template == TOOLS and turn > 0:
        new.append({"role": "tool", "content": str(rng.randint(0, 99)), "tool_call_id": "call_1"})
    new.append({"role": "user", "content": rng.choice([ASK, NEXT, "café 東京", "def add(a, b):"])})
    fields, kind = draw_fields(rng, word_ids(tokenizer), tokenizer.eos_token_id,
                               tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(IM_START))
    if tools:
        fields.update(tools=ADD, tool_choice="none")
    session = await chat(client, new, session_id=session_id, **fields)
    assert_same_answer(session, await chat(client, history + new, **fields))
    for refused, status in (({"n": 2}, 400), ({"model": "another"}, 404)):
        r = await client.post("/v1/chat/completions", json={"messages": new, "session_id": session_id,
                                                            "max_tokens": 1, **refused})
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    history += [*new, {"role": "assistant", "content": sent_back(tokenizer, session, kind)}]
    ids, special = session["token_ids"], client.app.state.engine.skipped_ids
    llama2_space = template == LLAMA2 and (ids[-1] == tokenizer.eos_token_id
                                           or not history[-1]["content"].startswith(" "))
    return not any(t in special for t in ids[:-1]) and not llama2_space


@pytest.mark.parametrize(("template", "seed"), [(None, 3), (CHATML, 7), (LLAMA2, 11), (TOOLS, 5)],
                         ids=["default", "chatml", "llama2", "tools"])
async def test_driver_rounds_continue_as_the_conversation_sent_fresh(model_dir, tmp_path, template, seed):
    """Rounds of the driver: a session's turns, with a system message, tool results, every way of ending, streams,
    logprobs and a repetition penalty, each answer the one of the conversation sent fresh; the last round restarted between turns
    (--session-dir)."""
    rng = random.Random(seed)
    overrides = {"session_dir": str(tmp_path / "sessions"), **({"chat_template": template} if template else {})}
    async with serve_app(model_dir, **overrides) as client:
        for round_ in range(2):
            history = []
            for turn in range(3):
                if not await driver_turn(client, rng, template, f"r{round_}", history, turn, template == TOOLS):
                    break
    history = []
    for turn in range(3):
        async with serve_app(model_dir, **overrides) as client:
            if not await driver_turn(client, rng, template, "restarted", history, turn, False):
                break


async def test_a_template_that_cannot_close_the_answer_is_a_400(model_dir, monkeypatch):
    """The check whether a turn leaves the answer's last token out renders the template's closer first: a template
    that cannot render there gets the templating's 400 naming the messages (it was a 500), and the server serves on."""
    from retnet.serve.serving import OpenAIServing

    async with serve_app(model_dir, chat_template=CHATML) as client:
        eos = client.app.state.serving.tokenizer.eos_token_id
        first = await chat(client, [{"role": "user", "content": ASK}], session_id="s", max_tokens=8, min_tokens=2,
                           allowed_token_ids=[*word_ids(client.app.state.serving.tokenizer), eos],
                           logit_bias={str(eos): 100})
        assert first["token_ids"][-1] == eos

        def unrenderable(self, template, tools, hidden):
            raise ValueError("no template renders this closer")

        with monkeypatch.context() as patch:
            patch.setattr(OpenAIServing, "_closing", unrenderable)
            r = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": NEXT}], "session_id": "s", "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "no template renders this closer" in r.json()["error"]["message"]
        await chat(client, [{"role": "user", "content": NEXT}], session_id="s", max_tokens=2)
