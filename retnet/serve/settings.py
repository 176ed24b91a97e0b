"""Server settings: command-line flags and ``RETNET_*`` environment variables (pydantic-settings).

Every limit the server enforces is here, so an operator can read in one place what a request may ask for.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    """What ``retnet-serve`` reads from flags (``--max-running 32``) or the environment (``RETNET_MAX_RUNNING=32``)."""

    model_config = SettingsConfigDict(env_prefix="RETNET_", extra="ignore")

    # -- model and network ------------------------------------------------------------------------------------
    model: str = Field(description="directory written by save_pretrained (config.json, model.safetensors, tokenizer)")
    served_model_name: str | None = Field(None, description="the name clients pass as `model` (default: the directory's name)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:1 ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype; auto: float32 on CPU, bfloat16 on CUDA (states stay float32)"
    )
    # `| str`: pydantic-settings then lets a RETNET_API_KEYS that is not JSON through to the validator
    # instead of failing at startup on it.
    api_keys: list[str] | str = Field(default_factory=list,
                                      description="accepted `Authorization: Bearer` keys; empty: no auth")
    log_level: str = "info"

    # -- scheduling -------------------------------------------------------------------------------------------
    max_running: int = Field(64, ge=1, description="sequences decoded together in one batched recurrent step")
    max_queue: int = Field(256, ge=0, description="sequences waiting for a slot; beyond it requests get 429")
    prefill_chunk_tokens: int = Field(512, ge=1, description="a prompt is prefilled in pieces of this many tokens")
    prefill_token_budget: int = Field(2048, ge=1, description="prompt tokens prefilled between two decode steps")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After header sent with 429")
    shutdown_grace_s: float = Field(10.0, ge=0, description="on shutdown, running streams get this long to finish")

    # -- request limits ---------------------------------------------------------------------------------------
    max_prompt_tokens: int = Field(8192, ge=1)
    max_tokens_limit: int = Field(4096, ge=1, description="largest `max_tokens` a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="`max_tokens` when a request leaves it out")
    max_n: int = Field(8, ge=1)
    max_prompts: int = Field(16, ge=1, description="prompts in one /v1/completions request")
    max_stop: int = Field(4, ge=0, description="stop strings per request (OpenAI's limit is 4)")
    max_stop_chars: int = Field(64, ge=1)
    max_logprobs: int = Field(5, ge=0, description="top alternatives per token in `logprobs`")
    max_body_bytes: int = Field(1 << 20, ge=1024)

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
    session_bytes: int = Field(2 << 30, ge=0)
    session_ttl_s: float = Field(1800.0, gt=0)
    responses_store_entries: int = Field(
        1024, ge=0, description="finished Responses API responses kept for GET and previous_response_id (LRU, in "
        "memory); 0 stores none"
    )
    responses_store_bytes: int = Field(
        256 << 20, ge=0, description="bound on the stored responses' size, as JSON (each counted with the whole "
        "conversation it continues); the least recently used go first"
    )

    # -- LoRA adapters (vLLM's flags) ---------------------------------------------------------------------------
    lora_modules: list[str | dict] | str = Field(
        default_factory=list, description="LoRA adapters served beside the base model, each under its own name: "
        "name=path (peft's save_pretrained directory) or vLLM's JSON {\"name\", \"path\", \"base_model_name\"}; "
        "a request's `model` picks one"
    )
    max_loras: int | None = Field(
        None, ge=1, description="distinct adapters running at once (vLLM's --max-loras); requests of another wait; "
        "none: every adapter loaded"
    )
    max_lora_rank: int = Field(16, ge=1, description="an adapter of a larger rank is refused at startup (vLLM's "
                               "--max-lora-rank)")
    enable_lora: bool = Field(False, description="vLLM's flag, accepted so its command lines run: adapters are "
                              "served whenever lora_modules names some")

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

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        # RETNET_API_KEYS=a,b (a plain comma list) as well as JSON.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _parse_lora_modules(cls, value):
        from retnet.serve.lora import parse_lora_modules

        # Checked here (a bad entry is a startup error naming the flag); kept as plain dicts.
        return [{"name": m.name, "path": m.path, "base_model_name": m.base_model_name}
                for m in parse_lora_modules(value)]

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
                raise ValueError(f"default_max_tokens must be <= max_tokens_limit ({self.max_tokens_limit}); got "
                                 f"{self.default_max_tokens}")
            self.default_max_tokens = self.max_tokens_limit
        return self

    @model_validator(mode="after")
    def _adapter_names_free(self):
        # A request's `model` picks the adapter: its name must not be the base model's.
        for module in self.lora_modules:
            if module["name"] in (self.model_name, self.model):
                raise ValueError(f"lora_modules: the adapter name {module['name']!r} is the base model's name")
        return self

    @property
    def lora(self) -> list:
        """``lora_modules`` as :class:`~retnet.serve.lora.LoraModule` entries."""
        from retnet.serve.lora import LoraModule

        return [LoraModule(**module) for module in self.lora_modules]

    @property
    def model_name(self) -> str:
        from pathlib import Path

        return self.served_model_name or Path(self.model).resolve().name


__all__ = ["ServeSettings"]
