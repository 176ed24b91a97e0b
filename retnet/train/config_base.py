"""What every section of the training configuration shares: the error, the refusal helpers, ``to_dict()``.

Its own module so that :mod:`retnet.train.config` and :mod:`retnet.train.config_tuning` both build on it without
importing each other.
"""

from __future__ import annotations

import dataclasses
import math
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


class _Section:
    """``to_dict()`` for logging and checkpoints (a plain, JSON-able dict)."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


__all__ = ["ConfigError"]
