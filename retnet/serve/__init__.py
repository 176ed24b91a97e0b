"""An OpenAI-compatible server for RetNet models, with continuous batching of O(1)-state decoding.

``create_app(settings)`` builds the FastAPI app (routes in :mod:`app`, request and response models in
:mod:`protocol`, the batching scheduler in :mod:`engine`); ``retnet-serve --model DIR`` runs it under uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retnet.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str):
    # Lazily: the settings import pydantic, and every module of this package (its commands' among them) imports this
    # one first; without the [serve] extra they failed at import, before their main could say what to install.
    if name == "ServeSettings":
        from retnet.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # With the names __getattr__ loads: dir() (and a REPL's completion) left ServeSettings out.
    return sorted({*globals(), *__all__})


def create_app(settings: ServeSettings | None = None, **overrides):
    """Build the FastAPI app (imported lazily so ``import retnet.serve`` stays light)."""
    from retnet.serve.app import create_app as _create_app

    return _create_app(settings, **overrides)
