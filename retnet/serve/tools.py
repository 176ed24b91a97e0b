"""Tool calls on ``/v1/chat/completions``: which a request asks for, the grammar that holds its output to the
tools' schemas, and the calls read back from the text; and the messages of a history of calls as chat
templates read them.

``tool_choice`` "required" or a named function is answered by a grammar; "auto" (OpenAI's default with
``tools``) by free text read by the server's tool-call parser (:mod:`retnet.serve.tool_parsers`, the
``tool_call_parser`` setting), and refused without one: telling a call from text needs the model's own format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from retnet.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    TokenizeChatRequest,
    ToolCall,
)
from retnet.serve.structured import tool_call_grammar
from retnet.serve.tool_parsers import TOOL_CALL_PARSERS, HermesToolParser, dumps_exact, loads_exact


def tool_calling(request: ChatCompletionRequest | TokenizeChatRequest,
                 parser: str | None = None) -> ToolCalling | None:
    """The request's tool calling, checked, or None when it asks for none (no tools, tool_choice "none").

    ``tool_choice`` "required" or a named function holds the output to a grammar of the tools' schemas, so the
    calls are whole JSON whatever the model. "auto" (OpenAI's default when tools are sent) needs the model's own
    tool-call format parsed out of free text, which differs by model: ``parser`` names it (the server's
    ``tool_call_parser``); without one "auto" is refused by name rather than answered as plain text where the
    client expects a call.
    """
    tools, choice = request.tools or [], request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    named = None
    if isinstance(choice, dict):
        function = choice.get("function")
        named = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(named, str) or not named:
            raise APIError(400, "tool_choice: a named function is {\"type\": \"function\", \"function\": {\"name\": "
                           f"...}}}}; got {json.dumps(choice)}", "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or a named function; got {choice!r}",
                       "tool_choice")
    if choice == "auto" and tools and parser is None:
        raise APIError(400, "tools: automatic tool calls (tool_choice 'auto', the default with tools) need a parser "
                       "of the model's own tool-call format, which this server was started without (the setting "
                       "tool_call_parser: --tool-call-parser hermes or RETNET_TOOL_CALL_PARSER=hermes, for a model "
                       "that writes <tool_call> calls); send tool_choice 'required' or a named function "
                       "({\"type\": \"function\", \"function\": {\"name\": ...}}) to have the output held to the "
                       "tools' schemas, or 'none' to have the tools ignored", "tools", "unsupported_parameter")
    # Checked whatever tool_choice: with "none" the tools still reach the chat template (vLLM's request model
    # refuses a malformed tool whatever the choice; passed on, it was rendered as it came, and echoed by the
    # Responses API).
    functions: list[tuple[str, Any]] = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(400, f"tools[{i}].type: only function tools are supported (type 'function'); got "
                           f"{kind!r}", f"tools[{i}].type", "unsupported_parameter")
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(400, f"tools[{i}].function.name: a function tool needs a name", f"tools[{i}].function.name",
                           "missing")
        parameters = function.get("parameters")
        # Not a schema's JSON text either, as OpenAI and vLLM refuse it: the grammar read the text, but the chat
        # template was given it as a string (a template's `tool | tojson` showed the model an escaped string).
        if parameters is not None and not isinstance(parameters, dict):
            text = " (send the schema itself, not its JSON text)" if isinstance(parameters, str) else ""
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object{text}; got "
                           f"{json.dumps(parameters)[:80]}", f"tools[{i}].function.parameters", "invalid_grammar")
        if choice != "none" and name in (known for known, _ in functions):
            raise APIError(400, f"tools[{i}].function.name: {name!r} names an earlier tool too",
                           f"tools[{i}].function.name")
        functions.append((name, parameters))
    if choice == "none" or (choice == "auto" and not tools):
        return None
    if not tools:
        raise APIError(400, f"tool_choice: {json.dumps(choice)} needs tools to call; got none", "tool_choice")
    if named is not None and named not in (name for name, _ in functions):
        raise APIError(400, f"tool_choice: the function {named!r} is not among tools ("
                       f"{', '.join(name for name, _ in functions)})", "tool_choice")
    return ToolCalling(functions, named, getattr(request, "parallel_tool_calls", None) is not False,
                       parser if choice == "auto" else None)


@dataclass(slots=True)
class ToolCalling:
    """A chat request's tool calls: the grammar its output is held to, and the calls read back from the text;
    or with ``parser`` ("auto"), free text and the parser that reads the calls out of it."""

    functions: list[tuple[str, Any]]  # each tool's function name and parameters (None: left out), in order
    named: str | None  # the function tool_choice names; None: "required" or "auto", calls to any of them
    parallel: bool  # several calls may be made (parallel_tool_calls not false)
    parser: str | None = None  # "auto": the tool-call parser's name (TOOL_CALL_PARSERS); None: a grammar

    def grammar(self) -> tuple[str, str]:
        return tool_call_grammar(self.functions, self.named, self.parallel)

    def finish_reason(self) -> str:
        """A choice's finish_reason once its calls are whole: OpenAI's (and vLLM's) "tool_calls" for calls the
        model chose to make ("required"), "stop" for the call a named ``tool_choice`` forced."""
        return "stop" if self.named is not None else "tool_calls"

    def text_parser(self) -> HermesToolParser:
        """A new parser of one choice's text ("auto")."""
        return TOOL_CALL_PARSERS[self.parser]((name for name, _ in self.functions), self.parallel)

    def calls(self, text: str) -> list[ToolCall] | None:
        """The calls a choice's text holds, or None when it is no whole JSON of them (a stop string cut it)."""
        try:
            value = loads_exact(text)
            if self.named is not None:
                return [ToolCall(function=FunctionCall(name=self.named, arguments=text))]
            if not isinstance(value, list) or not all(isinstance(c, dict) and type(c.get("name")) is str
                                                      and "parameters" in c for c in value):
                return None
            # vLLM's arguments for "required": the parameters' JSON as json.dumps writes it.
            return [ToolCall(function=FunctionCall(name=c["name"], arguments=dumps_exact(c["parameters"])))
                    for c in value]
        except (ValueError, RecursionError):  # no whole JSON, or nested past Python's stack: the text as content
            return None


def template_message(message: ChatMessage, developer: str = "developer") -> dict[str, Any]:
    """A message as chat templates read it. HF's templates take a tool call's arguments as an object: the
    JSON text is parsed ({} when it is no JSON, as vLLM reads it). ``developer``: the role a developer message is
    given ("system" for a template that does not render developer messages, see :func:`developer_role`)."""
    role = developer if message.role == "developer" else message.role
    # A string as sent; text parts as a list of them (none for no content), which the chat template sees joined or
    # as parts by --chat-template-content-format (OpenAIServing._render)
    content = message.content if isinstance(message.content, str) else [
        {"type": "text", "text": part.part_text()} for part in message.content or ()]
    out: dict[str, Any] = {"role": role, "content": content}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [{**({"id": call.id} if call.id is not None else {}), "type": call.type,
                              "function": {"name": call.function.name,
                                           "arguments": _arguments(call.function.arguments)}}
                             for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    # Only when sent: templates test ``message.reasoning_content is defined`` (or ``is string``).
    reasoning = message.reasoning_text()
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    return out


DEVELOPER_PROBE = "retnet-developer-probe-1c9e"


def developer_role(render: Callable[[list[dict[str, Any]]], str]) -> str:
    """The role a developer message is templated as: "developer" when the chat template renders one (vLLM passes
    the role to the template as it is, as training passes a row's messages), else "system", OpenAI's reading of
    it, so that its instructions reach the model: many templates know no developer role, and drop its messages
    (Qwen2.5's, Qwen3's) or refuse them (Mistral's). ``render``: messages -> the template's text."""
    probe = [{"role": "developer", "content": DEVELOPER_PROBE}, {"role": "user", "content": "a"}]
    try:
        text = render(probe)
    except Exception:  # a template that refuses the role
        return "system"
    return "developer" if DEVELOPER_PROBE.lower() in text.lower() else "system"  # (a template may change case)


def _arguments(arguments: str | dict[str, Any]) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        value = json.loads(arguments)
    except ValueError:
        # {} as vLLM reads text that is no JSON: "" (a call without arguments) and text a model cut short alike. The
        # text itself reached the template, which wrote it as an escaped string (`arguments | tojson`) or failed
        # iterating it as an object: a 400 for every later turn of a conversation that holds such a call.
        return {}
    try:
        # A lone surrogate's escape ("\\ud800", which JSON admits and a call this server answered holds as the model
        # wrote it) became a character no text can hold: the template's text failed to encode, a 400 "the chat
        # template rejected the messages" for a Responses continuation of that very answer. Such arguments are
        # kept as text.
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return arguments
    return value


__all__ = ["DEVELOPER_PROBE", "ToolCalling", "developer_role", "template_message", "tool_calling"]
