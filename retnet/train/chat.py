"""Conversations -> token ids and a loss mask, for supervised fine-tuning (``data.format = "chat"``).

Each row's ``data.messages_field`` is a list of ``{"role", "content"}`` messages, as TRL's SFTTrainer takes them
(:func:`template_messages`): ShareGPT's ``{"from", "value"}`` too (human/gpt as user/assistant), an assistant's
``tool_calls`` standing for its content, text content parts; a row's ``tools`` and ``chat_template_kwargs``
columns (TRL's) go to the template with its conversation (:class:`Conversation`). A conversation is rendered
with the tokenizer's chat template as the server renders a prompt (the tokenizer's own template, else
``retnet.tokenization.DEFAULT_CHAT_TEMPLATE``; ``apply_chat_template(messages, tokenize=False)``, no
generation prompt) and encoded as the server encodes it (``tokenizer.encode(text, add_special_tokens=False)``:
the template's special tokens, ``<|im_start|>`` and the like, are the special tokens, not their text).

The loss mask: assistant message ``i``'s span runs from the end of ``render(messages[:i],
add_generation_prompt=True)`` (what the server prompts with) to the end of ``render(messages[:i + 1])``
(its content and the template's end-of-turn markers); a token that overlaps a span is a target. Where a token
would straddle a span's start (a byte-level BPE joins the generation prompt's newline and an answer's leading
newline), the conversation is encoded in pieces cut there, so that the answer starts after exactly the ids the
server prompts with (:meth:`ChatEncoder._cut_at_answers`). Every
prefix rendering must be a prefix of the whole conversation's, or the spans are not where the tokens are:
such a template is refused. EOS follows each conversation, a target too when the conversation ends with an
assistant message (the server stops on EOS), and it is where the next conversation's packed segment starts. A
template that ends each message with the EOS (``DEFAULT_CHAT_TEMPLATE``, Zephyr-like ones without the newline
after it) renders that EOS itself: a conversation whose encoding ends with the EOS gets no second one, its own is
the closing EOS (so an answer is never trained to be followed by EOS again).

TRL's prompt-completion rows (a set with no messages column, :func:`messages_column`'s, but ``prompt`` and
``completion`` ones: :func:`prompt_completion`) are read as TRL's SFTTrainer reads them, with its default
``completion_only_loss`` (:func:`check_prompt_completions`). *Standard* (two strings, a :class:`Completion`): no
template, the sequence is the prompt's text followed by the completion's, encoded as the server encodes a completion
request's prompt and TRL its text (``tokenizer.encode(prompt + completion)``, the tokenizer's added special tokens
such as a BOS included), then EOS (the one the tokenizer appends, if it appends one: not twice); the targets are
the tokens that overlap the completion's characters, and the EOS.
*Conversational* (two lists of messages): rendered as the conversation prompt + completion, its targets the
assistant messages of the completion (the spans above; TRL's prompt, rendered with the generation prompt, ends where
such a span starts). ``assistant_only_loss`` False (TRL's ``completion_only_loss=False``) makes every token a
target. A row whose completion is empty is dropped, as an empty conversation is.

Per token one ``uint8`` of flags: :data:`TARGET` (its label counts in the loss) and :data:`BOUNDARY` (the EOS
that ends a conversation: a packed segment starts there). Not every EOS: a template whose end of turn is the
tokenizer's EOS (ChatML tokenizers whose EOS is ``<|im_end|>``) has one in every turn, which must not cut the
conversation into segments that forget the question before the answer.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np

from retnet.train.config import ConfigError

TARGET = 1  # the token's label counts in the loss
BOUNDARY = 2  # the EOS that ends a conversation: a packed segment starts at it


def chat_template(tokenizer) -> str | None:
    """The ``chat_template`` argument of ``apply_chat_template``, as the server passes it: None (the
    tokenizer's own, transformers picks it) when the tokenizer has one, else the project's default."""
    from retnet.tokenization import DEFAULT_CHAT_TEMPLATE

    return None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE


def template_identity(tokenizer) -> dict[str, Any]:
    """What decides a conversation's rendering besides its messages: the template and the special tokens'
    texts a template may write (``{{ bos_token }}``). Part of the token cache's key."""
    return {"chat_template": chat_template(tokenizer) or tokenizer.chat_template,
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            # how rows become the template's messages: 2 converts ShareGPT's, renders tool calls and a row's tools
            # and chat_template_kwargs (a set cached before, with such columns or nested None fills, renders
            # otherwise now)
            "messages": 2,
            # an answer's first token starts where the server's prompt ends (a token cache of before could hold one
            # that straddled it)
            "answers_cut": 2,
            # a conversation whose rendering ends with the EOS (the default template's) closes on that one, not a
            # second (a token cache of before held EOS, EOS; and its default template ended messages with "\n")
            "closing_eos": 1,
            # a token cache of before held such a tokenizer's standard prompt-completion rows with its EOS and ours
            **({"appended_eos": True} if appends_eos(tokenizer) else {})}


def appends_eos(tokenizer) -> bool:
    """Whether the tokenizer's post-processor ends an encoding with EOS (Llama's and Mistral's ``add_eos_token``).
    Probed on text, not "": a BOS that is also the EOS (GPT-2's ``add_bos_token``) is all an empty encoding holds."""
    encoding = tokenizer.backend_tokenizer.encode("a", add_special_tokens=True)
    return _ends_with_added_eos(encoding, tokenizer.eos_token_id)


def _ends_with_added_eos(encoding, eos: int | None) -> bool:
    # special_tokens_mask marks the post-processor's tokens only: an EOS written in the text is 0
    return bool(encoding.ids) and encoding.ids[-1] == eos and encoding.special_tokens_mask[-1] == 1


def render_default(messages: list[dict[str, Any]] | Completion) -> str:
    """A conversation rendered with ``DEFAULT_CHAT_TEMPLATE``, the template of the BPE a run trains (what the
    BPE is trained on: it is not there yet to render them); a standard prompt-completion row as its text. The
    template's ``{{ eos_token }}`` renders as nothing here: the EOS is a special token, no text to learn merges
    from (the BPE trainer would learn ``<|endoftext|>``'s pieces)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from retnet.tokenization import DEFAULT_CHAT_TEMPLATE

    if isinstance(messages, Completion):  # no template: the text as it is trained on
        return messages.prompt + messages.completion
    rendered, _ = render_jinja_template(conversations=[list(messages)], chat_template=DEFAULT_CHAT_TEMPLATE,
                                        tools=getattr(messages, "tools", None),
                                        **(getattr(messages, "template_kwargs", None) or {}))
    return rendered[0]


# ShareGPT's roles as the server's requests name them. TRL's maybe_convert_to_chatml renames the keys only, which
# leaves "human"/"gpt" turns no template or assistant-only loss (keyed on "assistant") knows; other roles are kept.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
# TRL's SFTTrainer reads a ShareGPT set's conversations from this column (maybe_convert_to_chatml renames it)
SHAREGPT_COLUMN = "conversations"
TOOLS_COLUMN = "tools"  # TRL's: a row's tool schemas, passed to the chat template (a list, or its JSON text)
KWARGS_COLUMN = "chat_template_kwargs"  # TRL's: a row's template variables (Qwen3's enable_thinking ...)
PROMPT, COMPLETION = "prompt", "completion"  # TRL's prompt-completion columns
# The columns besides the messages TRL's SFTTrainer gives the template per row
CHAT_COLUMNS = (TOOLS_COLUMN, KWARGS_COLUMN)
# What check_conversations' columns takes (a data loader passes those the set has): CHAT_COLUMNS, and ShareGPT's
# column beside a default messages one, whose conversation a row with empty messages would lose unseen
ROW_COLUMNS = (*CHAT_COLUMNS, SHAREGPT_COLUMN)
# apply_chat_template's own arguments, which a row's chat_template_kwargs must not set (the server refuses them so),
# and render_jinja_template's "conversations", which every rendering passes itself (a TypeError, not a variable)
_TEMPLATING_ARGUMENTS = frozenset({
    "conversation", "conversations", "messages", "tools", "documents", "chat_template", "tokenize",
    "add_generation_prompt", "continue_final_message", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


class Conversation(list):
    """A conversation's messages with what else its template gets from the row: the ``tools`` schemas and the
    ``template_kwargs`` (its ``chat_template_kwargs``)."""

    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] | None = None
    # a conversational prompt-completion row's: the index of the completion's first message (the prompt's come
    # before it, and no assistant message among them is a target)
    completion_start: int = 0

    def like(self, messages: list[dict[str, Any]]) -> Conversation:
        """``messages`` (a prefix of these) with this conversation's tools, template variables and completion."""
        out = Conversation(messages)
        out.tools, out.template_kwargs, out.completion_start = self.tools, self.template_kwargs, self.completion_start
        return out


class Completion(NamedTuple):
    """A standard prompt-completion row (TRL's): trained on as the prompt's text followed by the completion's, no
    template; the completion's tokens are the targets."""

    prompt: str
    completion: str


def messages_column(field: str, columns: Iterable[str] | None) -> str:
    """The column a chat set's conversations are read from: ``field`` (``data.messages_field``), or TRL's ShareGPT
    ``conversations`` when ``field`` is the default ``messages`` and the set has no such column but that one (as
    TRL's SFTTrainer reads it)."""
    columns = None if columns is None else list(columns)
    if field == "messages" and columns is not None and field not in columns and SHAREGPT_COLUMN in columns:
        return SHAREGPT_COLUMN
    return field


def prompt_completion(field: str, columns: Iterable[str] | None) -> bool:
    """Whether a chat set's rows are TRL's prompt-completion ones: it has no column of conversations
    (:func:`messages_column`'s) but the :data:`PROMPT` and :data:`COMPLETION` columns (TRL's SFTTrainer reads a
    set with a ``prompt`` column so), and ``field`` is the default ``messages``: a ``data.messages_field`` set to
    another name must be there (a typo is refused, not read as prompts and completions)."""
    if columns is None or field != "messages":  # a column named on purpose: its absence is refused, not guessed
        return False
    columns = list(columns)
    return messages_column(field, columns) not in columns and PROMPT in columns and COMPLETION in columns


def check_conversations(dataset: str, field: str, rows: Iterable[Any], first_row: int = 0,
                        columns: dict[str, Iterable[Any]] | None = None) -> list[list[dict[str, Any]]]:
    """The non-empty conversations of ``rows`` (a column's values, in row order), each message as the template
    reads it (:func:`template_messages`: ``role`` and ``content`` strings, ShareGPT's ``from``/``value`` converted,
    tool calls as the server renders them, plus any other key the row sets). An empty or missing conversation is
    dropped, as empty documents are; anything else that is not a list of messages is refused with its row index
    (``first_row`` is the first row's: a streamed row is checked alone, at its place in the stream).

    ``columns``: the rows' other columns of :data:`ROW_COLUMNS` (TRL's ``tools``, ``chat_template_kwargs``), by
    name, in the same order; a conversation a row gives either is a :class:`Conversation` carrying them. With the
    default ``field`` ``messages``, an empty row whose ShareGPT ``conversations`` holds one is refused, not dropped."""
    conversations = []
    rows = list(rows)
    tools, kwargs, sharegpt = _chat_columns(columns, len(rows))
    for index, (row, schemas, variables, elsewhere) in enumerate(zip(rows, tools, kwargs, sharegpt, strict=True),
                                                                 start=first_row):
        if row is None or (isinstance(row, list) and not row):
            if field == "messages" and elsewhere:
                # a set whose rows mix the two layouts: ShareGPT's column is read only when there is no messages one
                raise ConfigError(f"data.messages_field {field!r} of {dataset!r}, row {index}: empty, while its "
                                  f"{SHAREGPT_COLUMN!r} holds a conversation ({elsewhere!r:.80}); the set has both "
                                  f"columns, so {field!r} is read and that conversation would be dropped: give every "
                                  f"row its conversation in one of them")
            continue
        problem = conversation_problem(row)
        if problem:
            raise ConfigError(f"data.messages_field {field!r} of {dataset!r}, row {index}: {problem}; expected a "
                              f"list of {{'role': str, 'content': str}} messages (or ShareGPT's {{'from', 'value'}}; "
                              f"an assistant's tool_calls may stand for its content)")
        messages = template_messages(row)
        schemas, variables = check_tools(dataset, index, schemas), check_template_kwargs(dataset, index, variables)
        if schemas is not None or variables is not None:
            messages = Conversation(messages)
            messages.tools, messages.template_kwargs = schemas, variables
        conversations.append(messages)
    return conversations


def _chat_columns(columns: dict[str, Iterable[Any]] | None, rows: int) -> tuple[list, list, list]:
    """(tools, chat_template_kwargs, ShareGPT's conversations) of ``rows`` rows: the columns' values, None for a
    column not given."""
    unknown = sorted(set(columns or {}) - set(ROW_COLUMNS))
    if unknown:  # a caller's mistake, not the data's
        raise ValueError(f"columns {unknown} are none of {ROW_COLUMNS}")
    tools, kwargs, sharegpt = ([None] * rows if (columns or {}).get(name) is None else list(columns[name])
                               for name in ROW_COLUMNS)
    return tools, kwargs, sharegpt


def check_prompt_completions(dataset: str, prompts: Iterable[Any], completions: Iterable[Any], first_row: int = 0,
                             columns: dict[str, Iterable[Any]] | None = None
                             ) -> list[tuple[int, Completion | Conversation]]:
    """(row index, sequence) of TRL's prompt-completion rows (the :data:`PROMPT` and :data:`COMPLETION` columns'
    values, in row order; ``first_row``: the first row's index): a :class:`Completion` of two strings (standard),
    a :class:`Conversation` of two lists of messages (conversational: the prompt's messages then the completion's,
    ``completion_start`` between them, with the row's ``columns`` of :data:`CHAT_COLUMNS` as
    :func:`check_conversations` takes them). A row whose completion is empty (``""``, whitespace, ``[]``) is
    dropped: it teaches nothing but its EOS. Refused with a ConfigError naming the dataset, the row and the column:
    a missing (None) prompt or completion, a prompt that is neither a string nor a list of messages, a completion
    of another kind than its prompt."""
    prompts, completions = list(prompts), list(completions)
    tools, kwargs, _ = _chat_columns(columns, len(prompts))  # (a prompt-completion set has no ShareGPT column)
    kept = []
    for index, (prompt, completion, schemas, variables) in enumerate(
            zip(prompts, completions, tools, kwargs, strict=True), start=first_row):
        refusal = _prompt_completion_problem(prompt, completion)
        if refusal:
            column, problem, expected = refusal
            raise ConfigError(f"data.format 'chat': column {column!r} of {dataset!r}, row {index}: {problem}; "
                              f"expected {expected}")
        if not completion or (isinstance(completion, str) and completion.isspace()):
            continue
        if isinstance(prompt, str):
            kept.append((index, Completion(prompt, completion)))
            continue
        conversation = Conversation(template_messages(prompt) + template_messages(completion))
        conversation.completion_start = len(prompt)
        conversation.tools = check_tools(dataset, index, schemas)
        conversation.template_kwargs = check_template_kwargs(dataset, index, variables)
        kept.append((index, conversation))
    return kept


def _prompt_completion_problem(prompt: Any, completion: Any) -> tuple[str, str, str] | None:
    """(the column, what is wrong with it, what was expected) of a prompt-completion row that cannot be read, or
    None."""
    either = ("a string (standard format) or a list of {'role': str, 'content': str} messages (conversational "
              "format)")
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            return COMPLETION, _holds(completion), "a string, as the row's prompt is (standard format)"
        return None
    if not isinstance(prompt, list):
        return PROMPT, _holds(prompt), either
    messages = "a list of {'role': str, 'content': str} messages, as the row's prompt is (conversational format)"
    problem = conversation_problem(prompt)
    if problem:
        return PROMPT, problem, either
    if not isinstance(completion, list):
        return COMPLETION, _holds(completion), messages
    problem = conversation_problem(completion)
    return (COMPLETION, problem, messages) if problem else None


def _holds(value: Any) -> str:
    return "holds None (a missing value)" if value is None else f"holds {type(value).__name__} {value!r:.80}"


def check_template_kwargs(dataset: str, row: int, value: Any, data_format: str = "chat") -> dict[str, Any] | None:
    """A row's ``chat_template_kwargs`` (TRL's trainers pass them to the template with the row's conversations):
    None or an empty dict for none; ``datasets``' None fills left out. A ConfigError naming ``data_format`` (the
    ``data.format`` that reads the row) and the row for anything but a dict of the template's variables."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"data.format {data_format!r}: column {KWARGS_COLUMN!r} of {dataset!r}, row {row}: holds "
                          f"{type(value).__name__} {value!r:.80}; expected a dict of the template's variables "
                          f"({{'enable_thinking': false}})")
    value = _without_none(value)
    reserved = sorted(_TEMPLATING_ARGUMENTS & set(value))
    if reserved:
        raise ConfigError(f"data.format {data_format!r}: column {KWARGS_COLUMN!r} of {dataset!r}, row {row}: "
                          f"{reserved[0]!r} is an argument of the templating, not a template variable")
    return value or None


def check_tools(dataset: str, row: int, value: Any) -> list[dict[str, Any]] | None:
    """A row's ``tools`` value as the template reads it (TRL's SFTTrainer's): None or an empty list for none, a
    list of tool schemas or its JSON text (how a set whose tools differ in shape stores them); ``datasets``' None
    fills left out. A ConfigError naming the row otherwise."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except ValueError as error:
            raise ConfigError(f"data.format 'chat': column {TOOLS_COLUMN!r} of {dataset!r}, row {row}: holds text "
                              f"that is no JSON ({error}): {value!r:.80}") from None
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise ConfigError(f"data.format 'chat': column {TOOLS_COLUMN!r} of {dataset!r}, row {row}: holds "
                          f"{type(value).__name__} {value!r:.80}; expected a list of tool schemas ({{'type': "
                          f"'function', 'function': {{'name': ..., 'parameters': ...}}}}) or its JSON text")
    return _without_none(value)


def _without_none(value: Any) -> Any:
    """``value`` without the dict keys that hold None, at every depth: ``datasets`` (Arrow) gives every dict of a
    column every key any of them has, None where it had none (TRL's remove_none_values)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _chatml(message: dict[str, Any]) -> dict[str, Any]:
    """A ShareGPT message (``from``/``value``) as a role/content one (TRL's maybe_convert_to_chatml), its
    human/gpt roles as user/assistant (:data:`SHAREGPT_ROLES`); any other message as it is."""
    if message.get("role") is not None or message.get("from") is None:
        return message
    out = {k: v for k, v in message.items() if k not in ("from", "value")}
    speaker = message["from"]
    out["role"] = SHAREGPT_ROLES.get(speaker, speaker) if isinstance(speaker, str) else speaker
    if out.get("content") is None:
        out["content"] = message.get("value")
    return out


def _call_problem(calls: Any) -> bool:
    """Whether ``tool_calls`` is no list of calls, each naming its function (OpenAI's ``{"type": "function",
    "function": {"name", "arguments"}}``, or the function's dict alone, which templates also read). An empty list
    is none (sets give every assistant message one)."""
    if not isinstance(calls, list):
        return True
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return True
    return False


def conversation_problem(row: Any) -> str | None:
    """What makes ``row`` no list of messages (``"message 1 has content None"``), or None when it is one. A
    message: ``role`` and ``content`` strings (or ShareGPT's ``from`` and ``value``); an assistant's
    ``tool_calls`` may stand for its content (None, OpenAI's and TRL's); content may be a list of text parts
    (OpenAI's ``{"type": "text", "text": ...}``)."""
    if not isinstance(row, list):
        return f"holds {type(row).__name__} {row!r:.80}"
    for number, message in enumerate(row):
        if not isinstance(message, dict):
            return f"message {number} is {type(message).__name__} {message!r:.80}"
        message = _chatml(message)
        if not isinstance(message.get("role"), str) or not message["role"]:
            keys = sorted(k for k, v in message.items() if v is not None)
            return f"message {number} has role {message.get('role')!r:.80} (its keys: {keys})"
        calls = message.get("tool_calls")
        if calls is not None and _call_problem(calls):
            return (f"message {number} has tool_calls {calls!r:.80}, not a list of {{'type': 'function', "
                    f"'function': {{'name': str, 'arguments': ...}}}} calls")
        for arguments in [] if calls is None else [call.get("function", call).get("arguments") for call in calls]:
            # Trained on, they are the answer: text that is no JSON (a Python repr "{'city': 'Oslo'}") would be
            # rendered as the server reads it in a history, {}, and the model taught calls without arguments.
            if isinstance(arguments, str) and arguments.strip() and not _is_json(arguments):
                return (f"message {number} has a tool call whose arguments {arguments!r:.80} are no JSON text "
                        f"(an object, or its JSON text)")
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                part = _without_none(part) if isinstance(part, dict) else {}
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    return (f"message {number} has a content part of type {part.get('type')!r:.40} ({part!r:.80}); "
                            f"only text parts ({{'type': 'text', 'text': str}}) are supported")
        elif not isinstance(content, str) and not (content is None and calls):
            return f"message {number} has content {content!r:.80}"
    return None


def template_messages(row: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A checked conversation's messages as the template reads them, as the server renders a request's
    (``retnet.serve.tools.template_message``): ShareGPT's converted (:func:`_chatml`), without the keys ``datasets``
    filled with None where only some messages (or calls) have them, text parts joined by newlines, a tool-calling
    message's missing content "" and its calls' JSON-text arguments parsed (HF's templates take an object)."""
    out = []
    for message in row:
        message = _without_none(_chatml(message))
        if isinstance(message.get("content"), list):  # the server's ChatMessage.text(): vLLM joins them so
            message["content"] = "\n".join(part["text"] for part in message["content"])
        if "tool_calls" in message:
            message.setdefault("content", "")
            message["tool_calls"] = [_parsed_arguments(call) for call in message["tool_calls"]]
        out.append(message)
    return out


def _parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    target = function if isinstance(function, dict) else call
    arguments = target.get("arguments")
    if not isinstance(arguments, str):
        return call
    if not arguments.strip():  # a call without arguments: {}, as the server (and vLLM) reads it
        parsed = {}
    else:
        try:
            parsed = json.loads(arguments)
        except ValueError:  # (refused by conversation_problem)
            return call
    target = {**target, "arguments": parsed}
    return {**call, "function": target} if isinstance(function, dict) else target


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _untrimmed(processor: dict | None) -> None:
    """A tokenizer.json post-processor (a ``Sequence``'s too) with ByteLevel's ``trim_offsets`` off, in place."""
    if isinstance(processor, dict):
        if processor.get("type") in ("ByteLevel", "RobertaProcessing"):
            processor["trim_offsets"] = False
        for inner in processor.get("processors") or []:
            _untrimmed(inner)


class ChatEncoder:
    """Conversations -> (ids, flags) with ``tokenizer``; ``assistant_only_loss`` False makes every token a target."""

    def __init__(self, tokenizer, assistant_only_loss: bool = True, dataset: str = ""):
        from tokenizers import Tokenizer

        self.tokenizer, self.assistant_only_loss, self.dataset = tokenizer, assistant_only_loss, dataset
        self.template = chat_template(tokenizer)
        # The backend as the server's tokenizer.encode runs it: special tokens' text as the special tokens (the
        # backend's default; document_encoder turns that off for plain text), whole, unpadded.
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        # offsets that keep the space a token holds (GPT-2's ByteLevel trims it: " Paris" read as starting after
        # the space, and a token straddling an answer's start went unseen); the ids are the same
        _untrimmed(state.get("post_processor"))
        self.backend = Tokenizer.from_str(json.dumps(state))
        self.backend.no_truncation()
        self.backend.no_padding()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               continue_final_message: bool = False) -> str:
        """``messages`` rendered; a :class:`Conversation`'s tools and template variables with them, as the server
        passes a request's."""
        tools = getattr(messages, "tools", None)
        variables = getattr(messages, "template_kwargs", None) or {}
        if not messages:
            # The prompt of a conversation that opens with an assistant message (a greeting): apply_chat_template
            # refuses an empty conversation, the template itself renders one (what precedes the first message)
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(
                conversations=[[]], tools=tools or None, add_generation_prompt=add_generation_prompt,
                chat_template=self.tokenizer.get_chat_template(self.template, tools or None),
                **{**self.tokenizer.special_tokens_map, **variables})
            return rendered[0]
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message,
                                                  chat_template=self.template, **({"tools": tools} if tools else {}),
                                                  **variables)

    def renderer(self, template_kwargs: dict[str, Any] | None) -> Callable[..., str]:
        """:meth:`render` with a row's template variables (its ``chat_template_kwargs``), for
        :func:`~retnet.tokenization.render_pair`: the DPO, KTO and GRPO rows' prompt, prompt + chosen, prompt +
        rejected and prompt + completion, as TRL's ``apply_chat_template`` renders each with them. (render_pair
        joins the prompt's and a completion's messages into a plain list, which has no Conversation's variables.)"""
        if not template_kwargs:
            return self.render

        def render(messages: list[dict[str, Any]], **options: Any) -> str:
            conversation = Conversation(messages)
            conversation.tools = getattr(messages, "tools", None)
            conversation.template_kwargs = template_kwargs
            return self.render(conversation, **options)

        return render

    def spans(self, messages: list[dict[str, Any]], index: int = 0) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, the character spans of its assistant messages). ``index``: the row's,
        for the error of a template that cannot be masked."""
        try:
            # every prefix is rendered with the row's tools and variables, as the server would render it
            prefix = messages.like if isinstance(messages, Conversation) else list
            text = self.render(messages)
            spans = []
            first = getattr(messages, "completion_start", 0)  # a prompt's assistant messages are no targets
            for i, message in enumerate(messages):
                if message["role"] != "assistant" or i < first:
                    continue
                try:
                    prompt = self.render(prefix(messages[:i]), add_generation_prompt=True)
                except Exception as error:
                    if i:
                        raise
                    # a template that reads messages[0] unguarded (Llama 3's) renders no prompt before it
                    raise ValueError(f"message 0 is an assistant's, and the template renders no prompt without a "
                                     f"message before it ({type(error).__name__}: {error}); drop the row's "
                                     f"leading assistant message") from None
                if not text.startswith(prompt):
                    raise ValueError(f"the rendering of its first {i} messages with the generation prompt "
                                     f"{_divergence(prompt, text)}")
                end = self._turn_end(text, self.render(prefix(messages[: i + 1])), i)
                if end < len(prompt):
                    raise ValueError(f"the rendering of its first {i + 1} messages is shorter than that of its "
                                     f"first {i} with the generation prompt")
                spans.append((len(prompt), end))
        except Exception as error:  # jinja's own errors, raise_exception in a template, the checks above
            raise ConfigError(
                f"data.format 'chat': the tokenizer's chat template cannot be masked on row {index} of "
                f"{self.dataset!r}: {type(error).__name__}: {error}. Each assistant message must render in the "
                f"same place in every prefix of its conversation; data.assistant_only_loss=false trains on every "
                f"token instead") from None
        return text, spans

    def _turn_end(self, text: str, turn: str, i: int) -> int:
        """Where assistant message ``i`` ends in ``text`` (the whole conversation's rendering), given ``turn``, the
        rendering of the conversation up to it. A template that writes the EOS once, at the conversation's end, not
        after each answer (Phi-3's ``{% else %}{{ eos_token }}``), ends ``turn`` with an EOS that the whole
        conversation has only at its own end: the answer ends before it (the end-of-turn markers the template writes
        before the next message are the answer's, as in every other turn), and the closing EOS stays the last
        answer's target."""
        if text.startswith(turn):
            return len(turn)
        eos = self.tokenizer.eos_token
        closing = turn.rfind(eos) if eos else -1
        if closing >= 0 and text.startswith(turn[:closing]) and text.endswith(turn[closing:]):
            return closing
        raise ValueError(f"the rendering of its first {i + 1} messages (up to assistant message {i}) "
                         f"{_divergence(turn, text)}")

    def encode(self, conversations: list[list[dict[str, Any]] | Completion], batch: int = 256,
               rows: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, flags) of every conversation (or standard prompt-completion row, :class:`Completion`) followed by
        EOS, concatenated; ids uint16 when every id fits,
        flags uint8 (:data:`TARGET`, :data:`BOUNDARY`). ``rows``: each conversation's row in the dataset, which an
        error names (default: its index in ``conversations``)."""
        from retnet.train.data import vocab_bound

        dtype = np.uint16 if vocab_bound(self.tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
        eos = self.tokenizer.eos_token_id
        rows = range(len(conversations)) if rows is None else rows
        ids, flags = [], []
        for start in range(0, len(conversations), batch):
            chunk = conversations[start:start + batch]
            rendered = [self._rendered(c, rows[start + i]) for i, c in enumerate(chunk)]
            encodings = self._encode_batch(chunk, rendered)
            for messages, (text, spans), (body, offsets) in zip(chunk, rendered, encodings):
                if spans is None:
                    mask = np.full(len(body), TARGET, dtype=np.uint8)
                else:
                    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
                    inside = np.zeros(len(offsets), dtype=bool)
                    for lo, hi in spans:
                        hit = (offsets[:, 1] > lo) & (offsets[:, 0] < hi)
                        # a token running past the answer whose answer part is whitespace only (" user" after
                        # "Hello ": offsets untrimmed, see _untrimmed) is the next turn's, not the answer's
                        for k in np.flatnonzero(hit & (offsets[:, 1] > hi)):
                            hit[k] = not text[offsets[k, 0]:hi].isspace()
                        inside |= hit
                    mask = inside.astype(np.uint8) * TARGET
                ends_answered = (not self.assistant_only_loss or isinstance(messages, Completion)
                                 or messages[-1]["role"] == "assistant")
                closing = np.uint8(BOUNDARY | (TARGET if ends_answered else 0))
                if not isinstance(messages, Completion) and len(body) and eos is not None and body[-1] == eos:
                    # the template's own closing EOS (one that ends every message): it closes the conversation
                    ids.append(np.asarray(body, dtype=dtype))
                    mask[-1] |= closing
                    flags.append(mask)
                    continue
                ids.append(np.asarray([*body, eos], dtype=dtype))
                flags.append(np.append(mask, closing))
        if not ids:
            return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.uint8)
        return np.concatenate(ids), np.concatenate(flags)

    def _rendered(self, sequence: list[dict[str, Any]] | Completion,
                  index: int) -> tuple[str, list[tuple[int, int]] | None]:
        """(the text of a conversation or standard prompt-completion row, the character spans of its targets, None
        for every token)."""
        if isinstance(sequence, Completion):
            completion = sequence.completion
            eos = self.tokenizer.eos_token
            if eos and completion.endswith(eos):  # TRL's add_eos: the EOS encode appends stands for it, not twice
                completion = completion[: -len(eos)]
            text = sequence.prompt + completion
            return text, ([(len(sequence.prompt), len(text))] if self.assistant_only_loss else None)
        if self.assistant_only_loss:
            return self.spans(sequence, index)
        return self._render_checked(sequence, index), None

    def _encode_batch(self, sequences: list, rendered: list[tuple[str, list[tuple[int, int]] | None]]
                      ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) of each rendered sequence, encoded as the server encodes a prompt: a
        conversation's rendering without the tokenizer's added special tokens (the template writes its own, as for
        a chat request), a standard prompt-completion row's text with them, as a completion request's prompt (and
        TRL's text) is encoded, less an EOS the tokenizer appends (the closing EOS is that one)."""
        added = [isinstance(sequence, Completion) for sequence in sequences]
        out = self.encode_texts([text for text, _ in rendered], added)
        for i, (text, spans) in enumerate(rendered):
            if spans:
                out[i] = self._cut_at_answers(text, spans, out[i], added[i])
        return out

    def encode_texts(self, texts: list[str], added: list[bool]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) of each text; where ``added``, with the special tokens the tokenizer's
        post-processor puts around a text (a Llama tokenizer's BOS), as ``/v1/completions`` encodes a prompt (SFT's and
        the preference and RL trainers' standard rows, the pretraining documents), less an EOS it appends (a
        completion, or the closing EOS, follows); elsewhere the text's own tokens (a conversation's template writes its
        own, as for a chat request)."""
        eos = self.tokenizer.eos_token_id
        out: list = [None] * len(texts)
        for flag in (False, True):
            picked = [i for i, value in enumerate(added) if value == flag]
            if not picked:
                continue
            encoded = self.backend.encode_batch([texts[i] for i in picked], add_special_tokens=flag)
            for i, encoding in zip(picked, encoded, strict=True):
                ids, offsets = encoding.ids, encoding.offsets
                if flag and _ends_with_added_eos(encoding, eos):
                    # A tokenizer that appends EOS: the closing EOS is that one. Kept, the completion's last token
                    # would predict an EOS that is no target (the row never learns to stop), and EOS would follow EOS.
                    ids, offsets = ids[:-1], offsets[:-1]
                out[i] = (ids, offsets)
        return out

    def _cut_at_answers(self, text: str, spans: list[tuple[int, int]], whole: tuple[list[int], list[tuple[int, int]]],
                        added: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """``whole`` (a sequence's ids and offsets), or, where a token straddles the start of an answer (a
        completion), the sequence encoded in pieces cut there. The server encodes the prompt before an answer on its
        own, so its last token ends there; a byte-level BPE joins a prompt's closing newline (the default generation
        prompt's) and an answer's leading newline into one token, with which the server's prompt never ends: the
        answer trained would start inside it. ``added``: the tokenizer's special tokens go around the first piece
        (a standard row's prompt, as a completion request's). A tokenizer that reads a piece otherwise than the
        same characters inside a text (a SentencePiece one prepends a space to each) keeps the whole encoding."""
        ids, offsets = whole
        cuts = sorted({lo for lo, _ in spans if 0 < lo < len(text)})
        spans_of = np.asarray(offsets, dtype=np.int64).reshape(-1, 1, 2)
        at = np.asarray(cuts, dtype=np.int64).reshape(1, -1)
        # a token straddles a cut, or the prompt ends in a whitespace run that a byte-level BPE's `\s+(?!\S)` splits
        # before the answer's first character but keeps whole at the end of the prompt alone ("\n\n" + "x")
        if not cuts or not (np.any((spans_of[..., 0] < at) & (at < spans_of[..., 1]))
                            or any(lo >= 2 and text[lo - 2:lo].isspace() for lo in cuts)):
            return whole
        bounds = [0, *cuts, len(text)]
        texts = [text[lo:hi] for lo, hi in itertools.pairwise(bounds)]
        first = self.backend.encode(texts[0], add_special_tokens=added)
        pieces = [(first.ids, first.offsets)]
        if added and _ends_with_added_eos(first, self.tokenizer.eos_token_id):  # as the whole row's, left out
            pieces = [(first.ids[:-1], first.offsets[:-1])]
        pieces += [(piece.ids, piece.offsets)
                   for piece in self.backend.encode_batch(texts[1:], add_special_tokens=False)]
        cut_ids = [t for piece, _ in pieces for t in piece]
        decode = self.backend.decode
        if decode(cut_ids, skip_special_tokens=False) != decode(ids, skip_special_tokens=False):
            return whole
        return cut_ids, [(a + lo, b + lo) for (_, piece_offsets), lo in zip(pieces, bounds) for a, b in piece_offsets]

    def _render_checked(self, messages: list[dict[str, Any]], index: int) -> str:
        try:
            return self.render(messages)
        except Exception as error:
            raise ConfigError(f"data.format 'chat': the tokenizer's chat template refused row {index} of "
                              f"{self.dataset!r}: {type(error).__name__}: {error}") from None


def _divergence(prefix: str, text: str) -> str:
    """Why ``prefix`` (a prefix of a conversation, rendered) is not a prefix of ``text`` (the whole conversation,
    rendered): what each has where they part, as an error shows it."""
    at = next((k for k, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))
    return (f"is not a prefix of the whole conversation's: at character {at} it has {prefix[at:at + 40]!r} where the "
            f"whole conversation has {text[at:at + 40]!r} (a template that rewrites earlier turns, or writes "
            f"something after the last message that it does not write after the same message followed by others, "
            f"cannot be masked; one that only ends the conversation with the tokenizer's EOS can)")


def without_spilled_targets(blocks: np.ndarray, continued: bool = False) -> np.ndarray:
    """``[N, T]`` blocks' flags (the flat stream cut every T tokens) without the targets of a conversation's
    part that spills into a block from the one before: the block's state starts fresh there, so those tokens
    would be learnt without the question before them. Cleared up to and including the block's first closing EOS
    (that conversation's own, predicted from it), unless the block before ended with a closing EOS (the
    block starts a conversation). So a conversation is trained on what fits in its first block, as a
    ``max_length`` truncation trains it, and one longer than a block is trained on its first ``T`` tokens.

    ``continued``: the first block follows one not given here that did not end with a closing EOS (a stream
    packs its blocks one at a time, and must clear them as the token cache's whole array is cleared)."""
    out = np.array(blocks, dtype=np.uint8, copy=True)
    if out.size == 0:
        return out
    boundary = (out & BOUNDARY) != 0
    continues = np.zeros(len(out), dtype=bool)
    continues[0] = continued
    continues[1:] = ~boundary[:-1, -1]
    first_end = np.where(boundary.any(axis=1), boundary.argmax(axis=1), out.shape[1])
    spilled = continues[:, None] & (np.arange(out.shape[1])[None, :] <= first_end[:, None])
    out[spilled] &= np.uint8(~TARGET & 0xFF)
    return out


def target_count(flags: np.ndarray) -> int:
    """Labels that count in ``[B, T]`` blocks' flags: the targets after each block's first token (the first
    has no token before it in the block to be predicted from)."""
    return int(np.count_nonzero(np.asarray(flags)[:, 1:] & TARGET))


__all__ = ["BOUNDARY", "CHAT_COLUMNS", "COMPLETION", "KWARGS_COLUMN", "PROMPT", "ROW_COLUMNS", "SHAREGPT_ROLES",
           "TARGET", "TOOLS_COLUMN", "ChatEncoder", "Completion", "Conversation", "appends_eos", "chat_template",
           "check_conversations", "check_prompt_completions", "check_template_kwargs", "check_tools",
           "conversation_problem", "messages_column", "prompt_completion", "render_default", "target_count",
           "template_identity", "template_messages", "without_spilled_targets"]
