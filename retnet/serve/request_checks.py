"""What a generation request may ask of this server: its fields checked against the server's limits and the
model's vocabulary, and the :class:`~retnet.serve.sampling.SamplingParams` they ask for.

:class:`RequestChecks` holds what the checks depend on (the settings, the engine's vocabulary and EOS ids, the
sampling defaults of the model's generation config); the chat-only checks are module functions. Every refusal
is an :class:`~retnet.serve.protocol.APIError` (400) naming the field.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from retnet.serve.engine import Engine
from retnet.serve.protocol import (
    UNSUPPORTED_EXTRAS,
    APIError,
    ChatCompletionRequest,
    SamplingFields,
    TokenizeChatRequest,
    not_run_unless_no_op,
)
from retnet.serve.sampling import SamplingParams
from retnet.serve.settings import ServeSettings, resolve_max_tokens

_TOKEN_ID_KEY = re.compile(r"-?[0-9]+")  # a logit_bias key
_MAX_KEY_DIGITS = 20  # a longer one names no token of any vocabulary


def _token_id(key: str) -> int | None:
    """A logit_bias key's token id (a ``_TOKEN_ID_KEY``), None for one of more than ``_MAX_KEY_DIGITS`` digits past
    its leading zeros: int() refuses over 4300 digits, leading zeros included (a ValueError: was a 500)."""
    digits = key.lstrip("-").lstrip("0") or "0"
    if len(digits) > _MAX_KEY_DIGITS:
        return None
    return -int(digits) if key.startswith("-") else int(digits)
# Each bad word is tokenised (twice) for every request: bounded like the stop strings, with more room.
MAX_BAD_WORDS = 64
# apply_chat_template's own arguments: chat_template_kwargs holds the template's variables, not these (it may
# set add_generation_prompt and continue_final_message, as vLLM lets it: they win over the request's fields), and
# render_jinja_template's "conversations", which every rendering passes itself (the training data's rule, chat.py's)
TEMPLATE_CALL_ARGUMENTS = frozenset({
    "conversation", "conversations", "messages", "tools", "documents", "chat_template", "tokenize", "sanitize_control_tokens",
    "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs",
})


class RequestChecks:
    """A request's fields checked against the server's limits, and the SamplingParams they ask for."""

    def __init__(self, settings: ServeSettings, engine: Engine, tokenizer, tokenizer_lock: threading.Lock,
                 defaults: dict[str, Any] | None = None):
        """``defaults``: the sampling fields a request that leaves them out gets (settings.generation_defaults:
        the model's generation config), ``max_tokens`` among them; none given: the server's own.
        ``tokenizer_lock``: the one every use of ``tokenizer`` takes (the bad words are tokenized here)."""
        self.settings, self.engine, self.tokenizer, self.tokenizer_lock = settings, engine, tokenizer, tokenizer_lock
        defaults = dict(defaults or {})
        self.default_max_tokens = resolve_max_tokens(settings, defaults)
        defaults.pop("max_tokens", None)
        self.sampling_defaults = defaults

    def common(self, request: SamplingFields) -> None:
        """The fields every generation request has, within the server's limits (its ``model`` is the caller's
        to check)."""
        s = self.settings
        n_limit = min(s.max_n, s.max_running)
        if request.n > n_limit:
            raise APIError(400, f"n must be <= {n_limit}; got {request.n}", "n")
        stops = request.stop_list()
        if len(stops) > s.max_stop:
            raise APIError(400, f"at most {s.max_stop} stop sequences; got {len(stops)}", "stop")
        for stop in stops:
            if not stop or len(stop) > s.max_stop_chars:
                raise APIError(400, f"each stop sequence must have 1 to {s.max_stop_chars} characters; "
                               f"got {len(stop)}", "stop")
        _check_unsupported_extras(request)
        if request.prompt_logprobs is not None and request.stream:
            # vLLM refuses it too (it has no chunk of a stream to carry them). 0 as well, which vLLM takes and drops:
            # it still asks for each prompt token's own logprob, which the client would silently not get.
            raise APIError(400, f"prompt_logprobs: not available with stream: true (no chunk carries the prompt's "
                           f"logprobs; 0 asks for each prompt token's own); got {request.prompt_logprobs}",
                           "prompt_logprobs", "unsupported_parameter")
        if request.truncate_prompt_tokens == -1:
            request.truncate_prompt_tokens = s.max_prompt_tokens  # vLLM's -1: as many as the server runs
        if request.truncate_prompt_tokens is not None and request.truncate_prompt_tokens > s.max_prompt_tokens:
            raise APIError(400, f"truncate_prompt_tokens must be <= {s.max_prompt_tokens} (the most prompt tokens "
                           f"this server runs); got {request.truncate_prompt_tokens}", "truncate_prompt_tokens")
        if request.stream_options is not None and not request.stream:
            # OpenAI's rule: the options only shape a stream, and a client sending them meant one.
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        if request.session_id is not None:
            if s.max_sessions == 0:
                raise APIError(400, "sessions are turned off on this server (--max-sessions 0)", "session_id")
            if request.n != 1:
                raise APIError(400, "session_id needs n = 1 (one continuation to save)", "session_id")

    def prompt_count(self, count: int) -> None:
        if count > self.settings.max_prompts:
            raise APIError(400, f"at most {self.settings.max_prompts} prompts per request; got {count}", "prompt")

    def prompt_ids(self, ids: list[int], param: str = "prompt", truncate: int | None = None) -> list[int]:
        """``param``: what the prompt came from, for the errors (a chat's is ``messages``). ``truncate``: keep
        the last that many tokens, before the length is checked (vLLM's truncate_prompt_tokens)."""
        if truncate is not None:
            ids = ids[-truncate:]
        if not ids:
            raise APIError(400, "prompt must not be empty", param, "empty_prompt")
        if len(ids) > self.settings.max_prompt_tokens:
            what = "the prompt has" if param == "prompt" else "the templated messages have"
            raise APIError(400, f"{what} {len(ids)} tokens; this server accepts at most "
                           f"{self.settings.max_prompt_tokens}", param, "context_length_exceeded")
        # The tokenizer's ids, as vLLM checks a prompt: a padded vocabulary's extra rows are no token.
        bound = self.engine.token_bound
        bad = [i for i in ids if i >= bound]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is out of the vocabulary (size {bound})",
                           param, "invalid_token_id")
        return ids

    def params(self, request: SamplingFields, max_tokens: int | None, logprobs: int | None,
               name: str = "max_tokens", bad_words: list[list[int]] | None = None) -> SamplingParams:
        """``name``: the field ``max_tokens`` came from, for the error; ``bad_words``: their token ids."""
        max_tokens = self.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > self.settings.max_tokens_limit:
            raise APIError(400, f"{name} must be <= {self.settings.max_tokens_limit} (--max-tokens-limit); "
                           f"got {max_tokens}", name)
        if request.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens must be <= {name} ({max_tokens}); got {request.min_tokens}",
                           "min_tokens")
        stop_ids, allowed = self._token_ids(request, "stop_token_ids"), self._allowed_token_ids(request)
        self._check_something_left(request, stop_ids, allowed, bad_words or [])
        sampling = self.sampling_fields(request)
        return SamplingParams(
            max_tokens=max_tokens, **sampling,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            stop=request.stop_list(), logit_bias=self._logit_bias(request), ignore_eos=request.ignore_eos,
            min_tokens=request.min_tokens, stop_token_ids=stop_ids, seed=request.seed, logprobs=logprobs,
            include_stop_str_in_output=request.include_stop_str_in_output, allowed_token_ids=allowed,
            bad_words_ids=bad_words or [], prompt_logprobs=request.prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
        )

    def sampling_fields(self, request: SamplingFields) -> dict[str, Any]:
        """``temperature``, ``top_p``, ``top_k``, ``min_p`` and ``repetition_penalty`` as the request sent them, or
        (left out or null) the model's generation-config defaults, else the API's."""
        sent = request.model_fields_set
        return {name: getattr(request, name) if name in sent else self.sampling_defaults.get(name, getattr(request, name))
                for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}

    def _token_ids(self, request: SamplingFields, name: str, vocab: int | None = None) -> frozenset[int]:
        """``vocab``: the ids accepted are below it (None: the model's vocabulary)."""
        ids = frozenset(getattr(request, name) or ())
        vocab = self.engine.vocab_size if vocab is None else vocab
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise APIError(400, f"{name}: token id {min(bad)} is out of the vocabulary (size {vocab})", name,
                           "invalid_token_id")
        return ids

    def _allowed_token_ids(self, request: SamplingFields) -> frozenset[int] | None:
        if request.allowed_token_ids is None:
            return None
        if not request.allowed_token_ids:
            # vLLM refuses it too: no token could ever be sampled.
            raise APIError(400, "allowed_token_ids must not be empty (null: every token)", "allowed_token_ids")
        # Only ids the tokenizer has can ever be sampled (a padded vocabulary's extra rows are masked).
        return self._token_ids(request, "allowed_token_ids", self.engine.token_bound)

    def _check_something_left(self, request: SamplingFields, stop_ids: frozenset[int], allowed: frozenset[int] | None,
                              bad_words: list[list[int]]) -> None:
        """Every step must leave some token to sample: a row with every logit -inf has no distribution (the
        multi-token bad words, known only as the output grows, yield to the others instead; see sample_step)."""
        vocab = self.engine.token_bound  # the ids that may be sampled
        single = {ids[0] for ids in bad_words if len(ids) == 1}

        def left(excluded: set[int]) -> int:
            return len(allowed - excluded) if allowed is not None else vocab - len({t for t in excluded if t < vocab})

        if not left(single):
            raise APIError(400, "bad_words: they ban every token of allowed_token_ids", "bad_words")
        # min_tokens masks the stop token ids and EOS as well, for its first tokens.
        if request.min_tokens and not left(single | stop_ids | {t for t in self.engine.eos_ids if t < vocab}):
            name = "allowed_token_ids" if allowed is not None else "bad_words" if single else "stop_token_ids"
            raise APIError(400, f"{name}: with min_tokens, the stop token ids and EOS are masked too, and nothing "
                           "would be left to generate (they cover every token that may be sampled)", name)

    def _logit_bias(self, request: SamplingFields) -> dict[int, float] | None:
        """``logit_bias`` with integer keys, checked: token ids in the vocabulary, biases in [-100, 100]."""
        if not request.logit_bias:
            return None
        bias = {}
        for key, value in request.logit_bias.items():
            # Not int(key) alone: it reads "1_0" as 10 and other scripts' digits ("٣" is 3), biasing a token
            # the client never named.
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise APIError(400, f"logit_bias: the keys must be token ids; got {key!r}", "logit_bias")
            token = _token_id(key)
            if token is None:
                raise APIError(400, f"logit_bias: token id {key[:_MAX_KEY_DIGITS]}... is out of the vocabulary (size "
                               f"{self.engine.vocab_size})", "logit_bias", "invalid_token_id")
            # "5" and "05" both name token 5: one would silently override the other's bias.
            if token in bias:
                named = next(k for k in request.logit_bias if k != key and _token_id(k) == token)
                raise APIError(400, f"logit_bias: keys {named!r} and {key!r} both name token {token}", "logit_bias")
            if not 0 <= token < self.engine.vocab_size:
                raise APIError(400, f"logit_bias: token id {token} is out of the vocabulary (size "
                               f"{self.engine.vocab_size})", "logit_bias", "invalid_token_id")
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias: each bias must be in [-100, 100]; got {value} for token {token}",
                               "logit_bias")
            bias[token] = float(value)
        return bias

    def bad_words(self, request: SamplingFields) -> list[str]:
        """The request's bad words, checked (their number and lengths; :meth:`bad_word_ids` tokenizes them)."""
        words = request.bad_words or []
        if len(words) > MAX_BAD_WORDS:
            raise APIError(400, f"at most {MAX_BAD_WORDS} bad_words; got {len(words)}", "bad_words")
        for word in words:
            if not word.strip() or len(word) > self.settings.max_stop_chars:
                raise APIError(400, f"each of bad_words must have 1 to {self.settings.max_stop_chars} characters, "
                               f"not all whitespace; got {word!r}", "bad_words")
        return words

    def bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token ids as vLLM spells them: the word without its leading spaces, and with one
        space before it when the tokenizer spells that differently (a word-initial token) in as many tokens.
        Takes the tokenizer's lock."""
        out: list[list[int]] = []
        with self.tokenizer_lock:
            for word in words:
                plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
                spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
                out.append(plain)
                if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
                    out.append(spaced)
        bad = [t for ids in out for t in ids if t >= self.engine.vocab_size]
        if bad:
            raise APIError(400, f"bad_words: they tokenize to token id {bad[0]}, out of the vocabulary (size "
                           f"{self.engine.vocab_size})", "bad_words", "invalid_token_id")
        return [ids for ids in out if ids]


def check_content_parts(request: ChatCompletionRequest | TokenizeChatRequest) -> None:
    """Only text parts are supported (no images, audio or files), and an assistant message's refusal parts (OpenAI's,
    read as text as vLLM reads them): refuse any other by its place. And OpenAI's required fields of a message: a
    tool message's ``tool_call_id``, and content ("" and [] are content) but in an assistant message."""
    for i, message in enumerate(request.messages):
        # OpenAI refuses both (vLLM passes them on): a tool result the template cannot pair with its call, and a
        # message of no content at all, more often a client's lost text (a tool that returned None) than a turn
        # meant empty, which "" says.
        if message.role == "tool" and message.tool_call_id is None:
            raise APIError(400, f"messages[{i}].tool_call_id: a tool message needs the id of the call it answers "
                           "(its tool_call_id)", f"messages[{i}].tool_call_id", "missing")
        if message.content is None and message.role != "assistant":
            raise APIError(400, f"messages[{i}].content: a {message.role} message needs content, a string or a list "
                           "of text parts (\"\" for none); got null", f"messages[{i}].content", "missing")
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            field = "refusal" if part.type == "refusal" and message.role == "assistant" else "text"
            if part.type != field:
                raise APIError(400, f"{where}.type: only text content parts are supported (type 'text'; 'refusal' in "
                               f"an assistant message); got type {part.type!r}", f"{where}.type",
                               "unsupported_content_type")
            if getattr(part, field) is None:
                raise APIError(400, f"{where}.{field}: a {field} content part needs a string '{field}'",
                               f"{where}.{field}", "missing")


def _check_unsupported_extras(request: SamplingFields) -> None:
    """vLLM's output-changing extras this server does not run (``UNSUPPORTED_EXTRAS``) are refused by name
    unless set to their no-op value: ignoring them would return output the client did not ask for."""
    for name, no_op in UNSUPPORTED_EXTRAS.items():
        refusal = not_run_unless_no_op(getattr(request, name), no_op)
        if refusal is not None:
            raise APIError(400, f"{name}: not supported {refusal}", name, "unsupported_parameter")


def check_chat_features(request: ChatCompletionRequest | TokenizeChatRequest) -> None:
    """The legacy ``functions`` are not supported: their no-op values pass, the others are refused by name
    (ignoring them would return plain text where the client expects a call; tools are :func:`~retnet.serve.tools.tool_calling`'s).
    Neither is a template sent with the request, nor template variables that are apply_chat_template's own
    arguments."""
    if request.chat_template is not None:
        raise APIError(400, "chat_template: a template sent with the request is not supported (the server uses "
                       "the model's, or the one it was started with: --chat-template)", "chat_template", "unsupported_parameter")
    reserved = sorted(TEMPLATE_CALL_ARGUMENTS & set(request.chat_template_kwargs or ()))
    if reserved:
        raise APIError(400, f"chat_template_kwargs: {reserved[0]!r} is not a template variable but an argument of "
                       "the templating (send documents, add_generation_prompt ... as the request's own fields)",
                       "chat_template_kwargs")
    if request.function_call is not None and request.function_call not in ("none", "auto"):
        raise APIError(400, "function_call: the legacy functions are not supported; only 'none' (or 'auto' without "
                       "functions) is accepted (send tools with tool_choice instead)", "function_call",
                       "unsupported_parameter")
    if request.functions and request.function_call != "none":
        raise APIError(400, "functions: the legacy functions are not supported (send tools with tool_choice "
                       "'required' or a named function instead, or function_call: 'none' to have the functions "
                       "ignored)", "functions", "unsupported_parameter")


def check_tool_choice_has_tools(request: ChatCompletionRequest | TokenizeChatRequest) -> None:
    """OpenAI's rule, and vLLM's: a ``tool_choice`` other than "none" needs tools. Chat's routes only: the choices
    that call one ("required", a named function) are tools.tool_calling's to refuse on every route, and the Responses
    and Messages APIs keep their own readings of an "auto" without tools."""
    if request.tool_choice is not None and request.tool_choice != "none" and not request.tools:
        raise APIError(400, f"tool_choice is only allowed when tools are specified; got "
                       f"{json.dumps(request.tool_choice)[:80]} and no tools (send tools, or tool_choice 'none')",
                       "tool_choice")
