"""Reward functions for GRPO (``grpo.reward_funcs``), with TRL's callable contract, and how a name resolves to one.

A reward function is named by its import path, ``"module:function"`` (``retnet.train.rewards:exact_match``), and
called once per batch of completions, as TRL's GRPOTrainer calls it::

    def my_reward(prompts: list, completions: list, completion_ids: list[list[int]], **columns) -> list[float | None]

``prompts`` are the rows' prompts as the dataset holds them (a string, or a list of ``{"role", "content"}``
messages), one per completion (a prompt's ``grpo.num_generations`` completions are consecutive); ``completions``
the sampled texts (special tokens and the stop token left out), or for a conversational prompt ``[{"role":
"assistant", "content": text}]``; ``completion_ids`` their token ids (the stop token included when sampled);
``columns`` every other column of the rows, one value per completion (``solution=[...]``). A conversational prompt
that ends with an assistant message (a prefill the completion continues) comes without it, and its content starts
the completion's (TRL's ``bootstrap``). Each call gets its own deep copies of the prompts and columns, one per
completion, so a function may change them (TRL's examples ``prompt.pop()``). It returns one number per completion
(a list, a numpy array or a tensor), or None where it does not apply (TRL's rule: such a reward is left out of the
weighted sum, and of its mean in the logs). Accept ``**kwargs``: TRL adds arguments over time, and so may this
trainer. The metrics name a function by its ``__name__``: two of the same name are refused.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retnet.train.config import ConfigError


def completion_text(completion: Any) -> str:
    """The text of a completion as a reward function receives it: the string, or a conversational completion's
    messages' contents joined."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion)


def exact_match(completions: list, solution: list | None = None, **kwargs) -> list[float | None]:
    """1.0 where the completion's text, stripped of surrounding whitespace, is the row's ``solution`` column
    (stripped too), else 0.0; None for a row without one (and for every row of a dataset without the column)."""
    if solution is None:
        return [None] * len(completions)
    return [None if answer is None else float(completion_text(c).strip() == str(answer).strip())
            for c, answer in zip(completions, solution, strict=True)]


def matches_pattern(completions: list, pattern: list | None = None, **kwargs) -> list[float | None]:
    """A format reward: 1.0 where the whole stripped completion matches the row's ``pattern`` column (a Python
    regular expression, ``re.DOTALL``: ``"<think>.*</think>\\s*<answer>.*</answer>"``), else 0.0; None without
    one."""
    if pattern is None:
        return [None] * len(completions)
    return [None if regex is None else float(re.fullmatch(regex, completion_text(c).strip(), re.DOTALL) is not None)
            for c, regex in zip(completions, pattern, strict=True)]


def length_target(completions: list, target_length: list | None = None, **kwargs) -> list[float | None]:
    """A length reward: ``-|len(text) - target| / target`` in characters, 0.0 at the row's ``target_length``
    column (> 0) and -1.0 at twice or none of it (below that, clipped to -1); None without one."""
    if target_length is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for completion, target in zip(completions, target_length, strict=True):
        if target is None or target <= 0:
            out.append(None)
            continue
        out.append(max(-abs(len(completion_text(completion)) - target) / target, -1.0))
    return out


def source_names(reward_funcs: list[str], funcs: list[Callable], reward_model: str = "") -> list[str]:
    """The names the metrics (``rewards/<name>/mean``) give the reward sources, TRL's: each function's
    ``__name__`` (else the last part of its ``reward_funcs`` entry), then the reward model directory's name. A
    ConfigError naming ``grpo.reward_funcs`` when two are the same: their metrics would overwrite each other's."""
    names = [getattr(func, "__name__", spec.rpartition(":")[2]) for func, spec in zip(funcs, reward_funcs,
                                                                                     strict=True)]
    entries = [repr(spec) for spec in reward_funcs]
    if reward_model:
        names.append(Path(reward_model).expanduser().resolve().name)
        entries.append(f"grpo.reward_model {reward_model!r}")
    for later, name in enumerate(names):
        if name in names[:later]:
            raise ConfigError(f"grpo.reward_funcs: {entries[names.index(name)]} and {entries[later]} are both "
                              f"named {name!r}, and the metrics name a source by it: rename one (wrap it in a "
                              f"function of another name)")
    return names


def resolve(spec: str) -> Callable[..., list]:
    """The function ``"module:function"`` names (the part after ``:`` may be dotted: ``module:Class.method``);
    a ConfigError naming ``grpo.reward_funcs`` when it cannot be imported or is not callable."""
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or whatever the module raises while it is imported
        raise ConfigError(f"grpo.reward_funcs: {spec!r}: module {module_name!r} cannot be imported: "
                          f"{type(error).__name__}: {error}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"grpo.reward_funcs: {spec!r}: {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"grpo.reward_funcs: {spec!r} is a {type(target).__name__}, not a function")
    return target


__all__ = ["completion_text", "exact_match", "length_target", "matches_pattern", "resolve", "source_names"]
