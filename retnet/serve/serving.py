"""The handlers behind the routes: validate against the server's limits, tokenise, submit to the engine,
and shape its outputs as OpenAI completions (whole, or SSE chunks ending ``data: [DONE]``).

Here: the models served (and LoRA adapters loaded at runtime), prompts built and tokenized (chat templates,
sessions), requests submitted, and responses and chunks shaped. The field checks and the SamplingParams they
make are :mod:`retnet.serve.request_checks`'s; collecting and streaming the engine's outputs (SSE, cancellation
on disconnect) :mod:`retnet.serve.streaming`'s; the logprob fields and text offsets :mod:`retnet.serve.logprobs`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from retnet.model.hub import ADAPTER_FILES, HubError, resolve_pretrained
from retnet.serve.beam_search import BeamSearch, beam_step_params, best_of_choices, check_beam_search
from retnet.serve.detokenize import IncrementalDetokenizer
from retnet.serve.engine import Engine
from retnet.serve.logprobs import TextOffsets, add_completion_logprobs, chat_logprob, vllm_prompt_logprobs
from retnet.serve.lora import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, LoraError, LoraModule, load_adapter
from retnet.serve.metrics import ServeMetrics
from retnet.serve.protocol import (
    REQUEST_ID_MAX_CHARS,
    STRUCTURED_OUTPUT_FIELDS,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    RequestFields,
    SamplingFields,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    UnloadLoraAdapterRequest,
    Usage,
    dump,
    random_id,
)
from retnet.serve.request_checks import (
    RequestChecks,
    check_chat_features,
    check_content_parts,
    check_tool_choice_has_tools,
)
from retnet.serve.sampling import SamplingParams
from retnet.serve.sequence import EngineUnavailable, QueueFull, RequestHandle, SeqOutput
from retnet.serve.settings import ServeSettings
from retnet.serve.state_cache import Session, SessionBusy
from retnet.serve.streaming import collect_outputs, sse, sse_response, stream_outputs
from retnet.serve.structured import Grammar, GrammarCompiler, requested_grammar
from retnet.serve.tools import ToolCalling, developer_role, template_message, tool_calling
from retnet.tokenization import DEFAULT_CHAT_TEMPLATE, vocab_bound


class OpenAIServing:
    """Completions and chat completions over one :class:`Engine`, and vLLM's (de)tokenization as they run it."""

    def __init__(self, settings: ServeSettings, engine: Engine, tokenizer, metrics: ServeMetrics,
                 defaults: dict[str, Any] | None = None, chat_template: str | None = None):
        """``defaults``: the sampling fields a request that leaves them out gets (settings.generation_defaults:
        the model's generation config), ``max_tokens`` among them; none given: the server's own.
        ``chat_template``: ``--chat-template``'s, used instead of the tokenizer's."""
        self.settings, self.engine, self.tokenizer, self.metrics = settings, engine, tokenizer, metrics
        # The ids /detokenize takes: the tokenizer's (a padded vocabulary's extra rows are no token, as in a
        # prompt), known once (get_vocab builds the whole vocabulary), on the pooling engine too.
        self.token_bound = min(vocab_bound(tokenizer), engine.vocab_size)
        # Without --chat-template: the tokenizer's own (None: transformers picks it), else the built-in default.
        self.chat_template = chat_template if chat_template is not None else \
            None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
        self.model_name = settings.model_name
        self.created = int(time.time())  # the model card's `created`: when the server started, not per request
        # HF fast tokenisers may not be entered from two threads at once (the scheduler decodes).
        self.tokenizer_lock = threading.Lock()
        self.checks = RequestChecks(settings, engine, tokenizer, self.tokenizer_lock, defaults)
        self.bos_per_turn: dict[str, bool] = {}  # see _bos_per_turn
        self.developer_as: dict[str, str] = {}  # see _developer_role
        self.assistant_closers: dict[str, str | None] = {}  # see _closing
        self.content_formats: dict[str, str] = {}  # see _content_format
        # Tokenizations running on worker threads (counted on the event loop): while one may hold the lock, the
        # loop must not wait for it.
        self.tokenizing_off_loop = 0
        self.grammars = GrammarCompiler(tokenizer, engine.vocab_size, engine.eos_ids, self.tokenizer_lock)
        # /v1/load_lora_adapter's per-name locks (vLLM's): two loads of one name run one after the other, so a
        # second load_inplace replaces the first instead of being refused as a name "already loaded".
        # Weak: a name's lock lives while a load holds or awaits it (names come and go).
        self.lora_load_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def models(self) -> ModelList:
        """The base model's card under each served name (vLLM lists every --served-model-name), then each LoRA
        adapter's (vLLM's: ``parent`` its base, ``root`` its path)."""
        aliases = (self.settings.served_model_name or [])[1:]
        return ModelList(data=[self._card(), *(self._card(name=alias) for alias in aliases),
                               *(self._card(a) for a in self.engine.adapters.values())])

    def model(self, model_id: str) -> ModelCard:
        name = self._check_model(model_id)
        alias = model_id if model_id in (self.settings.served_model_name or [])[1:] else None
        return self._card(self.engine.adapters.get(name), name=alias)

    def _is_base(self, model: str | None) -> bool:
        # "" too: unconfigured clients send it, and vLLM serves it as the base model (_is_model_supported).
        return not model or model in (self.model_name, *self.settings.model_paths)

    def _check_model(self, model: str | None) -> str:
        """A request's ``model``: the served name or the model's path (None: the one served), or a LoRA adapter's
        name. Returns the name responses carry."""
        if self._is_base(model):
            return self.model_name
        if model in self.engine.adapters:
            return model
        # Every name a request may give (vLLM's says none): the served one, its aliases, the adapters, a few of
        # each where there are many (a server may hold hundreds of adapters; GET /v1/models lists them all).
        what = repr(self.model_name)
        aliases = (self.settings.served_model_name or [])[1:]
        if aliases:
            what += f" (also named {_some(aliases)})"
        adapters = list(self.engine.adapters)
        if adapters:
            what += f" and the LoRA adapter{'s' if len(adapters) > 1 else ''} {_some(adapters)}"
        raise APIError(404, f"the model {model!r} does not exist; this server serves {what}", "model",
                       "model_not_found")

    def served_name(self, model: str | None) -> str:
        """The name a response to a request for ``model`` carries (vLLM's: the adapter's, for a LoRA adapter); a
        model not served is 404."""
        return self._check_model(model)

    def _response_name(self, model: str | None) -> str:
        """The name the response to a request accepted for ``model`` carries, even if its adapter was unloaded
        since (a request accepted finishes under it)."""
        return self.model_name if self._is_base(model) else model

    def _adapter(self, model: str | None) -> int:
        """The engine's LoRA slot for a request's ``model`` now (0: the base model); an adapter unloaded since the
        request was checked is 404 as any unknown model."""
        return 0 if self._is_base(model) else self.engine.adapters[self._check_model(model)].slot

    def _card(self, adapter: LoraAdapter | None = None, name: str | None = None) -> ModelCard:
        """An adapter's card, else the base model's (under ``name``, one of its served names; default the first)."""
        prompt, completion = self.settings.max_prompt_tokens, self.settings.max_tokens_limit
        limits = dict(created=self.created, max_model_len=prompt + completion, max_prompt_tokens=prompt,
                      max_completion_tokens=completion)
        if adapter is None:
            return ModelCard(id=name or self.model_name, root=self.settings.model, **limits)
        return ModelCard(id=adapter.name, root=adapter.path, parent=adapter.base_model_name or self.model_name,
                         **limits)

    # -- /v1/load_lora_adapter, /v1/unload_lora_adapter (vLLM's, with --allow-runtime-lora-updating) --------------
    async def load_lora_adapter(self, request: LoadLoraAdapterRequest) -> str:
        """Serve the adapter at ``lora_path`` as ``lora_name`` from the next scheduler iteration on; returns
        vLLM's success text. Nothing changes when it fails: 400 for a name taken or an adapter refused
        (:class:`LoraError`'s message), 404 for a path without an adapter, 503 when the engine is not serving."""
        name, path = request.lora_name, request.lora_path
        if not name or not path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                           "lora_name" if not name else "lora_path", "invalid_lora_adapter")
        if self._is_base(name):
            raise APIError(400, f"The lora adapter name {name!r} is the base model's name; an adapter needs a name "
                           "of its own", "lora_name", "invalid_lora_adapter")
        async with self.lora_load_locks.setdefault(name, asyncio.Lock()):
            return await self._load_lora_adapter(request)

    async def _load_lora_adapter(self, request: LoadLoraAdapterRequest) -> str:
        name, path = request.lora_name, request.lora_path
        if name in self.engine.loading or (name in self.engine.adapters and not request.load_inplace):
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name",
                           "lora_adapter_exists")
        try:  # a hub id: its snapshot, downloaded off the event loop (or found in the HF cache)
            directory = await asyncio.to_thread(resolve_pretrained, path, allow_patterns=ADAPTER_FILES)
        except HubError as exc:
            raise APIError(404, f"The lora adapter path {exc}", "lora_path", "lora_adapter_not_found") from None
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            what = "is not a directory" if not directory.is_dir() else f"lacks {CONFIG_FILE} or {WEIGHTS_FILE}"
            raise APIError(404, f"The lora adapter path {path!r} {what} (expected peft's save_pretrained directory, "
                           "on the server)", "lora_path", "lora_adapter_not_found")
        if self.settings.session_dir is not None and self.settings.max_sessions > 0:
            # As a startup adapter's (session_files): a session named adapter_model would be written over its weights,
            # or DELETEd as them
            sessions = Path(self.settings.session_dir).resolve()
            if sessions == directory.resolve() or directory.resolve() in sessions.parents:
                raise APIError(400, f"The lora adapter path {path!r} holds --session-dir: a session named adapter_model "
                               "would be written over its weights", "lora_path", "invalid_lora_adapter")
        module = LoraModule(name, str(directory))  # the snapshot found above: the hub is not asked twice
        try:
            # Reading the weights may take a while: off the event loop, which serves the other requests meanwhile.
            adapter = await asyncio.to_thread(load_adapter, module, self.engine.linears, self.settings.max_lora_rank)
        except LoraError as exc:
            raise APIError(400, str(exc), "lora_path", "invalid_lora_adapter") from None
        adapter.path = path  # its card's root: the path or hub id as the client gave it
        try:
            await self.engine.add_adapter(adapter)
        except EngineUnavailable as exc:
            raise APIError(503, f"the server cannot load adapters now: {exc}", None, "unavailable",
                           type="server_error", headers={"Retry-After": str(self.settings.retry_after_s)}) from exc
        except Exception as exc:  # the install itself failed (out of device memory): logged by the engine
            raise APIError(500, f"The lora adapter '{name}' could not be installed: {type(exc).__name__}: {exc}",
                           None, "lora_install_failed", type="server_error") from exc
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_lora_adapter(self, request: UnloadLoraAdapterRequest) -> str:
        """Stop serving ``lora_name``: later requests naming it are 404; those already accepted finish under it
        (Engine.remove_adapter). Returns vLLM's success text; 404 for a name not served."""
        if self.engine.remove_adapter(request.lora_name) is None:
            raise APIError(404, f"The lora adapter '{request.lora_name}' cannot be found.", "lora_name",
                           "lora_adapter_not_found")
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."

    # -- /v1/completions ---------------------------------------------------------------------------------------
    async def completions(self, request: CompletionRequest, raw: Request):
        self._check_common(request)
        rid = response_id("cmpl", request, raw)  # (refused before the request is submitted)
        if request.suffix:
            raise APIError(400, "suffix is not supported", "suffix", "unsupported_parameter")
        if request.prompt_embeds is not None:
            raise APIError(400, "prompt_embeds: prompts as embeddings are not supported (send prompt: text or token "
                           "ids)", "prompt_embeds", "unsupported_parameter")
        check_beam_search(request)
        best_of = self._best_of(request)
        if request.logprobs is not None and request.logprobs > self.settings.max_logprobs:
            raise APIError(400, f"logprobs must be <= {self.settings.max_logprobs}; got {request.logprobs}", "logprobs")
        self._check_prompt_logprobs(request)
        if request.max_tokens == 0 and not request.echo:
            # OpenAI and vLLM take 0 only to echo (and score) the prompt: without echo there is nothing to return.
            raise APIError(400, "max_tokens must be at least 1; 0 is accepted only with echo (to return, and "
                           "score with logprobs, the prompt alone)", "max_tokens")
        session = await self._acquire_session(request)
        try:
            prompts = await self._tokenizing(_size(request.prompt), self._completion_prompts, request.prompt,
                                             request.truncate_prompt_tokens,
                                             _add_special_tokens(request, _continues(session)), request.max_tokens != 0)
            params = self.checks.params(request, request.max_tokens, request.logprobs,
                                        bad_words=await self._bad_words(request))
            params.grammar = await self._grammar(request)
            params.cache_salt = request.cache_salt
            _score_candidates(params, request.n, best_of)
            # Scored once for both asks: the echo's logprobs and vLLM's prompt_logprobs, each keeping its top-k.
            asked = [k for k in (request.logprobs if request.echo else None, request.prompt_logprobs) if k is not None]
            params.prompt_logprobs = max(asked, default=None)
            text_starts = [0 if p.decoded else None for p in prompts]
            if request.use_beam_search:
                handle = self._beam_search([p.ids for p in prompts], params, request, text_starts=text_starts)
            else:
                handle = self._submit([p.ids for p in prompts], params, request, session=session,
                                      text_starts=text_starts, n=best_of)
        except BaseException:
            self._release_session(request, session)
            raise
        # Each choice's prompt: its text is echoed before the completion, and where its text_offset starts either
        # way (OpenAI's offsets index prompt + completion, echoed or not).
        choice_prompts = [prompts[i // request.n] for i in range(len(prompts) * request.n)]
        if request.stream:
            return sse_response(self._completion_chunks(request, handle, choice_prompts, rid), handle)
        billed = await collect_outputs(handle, raw)
        outputs = best_of_choices(billed, request.n, best_of)
        return await json_built(_answer_size(outputs, request.logprobs, request.prompt_logprobs),
                                self._completion_response, request, handle, choice_prompts, outputs, billed, rid)

    def _best_of(self, request: SamplingFields) -> int:
        """The candidates each prompt of the request generates: ``best_of`` (OpenAI's; vLLM's for chat too), at
        least ``n``."""
        if request.best_of is None:
            return request.n
        best_of = request.best_of
        if best_of < request.n:
            raise APIError(400, f"best_of must be >= n ({request.n}); got {best_of}", "best_of")
        n_limit = min(self.settings.max_n, self.settings.max_running)
        if best_of > n_limit:
            raise APIError(400, f"best_of must be <= {n_limit}; got {best_of}", "best_of")
        if best_of > request.n and request.stream:
            # OpenAI's rule: the candidates are ranked once they are whole, so nothing can be sent before.
            raise APIError(400, "best_of: results cannot be streamed when best_of > n", "best_of",
                           "unsupported_parameter")
        if best_of > 1 and request.session_id is not None:
            raise APIError(400, "session_id needs best_of = 1 (one continuation to save)", "best_of")
        return best_of

    def _completion_response(self, request: CompletionRequest, handle: RequestHandle,
                             choice_prompts: list[CompletionPrompt], outputs: list[list[SeqOutput]],
                             billed: list[list[SeqOutput]], rid: str | None = None) -> dict:
        """The whole completion of ``outputs`` (its JSON), each choice's prompt ``choice_prompts[i]``; the usage
        counts the tokens of ``billed`` (best_of's candidates, all generated; else ``outputs`` themselves). ``rid``: its
        id (:func:`response_id`), by default a new one."""
        choices = []
        for index, seq in enumerate(outputs):
            prompt = choice_prompts[index]
            text = "".join(o.text for o in seq)
            logprobs = None
            if request.logprobs is not None:
                logprobs = CompletionLogprobs()
                if request.echo:
                    add_completion_logprobs(logprobs, seq[0].prompt_logprobs or [], self._offsets(0, prompt.text),
                                            request.logprobs, self._as_ids(request))
                offsets = self._offsets(len(prompt.text), held=prompt.held, shown=not request.skip_special_tokens)
                for o in seq:
                    add_completion_logprobs(logprobs, o.logprobs or [], offsets, as_ids=self._as_ids(request))
            if request.echo:
                text = prompt.text + text
            choices.append(CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=seq[-1].finish_reason,
                stop_reason=seq[-1].stop_reason,
                prompt_logprobs=vllm_prompt_logprobs(seq[0].prompt_logprobs, request.prompt_logprobs),
                **self._ids(request, prompt.ids, seq),
            ))
        response = CompletionResponse(id=rid or random_id("cmpl"), model=self._response_name(request.model),
                                      choices=choices,
                                      usage=self._usage(handle, billed),
                                      session_id=request.session_id)
        return dump(response)

    def _completion_prompts(self, prompt, truncate: int | None = None, add_special_tokens: bool = True,
                            followed: bool = True) -> list[CompletionPrompt]:
        """Each prompt's token ids and text; ``truncate``: keep each one's last that many tokens (the text is
        then theirs, decoded, as vLLM echoes a truncated prompt); ``add_special_tokens``: a text's encoding
        has the tokenizer's (a BOS) around it; ``followed``: a completion follows the prompt (max_tokens > 0)."""
        if isinstance(prompt, str):
            texts = [prompt]
        elif prompt and all(isinstance(p, str) for p in prompt):
            texts = list(prompt)
        elif prompt and all(isinstance(p, int) for p in prompt):
            return [self._decoded_prompt(self.checks.prompt_ids(list(prompt), truncate=truncate), followed)]
        elif prompt and all(isinstance(p, list) for p in prompt):
            self.checks.prompt_count(len(prompt))
            return [self._decoded_prompt(self.checks.prompt_ids(list(p), truncate=truncate), followed) for p in prompt]
        else:
            raise APIError(400, "prompt must not be empty", "prompt", "empty_prompt")
        self.checks.prompt_count(len(texts))
        prompts = []
        for text in texts:
            # An empty text is refused by prompt_ids when it has no tokens: with a tokenizer that adds a BOS it
            # is [BOS], generation from the start of a text (vLLM serves it too).
            ids = self._encode(text, add_special_tokens)
            kept = self.checks.prompt_ids(ids, truncate=truncate)
            # A truncated prompt is echoed as what runs: its tokens' decoding.
            prompts.append(self._decoded_prompt(kept, followed) if len(kept) < len(ids) else CompletionPrompt(kept, text))
        return prompts

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """A completion prompt's text as it runs (``/tokenize`` counts it with the same call)."""
        with self.tokenizer_lock:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _decoded_prompt(self, ids: list[int], followed: bool) -> CompletionPrompt:
        """A prompt echoed as its decoding, special tokens shown (vLLM's echo of token ids). When a completion
        follows, the tokens of a character the ids leave unfinished are left out of the text: the completion's
        text finishes that character (or shows it broken), and the echo would show its first bytes twice,
        once as U+FFFD."""
        with self.tokenizer_lock:
            held = self.engine.unfinished_tail(ids) if followed else 0
            raw = b"".join(self.engine.token_bytes(t) for t in ids[len(ids) - held :])
        return CompletionPrompt(ids, self._decode(ids[: len(ids) - held]), decoded=True, held=raw)

    async def _tokenizing(self, size: int, function, *args):
        """``function(*args)``, which takes the tokenizer's lock: on a worker thread when the prompt is large
        (``size`` characters or ids), or when a worker may hold the lock (a small prompt behind a large one
        would otherwise block the event loop, every stream with it, until the large one is encoded)."""
        if size <= OFF_LOOP_PROMPT_SIZE and not self.tokenizing_off_loop:
            return function(*args)
        loop = asyncio.get_running_loop()
        self.tokenizing_off_loop += 1

        def run():
            try:
                return function(*args)
            finally:  # counted down when the thread is done, not when a cancelled request stops waiting for it
                loop.call_soon_threadsafe(self._tokenized_off_loop)

        return await asyncio.to_thread(run)

    def _tokenized_off_loop(self) -> None:
        self.tokenizing_off_loop -= 1

    async def _completion_chunks(self, request: CompletionRequest, handle: RequestHandle,
                                 prompts: list[CompletionPrompt], rid: str | None = None) -> AsyncIterator[str]:
        """``prompts``: each choice's; ``rid``: every chunk's id (:func:`response_id`), by default a new one."""
        rid, created, served = rid or random_id("cmpl"), int(time.time()), self._response_name(request.model)
        usage_opt, continuous = _usage_options(request)
        offsets = [self._offsets(len(p.text), held=p.held, shown=not request.skip_special_tokens) for p in prompts]
        first = [True] * handle.num_choices
        counts = [0] * handle.num_choices
        async for out in stream_outputs(handle):
            counts[out.index] += len(out.token_ids)
            text, logprobs = out.text, None
            if request.logprobs is not None:
                logprobs = CompletionLogprobs()
                if first[out.index] and request.echo:
                    add_completion_logprobs(logprobs, out.prompt_logprobs or [],
                                            self._offsets(0, prompts[out.index].text), request.logprobs,
                                            self._as_ids(request))
                add_completion_logprobs(logprobs, out.logprobs or [], offsets[out.index],
                                        as_ids=self._as_ids(request))
            if first[out.index] and request.echo:
                text = prompts[out.index].text + text
            # vLLM's: a choice's first chunk carries its prompt's ids (never skipped below with return_token_ids).
            prompt_ids = prompts[out.index].ids if first[out.index] and request.return_token_ids else None
            first[out.index] = False
            if not (text or out.finish_reason or logprobs or request.return_token_ids):
                continue
            choice = CompletionChoice(index=out.index, text=text, logprobs=logprobs, finish_reason=out.finish_reason,
                                      stop_reason=out.stop_reason, prompt_token_ids=prompt_ids,
                                      token_ids=out.token_ids if request.return_token_ids else None)
            usage = self._choice_usage(handle, prompts, request.n, out.index, counts[out.index]) if continuous else None
            chunk = dump(CompletionResponse(id=rid, created=created, model=served, choices=[choice],
                                            usage=usage, session_id=request.session_id))
            if not usage_opt:
                chunk.pop("usage", None)
            yield sse(chunk)
        if usage_opt:
            usage = self._usage_counts(handle, sum(counts))
            yield sse(dump(CompletionResponse(id=rid, created=created, model=served, choices=[],
                                              usage=usage)))

    # -- /v1/chat/completions ----------------------------------------------------------------------------------
    def _special_tool_tags(self, calling) -> bool:
        """Whether decoding would drop a call tag: one of the tokens it skips, the tokenizer's named special
        tokens or, with a fast tokenizer, any added token marked special (Llama 3's reserved tokens, which
        Hermes 2 Pro renames to its tags, are not among the named ones)."""
        special = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        backend, skipped = self.engine.backend, self.engine.skipped_ids
        return any(tag in special or (backend is not None and backend.token_to_id(tag) in skipped)
                   for tag in calling.text_parser().tags())

    async def chat(self, request: ChatCompletionRequest, raw: Request):
        rid = response_id("chatcmpl", request, raw)  # (refused before the request is submitted)
        check_tool_choice_has_tools(request)
        run = await self.start_chat(request)
        if request.stream:
            chunks = (sse(chunk) async for chunk in self.chat_chunks(request, run, rid))
            return sse_response(chunks, run.handle)
        billed = await collect_outputs(run.handle, raw)
        outputs = best_of_choices(billed, request.n, run.best_of)
        return await json_built(_chat_answer_size(request, outputs),
                                lambda: dump(self._chat_response(request, run, outputs, billed, rid)))

    async def start_chat(self, request: ChatCompletionRequest) -> ChatRun:
        """Check the request, template and tokenize its conversation, and submit it to the engine (the Responses
        API's route runs its requests through here too, translated: retnet.serve.responses)."""
        self._check_common(request)
        check_content_parts(request)
        check_chat_features(request)
        calling = tool_calling(request, self.settings.tool_call_parser)
        check_beam_search(request, tool_grammar=calling is not None and calling.parser is None)
        best_of = self._best_of(request)
        if calling is not None and request.echo:
            raise APIError(400, "echo: not with tool calls (the answer is calls, not text continuing the last "
                           "message)", "echo")
        if calling is not None and calling.parser is not None and (request.chat_template_kwargs or {}).get(
                "continue_final_message", request.continue_final_message):
            # The parser reads the answer alone: a call the last message opened would be read from its middle.
            raise APIError(400, "continue_final_message: not with tool_choice 'auto' (the calls are parsed from the "
                           "answer alone, not from the message it continues)", "continue_final_message")
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        top = request.top_logprobs if request.top_logprobs is not None else 0
        if top > self.settings.max_logprobs:
            raise APIError(400, f"top_logprobs must be <= {self.settings.max_logprobs}; got {top}", "top_logprobs")
        self._check_prompt_logprobs(request)
        # max_completion_tokens is chat's newer name for max_tokens; it wins when both are sent.
        name = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
        max_tokens = getattr(request, name)
        if max_tokens == 0:
            raise APIError(400, f"{name} must be at least 1 (0 is accepted only by /v1/completions with echo)", name)
        session = await self._acquire_session(request)
        try:
            closes = _open_answer(session)
            # The session keeps its pending token until this turn's answer replaces it: a turn that never ends
            # (cancelled while queued, failed) leaves the session as it was, in memory and in its file.
            leaves_pending = bool(closes) and await self._tokenizing(0, self._closer_leaves_out, request, session)
            prompt, hint = await self._tokenizing(_chat_size(request), self._chat_prompt,
                                                  request, _continues(session), closes)
            if session is not None:
                session.answering_assistant = _answers_in_assistant_message(request)
            params = self.checks.params(request, max_tokens, top if request.logprobs else None, name,
                                        bad_words=await self._bad_words(request))
            params.grammar = await self._grammar(request, calling)
            params.cache_salt = request.cache_salt
            if calling is not None and calling.parser is not None and "skip_special_tokens" not in \
                    request.model_fields_set:
                # A tokenizer that marks the call tags as special tokens (Hermes 2 Pro) would drop them from the
                # text the parser reads; vLLM's parser turns skipping off for such requests too.
                params.skip_special_tokens = not self._special_tool_tags(calling)
            _score_candidates(params, request.n, best_of)
            if request.use_beam_search:
                handle = self._beam_search([prompt], params, request, [hint])
            else:
                handle = self._submit([prompt], params, request, [hint], session=session,
                                      leaves_pending=leaves_pending, n=best_of)
        except BaseException:
            self._release_session(request, session)
            raise
        return ChatRun(handle, calling, prompt, best_of)

    async def chat_response(self, request: ChatCompletionRequest, run: ChatRun, raw: Request) -> ChatCompletionResponse:
        """The whole response of a started chat (a client gone meanwhile cancels it: 499)."""
        billed = await collect_outputs(run.handle, raw)
        outputs = best_of_choices(billed, request.n, run.best_of)
        return await _built(_chat_answer_size(request, outputs), self._chat_response, request, run, outputs, billed)

    def _chat_response(self, request: ChatCompletionRequest, run: ChatRun, outputs: list[list[SeqOutput]],
                       billed: list[list[SeqOutput]], rid: str | None = None) -> ChatCompletionResponse:
        """The whole response of ``outputs``; the usage counts the tokens of ``billed`` (best_of's candidates, all
        generated; else ``outputs`` themselves). ``rid``: its id (:func:`response_id`), by default a new one."""
        handle, calling, prompt = run.handle, run.calling, run.prompt
        choices = []
        for index, seq in enumerate(outputs):
            logprobs = None
            if request.logprobs:
                logprobs = ChatLogprobs(content=[chat_logprob(t, self._as_ids(request)) for o in seq
                                                 for t in (o.logprobs or [])])
            text, finish = "".join(o.text for o in seq), seq[-1].finish_reason
            auto = calling is not None and calling.parser is not None
            calls = calling.calls(text) if calling is not None and not auto and finish == "stop" else None
            if auto:  # the calls parsed out of free text
                content, calls = calling.text_parser().parse(text)
                message = AssistantMessage(content=content, tool_calls=calls or None)
                finish = "tool_calls" if calls and finish == "stop" else finish
            elif calls is not None:
                message, finish = AssistantMessage(tool_calls=calls), calling.finish_reason()
            else:  # free text, or calls cut short (no whole JSON to read them from): the text as it is
                message = AssistantMessage(content=_chat_echo(request) + text)
            choices.append(ChatChoice(
                index=index, message=message, logprobs=logprobs, finish_reason=finish, stop_reason=seq[-1].stop_reason,
                **self._ids(request, prompt, seq),
            ))
        response = ChatCompletionResponse(id=rid or random_id("chatcmpl"), model=self._response_name(request.model),
                                          choices=choices,
                                          usage=self._usage(handle, billed),
                                          session_id=request.session_id,
                                          prompt_logprobs=vllm_prompt_logprobs(outputs[0][0].prompt_logprobs,
                                                                               request.prompt_logprobs),
                                          prompt_token_ids=prompt if request.return_token_ids else None)
        return response

    def _chat_prompt(self, request: ChatCompletionRequest, continues: bool = False,
                     closes: str | None = None) -> tuple[list[int], int | None]:
        """Token ids of the templated conversation, checked, and the offset where its last message starts (the
        history before it is a prefix worth caching) when the tokenisation agrees there. ``continues``: the
        messages continue a session's history, so they do not open a text (no BOS before them); ``closes``:
        that history ends inside an assistant message, this the text it holds past the answer (:func:`_open_answer`)."""
        ids, hint = self._chat_ids(request, continues, closes=closes)
        if not ids:
            raise APIError(400, "the templated conversation is empty", "messages", "empty_prompt")
        truncate = request.truncate_prompt_tokens
        if truncate is not None and truncate < len(ids):
            # The history's state is worth caching only if it is a prefix of what is run.
            hint = hint - (len(ids) - truncate) if hint is not None and hint > len(ids) - truncate else None
        return self.checks.prompt_ids(ids, "messages", truncate), hint

    def _chat_ids(self, request: ChatCompletionRequest | TokenizeChatRequest, continues: bool = False,
                  with_hint: bool = True, closes: str | None = None) -> tuple[list[int], int | None]:
        """``_chat_prompt``'s ids before any check of their number or values (``/tokenize`` counts what a chat
        completion would refuse), and with ``with_hint`` the offset where the last message starts. ``closes``:
        the session's history ends inside an assistant message, this the text it holds past the answer: the
        messages follow what the template closes it with (:meth:`_closing`)."""
        # None: the tokenizer's own, which transformers picks (its "default" when it keeps several by name).
        template, variables = self.chat_template, self._template_variables(request)
        add_generation_prompt = variables.pop("add_generation_prompt", request.add_generation_prompt)
        continue_final = variables.pop("continue_final_message", request.continue_final_message)
        if add_generation_prompt and continue_final:
            raise APIError(400, "continue_final_message leaves the last message open for the model to continue; it "
                           "needs add_generation_prompt: false", "continue_final_message")
        add_special = _add_special_tokens(request, continues)
        try:
            with self.tokenizer_lock:
                developer = self._developer_role(template, variables.get("tools")) \
                    if any(m.role == "developer" for m in request.messages) else "developer"
                messages = [template_message(m, developer) for m in request.messages]
                text = self._render(messages, template, add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final, **variables)
                bos = self.tokenizer.bos_token
                if continues and bos and text.startswith(bos) and not self._bos_per_turn(template, variables):
                    # A template that opens the conversation with {{ bos_token }} would put a BOS in the
                    # middle of the session's history.
                    text = text[len(bos) :]
                if closes is not None:
                    # Encoded with the messages as one text, as the conversation sent whole is: a closer that ends
                    # in a newline may join what follows into other tokens.
                    text = self._closing(template, variables.get("tools"), closes) + text
                ids = self.tokenizer.encode(text, add_special_tokens=add_special)
        except Exception as exc:  # a template that rejects these messages (roles out of order, ...)
            raise APIError(400, f"the chat template rejected the messages: {exc}", "messages") from exc
        hint = None
        # The history alone is templated only to find a prefix worth caching; a template may refuse it on its
        # own (Qwen3's wants a user message), which must not refuse the conversation.
        with contextlib.suppress(Exception), self.tokenizer_lock:
            # A session's turn starts from its state, not a prefix.
            if with_hint and len(messages) > 1 and not continues:
                head = self._render(messages[:-1], template, add_generation_prompt=False, **variables)
                head_ids = self.tokenizer.encode(head, add_special_tokens=add_special)
                if 0 < len(head_ids) < len(ids) and ids[: len(head_ids)] == head_ids:
                    hint = len(head_ids)
        return ids, hint

    def _template_variables(self, request: ChatCompletionRequest | TokenizeChatRequest) -> dict:
        """What the chat template renders the request's messages with besides them: its ``chat_template_kwargs``
        (``add_generation_prompt`` and ``continue_final_message`` among them, when sent), documents and tools."""
        # The tools reach the template whenever the request has them (vLLM's and OpenAI's default: "none" makes no
        # call, the model still knows the tools), unless --exclude-tools-when-tool-choice-none drops them.
        hidden = request.tool_choice == "none" and self.settings.exclude_tools_when_tool_choice_none
        tools = request.tools if request.tools and not hidden else None
        return {**(request.chat_template_kwargs or {}),
                **({"documents": request.documents} if request.documents is not None else {}),
                **({"tools": tools} if tools else {})}

    def _closer_leaves_out(self, request: ChatCompletionRequest, session: Session) -> bool:
        """Whether the chat turn continuing ``session`` leaves its pending token unfed: the answer's last token, a
        special token its returned text left out (a stop token such as Qwen's ``<|endoftext|>`` under ChatML, a
        special token decoding skips at ``max_tokens``) of which the chat template writes nothing where it closes
        the message (:meth:`_closing` writes the whole closer either way). The conversation sent fresh has the
        returned text, then the closer: the state has absorbed every token but that one, and the session's tokens
        are that conversation's only without it. A stop string's text (kept, as it spans tokens the state holds)
        and a special token the closer begins with (EOS, ``<|im_end|>``: fed, the rest of the closer after it)
        are fed as before. Takes the tokenizer's lock."""
        hidden = session.answer_hidden
        if len(session.pending) != 1 or session.pending[0] not in self.engine.skipped_ids:
            return False
        template, tools = self.chat_template, self._template_variables(request).get("tools")
        with self.tokenizer_lock:
            if self.tokenizer.decode(session.pending, skip_special_tokens=False) != hidden:
                return False  # a stop string's cut, not the token alone
            try:
                return self._closing(template, tools, hidden) == self._closing(template, tools, "")
            except Exception:  # a template that cannot render: the templating that follows answers the 400
                return False

    def _bos_per_turn(self, template: str | None, variables: dict) -> bool:
        """Whether the chat template writes a BOS before every turn (Llama 2's), not only before the
        conversation: then a continuing turn's BOS is the template's format, kept. Probed once per template
        transformers picks (a tokenizer's named "tool_use" one for a request with tools), with the tokenizer's
        lock held."""
        resolved = self.tokenizer.get_chat_template(template, variables.get("tools"))
        if resolved not in self.bos_per_turn:
            probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}]
            try:
                text = self._render(probe, resolved, add_generation_prompt=True, **variables)
            except Exception:  # a template that wants other messages: treat its BOS as the conversation's
                text = ""
            self.bos_per_turn[resolved] = text.count(self.tokenizer.bos_token) > 1
        return self.bos_per_turn[resolved]

    def _closing(self, template: str | None, tools, hidden: str) -> str:
        """The text that closes a session's open assistant message as the chat template closes an assistant message
        before the next one (:func:`assistant_closer`), past what the state already holds of it: ``hidden``, the
        text the answer generated but did not return (:attr:`Session.answer_hidden`: the EOS or ``<|im_end|>`` it
        stopped on, a stop string such as ``<|im_end|>``). When the closer starts with it (after whitespace alone:
        Llama 2's `` </s>``), only the rest is written (ChatML's newline, nothing for the default template's EOS);
        otherwise (``max_tokens``, ``ignore_eos``, a stop the template does not write there) the whole closer. A
        text the answer returned is the message's content, which the closer follows whole, as in the conversation
        sent fresh. A template whose closer cannot be probed closes nothing. Probed once per template transformers
        picks, with the tokenizer's lock held."""
        resolved = self.tokenizer.get_chat_template(template, tools)
        if resolved not in self.assistant_closers:
            self.assistant_closers[resolved] = assistant_closer(functools.partial(
                self._render, template=resolved, add_generation_prompt=False))
        closer = self.assistant_closers[resolved]
        if not closer:
            return ""
        at = closer.find(hidden) if hidden else -1
        if at >= 0 and not closer[:at].strip():
            return closer[at + len(hidden) :]
        if hidden and closer.strip() and hidden.lstrip().startswith(closer.lstrip()):
            return ""  # the whole closer and more (the rest of a stop string's token): nothing left to write
        return closer

    def _developer_role(self, template: str | None, tools) -> str:
        """The role developer messages are templated as (tools.developer_role): "developer" where the chat template
        renders one, else "system" (OpenAI's reading). Probed once per template transformers picks (a tokenizer's
        named "tool_use" one for a request with tools), with the tokenizer's lock held."""
        resolved = self.tokenizer.get_chat_template(template, tools)
        if resolved not in self.developer_as:
            self.developer_as[resolved] = developer_role(functools.partial(self._render, template=resolved))
        return self.developer_as[resolved]

    def _render(self, messages: list[dict], template: str | None, **options) -> str:
        """``apply_chat_template(messages, tokenize=False, **options)`` with ``template`` (None: the tokenizer's),
        each message's content in the form that template reads (:meth:`_content_format`): every rendering of a
        conversation on this server goes through here, the probes of the template included. A message's content:
        a string, or a list of text parts (:func:`~retnet.serve.tools.template_message`'s)."""
        form = self._content_format(template, options.get("tools"))
        return self.tokenizer.apply_chat_template([_in_form(message, form) for message in messages], tokenize=False,
                                                  chat_template=template, **options)

    def _content_format(self, template: str | None, tools) -> str:
        """The content form, "string" or "openai": --chat-template-content-format's, or with auto the one the template
        transformers picks reads (:func:`detect_content_format`), found once per template."""
        chosen = self.settings.chat_template_content_format
        if chosen != "auto":
            return chosen
        try:
            resolved = self.tokenizer.get_chat_template(template, tools)
        except Exception:  # no template at all: apply_chat_template answers that
            return "string"
        if resolved not in self.content_formats:
            self.content_formats[resolved] = detect_content_format(resolved)
        return self.content_formats[resolved]

    async def chat_chunks(self, request: ChatCompletionRequest, run: ChatRun,
                          rid: str | None = None) -> AsyncIterator[dict]:
        """A started chat's stream, each chunk's JSON before its SSE framing, each chunk's id ``rid``
        (:func:`response_id`; by default a new one). With tool calls (``run.calling``)
        each choice's text is held, and sent when it ends as its calls, in one chunk (or as content, cut short:
        no whole JSON to read calls from); with a parser ("auto") the content streams as it is decided, and each
        call is sent whole in one chunk when it closes."""
        handle, calling = run.handle, run.calling
        rid, created, served = rid or random_id("chatcmpl"), int(time.time()), self._response_name(request.model)
        usage_opt, continuous = _usage_options(request)
        counts = [0] * handle.num_choices

        def chunk(choice: ChatChunkChoice | None, usage: Usage | None = None, opening: bool = False) -> dict:
            """``opening``: a choice's first chunk, which carries the prompt's ids with ``return_token_ids``."""
            if continuous and usage is None:  # vLLM's: the tokens of the chunk's choice so far
                usage = self._usage_counts(handle, counts[choice.index])
            data = dump(ChatCompletionChunk(id=rid, created=created, model=served,
                                            choices=[choice] if choice else [], usage=usage,
                                            session_id=request.session_id))
            if not usage_opt:
                data.pop("usage", None)
            if opening and request.return_token_ids:
                data["prompt_token_ids"] = run.prompt  # where vLLM puts a chat chunk's: beside choices, not in one
            for item in data["choices"]:
                item["delta"] = {key: value for key, value in item["delta"].items() if value is not None}
            return data

        echo = _chat_echo(request)
        for index in range(handle.num_choices):
            yield chunk(ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content="")), opening=True)
            if echo:
                yield chunk(ChatChunkChoice(index=index, delta=DeltaMessage(content=echo)))
        held = [""] * handle.num_choices
        parsers = [calling.text_parser() for _ in range(handle.num_choices)] if calling and calling.parser else None
        async for out in stream_outputs(handle):
            counts[out.index] += len(out.token_ids)
            logprobs = (ChatLogprobs(content=[chat_logprob(t, self._as_ids(request)) for t in out.logprobs])
                        if out.logprobs else None)
            ids = out.token_ids if request.return_token_ids else None
            delta, finish = DeltaMessage(content=out.text), out.finish_reason
            if parsers is not None:
                parser = parsers[out.index]
                content, calls = parser.feed(out.text)
                if finish:
                    content += parser.finish()
                first = len(parser.calls) - len(calls)
                delta = DeltaMessage(content=content or None, tool_calls=[
                    DeltaToolCall(index=first + i, id=call.id, function=call.function) for i, call in enumerate(calls)
                ] or None)
                if finish == "stop" and parser.calls:
                    finish = "tool_calls"
            elif calling is not None:
                held[out.index] += out.text
                delta = DeltaMessage()
                calls = calling.calls(held[out.index]) if finish == "stop" else None
                if calls is not None:
                    delta, finish = DeltaMessage(tool_calls=[
                        DeltaToolCall(index=i, id=call.id, function=call.function) for i, call in enumerate(calls)
                    ]), calling.finish_reason()
                elif finish:
                    delta = DeltaMessage(content=held[out.index])
            if delta.content or delta.tool_calls or logprobs or ids:
                yield chunk(ChatChunkChoice(index=out.index, delta=delta, logprobs=logprobs, token_ids=ids))
            if finish:
                yield chunk(ChatChunkChoice(index=out.index, delta=DeltaMessage(), finish_reason=finish,
                                            stop_reason=out.stop_reason))
        if usage_opt:
            yield chunk(None, self._usage_counts(handle, sum(counts)))

    # -- /tokenize, /detokenize (vLLM's) -----------------------------------------------------------------------
    async def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        """The ids the generation route runs for the same prompt or messages; a prompt over the server's limit
        is counted, not refused (a client asks to learn whether it fits)."""
        self._check_model(request.model)
        if isinstance(request, TokenizeChatRequest):
            if request.prompt is not None:
                raise APIError(400, "send prompt (a text) or messages (a conversation), not both", "prompt")
            check_content_parts(request)
            check_chat_features(request)
            check_tool_choice_has_tools(request)
            tool_calling(request, self.settings.tool_call_parser)
            size = _chat_size(request)
        else:
            size = len(request.prompt)
        return await self._tokenizing(size, self._tokenize, request)

    def _tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        if isinstance(request, TokenizeChatRequest):
            ids, _ = self._chat_ids(request, with_hint=False)
        else:
            ids = self._encode(request.prompt, request.add_special_tokens)
        strs = None
        if request.return_token_strs:
            with self.tokenizer_lock:
                strs = self.tokenizer.convert_ids_to_tokens(ids)
        return TokenizeResponse(count=len(ids), max_model_len=self._card().max_model_len, tokens=ids,
                                token_strs=strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The ids' text as the server decodes a prompt sent as ids (special tokens shown)."""
        self._check_model(request.model)
        vocab = self.token_bound
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is out of the vocabulary (size {vocab})", "tokens",
                           "invalid_token_id")
        text = await self._tokenizing(len(request.tokens), self._decode, request.tokens)
        return DetokenizeResponse(prompt=text)

    # -- shared ------------------------------------------------------------------------------------------------
    def _check_common(self, request: SamplingFields) -> None:
        """A generation request's ``model`` and the fields every one has, checked."""
        self._check_model(request.model)
        self.checks.common(request)
        self.checked_priority(request)

    def checked_priority(self, request: RequestFields) -> int:
        """The request's ``priority`` for the engine; under ``--scheduling-policy fcfs`` anything but 0 is a 400 with
        vLLM's message (the client asked for an order this server would not give it)."""
        if request.priority != 0 and self.settings.scheduling_policy != "priority":
            raise APIError(400, f"Got priority {request.priority} but Priority scheduling is not enabled. (start "
                           "the server with --scheduling-policy priority)", "priority", "unsupported_parameter")
        return request.priority

    async def _grammar(self, request: SamplingFields, calling: ToolCalling | None = None) -> Grammar | None:
        """The compiled grammar of the request's structured-output field, if it sent one, or of its tool calls.
        Compiled on a worker thread: a large JSON schema takes llguidance a while, and the streams on the event
        loop wait for none."""
        asked = requested_grammar({name: getattr(request, name) for name in STRUCTURED_OUTPUT_FIELDS})
        # (the field; a compile error names the schema inside it, asked[1])
        field = asked[1].split(".")[0] if asked is not None else None
        if calling is not None and calling.parser is not None:  # "auto": free text, read by the parser
            if asked is not None:
                raise APIError(400, f"{field}: with tool_choice 'auto' the model writes its calls as free text "
                               f"for the tool-call parser, which a grammar would keep it from; send either tools or "
                               f"{field} (or tool_choice 'required' or a named function)", field, "invalid_grammar")
            return None
        if calling is not None:
            if asked is not None:
                raise APIError(400, f"{field}: tool calls are already held to the tools' schemas; send either "
                               f"tool_choice or {field}", field, "invalid_grammar")
            grammar = await asyncio.to_thread(lambda: self.grammars.compile(*calling.grammar()))
            self.metrics.structured.labels(field="tool_choice").inc()
            return grammar
        if asked is None:
            return None
        grammar = await asyncio.to_thread(self.grammars.compile, *asked)
        self.metrics.structured.labels(field=field).inc()
        return grammar

    async def _bad_words(self, request: SamplingFields) -> list[list[int]]:
        """Each bad word's token ids (:meth:`RequestChecks.bad_word_ids`), tokenized as the prompts are."""
        words = self.checks.bad_words(request)
        if not words:
            return []
        return await self._tokenizing(0, self.checks.bad_word_ids, words)  # at most MAX_BAD_WORDS short words

    async def _acquire_session(self, request: SamplingFields) -> Session | None:
        """The request's session, held (busy) from before its prompt is encoded: whether it has a history
        decides the encoding (a continuation opens no text, so gets no BOS), and nothing (another request,
        expiry, eviction, a DELETE) may change that before the engine takes it over. One not in memory is read
        from its file when there is one (--session-dir; 409 when it cannot continue on this model)."""
        if request.session_id is None:
            return None
        try:
            session = self.engine.sessions.acquire(request.session_id)
        except SessionBusy as exc:
            self.metrics.rejected.labels("session_busy").inc()
            raise APIError(409, f"session {request.session_id!r} is in use by another request", "session_id",
                           "session_busy") from exc
        # A session's state was computed under one adapter (or the base model): it continues under that one only.
        try:
            adapter = self._adapter(request.model)
            if session.cache is None:
                await self.engine.sessions.restore(request.session_id, session, self.engine.adapters,
                                                   self.engine.device)
        except BaseException:
            self._release_session(request, session)
            raise
        served = {a.slot: name for name, a in self.engine.adapters.items()}
        if session.cache is not None and session.adapter and session.adapter not in served:
            # Its adapter was unloaded (or replaced) while the engine had not dropped it yet: gone, as expired.
            session.cache, session.pending, session.tokens, session.seen = None, [], 0, None
            session.assistant_open = False
        if session.cache is None:
            session.adapter = adapter
        elif session.adapter != adapter:
            self.engine.sessions.release(request.session_id)
            started = served[session.adapter] if session.adapter else self.model_name
            raise APIError(400, f"session {request.session_id!r} was started with the model {started!r}; it "
                           f"continues only under that model, not {self._check_model(request.model)!r}", "model")
        return session

    def _release_session(self, request: SamplingFields, session: Session | None) -> None:
        """Give back a session the engine never took (the request failed before it was queued). A state made under
        an adapter no longer served (unloaded or replaced while the request was read: 404, or 409 session_stale)
        is dropped with it: the engine drops such sessions when it frees the slot, but skipped this one, busy."""
        if session is not None:
            if session.adapter and all(a.slot != session.adapter for a in self.engine.adapters.values()):
                session.cache = None  # released without a state, the session is deleted
            self.engine.sessions.release(request.session_id)

    def _submit(self, prompts, params, request: SamplingFields, hints=None, session: Session | None = None,
                text_starts: list[int | None] | None = None, leaves_pending: bool = False,
                n: int | None = None) -> RequestHandle:
        """``n``: the sequences each prompt runs (best_of's candidates, one for a beam search's step); default the
        request's ``n``."""
        if request.session_id is not None and len(prompts) != 1:
            raise APIError(400, "session_id needs a single prompt", "session_id")
        n = request.n if n is None else n
        self._check_room(request, len(prompts), n)
        adapter = self._adapter(request.model)
        if session is not None and session.adapter != adapter:
            if session.cache is not None:  # the caller releases the session
                raise APIError(409, f"session {request.session_id!r}: the LoRA adapter {request.model!r} was "
                               "replaced while this request was read; the session's state was made under the "
                               "adapter replaced. Send the request again (the session then starts anew)",
                               "session_id", "session_stale")
            session.adapter = adapter
        try:
            handle = self.engine.submit(prompts, params, n, request.session_id, hints, session, text_starts,
                                        adapter, self.checked_priority(request), leaves_pending=leaves_pending)
        except (QueueFull, EngineUnavailable) as exc:
            raise self.refused(exc) from exc
        except SessionBusy as exc:
            self.metrics.rejected.labels("session_busy").inc()
            raise APIError(409, f"session {request.session_id!r} is in use by another request", "session_id",
                           "session_busy") from exc
        self.metrics.model_requests.labels(model_name=self._response_name(request.model)).inc()
        return handle

    def _check_room(self, request: SamplingFields, prompts: int, n: int) -> None:
        """A 400 for more sequences (``prompts × n``) than the server ever holds: they would get 429 (retry later)
        forever."""
        limit, wanted = self.settings.max_running + self.settings.max_queue, prompts * n
        if wanted > limit:
            name = "n" if n == request.n else "best_of"
            raise APIError(400, f"prompts × {name} is {wanted}; this server holds at most {limit} sequences",
                           name if n > 1 else "prompt")

    def _beam_search(self, prompts: list[list[int]], params: SamplingParams, request: SamplingFields, hints=None,
                     text_starts: list[int | None] | None = None) -> RequestHandle:
        """Start a beam search of ``request.n`` beams after each prompt (:mod:`retnet.serve.beam_search`): its
        first step submitted here (so that a full or stopping engine refuses the request at once), the others by
        the search as it goes. Its handle answers as the engine's for ``n`` choices a prompt."""
        width = request.n
        self._check_room(request, len(prompts), width)  # every step runs them all
        if width > self.engine.token_bound:  # n distinct sequences need at least n tokens to choose from
            raise APIError(400, f"n must be <= {self.engine.token_bound} (the vocabulary) for a beam search; got "
                           f"{width}", "n")
        step = beam_step_params(params, width)
        first = self._submit(prompts, dataclasses.replace(step, prompt_logprobs=params.prompt_logprobs), request,
                             hints, text_starts=text_starts, n=1)
        adapter, priority = self._adapter(request.model), self.checked_priority(request)

        def submit(beams: list[list[int]], step_params: SamplingParams) -> RequestHandle:
            try:
                return self.engine.submit(beams, step_params, 1, adapter=adapter, priority=priority)
            except EngineUnavailable as exc:
                if self.engine.dead is not None:  # died between two steps: failed, as a step in flight is
                    raise APIError(503, self.engine.dead, None, "engine_failure", type="server_error") from exc
                raise self.refused(exc) from exc  # (QueueFull: the search waits for places, BeamSearch._step)
            except ValueError as exc:  # its LoRA adapter was unloaded (or replaced) while it searched
                raise APIError(404, f"the beam search stopped: {exc}", "model", "model_not_found") from exc

        decode = self.engine._decoder(params)  # the engine's own, so the text is what it would answer

        def decoded(prompt: list[int], tokens: list[int]) -> str:
            with self.tokenizer_lock:
                detokenizer = IncrementalDetokenizer(decode,
                                                     **self.engine.detokenizer_context(prompt, params.skip_special_tokens))
                detokenizer.ids.extend(tokens)  # the whole answer, decoded once
                return detokenizer.flush()

        async def text(prompt: list[int], tokens: list[int]) -> str:
            return await self._tokenizing(len(tokens), decoded, prompt, tokens)

        search = BeamSearch(prompts, width, params.max_tokens, request.length_penalty,
                            frozenset() if params.ignore_eos else frozenset(self.engine.eos_ids),
                            self.engine.primary_eos, params.logprobs, params.include_stop_str_in_output, step, submit,
                            text, ended=self.engine.prefix_cache.end_search, metrics=self.metrics)
        return search.start(first)

    def refused(self, exc: QueueFull | EngineUnavailable) -> APIError:
        """The answer to work an engine did not take (counted by reason): 429 when it is full, 503 while it is
        loading, stopping or dead; both tell the client when to retry."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if isinstance(exc, QueueFull):
            self.metrics.rejected.labels("queue_full").inc()
            return APIError(429, f"the server is busy ({exc}); retry later", None, "queue_full",
                            type="rate_limit_error", headers=retry)
        self.metrics.rejected.labels("unavailable").inc()
        return APIError(503, f"the server cannot take requests now: {exc}", None, "unavailable", type="server_error",
                        headers=retry)

    def _usage(self, handle: RequestHandle, outputs: list[list[SeqOutput]]) -> Usage:
        return self._usage_counts(handle, sum(len(o.token_ids) for seq in outputs for o in seq))

    def _choice_usage(self, handle: RequestHandle, prompts: list[CompletionPrompt], n: int, index: int,
                      completion: int) -> Usage:
        """A streamed completion chunk's usage under ``continuous_usage_stats``, as vLLM counts it: its choice's
        prompt and tokens so far (``prompts``: each choice's; ``n`` choices a prompt), not the request's."""
        if len(prompts) == n:  # one prompt: the request's, with its cached tokens
            return self._usage_counts(handle, completion)
        # Of several prompts: the request's cached tokens are not told apart by prompt (vLLM sends no details here)
        prompt_tokens = len(prompts[index].ids)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)

    def _usage_counts(self, handle: RequestHandle, completion: int) -> Usage:
        details = PromptTokensDetails(cached_tokens=handle.cached_tokens)  # OpenAI sends it, 0 included
        return Usage(prompt_tokens=handle.prompt_tokens, completion_tokens=completion,
                     total_tokens=handle.prompt_tokens + completion, prompt_tokens_details=details)

    @staticmethod
    def _ids(request: SamplingFields, prompt: list[int], seq: list[SeqOutput]) -> dict:
        if not request.return_token_ids:
            return {}
        return {"prompt_token_ids": prompt, "token_ids": [t for o in seq for t in o.token_ids]}

    def _check_prompt_logprobs(self, request: SamplingFields) -> None:
        limit = self.settings.max_logprobs
        if request.prompt_logprobs is not None and request.prompt_logprobs > limit:
            raise APIError(400, f"prompt_logprobs must be <= {limit} (--max-logprobs); got {request.prompt_logprobs}",
                           "prompt_logprobs")

    def _as_ids(self, request: SamplingFields) -> bool:
        """Whether logprobs name tokens by id: the request's ``return_tokens_as_token_ids``, else the server's."""
        if request.return_tokens_as_token_ids is not None:
            return request.return_tokens_as_token_ids
        return self.settings.return_tokens_as_token_ids

    def _offsets(self, start: int, echoed: str | None = None, held: bytes = b"", shown: bool = False) -> TextOffsets:
        """``shown``: the text keeps special tokens' text (``skip_special_tokens`` false): they take characters."""
        return TextOffsets(start, set() if shown else self.engine.skipped_ids, echoed, held)

    def _decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode([i for i in ids if i < self.engine.vocab_size])


@dataclass(slots=True)
class ChatRun:
    """A chat request submitted to the engine: its handle, its tool calling (None: free text) and prompt ids."""

    handle: RequestHandle
    calling: ToolCalling | None
    prompt: list[int]
    best_of: int = 1  # the candidates generated, of which the n best are answered (OpenAIServing._best_of)


NAMES_SHOWN = 5


def _some(names: list[str]) -> str:
    """``names`` quoted and joined, the first :data:`NAMES_SHOWN` only where there are more, with their count."""
    shown = ", ".join(map(repr, names[:NAMES_SHOWN]))
    return shown if len(names) <= NAMES_SHOWN else f"{shown} and {len(names) - NAMES_SHOWN} more (GET /v1/models)"


def _score_candidates(params: SamplingParams, n: int, best_of: int) -> None:
    """Have ``best_of`` candidates (above ``n``) carry their tokens' logprobs, which rank them (shown only when asked)."""
    if best_of > n and params.logprobs is None:
        params.logprobs = 0


def _continues(session: Session | None) -> bool:
    return session is not None and session.cache is not None


def _open_answer(session: Session | None) -> str | None:
    """What the state holds past the returned text of the assistant message a session's history ends inside (a
    chat turn's answer, not yet closed; :attr:`Session.answer_hidden`), which its next chat turn closes first;
    None when it ends elsewhere (no history, a completion)."""
    if not _continues(session) or not session.assistant_open:
        return None
    return session.answer_hidden


def _answers_in_assistant_message(request: ChatCompletionRequest) -> bool:
    """Whether the chat request's answer is the text of an assistant message: the generation prompt opens one,
    or the answer continues the final message, an assistant's. Without either (``add_generation_prompt: false``
    after another role's message) the answer follows a message the template closed, and no message is open."""
    kwargs = request.chat_template_kwargs or {}
    if kwargs.get("add_generation_prompt", request.add_generation_prompt):
        return True
    continue_final = kwargs.get("continue_final_message", request.continue_final_message)
    return bool(continue_final) and request.messages[-1].role == "assistant"


def _in_form(message: dict, form: str) -> dict:
    """``message`` with its content as a template of ``form`` reads it: "openai", a list of text parts (a string
    is one); "string", one text (a list's texts joined by newlines, as vLLM joins them)."""
    if "content" not in message:
        return message
    content = message["content"]
    if form == "openai" and (content is None or isinstance(content, str)):
        return {**message, "content": [] if content is None else [{"type": "text", "text": content}]}
    if form == "string" and isinstance(content, list):
        return {**message, "content": "\n".join(part["text"] for part in content)}
    return message


def detect_content_format(template: str) -> str:
    """vLLM's auto content format: "openai" when the Jinja template loops over a message's content
    (``{% for part in message['content'] %}``, the message being a loop variable over ``messages`` or over a
    variable set from it, such as ``loop_messages = messages[1:]``), else "string", the form most templates read;
    "string" too for a template this cannot read."""
    try:
        from jinja2 import nodes
        from transformers.utils.chat_template_utils import _compile_jinja_template

        tree = _compile_jinja_template(template).environment.parse(template)

        def base(node):
            # What an expression is taken from, through filters, tests and slices (messages[1:] | reverse).
            while ((isinstance(node, (nodes.Filter, nodes.Test)) and node.node is not None)
                   or (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice))):
                node = node.node
            return node

        def named(node, names: set[str]) -> bool:
            node = base(node)
            return isinstance(node, nodes.Name) and node.name in names

        conversations = {"messages"}
        grown = True
        while grown:  # variables set from the messages, and from those
            before = len(conversations)
            conversations |= {assign.target.name for assign in tree.find_all(nodes.Assign)
                              if isinstance(assign.target, nodes.Name) and named(assign.node, conversations)}
            grown = len(conversations) > before
        turns = {loop.target.name for loop in tree.find_all(nodes.For)
                 if isinstance(loop.target, nodes.Name) and named(loop.iter, conversations)}
        for loop in tree.find_all(nodes.For):
            source = base(loop.iter)
            if isinstance(source, nodes.Getitem) and isinstance(source.arg, nodes.Const):
                key, owner = source.arg.value, source.node
            elif isinstance(source, nodes.Getattr):
                key, owner = source.attr, source.node
            else:
                continue
            if key == "content" and isinstance(owner, nodes.Name) and owner.name in turns:
                return "openai"
    except Exception:  # a template jinja cannot parse here: apply_chat_template answers for it
        return "string"
    return "string"


# The probe's message contents: texts no template writes itself, so that the answer's end is found exactly.
_CLOSER_PROBE = ("Qx7Ask", "Zr4Answer", "Wv9Next")


def assistant_closer(render) -> str | None:
    """What the chat template writes after an assistant message's content, before the next message: the default
    template's EOS, ChatML's ``<|im_end|>\n``, Llama 2's `` </s>`` ("" for none), what a conversation sent whole
    has between an answer and the next turn. ``render``: messages -> the template's text without a generation
    prompt. Taken as what follows the answer both when it ends the conversation and when a user message follows
    it (a template may render the last assistant message otherwise, as Qwen3's does its reasoning). None when the
    template refuses the probe or does not write the answer once, as it is."""
    ask, answer, after = _CLOSER_PROBE
    answered = [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    try:
        alone = render(answered)
        followed = render([*answered, {"role": "user", "content": after}])
    except Exception:  # a template that wants other messages (a system one first): nothing is closed
        return None
    if alone.count(answer) != 1 or followed.count(answer) != 1:
        return None
    last, before_next = alone.split(answer)[1], followed.split(answer)[1]
    shared = sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(last, before_next)))
    return last[:shared]


def _add_special_tokens(request: SamplingFields | TokenizeChatRequest, continues: bool) -> bool:
    """Whether the prompt's encoding gets the tokenizer's special tokens (a BOS): as the request says, and by
    default not when it ``continues`` a session's history, where a BOS would fall mid-text."""
    if "add_special_tokens" in request.model_fields_set:
        return request.add_special_tokens
    return request.add_special_tokens and not continues


def _usage_options(request: SamplingFields) -> tuple[bool, bool]:
    """(a last chunk with the usage, the usage so far on every chunk too) for a stream."""
    options = request.stream_options
    include = bool(options and options.include_usage)
    return include, include and options.continuous_usage_stats


# A prompt this large (characters, or token ids) is tokenized on a worker thread: a megabyte takes the tokenizer
# about a second, which every running stream would wait for. Smaller ones stay on the event loop: a burst of
# short requests handed to threads reaches the engine spread out, in more prefill rounds, each a stall of every
# running stream, for no gain (a short prompt encodes in microseconds).
OFF_LOOP_PROMPT_SIZE = 1 << 16


def _size(value) -> int:
    """Characters of the strings in ``value`` plus the number of its token ids (lists nest)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_size(item) if isinstance(item, (str, list)) else 1 for item in value)
    return 0


# A whole response listing this many logprob entries (a token's, or one of its alternatives) is built and encoded
# on a worker thread: about 5 us an entry, and n=8 choices of 4096 tokens with 20 alternatives each (a request the
# default limits take) held every running stream ~3 s on the event loop when it ended.
OFF_LOOP_ANSWER_SIZE = 1 << 13


def _answer_size(outputs: list[list[SeqOutput]], *alternatives: int | None) -> int:
    """The logprob entries a whole response of ``outputs`` lists, ``alternatives``: the top-k each asks for (None:
    not asked); 0 without logprobs (text is cheap to write)."""
    asked = [k for k in alternatives if k is not None]
    if not asked:
        return 0
    scored = sum(len(o.logprobs or ()) + len(o.prompt_logprobs or ()) for seq in outputs for o in seq)
    return scored * (1 + max(asked))


def _chat_answer_size(request: ChatCompletionRequest, outputs: list[list[SeqOutput]]) -> int:
    """:func:`_answer_size` of a chat answer: ``top_logprobs`` counts only with ``logprobs`` on."""
    return _answer_size(outputs, (request.top_logprobs or 0) if request.logprobs else None, request.prompt_logprobs)


async def _built(size: int, function, *args):
    """``function(*args)``, building a response: on a worker thread when it lists ``size`` entries past
    :data:`OFF_LOOP_ANSWER_SIZE` (the streams on the event loop go on meanwhile), else here."""
    if size <= OFF_LOOP_ANSWER_SIZE:
        return function(*args)
    return await asyncio.to_thread(function, *args)


def response_id(prefix: str, request: SamplingFields, raw: Request | None) -> str:
    """A completion's (``cmpl``) or chat's (``chatcmpl``) id, as vLLM's: ``<prefix>-`` and the request's
    ``X-Request-Id`` header, else its body's ``request_id``, else the server's own (a gateway's id then finds the
    request in the answer, and the answer's id in the gateway's logs)."""
    header = raw.headers.get("x-request-id") if raw is not None else None
    if header is not None and len(header) > REQUEST_ID_MAX_CHARS:  # (the body's field: its own max_length)
        raise APIError(400, f"X-Request-Id: at most {REQUEST_ID_MAX_CHARS} characters (every streamed chunk repeats "
                       f"it); got {len(header)}", "X-Request-Id")
    given = header or request.request_id
    return f"{prefix}-{given}" if given else random_id(prefix)


async def json_built(size: int, function, *args) -> Response:
    """The JSON response of the dict ``function(*args)`` builds, built as :func:`_built` builds it. Off the event
    loop it is encoded in pieces (:func:`_json_pieces`): one json.dumps of the whole holds the GIL, so the event
    loop too, for as long as it takes (~0.1 s for every 5 MB of logprobs; 4 s for 1024 embeddings of 2048 floats)."""
    if size <= OFF_LOOP_ANSWER_SIZE:
        return JSONResponse(function(*args))

    def build() -> bytes:
        pieces: list[str] = []
        _json_pieces(function(*args), pieces)
        return "".join(pieces).encode("utf-8")

    return Response(await asyncio.to_thread(build), media_type="application/json")


# Values (numbers, strings ...) one json.dumps call writes at most in a large response (each call holds the GIL).
_JSON_PIECE = 4096


def json_weight(value, cap: int = _JSON_PIECE) -> int:
    """The values and containers in ``value``, counted until past ``cap``."""
    if not isinstance(value, (dict, list)):
        return 1
    total = len(value)
    if total > cap:  # (a long list of numbers: not walked)
        return total
    for item in value.values() if isinstance(value, dict) else value:
        if isinstance(item, (dict, list)):
            total += json_weight(item, cap - total)
            if total > cap:
                break
    return total


def _json_pieces(value, out: list[str]) -> None:
    """``value`` as JSONResponse writes it, appended to ``out`` in pieces of about :data:`_JSON_PIECE` values
    each, one json.dumps call a piece."""
    if json_weight(value) <= _JSON_PIECE:
        out.append(_dumps(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            # (as json.dumps writes the key: a number, vLLM's prompt_logprobs' token ids, as a string)
            out.append(("," if i else "") + _dumps({key: 0})[1:-2])
            _json_pieces(item, out)
        out.append("}")
    else:  # a list: its items in runs that fit a piece, an item that does not fit one taken apart
        out.append("[")
        run, weight, first = [], 0, True

        def flush() -> None:
            nonlocal first
            if run:
                out.append(("" if first else ",") + _dumps(run)[1:-1])
                first = False
                run.clear()

        for item in value:
            size = json_weight(item)
            if size > _JSON_PIECE:
                flush()
                if not first:
                    out.append(",")
                _json_pieces(item, out)
                first, weight = False, 0
                continue
            if weight + size > _JSON_PIECE:
                flush()
                weight = 0
            run.append(item)
            weight += size
        flush()
        out.append("]")


def _dumps(value) -> str:
    """JSONResponse's encoding of ``value``."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


# What templating a conversation costs per message besides its texts (the template's own text around each, the
# rendering), in characters of encoding: ~60 us a message on the reference machine, about what 100 characters take.
MESSAGE_SIZE = 128


def _chat_size(request) -> int:
    """A conversation's size as :data:`OFF_LOOP_PROMPT_SIZE` counts it: what its template renders (each message's
    texts, reasoning, name and calls, and its cost of its own; the tools, documents and template variables) and
    encodes. Its contents alone were counted before: 30,000 empty messages (a megabyte) were templated and encoded
    on the event loop, every running stream held for seconds."""
    size = 0
    for message in request.messages:
        size += MESSAGE_SIZE + len(message.text()) + len(message.reasoning_text() or "") + len(message.name or "")
        for call in message.tool_calls or ():
            size += len(call.function.name) + _json_size(call.function.arguments)
    extras = [getattr(request, name, None) for name in ("tools", "documents", "chat_template_kwargs")]
    return size + sum(_json_size(extra) for extra in extras if extra)


def _json_size(value) -> int:
    """Characters of ``value`` written as JSON (a string: its own); what cannot be written counts 0."""
    if isinstance(value, str):
        return len(value)
    try:
        return len(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return 0


@dataclass(slots=True)
class CompletionPrompt:
    """One prompt of a completion request: the ``ids`` that run, and ``text``, what echo shows of them and where
    the completion's ``text_offset`` counts from (OpenAI's offsets index prompt + completion, echoed or not)."""

    ids: list[int]
    text: str
    decoded: bool = False  # text is the ids' decoding (sent as token ids, or truncated), special tokens shown
    # The bytes of the last tokens when they leave a character unfinished: not in ``text``, the completion's
    # text starts with them (see OpenAIServing._decoded_prompt).
    held: bytes = b""


def _chat_echo(request: ChatCompletionRequest) -> str:
    """vLLM's chat ``echo``: the text the answer starts with, the last message's when the answer continues it
    (it is the assistant's, or no generation prompt opens a new one)."""
    if not request.echo:
        return ""
    last = request.messages[-1]
    opened = (request.chat_template_kwargs or {}).get("add_generation_prompt", request.add_generation_prompt)
    return last.text() if last.role == "assistant" or not opened else ""


__all__ = ["OpenAIServing", "detect_content_format"]
