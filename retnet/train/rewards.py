"""Reward functions for GRPO (``grpo.reward_funcs``), with TRL's callable contract, and how a name resolves to one.

:class:`RewardSources` calls them, and ``grpo.reward_model``, on a rollout's completions.

A reward function is named by its import path, ``"module:function"`` (``retnet.train.rewards:exact_match``), and
called once per batch of completions, as TRL's GRPOTrainer calls it::

    def my_reward(prompts: list, completions: list, completion_ids: list[list[int]], trainer_state,
                  **columns) -> list[float | None]

``prompts`` are the rows' prompts as the dataset holds them (a string, or a list of ``{"role", "content"}``
messages), one per completion (a prompt's ``grpo.num_generations`` completions are consecutive); ``completions``
the sampled texts (special tokens and the stop token left out), or for a conversational prompt ``[{"role":
"assistant", "content": text}]``; ``completion_ids`` their token ids (the stop token included when sampled);
``trainer_state`` a ``transformers.TrainerState`` (``global_step``: the optimizer steps taken when the completions
were sampled, ``max_steps``: ``train.steps``), as TRL passes its own (a curriculum reads it);
``columns`` every other column of the rows, one value per completion (``solution=[...]``). A conversational prompt
that ends with an assistant message (a prefill the completion continues) comes without it, and its content starts
the completion's (TRL's ``bootstrap``). Each call gets its own deep copies of the prompts and columns, one per
completion, so a function may change them (TRL's examples ``prompt.pop()``). It returns one number per completion
(a list, a numpy array or a tensor), or None where it does not apply (TRL's rule: such a reward is left out of the
weighted sum, and of its mean in the logs). Accept ``**kwargs``: TRL adds arguments over time, and so may this
trainer. An ``async def`` function is awaited, a call's async functions together (TRL's: on one event loop, in a
thread of its own, kept for the run). The metrics name a function by its ``__name__``: two of the same name are
refused.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import math
import numbers
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retnet.tokenization import closed_by_eos, render_pair
from retnet.train.chat import template_identity
from retnet.train.config import ConfigError, GrpoConfig
from retnet.train.data import load_tokenizer, tokenizer_fingerprint
from retnet.train.prompts import PromptEncoder, Prompts
from retnet.train.reward import scores_within_frames


def completion_text(completion: Any) -> str:
    """The text of a completion as a reward function receives it: the string, or a conversational completion's
    messages' contents joined."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion)


def solution_texts(answer: Any) -> set[str] | None:
    """The texts a completion may be to match ``answer`` (:func:`exact_match`), stripped; None for no answer (None,
    or NaN: a missing value as pandas and Parquet write one). A whole number read as a float matches its integer
    text too: a JSON column of answers 42 and 3.5 is read as floats (42.0), the completion says "42". A
    ConfigError naming the column for an answer that is neither text nor a number (a list, a dict): retnet-train
    stops with one line, exit status 2, as for the other built-ins' columns, not a traceback on every rank."""
    if answer is None:
        return None
    if not isinstance(answer, (str, numbers.Number)):
        # str() of a list of accepted answers (or a message dict) is no completion's text: every completion would
        # score 0.0, a flat reward curve with no word of why
        raise ConfigError(f"exact_match: the 'solution' column holds {type(answer).__name__} {answer!r:.80}; "
                         f"expected the answer's text (or a number), or None to skip the row")
    texts = {str(answer).strip()}
    if isinstance(answer, numbers.Real) and not isinstance(answer, numbers.Integral):
        value = float(answer)
        if math.isnan(value):
            return None
        if value.is_integer():
            texts.add(str(int(value)))
    return texts


def exact_match(completions: list, solution: list | None = None, **kwargs) -> list[float | None]:
    """1.0 where the completion's text, stripped of surrounding whitespace, is the row's ``solution`` column
    (stripped too; a whole number read as a float, 42.0, is also its integer's text), else 0.0; None for a row
    without one (and for every row of a dataset without the column, or a NaN one)."""
    if solution is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for completion, answer in zip(completions, solution, strict=True):
        texts = solution_texts(answer)
        out.append(None if texts is None else float(completion_text(completion).strip() in texts))
    return out


def matches_pattern(completions: list, pattern: list | None = None, **kwargs) -> list[float | None]:
    """A format reward: 1.0 where the whole stripped completion matches the row's ``pattern`` column (a Python
    regular expression, ``re.DOTALL``: ``"<think>.*</think>\\s*<answer>.*</answer>"``), else 0.0; None without
    one."""
    if pattern is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for completion, regex in zip(completions, pattern, strict=True):
        if regex is None:
            out.append(None)
            continue
        try:
            compiled = re.compile(regex, re.DOTALL)
        except (re.error, TypeError) as error:  # re's own message names neither the column nor the pattern
            raise ConfigError(f"matches_pattern: the 'pattern' column holds {regex!r:.80}, no regular expression "
                             f"({type(error).__name__}: {error})") from None
        out.append(float(compiled.fullmatch(completion_text(completion).strip()) is not None))
    return out


def length_target(completions: list, target_length: list | None = None, **kwargs) -> list[float | None]:
    """A length reward: ``-|len(text) - target| / target`` in characters, 0.0 at the row's ``target_length``
    column (> 0) and -1.0 at twice or none of it (below that, clipped to -1); None without one."""
    if target_length is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for completion, target in zip(completions, target_length, strict=True):
        if target is None or target != target:  # NaN too: a missing value as pandas and Parquet write one
            out.append(None)
            continue
        if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0 < target < math.inf:
            # (no float(): 10**400 is a length too) A quoted number ("4") would otherwise stop the run with a
            # TypeError naming neither column nor value; an infinite one would score every completion NaN, and a
            # length <= 0 (no length to aim at) None, both silently left out
            raise ConfigError(f"length_target: the 'target_length' column holds {type(target).__name__} "
                              f"{target!r:.80}; expected a number of characters (> 0), or None to skip the row")
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


def _import_module(name: str):
    """``name`` imported, looked for in the working directory too when nothing on ``sys.path`` has it: the
    ``retnet-train`` console script (and a torchrun of it) starts with its bin directory as ``sys.path[0]``, where
    ``python -m retnet.train`` has the working directory, which is where a user's ``my_rewards.py`` is. The
    directory goes last, so it never shadows an installed module."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        here = os.getcwd()
        top = name.partition(".")[0]
        if error.name != top or any(os.path.abspath(p or ".") == here for p in sys.path):
            raise
        sys.path.append(here)
        return importlib.import_module(name)


def resolve(spec: str) -> Callable[..., list]:
    """The function ``"module:function"`` names (the part after ``:`` may be dotted: ``module:Class.method``);
    a ConfigError naming ``grpo.reward_funcs`` when it cannot be imported or is not callable."""
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = _import_module(module_name)
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



def reward_arguments(split: Prompts, rows: np.ndarray, texts: list[str]) -> tuple[list, list, dict[str, list]]:
    """(prompts, completions, columns) for one reward function call, one entry per completion, as TRL builds
    them: each its own deep copy of the stored row (a function may change what it gets, as TRL's own code does
    with ``prompt.pop()``; the rows read stay as they are for the next call and step). A conversational prompt
    ending with an assistant message (a prefill) loses it, and its content starts the completion, TRL's
    ``bootstrap``: ``[{"role": "assistant", "content": prefill + text}]``."""
    prompts, completions = [], []
    for index, text in zip(rows, texts, strict=True):
        prompt = copy.deepcopy(split.prompts[index])
        if isinstance(prompt, str):
            completions.append(text)
        else:
            bootstrap = prompt.pop()["content"] if prompt[-1]["role"] == "assistant" else ""
            completions.append([{"role": "assistant", "content": bootstrap + text}])
        prompts.append(prompt)
    names = split.columns[rows[0]] if len(rows) else {}
    columns = {name: [copy.deepcopy(split.columns[i][name]) for i in rows] for name in names}
    return prompts, completions, columns


def reward_values(name: str, values: Any, count: int) -> torch.Tensor:
    """``[count]`` fp32 rewards (NaN for None) of what the reward function ``name`` returned: a list, a tuple, a
    numpy array or a tensor of one number or None per completion; a RuntimeError naming the function otherwise."""
    where = f"grpo.reward_funcs: {name} returned"
    expected = f"for {count} completions; it must return one number per completion (None to skip one)"
    try:
        values = list(values)
    except TypeError:  # None, a number, a 0-d array or tensor
        raise RuntimeError(f"{where} {type(values).__name__} {values!r:.80} {expected}") from None
    if len(values) != count:
        raise RuntimeError(f"{where} {len(values)} rewards {expected}")
    # float() reads "1.5" and b"1" too (TRL's torch.tensor refuses them): a function returning its text would be
    # trained on without a word
    text = next((v for v in values if isinstance(v, (str, bytes))), None)
    if text is not None:
        raise RuntimeError(f"{where} a reward that is not a number ({type(text).__name__} {text!r:.40}) {expected}")
    try:
        rewards = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:  # a list, a tensor of numbers, 10**400
        raise RuntimeError(f"{where} a reward that is not a number ({type(error).__name__}: {error}) "
                           f"{expected}") from None
    if bool(rewards.isinf().any()):
        # its group's mean is infinite and every advantage of the group (of the batch, scaled by the batch's std)
        # NaN: the loss too. (NaN is TRL's None: left out of the sum.)
        first = int(rewards.isinf().nonzero()[0, 0])
        raise RuntimeError(f"{where} {values[first]!r:.40} for completion {first}: a reward must be finite (in "
                           f"float32) {expected}")
    return rewards


class RewardSources:
    """The reward functions and the reward model of ``cfg``: ``names`` (TRL's: a function's ``__name__``, the
    model directory's name), ``weights``; called on a rollout, ``[n, sources]`` fp32 rewards (NaN for None).
    ``stops``: the ids that end a completion (:func:`~retnet.train.grpo_sampling.stop_tokens`), left out of the
    texts scored."""

    def __init__(self, cfg: GrpoConfig, tokenizer, encoder: PromptEncoder, device: torch.device, autocast,
                 stops: list[int] | None = None):
        self.tokenizer, self.encoder, self.device, self.autocast = tokenizer, encoder, device, autocast
        self.stops = stops or [tokenizer.eos_token_id]
        self.funcs = [resolve(spec) for spec in cfg.reward_funcs]
        self.names = source_names(cfg.reward_funcs, self.funcs, cfg.reward_model)
        self.model = None
        self._loop: asyncio.AbstractEventLoop | None = None  # async reward functions': started at their first call
        if cfg.reward_model:
            self.model = self._reward_model(Path(cfg.reward_model).expanduser())
        self.weights = torch.tensor(cfg.reward_weights or [1.0] * len(self.names), dtype=torch.float32)
        from transformers import TrainerState

        # TRL's trainer_state argument: the GRPO data sets its steps before each rollout
        self.state = TrainerState()

    def _reward_model(self, path: Path):
        from retnet.model import RetNetForSequenceClassification
        from retnet.model.hub import training_output

        where = f"grpo.reward_model {str(path)!r}"
        # the likeliest slip, a run's train.output_dir for the export inside it, named as such: its config.json is the
        # run's (the config-load check passes) and its tokenizer is one level down (a sentencepiece error otherwise)
        written = training_output(path)
        if written is not None:
            raise ConfigError(f"{where} is {written}")
        try:
            theirs = load_tokenizer(path)
        except (ConfigError, FileNotFoundError) as error:  # its messages name data.tokenizer, not the setting given
            reason = str(error).removeprefix(f"data.tokenizer {str(path)!r} ").removeprefix("data.tokenizer: ")
            raise ConfigError(f"{where}: its tokenizer, which must be the policy's, cannot be read: {reason}; "
                              f"export the reward model with its tokenizer") from None
        if tokenizer_fingerprint(theirs) != tokenizer_fingerprint(self.tokenizer) or \
                template_identity(theirs) != template_identity(self.tokenizer):
            raise ConfigError(f"{where}: its tokenizer (or chat template) is not the policy's: it would score other "
                              f"tokens than those sampled; train the reward model from the same base")
        try:
            model, info = RetNetForSequenceClassification.from_pretrained(str(path), dtype=torch.float32,
                                                                          local_files_only=True,
                                                                          output_loading_info=True)
        except (OSError, RuntimeError, ValueError) as error:
            raise ConfigError(f"{where}: cannot be loaded as a RetNetForSequenceClassification: "
                              f"{type(error).__name__}: {str(error)[:300]}") from None
        # from_pretrained draws the weights a checkpoint lacks at random and only reports them: a causal LM's export
        # (no score head: what an SFT run writes) or a reward model missing a layer would score every completion
        # with noise, the run training on it without a word
        missing = sorted(set(info.get("missing_keys", ())))
        if missing:
            what = ("holds no trained score head (it is no reward model's export: a causal LM's? architectures "
                    f"{model.config.architectures})" if any(k.startswith("score.") for k in missing) else
                    "lacks weights of its config's model")
            raise ConfigError(f"{where}: {what}: missing {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}; give a reward model run's export "
                              f"(reward.enabled)")
        if model.config.num_labels != 1:
            raise ConfigError(f"{where}: has {model.config.num_labels} labels; a reward model has one")
        return model.to(self.device).eval().requires_grad_(False)

    def __call__(self, split: Prompts, rows: np.ndarray, completions: list[np.ndarray]) -> torch.Tensor:
        ids = [c[:-1].tolist() if len(c) and c[-1] in self.stops else c.tolist() for c in completions]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        out = torch.full((len(rows), len(self.names)), float("nan"))
        returned = []
        for func in self.funcs:
            prompts, given, columns = reward_arguments(split, rows, texts)  # fresh for each function
            returned.append(func(prompts=prompts, completions=given,
                                 completion_ids=[c.tolist() for c in completions], trainer_state=self.state,
                                 **columns))
        pending = [number for number, values in enumerate(returned) if inspect.isawaitable(values)]
        if pending:  # TRL's async reward functions (a judge's API calls ...): awaited together
            for number, values in zip(pending, self._await([returned[n] for n in pending]), strict=True):
                returned[number] = values
        for number, (name, values) in enumerate(zip(self.names[:len(returned)], returned, strict=True)):
            out[:, number] = reward_values(name, values, len(rows))
        if self.model is not None:
            out[:, -1] = self._scores(split, rows, texts)
        return out

    def _await(self, awaitables: list) -> list:
        """The results of ``awaitables`` (what ``async def`` reward functions returned), run concurrently on this
        object's event loop, as TRL runs its async reward functions: one loop in a thread of its own for the whole
        run (so that a client a function keeps, an ``httpx.AsyncClient``, stays on one loop), which also serves a
        caller that has a loop running already (a notebook's)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="reward-functions", daemon=True).start()

        async def together() -> list:
            return await asyncio.gather(*awaitables)

        return asyncio.run_coroutine_threadsafe(together(), self._loop).result()

    @torch.no_grad()
    def _scores(self, split: Prompts, rows, texts, chunk: int = 64) -> torch.Tensor:
        """The reward model's score of prompt + completion + EOS, encoded as the reward trainer encodes a pair (a
        prefilled prompt's final assistant message continued by the sampled text, as it was sampled)."""
        backend, eos = self.encoder.chat.backend, self.tokenizer.eos_token_id
        sequences = []
        whole: dict[int, list[int]] = {}  # row -> its whole prompt's ids, where data.max_prompt_length cut them
        for index, text in zip(rows, texts):
            prompt = split.prompts[index]  # the stored prompt, read only
            # The whole prompt, not split.tokens' data.max_prompt_length cut (the policy's context budget): TRL's
            # reward model scores the untruncated prompt + completion, as the reward trainer encoded its pairs;
            # the cut drops the prompt's beginning (the question, a system turn) the score depends on.
            prompt_ids = split.tokens[index]
            # A row's chat_template_kwargs are the policy prompt's only: TRL's GRPOTrainer renders the conversation
            # its reward model scores without them (apply_chat_template of {"messages": prompt + completion})
            if self.encoder.max_prompt_length or split.template_kwargs[index]:
                if index not in whole:
                    whole[index] = self.encoder.ids([prompt], [self.encoder.text(prompt)])[0]
                prompt_ids = whole[index]
            if not isinstance(prompt, str):
                text = render_pair(prompt, [[{"role": "assistant", "content": text}]], self.encoder.chat.render)[1]
            # the EOS once: a completion the template closed with it (the default's) has it already
            sequences.append(np.asarray(closed_by_eos([*prompt_ids,
                                                       *backend.encode(text, add_special_tokens=False).ids], eos),
                                        dtype=np.int64))
        scores = []
        for lo in range(0, len(sequences), chunk):
            part = sequences[lo:lo + chunk]
            lengths = [len(sequence) for sequence in part]
            bounds = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.long, device=self.device)
            with self.autocast:  # (an xPos model's sequence past a packed frame: scored alone, not refused)
                scores.append(scores_within_frames(self.model, torch.from_numpy(np.concatenate(part)).to(
                    self.device)[None], bounds, lengths).cpu())
        return torch.cat(scores)


__all__ = ["RewardSources", "completion_text", "exact_match", "length_target", "matches_pattern", "resolve",
           "reward_arguments", "reward_values", "solution_texts", "source_names"]
