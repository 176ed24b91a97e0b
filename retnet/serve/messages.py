"""Anthropic's Messages API, ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``, as a translation onto
the chat machinery (as vLLM serves it, so that Anthropic-SDK clients can run on a local model).

A request becomes a :class:`~retnet.serve.protocol.ChatCompletionRequest`: ``system`` a system message first,
consecutive messages of one role one turn (as Anthropic combines them: their blocks in order, as one message's),
each turn's text blocks its content, an assistant's ``tool_use`` blocks its ``tool_calls`` and a user's
``tool_result`` blocks ``tool`` messages; ``stop_sequences`` chat's ``stop``, ``tools`` (``input_schema``) and
``tool_choice`` (auto / any / tool / none) chat's, ``output_config.effort`` its ``reasoning_effort``. A final
assistant turn is continued (Anthropic's prefill). The chat handler runs it (templating, sampling, tool calls,
cancellation are all its own), and its result, whole or chunk by chunk, is reshaped here as a Message or the Messages
stream's events (``event: <type>`` / ``data: {json}``).

Every error on these routes is Anthropic's body, ``{"type": "error", "error": {"type", "message"}}`` (the app asks
:func:`is_anthropic_route` which body a path gets). Image, document, thinking and the other block kinds, server tools
and the fields that would change the output this server does not run (``thinking``, ``output_config.format`` ...) are
refused by name, as are chat's own fields this API has no name for (``stop``, ``n`` ...); the chat route's sampling
extras (``seed``, ``ignore_eos`` ...) are passed on; other fields (``metadata``, ``service_tier``, ``cache_control``
...) are ignored, as the chat route ignores unknown fields.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retnet.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    RequestFields,
    TokenizeChatRequest,
    _refuse_bool_number,
    check_finite_json,
    checked_effort,
    not_run_unless_no_op,
)
from retnet.serve.responses import CHAT_EXTRAS, required_string
from retnet.serve.serving import ChatRun, OpenAIServing
from retnet.serve.streaming import event_stream, sse, until_failure

ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
# Anthropic's error type for each status its API answers with (any other 4xx: invalid_request_error, 5xx: api_error).
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
# Anthropic features this server does not run, each with the value that changes nothing (null always passes).
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "thinking": {"type": "disabled"}, "output_format": None, "container": None, "mcp_servers": None,
    "context_management": None,
}
# The chat route's sampling extras a Messages request may send too (the SDK's ``extra_body``), checked by chat.
# ``stop`` is stop_sequences here; top_k is Anthropic's own field.
PASSED_EXTRAS = tuple(name for name in CHAT_EXTRAS if name not in ("stop", "top_k"))
# Chat fields that change no answer here: ignored, as any field unknown (the id is Anthropic's msg_...; no reasoning
# parser splits reasoning off the text, to include or not).
IGNORED_CHAT_FIELDS = ("request_id", "include_reasoning")
_BLOCKS = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use")}
_A = {"user": "a", "assistant": "an"}


def is_anthropic_route(path: str) -> bool:
    """Whether ``path`` is one of this API's routes, or under them (the batches routes the SDK also calls, not
    served: their 404 is Anthropic's body too, which the SDK reads), whose errors are Anthropic's body."""
    path = path.rstrip("/") or "/"
    return path in ANTHROPIC_ROUTES or path.startswith(ANTHROPIC_ROUTES[0] + "/")


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """Anthropic's error answer: its body with ``status``, which the SDK maps to its exception classes."""
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------
class InputMessage(BaseModel):
    """One turn: its text, or a list of content blocks checked by :func:`to_chat_body` (any ``type`` parses here, so
    that an unsupported one is refused by name, not with a union's type error)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CountTokensRequest(RequestFields):
    """``/v1/messages/count_tokens``: the conversation's fields; the rest of a Messages request is ignored, as the
    chat route ignores unknown fields."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    """The Messages request fields this server reads; any other is in ``model_extra``, checked by
    :func:`to_chat_body` (a chat extra, an ignored field, or refused by name)."""

    @field_validator("max_tokens", "temperature", "top_p", "top_k", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any) -> Any:
        return _refuse_bool_number(value)

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    # None (left out, or null): the server's default, as chat's. Anthropic's ranges.
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param, "unsupported_parameter")


def to_chat_body(request: CountTokensRequest, tool_call_parser: str | None) -> tuple[dict[str, Any], list[str]]:
    """The chat request body that runs ``request``, and for each of its messages the Messages field it came from
    (``system``, ``messages[2]`` ...), to name it in the chat handler's errors. ``tool_call_parser``: the server's
    (tool_choice auto needs one)."""
    for name, no_op in UNSUPPORTED_FIELDS.items():
        refusal = not_run_unless_no_op((request.model_extra or {}).get(name), no_op)
        if refusal is not None:
            raise _unsupported(name, f"not supported by this server {refusal}")
    # output_config's format would hold the text to a schema; its effort is chat's reasoning_effort (a template
    # variable), in count_tokens too: it may change the prompt
    output_config = (request.model_extra or {}).get("output_config")
    if output_config is None:
        output_config = {}
    elif not isinstance(output_config, dict):  # ([] and "" too: not read as the empty object)
        raise APIError(400, f"output_config must be an object; got {json.dumps(output_config)[:80]}",
                       "output_config", "invalid_type")
    if output_config.get("format") is not None:
        raise _unsupported("output_config.format", "structured output is not supported on this route (/v1/chat/"
                           "completions' response_format is)")
    effort = checked_effort(output_config.get("effort"), "output_config.effort")
    check_finite_json(request.tools, "tools", "invalid_value")
    extras = {}
    if isinstance(request, MessagesRequest):
        for name, value in (request.model_extra or {}).items():
            if name in PASSED_EXTRAS:
                extras[name] = value
            elif (name in ChatCompletionRequest.model_fields and name not in UNSUPPORTED_FIELDS
                  and name not in IGNORED_CHAT_FIELDS):
                # chat would run it, and ignored here it would change the output silently
                hint = {"stop": "; send stop_sequences", "reasoning_effort": "; send output_config.effort"}
                raise _unsupported(name, "a chat completions parameter, not one of the Messages API"
                                   + hint.get(name, ""))
        # stop_token_ids and min_tokens go with stop_sequences: the chat choice's stop_reason says which stop
        # sequence ended the answer (none for one min_tokens passed over, a stop token or EOS), and neither the
        # stop sequence nor a stop token's text is in the text (include_stop_str_in_output is not sent).
    messages, origins = _chat_messages(request)
    # Anthropic's prefill: a final assistant message (without calls) is continued, not answered.
    prefill = messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
    tools = _tools(request, tool_call_parser)
    if isinstance(request, MessagesRequest) and prefill and tools["tools"] and \
            tools.get("tool_choice", "auto") == "auto":
        # Said here in this API's terms: chat refuses it naming continue_final_message, never sent by this client
        raise _unsupported(origins[-1], "a final assistant message is continued (prefill), which automatic tool use "
                           "(tool_choice auto, the default with tools) cannot do: its calls are parsed from the "
                           "answer alone; end with a user message, or send tool_choice none, any or tool")
    body: dict[str, Any] = {
        "model": request.model, "messages": messages, "priority": request.priority,
        "add_generation_prompt": not prefill, "continue_final_message": prefill, "reasoning_effort": effort, **tools,
    }
    if isinstance(request, MessagesRequest):
        stops = request.stop_sequences or []
        body.update({
            "max_tokens": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
            "top_k": request.top_k, "stream": request.stream,
            "stream_options": {"include_usage": True} if request.stream else None,
            # Left out of the text; the one that ended the answer is the chat choice's stop_reason.
            "stop": stops or None, **extras,
        })
    return body, origins


def _chat_messages(request: CountTokensRequest) -> tuple[list[dict[str, Any]], list[str]]:
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    if request.system:  # an empty one ("" or no blocks) is no system prompt, not an empty system turn
        messages.append({"role": "system", "content": _text_parts(request.system, "system")})
        origins.append("system")
    for role, turn in _turns(request.messages):
        where = _named(turn)
        if len(turn) == 1 and isinstance(request.messages[turn[0]].content, str):
            messages.append({"role": role, "content": request.messages[turn[0]].content})
            origins.append(where)
            continue
        texts: list[dict[str, str]] = []
        texts_from: list[int] = []  # the messages the pending texts came from, to name their user message
        calls: list[dict[str, Any]] = []
        empty = True
        for i in turn:
            content = request.messages[i].content
            # A string is Anthropic's shorthand for one text block (merged with the turn's other blocks).
            for j, block in enumerate([{"type": "text", "text": content}] if isinstance(content, str) else content):
                empty = False
                place = f"messages[{i}].content[{j}]"
                kind = _block_type(block, place, role)
                if kind == "text":
                    texts.append({"type": "text", "text": _string(block, "text", place)})
                    texts_from.append(i)
                elif kind == "tool_use":
                    arguments = block.get("input")
                    if not isinstance(arguments, dict):
                        raise APIError(400, f"{place}.input: a tool_use block needs an object input",
                                       f"{place}.input")
                    calls.append({"id": _string(block, "id", place), "type": "function", "function": {
                        "name": _string(block, "name", place), "arguments": json.dumps(arguments)}})
                else:  # a tool_result: a tool message, after the user's text before it (Anthropic's order is kept)
                    if texts:
                        messages.append({"role": "user", "content": texts})
                        origins.append(_named(texts_from))
                        texts, texts_from = [], []
                    messages.append({"role": "tool", "tool_call_id": _string(block, "tool_use_id", place),
                                     "content": _tool_result(block, place)})
                    origins.append(place)
        if role == "assistant":
            entry: dict[str, Any] = {"role": "assistant", "content": texts or (None if calls else "")}
            if calls:
                entry["tool_calls"] = calls
            messages.append(entry)
            origins.append(where)
        elif texts or empty:
            messages.append({"role": "user", "content": texts or ""})
            origins.append(_named(texts_from) if texts else where)
    return messages, origins


def _turns(messages: list[InputMessage]) -> list[tuple[str, list[int]]]:
    """The conversation's turns, each a role and the indices of its messages: consecutive messages of one role are
    one turn, as Anthropic combines them (their blocks in order, as one message's)."""
    turns: list[tuple[str, list[int]]] = []
    for i, message in enumerate(messages):
        if turns and turns[-1][0] == message.role:
            turns[-1][1].append(i)
        else:
            turns.append((message.role, [i]))
    return turns


def _named(indices: list[int]) -> str:
    """The Messages field a chat message came from: ``messages[2]``, or ``messages[2..4]`` for a merged turn."""
    first, last = min(indices), max(indices)
    return f"messages[{first}]" if first == last else f"messages[{first}..{last}]"


def _block_type(block: dict[str, Any], place: str, role: str) -> str:
    kind = block.get("type")
    if kind not in _BLOCKS[role]:
        other = "user" if role == "assistant" else "assistant"
        where = f"only in {_A[other]} {other} message" if kind in _BLOCKS[other] else "not supported by this server"
        raise _unsupported(f"{place}.type", f"{kind!r} blocks are {where}; {_A[role]} {role} message takes "
                           f"{' and '.join(_BLOCKS[role])} blocks")
    return kind


def _string(block: dict[str, Any], key: str, place: str) -> str:
    return required_string(block, key, place, noun="block")


def _text_parts(content: Any, where: str) -> str | list[dict[str, str]]:
    """``system``'s or a tool result's content: a string, or text blocks (as chat's parts: chat joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of text blocks", where)
    parts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise _unsupported(f"{where}[{j}].type", f"only text blocks are supported here; got {kind!r}")
        parts.append({"type": "text", "text": _string(block, "text", f"{where}[{j}]")})
    return parts


def _tool_result(block: dict[str, Any], place: str) -> str:
    content = _text_parts(block.get("content", ""), f"{place}.content")
    text = content if isinstance(content, str) else "\n".join(part["text"] for part in content)
    # The tool message has no error flag of its own: said in its text, so that the model reads it.
    return f"Error: {text}" if block.get("is_error") is True else text


def _tools(request: CountTokensRequest, parser: str | None) -> dict[str, Any]:
    """Custom tools (``name``, ``description``, ``input_schema``) and ``tool_choice`` in chat's shape; server tools
    (web search, bash, text editor ...) are refused by name."""
    tools = []
    for i, tool in enumerate(request.tools or ()):
        where = f"tools[{i}]"
        if tool.get("type") not in (None, "custom"):
            raise _unsupported(f"{where}.type", f"only custom tools (name, description, input_schema) are supported; "
                               f"got {tool.get('type')!r}")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise APIError(400, f"{where}.input_schema must be a JSON schema of type 'object'; got "
                           f"{json.dumps(schema)[:80]}", f"{where}.input_schema")
        function = {"name": required_string(tool, "name", where, what="a tool"), "parameters": schema}
        if tool.get("description") is not None:
            function["description"] = required_string(tool, "description", where, what="a tool")
        tools.append({"type": "function", "function": function})
    choice = request.tool_choice
    if choice is None and not tools:
        return {"tools": None}
    # Left out with tools: auto, Anthropic's default and chat's, which needs the parser as when sent
    kind = "auto" if choice is None else choice.get("type")
    disable_parallel = (choice or {}).get("disable_parallel_tool_use")
    if disable_parallel is not None and not isinstance(disable_parallel, bool):
        raise APIError(400, f"tool_choice.disable_parallel_tool_use must be a boolean; got "
                       f"{json.dumps(disable_parallel)[:80]}", "tool_choice.disable_parallel_tool_use")
    parallel = False if disable_parallel else None
    if kind in ("any", "tool") and not tools:  # chat's refusal would call it "required"
        raise APIError(400, f"tool_choice: {kind!r} needs tools to call; got none", "tool_choice.type")
    if kind == "tool":
        name = required_string(choice, "name", "tool_choice", what="a tool_choice of type 'tool'")
        chat_choice: Any = {"type": "function", "function": {"name": name}}
    elif kind in ("auto", "any", "none"):
        chat_choice = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise APIError(400, f"tool_choice.type must be one of auto, any, tool, none; got {kind!r}", "tool_choice.type")
    if kind == "auto" and tools and parser is None:
        raise _unsupported("tool_choice", "automatic tool use (tool_choice auto, the default with tools) needs the "
                           "server's parser of the model's own tool-call format (--tool-call-parser hermes); send "
                           "tool_choice {\"type\": \"any\"} or {\"type\": \"tool\", \"name\": ...} to have the output "
                           "held to the tools' schemas")
    if choice is None:  # chat's default is the same auto
        return {"tools": tools}
    return {"tools": tools or None, "tool_choice": chat_choice, "parallel_tool_calls": parallel}


# Chat's names for what a Messages request calls otherwise, in the chat handler's errors.
_RENAMES = (
    (re.compile(r"\btools\[(\d+)\]\.function\.parameters\b"), r"tools[\1].input_schema"),
    (re.compile(r"\btools\[(\d+)\]\.function\."), r"tools[\1]."),
)


def _renamed(exc: APIError, origins: list[str]) -> APIError:
    def rename(text: str) -> str:
        for pattern, replacement in _RENAMES:
            text = pattern.sub(replacement, text)
        return re.sub(r"\bmessages\[(\d+)\]", lambda m: origins[int(m[1])] if int(m[1]) < len(origins) else m[0],
                      text)

    param = "stop_sequences" if exc.param == "stop" else exc.param and rename(exc.param)
    return APIError(exc.status, rename(exc.message), param, exc.code, exc.type, exc.headers)


def _validated(model, body: dict[str, Any]):
    """The chat (or tokenize) request of ``body``; a passed extra of the wrong type or range is a 400 naming it."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        raise APIError(400, f"{param}: {error['msg']} (got {repr(error.get('input'))[:80]})", param,
                       error["type"]) from None


# ----------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _ending(finish: str | None, stop: int | str | None, calls: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a chat choice's finish_reason and (vLLM's) stop_reason ``stop``;
    ``calls``: the answer made tool calls."""
    if finish == "length":  # cut short, even after whole calls (chat's finish_reason too): the answer is not done
        return "max_tokens", None
    if calls:
        return "tool_use", None
    if isinstance(stop, str):  # the stop sequence that ended it, as the engine met it (not in the text)
        return "stop_sequence", stop
    # EOS, or a stop_token_ids token (the chat extra; usually a template's end-of-turn token): the model's end
    return "end_turn", None


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "citations": None}


def _tool_use_block(call: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A chat call as a tool_use block (its input empty) and the input's JSON text."""
    return {"type": "tool_use", "id": _id("toolu"), "name": call["function"]["name"], "input": {}}, \
        call["function"]["arguments"]


def _message(model: str, content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None,
             usage: dict[str, int], message_id: str | None = None) -> dict[str, Any]:
    return {"id": message_id or _id("msg"), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}


def _usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, int]:
    """Anthropic's usage of a prompt of which ``cached_tokens`` came from the prefix cache: its ``input_tokens`` are
    the rest, as Anthropic's count only the tokens read from no cache and written to none (clients add the three for
    the prompt). The prefix cache saves prompts by itself, with no ``cache_control`` and at no cost: no request
    writes a cache entry in Anthropic's sense, so ``cache_creation_input_tokens`` is 0."""
    return {"input_tokens": prompt_tokens - cached_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached_tokens}


class _RawJSON(str):
    """A JSON text written into the Message as it is: a call's arguments, which chat has checked are one JSON
    object (see :func:`render_message`)."""


def from_chat(result: ChatCompletionResponse) -> dict[str, Any]:
    """The Message of a whole chat result: a text block (unless empty), then a tool_use block a call (its
    ``input`` the call's arguments as the model wrote them, a :class:`_RawJSON`: :func:`render_message` writes it)."""
    choice = result.choices[0]
    calls = choice.message.tool_calls or []
    text = choice.message.content or ""
    reason, sequence = _ending(choice.finish_reason, choice.stop_reason, bool(calls))
    content = [_text_block(text)] if text else []
    for call in calls:
        block, arguments = _tool_use_block(call.model_dump())
        # Not json.loads'ed: a number past a double's range (1e999, which the grammar admits) became inf, which the
        # JSON answer cannot write (a 500 after the generation), and a \ud800 escape a lone surrogate, which UTF-8
        # cannot encode (the same); 1e1 was written back as 10.0. The streamed input_json_delta sends this text too.
        block["input"] = _RawJSON(arguments)
        content.append(block)
    details = result.usage.prompt_tokens_details
    return _message(result.model, content, reason, sequence, _usage(
        result.usage.prompt_tokens, details.cached_tokens if details else 0, result.usage.completion_tokens))


def render_message(message: dict[str, Any]) -> bytes:
    """The Message's JSON, each tool_use block's :class:`_RawJSON` input written as its text."""
    raw: dict[str, str] = {}
    blocks = []
    for block in message["content"]:
        if isinstance(block.get("input"), _RawJSON):
            # a placeholder string that no other text of the answer can be (inside a JSON string its opening and
            # closing quotes would be escaped), replaced by the input's JSON
            mark = f"\x00{uuid.uuid4().hex}"
            raw[json.dumps(mark)] = str(block["input"])
            block = {**block, "input": mark}
        blocks.append(block)
    text = json.dumps({**message, "content": blocks}, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for mark, value in raw.items():
        text = text.replace(mark, value, 1)
    return text.encode("utf-8")


def _event(kind: str, **fields) -> str:
    return sse({"type": kind, **fields}, kind)


# ----------------------------------------------------------------------------------------------------------
# The handler
# ----------------------------------------------------------------------------------------------------------
class MessagesServing:
    """``POST /v1/messages`` and ``/v1/messages/count_tokens`` over an :class:`OpenAIServing`'s chat handler."""

    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def create(self, request: MessagesRequest, raw: Request):
        body, origins = to_chat_body(request, self.serving.settings.tool_call_parser)
        chat = _validated(ChatCompletionRequest, body)
        # Named before the run starts: an adapter unloaded in between would raise after it, leaving it running
        model = self.serving.served_name(request.model) if request.stream else None
        try:
            run = await self.serving.start_chat(chat)
        except APIError as exc:
            raise _renamed(exc, origins) from None
        if request.stream:
            return event_stream(self._events(chat, run, model, origins), run.handle)
        try:
            result = await self.serving.chat_response(chat, run, raw)
        except APIError as exc:
            raise _renamed(exc, origins) from None
        return Response(render_message(from_chat(result)), media_type="application/json")

    async def count_tokens(self, request: CountTokensRequest) -> dict[str, int]:
        """``input_tokens``: the templated conversation's tokens, as /v1/messages counts them."""
        body, origins = to_chat_body(request, self.serving.settings.tool_call_parser)
        try:
            counted = await self.serving.tokenize(_validated(TokenizeChatRequest, body))
        except APIError as exc:
            raise _renamed(exc, origins) from None
        return {"input_tokens": counted.count}

    async def _events(self, chat: ChatCompletionRequest, run: ChatRun, model: str, origins: list[str]):
        """The Messages stream of a started chat (:meth:`_message_events`); a failure mid-stream ends it with
        Anthropic's error event."""
        async for event in until_failure(self._message_events(chat, run, model), run.handle):
            if isinstance(event, APIError):  # Anthropic's error event ends the stream
                error = _renamed(event, origins)
                event = _event("error", error=error_body(error.status, error.message)["error"])
            yield event

    async def _message_events(self, chat: ChatCompletionRequest, run: ChatRun, model: str):
        """A text block filled as the text comes, then a tool_use block a call (held to the end, as the whole
        Message has them after its text). message_start waits for the chat's first chunk after its opening one:
        the prompt's tokens read from the prefix cache are known once the engine has taken the request in, and
        message_start's usage is Anthropic's final one for the prompt."""
        message_id, handle = _id("msg"), run.handle
        blocks, text_open, opening, started = 0, False, True, False
        finish, stop, usage, calls = None, None, None, []

        def start() -> Iterator[str]:
            yield _event("message_start", message=_message(
                model, [], None, None, _usage(handle.prompt_tokens, handle.cached_tokens, 0), message_id))
            yield _event("ping")

        async for chunk in self.serving.chat_chunks(chat, run):
            if opening:  # the assistant role, sent before the engine has the request: nothing of the Message's
                opening = False
                continue
            if not started:
                started = True
                for event in start():
                    yield event
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                delta = choice["delta"]
                if choice.get("finish_reason"):  # the choice's last chunk
                    finish, stop = choice["finish_reason"], choice.get("stop_reason")
                calls.extend(delta.get("tool_calls") or ())
                # The chat stream holds back text that may open a stop sequence, and never sends the stop
                piece = delta.get("content") or ""
                if piece:
                    if not text_open:
                        text_open = True
                        yield _event("content_block_start", index=0, content_block=_text_block(""))
                    yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
        if not started:
            for event in start():
                yield event
        reason, sequence = _ending(finish, stop, bool(calls))
        if text_open:
            yield _event("content_block_stop", index=0)
            blocks = 1
        for index, call in enumerate(calls, start=blocks):
            block, arguments = _tool_use_block(call)
            yield _event("content_block_start", index=index, content_block=block)
            yield _event("content_block_delta", index=index, delta={"type": "input_json_delta",
                                                                    "partial_json": arguments})
            yield _event("content_block_stop", index=index)
        output_tokens = usage["completion_tokens"] if usage else 0
        yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                     usage=_usage(handle.prompt_tokens, handle.cached_tokens, output_tokens))
        yield _event("message_stop")


__all__ = ["ANTHROPIC_ROUTES", "CountTokensRequest", "MessagesRequest", "MessagesServing", "error_response",
           "is_anthropic_route", "to_chat_body"]
