"""Request and response models of the OpenAI API subset the server speaks, and its error body.

Field names and defaults follow OpenAI's, so existing clients work unchanged. Limits that depend on the
server's settings (``max_tokens``, ``n``, prompt length ...) are checked in :mod:`retnet.serve.request_checks`;
the bounds here are the ones no setting changes. Extra fields beyond OpenAI's: ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ``stop_token_ids``, ``include_stop_str_in_output``,
``allowed_token_ids``, ``truncate_prompt_tokens``, ``bad_words``, ``session_id``, ``return_token_ids``,
``prompt_logprobs``, ``skip_special_tokens``, ``spaces_between_special_tokens``, ``add_special_tokens``,
``use_beam_search``, ``length_penalty`` and ``best_of`` (OpenAI's for completions, vLLM's for chat too);
chat's ``add_generation_prompt``, ``continue_final_message``, ``echo``, ``chat_template_kwargs`` and
``documents``. vLLM's ``/tokenize`` and ``/detokenize`` are here too.
Tool calls (``tools`` with ``tool_choice`` ``"required"`` or a named function, or ``"auto"`` with the server's
``tool_call_parser``) are answered in OpenAI's shape.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
_SURROGATE = re.compile("[\ud800-\udfff]")


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


class APIError(Exception):
    """Raised anywhere in request handling; the app turns it into ``status`` with an :class:`ErrorResponse`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        type: str | None = None, headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def check_finite_json(value: Any, where: str, code: str) -> None:
    """A 400 (``code``) naming the first number in ``value`` that JSON has no number for: NaN, or one past a
    double's range (``1e999`` is read as inf), which Python's json reads from a body all the same. ``where``: the
    value's place in the request (``tools[0].function.parameters``), extended to the number's."""
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"{where}: {value} is no JSON number (a NaN, or past a double's range)", where, code)
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite_json(item, f"{where}.{key}", code)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_finite_json(item, f"{where}[{i}]", code)


# ----------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------
def _refuse_bool(value: Any) -> Any:
    # bool is an int subclass, so lax int validation would take JSON true/false as token ids 1/0.
    if isinstance(value, bool):
        raise ValueError("a token id must be an integer, not a boolean")
    return value


# A request id's longest (vLLM's request_id, X-Request-Id): every streamed chunk's id repeats it
REQUEST_ID_MAX_CHARS = 256

TokenId = Annotated[int, BeforeValidator(_refuse_bool), Field(ge=0)]


# The ways a request asks for structured output (retnet.serve.structured): OpenAI's, vLLM's and llama.cpp's.
STRUCTURED_OUTPUT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                            "structured_outputs", "grammar", "json_schema")
# vLLM's other extras that change the output, each with the value that changes nothing (what passes; null always
# does): a client sending another one would get output it did not ask for if they were ignored.
UNSUPPORTED_EXTRAS: dict[str, Any] = {"logits_processors": None, "structural_tag": None}


def not_run_unless_no_op(value: Any, no_op: Any) -> str | None:
    """Why a field the server does not run is refused at ``value`` ("(only ... is accepted); got ..."), or None
    when it is unset or at its no-op value (bool-checked: in Python true == 1, and a length_penalty of true is no
    1.0)."""
    if value is None or (value == no_op and isinstance(value, bool) == isinstance(no_op, bool)):
        return None
    accepted = "null" if no_op is None else f"{json.dumps(no_op)} or null"
    return f"(only {accepted} is accepted); got {json.dumps(value)[:80]}"


def _drop_nulls(data: Any) -> Any:
    # OpenAI takes null for every optional parameter, and its Python client sends one for each argument
    # given as None (temperature=None, n=None ...): null must mean "the default", not a type error.
    if isinstance(data, dict):
        return {key: value for key, value in data.items() if value is not None}
    return data


class BodyFields(BaseModel):
    """The rules every request body is read with: null is the field's default, and text is Unicode."""

    _null_means_default = model_validator(mode="before")(_drop_nulls)

    # JSON may escape half of a surrogate pair ("\ud83d", a string cut inside an emoji): Python takes it, but
    # it is no Unicode text, and the tokenizer (and the UTF-8 response) fail on it.
    @field_validator("*", mode="before")
    @classmethod
    def _text_is_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_lone_surrogates(value, info)


class RequestFields(BodyFields):
    """A body that queues work (completions, chat, responses, the pooling routes'): :class:`BodyFields`' rules
    and vLLM's ``priority``. The bodies that queue none (tokenize, detokenize, the LoRA routes') are
    :class:`BodyFields`: a ``priority`` there is ignored as any unknown field, not refused."""

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_is_not_a_boolean(cls, value: Any) -> Any:
        return _refuse_bool_number(value)

    # vLLM's: with --scheduling-policy priority, lower is served earlier (ties in arrival order); under fcfs only 0
    # is accepted (OpenAIServing.checked_priority). The pooling routes' bodies (retnet.serve.classify, score)
    # inherit it from here too.
    priority: int = 0


class StreamOptions(BaseModel):
    _null_means_default = model_validator(mode="before")(_drop_nulls)

    include_usage: bool = False
    # vLLM's extra: with include_usage, every chunk also carries the usage so far.
    continuous_usage_stats: bool = False


class SamplingFields(RequestFields):
    """What both endpoints share: sampling, stopping, streaming and the server's extras."""

    # Unknown fields (user, metadata, ...) are accepted and ignored, as vLLM does, so clients that send them
    # still work; so are vLLM's that change no answer here (kv_transfer_params, vllm_xargs, mm_processor_kwargs,
    # guided_decoding_backend, guided_whitespace_pattern: see the README). Fields that would
    # change the output (response_format, tools, best_of ...) are declared, so that serving can refuse the values
    # it does not support by name instead of ignoring them.
    model_config = ConfigDict(extra="ignore")

    # bool is an int subclass, and lax validation takes JSON true as 1: n, max_tokens, seed, temperature ...
    # would silently become 1 where OpenAI answers 400. check_fields=False: some are the endpoints' own.
    @field_validator("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "seed", "n", "best_of", "max_completion_tokens",
                     "top_logprobs", "min_tokens", "truncate_prompt_tokens", "prompt_logprobs", "length_penalty",
                     mode="before", check_fields=False)
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any) -> Any:
        return _refuse_bool_number(value)

    @field_validator("truncate_prompt_tokens", check_fields=False)
    @classmethod
    def _positive_or_minus_one(cls, value: int | None) -> int | None:
        return check_truncate_prompt_tokens(value)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _biases_are_not_booleans(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for bias in value.values():
                _refuse_bool_number(bias)
        return value

    model: str | None = None
    # 0 only for a completion with echo (score the prompt, generate nothing); serving refuses it otherwise.
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # OpenAI accepts 0; the top token always stays
    top_k: int = Field(-1, ge=-1, description="-1 or 0: off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    # Token id (a JSON object's keys are strings) -> -100..100, added to the logits before sampling.
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # vLLM's: no stop condition (EOS, stop_token_ids, stop strings) ends a choice before this many tokens.
    min_tokens: int = Field(0, ge=0)
    # vLLM's: sampling one ends the choice as EOS does (counted, its text left out).
    stop_token_ids: list[TokenId] | None = None
    # vLLM's: a stop string that ends a choice (and, as vLLM's detokenizer does, a stop token's text) is kept.
    include_stop_str_in_output: bool = False
    # vLLM's: only these tokens may be sampled (serving checks they are in the vocabulary and not none).
    allowed_token_ids: list[TokenId] | None = None
    # vLLM's: run only the prompt's last k tokens (a chat's templated conversation's); -1: the most the server
    # runs (--max-prompt-tokens), as vLLM's -1 is the model's length.
    truncate_prompt_tokens: int | None = None
    # vLLM's: words the output must not contain, as the tokenizer spells them (see RequestChecks.bad_word_ids).
    bad_words: list[str] | None = None
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN,
                                   description="continue this session's saved state, then save it again")
    return_token_ids: bool = False
    # Structured output (STRUCTURED_OUTPUT_FIELDS, at most one of them): text that follows a JSON schema, a regex,
    # a list of choices or a grammar (see retnet.serve.structured).
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    grammar: Any = None  # llama.cpp's
    json_schema: Any = None  # llama.cpp's
    # vLLM's: each prompt token's logprob (after the tokens before it) and rank, with this many top alternatives
    # (a completion's choices and a chat response carry them; not with stream, see serving).
    prompt_logprobs: int | None = Field(None, ge=0)  # at most --max-logprobs, as vLLM checks it
    # vLLM's: false keeps special tokens' text (an EOS generated under ignore_eos) in the output, as HF's decode
    # does; spaces_between_special_tokens is passed to a slow tokenizer's decode (fast ones have no such option).
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # vLLM's beam search (retnet.serve.beam_search): n beams, ranked by cum_logprob / length ** length_penalty;
    # a length_penalty other than 1 without it is refused. Strict: lax validation reads "yes" as true.
    use_beam_search: StrictBool = False
    length_penalty: float = Field(1.0, allow_inf_nan=False)
    # OpenAI's (completions) and vLLM's (both endpoints): best_of candidates generated, the n with the highest mean
    # logprob per token returned (not streamed).
    best_of: int | None = Field(None, ge=1)
    # UNSUPPORTED_EXTRAS, refused likewise unless it holds the value that changes nothing.
    logits_processors: Any = None
    structural_tag: Any = None
    # vLLM's: each logprobs entry's token (and its alternatives') as "token_id:<id>" rather than its text, which a
    # client cannot map back to an id when tokens decode alike (a byte split across tokens, U+FFFD); null: the
    # server's --return-tokens-as-token-ids.
    return_tokens_as_token_ids: bool | None = None
    # vLLM's: the response's id is cmpl-<request_id> / chatcmpl-<request_id> (an X-Request-Id header wins over it);
    # none or "": the server's own. Bounded: every streamed chunk repeats it (1 MB of id, a megabyte a token).
    request_id: str | None = Field(None, max_length=REQUEST_ID_MAX_CHARS)
    # vLLM's: only requests of the same salt share cached prompt prefixes (Engine: the prefix cache's key), so that
    # one tenant cannot learn from cached_tokens or the timing what another's prompts begin with.
    cache_salt: str | None = None

    @field_validator("cache_salt")
    @classmethod
    def _salt_is_not_empty(cls, value: str | None) -> str | None:
        if value == "":  # refused as vLLM refuses it: a client sending "" meant a salt and would get none
            raise PydanticCustomError("invalid_value", "must be a non-empty string if provided")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def _refuse_lone_surrogates(value: Any, info: ValidationInfo) -> Any:
    where = _lone_surrogate_at(value, info.field_name)
    if where is not None:
        raise PydanticCustomError("invalid_unicode", "{where}: a lone UTF-16 surrogate is not Unicode text (a "
                                  "string cut inside a surrogate pair?)", {"where": where})
    return value


def _lone_surrogate_at(value: Any, where: str) -> str | None:
    """Where in ``value`` (a field's JSON, ``where`` its name) a string holds a lone surrogate, or None."""
    if isinstance(value, str):
        return where if _SURROGATE.search(value) else None
    if isinstance(value, (list, dict)) and _may_hold_surrogate(value):
        return _locate_surrogate(value, where)
    return None


def _may_hold_surrogate(value: list | dict) -> bool:
    """Whether ``value`` may hold a lone surrogate, at C speed: its JSON, non-ASCII kept, searched once. The common
    answer, no, then builds no location (a place for each item of each level, 90k of them for a 30k-message body,
    took up to a second of the event loop). What does not encode (a model given in Python) is walked."""
    try:
        return _SURROGATE.search(json.dumps(value, ensure_ascii=False)) is not None
    except (TypeError, ValueError, RecursionError):
        return True


def _locate_surrogate(value: list | dict, where: str) -> str | None:
    """Where in ``value``, which may hold a lone surrogate, a string (a dict's key: the dict) holds one, or None."""
    if isinstance(value, list):
        items = enumerate(value)
        place = "{}[{}]"
    else:
        if any(isinstance(key, str) and _SURROGATE.search(key) for key in value):
            return where
        items = value.items()
        place = "{}.{}"
    for key, item in items:
        # Type-checked here, not in a call per item: a prompt of token ids has 10^5 of them.
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return place.format(where, key)
        elif isinstance(item, (list, dict)) and _may_hold_surrogate(item):
            found = _locate_surrogate(item, place.format(where, key))
            if found is not None:
                return found
    return None


def check_truncate_prompt_tokens(value: int | None) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: the last k >= 1 tokens kept, or -1 for as many as the server runs."""
    if value is not None and value != -1 and value < 1:
        raise PydanticCustomError("invalid_value", "must be >= 1 (the last tokens kept), or -1 (up to "
                                  "--max-prompt-tokens)")
    return value


def _refuse_bool_number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


PromptType = Annotated[
    str | list[str] | list[TokenId] | list[list[TokenId]],
    Field(union_mode="left_to_right"),
]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    # vLLM's: prompts as embeddings, run beside the prompt's; refused (serving): dropped, their choices would be missing.
    prompt_embeds: Any = None
    # vLLM's: the tokenizer's special tokens (a BOS) around the prompt text; false: the text's tokens alone.
    add_special_tokens: bool = True

    # Chat's logprobs is a boolean; here it is a count, and true would silently ask for one alternative.
    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_is_not_a_boolean(cls, value: Any) -> Any:
        return _refuse_bool_number(value)


class ContentPart(BaseModel):
    """One part of a message's ``content`` list. Any ``type`` parses, so that serving can refuse the ones it
    does not support (only ``text``, and an assistant message's ``refusal``) by name instead of with a union's
    type error."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    # OpenAI's assistant content holds text and refusal parts: a history sent back holds them (vLLM reads its text)
    refusal: str | None = None

    def part_text(self) -> str:
        return (self.refusal if self.type == "refusal" else self.text) or ""


class FunctionCallParam(BaseModel):
    """A tool call's function in a conversation's history. ``arguments`` is JSON text as OpenAI sends it; an
    object is taken too (some clients send one)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str | dict[str, Any]


class ToolCallParam(BaseModel):
    """An earlier assistant message's tool call, as the client sends it back with the tool's result."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # History of tool calling: an assistant message's calls (its content then null), and a tool message's
    # answer to one of them.
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    # An assistant message's reasoning, as a reasoning model's answers are sent back in the history: DeepSeek's (and
    # vLLM's older) reasoning_content, or vLLM's current name for it, reasoning (the same text if both are sent).
    # The template gets it as the message's reasoning_content (tools.template_message), as training passes a row's
    # messages: Qwen3's and DeepSeek-R1's templates render it (<think>...</think>); left out when not sent.
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("reasoning_content", "reasoning")
    @classmethod
    def _reasoning_is_the_assistants(cls, value: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role")
        if value is not None and role is not None and role != "assistant":
            raise PydanticCustomError("invalid_value", "only an assistant message has reasoning; got a {role} "
                                      "message's", {"role": repr(role)})
        other = info.data.get("reasoning_content") if info.field_name == "reasoning" else None
        if value is not None and other is not None and value != other:
            raise PydanticCustomError("invalid_value", "reasoning and reasoning_content name the same text (vLLM's "
                                      "name and DeepSeek's); got two different ones")
        return value

    def reasoning_text(self) -> str | None:
        """The message's reasoning (either field), or None when it has none."""
        return self.reasoning_content if self.reasoning_content is not None else self.reasoning

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        # vLLM's chat_utils joins a message's text parts with newlines (a template sees one string either way).
        return "\n".join(part.part_text() for part in self.content)


# OpenAI's reasoning_effort values, and vLLM's "max".
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
REASONING_EFFORTS: tuple[str, ...] = get_args(ReasoningEffort)


def checked_effort(effort: Any, param: str) -> str | None:
    """A reasoning effort the Responses and Messages APIs name their own way (``reasoning.effort``,
    ``output_config.effort``), checked as chat's ``reasoning_effort`` is, the 400 naming theirs."""
    if effort is not None and effort not in REASONING_EFFORTS:
        raise APIError(400, f"{param} must be one of {', '.join(REASONING_EFFORTS)}; got {json.dumps(effort)[:80]}",
                       param, "invalid_value")
    return effort


def _effort_for_template(request: ChatCompletionRequest | TokenizeChatRequest):
    """vLLM's ``reasoning_effort``: a chat template variable (gpt-oss's template reads it) and the
    ``enable_thinking`` it implies ("none": off); a value ``chat_template_kwargs`` sets itself wins, as it does over
    ``add_generation_prompt``. Folded into ``chat_template_kwargs``, which everything that templates reads."""
    if request.reasoning_effort is not None:
        implied = {"reasoning_effort": request.reasoning_effort, "enable_thinking": request.reasoning_effort != "none"}
        request.chat_template_kwargs = {**implied, **(request.chat_template_kwargs or {})}
    return request


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    # At most --max-logprobs (serving checks it; 20 by default, OpenAI's limit): an operator may raise it.
    top_logprobs: int | None = Field(None, ge=0)

    @field_validator("top_logprobs")
    @classmethod
    def _no_alternatives_ask_nothing(cls, value: int | None, info: ValidationInfo) -> int | None:
        # vLLM's rule (and 0 its default, which clients written for it send): only a count above 0 needs logprobs:
        # true. 0 without it asks for nothing, and is read as left out rather than refused (serving's check).
        return None if value == 0 and not info.data.get("logprobs") else value

    add_generation_prompt: bool = True
    # vLLM's chat extras. continue_final_message: the last message is left open for the model to continue
    # (a prefilled answer); echo: that message's text starts the answer's; chat_template_kwargs and
    # documents: the template's own variables (Qwen3's enable_thinking ...); add_special_tokens: the
    # tokenizer's (a BOS) on top of what the template writes.
    continue_final_message: bool = False
    echo: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    add_special_tokens: bool = False
    # Template variables (_effort_for_template). include_reasoning: vLLM's, which drops the reasoning its reasoning
    # parser splits off; there is no parser here, no reasoning apart from the content, so either value changes nothing.
    reasoning_effort: ReasoningEffort | None = None
    include_reasoning: bool = True
    _effort_in_template = model_validator(mode="after")(_effort_for_template)
    # A template sent by the client is refused (serving): it would run client-written Jinja on the server.
    chat_template: Any = None
    # Tool calling: with tool_choice "required" or a named function the output is held to the tools' schemas
    # and answered as tool calls; "auto" with tools is parsed for calls by the server's tool_call_parser, and
    # refused without one; the legacy functions are refused (serving, tools).
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # false: "required" makes one call, not a list of them.
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None


class TokenizerFields(BodyFields):
    """What vLLM's ``/tokenize`` (both forms) and ``/detokenize`` share, read as the /v1 routes read theirs:
    unknown fields ignored, null the default, no lone surrogates."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None


class TokenizeCompletionRequest(TokenizerFields):
    """``/tokenize`` of a text: the ids ``/v1/completions`` runs for it as ``prompt``."""

    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(TokenizerFields):
    """``/tokenize`` of a conversation: the ids ``/v1/chat/completions`` runs for it. The templating fields
    are chat's, with its defaults, so that the same fields give the same ids."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    reasoning_effort: ReasoningEffort | None = None
    _effort_in_template = model_validator(mode="after")(_effort_for_template)
    return_token_strs: bool = False
    # Checked as chat checks them (request_checks.check_chat_features, tools.tool_calling): a conversation chat
    # refuses is refused, not counted without its template or tools; tools chat shows the template are shown here
    # too.
    chat_template: Any = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    # Declared so that a body holding both forms is refused (serving), not counted as one of them.
    prompt: Any = None


def _tokenize_form(data: Any) -> str:
    # vLLM's two forms differ by their required field. A body with neither is read as a text's, so that the
    # error names the missing prompt; nulls mean absent, as everywhere.
    if isinstance(data, dict) and data.get("messages") is not None:
        return "chat"
    return "completion"


# The tags are the error location's first part (app's _describe_validation leaves them out of ``param``).
TOKENIZE_FORMS = ("completion", "chat")
TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("completion")] | Annotated[TokenizeChatRequest, Tag("chat")],
    Discriminator(_tokenize_form),
]


class DetokenizeRequest(TokenizerFields):
    # Not TokenId: an id outside the vocabulary, negative ones too, is serving's invalid_token_id on ``tokens``.
    tokens: list[Annotated[int, BeforeValidator(_refuse_bool)]]


class LoadLoraAdapterRequest(BodyFields):
    """vLLM's ``POST /v1/load_lora_adapter``: serve the peft adapter at ``lora_path`` (on the server) as the model
    ``lora_name``; ``load_inplace``: replace an adapter of that name already served."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BodyFields):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_int_id: int | None = None  # vLLM's; accepted and not read (an adapter is known here by its name)


# ----------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------
def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob``: one token of a ``prompt_logprobs`` entry (keyed by its id). ``rank``: 1 + the tokens
    more likely there; ``decoded_token``: the token's label, as in ``logprobs``."""

    logprob: float
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: one entry a prompt token, null for the first (nothing before it to score it after).
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    # vLLM's: the stop string or stop_token_ids token that ended the choice; null when it ended otherwise (EOS,
    # its length, a grammar's end) and on a stream's chunks before the choice's last.
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    session_id: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str = Field(default_factory=tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(BaseModel):
    """A stream's tool call, sent whole in one chunk: ``index`` is its place among the choice's calls."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None = None
    stop_reason: int | str | None = None  # as CompletionChoice's
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    session_id: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's place for chat's: the response's, not a choice's
    # return_token_ids: vLLM's place for a chat's prompt ids, beside choices (each choice keeps its copy too)
    prompt_token_ids: list[int] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None = None
    stop_reason: int | str | None = None  # as CompletionChoice's
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    session_id: str | None = None


class ModelCard(BaseModel):
    """OpenAI's model object, with vLLM's ``max_model_len`` and the two limits it is the sum of.

    A RetNet has no context length (its state is O(1) in the tokens seen); what bounds a request is the
    server's prompt limit and completion limit, each checked on its own, so ``max_model_len`` (the most
    tokens one request can span, prompt and completion) is their sum, and a client sizing a request
    from it needs the two parts too.
    """

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "retnet"
    root: str | None = None  # vLLM's: the model's path; a LoRA adapter's directory
    parent: str | None = None  # vLLM's: a LoRA adapter's base model (None for the base model)
    max_model_len: int
    max_prompt_tokens: int
    max_completion_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    """vLLM's: ``max_model_len`` is the model card's; ``token_strs`` only when asked for."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict without the server-only extras that are unset (keeps OpenAI's shape)."""
    data = model.model_dump()
    _drop_none(data, ("prompt_token_ids", "token_ids", "session_id", "prompt_tokens_details", "bytes", "tool_calls",
                      "prompt_logprobs"))
    return data


def _drop_none(value: Any, keys: tuple[str, ...]) -> None:
    if isinstance(value, dict):
        for key in keys:
            if key in value and value[key] is None:
                del value[key]
        for item in value.values():
            _drop_none(item, keys)
    elif isinstance(value, list):
        for item in value:
            _drop_none(item, keys)
