"""OpenAI's Responses API, ``POST /v1/responses``, as a translation onto the chat machinery (as vLLM serves it).

A request becomes a :class:`~retnet.serve.protocol.ChatCompletionRequest`: ``instructions`` a system message
first, ``input`` (a string, or message / ``function_call`` / ``function_call_output`` items) the conversation,
``max_output_tokens`` chat's ``max_completion_tokens``, ``reasoning.effort`` its ``reasoning_effort``, ``text.format``
its ``response_format``, the function tools and ``tool_choice`` chat's. The chat handler runs it (templating, sampling, structured output, tool calls,
cancellation are all its own), and its result, whole or chunk by chunk, is reshaped here as a Response object or
the Responses stream's events (``event: <type>`` / ``data: {json}``, each with its ``sequence_number``).

With ``store`` (the default) a finished response is kept (:mod:`retnet.serve.response_store`): ``GET`` /
``DELETE /v1/responses/{id}``, its ``input_items``, and ``previous_response_id``, which puts the stored
conversation (its input and output items, not its ``instructions``) before the request's ``input``, and an
``item_reference`` input item is the stored item it names.
``conversation``, ``background`` and the other hosted features are refused by name (400
``unsupported_parameter``), as is any field this module does not know.
"""

from __future__ import annotations

import copy
import json
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from retnet.serve.protocol import (
    REQUEST_ID_MAX_CHARS,
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    RequestFields,
    _refuse_bool_number,
    check_finite_json,
    checked_effort,
    not_run_unless_no_op,
)
from retnet.serve.response_store import ResponseStore
from retnet.serve.serving import ChatRun, OpenAIServing
from retnet.serve.streaming import event_stream, sse, until_failure

# The chat route's sampling extras a Responses request may send too (the official client: ``extra_body``); they
# reach the chat request as they are, and are checked there.
CHAT_EXTRAS = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop",
               "logit_bias", "ignore_eos", "min_tokens", "stop_token_ids", "bad_words", "allowed_token_ids",
               "chat_template_kwargs", "cache_salt")
# Responses fields that change nothing here, beside the declared metadata, user and store: accepted and ignored.
# prompt_cache_retention ("in_memory", "24h") is a hint to OpenAI's prompt cache, as prompt_cache_key is.
IGNORED_FIELDS = ("safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier")
# Responses features this server does not run, each with the value that changes nothing (what passes; null
# always does).
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "conversation": None, "prompt": None, "background": False,
    "include": [], "truncation": "disabled", "max_tool_calls": None, "top_logprobs": 0, "stream_options": None,
}
# Of those, the objects whose fields are all optional settings: one that sets none of them (``{}``, or its fields
# all null, as a client's settings object with nothing set is sent) changes nothing, as null, and was refused.
EMPTY_OBJECT_FIELDS = ("stream_options",)
# reasoning.summary's values (generate_summary: its older name). A summary of the reasoning apart from the answer: the
# model has none apart from its text (as chat's include_reasoning), so any of them changes nothing.
_SUMMARIES = ("auto", "concise", "detailed")
_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text")
_FORMATS = ("text", "json_object", "json_schema")
_ITEM_STATUSES = ("in_progress", "completed", "incomplete")


class ResponsesRequest(RequestFields):
    """The Responses request fields this server reads; every other field is in ``model_extra`` and checked by
    :func:`to_chat_request` (a chat extra, or refused by name)."""

    model_config = ConfigDict(extra="allow")

    @field_validator("max_output_tokens", "temperature", "top_p", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any) -> Any:
        return _refuse_bool_number(value)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    # None (left out, or null): the server's default (the model's generation config's, else 1), as chat's.
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stream: bool = False
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    # vLLM's: the Response's id as sent (stored, streamed and continued by it); empty or left out: resp_<uuid>.
    request_id: str | None = Field(None, max_length=REQUEST_ID_MAX_CHARS)
    # {"effort", "summary"}: checked by _reasoning_effort.
    reasoning: Any = None
    # UNSUPPORTED_FIELDS: declared so that they are refused by name unless at their no-op value.
    conversation: Any = None
    prompt: Any = None
    background: Any = None
    include: Any = None
    truncation: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    stream_options: Any = None


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param, "unsupported_parameter")


def to_chat_request(request: ResponsesRequest, history: Sequence[dict[str, Any]] = ()) -> tuple[
        ChatCompletionRequest, list[str]]:
    """The chat request that runs ``request`` after ``history`` (the stored conversation its
    ``previous_response_id`` continues, as Responses items), and for each of its messages the Responses field it
    came from (``instructions``, ``input``, ``input[2]``, ``previous_response_id`` ...), to name it in the chat
    handler's errors."""
    for name, no_op in UNSUPPORTED_FIELDS.items():
        value = getattr(request, name)
        if name == "stream_options" and isinstance(value, dict) and isinstance(value.get("include_obfuscation"), bool):
            # OpenAI's padding of a stream's deltas against side channels (on unless false): this server pads none
            # and a client reads none, so either value changes nothing; false, the bandwidth setting, was refused
            value = {key: item for key, item in value.items() if key != "include_obfuscation"}
        if name in EMPTY_OBJECT_FIELDS and isinstance(value, dict) and all(v is None for v in value.values()):
            value = None  # {} or {"effort": null, ...}: every setting at its default, which is what null asks
        refusal = not_run_unless_no_op(value, no_op)
        if refusal is not None:
            raise _unsupported(name, f"not supported by this server {refusal}")
    for name in ("input", "tools", "tool_choice", "text"):
        # echoed as sent (the Response, input_items): such a number would fail the answer after the generation
        check_finite_json(getattr(request, name), name, "invalid_value")
    extras = {}
    for name, value in (request.model_extra or {}).items():
        if name in CHAT_EXTRAS:
            extras[name] = value
        elif name not in IGNORED_FIELDS:
            raise _unsupported(name, "not a parameter of the Responses API this server supports")
    messages, origins = _messages(request, history)
    body = {
        "model": request.model, "messages": messages, "max_completion_tokens": request.max_output_tokens,
        **{name: getattr(request, name) for name in ("temperature", "top_p") if getattr(request, name) is not None},
        "stream": request.stream, "priority": request.priority,
        "stream_options": {"include_usage": True} if request.stream else None,
        "response_format": _response_format(request.text), "parallel_tool_calls": request.parallel_tool_calls,
        "reasoning_effort": _reasoning_effort(request.reasoning), **_tools(request), **extras,
    }
    try:
        return ChatCompletionRequest.model_validate(body), origins
    except ValidationError as exc:  # a chat extra of the wrong type or range (the rest was checked above)
        error = exc.errors()[0]
        param = str(error["loc"][0]) if error["loc"] else None
        raise APIError(400, f"{param}: {error['msg']} (got {repr(error.get('input'))[:80]})", param,
                       error["type"]) from None


def _reasoning_effort(reasoning: Any) -> str | None:
    """``reasoning.effort``, which vLLM reads as chat's ``reasoning_effort`` (a chat template variable); a summary is
    accepted (there is none to give), any other setting refused by name."""
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise APIError(400, f"reasoning must be an object; got {json.dumps(reasoning)[:80]}", "reasoning",
                       "invalid_type")
    for key, value in reasoning.items():
        if value is None:
            continue
        if key in ("summary", "generate_summary"):
            if value not in _SUMMARIES:
                raise APIError(400, f"reasoning.{key} must be one of {', '.join(_SUMMARIES)}; got "
                               f"{json.dumps(value)[:80]}", f"reasoning.{key}", "invalid_value")
        elif key != "effort":
            raise _unsupported(f"reasoning.{key}", f"not supported by this server (only effort and summary are); got "
                               f"{json.dumps(value)[:80]}")
    return checked_effort(reasoning.get("effort"), "reasoning.effort")


def _messages(request: ResponsesRequest, history: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
        origins.append("instructions")
    if isinstance(request.input, str):
        items = [("input", {"role": "user", "content": request.input})]
    else:
        items = [(f"input[{i}]", item) for i, item in enumerate(request.input)]
    if not items and not messages and not history:
        raise APIError(400, "input: at least one input item is needed", "input", "empty_prompt")
    for where, item in items:
        # Kept as sent and listed back by input_items, whose items OpenAI types: an id is a string, a status one of
        # the three an item has.
        if item.get("id") is not None and not isinstance(item["id"], str):
            raise APIError(400, f"{where}.id must be a string; got {json.dumps(item['id'])[:80]}", f"{where}.id",
                           "invalid_type")
        if item.get("status") is not None and item["status"] not in _ITEM_STATUSES:
            raise APIError(400, f"{where}.status must be one of {', '.join(_ITEM_STATUSES)}; got "
                           f"{json.dumps(item['status'])[:80]}", f"{where}.status", "invalid_value")
    # The stored items were checked when their request came: only an error of the whole prompt can name them.
    for where, item in [*(("previous_response_id", item) for item in history), *items]:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise APIError(400, f"{where}.role must be one of {', '.join(_ROLES)}; got {role!r}", f"{where}.role")
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": required_string(item, "call_id", where), "type": "function",
                    "function": {"name": required_string(item, "name", where),
                                 "arguments": required_string(item, "arguments", where)}}
            if messages and messages[-1]["role"] == "assistant":  # the calls of the answer whose text came first
                messages[-1].setdefault("tool_calls", []).append(call)
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": required_string(item, "call_id", where),
                             "content": _text(item.get("output"), f"{where}.output")})
        else:
            raise _unsupported(f"{where}.type", "only message, function_call and function_call_output input items "
                               f"are supported; got {kind!r}")
        origins.append(where)
    return messages, origins


def required_string(item: dict[str, Any], key: str, where: str, noun: str = "item", what: str | None = None) -> str:
    """``item[key]``, which must be a string: else a 400 naming ``where.key`` (an input item here, a content block
    of Anthropic's Messages API there). ``what``: the item as the message says it (default: its type and ``noun``;
    a tool's ``type`` is none or "custom", so it is said otherwise), the value given then shown too."""
    value = item.get(key)
    if not isinstance(value, str):
        said = f"a {item.get('type')} {noun} needs a string {key!r}" if what is None else \
            f"{what} needs a string {key!r}; got {json.dumps(value)[:80]}"
        raise APIError(400, f"{where}.{key}: {said}", f"{where}.{key}", "missing")
    return value


def _text(content: Any, where: str) -> str | list[dict[str, str]]:
    """A message's (or a call output's) text: a string, or text parts as chat's text parts; images, files and audio
    are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of input_text parts", where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise APIError(400, f"{where}[{j}].type: only text parts (input_text, output_text) are supported; got "
                           f"{kind!r}", f"{where}[{j}].type", "unsupported_content_type")
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}[{j}].text: a text part needs a string 'text'", f"{where}[{j}].text",
                           "missing")
        parts.append({"type": "text", "text": part["text"]})
    # Chat's parts, not their joined text: the template sees them joined with newlines or as parts by
    # --chat-template-content-format, as a chat request's, so the same conversation is the same prompt either way
    return parts


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (its grammar is compiled by the chat handler)."""
    text = text or {}
    verbosity = text.get("verbosity")
    if verbosity not in (None, "medium"):
        raise _unsupported("text.verbosity", f"only 'medium' (the default) is supported; got {verbosity!r}")
    unknown = sorted(set(text) - {"format", "verbosity"})
    if unknown:
        raise _unsupported(f"text.{unknown[0]}", "not supported")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in _FORMATS:
        raise APIError(400, f"text.format.type must be one of {', '.join(_FORMATS)}; got {kind!r}",
                       "text.format.type", "invalid_grammar")
    if kind != "json_schema":
        return {"type": kind}
    if not isinstance(fmt.get("name"), str) or not fmt["name"]:
        raise APIError(400, "text.format.name: a json_schema format needs a name", "text.format.name", "missing")
    if not isinstance(fmt.get("schema"), dict):
        raise APIError(400, "text.format.schema: a json_schema format needs a JSON schema object",
                       "text.format.schema", "missing")
    _check_optional(fmt, "text.format")
    spec = {key: fmt[key] for key in ("name", "schema", "description", "strict") if key in fmt}
    return {"type": "json_schema", "json_schema": spec}


def _check_optional(spec: dict[str, Any], where: str) -> None:
    """A tool's or a json_schema format's ``description`` and ``strict``, which chat passes on unread: a wrong type
    is a 400 here (as OpenAI answers it), not echoed back in the Response as if it had been taken."""
    for key, kind, name in (("description", str, "a string"), ("strict", bool, "a boolean")):
        if spec.get(key) is not None and not isinstance(spec[key], kind):
            raise APIError(400, f"{where}.{key} must be {name} or null; got {json.dumps(spec[key])[:80]}",
                           f"{where}.{key}", "invalid_type")


def _tools(request: ResponsesRequest) -> dict[str, Any]:
    """Function tools (``{"type": "function", "name", "parameters", ...}``) and ``tool_choice`` in chat's shape;
    hosted tools (web search, file search ...) are refused by name."""
    tools = []
    for i, tool in enumerate(request.tools or ()):
        if tool.get("type") != "function":
            raise _unsupported(f"tools[{i}].type", f"only function tools are supported; got {tool.get('type')!r}")
        _check_optional(tool, f"tools[{i}]")
        tools.append({"type": "function", "function": {key: tool[key] for key in ("name", "description", "parameters",
                                                                                  "strict") if key in tool}})
    choice = request.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _unsupported("tool_choice", f"only 'none', 'auto', 'required' or {{\"type\": \"function\", "
                               f"\"name\": ...}} are supported; got {json.dumps(choice)[:80]}")
        name = choice.get("name")
        if not isinstance(name, str) or not name:  # else chat's refusal, which shows its own shape of the choice
            raise APIError(400, f"tool_choice: a named function is {{\"type\": \"function\", \"name\": ...}}; got "
                           f"{json.dumps(choice)[:80]}", "tool_choice")
        choice = {"type": "function", "function": {"name": name}}
    return {"tools": tools or None, "tool_choice": choice}


# Chat's names for what a Responses request calls otherwise, in the chat handler's errors.
_RENAMES = (
    (re.compile(r"\bresponse_format\.json_schema\.schema\b"), "text.format.schema"),
    (re.compile(r"\bresponse_format(\.json_schema)?\b"), "text.format"),
    (re.compile(r"\bmax_(completion_)?tokens\b"), "max_output_tokens"),
    (re.compile(r"\btools\[(\d+)\]\.function\."), r"tools[\1]."),
    # (a named choice as chat's errors echo it, json.dumps'ed: its name a JSON string, escapes and all)
    (re.compile(r'\{"type": "function", "function": \{"name": ("(?:[^"\\]|\\.)*"|\.\.\.)\}\}'),
     r'{"type": "function", "name": \1}'),
)


def _rename(text: str, origins: list[str]) -> str:
    for pattern, replacement in _RENAMES:
        text = pattern.sub(replacement, text)
    return re.sub(r"\bmessages\[(\d+)\]", lambda m: origins[int(m[1])] if int(m[1]) < len(origins) else m[0], text)


def _renamed(exc: APIError, origins: list[str]) -> APIError:
    param = exc.param
    if param is not None:
        param = "input" if param == "messages" else _rename(param, origins)
    return APIError(exc.status, _rename(exc.message, origins), param, exc.code, exc.type, exc.headers)


# ----------------------------------------------------------------------------------------------------------
# The handler
# ----------------------------------------------------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesServing:
    """``POST /v1/responses`` over an :class:`OpenAIServing`'s chat handler, and the stored responses' routes."""

    def __init__(self, serving: OpenAIServing, store: ResponseStore):
        self.serving, self.store = serving, store

    async def create(self, request: ResponsesRequest, raw: Request):
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            history = self.store.get(request.previous_response_id, "previous_response_id").conversation
        request = self._referenced(request)
        chat, origins = to_chat_request(request, history)
        try:
            run = await self.serving.start_chat(chat)
        except APIError as exc:
            raise _renamed(exc, origins) from None
        # The Response echoes the temperature and top_p the answer was sampled with (the defaults when left out).
        shape = _Shape(request, self.serving.served_name(request.model), self.serving.checks.sampling_fields(chat))
        if request.stream:
            return event_stream(self._events(chat, run, shape, origins, history), run.handle)
        try:
            result = await self.serving.chat_response(chat, run, raw)
        except APIError as exc:
            raise _renamed(exc, origins) from None
        response = shape.from_chat(result)
        self._keep(request, response, history)
        return JSONResponse(response)

    def _referenced(self, request: ResponsesRequest) -> ResponsesRequest:
        """``request`` with each ``item_reference`` input item replaced by the stored item it names (an input or
        output item of a stored response), as OpenAI reads it: the new response's input holds that item."""
        if isinstance(request.input, str):
            return request
        seen: set[str] = set()
        for i, item in enumerate(request.input):
            # An id twice (an item sent twice, or referenced twice) is refused as OpenAI does: input_items pages by
            # id, and a page ending on the second copy started the next one again after the first, forever
            item_id = item.get("id")
            if isinstance(item_id, str):
                if item_id in seen:
                    raise APIError(400, f"input[{i}].id: Duplicate item found with id {item_id!r}", f"input[{i}].id")
                seen.add(item_id)
        if not any(_is_reference(item) for item in request.input):
            return request
        items = []
        for i, item in enumerate(request.input):
            if _is_reference(item):
                item_id = item.get("id")
                if not isinstance(item_id, str):
                    raise APIError(400, f"input[{i}].id: an item_reference needs a string id; got "
                                   f"{json.dumps(item_id)[:80]}", f"input[{i}].id", "invalid_type")
                item = self.store.item(item_id)
                if item is None:
                    raise APIError(400, f"input[{i}].id: Item with id {item_id!r} not found (never stored, sent "
                                   f"with store: false, deleted, or evicted with its response)", f"input[{i}].id",
                                   "not_found")
            items.append(copy.deepcopy(item))  # the stored items are shared: the request's own copies
        return request.model_copy(update={"input": items})

    def _keep(self, request: ResponsesRequest, response: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Store a finished response (completed or incomplete) unless the request sent ``store: false``."""
        if request.store:
            self.store.put(response, _input_items(request), history)

    def retrieve(self, response_id: str) -> dict[str, Any]:
        return self.store.get(response_id).response

    def delete(self, response_id: str) -> dict[str, Any]:
        self.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    def input_items(self, response_id: str, limit: int = 20, order: Literal["asc", "desc"] = "desc",
                    after: str | None = None) -> dict[str, Any]:
        """The request's own input items (OpenAI's list: newest first unless ``order`` is ``asc``; a page of
        ``limit`` after the item ``after``). A continuation's are its own input's, not the conversation before."""
        items = self.store.get(response_id).input_items
        items = items[::-1] if order == "desc" else items
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise APIError(400, f"after: no input item {after!r} in response {response_id!r}", "after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": copy.deepcopy(page), "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    async def _events(self, chat: ChatCompletionRequest, run: ChatRun, shape: _Shape, origins: list[str],
                      history: list[dict[str, Any]]):
        """The Responses stream of a started chat (:meth:`_response_events`); a failure mid-stream ends it with
        OpenAI's error event, then the failed response."""
        events = _Events(shape)
        async for event in until_failure(self._response_events(chat, run, events, history), run.handle):
            if not isinstance(event, APIError):
                yield event
                continue
            error = _renamed(event, origins)
            yield events.emit("error", code=error.code, message=error.message, param=error.param)
            failed = shape.response(events.output, "failed")
            failed["error"] = {"code": "server_error", "message": error.message}
            yield events.emit("response.failed", response=failed)

    async def _response_events(self, chat: ChatCompletionRequest, run: ChatRun, events: _Events,
                               history: list[dict[str, Any]]):
        """The chat's chunks as items opened, filled and closed."""
        shape = events.shape
        yield events.emit("response.created", response=shape.response([], "in_progress"))
        yield events.emit("response.in_progress", response=shape.response([], "in_progress"))
        finish, usage, calls = None, None, []
        async for chunk in self.serving.chat_chunks(chat, run):
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                delta = choice["delta"]
                if delta.get("content"):
                    for event in events.text(delta["content"]):
                        yield event
                # The calls are sent after the message, as the whole response has them: its one message holds
                # all the text, also text written after a call ("auto"), and comes first.
                calls.extend(delta.get("tool_calls") or ())
                finish = choice.get("finish_reason") or finish
        if not events.output and not calls:  # nothing generated: an empty message, as the whole response has
            for event in events.text(""):
                yield event
        for event in events.close_message(_status(finish)):
            yield event
        for call in calls:
            for event in events.call(call["id"], call["function"]["name"], call["function"]["arguments"]):
                yield event
        status = _status(finish)
        final = shape.response(events.output, status, _usage(usage))
        self._keep(shape.request, final, history)  # before the last event: a client that has it can continue
        yield events.emit("response.completed" if status == "completed" else "response.incomplete", response=final)


_ITEM_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def _is_reference(item: dict[str, Any]) -> bool:
    # OpenAI's ItemReference: its type may be left out, which leaves an item of an id alone
    return item.get("type") == "item_reference" or (item.get("type") is None and "id" in item
                                                    and set(item) <= {"id", "type"})


def _input_items(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input (already checked by :func:`to_chat_request`) as OpenAI lists it: items, each with an
    ``id`` and a ``status``, a message's text as parts (``output_text`` for the assistant's)."""
    raw = [{"role": "user", "content": request.input}] if isinstance(request.input, str) else request.input
    items = []
    for item in copy.deepcopy(raw):
        kind = item.setdefault("type", "message")
        if item.get("id") is None:
            item["id"] = _id(_ITEM_PREFIXES[kind])
        if item.get("status") is None:
            item["status"] = "completed"
        if kind == "message":
            content = item["content"]
            parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content
            item["content"] = [_listed_part(part, item["role"] == "assistant") for part in parts]
        elif kind == "function_call_output" and isinstance(item["output"], list):
            item["output"] = [_listed_part(part, False) for part in item["output"]]
        items.append(item)
    return items


def _listed_part(part: dict[str, Any], assistant: bool) -> dict[str, Any]:
    """A text part as OpenAI's item types hold it: an assistant's an ``output_text`` with its ``annotations``,
    any other an ``input_text``. A request may send either kind in either place (both are text here), and an
    assistant's ``output_text`` without ``annotations`` (as OpenAI's examples send it); listed back as sent, such a
    part fails the client's own types."""
    rest = {key: value for key, value in part.items() if key not in ("type", "annotations")}
    if assistant:
        annotations = part.get("annotations")
        return {"type": "output_text", **rest, "annotations": annotations if isinstance(annotations, list) else []}
    return {"type": "input_text", **rest}


def _status(finish: str | None) -> Literal["completed", "incomplete"]:
    return "incomplete" if finish == "length" else "completed"


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat's usage in the Responses shape (no reasoning tokens: the model has no separate reasoning)."""
    if usage is None:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


def _message_item(text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": _id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": _id("fc"), "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _reasoning_echo(reasoning: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Response's ``reasoning``: the request's settings (checked by :func:`_reasoning_effort`), as OpenAI's."""
    if reasoning is None:
        return None
    return {"effort": reasoning.get("effort"), "summary": reasoning.get("summary", reasoning.get("generate_summary"))}


class _Shape:
    """The Response object of one request: its id, creation time and the request's settings it echoes."""

    def __init__(self, request: ResponsesRequest, model: str, sampling: dict[str, Any] | None = None):
        self.id, self.created_at, self.request, self.model = (request.request_id or _id("resp"), int(time.time()),
                                                             request, model)
        sampling = sampling or {}
        self.temperature = sampling.get("temperature", request.temperature)
        self.top_p = sampling.get("top_p", request.top_p)

    def response(self, output: list[dict[str, Any]], status: str, usage: dict[str, Any] | None = None) -> dict:
        r = self.request
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "model": self.model,
            "output": copy.deepcopy(output), "parallel_tool_calls": r.parallel_tool_calls,
            "previous_response_id": r.previous_response_id, "reasoning": _reasoning_echo(r.reasoning),
            "temperature": self.temperature,
            "text": {"format": (r.text or {}).get("format") or {"type": "text"}},
            "tool_choice": r.tool_choice or "auto",
            "tools": r.tools or [], "top_p": self.top_p, "truncation": "disabled", "usage": usage,
            "user": r.user, "metadata": r.metadata or {}, "background": False,
        }

    def from_chat(self, result: ChatCompletionResponse) -> dict:
        """The whole Response of a chat result: a message item (its text) unless the answer is calls alone, then a
        function_call item a call."""
        choice = result.choices[0]
        message, finish = choice.message, choice.finish_reason
        output = []
        if message.content or not message.tool_calls:
            output.append(_message_item(message.content or "", _status(finish)))
        for call in message.tool_calls or ():
            output.append(_call_item(call.id, call.function.name, call.function.arguments, "completed"))
        return self.response(output, _status(finish), _usage(result.usage.model_dump()))


class _Events:
    """The stream's events, numbered, and the output items they have built so far."""

    def __init__(self, shape: _Shape):
        self.shape, self.sequence = shape, 0
        self.output: list[dict[str, Any]] = []
        self.message: dict[str, Any] | None = None  # the message item being written, if any

    def emit(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data, kind)

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def text(self, delta: str):
        if self.message is None:
            self.message = item = _message_item("", "in_progress")
            item["content"] = []
            self.output.append(item)
            yield self.emit("response.output_item.added", output_index=len(self.output) - 1, item=copy.deepcopy(item))
            part = {"type": "output_text", "text": "", "annotations": []}
            item["content"].append(part)
            yield self.emit("response.content_part.added", **self._where(item), content_index=0, part=dict(part))
        if delta:
            self.message["content"][0]["text"] += delta
            yield self.emit("response.output_text.delta", **self._where(self.message), content_index=0, delta=delta,
                            logprobs=[])

    def close_message(self, status: str):
        item, self.message = self.message, None
        if item is None:
            return
        part = item["content"][0]
        yield self.emit("response.output_text.done", **self._where(item), content_index=0, text=part["text"],
                        logprobs=[])
        yield self.emit("response.content_part.done", **self._where(item), content_index=0, part=dict(part))
        item["status"] = status
        yield self.emit("response.output_item.done", output_index=self.output.index(item), item=copy.deepcopy(item))

    def call(self, call_id: str, name: str, arguments: str):
        """A call arrives whole (chat sends each in one chunk): its item opened, its arguments in one delta, closed."""
        yield from self.close_message("completed")
        item = _call_item(call_id, name, "", "in_progress")
        self.output.append(item)
        index = len(self.output) - 1
        yield self.emit("response.output_item.added", output_index=index, item=dict(item))
        yield self.emit("response.function_call_arguments.delta", **self._where(item), delta=arguments)
        item["arguments"], item["status"] = arguments, "completed"
        yield self.emit("response.function_call_arguments.done", **self._where(item), name=name, arguments=arguments)
        yield self.emit("response.output_item.done", output_index=index, item=dict(item))


__all__ = ["ResponsesRequest", "ResponsesServing", "required_string", "to_chat_request"]
