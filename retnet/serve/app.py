"""``create_app(settings)``: the FastAPI app. Routes are thin: they take typed requests and call the
handlers on ``app.state`` (:class:`~retnet.serve.serving.OpenAIServing`); every error leaves as OpenAI's
``{"error": {"message", "type", "param", "code"}}`` (Anthropic's body on the Messages API's routes) with a 4xx
unless the server itself failed."""

from __future__ import annotations

import hmac
import importlib.metadata
import json
import logging
import re
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from retnet.model.hub import holds_tokenizer
from retnet.serve.classify import (
    EMBEDDING_ROUTES,
    POOLING_ROUTES,
    ClassifyRequest,
    ClassifyServing,
    EmbeddingRequest,
    EmbedServing,
    PoolingRequest,
)
from retnet.serve.engine import Engine
from retnet.serve.messages import (
    ANTHROPIC_ROUTES,
    CountTokensRequest,
    MessagesRequest,
    MessagesServing,
    error_response,
    is_anthropic_route,
)
from retnet.serve.metrics import ServeMetrics
from retnet.serve.pooling import PoolingEngine
from retnet.serve.protocol import (
    REQUEST_ID_MAX_CHARS,
    TOKENIZE_FORMS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
)
from retnet.serve.response_store import ResponseStore
from retnet.serve.responses import ResponsesRequest, ResponsesServing
from retnet.serve.score import RERANK_ROUTES, SCORE_ROUTES, RerankRequest, ScoreRequest, ScoreServing
from retnet.serve.serving import OpenAIServing, json_built
from retnet.serve.session_store import check_session_id
from retnet.serve.settings import (
    ServeSettings,
    StartupError,
    check_classifier_settings,
    check_device_settings,
    check_model_dir,
    check_quantization_settings,
    generation_defaults,
    is_classifier,
    load_chat_template,
    override_source,
    resolve_draft_model,
    resolve_model_source,
)
from retnet.serve.state_cache import SessionBusy
from retnet.serve.streaming import unless_disconnected

logger = logging.getLogger("retnet.serve")

# vLLM's tokenizer routes, outside /v1 as in vLLM, behind the same API key.
TOKENIZER_ROUTES = ("/tokenize", "/detokenize")
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", *ANTHROPIC_ROUTES)
ROUTES = (*GENERATION_ROUTES, "/v1/responses/{response_id}/input_items", "/v1/responses/{response_id}",
          "/v1/models", "/v1/models/{model_id}", "/v1/sessions/{session_id}", "/health", "/ping", "/version", "/metrics",
          *TOKENIZER_ROUTES, "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
          *POOLING_ROUTES, *EMBEDDING_ROUTES, *SCORE_ROUTES, *RERANK_ROUTES)
# Routes whose `input` is the completions' `prompt` union (the Responses API's `input` is not).
_INPUT_ROUTES = (*POOLING_ROUTES, *EMBEDDING_ROUTES)
# Routes with an id in the path, counted by their template (one label per route, not per id).
# A model id may hold "/" (an HF id); a session's route takes any path, "" and "a/b" included, for check_session_id's
# 400 (`{session_id:any}`), and a response's any id (a request_id is any string); the other ids are one path segment.
# (the first template that matches names the route: a response's input_items before the response)
_ANY = "(?s:.*)"
_ID_PATTERNS = {"{model_id}": ".+", "{session_id}": _ANY, "{response_id}": _ANY}
_ROUTE_TEMPLATES = tuple((re.compile("^" + re.sub(r"\{\w+\}", lambda m: _ID_PATTERNS.get(m[0], "[^/]+"), route) + "$"),
                          route)
                         for route in ROUTES if "{" in route)
# pydantic's names for union members in an error's location; they are not fields.
_TYPE_LOCS = {"str", "int", "float", "bool", "list", "dict", "none"}


class _AnyConvertor(Convertor[str]):
    """A route parameter of any text, "/" and newlines included (Starlette's ``path`` is ``.*``)."""

    regex = _ANY

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return str(value)


register_url_convertor("any", _AnyConvertor())


def create_app(settings: ServeSettings | None = None, *, model=None, tokenizer=None) -> FastAPI:
    """Build the app for ``settings`` (read from ``RETNET_*`` variables when None). ``model`` and
    ``tokenizer`` may be given already loaded (tests); otherwise they load from ``settings.model``, the
    model in the scheduler thread (``/health`` is 503 until it is ready). A classifier or reward model
    (``*ForSequenceClassification``) gets the classification app: /classify and /pooling, no generation;
    ``--convert embed`` the embedding app (any export's backbone): /v1/embeddings and /pooling. Both serve vLLM's
    /score and /rerank (:mod:`retnet.serve.score`)."""
    settings = settings or ServeSettings()
    check_quantization_settings(settings)  # before a hub download or anything else
    check_device_settings(settings)
    if model is None:  # a directory this server cannot serve is refused before anything loads from it
        settings = resolve_model_source(settings)
        classifier = check_model_dir(settings.model)
    else:
        # The class says what the model is: AutoModelForSequenceClassification.from_pretrained(an LM's export)
        # keeps the LM's `architectures` in its config. The config decides for a wrapper (torch.compile's, ...).
        kind = type(model).__name__
        if kind.endswith(("ForSequenceClassification", "ForCausalLM")):
            classifier = is_classifier([kind])
        else:
            classifier = is_classifier(getattr(model.config, "architectures", None) or [kind])
    mode = "embed" if settings.convert == "embed" else "classify" if classifier else "generate"
    if mode == "generate":
        defaults = generation_defaults(settings)
        # A draft model is checked against the target before either loads (the engine loads both).
        settings = resolve_draft_model(settings, model.config if model is not None else None)
    else:
        check_classifier_settings(settings, mode)
    chat_template = load_chat_template(settings.chat_template)
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(settings.model)
        except Exception as exc:  # no tokenizer files, or ones that do not load
            if not holds_tokenizer(Path(settings.model)):
                # transformers' own message asked to install sentencepiece or tiktoken, for a missing file
                raise StartupError(f"--model {settings.model!r} holds no tokenizer (tokenizer.json, "
                                   "tokenizer_config.json): save it beside the model, tokenizer.save_pretrained(DIR), "
                                   "as retnet-train's export does") from None
            raise StartupError(f"--model {settings.model!r}: the tokenizer did not load: "
                               f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
    metrics = ServeMetrics()
    if mode != "generate":
        engine = PoolingEngine(settings, metrics, model=model)
        serving = (EmbedServing if mode == "embed" else ClassifyServing)(settings, engine, tokenizer, metrics,
                                                                         chat_template)
    else:
        engine = Engine(settings, tokenizer, metrics, model=model)
        serving = OpenAIServing(settings, engine, tokenizer, metrics, defaults, chat_template)
        _log_defaults(settings, serving, defaults)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            # uvicorn has already let open streams finish (timeout_graceful_shutdown); cancel what is left. Also when
            # the block ends by an exception (run_batch's broken pipe or Ctrl-C): a scheduler thread left running
            # the model as the interpreter exits aborts it ("terminate called without an active exception", 134).
            engine.shutdown(grace_s=0.0)

    # strict_content_type=False: a body without a Content-Type is read as JSON (other types: require_json).
    release = package_version()  # (a scan of the installed distributions: once)
    app = FastAPI(title="retnet-serve", version=release, lifespan=lifespan, strict_content_type=False)
    # vLLM's --root-path (an attribute: FastAPI's argument is deprecated for uvicorn's, which would take requests with
    # the prefix no more): /docs asks for the schema under it, and the routes are matched with or without it.
    app.root_path = settings.root_path
    app.state.settings, app.state.engine, app.state.serving, app.state.metrics = settings, engine, serving, metrics

    def require_api_key(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        anthropic = is_anthropic_route(_route_path(request.scope))
        if anthropic and not (scheme.lower() == "bearer" and key):  # the Anthropic SDK's header
            scheme, key = "bearer", request.headers.get("x-api-key", "")
        ok = False
        if scheme.lower() == "bearer" and key:
            for allowed in settings.api_keys:  # every key compared: the time says nothing about which matched
                ok |= hmac.compare_digest(key.strip().encode(), allowed.encode())
        if not ok:
            how = "`x-api-key: <key>` or `Authorization: Bearer <key>`" if anthropic else "`Authorization: Bearer <key>`"
            raise APIError(401, f"missing or invalid API key: send {how}", "authorization",
                           "invalid_api_key", type="authentication_error")

    def key_refusal(request: Request) -> JSONResponse | None:
        """The 401 a request to a keyed route without a valid key gets, whatever else is wrong with it; None
        when it has the key or its route needs none."""
        if not _needs_key(_route_path(request.scope)):
            return None
        try:
            require_api_key(request)
        except APIError as denied:
            return _error(denied.status, denied.message, denied.param, denied.code, denied.type, denied.headers,
                          path=_route_path(request.scope))
        return None

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.enable_request_id_headers:  # inside CORS and the metrics: the refusal is an answer like the others
        app.add_middleware(RequestIdLimitMiddleware)
    # Before routing (inside the metrics: counted), as vLLM's key check: a keyless request to any keyed path, unknown
    # or of another method, is a 401, not the router's 404, 405 or trailing-slash redirect, which told a client
    # without the key which routes exist. Outside the body and X-Request-Id limits and the body's validation, so its
    # 401 wins over their 400s and 413s: a client without the key learns nothing of its body or of the limits.
    app.add_middleware(ApiKeyMiddleware, key_refusal=key_refusal)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    # Outermost (vLLM's, always on): a browser's preflight is answered here, before the key check (a preflight
    # carries no key) and the routes (their 405); every answer, a 401 or 413 included, carries the CORS headers.
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=settings.allowed_methods,
                       allow_headers=settings.allowed_headers, allow_credentials=settings.allow_credentials)
    _install_error_handlers(app)
    if settings.enable_request_id_headers:
        # Around Starlette's own outermost layer too, which answers the 500s: app.add_middleware goes inside it.
        build_stack = app.build_middleware_stack
        app.build_middleware_stack = lambda: RequestIdMiddleware(build_stack())
    auth = [Depends(require_api_key)]
    json_body = [*auth, Depends(require_json)]

    @app.get("/health")
    async def health() -> Response:
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        status = "failed" if engine.dead else ("stopping" if engine.stopping or not engine.accepting else "loading")
        return JSONResponse({"status": status, "detail": engine.dead}, status_code=503)

    # vLLM's (SageMaker's health check, which may POST): /health's answer. Like /health, no API key.
    app.get("/ping")(health)
    app.post("/ping")(health)  # a route of its own: one route of both methods is one OpenAPI operation id, twice

    @app.get("/version")
    async def version() -> dict:
        return {"version": release}

    @app.get("/metrics")
    async def prometheus() -> Response:
        if mode == "generate":
            metrics.sessions.set(len(engine.sessions))
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return serving.models()

    # ``path``: a served name may contain "/" (an HF id, the model directory), as the client sends it.
    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def retrieve_model(model_id: str):
        if not model_id.strip("/"):  # /v1/models/ matches here with no id: it is the list, not the first card
            return serving.models()
        return serving.model(model_id)

    @app.post("/tokenize", dependencies=json_body)
    async def tokenize(request: TokenizeRequest):
        return await serving.tokenize(request)

    @app.post("/detokenize", dependencies=json_body)
    async def detokenize(request: DetokenizeRequest):
        return await serving.detokenize(request)

    if mode == "embed":
        _add_embed_routes(app, serving, auth, json_body)
    elif mode == "classify":
        _add_classify_routes(app, serving, auth, json_body)
    else:
        _add_generation_routes(app, settings, serving, engine, auth, json_body)
    return app


def _not_an_embedding_model(app: FastAPI, serving: OpenAIServing, what: str, auth: list) -> None:
    """/v1/embeddings on a server of another mode: 400 saying how to serve embeddings."""

    async def not_embedding():
        raise APIError(400, f"the model {serving.model_name!r} is served as {what}; /v1/embeddings is served by an "
                       "embedding server: start retnet-serve with --convert embed (the model's backbone, its pooled "
                       "hidden states)", None, "model_not_embedding")

    for path in EMBEDDING_ROUTES:
        app.post(path, dependencies=auth)(not_embedding)


def _add_generation_routes(app: FastAPI, settings: ServeSettings, serving: OpenAIServing, engine: Engine, auth: list,
                           json_body: list) -> None:
    """A language model's routes: completions, chat, the Responses API, sessions and runtime LoRA loading; the
    pooling routes answer 400."""
    # OpenAI's Responses API, translated onto the chat handler; finished responses kept for previous_response_id.
    responses = ResponsesServing(serving, ResponseStore(settings.responses_store_entries, settings.responses_store_bytes))

    @app.post("/v1/completions", dependencies=json_body)
    async def completions(request: CompletionRequest, raw: Request):
        return await serving.completions(request, raw)

    @app.post("/v1/chat/completions", dependencies=json_body)
    async def chat_completions(request: ChatCompletionRequest, raw: Request):
        return await serving.chat(request, raw)

    @app.post("/v1/responses", dependencies=json_body)
    async def create_response(request: ResponsesRequest, raw: Request):
        return await responses.create(request, raw)

    # Anthropic's Messages API, translated onto the chat handler (its errors are Anthropic's body: _error's path).
    messages = MessagesServing(serving)

    @app.post("/v1/messages", dependencies=json_body)
    async def create_message(request: MessagesRequest, raw: Request):
        return await messages.create(request, raw)

    @app.post("/v1/messages/count_tokens", dependencies=json_body)
    async def count_message_tokens(request: CountTokensRequest):
        return await messages.count_tokens(request)

    # :any: a response's id is its request_id, any string as in vLLM: one holding "/" was stored but answered the
    # router's 404. input_items is matched first, so that its path is not taken for an id ending in "/input_items".
    @app.get("/v1/responses/{response_id:any}/input_items", dependencies=auth)
    async def list_input_items(response_id: str, limit: int = Query(20, ge=1, le=100),
                               order: Literal["asc", "desc"] = "desc", after: str | None = None):
        return responses.input_items(response_id, limit, order, after)

    @app.get("/v1/responses/{response_id:any}", dependencies=auth)
    async def retrieve_response(response_id: str):
        return responses.retrieve(response_id)

    @app.delete("/v1/responses/{response_id:any}", dependencies=auth)
    async def delete_response(response_id: str):
        return responses.delete(response_id)

    if settings.allow_runtime_lora_updating:  # as in vLLM, the routes exist only when allowed
        logger.warning("Runtime LoRA updating is enabled (--allow-runtime-lora-updating or "
                       "VLLM_ALLOW_RUNTIME_LORA_UPDATING): /v1/load_lora_adapter reads any directory of the server "
                       "a client names. This is risky in production: allow it only where every client is trusted.")

        # vLLM's answers are plain text, not JSON.
        @app.post("/v1/load_lora_adapter", dependencies=json_body, response_class=PlainTextResponse)
        async def load_lora_adapter(request: LoadLoraAdapterRequest):
            return PlainTextResponse(await serving.load_lora_adapter(request))

        @app.post("/v1/unload_lora_adapter", dependencies=json_body, response_class=PlainTextResponse)
        async def unload_lora_adapter(request: UnloadLoraAdapterRequest):
            return PlainTextResponse(serving.unload_lora_adapter(request))

    # :any: an id with "/" (a%2Fb, decoded before routing) or none reaches check_session_id's 400, not the router's
    # 404 (:path's ".*" would match "abc\n" as "abc", its "$" before a trailing newline: another session's DELETE)
    @app.delete("/v1/sessions/{session_id:any}", dependencies=auth)
    async def delete_session(session_id: str):
        check_session_id(session_id)
        # One past --session-ttl-s is gone (404), as a request finds it, even before the scheduler's next expiry
        engine.sessions.expire()
        try:  # --session-dir: its file goes first (a file that cannot be removed: 500, the session kept)
            deleted = await engine.sessions.remove(session_id)
        except SessionBusy:  # the same answer as a second request on it
            raise APIError(409, f"session {session_id!r} is in use by a request", "session_id",
                           "session_busy") from None
        if not deleted:
            raise APIError(404, f"no session {session_id!r}", "session_id", "session_not_found")
        return {"id": session_id, "object": "session", "deleted": True}

    async def not_a_classifier():
        raise APIError(400, f"the model {serving.model_name!r} is a language model: it generates text and has no "
                       "classification head; /classify and /pooling are served for a RetNetForSequenceClassification "
                       "export (retnet-train --reward.enabled, or a classifier's save_pretrained)", None,
                       "model_not_classifier")

    for path in POOLING_ROUTES:
        app.post(path, dependencies=auth)(not_a_classifier)
    _not_an_embedding_model(app, serving, "a language model (it generates text)", auth)

    async def not_a_scorer():
        raise APIError(400, f"the model {serving.model_name!r} is a language model: it generates text and gives no "
                       "score to a pair; /score and /rerank are served for a reward model or a classifier of one "
                       "label (a RetNetForSequenceClassification export), or an embedding model (--convert embed)",
                       None, "model_not_scorer")

    for path in (*SCORE_ROUTES, *RERANK_ROUTES):
        app.post(path, dependencies=auth)(not_a_scorer)


def _add_classify_routes(app: FastAPI, serving: ClassifyServing, auth: list, json_body: list) -> None:
    """A classifier's routes (vLLM's pooling API); the generation routes answer 400."""

    @app.post("/classify", dependencies=json_body)
    @app.post("/v1/classify", dependencies=json_body)
    async def classify(request: ClassifyRequest, raw: Request):
        return JSONResponse((await unless_disconnected(serving.classify(request), raw)).model_dump())

    @app.post("/pooling", dependencies=json_body)
    async def pooling(request: PoolingRequest, raw: Request):
        return JSONResponse((await unless_disconnected(serving.pooling(request), raw)).model_dump())

    _add_score_routes(app, ScoreServing(serving), json_body)

    async def not_generative():
        raise APIError(400, f"this server serves the classifier {serving.model_name!r}, which scores text and cannot "
                       "generate: use POST /classify (labels and probabilities) or /pooling (the raw scores)", None,
                       "model_not_generative")

    for path in GENERATION_ROUTES:
        app.post(path, dependencies=auth)(not_generative)
    _not_an_embedding_model(app, serving, "a classifier (it scores text: /classify, /pooling)", auth)


def _add_embed_routes(app: FastAPI, serving: EmbedServing, auth: list, json_body: list) -> None:
    """An embedding server's routes (``--convert embed``): OpenAI's /v1/embeddings and vLLM's /pooling; the
    classification and generation routes answer 400."""

    # 1024 embeddings of 2048 floats are 40 MB of JSON, 4 s of json.dumps: written off the event loop (json_built).
    @app.post("/v1/embeddings", dependencies=json_body)
    async def embeddings(request: EmbeddingRequest, raw: Request):
        result = await unless_disconnected(serving.embeddings(request), raw)
        return await json_built(_pooled_size(result), result.model_dump)

    @app.post("/pooling", dependencies=json_body)
    async def pooling(request: PoolingRequest, raw: Request):
        result = await unless_disconnected(serving.pooling(request), raw)
        return await json_built(_pooled_size(result), result.model_dump)

    _add_score_routes(app, ScoreServing(serving), json_body)

    async def not_a_classifier():
        raise APIError(400, f"this server serves {serving.model_name!r} as an embedding model (--convert embed), "
                       "which has no classification head here: use POST /v1/embeddings or /pooling", None,
                       "model_not_classifier")

    async def not_generative():
        raise APIError(400, f"this server serves {serving.model_name!r} as an embedding model (--convert embed), "
                       "which does not generate: use POST /v1/embeddings or /pooling (the embeddings)", None,
                       "model_not_generative")

    for path in ("/classify", "/v1/classify"):
        app.post(path, dependencies=auth)(not_a_classifier)
    for path in GENERATION_ROUTES:
        app.post(path, dependencies=auth)(not_generative)


def _pooled_size(result) -> int:
    """The values a pooling response's rows list (an embedding's floats; base64 text counts as none)."""
    return sum(len(row) for item in result.data
               for row in (getattr(item, "embedding", None), getattr(item, "data", None)) if isinstance(row, list))


def _add_score_routes(app: FastAPI, scoring: ScoreServing, json_body: list) -> None:
    """vLLM's score and rerank routes, on a classifier's or an embedding model's server."""

    async def score(request: ScoreRequest, raw: Request):
        return JSONResponse((await unless_disconnected(scoring.score(request), raw)).model_dump())

    async def rerank(request: RerankRequest, raw: Request):
        return JSONResponse((await unless_disconnected(scoring.rerank(request), raw)).body())

    for path in SCORE_ROUTES:
        app.post(path, dependencies=json_body)(score)
    for path in RERANK_ROUTES:
        app.post(path, dependencies=json_body)(rerank)


def _log_defaults(settings: ServeSettings, serving: OpenAIServing, defaults: dict) -> None:
    """Say at startup which request defaults the generation config set (vLLM logs the same), each with where it
    came from: the model's generation_config.json (which --generation-config vllm leaves out), or
    --override-generation-config (or its variable), which applies with vllm too. A --default-max-tokens that
    replaced the file's max_new_tokens is the server's own setting, named as such."""
    if defaults:
        overrides = settings.override_generation_config
        override = override_source(settings) if overrides else ""
        file = f"generation_config.json, --generation-config {settings.generation_config}"
        shown = {name: (value, override if overrides.get(name) is not None else file)
                 for name, value in serving.checks.sampling_defaults.items()}
        if "max_tokens" in defaults:
            # As requests get it: --default-max-tokens (when set) and --max-tokens-limit have their say.
            value, read = serving.checks.default_max_tokens, defaults["max_tokens"]
            if overrides.get("max_new_tokens") is not None:
                shown["max_tokens"] = (value, f"{override}'s max_new_tokens")
            elif "default_max_tokens" in settings.model_fields_set:
                shown["max_tokens"] = (value, f"--default-max-tokens, over generation_config.json's max_new_tokens "
                                              f"{read}")
            elif value != read:
                shown["max_tokens"] = (value, f"{file}: its max_new_tokens {read}, lowered to --max-tokens-limit")
            else:
                shown["max_tokens"] = (value, f"{file}: its max_new_tokens")
        from_file = any(source.startswith("generation_config.json") for _, source in shown.values())
        way_out = "; start with --generation-config vllm to leave out generation_config.json's" if from_file else ""
        logger.warning("Default sampling parameters have been overridden: %s. Requests that leave these out get "
                       "them%s.", ", ".join(f"{name}={value} ({source})" for name, (value, source) in shown.items()),
                       way_out)
    if settings.chat_template is not None:
        logger.info("chat template: --chat-template's, instead of the tokenizer's")


def _is_json_media(content_type: str | None) -> bool:
    """Whether a request's Content-Type sends JSON (none at all is read as JSON)."""
    if content_type is None:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def require_json(request: Request) -> None:
    """A body sent as another type (``curl -d`` alone sends a form) is 415 naming the header, not a
    "must be a JSON object" error about a body that is one."""
    content_type = request.headers.get("content-type")
    if not _is_json_media(content_type):
        raise APIError(415, f"the request body must be JSON sent with `Content-Type: application/json`; got "
                       f"Content-Type {content_type!r}", "content-type", "unsupported_media_type")


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------
def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           type: str | None = None, headers: dict | None = None, path: str = "") -> JSONResponse:
    """OpenAI's error body, or Anthropic's for a request to ``path`` on the Messages API's routes."""
    if is_anthropic_route(path):
        return error_response(status, message, headers)
    exc = APIError(status, message, param, code, type)
    return JSONResponse(exc.body(), status_code=status, headers=headers)


def package_version() -> str:
    """retnet-stack's installed version; the source tree's (``retnet.__version__``) where it runs uninstalled."""
    try:
        return importlib.metadata.version("retnet-stack")
    except importlib.metadata.PackageNotFoundError:
        import retnet

        return retnet.__version__


def _route_path(scope) -> str:
    """The path the routes match (as Starlette's router reads it): without --root-path's prefix where a proxy passed
    it on, so that the key, the error body and the metrics label are the route's."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def _needs_key(path: str) -> bool:
    """Whether ``path`` is behind ``--api-keys``: /v1 and vLLM's routes outside it (/health and /metrics are not)."""
    # (a trailing slash too: the router redirects /tokenize/ to the keyed /tokenize)
    path = path.rstrip("/") or "/"
    return path.startswith("/v1/") or path in (*TOKENIZER_ROUTES, *POOLING_ROUTES, *SCORE_ROUTES, *RERANK_ROUTES)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.type, exc.headers, path=_route_path(request.scope))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        path = _route_path(request.scope)
        return _error(400, *_describe_validation(exc.errors(), "input" if path in _INPUT_ROUTES else "prompt"),
                      path=path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        code = None
        if exc.status_code == 400 and "parsing the body" in message:
            message, code = _unreadable_body(exc.__cause__), "invalid_json"
        return _error(exc.status_code, message, None, code, headers=getattr(exc, "headers", None),
                      path=_route_path(request.scope))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: say so without leaking internals
        if isinstance(exc, ClientDisconnect):  # an ASGI 2.4 server's send failed: the client left, no bug
            logger.info("client disconnected before the response was sent")
            return _error(499, "client closed the request", None, "client_closed", path=_route_path(request.scope))
        logger.exception("unhandled error")
        return _error(500, f"internal error ({type(exc).__name__})", None, "internal_error", "server_error",
                      path=_route_path(request.scope))


def _unreadable_body(cause: BaseException | None) -> str:
    """Why json.loads could not read a body FastAPI passed on as "an error parsing the body": the client fixes
    the encoding or the number, not JSON it already sends correctly (nesting is BodyLimitMiddleware's)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, ValueError):  # Python's limit on an integer's digits (int_max_str_digits)
        return f"the request body's JSON could not be read: {str(cause).split(';')[0]}"
    return "the request body could not be read as UTF-8 JSON"


def _is_union_member(part) -> bool:
    return isinstance(part, str) and (part in _TYPE_LOCS or "[" in part or "(" in part)


def _most_specific(errors) -> dict:
    """The first error, or where it is one member of a union failing (``content`` is not a string), the
    deepest error of the same field: the member the value was meant as (a list of parts whose part 1 has
    no ``type``), not the first member tried."""
    first = errors[0]
    loc = list(first.get("loc", ()))
    cut = next((i for i, part in enumerate(loc) if _is_union_member(part)), None)
    if cut is None:
        return first
    same_field = [e for e in errors if list(e.get("loc", ()))[:cut] == loc[:cut]]
    return max(same_field, key=lambda e: len(e.get("loc", ())))  # max keeps the first of the longest


def _describe_validation(errors, prompt_field: str = "prompt") -> tuple[str, str | None, str]:
    """(message, param, code) for the first problem pydantic found, naming the field. ``prompt_field``: the field
    that holds the completions' prompt union (strings or token ids) in this route's request."""
    if not errors:
        return "invalid request", None, "invalid_request"
    first = _most_specific(errors)
    loc = list(first.get("loc", ()))
    # FastAPI's first part says where the field was sent, which is no part of its name (a query string's `limit`
    # is `limit`); only the first: a body field may be named `query` (rerank's).
    if loc and loc[0] in ("query", "path"):
        loc = loc[1:]
    loc = [part for part in loc if part != "body"]
    # /tokenize's form (no request has a field of that name) leads the location: it is no part of the param.
    tokenize_form = bool(loc) and loc[0] in TOKENIZE_FORMS
    if tokenize_form:
        loc = loc[1:]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})", None, "invalid_json"
    if not loc:
        if first.get("type") == "string_unicode":  # pydantic could not read a key: the body is an object all the same
            return ("a key of the request body is a lone UTF-16 surrogate (a string cut inside a surrogate pair?)",
                    None, "invalid_unicode")
        if first.get("type") == "missing":
            return "the request needs a JSON object body", None, "invalid_request"
        return f"the request body must be a JSON object: {first.get('msg')}", None, "invalid_request"
    if first.get("type") == "invalid_unicode":  # its message names the place inside the field
        return first.get("msg"), first["ctx"]["where"], "invalid_unicode"
    path = [part for part in loc if not _is_union_member(part)]
    # OpenAI's form: ``messages[0].role``, list indices in brackets.
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
    if path and path[0] == prompt_field and not tokenize_form:  # /tokenize's prompt is a string alone
        param = prompt_field
        message = (f"{prompt_field} must be a string, a list of strings, a list of token ids or a list of lists of "
                   "token ids")
    else:
        message = f"{param}: {first.get('msg')}"
        if "input" in first and first.get("type") != "missing":
            received = repr(first["input"])
            message += f" (got {received[:80]})"
    return message, param, first.get("type", "invalid_value")


# ----------------------------------------------------------------------------------------------------------
# Middleware (pure ASGI: they must not buffer streaming responses)
# ----------------------------------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, and JSON nested deeper than ``MAX_JSON_DEPTH`` with 400, before the
    app sees them (the body is read here, at most ``max_bytes + 1`` bytes of it, and replayed to the app)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False
        content_type = headers.get(b"content-type")
        # Only what the routes read as JSON: another type is their 415 (a form's text may hold any brackets)
        if _is_json_media(None if content_type is None else content_type.decode("latin-1")) \
                and json_nested_deeper_than(body, MAX_JSON_DEPTH):
            response = _error(400, f"the request body's JSON is nested deeper than {MAX_JSON_DEPTH} levels", None,
                              "invalid_json", path=_route_path(scope))
            return await response(scope, receive, send)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = _error(413, f"the request body is larger than {self.max_bytes} bytes", None, "body_too_large",
                          path=_route_path(scope))
        await response(scope, receive, send)


# Far beyond any real request (OpenAI's structured outputs allow 10 levels of schema nesting), and far below
# where the recursive code a body reaches (pydantic's validators, a chat template, the Responses store's
# deepcopy) runs out of Python's stack: a RecursionError there was a 500, or no answer, after the model had run.
MAX_JSON_DEPTH = 128
# A string left open runs to the end (as does one ending in a lone backslash), so every match succeeds on its first,
# greedy try: a body of unclosed strings is scanned once, in linear time (a match that could fail would backtrack,
# and each of its quotes rescan the rest of the body). No possessive quantifiers: Python 3.10 has none.
_JSON_STRING = re.compile(rb'"(?:[^"\\]+|\\.)*(?:"|\\?\Z)', re.DOTALL)
_NOT_A_BRACKET = re.compile(rb"[^\[\]{}]+")


def json_nested_deeper_than(body: bytes, limit: int) -> bool:
    """Whether ``body``'s arrays and objects nest deeper than ``limit`` (brackets inside strings not counted)."""
    if body.count(b"{") + body.count(b"[") <= limit:  # the common case, without a scan (any encoding: a bracket
        return False  # is one of its bytes in UTF-16/32 too)
    encoding = json.detect_encoding(body)
    if encoding not in ("utf-8", "utf-8-sig"):
        # json.loads reads UTF-16 and UTF-32 bodies too, where an escaped quote is no longer two adjacent bytes:
        # scanned as UTF-8 the strings would end early, letting deep JSON through and refusing shallow JSON.
        try:
            body = body.decode(encoding).encode()
        except UnicodeDecodeError:
            return False  # json.loads refuses it, naming the encoding
    depth = 0
    for byte in _NOT_A_BRACKET.sub(b"", _JSON_STRING.sub(b"", body)):
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            return True
    return False


def _route(path: str) -> str:
    """The metrics label of ``path``: the route it calls (a template for one with an id), else ``other``."""
    if path in ROUTES:
        return path
    return next((route for pattern, route in _ROUTE_TEMPLATES if pattern.match(path)), "other")


class ApiKeyMiddleware:
    """With --api-keys, the 401 of a request without the key its path needs (``key_refusal``), answered before the
    router: whether the path is a route, or takes that method, is told only to a client with the key. An ``OPTIONS``
    passes, as in vLLM: a browser's preflight carries no key (CORS answers it, outside this)."""

    def __init__(self, app, key_refusal):
        self.app, self.key_refusal = app, key_refusal

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            denied = self.key_refusal(Request(scope))
            if denied is not None:
                return await denied(scope, receive, send)
        await self.app(scope, receive, send)


class RequestIdMiddleware:
    """vLLM's --enable-request-id-headers: every answer carries ``X-Request-Id``, the request's own, else a new
    one (also for one over ``REQUEST_ID_MAX_CHARS``, which :class:`RequestIdLimitMiddleware` refuses)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = Headers(scope=scope).get("x-request-id")
        request_id = sent if sent and len(sent) <= REQUEST_ID_MAX_CHARS else uuid.uuid4().hex

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequestIdLimitMiddleware:
    """With --enable-request-id-headers, an ``X-Request-Id`` over ``REQUEST_ID_MAX_CHARS`` is a 400 on every route,
    the limit completions and chat hold it to (their ids repeat it): echoed, a megabyte's id went back in the
    answer's headers of any route."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = Headers(scope=scope).get("x-request-id")
        if sent is None or len(sent) <= REQUEST_ID_MAX_CHARS:
            return await self.app(scope, receive, send)
        response = _error(400, f"X-Request-Id: at most {REQUEST_ID_MAX_CHARS} characters; got {len(sent)}",
                          "X-Request-Id", path=_route_path(scope))
        await response(scope, receive, send)


class MetricsMiddleware:
    """Count requests by route and status code."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = _route(_route_path(scope))
        status = {"code": None}

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
            # Returned without a response: the client left before one was due (BodyLimitMiddleware heard it hang up
            # while sending its body), no server error: counted as the app's own client_closed answer.
            if status["code"] is None:
                status["code"] = 499
        finally:
            # An exception before a response is a server error: the outer error handler answers it 500.
            self.metrics.requests.labels(route, str(status["code"] or 500)).inc()


__all__ = ["create_app"]
