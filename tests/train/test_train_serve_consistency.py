"""What chat SFT trains a model on against what the server feeds the same model: the ids of the prompt the
server runs for a conversation's prefix (its ``/tokenize`` with ``messages``) must be exactly the ids training
saw before that assistant turn, and the answer training teaches must end on a token the server stops on;
the text the server streams out of byte-level tokens must be the tokenizer's decoding of them."""

from __future__ import annotations

import asyncio
import json
import random
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from retnet.serve.detokenize import IncrementalDetokenizer
from retnet.tokenization import TokenBytes, render_pair, train_byte_level_bpe
from retnet.train.chat import (
    TARGET,
    ChatEncoder,
    check_conversations,
    check_prompt_completions,
    render_default,
)
from tests.serve.conftest import CORPUS, save_micro_model, serve_app

CALL = {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"x": 1}'}}
TOOLS = [{"type": "function", "function": {"name": "get", "description": "d",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
CONVERSATIONS = [
    [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2+3?"},
     {"role": "assistant", "content": "5 🙂 東京"}, {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You're welcome."}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
     {"role": "assistant", "content": None, "tool_calls": [CALL]},
     {"role": "tool", "content": '{"y": 2}', "tool_call_id": "c1", "name": "get"},
     {"role": "assistant", "content": "y is 2"}],
    [{"role": "user", "content": "  spaced\n\n"}, {"role": "assistant", "content": "\n leading newline, naïve"}],
]
# A template that renders what the default one leaves out (tool schemas, names, call ids, template variables), so
# that the server must pass them as training does
RICH_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{% for m in messages %}<{{ m.role }}"
    "{% if m.name %} name={{ m.name }}{% endif %}{% if m.tool_call_id %} id={{ m.tool_call_id }}{% endif %}>"
    "{{ m.content }}{% for c in m.tool_calls or [] %}[{{ c | tojson }}]{% endfor %}"
    "{% if flag is defined %}F{{ flag }}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A micro model and a BPE trained on code and rendered conversations, saved as the launcher exports them."""
    texts = CORPUS + [render_default(c) for c in check_conversations("c", "messages", CONVERSATIONS)] * 5
    # runs of newlines, which the BPE must join for the newline tests (the default template ended every message
    # with one; it ends them with the EOS now)
    texts += ["x = 1\n\n\ny = 2\n\n"] * 5
    return save_micro_model(tmp_path_factory.mktemp("consistency"),
                            train_byte_level_bpe(texts, vocab_size=400, min_frequency=1))


async def served_prompts(export, requests: list[dict], **settings) -> tuple[list[list[int]], set[int]]:
    """The ids ``/tokenize`` gives for each request, and the ids the engine stops on."""
    async with serve_app(export, **settings) as client:
        out = []
        for request in requests:
            response = await client.post("/tokenize", json=request)
            assert response.status_code == 200, response.text
            out.append(response.json()["tokens"])
        return out, set(client.app.state.engine.eos_ids)


def turns(encoder: ChatEncoder, conversation: list[dict], columns: dict | None = None):
    """(ids, flags) of one conversation as training encodes it, and the index of each assistant message."""
    messages = check_conversations("set.jsonl", "messages", [conversation], columns=columns)[0]
    ids, flags = encoder.encode([messages])
    return ids.tolist(), flags, [i for i, m in enumerate(conversation) if m["role"] == "assistant"]


def check_prefix(ids: list[int], flags: np.ndarray, prompt: list[int]) -> None:
    assert ids[: len(prompt)] == prompt
    # the answer starts right where the server's prompt ends, and no prompt token is trained as the answer
    assert flags[len(prompt)] & TARGET and not flags[len(prompt) - 1] & TARGET


def test_the_servers_chat_prompt_is_the_prefix_training_saw_before_each_answer(export):
    """Default template: system prompt, multi-turn, tool calls and a tool answer, content parts, whitespace."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    encoder = ChatEncoder(tokenizer)
    encoded = [turns(encoder, c) for c in CONVERSATIONS]
    requests = [{"messages": c[:i]} for c, (_, _, answers) in zip(CONVERSATIONS, encoded) for i in answers]
    prompts, stops = asyncio.run(served_prompts(export, requests))
    prompts = iter(prompts)
    for ids, flags, answers in encoded:
        for _ in answers:
            check_prefix(ids, flags, next(prompts))
        # a conversation's last answer is trained to end on a token the server stops on
        assert ids[-1] in stops and flags[-1] & TARGET


def test_an_answer_opening_with_a_newline_starts_where_the_servers_prompt_ends(export):
    """The default generation prompt ends with a newline; a byte-level BPE joins it with an answer's leading
    newline into one token when the conversation is encoded whole. The server's prompt ends with the newline
    alone, so the answer trained must start after it, not inside a token the server never prompts with."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    conversation = [{"role": "user", "content": "Show code"}, {"role": "assistant", "content": "\n\nx = 1"},
                    {"role": "user", "content": "More"}, {"role": "assistant", "content": "\ny = 2"}]
    whole = tokenizer.apply_chat_template(conversation, tokenize=False)
    joined = tokenizer.encode("\n\n\n", add_special_tokens=False)
    assert len(joined) < 3  # the BPE does join newlines (else this test would test nothing)
    ids, flags, answers = turns(ChatEncoder(tokenizer), conversation)
    (first, second), _ = asyncio.run(served_prompts(export, [{"messages": conversation[:i]} for i in answers]))
    check_prefix(ids, flags, first)
    # the later prompt's history holds the first answer as the server re-encodes it; the turn's own prompt end is
    # where training has it
    starts = [k for k in range(1, len(ids)) if flags[k] & TARGET and not flags[k - 1] & TARGET]
    assert len(starts) == 2 and ids[starts[1] - 1] == second[-1]
    assert tokenizer.decode(ids[starts[1] - 1:starts[1]]) == "\n"
    # nothing lost or added by the cuts (the template's EOS closing the last message is the closing EOS)
    assert tokenizer.decode(ids) == whole


def test_a_standard_completion_opening_with_a_newline_starts_where_the_servers_prompt_ends(export):
    """A standard prompt-completion row: the prompt as /v1/completions encodes it, then the completion."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    (sequence,) = [c for _, c in check_prompt_completions("set.jsonl", ["Show code:\n"], ["\n\nx = 1"])]
    ids, flags = ChatEncoder(tokenizer).encode([sequence])
    (prompt,), stops = asyncio.run(served_prompts(export, [{"prompt": "Show code:\n"}]))
    check_prefix(ids.tolist(), flags, prompt)
    assert tokenizer.decode(ids[:-1]) == "Show code:\n\n\nx = 1" and ids[-1] in stops and flags[-1] & TARGET


def test_a_prompt_ending_in_a_run_of_newlines_is_the_servers_prompt(export):
    """No token straddles the answer here: the BPE's `\\s+(?!\\S)` splits the prompt's "\\n\\n" before the answer's
    first character, where the server's prompt alone ends on one "\\n\\n" token."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    (sequence,) = [c for _, c in check_prompt_completions("set.jsonl", ["Show code:\n\n"], ["x = 1"])]
    ids, flags = ChatEncoder(tokenizer).encode([sequence])
    (prompt,), _ = asyncio.run(served_prompts(export, [{"prompt": "Show code:\n\n"}]))
    check_prefix(ids.tolist(), flags, prompt)


def test_a_tokenizer_that_trims_its_offsets_is_cut_where_the_answer_starts(export, tmp_path):
    """GPT-2's ByteLevel post-processor trims the space out of a token's offsets (" Paris" starting after it): the
    token straddling the answer's start went unseen, and the answer started inside it."""
    trimming = tmp_path / "trimming"
    shutil.copytree(export, trimming)
    state = json.loads((trimming / "tokenizer.json").read_text())
    state["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                               "use_regex": True}
    (trimming / "tokenizer.json").write_text(json.dumps(state))
    tokenizer = AutoTokenizer.from_pretrained(trimming)
    (sequence,) = [c for _, c in check_prompt_completions("set.jsonl", ["Answer: "], ["return a + b"])]
    ids, flags = ChatEncoder(tokenizer).encode([sequence])
    check_prefix(ids.tolist(), flags, tokenizer("Answer: ")["input_ids"])


def test_tools_names_ids_and_template_variables_reach_both_alike(export, tmp_path):
    """A row's tools and chat_template_kwargs go to the template as a request's tools and chat_template_kwargs."""
    rich = tmp_path / "rich"
    shutil.copytree(export, rich)
    tokenizer = AutoTokenizer.from_pretrained(rich)
    tokenizer.chat_template = RICH_TEMPLATE
    tokenizer.save_pretrained(rich)
    conversation = CONVERSATIONS[1]
    ids, flags, answers = turns(ChatEncoder(tokenizer), conversation,
                                {"tools": [TOOLS], "chat_template_kwargs": [{"flag": 7}]})
    requests = [{"messages": conversation[:i], "tools": TOOLS, "tool_choice": "none",
                 "chat_template_kwargs": {"flag": 7}} for i in answers]
    prompts, stops = asyncio.run(served_prompts(rich, requests))
    for prompt in prompts:
        check_prefix(ids, flags, prompt)
        # this template ends every turn with EOS: every answer, not only the last, is trained to stop
        answer = []
        while len(prompt) + len(answer) < len(ids) and flags[len(prompt) + len(answer)] & TARGET:
            answer.append(ids[len(prompt) + len(answer)])
        assert stops & set(answer)


def test_a_preference_prompt_is_the_servers_chat_prompt(export):
    """DPO and GRPO render a conversational prompt with render_pair: the server's ids for the same messages."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    encoder = ChatEncoder(tokenizer)
    prompt = CONVERSATIONS[0][:4]
    head, completion = render_pair(prompt, [[{"role": "assistant", "content": "Bye."}]], encoder.render)
    (served,), _ = asyncio.run(served_prompts(export, [{"messages": prompt}]))
    assert encoder.backend.encode(head, add_special_tokens=False).ids == served
    assert completion.startswith("Bye.")


def test_streamed_text_of_split_characters_is_the_tokenizers_decoding(export):
    """Byte-level tokens that split emoji and CJK characters (after a context that may end inside one): the
    pieces the detokenizer releases join into exactly the decoding of the generated tokens."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    decode = lambda ids: tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=True)
    token_bytes = TokenBytes(tokenizer)
    single = [t for t in range(len(tokenizer)) if len(token_bytes(t)) == 1 and token_bytes(t)[0] >= 0x80]
    assert single  # the byte tokens that split a character
    rng = random.Random(0)
    texts = ["東京 🙂 café", "👩\u200d👩\u200d👧 naïve", "Ω≈ç√∫ abc\n"]
    checked = 0
    for _ in range(300):
        ids = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.5:
                ids += [byte for ch in rng.choice(texts) for byte in _byte_tokens(tokenizer, ch, single, token_bytes)]
            else:
                ids += tokenizer.encode(rng.choice(texts), add_special_tokens=False)
        cut = rng.randint(0, len(ids))
        context, generated = ids[:cut], ids[cut:]
        raw = b"".join(token_bytes(t) for t in context)
        whole = raw.decode("utf-8", errors="strict") if _decodes(raw) else None
        if whole is None:  # the engine holds such a context's tail back (unfinished_tail); tested there
            continue
        detokenizer = IncrementalDetokenizer(decode, context)
        streamed = "".join(detokenizer.push(t) for t in generated) + detokenizer.flush()
        assert streamed == decode(generated), (context, generated)
        checked += 1
    assert checked > 100


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _byte_tokens(tokenizer, character: str, single: list[int], token_bytes) -> list[int]:
    """``character`` spelled as one-byte tokens where the vocabulary has them (a character split across tokens)."""
    by_byte = {token_bytes(t)[0]: t for t in single}
    raw = character.encode("utf-8")
    if all(b in by_byte for b in raw) and len(raw) > 1:
        return [by_byte[b] for b in raw]
    return tokenizer.encode(character, add_special_tokens=False)


def test_the_next_turns_header_is_no_target_after_an_answer_ending_in_a_space(tmp_path):
    """Offsets untrimmed, " user" after an answer "Hello " starts on the answer's last character: the next turn's
    header, not the answer's, and no target."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_byte_level_bpe(CORPUS + [" user user user: hi assistant: Hello user: more"] * 50,
                                     vocab_size=600, min_frequency=1)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["post_processor"]["trim_offsets"] = True
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                        eos_token="<|endoftext|>", pad_token="<|pad|>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    conversation = [{"role": "user", "content": "hi "}, {"role": "assistant", "content": "Hello "},
                    {"role": "user", "content": "more "}]
    ids, flags = ChatEncoder(tokenizer).encode([conversation])
    targets = [tokenizer.decode([int(i)]) for i, flag in zip(ids, flags) if flag & TARGET]
    assert "".join(targets).strip() == "Hello", targets
