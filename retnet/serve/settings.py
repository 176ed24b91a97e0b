"""Server settings: command-line flags and ``RETNET_*`` environment variables (pydantic-settings).

Every limit the server enforces is here, so an operator can read in one place what a request may ask for.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServeSettings(BaseSettings):
    """What ``retnet-serve`` reads from flags (``--max-running 32``) or the environment (``RETNET_MAX_RUNNING=32``)."""

    model_config = SettingsConfigDict(env_prefix="RETNET_", extra="ignore")

    # -- model and network ------------------------------------------------------------------------------------
    model: str = Field(description="directory written by save_pretrained (config.json, model.safetensors, "
                       "tokenizer), or a hub id (org/name), fetched into the HF cache")
    # NoDecode: as api_keys' (RETNET_SERVED_MODEL_NAME=123 is the name "123", as the flag's is).
    served_model_name: Annotated[list[str] | None, NoDecode] = Field(
        None, description="the name clients pass as `model` (default: the directory's name, or the hub id as given); "
        "several (vLLM's --served-model-name a b, or RETNET_SERVED_MODEL_NAME='[\"a\", \"b\"]'): a request may "
        "name the model by any of them, responses carry the first"
    )
    revision: str | None = Field(None, description="of a hub id --model: the branch, tag or commit (default main)")
    download_dir: str | None = Field(None, description="where hub ids are downloaded (default: the HF cache, "
                                     "HF_HUB_CACHE)")
    # The hub id --model named, once resolve_model_source replaced it by its snapshot's path (not a flag): a
    # request may still name the base model by it, as by a directory's path.
    _hub_id: str | None = PrivateAttr(None)
    _resolved: bool = PrivateAttr(False)  # resolve_model_source's output (run_batch resolves, then create_app)
    convert: Literal["auto", "embed"] = Field(
        "auto", description="what the model is served as (two of vLLM's --convert values; its none, classify and "
        "reward are not served): auto: as its export says (a causal LM generates, a *ForSequenceClassification export "
        "classifies); embed: an embedding model, the backbone's pooled hidden states on /v1/embeddings and /pooling "
        "(a causal LM's or a classifier's export)"
    )
    pooler_config: dict[str, Any] | str | None = Field(
        None, description="with --convert embed, how hidden states become an embedding (vLLM's --pooler-config "
        "JSON): {\"pooling_type\": \"LAST\" (the last token's) or \"MEAN\" (the tokens' mean), \"normalize\": true "
        "(L2) or false, the default of a request's use_activation}; none or {}: LAST, normalized"
    )
    host: str = Field("127.0.0.1", description="the address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="the TCP port to listen on")
    root_path: str = Field(
        "", description="the path prefix a reverse proxy serves the API under (vLLM's --root-path), e.g. /llm: /docs "
        "asks for its schema there, and requests are answered with the prefix or without it (a proxy that strips it)")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:1 ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype; auto: float32 on CPU, bfloat16 on CUDA (states stay float32)"
    )
    quantization: Literal["none", "int8"] = Field(
        "none", description="weight-only quantization applied once the model is loaded (vLLM's --quantization): "
        "int8: the decoder layers' Linear weights held as int8, one scale per output channel (torchao; a quarter of "
        "their float32 bytes, half of bfloat16's), the embeddings and lm_head kept in --dtype; needs torchao (pip "
        "install 'retnet-stack[quant]'); LoRA and DoRA adapters are served on it. none: the weights as loaded"
    )
    # NoDecode: the variable's text reaches the validator as the flag's does. pydantic-settings read it as JSON
    # first: RETNET_API_KEYS=123456 became the number (refused, where --api-keys 123456 is a key), and
    # RETNET_API_KEYS=null no key at all (auth off, where --api-keys null is the key "null").
    api_keys: Annotated[list[str] | str, NoDecode] = Field(default_factory=list,
                                      description="accepted `Authorization: Bearer` keys; empty: vLLM's "
                                      "VLLM_API_KEY when set, else no auth")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="the server's and uvicorn's log level (any case)")
    # CORS (vLLM's flags and defaults): a browser's preflight (OPTIONS) is answered, and its cross-origin requests
    # may read the answers. NoDecode: as api_keys' (a JSON list, as vLLM's flags take, or a comma list).
    allowed_origins: Annotated[list[str] | str, NoDecode] = Field(
        default_factory=lambda: ["*"], description="CORS: the origins browsers may call the API from (a JSON list or "
        "a comma list, e.g. '[\"https://app.example\"]'); * any")
    allowed_methods: Annotated[list[str] | str, NoDecode] = Field(
        default_factory=lambda: ["*"], description="CORS: the methods a cross-origin request may use; * any")
    allowed_headers: Annotated[list[str] | str, NoDecode] = Field(
        default_factory=lambda: ["*"], description="CORS: the headers a cross-origin request may send; * any")
    allow_credentials: bool = Field(False, description="CORS: cross-origin requests may carry cookies and "
                                    "Authorization (Access-Control-Allow-Credentials)")
    enable_request_id_headers: bool = Field(False, description="vLLM's: every response, an error's included, "
                                            "carries an X-Request-Id header: the request's, else a new one")

    # -- scheduling -------------------------------------------------------------------------------------------
    max_running: int = Field(64, ge=1, description="sequences decoded together in one batched recurrent step")
    max_queue: int = Field(256, ge=0, description="sequences waiting for a slot; beyond it requests get 429 (a "
                           "classifier's or embedding model's: the /classify, /pooling and /v1/embeddings requests "
                           "being answered, at least 1)")
    prefill_chunk_tokens: int = Field(512, ge=1, description="a prompt is prefilled in pieces of this many tokens")
    prefill_token_budget: int = Field(2048, ge=1, description="prompt tokens prefilled between two decode steps; "
                                      "a classifier's or embedding model's: the tokens of the inputs packed into one "
                                      "forward")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="vLLM's: fcfs serves requests in arrival order (a request's non-zero `priority` is a "
        "400); priority serves the lowest `priority` first (ties in arrival order), preempting running sequences "
        "of a worse priority when every slot is taken: a preempted sequence keeps its recurrent state and resumes "
        "where it stopped, nothing recomputed (at most --max-running of them held at once)"
    )
    retry_after_s: int = Field(1, ge=0, description="the Retry-After header sent with 429")
    shutdown_grace_s: float = Field(10.0, ge=0, allow_inf_nan=False, description="on shutdown (SIGTERM), the "
                                    "requests in flight get this long to finish; those left are then answered 503 "
                                    "`unavailable` (a stream: its error event and [DONE])")

    # -- request limits ---------------------------------------------------------------------------------------
    max_prompt_tokens: int = Field(8192, ge=1, description="most tokens a prompt may have (a longer one is a 400 "
                                   "context_length_exceeded); with --max-tokens-limit it makes the card's max_model_len")
    max_tokens_limit: int = Field(4096, ge=1, description="largest `max_tokens` a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="`max_tokens` when a request leaves it out")
    max_n: int = Field(8, ge=1, description="largest `n` (choices per prompt) a request may ask for")
    max_prompts: int = Field(16, ge=1, description="prompts in one /v1/completions request")
    max_stop: int = Field(4, ge=0, description="stop strings per request (OpenAI's limit is 4)")
    max_stop_chars: int = Field(64, ge=1, description="longest stop string (and bad word), in characters")
    max_logprobs: int = Field(20, ge=0, description="top alternatives per token a request may ask for: "
                              "`logprobs`, `top_logprobs` (OpenAI's limit) and `prompt_logprobs` (vLLM's default)")
    return_tokens_as_token_ids: bool = Field(
        False, description="vLLM's: logprobs name each token as 'token_id:<id>', not as its text, unless a request "
        "sets return_tokens_as_token_ids itself")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body; a larger one is a 413")
    max_pooling_inputs: int = Field(1024, ge=1, description="inputs in one /classify, /pooling or "
                                    "/v1/embeddings request (a classifier --model, --convert embed)")

    # -- state reuse ------------------------------------------------------------------------------------------
    prefix_cache_entries: int = Field(64, ge=0, description="saved prompt-prefix states (LRU); 0 turns the cache off")
    prefix_cache_bytes: int = Field(1 << 30, ge=0, description="bytes the prefix cache holds: each entry's state and logits")
    prefix_cache_min_tokens: int = Field(4, ge=1, description="shorter prefixes are not worth an entry")
    prefix_cache_answers: bool = Field(
        True, description="also keep the state after each finished answer (its prompt and generated tokens), so a "
        "chat's next turn or a Responses continuation prefills only its new tokens; off: prompts' states alone (for "
        "single-turn traffic, whose answers nobody continues, the entries go to prompts)"
    )
    max_sessions: int = Field(256, ge=0, description="resumable sessions kept at once (LRU); 0 turns sessions off")
    session_bytes: int = Field(2 << 30, ge=0, description="bytes the sessions held in memory may take (LRU): "
                               "each session's state and the ids of the tokens it has seen")
    session_ttl_s: float = Field(1800.0, gt=0, allow_inf_nan=False, description="a session expires this long after its last use (its "
                                 "file in --session-dir, after its last turn was written)")
    session_dir: str | None = Field(
        None, description="keep every session's state in this directory too, one file a session rewritten after "
        "each turn: sessions outlive a restart, and --max-sessions / --session-bytes bound only the copies held in "
        "memory (one server a directory, created if missing, neither the model's nor an adapter's); none: sessions "
        "live in memory only"
    )
    responses_store_entries: int = Field(
        1024, ge=0, description="finished Responses API responses kept for GET and previous_response_id (LRU, in "
        "memory); 0 stores none"
    )
    responses_store_bytes: int = Field(
        256 << 20, ge=0, description="bound on the stored responses' size, as JSON (each counted with the whole "
        "conversation it continues); the least recently used go first"
    )

    # -- LoRA adapters (vLLM's flags) ---------------------------------------------------------------------------
    # NoDecode: as api_keys' (RETNET_LORA_MODULES=0, read as JSON, was a TypeError naming no setting).
    lora_modules: Annotated[list[str | dict] | str, NoDecode] = Field(
        default_factory=list, description="LoRA adapters served beside the base model, each under its own name: "
        "name=path (peft's save_pretrained directory) or vLLM's JSON {\"name\", \"path\", \"base_model_name\"}; "
        "a request's `model` picks one"
    )
    max_loras: int | None = Field(
        None, ge=1, description="distinct adapters running at once (vLLM's --max-loras); requests of another wait; "
        "none: every adapter loaded"
    )
    max_cpu_loras: int | None = Field(
        None, ge=1, description="adapters held loaded at once (vLLM's --max-cpu-loras); the others stay served and "
        "are read again from their directory when a request names them, the least recently used idle one evicted "
        "to make room; at least max_loras; none: every adapter stays loaded"
    )
    max_lora_rank: int = Field(16, ge=1, description="an adapter of a larger rank is refused, at startup or by "
                               "/v1/load_lora_adapter (vLLM's --max-lora-rank)")
    enable_lora: bool = Field(False, description="vLLM's flag, accepted so its command lines run: adapters are "
                              "served whenever lora_modules names some (or one is loaded at runtime)")
    allow_runtime_lora_updating: bool = Field(
        False, description="serve vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter, which load and "
        "unload adapters from the server's own filesystem while it runs (anyone who may call the API may then do "
        "so: meant for development); vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 turns it on too"
    )

    # -- speculative decoding (vLLM's flag) ----------------------------------------------------------------------
    speculative_config: dict[str, Any] | str | None = Field(
        None, description="speculative decoding, vLLM's --speculative-config JSON: n-gram prompt lookup, "
        "{\"method\": \"ngram\", \"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4, "
        "\"prompt_lookup_min\": 2}: each step a sequence proposes up to num_speculative_tokens tokens that "
        "followed the last earlier occurrence of its last n tokens (n from max down to min); or a draft model, "
        "{\"method\": \"draft_model\", \"model\": DIR or hub id, \"num_speculative_tokens\": 4}: a small "
        "RetNet with the same tokenizer proposes them greedily (\"revision\": a hub id's branch, tag or commit). "
        "Either way they are verified in the same forward; "
        "outputs are unchanged. none: off"
    )

    # -- model defaults and templating (vLLM's flags) ------------------------------------------------------------
    generation_config: str = Field(
        "auto", description="where requests that leave out temperature, top_p, top_k, min_p, repetition_penalty or "
        "max_tokens get them (vLLM's --generation-config): auto: the model directory's generation_config.json "
        "(max_new_tokens is max_tokens); vllm: the server's defaults, the file ignored; a directory: its "
        "generation_config.json"
    )
    # NoDecode: as api_keys' (RETNET_OVERRIDE_GENERATION_CONFIG=null passed as {}, where the flag's null is refused).
    override_generation_config: Annotated[dict[str, Any] | str, NoDecode] = Field(
        default_factory=dict, description="JSON object put over the generation config's fields (vLLM's "
        "--override-generation-config), e.g. '{\"temperature\": 0.5}'; applies with --generation-config vllm too"
    )
    chat_template: str | None = Field(
        None, description="a Jinja chat template, as a file or inline (vLLM's --chat-template), used instead of the "
        "tokenizer's own and of the built-in default; none: the tokenizer's"
    )
    chat_template_content_format: Literal["auto", "string", "openai"] = Field(
        "auto", description="how the chat template sees a message's content (vLLM's --chat-template-content-format): "
        "string: one text (a list of text parts joined by newlines); openai: a list of parts, "
        "[{\"type\": \"text\", \"text\": ...}] (a string is one part); auto: openai for a template that loops over "
        "a message's content, else string"
    )

    # -- tool calls -------------------------------------------------------------------------------------------
    tool_call_parser: Literal["hermes"] | None = Field(
        None, description="the model's own tool-call format, parsed out of its text to answer tool_choice "
        "'auto' (vLLM's --tool-call-parser): hermes (<tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>: "
        "Hermes, Qwen); none: 'auto' is refused"
    )
    enable_auto_tool_choice: bool = Field(
        False, description="vLLM's flag, accepted so its command lines run: 'auto' is answered whenever "
        "tool_call_parser is set; without one, an error"
    )
    exclude_tools_when_tool_choice_none: bool = Field(
        False, description="vLLM's: a request's tools are left out of the chat template when its tool_choice is "
        "'none' (by default they are rendered, as vLLM and OpenAI show them, and no call is made)"
    )

    @field_validator("api_keys", "allowed_origins", "allowed_methods", "allowed_headers", mode="before")
    @classmethod
    def _split_keys(cls, value, info):
        # RETNET_API_KEYS=a,b (a plain comma list) as well as JSON.
        if isinstance(value, str):
            return _api_keys_list(value) if info.field_name == "api_keys" else _split_list(value)
        if info.field_name == "api_keys" and isinstance(value, list):
            _check_key_types(value)
        if info.field_name == "api_keys" and isinstance(value, list):
            # The flag's several values (vLLM's --api-key k1 k2), each read as a single one is: `--api-keys k1,k2 k3`
            # is three keys. An item neither form splits stays as given, so that a blank one is still refused.
            return [key for item in value
                    for key in (_api_keys_list(item) if isinstance(item, str) and _is_list_text(item) else [item])]
        return value

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _served_names(cls, value):
        # One name (the flag's single value, or the variable's text: a name may hold commas), a JSON list from
        # RETNET_SERVED_MODEL_NAME, or the flag's several (nargs): None (the default name) or the names, deduplicated.
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.lstrip().startswith("[") else [value]
            except json.JSONDecodeError:  # "[beta] model": a name
                value = [value]
        if isinstance(value, list):
            names = [name for name in dict.fromkeys(value) if not isinstance(name, str) or name.strip()]
            if any(not isinstance(name, str) for name in names):
                raise ValueError(f"served_model_name (--served-model-name) must be names (strings); got "
                                 f"{json.dumps(value)[:120]}")
            return names or None
        return value

    @field_validator("api_keys", mode="after")
    @classmethod
    def _no_blank_keys(cls, value):
        # The header's key is compared stripped: a blank key would let "Authorization: Bearer  " in, and one with
        # spaces around it would match no header. A refusal names the key by its place: the keys are secrets.
        keys = [key.strip() for key in value]
        for number, key in enumerate(keys, start=1):
            if not key:
                raise ValueError(f"api_keys (--api-keys) must not hold a blank key; key {number} of {len(keys)} is "
                                 "blank")
            if (why := _unsendable_key(key)) is not None:
                raise ValueError(f"api_keys (--api-keys) key {number} of {len(keys)} {why}")
        return keys

    @field_validator("allowed_methods", mode="after")
    @classmethod
    def _methods_as_browsers_send(cls, value):
        # CORSMiddleware compares a preflight's Access-Control-Request-Method, which browsers send uppercase, to
        # these as text: --allowed-methods get,post refused every preflight (400 "Disallowed CORS method").
        return [method.strip().upper() for method in value]

    @field_validator("allowed_origins", mode="after")
    @classmethod
    def _origins_as_browsers_send(cls, value):
        # As the methods: a browser's Origin is scheme://host[:port], lowercase, without a path or its scheme's
        # default port, and is compared as text: https://App.example/ (a copied URL) matched no request.
        origins = []
        for origin in value:
            text = origin.strip()
            scheme, sep, rest = text.partition("://")
            if not sep:  # "*", or "null" (a sandboxed page's or a file's origin)
                origins.append(text)
                continue
            authority, slash, path = rest.partition("/")
            if slash and path:
                raise ValueError(f"allowed_origins (--allowed-origins): an origin is scheme://host[:port], without a "
                                 f"path; got {origin!r}")
            scheme, authority = scheme.lower(), authority.lower()
            default_port = {"http": ":80", "https": ":443"}.get(scheme)
            if default_port and authority.endswith(default_port):
                authority = authority.removesuffix(default_port)
            origins.append(f"{scheme}://{authority}")
        return origins

    @field_validator("root_path", mode="after")
    @classmethod
    def _a_path_prefix(cls, value):
        # A prefix is matched against request paths, which begin with "/": "llm" would never match, and "/llm/"
        # left "//docs" links.
        prefix = value.strip().rstrip("/")
        if prefix and not prefix.startswith("/"):
            raise ValueError(f"root_path (--root-path) must be a path beginning with '/', e.g. /llm; got {value!r}")
        return prefix

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value):
        # uvicorn looks the level up in lowercase (RETNET_LOG_LEVEL=DEBUG was a KeyError once the model loaded).
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("max_loras", "max_cpu_loras", "session_dir", "chat_template", mode="before")
    @classmethod
    def _none_spelled_out(cls, value, info):
        # Their help says "none: ...", as an operator then writes it: --session-dir none created ./none, and
        # --chat-template none was read as a missing file (a file of that name is still a template).
        spelled_none = isinstance(value, str) and value.strip().lower() in ("", "none")
        if spelled_none and not (info.field_name == "chat_template" and Path(value).is_file()):
            return None
        return value

    @field_validator("device", mode="after")
    @classmethod
    def _known_device(cls, value):
        # An unknown name reached torch.device inside the engine (a traceback out of create_app), and "meta" (no
        # data) started a server whose every request failed; whether the device is present is check_device_settings'.
        device = value.strip().lower()
        if device == "auto":
            return device
        import torch

        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"device (--device) must be auto, cpu, cuda, cuda:N or another torch device; got "
                             f"{value!r} ({_one_line(exc)})") from None
        if parsed.type == "meta":
            raise ValueError(f"device (--device) must hold the weights; got {value!r} (a meta tensor has no data)")
        return device

    @field_validator("download_dir", "revision", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        # RETNET_DOWNLOAD_DIR= (a compose file's unset ${VAR:-}) downloaded into the working directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("session_dir", mode="before")
    @classmethod
    def _expand_session_dir(cls, value):
        # "~/sessions" from RETNET_SESSION_DIR (no shell expanded it) is the home directory's, as --model's is;
        # an empty value is none.
        if isinstance(value, str | Path):
            return str(Path(value).expanduser()) if str(value).strip() else None
        return value

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _parse_lora_modules(cls, value):
        from retnet.serve.lora import parse_lora_modules

        # Checked here (a bad entry is a startup error naming the flag); kept as plain dicts.
        return [{"name": m.name, "path": m.path, "base_model_name": m.base_model_name}
                for m in parse_lora_modules(value)]

    @field_validator("override_generation_config", mode="before")
    @classmethod
    def _parse_override(cls, value):
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"override_generation_config (--override-generation-config) must be a JSON object; "
                                 f"{exc}: {value[:80]!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"override_generation_config (--override-generation-config) must be a JSON object; got "
                             f"{json.dumps(value)[:80]}")
        return value

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _parse_speculative(cls, value):
        return parse_speculative_config(value)

    @field_validator("pooler_config", mode="before")
    @classmethod
    def _parse_pooler(cls, value):
        from retnet.serve.pooling import parse_pooler_config

        return parse_pooler_config(value)

    @model_validator(mode="after")
    def _pooler_config_embeds(self):
        # Read by the embedding pooler alone: a classifier's head and generation would ignore it silently. (Its
        # empty spellings, {} included, parse to None: they ask for nothing, so they pass.)
        if self.pooler_config is not None and self.convert != "embed":
            from retnet.serve.pooling import parse_pooler_config

            # Named as the operator set it, to be removed there. _environment_source cannot tell: it builds the
            # settings from the environment alone, which this check refuses in turn.
            variable, source = _environment_variable(self, "pooler_config"), "--pooler-config"
            with contextlib.suppress(ValueError):  # a variable that does not parse: the flag's value won over it
                if variable is not None and parse_pooler_config(variable[1]) == self.pooler_config:
                    source = f"{variable[0]}={variable[1][:120]}"
            raise ValueError(f"pooler_config ({source}) only applies with convert embed (--convert embed or "
                             f"RETNET_CONVERT=embed); got {json.dumps(self.pooler_config)} with convert "
                             f"{self.convert!r}")
        return self

    @field_validator("tool_call_parser", mode="before")
    @classmethod
    def _no_parser(cls, value):
        # --tool-call-parser none / RETNET_TOOL_CALL_PARSER= : the default, no parser.
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @model_validator(mode="after")
    def _auto_tool_choice_has_a_parser(self):
        # vLLM's --enable-auto-tool-choice alone would answer nothing differently: 'auto' needs the parser.
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice (--enable-auto-tool-choice) needs tool_call_parser "
                             "(--tool-call-parser hermes): tool_choice 'auto' is answered by parsing the model's own "
                             "tool-call format, which that setting names")
        return self

    @model_validator(mode="after")
    def _default_within_limit(self):
        # A default over the limit refused every request that leaves out max_tokens, with a 400 about a
        # max_tokens the client never sent. Only a lowered limit: the default follows it; both set: an error.
        if self.default_max_tokens > self.max_tokens_limit:
            if "default_max_tokens" in self.model_fields_set:
                raise ValueError(f"default_max_tokens (--default-max-tokens) must be <= max_tokens_limit "
                                 f"(--max-tokens-limit, {self.max_tokens_limit}); got "
                                 f"{self.default_max_tokens}")
            self.default_max_tokens = self.max_tokens_limit
            # Still the default, lowered: a model's generation config may set it (resolve_max_tokens).
            self.__pydantic_fields_set__.discard("default_max_tokens")
        return self

    @model_validator(mode="after")
    def _cpu_loras_hold_a_batch(self):
        # vLLM's rule: the adapters of one batch (max_loras) must all be loaded at once.
        if self.max_cpu_loras is not None and self.max_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras (--max-cpu-loras) must be >= max_loras (--max-loras, {self.max_loras}): "
                             f"the adapters of one batch are all loaded at once; got max_cpu_loras = "
                             f"{self.max_cpu_loras}")
        return self

    @model_validator(mode="after")
    def _vllm_runtime_lora_variable(self):
        # vLLM's switch is this variable alone; its command lines and containers set it rather than our flag.
        if vllm_runtime_lora_variable():
            self.allow_runtime_lora_updating = True
        return self

    @model_validator(mode="after")
    def _vllm_api_key_variable(self):
        # vLLM requires VLLM_API_KEY when no --api-key is given; a vLLM deployment's environment moved here served
        # with no auth at all. --api-keys and RETNET_API_KEYS still win (vLLM's `args.api_key or VLLM_API_KEY`).
        key = os.environ.get("VLLM_API_KEY", "").strip()
        if key and not self.api_keys:
            if (why := _unsendable_key(key)) is not None:
                raise ValueError(f"VLLM_API_KEY (the API key with no --api-keys) {why}")
            self.api_keys = [key]
        return self

    @model_validator(mode="after")
    def _adapter_names_free(self):
        # A request's `model` picks the adapter: its name must not be the base model's.
        for module in self.lora_modules:
            if module["name"] in (self.model_name, *self.model_paths):
                raise ValueError(f"lora_modules: the adapter name {module['name']!r} is the base model's name")
        return self

    @property
    def logging_level(self) -> int:
        """``log_level`` as the logging module's number: its names but uvicorn's trace (5, below debug), which
        logging.basicConfig does not know by name."""
        return 5 if self.log_level == "trace" else logging.getLevelName(self.log_level.upper())

    @property
    def pooler(self) -> dict[str, Any]:
        """``pooler_config`` with vLLM's defaults for a decoder LM converted to embed filled in: ``pooling_type``
        LAST, ``normalize`` true."""
        from retnet.serve.pooling import POOLER_DEFAULTS

        return {**POOLER_DEFAULTS, **(self.pooler_config or {})}

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """``speculative_config`` as a :class:`SpeculativeConfig` (None: speculation off)."""
        return None if self.speculative_config is None else SpeculativeConfig(**self.speculative_config)

    @property
    def lora(self) -> list:
        """``lora_modules`` as :class:`~retnet.serve.lora.LoraModule` entries."""
        from retnet.serve.lora import LoraModule

        return [LoraModule(**module) for module in self.lora_modules]

    @property
    def model_name(self) -> str:
        """``--served-model-name``'s first name, else the directory's name; a hub id (no such directory) is served
        under the id as given, as resolve_model_source names it (so adapter names are checked against it before
        that)."""
        from retnet.model.hub import is_hub_id

        if self.served_model_name:
            return self.served_model_name[0]
        if self._hub_id is None and is_hub_id(self.model) and not Path(self.model).expanduser().exists():
            return self.model
        return Path(self.model).resolve().name

    @property
    def model_paths(self) -> tuple[str, ...]:
        """What a request's ``model`` may name the base model by besides its served name: ``--model`` (a hub
        id's snapshot), the hub id as given, and ``--served-model-name``'s other names (vLLM's: a request may name
        any, responses carry the first)."""
        aliases = tuple(self.served_model_name[1:]) if self.served_model_name else ()
        return (self.model, *aliases) if self._hub_id is None else (self.model, self._hub_id, *aliases)


def _is_list_text(text: str) -> bool:
    return "," in text or text.lstrip().startswith("[")


def _api_keys_list(text: str) -> list:
    """``--api-keys``' text as its keys. A comma list of blanks (``,``) is refused: it read as no key at all, and
    the server, asked for keys, ran without auth. (An empty or unset value is still no auth, as is ``[]``.)"""
    try:
        keys = _split_list(text)
    except json.JSONDecodeError as exc:  # (pydantic's message would show the text: the keys)
        raise ValueError(f"api_keys (--api-keys) is not a JSON list: {exc} (the keys are not shown: they are "
                         "secrets)") from None
    if isinstance(keys, list):
        _check_key_types(keys)
    if not keys and text.strip() and not text.lstrip().startswith("["):
        raise ValueError(f"api_keys (--api-keys) names no key; got {text[:120]!r} (give the keys, k1,k2; leave it "
                         "unset for no auth)")
    return keys


def _check_key_types(keys: list) -> None:
    """Refuse a key that is no string, by its place (the keys are secrets)."""
    for number, key in enumerate(keys, start=1):
        if not isinstance(key, str):
            kind = "null" if key is None else type(key).__name__
            raise ValueError(f"api_keys (--api-keys) key {number} of {len(keys)} is {kind}, not a string (the keys "
                             "are not shown: they are secrets)")


def _unsendable_key(key: str) -> str | None:
    """Why no client can send ``key`` in ``Authorization: Bearer``, or None. A header holds printable ASCII, spaces
    and tabs (which the server's compare keeps: ``Bearer a b`` is the key ``a b``); a control character cannot be
    sent at all, and beyond ASCII the OpenAI clients refuse to send it and a UTF-8 one (curl) is read as Latin-1,
    another key: such a key let no request in."""
    for char in key:
        if char != "\t" and not " " <= char <= "~":
            what = "a control character" if char < " " or char == "\x7f" else "a character beyond ASCII"
            return (f"holds {what} (U+{ord(char):04X}), which an `Authorization: Bearer` header cannot carry (the "
                    "keys are not shown: they are secrets)")
    return None


def _split_list(text: str) -> list:
    """A list setting's text: a JSON list, or a comma list (empty items skipped)."""
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding: up to ``num_speculative_tokens`` draft tokens a step, looked up by the last
    ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens (vLLM's ``method: ngram``) or proposed by the draft
    RetNet in directory ``model`` (``method: draft_model``)."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 0
    prompt_lookup_min: int = 0
    method: str = "ngram"
    model: str | None = None
    revision: str | None = None  # of a hub id ``model``, as --revision is of --model's


SPECULATIVE_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                    "revision")
SPECULATIVE_METHODS = ("ngram", "draft_model")


def json_object_setting(value, where: str, accepted: tuple[str, ...]) -> dict[str, Any] | None:
    """A JSON-object flag (vLLM's ``--speculative-config``, ``--pooler-config``): JSON text or a dict, None for
    empty, ``none`` or null; anything else than an object of ``accepted`` keys is refused naming ``where`` and the
    value."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("", "none", "null"):
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} must be a JSON object; {exc}: {value[:80]!r}") from None
        if value is None:
            return None
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object; got {json.dumps(value)[:80]}")
    unknown = sorted(set(value) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} (got {json.dumps(value)[:120]}); "
                         f"accepted: {', '.join(accepted)}")
    return value


def parse_speculative_config(value) -> dict[str, Any] | None:
    """``--speculative-config`` (JSON text or a dict; empty, ``none`` or null: off) checked and completed as vLLM
    completes it: a ``model`` without a ``method`` is a draft model; for ``ngram``, a missing
    ``prompt_lookup_min`` / ``prompt_lookup_max`` takes the other's value, both missing are 5. Errors name the
    field and the value received. A draft model's directory is checked at startup (:func:`resolve_draft_model`)."""
    where = "speculative_config (--speculative-config)"
    value = json_object_setting(value, where, SPECULATIVE_KEYS)
    if value is None:
        return None
    method = value.get("method")
    if method is None and value.get("model") is not None:
        method = "draft_model"  # vLLM's inference, for a model that names no other method (EAGLE, MTP ...)
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"{where}: method must be 'ngram' (prompt lookup) or 'draft_model' (a small RetNet, "
                         f"'model'); EAGLE, MTP ... are not served; got {method!r}")
    out: dict[str, Any] = {"method": method}
    if method == "draft_model":
        model = value.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"{where}: method 'draft_model' needs model, the draft's directory or hub id; got "
                             f"{model!r}")
        out["model"] = model
        revision = value.get("revision")
        if revision is not None:
            if not isinstance(revision, str) or not revision.strip():
                raise ValueError(f"{where}: revision must be a branch, tag or commit of the draft's hub id; got "
                                 f"{revision!r}")
            out["revision"] = revision
        lookup = sorted(set(value) & {"prompt_lookup_max", "prompt_lookup_min"})
        if lookup:  # vLLM ignores them; here a flag that does nothing is refused
            raise ValueError(f"{where}: {' and '.join(lookup)} {'apply' if len(lookup) > 1 else 'applies'} only to "
                             "method 'ngram'; got method 'draft_model'")
    else:
        for name in ("model", "revision"):
            if value.get(name) is not None:
                raise ValueError(f"{where}: {name} is only read by method 'draft_model' (the n-gram proposer needs "
                                 f"no model); got {value[name]!r}")
    names = ("num_speculative_tokens",) if method == "draft_model" else (
        "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
    for name in names:
        field = value.get(name)
        if field is None:
            if name == "num_speculative_tokens":
                raise ValueError(f"{where}: num_speculative_tokens is required (a whole number >= 1); got "
                                 f"{field!r}")
            continue
        if isinstance(field, bool) or not isinstance(field, int) or field < 1:
            raise ValueError(f"{where}: {name} must be a whole number >= 1; got {field!r}")
        out[name] = field
    if method == "draft_model":
        return out
    if "prompt_lookup_max" not in out and "prompt_lookup_min" not in out:
        out["prompt_lookup_max"] = out["prompt_lookup_min"] = 5
    out.setdefault("prompt_lookup_max", out.get("prompt_lookup_min"))
    out.setdefault("prompt_lookup_min", out["prompt_lookup_max"])
    if out["prompt_lookup_min"] > out["prompt_lookup_max"]:
        raise ValueError(f"{where}: prompt_lookup_min must be <= prompt_lookup_max ({out['prompt_lookup_max']}); "
                         f"got {out['prompt_lookup_min']}")
    return out


class StartupError(Exception):
    """What keeps the server from starting (a model directory it cannot serve, a bad generation config or chat
    template): ``retnet-serve`` prints the message on one line and exits 2."""


logger = logging.getLogger("retnet.serve")

# The sampling fields vLLM reads from a generation config (get_diff_sampling_param); max_new_tokens is max_tokens.
GENERATION_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def resolve_model_source(settings: ServeSettings) -> ServeSettings:
    """``settings`` with a hub id ``--model`` replaced by its local snapshot (downloaded, or found in the HF cache
    offline), served under the id as given (vLLM's default name) unless ``--served-model-name`` says otherwise.
    A directory is left as it is (check_model_dir says what is wrong with it), and so are settings already
    resolved; --revision and --download-dir, which only a hub id has a use for, are said to be ignored then."""
    from retnet.model.hub import HubError, resolve_pretrained

    if settings._resolved:
        return settings
    try:
        local = resolve_pretrained(settings.model, revision=settings.revision, cache_dir=settings.download_dir)
    except HubError as exc:
        raise StartupError(f"--model {exc}") from None
    if local == Path(settings.model).expanduser():
        for flag, value in (("--revision", settings.revision), ("--download-dir", settings.download_dir)):
            if value is not None:
                logger.warning("%s %s is ignored: --model %r is a local directory, not a hub id", flag, value,
                               settings.model)
        # "~/model" from RETNET_MODEL (no shell expanded it) is read as the home directory's, as a flag's is.
        resolved = settings.model_copy(update={"model": str(local)})
    else:
        logger.info("--model %s: the hub snapshot in %s", settings.model, local)
        resolved = settings.model_copy(update={"model": str(local),
                                               "served_model_name": settings.served_model_name or [settings.model]})
        resolved._hub_id = settings.model
    resolved._resolved = True
    return resolved


def check_model_dir(model: str, flag: str = "--model") -> bool:
    """Refuse, before anything loads, a ``--model`` that is no RetNet save_pretrained directory, or whose config
    RetNetConfig refuses (a flash-linear-attention checkpoint: convert it with retnet-convert-fla). Returns whether
    it is a classifier or reward model (config.json's ``architectures`` names a ``*ForSequenceClassification``:
    retnet-train --reward.enabled's export), which is served by /classify and /pooling instead of generating.
    ``flag``: what the messages name the directory by (a draft model's is another flag's)."""
    path = Path(model)
    if not path.exists():
        raise StartupError(f"{flag} {model!r}: no such directory (expected save_pretrained's output: config.json, "
                           "the weights, the tokenizer)")
    if not path.is_dir():
        raise StartupError(f"{flag} {model!r} is not a directory (expected save_pretrained's output)")
    from retnet.model.hub import training_output

    config_file = path / "config.json"
    written = training_output(path)
    if written is not None:
        if (path / "adapter_config.json").is_file():
            written += f" (or serve its base with --lora-modules NAME={path})"
        raise StartupError(f"{flag} {model!r} is {written}")
    if not config_file.is_file():
        raise StartupError(f"{flag} {model!r} has no config.json (expected save_pretrained's output)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StartupError(f"{flag} {model!r}: config.json could not be read: {exc}") from None
    from retnet.model import RetNetConfig

    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != RetNetConfig.model_type:
        raise StartupError(f"{flag} {model!r} is not a RetNet: config.json's model_type is {model_type!r}, "
                           f"expected {RetNetConfig.model_type!r}")
    try:
        RetNetConfig.from_pretrained(model)
    except Exception as exc:  # RetNetConfig's errors name the field and the value (fla's: retnet-convert-fla)
        raise StartupError(f"{flag} {model!r}: config.json is refused: {_one_line(exc)}") from None
    return is_classifier(raw.get("architectures"))


def resolve_draft_model(settings: ServeSettings, target_config=None) -> ServeSettings:
    """``settings`` with a draft model's ``model`` (``--speculative-config``, method ``draft_model``) replaced by
    its directory, a hub id fetched as ``--model``'s is (at the config's ``revision``), once it is checked: a
    RetNet causal LM whose vocabulary is the target's (``target_config``'s, else ``--model``'s config.json) and,
    when both directories have a tokenizer.json, whose tokenizer maps the ids to the same tokens
    (:func:`check_draft_tokenizer`): the draft's token ids are the target's, it must share the tokenizer. Any
    other settings are returned as they are. Raises :class:`StartupError` naming the path."""
    spec = settings.speculative
    if spec is None or spec.method != "draft_model":
        return settings
    from retnet.model import RetNetConfig
    from retnet.model.hub import HubError, resolve_pretrained

    flag = "--speculative-config's model"
    try:
        local = str(resolve_pretrained(spec.model, revision=spec.revision, cache_dir=settings.download_dir))
    except HubError as exc:
        raise StartupError(f"{flag} {exc}") from None
    if spec.revision is not None and Path(local) == Path(spec.model).expanduser():
        logger.warning("--speculative-config's revision %s is ignored: its model %r is a local directory, not a "
                       "hub id", spec.revision, spec.model)
    if check_model_dir(local, flag):
        raise StartupError(f"{flag} {spec.model!r} is a classifier (a *ForSequenceClassification export): a draft "
                           "model must be a causal LM")
    draft_vocab = RetNetConfig.from_pretrained(local).vocab_size
    vocab_size = (target_config or RetNetConfig.from_pretrained(settings.model)).vocab_size
    if draft_vocab != vocab_size:
        raise StartupError(f"{flag} {spec.model!r} has a vocabulary of {draft_vocab} tokens, the target --model "
                           f"{settings.model!r} one of {vocab_size}: a draft model must share the target's "
                           "tokenizer")
    check_draft_tokenizer(local, settings.model, flag)
    if local != spec.model:
        logger.info("%s %s: %s", flag, spec.model, local)
    return settings.model_copy(update={"speculative_config": {**settings.speculative_config, "model": local}})


def check_draft_tokenizer(draft: str, target: str, flag: str = "--speculative-config's model") -> None:
    """Refuse a draft whose tokenizer.json gives an id of the target's vocabulary another token than the target's
    tokenizer.json does: a vocabulary of the same size is no proof of the same tokenizer, and such a draft's
    proposals mean other text than the target reads, so they are almost all refused (the answers stay right, the
    speed goes). Ids that differ only in added tokens (special tokens: a fine-tune that renamed reserved ones, or
    added its chat tokens to a base draft's vocabulary) are warned about instead: the draft is still right on all
    the rest. Nothing is checked when either directory has no tokenizer.json (a draft saved without its
    tokenizer: the vocabulary size check is all there is)."""
    draft_file, target_file = Path(draft) / "tokenizer.json", Path(target) / "tokenizer.json"
    if not draft_file.is_file() or not target_file.is_file():
        return
    from tokenizers import Tokenizer

    vocabs = []
    for file, name in ((draft_file, f"{flag} {draft!r}"), (target_file, f"--model {target!r}")):
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the target's own loading reports its tokenizer; the draft's is read here alone
            if file is target_file:
                return
            raise StartupError(f"{name}: tokenizer.json could not be read: {_one_line(exc)}") from None
        added = {i: token.content for i, token in tokenizer.get_added_tokens_decoder().items()}
        base = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=False).items()}
        vocabs.append(({**base, **added}, set(added)))
    (draft_ids, draft_added), (target_ids, target_added) = vocabs
    differ = sorted(i for i in draft_ids.keys() & target_ids.keys() if draft_ids[i] != target_ids[i])
    special = draft_added | target_added
    conflicts = [i for i in differ if i not in special]
    if conflicts:
        examples = ", ".join(f"id {i}: {draft_ids[i]!r} vs {target_ids[i]!r}" for i in conflicts[:3])
        raise StartupError(f"{flag} {draft!r}: its tokenizer ({draft_file}) is not the target's ({target_file}): "
                           f"{len(conflicts)} of the {len(draft_ids.keys() & target_ids.keys())} token ids both "
                           f"define are other tokens ({examples}); a draft model must share the target's tokenizer")
    alone = sorted(draft_ids.keys() ^ target_ids.keys())
    if differ or alone:
        examples = [*(f"id {i}: {draft_ids[i]!r} vs {target_ids[i]!r}" for i in differ[:3]),
                    *(f"id {i} only in the {'draft' if i in draft_ids else 'target'}'s" for i in alone[:3])]
        logger.warning("%s %r: its tokenizer (%s) differs from the target's (%s) only in added tokens or in ids one "
                       "of them lacks: %s; drafts near those tokens are unlikely to be accepted", flag, draft,
                       draft_file, target_file, ", ".join(examples))


def is_classifier(architectures) -> bool:
    """Whether a config's ``architectures`` name a classifier or reward model (its score head scores text; it has
    no LM head to generate with)."""
    return any(str(name).endswith("ForSequenceClassification") for name in architectures or ())


# What only generation reads: a classifier's server would silently ignore these, so a value other than the default
# is refused (check_classifier_settings). --chat-template is not here: /classify's `messages` are templated with it.
GENERATION_ONLY_SETTINGS = (
    "lora_modules", "max_loras", "max_cpu_loras", "max_lora_rank", "enable_lora", "allow_runtime_lora_updating",
    "speculative_config", "session_dir", "max_sessions", "session_bytes", "session_ttl_s", "prefix_cache_entries",
    "prefix_cache_bytes", "prefix_cache_min_tokens", "prefix_cache_answers", "responses_store_entries",
    "responses_store_bytes", "generation_config", "override_generation_config", "max_tokens_limit",
    "default_max_tokens", "max_n", "max_prompts", "max_stop", "max_stop_chars", "max_logprobs", "return_tokens_as_token_ids", "max_running",
    "prefill_chunk_tokens", "tool_call_parser", "enable_auto_tool_choice", "exclude_tools_when_tool_choice_none",
)


def check_classifier_settings(settings: ServeSettings, mode: Literal["classify", "embed"] = "classify") -> None:
    """Refuse, for a classifier ``--model`` (``mode`` classify) or an embedding server (``--convert embed``), each
    generation-only setting (:data:`GENERATION_ONLY_SETTINGS`) given a value other than its default, rather than the
    server starting without them. The message names where the value came from, as the operator would remove it: the
    ``RETNET_*`` variable (or vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) when that is set and reads as the value,
    else the flag."""
    for name in GENERATION_ONLY_SETTINGS:
        value = getattr(settings, name)
        if value == ServeSettings.model_fields[name].get_default(call_default_factory=True):
            continue
        flag = "--" + name.replace("_", "-")
        if mode == "embed":
            why = ("only applies to generation, and --convert embed serves embeddings (by /v1/embeddings and "
                   "/pooling)")
        else:
            why = (f"only applies to generation, and --model {settings.model!r} is a classifier (served by /classify "
                   "and /pooling)")
        if name == "allow_runtime_lora_updating" and vllm_runtime_lora_variable():
            # vLLM's variable turns it on whatever the flag says: only unsetting it helps.
            raw = os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
            raise StartupError(f"VLLM_ALLOW_RUNTIME_LORA_UPDATING={raw} (it turns on {flag}) {why}: unset "
                               "VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        variable = _environment_source(settings, name)
        if variable is not None:
            raise StartupError(f"{variable[0]}={variable[1][:120]} ({flag}) {why}: unset it")
        shown = json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)
        raise StartupError(f"{flag} {shown[:120]} {why}: leave {flag} out")


def check_quantization_settings(settings: ServeSettings) -> None:
    """Refuse, before the model loads, a ``--quantization`` this server cannot apply (torchao not installed). LoRA
    adapters add their low-rank product to the quantized layer's output (as QLoRA trains them); DoRA's row norms
    are taken of the int8 weight dequantized, the matrix the layer computes with."""
    method = settings.quantization
    if method == "none":
        return
    from retnet.model.quantization import check_quantization

    try:
        check_quantization(method)
    except ValueError as exc:  # the message names the flag, the value and the install command
        raise StartupError(str(exc)) from None


def check_device_settings(settings: ServeSettings) -> None:
    """Refuse, before anything loads, a ``--device`` this machine does not have (``cuda`` without a GPU or a CUDA
    build of torch, ``cuda:3`` on a machine with fewer): the engine would otherwise start, fail as it loads the
    model, and answer every request 503. ``auto`` always has a device."""
    if settings.device == "auto":
        return
    import torch

    try:  # the allocation the engine's first .to(device) does: torch's own answer for every device type
        torch.empty(1, device=settings.device)
    except (AssertionError, RuntimeError) as exc:  # "Torch not compiled with CUDA enabled" is an AssertionError
        raise StartupError(f"--device {settings.device!r} is not available here: {_one_line(exc)} (use --device "
                           "auto or cpu)") from None


def _environment_source(settings: ServeSettings, name: str) -> tuple[str, str] | None:
    """(variable, its text) of the ``RETNET_*`` variable ``settings.name`` came from, or None when it came from the
    flag: the variable must be set and, read as pydantic-settings reads the environment, give the same value (a
    flag wins over it, so a different value is the flag's)."""
    found = _environment_variable(settings, name)
    if found is None:
        return None
    try:  # the environment alone, as it was read for these settings (the flags being init arguments over it)
        from_environment = type(settings)(model=settings.model)
    except Exception:  # a variable that does not read alone: a flag overrode it
        return None
    return found if getattr(from_environment, name) == getattr(settings, name) else None


def _environment_variable(settings: ServeSettings, name: str) -> tuple[str, str] | None:
    """(variable, its text) of the ``RETNET_*`` variable set for ``settings.name``, or None."""
    wanted = f"{settings.model_config.get('env_prefix', '')}{name}".upper()
    # pydantic-settings matches variable names whatever their case (case_sensitive is off).
    return next(((key, raw) for key, raw in os.environ.items() if key.upper() == wanted), None)


def vllm_runtime_lora_variable() -> bool:
    """Whether vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is on (1 or true), which --allow-runtime-lora-updating
    follows."""
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")


def generation_defaults(settings: ServeSettings) -> dict[str, Any]:
    """The request defaults the generation config sets (vLLM's ``get_diff_sampling_param``): ``temperature``,
    ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` and ``max_tokens`` (its ``max_new_tokens``), those
    present in the file ``--generation-config`` names (none with ``vllm``), with ``--override-generation-config``
    over them. ``do_sample`` is not read, as vLLM does not: ``do_sample: false`` with ``temperature: 0.7`` samples
    at 0.7. Checked against the request fields' own ranges; a value out of them is a :class:`StartupError`."""
    source, config = settings.generation_config, {}
    if source != "vllm":
        directory = Path(settings.model if source == "auto" else source)
        file = directory / "generation_config.json"
        if source != "auto" and not file.is_file():
            raise StartupError(f"--generation-config {source!r}: no generation_config.json there (expected 'auto', "
                               "'vllm' or a directory holding one)")
        if file.is_file():
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise StartupError(f"--generation-config {source!r}: {file} could not be read ({_one_line(exc)}); "
                                   "fix it or start with --generation-config vllm") from None
            if not isinstance(config, dict):
                raise StartupError(f"--generation-config {source!r}: {file} is not a JSON object")
    overrides = override_source(settings) if settings.override_generation_config else None
    origin = {name: "file" for name in config} | dict.fromkeys(settings.override_generation_config, "override")
    config = {**config, **settings.override_generation_config}
    ignored = sorted(set(settings.override_generation_config) - set(GENERATION_FIELDS))
    if ignored:
        logger.warning("%s: %s not read (only %s are request defaults)", overrides,
                       ", ".join(ignored), ", ".join(GENERATION_FIELDS))
    defaults = {name: config[name] for name in GENERATION_FIELDS if config.get(name) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    # The ranges requests are held to (protocol's SamplingFields): a default a request could not send is refused.
    from pydantic import ValidationError

    from retnet.serve.protocol import SamplingFields

    for name, value in defaults.items():
        field = "max_new_tokens" if name == "max_tokens" else name
        where = (f"{overrides}'s {field}" if origin[field] == "override"
                 else f"generation_config.json's {field} (--generation-config {source})")
        if name == "max_tokens" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise StartupError(f"{where} must be a whole number >= 1; got {value!r}")
        try:
            SamplingFields.model_validate({name: value})
        except ValidationError as exc:
            # (a fine-tune's export carries its base's sampling defaults, which transformers takes more widely)
            way_out = ("" if origin[field] == "override" else
                       f" (start with --generation-config vllm, or --override-generation-config '{{\"{field}\": ...}}')")
            raise StartupError(f"{where}: {exc.errors()[0]['msg']}; got {value!r}{way_out}") from None
    return {name: (int(v) if name in ("top_k", "max_tokens") else float(v)) for name, v in defaults.items()}


def resolve_max_tokens(settings: ServeSettings, defaults: dict[str, Any]) -> int:
    """The ``max_tokens`` of a request that leaves it out: ``--override-generation-config``'s ``max_new_tokens``,
    else ``--default-max-tokens`` when set, else the generation config's ``max_new_tokens``, else the setting's
    default (256). A file's value over ``--max-tokens-limit`` is lowered to it; an override's is refused."""
    from_file = defaults.get("max_tokens")
    # An override's null removes the file's value (vLLM's rule), leaving the server's default.
    if settings.override_generation_config.get("max_new_tokens") is not None:
        if from_file > settings.max_tokens_limit:
            raise StartupError(f"{override_source(settings)}'s max_new_tokens ({from_file}) is over --max-tokens-limit "
                               f"({settings.max_tokens_limit})")
        return from_file
    if from_file is None or "default_max_tokens" in settings.model_fields_set:
        return settings.default_max_tokens
    if from_file > settings.max_tokens_limit:
        logger.warning("the generation config's max_new_tokens (%d) is over --max-tokens-limit: requests that leave "
                       "out max_tokens get %d", from_file, settings.max_tokens_limit)
        return settings.max_tokens_limit
    return from_file


def override_source(settings: ServeSettings) -> str:
    """--override-generation-config as the operator set it, to name it so: its ``RETNET_*`` variable when the value
    came from there, else the flag."""
    variable = _environment_source(settings, "override_generation_config")
    return "--override-generation-config" if variable is None else variable[0]


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``'s template (vLLM's rule): the file it names, else the text itself when it holds
    Jinja (``{``, ``}`` or a newline; ``\\n`` escapes are read as in vLLM), checked to parse."""
    if value is None:
        return None
    try:
        template = Path(value).read_text(encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if not any(c in value for c in "{}\n"):
            raise StartupError(f"--chat-template {value[:80]!r} looks like a file path, but it could not be read: "
                               f"{_one_line(exc)}") from None
        # vLLM decodes escapes of an inline template, so that a shell's "\n" is a newline.
        template = codecs.decode(value.encode("latin-1", "backslashreplace"), "unicode_escape")
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        _compile_jinja_template(template)
    except Exception as exc:  # jinja2's TemplateSyntaxError (line and reason), or an unknown filter
        raise StartupError(f"--chat-template: the template does not parse: {_one_line(exc)}") from None
    return template


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = ["GENERATION_ONLY_SETTINGS", "ServeSettings", "SpeculativeConfig", "StartupError", "check_classifier_settings",
           "check_device_settings", "check_draft_tokenizer", "check_model_dir", "check_quantization_settings", "generation_defaults",
           "is_classifier", "load_chat_template", "override_source", "parse_speculative_config", "resolve_draft_model",
           "resolve_max_tokens"]
