"""A chat session's next turn closes the assistant message its history ends inside, as the chat template does
between an answer and the next message: the session's token stream is the one of the conversation sent whole,
however the answer ended (its length, a stop string, the EOS or ChatML's ``<|im_end|>``), and the next answer
(greedy) is the same. A completion turn opens no message, so nothing is closed after one; session files keep
whether a message is open, and files written before they did continue as they did then."""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import pytest

from retnet.serve.serving import assistant_closer
from retnet.tokenization import train_byte_level_bpe, wrap_tokenizer
from tests.serve.conftest import CORPUS, save_micro_model, serve_app

pytestmark = pytest.mark.anyio

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ASK, NEXT = "Hello! How are you?", "Thank you."
# Words that are one token each, with their leading space: an answer made of them decodes to a text that encodes
# back to the same tokens, so the conversation sent whole has the answer's own tokens.
WORDS = (" you", " the", " I")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Overrides conftest's: a micro model whose tokenizer knows ChatML's markers as special tokens (its default
    chat template stays the built-in one, which ends a message with the EOS)."""
    backend = train_byte_level_bpe(CORPUS, vocab_size=384, min_frequency=1).backend_tokenizer
    backend.add_special_tokens([IM_START, IM_END])
    return save_micro_model(tmp_path_factory.mktemp("retnet-chatml"), wrap_tokenizer(backend))


def word_ids(tokenizer, words: tuple[str, ...] = WORDS) -> list[int]:
    ids = [tokenizer.encode(word, add_special_tokens=False) for word in words]
    assert all(len(each) == 1 for each in ids), ids
    return [each[0] for each in ids]


async def chat(client, messages: list[dict], **fields) -> dict:
    r = await client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0,
                                                        "return_token_ids": True, **fields})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


async def check_next_turn_as_sent_whole(client, session_id: str, first: dict, finish: str, stop: str = "",
                                        last: int | None = None) -> list[int]:
    """A session's first turn with ``first``'s fields (its answer of WORDS, ended by ``finish``, on the token
    ``last`` when given), then its next turn: the history's tokens and the next answer are those of the
    conversation sent whole, its assistant message the answer's text (and the ``stop`` string, whose tokens the
    state holds). Returns the next turn's prompt ids."""
    tokenizer = client.app.state.serving.tokenizer
    words = word_ids(tokenizer)
    answer = await chat(client, [{"role": "user", "content": ASK}], session_id=session_id, **{
        "allowed_token_ids": words, **first})
    assert answer["finish_reason"] == finish and last in (None, answer["token_ids"][-1]), answer
    content = answer["message"]["content"] + stop
    generated = [t for t in answer["token_ids"] if t in words]
    assert tokenizer.encode(content, add_special_tokens=False) == generated  # the inputs do what they should
    following = {"max_tokens": 6, "ignore_eos": True}
    continued = await chat(client, [{"role": "user", "content": NEXT}], session_id=session_id, **following)
    whole = await chat(client, [{"role": "user", "content": ASK}, {"role": "assistant", "content": content},
                                {"role": "user", "content": NEXT}], **following)
    history = answer["prompt_token_ids"] + answer["token_ids"] + continued["prompt_token_ids"]
    assert history == whole["prompt_token_ids"]
    assert continued["token_ids"] == whole["token_ids"]
    return continued["prompt_token_ids"]


async def test_the_default_templates_eos_closes_an_answer_however_it_ended(model_dir):
    async with serve_app(model_dir) as client:
        tokenizer = client.app.state.serving.tokenizer
        eos = tokenizer.eos_token_id
        # Ended by its length: the EOS the template writes after the answer was never generated.
        prompt = await check_next_turn_as_sent_whole(client, "length", {"max_tokens": 4}, "length")
        assert prompt[0] == eos
        # Ended by a stop string: its tokens are in the state, then the EOS.
        probe = await chat(client, [{"role": "user", "content": ASK}], max_tokens=4,
                           allowed_token_ids=word_ids(tokenizer))
        stop = tokenizer.decode(probe["token_ids"][2:3])
        prompt = await check_next_turn_as_sent_whole(client, "stopped", {"max_tokens": 8, "stop": [stop]}, "stop",
                                                    stop)
        assert prompt[0] == eos
        # Ended on the EOS itself (it was held back for two tokens): the state has it, and it is not written twice.
        prompt = await check_next_turn_as_sent_whole(client, "eos", {
            "max_tokens": 8, "min_tokens": 2, "allowed_token_ids": [*word_ids(tokenizer), eos],
            "logit_bias": {str(eos): 100}}, "stop", last=eos)
        assert prompt[0] != eos


@pytest.mark.parametrize("ending", ["im_end", "im_end_included", "length"])
async def test_chatml_closes_an_answer_with_its_newline_or_its_whole_closer(model_dir, ending):
    async with serve_app(model_dir, chat_template=CHATML) as client:
        tokenizer = client.app.state.serving.tokenizer
        im_end = tokenizer.convert_tokens_to_ids(IM_END)
        if ending.startswith("im_end"):  # the model stops on <|im_end|> (its EOS, as a Qwen model's)
            # (included in the output, a special token still decodes to nothing: not in the text, in the state)
            first = {"max_tokens": 8, "min_tokens": 2, "stop_token_ids": [im_end],
                     "allowed_token_ids": [*word_ids(tokenizer), im_end], "logit_bias": {str(im_end): 100},
                     "include_stop_str_in_output": ending == "im_end_included"}
            finish, last, closer = "stop", im_end, "\n"
        else:
            first, finish, last, closer = {"max_tokens": 4}, "length", None, IM_END + "\n"
        prompt = await check_next_turn_as_sent_whole(client, ending, first, finish, last=last)
        opened = tokenizer.apply_chat_template([{"role": "user", "content": NEXT}], tokenize=False,
                                               add_generation_prompt=True, chat_template=CHATML)
        assert prompt == tokenizer.encode(closer + opened, add_special_tokens=False)


@pytest.mark.parametrize(("template", "hidden", "written"), [
    # what the state holds past the returned answer: the stop token or string the template writes there first
    (CHATML, IM_END, "\n"), (CHATML, "", IM_END + "\n"), (CHATML, IM_END + "\n\n", ""),
    # a stop string the template writes elsewhere, or not at the closer's start: the whole closer follows it
    (CHATML, "\n", IM_END + "\n"), (CHATML, " I", IM_END + "\n"),
    (None, "<|endoftext|>", ""), (None, "", "<|endoftext|>"),
    # Llama 2's closer opens with a space the answer's EOS never had
    ("LLAMA2", "<|endoftext|>", ""),
])
def test_the_closer_is_written_past_what_the_answer_generated_of_it(model_dir, template, hidden, written):
    """An answer stopped on the template's end-of-turn marker, as a stop token or as a stop string (before, a
    stop string's marker, or a stop token that is not special, was followed by the whole closer: two markers)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from retnet.serve.serving import OpenAIServing

    serving = OpenAIServing.__new__(OpenAIServing)  # the attributes _closing reads, no engine
    serving.tokenizer, serving.assistant_closers, serving.content_formats = AutoTokenizer.from_pretrained(model_dir), {}, {}
    serving.settings = SimpleNamespace(chat_template_content_format="auto")
    template = LLAMA2 if template == "LLAMA2" else template
    assert OpenAIServing._closing(serving, template, None, hidden) == written


LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
          "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
QWEN3 = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
         "<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}")


@pytest.mark.parametrize(("template", "closer"), [
    (None, "<|endoftext|>"), (CHATML, IM_END + "\n"), (LLAMA2, " <|endoftext|>"),
    # The last assistant message rendered otherwise (Qwen3's reasoning) closes as the others do.
    (QWEN3, IM_END + "\n"),
    ("{{ raise_exception('a system message first') }}", None),
    ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}", None),
])
def test_the_closer_is_what_a_template_writes_between_an_answer_and_the_next_message(model_dir, template, closer):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    render = functools.partial(tokenizer.apply_chat_template, tokenize=False, chat_template=template)
    assert assistant_closer(render) == closer


async def test_an_eos_inside_the_closer_is_not_written_again(model_dir):
    # Llama 2's closer is a space, then the EOS: an answer that ended on the EOS cannot have the space before it
    # any more, and gets nothing after it; one cut by max_tokens gets the whole closer.
    async with serve_app(model_dir, chat_template=LLAMA2) as client:
        tokenizer = client.app.state.serving.tokenizer
        eos, words = tokenizer.eos_token_id, word_ids(tokenizer)
        user = [{"role": "user", "content": NEXT}]
        opened = tokenizer.encode("[INST] Thank you. [/INST]", add_special_tokens=False)
        for session_id, first, closer in [
            ("eos", {"min_tokens": 2, "allowed_token_ids": [*words, eos], "logit_bias": {str(eos): 100}}, []),
            ("length", {"allowed_token_ids": words}, tokenizer.encode(" " + tokenizer.eos_token)),
        ]:
            answer = await chat(client, user, session_id=session_id, max_tokens=4, **first)
            assert (answer["token_ids"][-1] == eos) == (session_id == "eos")
            following = await chat(client, user, session_id=session_id, max_tokens=2)
            assert following["prompt_token_ids"] == closer + opened


async def test_only_an_answer_inside_an_assistant_message_is_closed(model_dir):
    async with serve_app(model_dir) as client:
        tokenizer = client.app.state.serving.tokenizer
        eos = tokenizer.eos_token_id

        def rendered(messages: list[dict], **fields) -> list[int]:
            text = tokenizer.apply_chat_template(messages, tokenize=False, **fields)
            return tokenizer.encode(text, add_special_tokens=False)

        user = [{"role": "user", "content": NEXT}]
        req = {"session_id": "mixed", "max_tokens": 3, "ignore_eos": True}

        async def completion(prompt: str) -> list[int]:
            r = await client.post("/v1/completions", json={"prompt": prompt, "temperature": 0,
                                                           "return_token_ids": True, **req})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["prompt_token_ids"]

        # A completion's text is the client's own: nothing closes it before a chat turn, nor a chat answer
        # before a completion (whose text goes on where the answer ended).
        assert await completion("Hello") == tokenizer.encode("Hello", add_special_tokens=False)
        assert (await chat(client, user, **req))["prompt_token_ids"] == rendered(user, add_generation_prompt=True)
        assert await completion(" ok") == tokenizer.encode(" ok", add_special_tokens=False)
        assert (await chat(client, user, **req))["prompt_token_ids"] == rendered(user, add_generation_prompt=True)
        # The answer above is closed before the next messages; one after add_generation_prompt false follows the
        # user's message the template closed, and leaves nothing open.
        closed = await chat(client, user, add_generation_prompt=False, **req)
        assert closed["prompt_token_ids"] == [eos, *rendered(user)]
        assert (await chat(client, user, **req))["prompt_token_ids"] == rendered(user, add_generation_prompt=True)
        # An answer that continues the final (assistant's) message is inside it: closed before the next turn.
        final = [{"role": "assistant", "content": "Sure"}]
        continued = await chat(client, final, add_generation_prompt=False, continue_final_message=True, **req)
        assert continued["prompt_token_ids"] == [eos, *rendered(final, continue_final_message=True)]
        assert (await chat(client, user, **req))["prompt_token_ids"] == [eos, *rendered(user, add_generation_prompt=True)]


def session_file_metadata(path: Path) -> dict:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size])["__metadata__"]


def rewrite_metadata(path: Path, **changes) -> None:
    """``path``'s session file with its metadata changed (a value None: the key removed)."""
    from safetensors.torch import load, save

    data = path.read_bytes()
    meta = {**session_file_metadata(path), **changes}
    path.write_bytes(save(load(data), {key: value for key, value in meta.items() if value is not None}))


async def test_session_files_keep_the_open_message_and_older_files_continue_as_before(model_dir, tmp_path):
    sessions = tmp_path / "sessions"
    user = [{"role": "user", "content": NEXT}]
    req = {"max_tokens": 3, "ignore_eos": True}
    async with serve_app(model_dir) as client:  # never restarted
        tokenizer = client.app.state.serving.tokenizer
        eos = tokenizer.eos_token_id
        await chat(client, user, session_id="ref", **req)
        expected = await chat(client, user, session_id="ref", **req)
    assert expected["prompt_token_ids"][0] == eos
    async with serve_app(model_dir, session_dir=str(sessions)) as client:
        for session_id in ("s", "old", "bad"):
            await chat(client, user, session_id=session_id, **req)
        r = await client.post("/v1/completions", json={"prompt": "Hello", "session_id": "plain", **req})
        assert r.status_code == 200, r.text
    assert session_file_metadata(sessions / "s.safetensors")["assistant_open"] == "true"
    assert session_file_metadata(sessions / "plain.safetensors")["assistant_open"] == "false"
    rewrite_metadata(sessions / "old.safetensors", assistant_open=None)  # written before the field was kept
    rewrite_metadata(sessions / "bad.safetensors", assistant_open="1")
    async with serve_app(model_dir, session_dir=str(sessions)) as client:
        restarted = await chat(client, user, session_id="s", **req)
        assert (restarted["prompt_token_ids"], restarted["token_ids"]) == (expected["prompt_token_ids"],
                                                                           expected["token_ids"])
        old = await chat(client, user, session_id="old", **req)
        assert old["prompt_token_ids"] == expected["prompt_token_ids"][1:]  # no EOS, as such a file continued
        r = await client.post("/v1/chat/completions", json={"messages": user, "session_id": "bad", **req})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_corrupt", r.text
        assert "assistant_open" in r.json()["error"]["message"]


def test_a_stop_strings_cut_is_what_the_output_leaves_out():
    from retnet.serve.detokenize import StopStrings

    stops = StopStrings(["<|im_end|>"])
    assert stops.push(" you the<|im_") == " you the" and stops.cut == ""
    assert stops.push("end|>\n") == "" and stops.stopped and stops.cut == "<|im_end|>\n"
    included = StopStrings(["<|im_end|>"], include=True)
    assert included.push("a<|im_end|>b") == "a<|im_end|>" and included.cut == "b"
