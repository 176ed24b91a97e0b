"""What every section of the training configuration shares: the error, the refusal helpers, ``to_dict()``.

Its own module so that :mod:`retnet.train.config` and :mod:`retnet.train.config_tuning` both build on it without
importing each other.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key (``section.field``)."""


def _refuse(key: str, expected: str, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{key} {expected}; got {value!r}")


def _positive(section: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        # an int is finite (math.isfinite would raise OverflowError on one beyond float's range); nan passes both
        # comparisons
        finite = not isinstance(value, float) or math.isfinite(value)
        if not finite or value < 0 or (value == 0 and not allow_zero):
            # "must be > 0; got inf" read as a contradiction: say finite where the value is not
            _refuse(f"{section}.{name}", ("must be >= 0" if allow_zero else "must be > 0") + ("" if finite else
                    " and finite"), value)


def launch_env_int(name: str, default: int) -> int:
    """The integer of a launcher's variable (torchrun's ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``), ``default`` where it is unset or empty (as torch's own ``env://`` start reads an empty
    one: not set); ConfigError naming it for another value (``WORLD_SIZE=two`` was int()'s traceback)."""
    text = os.environ.get(name)
    if not text:
        return default
    least = 1 if name.endswith("WORLD_SIZE") else 0
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise ConfigError(f"environment variable {name} must be an integer >= {least} (as torchrun sets it), or unset "
                          f"for a single process; got {text!r}")
    return value


class _Section:
    """``to_dict()`` for logging and checkpoints (a plain, JSON-able dict)."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


__all__ = ["ConfigError", "launch_env_int"]
