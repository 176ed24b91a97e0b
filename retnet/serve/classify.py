"""The pooling API's handlers: a classifier or reward model (a ``RetNetForSequenceClassification`` export) with
vLLM's ``POST /classify`` (``/v1/classify``) and ``POST /pooling``, and an embedding model (``--convert embed``: a
causal LM's or a classifier's backbone) with OpenAI's ``POST /v1/embeddings`` and vLLM's ``/pooling``.

Both run on a :class:`~retnet.serve.pooling.PoolingEngine` (one packed ``cu_seqlens`` forward for the inputs of
every waiting request), whose pooler makes each input's row: the score head's, or a pooled hidden state.
:class:`ClassifyServing` and :class:`EmbedServing` check and tokenize requests and shape the responses;
``/tokenize``, ``/detokenize`` and the model card are :class:`~retnet.serve.serving.OpenAIServing`'s; vLLM's
``/score`` and ``/rerank`` run on these handlers too (:mod:`retnet.serve.score`).

A ``messages`` conversation is scored as the reward trainer scored it (``retnet-train --reward.enabled``): the
conversation before its last message rendered with the generation prompt, then the last message as the rest of
the rendered conversation (:func:`~retnet.tokenization.render_pair`, the trainer's own function), each
encoded on its own, then EOS. An ``input`` is scored (or embedded) as sent (vLLM's): nothing is appended to it.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from retnet.serve.metrics import ServeMetrics
from retnet.serve.pooling import PoolingEngine
from retnet.serve.protocol import (
    APIError,
    ChatMessage,
    ModelCard,
    PromptType,
    RequestFields,
    Usage,
    _refuse_bool_number,
    check_truncate_prompt_tokens,
    random_id,
)
from retnet.serve.request_checks import TEMPLATE_CALL_ARGUMENTS, check_content_parts
from retnet.serve.sequence import EngineUnavailable, QueueFull
from retnet.serve.serving import OpenAIServing, _chat_size, _in_form, _size
from retnet.serve.settings import ServeSettings
from retnet.serve.tools import template_message
from retnet.tokenization import closed_by_eos, render_pair

POOLING_ROUTES = ("/classify", "/v1/classify", "/pooling")
EMBEDDING_ROUTES = ("/v1/embeddings",)
# use_activation and vLLM's deprecated names of it (its get_use_activation reads normalize, softmax, then
# activation).
ACTIVATION_FIELDS = ("use_activation", "normalize", "softmax", "activation")
# An embedding's: its activation is the L2 normalization, which normalize names; softmax and activation name a
# classifier's, so an embedding server refuses them.
EMBED_ACTIVATION_FIELDS = ("use_activation", "normalize")
# vLLM's embed_dtype (base64's element type): each value cast to the first dtype, whose bits are read as the
# second (an integer of the same width: numpy orders its bytes, and has no bfloat16 or fp8).
EMBED_DTYPES = {"float32": (torch.float32, torch.int32), "float16": (torch.float16, torch.int16),
                "bfloat16": (torch.bfloat16, torch.int16), "fp8_e4m3": (torch.float8_e4m3fn, torch.uint8),
                "fp8_e5m2": (torch.float8_e5m2, torch.uint8)}
# vLLM's endianness, as numpy writes it (native: this server's, as vLLM's).
BYTE_ORDERS = {"native": "=", "little": "<", "big": ">"}
# vLLM's chat-form options (its ClassificationChatRequest): they shape how `messages` are templated.
CHAT_OPTIONS = ("add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs")


# ----------------------------------------------------------------------------------------------------------
# Requests and responses (vLLM's ClassificationRequest / PoolingRequest and their responses)
# ----------------------------------------------------------------------------------------------------------
class InputFields(RequestFields):
    """What every pooling route's body shares: ``input`` (completions' ``prompt`` union) and how it is tokenized.
    Unknown fields (vLLM's ``request_id``, ``cache_salt``, ...) are accepted and ignored, as on every
    route; those of vLLM's that change the output are declared, so that they are read or refused by name: here
    ``add_special_tokens``, ``truncate_prompt_tokens``, ``truncation_side`` and ``padding``; the activation
    (``use_activation`` and its older names) on each route's body; ``encoding_format``, ``embed_dtype``,
    ``endianness`` and ``dimensions`` on :class:`EncodingFields`."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("truncate_prompt_tokens", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        return _refuse_bool_number(value)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _positive_or_minus_one(cls, value: int | None) -> int | None:
        return check_truncate_prompt_tokens(value)

    model: str | None = None
    input: PromptType | None = None
    # None: true for `input`, false for `messages` (whose template writes the special tokens), as completions/chat.
    add_special_tokens: bool | None = None
    # -1: vLLM's "up to the model's length", here --max-prompt-tokens.
    truncate_prompt_tokens: int | None = None
    # vLLM's: which end truncate_prompt_tokens cuts. None or left: the last tokens kept; right: the first.
    truncation_side: Literal["left", "right"] | None = None
    # vLLM's: max_length pads each input to the model's length; only its default is served (_score says why).
    padding: Literal["max_length", "do_not_pad"] | None = None
    user: str | None = None  # accepted, not read


class ClassifyRequest(InputFields):
    """``/classify``'s body: ``input`` or ``messages`` (one conversation), not both."""

    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # None: the route's default (/classify: true, /pooling: false); see ScorePooler.activate. normalize, softmax
    # and activation: vLLM's deprecated names of it, read as it (_asked_activation).
    use_activation: bool | None = None
    normalize: bool | None = None
    softmax: bool | None = None
    activation: bool | None = None
    # vLLM's chat-form options, with `messages` only: the template's own variables are passed to it; the
    # others would template something the reward trainer never scored (an opened assistant turn, a request's own
    # template), so only their defaults are accepted (ClassifyServing._check_chat_options).
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: Any = None
    chat_template_kwargs: dict[str, Any] | None = None


class EncodingFields(InputFields):
    """How the rows are written (vLLM's ``EncodingRequestMixin``, and OpenAI's ``dimensions``): on ``/pooling``
    and ``/v1/embeddings``."""

    encoding_format: Literal["float", "base64"] = "float"
    # vLLM's, read by base64 alone (as vLLM's: "float" writes each value as a JSON number either way).
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "little", "big"] = "native"
    # OpenAI's matryoshka cut: only the full width is served (EmbedServing._embedded). Strict: "64" and
    # 64.0 are no width (OpenAI answers 400), nor is true.
    dimensions: StrictInt | None = None


class PoolingRequest(ClassifyRequest, EncodingFields):
    """``/pooling``'s body: ``/classify``'s, and how the rows are written (:class:`EncodingFields`)."""

    # vLLM's pooling task: declared so that a task other than the one served (token_embed's per-token rows, say)
    # is refused by name rather than answered with one row an input (_pooling_task).
    task: str | None = None


class EmbeddingRequest(EncodingFields):
    """OpenAI's ``/v1/embeddings`` body (``input`` required, checked by the handler so that its 400 names it), with
    vLLM's ``truncate_prompt_tokens``, ``truncation_side``, ``add_special_tokens`` (default true) and
    ``use_activation`` (the L2 normalization; None: --pooler-config's ``normalize``), or its older name
    ``normalize``."""

    use_activation: bool | None = None
    normalize: bool | None = None
    # vLLM's chat-form embedding (its EmbeddingChatRequest), not served: declared so that it is refused by name, not
    # dropped as an unknown field (beside an input, the input's embedding would answer for the conversation).
    messages: Any = None


class ListResponse(BaseModel):
    """What vLLM's pooling responses share: ``id`` (each route's prefix, given by the subclass), ``object``
    ``"list"``, ``created``, ``model``; each subclass adds its ``data`` and ``usage``."""

    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(ListResponse):
    id: str = Field(default_factory=lambda: random_id("classify"))
    data: list[ClassifyData]
    usage: Usage


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | str


class PoolingResponse(ListResponse):
    id: str = Field(default_factory=lambda: random_id("pool"))
    data: list[PoolingData]
    usage: Usage


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(ListResponse):
    """OpenAI's (``object``, ``data``, ``model``, ``usage``), with vLLM's ``id`` and ``created``."""

    id: str = Field(default_factory=lambda: random_id("embd"))
    data: list[EmbeddingData]
    usage: EmbeddingUsage


# ----------------------------------------------------------------------------------------------------------
# The handlers
# ----------------------------------------------------------------------------------------------------------
class ClassifyServing(OpenAIServing):
    """``/classify`` and ``/pooling`` over a :class:`PoolingEngine` with a score head; the model card, ``/tokenize``
    and ``/detokenize`` are :class:`OpenAIServing`'s (its generation handlers are not routed in this mode)."""

    engine: PoolingEngine

    def __init__(self, settings: ServeSettings, engine: PoolingEngine, tokenizer, metrics: ServeMetrics,
                 chat_template: str | None = None):
        """``chat_template``: ``--chat-template``'s, used for ``messages`` instead of the tokenizer's."""
        super().__init__(settings, engine, tokenizer, metrics, None, chat_template)

    def _card(self, adapter=None, name: str | None = None) -> ModelCard:
        # Nothing is generated: a request spans its input alone.
        limit = self.settings.max_prompt_tokens
        return ModelCard(id=name or self.model_name, root=self.settings.model, created=self.created, max_model_len=limit,
                         max_prompt_tokens=limit, max_completion_tokens=0)

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        """vLLM's ``/classify``: per input the label of the highest score, and the scores after the activation
        (``use_activation``, default true; false: the raw scores)."""
        activation = _asked_activation(request)
        rows, usage = await self._score(request)
        if activation is not False:
            rows = self.engine.pooler.activate(rows)
        data = [ClassifyData(index=i, label=self.engine.pooler.labels[int(row.argmax())], probs=row.tolist(),
                             num_classes=len(row)) for i, row in enumerate(rows)]
        return ClassifyResponse(model=self.model_name, data=data, usage=usage)

    async def pooling(self, request: PoolingRequest) -> PoolingResponse:
        """vLLM's ``/pooling``: per input the score head's output, raw unless ``use_activation`` is true (the
        default is false here: a reward model's reward is its raw score, as the trainer's loss reads it)."""
        activation = _asked_activation(request)
        if _pooling_task(request, "classify") is not None and activation is None:
            activation = True  # vLLM's classify task applies the activation unless told not to, as /classify
        if request.dimensions is not None:  # vLLM's classify task refuses it too
            raise APIError(400, f"dimensions: not supported by a classifier (its rows are its "
                           f"{self.engine.pooler.width} scores); it applies to an embedding server (--convert "
                           "embed)", "dimensions", "unsupported_parameter")
        rows, usage = await self._score(request)
        if activation:
            rows = self.engine.pooler.activate(rows)
        return _pooling_response(self.model_name, rows, usage, request)

    async def _score(self, request: InputFields) -> tuple[torch.Tensor, Usage]:
        """The rows ``[N, pooler.width]`` of the request's inputs (score rows, embeddings), and its usage."""
        self._check_model(request.model)
        priority = self.checked_priority(request)  # before tokenizing: a refused request costs nothing
        messages = getattr(request, "messages", None)  # /v1/embeddings refuses its own (EmbedServing.embeddings)
        if request.input is not None and messages is not None:
            raise APIError(400, "send input (texts or token ids) or messages (one conversation), not both", "messages")
        if request.input is None and messages is None:
            either = " or messages (one conversation)" if isinstance(request, ClassifyRequest) else ""
            raise APIError(400, f"the request needs input (texts or token ids){either}", "input", "missing")
        self._check_tokenization(request)
        if isinstance(request, ClassifyRequest):
            _check_chat_options(request)
        if messages is not None:
            check_content_parts(request)
            size = _chat_size(request)
        else:
            self._check_input_count(request.input)
            size = _size(request.input)
        return await self._rows(await self._tokenizing(size, self._input_ids, request), priority)

    def _check_tokenization(self, request: InputFields) -> None:
        """The request's tokenization fields this server cannot honour: 400 naming the field."""
        truncate = request.truncate_prompt_tokens
        if truncate is not None and truncate > self.settings.max_prompt_tokens:
            raise APIError(400, f"truncate_prompt_tokens must be <= {self.settings.max_prompt_tokens} (the most "
                           f"tokens this server reads in one input), or -1; got {truncate}", "truncate_prompt_tokens",
                           "invalid_value")
        if request.padding == "max_length":
            # A RetNet's recurrent state reads every token before the last: pad tokens would change the embedding
            # or score, and inputs are packed without padding (cu_seqlens).
            raise APIError(400, "padding: only \"do_not_pad\" (the default) is supported; inputs are scored as "
                           "sent, without pad tokens", "padding", "unsupported_parameter")

    async def _rows(self, inputs: list[list[int]], priority: int = 0) -> tuple[torch.Tensor, Usage]:
        """The rows ``[N, pooler.width]`` of ``inputs`` (checked token ids), run in one submission to the engine
        (so that they pack into the same forwards, ``priority`` ordering them among other requests' under
        ``--scheduling-policy priority``), and their usage."""
        try:
            rows = await self.engine.score(inputs, priority)
        except (QueueFull, EngineUnavailable) as exc:
            raise self.refused(exc) from exc
        self.metrics.model_requests.labels(model_name=self.model_name).inc()
        tokens = sum(len(ids) for ids in inputs)
        return torch.stack(rows), Usage(prompt_tokens=tokens, total_tokens=tokens)

    def _check_input_count(self, value) -> None:
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return  # one input
        if not value:
            raise APIError(400, "input must not be empty", "input", "empty_input")
        if len(value) > self.settings.max_pooling_inputs:
            raise APIError(400, f"at most {self.settings.max_pooling_inputs} inputs per request (--max-pooling-inputs); "
                           f"got {len(value)}", "input", "too_many_inputs")

    def _input_ids(self, request: InputFields) -> list[list[int]]:
        """Each input's token ids, checked (takes the tokenizer's lock)."""
        cut = self._cutter(request)
        if getattr(request, "messages", None) is not None:
            return [cut(self._conversation_ids(request), "messages")]
        value = request.input
        add_special = request.add_special_tokens is not False
        if isinstance(value, str):
            return [cut(self._encode(value, add_special), "input")]
        if isinstance(value[0], int):
            return [cut(list(value), "input")]
        return [cut(self._encode(item, add_special) if isinstance(item, str) else list(item), "input", index=index)
                for index, item in enumerate(value)]

    def _cutter(self, request: InputFields):
        """:meth:`_checked` with the request's truncation (``truncate_prompt_tokens``, ``truncation_side``)."""
        truncate = request.truncate_prompt_tokens
        if truncate == -1:  # vLLM's: cut to the model's length (max_model_len), here --max-prompt-tokens
            truncate = self.settings.max_prompt_tokens
        return functools.partial(self._checked, truncate=truncate, first=request.truncation_side == "right")

    def _checked(self, ids: list[int], param: str, truncate: int | None, index: int | None = None,
                 first: bool = False) -> list[int]:
        """``ids`` cut to their last ``truncate`` tokens (vLLM's truncate_prompt_tokens; ``first``: its
        truncation_side right, the first ones), refused when empty, over --max-prompt-tokens or outside the
        vocabulary; ``index``: the input's place in a list, for the message."""
        where = param if index is None else f"{param}[{index}]"
        if truncate is not None:
            ids = ids[:truncate] if first else ids[-truncate:]
        if not ids:
            raise APIError(400, f"{where} has no tokens to score (an empty text?)", param, "empty_input")
        if len(ids) > self.settings.max_prompt_tokens:
            raise APIError(400, f"{where} has {len(ids)} tokens; this server accepts at most "
                           f"{self.settings.max_prompt_tokens} (truncate_prompt_tokens cuts it: to the last ones, "
                           "or the first with truncation_side right)", param,
                           "context_length_exceeded")
        bad = next((t for t in ids if t >= self.engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{where}: token id {bad} is out of the vocabulary (size {self.engine.vocab_size})",
                           param, "invalid_token_id")
        return ids

    def _conversation_ids(self, request: ClassifyRequest) -> list[int]:
        """The tokens the reward trainer scores for ``messages`` (see the module's docstring): a conversation that
        ends with an assistant message after others is the pair (its history, that message); any other is rendered
        whole, no generation prompt. EOS follows, as in training. ``chat_template_kwargs`` reach the template."""
        messages = [template_message(m) for m in request.messages]
        if len(messages) > 1 and messages[-2]["role"] == messages[-1]["role"] == "assistant":
            # render_pair continues a prefilled assistant message with the next one's content as text
            messages[-2:] = [_in_form(message, "string") for message in messages[-2:]]
        # _check_chat_options refused their other values: the templating's own arguments are render_pair's.
        variables = {name: value for name, value in (request.chat_template_kwargs or {}).items()
                     if name not in ("add_generation_prompt", "continue_final_message")}
        # (the content in the form the template reads: --chat-template-content-format)
        render = functools.partial(self._render, template=self.chat_template, **variables)
        try:
            with self.tokenizer_lock:
                if len(messages) > 1 and messages[-1]["role"] == "assistant":
                    head, completion = render_pair(messages[:-1], [messages[-1:]], render)
                else:
                    head, completion = render(messages, add_generation_prompt=False), ""
                (ids,) = pair_token_ids(self.tokenizer, head, [completion], bool(request.add_special_tokens))
        except Exception as exc:  # a template that rejects these messages (roles out of order, ...)
            raise APIError(400, f"messages: the chat template cannot render the conversation: {exc}",
                           "messages") from exc
        return ids


class EmbedServing(ClassifyServing):
    """``/v1/embeddings`` and ``/pooling`` over a :class:`PoolingEngine` with an embedding pooler (``--convert
    embed``); its input checks and tokenization are :class:`ClassifyServing`'s, whose ``classify`` is not routed."""

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """OpenAI's ``/v1/embeddings``: one embedding per input (``--pooler-config``'s pooling; its normalization
        unless the request's ``use_activation`` says otherwise)."""
        if request.messages is not None:
            raise APIError(400, "messages: an embedding server embeds input (texts or token ids) only; vLLM's chat-form "
                           "embedding of a conversation is not served", "messages", "unsupported_parameter")
        rows, usage = await self._embedded(request)
        data = [EmbeddingData(index=i, embedding=v) for i, v in enumerate(_encoded(rows, request))]
        return EmbeddingResponse(model=self.model_name, data=data,
                                 usage=EmbeddingUsage(prompt_tokens=usage.prompt_tokens, total_tokens=usage.total_tokens))

    async def pooling(self, request: PoolingRequest) -> PoolingResponse:
        """vLLM's ``/pooling`` of an embedding model: per input its embedding, as ``/v1/embeddings`` gives it for
        the same fields."""
        if request.messages is not None:  # the reward trainer's templating has no meaning for an embedding
            raise APIError(400, "messages: an embedding server embeds input (texts or token ids) only", "messages",
                           "unsupported_parameter")
        _pooling_task(request, "embed")  # its defaults are this route's: --pooler-config's normalize
        given = next((name for name in ("softmax", "activation") if getattr(request, name) is not None), None)
        if given is not None:
            raise APIError(400, f"{given}: not supported by an embedding server (a classifier's name of "
                           "use_activation; an embedding's is use_activation, its L2 normalization)", given,
                           "unsupported_parameter")
        rows, usage = await self._embedded(request)
        return _pooling_response(self.model_name, rows, usage, request)

    async def _embedded(self, request: EmbeddingRequest | PoolingRequest) -> tuple[torch.Tensor, Usage]:
        """The embeddings ``[N, hidden_size]`` of the request's inputs, normalized as it asks (``use_activation``
        or ``normalize``; None: --pooler-config's ``normalize``), and its usage."""
        self._check_model(request.model)
        width = self.engine.pooler.width
        if request.dimensions is not None and request.dimensions != width:
            raise APIError(400, f"dimensions must be null or {width} (the model's hidden size): RetNet embeddings are "
                           f"not matryoshka-trained, so a shortened one would be no trained embedding; got "
                           f"{request.dimensions}", "dimensions", "invalid_value")
        normalize = _asked_activation(request, EMBED_ACTIVATION_FIELDS)
        rows, usage = await self._score(request)
        if (self.engine.pooler.normalize if normalize is None else normalize):
            rows = self.engine.pooler.activate(rows)
        return rows, usage


def pair_token_ids(tokenizer, head: str, completions: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The tokens the reward trainer scores for a prompt's rendering ``head`` and each of its ``completions``
    (:func:`~retnet.tokenization.render_pair`'s texts): the head encoded once (with the tokenizer's special tokens
    if asked), each completion on its own (a token across the prompt's end would differ from the trainer's), then
    EOS, unless the completion's tokens end with it (a template that closes each message with the EOS, the
    default's: not twice, as the trainer). Call it with the tokenizer's lock held."""
    head_ids = tokenizer.encode(head, add_special_tokens=add_special_tokens)
    return [closed_by_eos([*head_ids, *(tokenizer.encode(text, add_special_tokens=False) if text else [])],
                          tokenizer.eos_token_id) for text in completions]


def _pooling_response(model: str, rows: torch.Tensor, usage: Usage, request: PoolingRequest) -> PoolingResponse:
    return PoolingResponse(model=model, data=[PoolingData(index=i, data=v) for i, v in
                                              enumerate(_encoded(rows, request))], usage=usage)


def _encoded(rows: torch.Tensor, request: EncodingFields) -> list[list[float]] | list[str]:
    """Rows ``[N, width]`` fp32 as the request's ``encoding_format`` writes them: floats, or (``base64``, OpenAI's
    and vLLM's) each row's bytes in base64: its values cast to ``embed_dtype`` (default float32), in the byte order
    ``endianness`` names (default native: this server's, little-endian on x86 and ARM, as vLLM's)."""
    if request.encoding_format != "base64":
        return rows.tolist()
    dtype, bits = EMBED_DTYPES[request.embed_dtype]
    values = rows.to(dtype).view(bits).numpy()
    values = values.astype(values.dtype.newbyteorder(BYTE_ORDERS[request.endianness]))
    return [base64.b64encode(row.tobytes()).decode() for row in values]


def _asked_activation(request: InputFields, fields: tuple[str, ...] = ACTIVATION_FIELDS) -> bool | None:
    """The request's ``use_activation``, or the first given of vLLM's deprecated spellings of it in ``fields``
    (None: the route's default). Given together they must agree: a 400 names the one that does not."""
    given = [(name, value) for name in fields if (value := getattr(request, name, None)) is not None]
    for name, value in given[1:]:
        if value != given[0][1]:
            first, first_value = given[0]
            raise APIError(400, f"{name} ({json.dumps(value)}) contradicts {first} ({json.dumps(first_value)}): "
                           f"both set use_activation (vLLM's deprecated names of it: {', '.join(fields[1:])}); "
                           "send one", name, "invalid_value")
    return given[0][1] if given else None


def _pooling_task(request: PoolingRequest, served: str) -> str | None:
    """``/pooling``'s ``task`` (vLLM's): null or the one task this server serves (``served``); any other is 400
    naming ``task``, as vLLM answers a task its model does not support (token_embed and token_classify give one row
    a token, which no route here serves)."""
    if request.task is not None and request.task != served:
        raise APIError(400, f"task: this server serves the {served!r} task alone (one row an input); got "
                       f"{json.dumps(request.task)}", "task", "unsupported_parameter")
    return request.task


def _check_chat_options(request: ClassifyRequest) -> None:
    """vLLM's chat-form options: with ``messages`` only; ``chat_template_kwargs`` are the template's variables;
    ``add_generation_prompt``, ``continue_final_message`` (in ``chat_template_kwargs`` too, where vLLM reads them
    as well) and ``chat_template`` only at their defaults, as they would score other tokens than the reward
    trainer did (see the module's docstring) or run a client's Jinja on the server."""
    if request.messages is None:
        given = next((name for name in CHAT_OPTIONS if getattr(request, name) is not None), None)
        if given is not None:
            raise APIError(400, f"{given} applies to messages (one conversation) only; this request sends input",
                           given, "invalid_value")
        return
    if request.chat_template is not None:
        raise APIError(400, "chat_template: a template sent with the request is not supported (the server uses "
                       "the model's, or the one it was started with: --chat-template)", "chat_template",
                       "unsupported_parameter")
    variables = request.chat_template_kwargs or {}
    reserved = sorted(TEMPLATE_CALL_ARGUMENTS & set(variables))
    if reserved:
        raise APIError(400, f"chat_template_kwargs: {reserved[0]!r} is not a template variable but an argument of "
                       "the templating", "chat_template_kwargs", "invalid_value")
    for name in ("add_generation_prompt", "continue_final_message"):
        value = variables.get(name, getattr(request, name))
        if value:  # as a template reads it
            where = name if name not in variables else f"chat_template_kwargs.{name}"
            raise APIError(400, f"{where}: not supported (only false or null is accepted; got {json.dumps(value)}): "
                           "a conversation is scored as the reward trainer scored it, up to its last message and "
                           "EOS", where, "unsupported_parameter")


__all__ = ["EMBEDDING_ROUTES", "POOLING_ROUTES", "ClassifyRequest", "ClassifyResponse", "ClassifyServing",
           "EmbedServing", "EmbeddingRequest", "EmbeddingResponse", "EncodingFields", "PoolingRequest",
           "PoolingResponse", "pair_token_ids"]
