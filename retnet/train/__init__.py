"""Training RetNet language models: ``torchrun -m retnet.train --config tiny`` (see ``__main__``)."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (what type checkers and IDEs read; at run time imported at first use, below)
    from retnet.train.config import JobConfig, load_config

__all__ = ["JobConfig", "load_config"]


def __getattr__(name: str):
    # Lazily: the configuration imports torch, which `retnet-train --help` (this package's __main__) does without.
    if name in __all__:
        from retnet.train import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
