"""Knowledge distillation (``[distill]``): the model trained, the student, learns a frozen teacher's next-token
distributions on the run's text or chat data.

The teacher (``distill.teacher``: a ``save_pretrained`` directory or hub id, a RetNet causal LM of the student's
vocabulary) is loaded on every rank in the training's compute dtype (bf16 on CUDA under ``train.mixed_precision``
bf16, else fp32), in eval mode, without gradients, and is wrapped by neither DDP nor FSDP2: under FSDP2 each rank
holds the whole teacher (it is not sharded). Each training micro-batch runs it once, on the inputs the student gets
(the packed segments of ``data.document_boundaries``, the chat targets; under ``train.context_parallel`` the rank's
piece of the row, its states crossing the cuts over the student's group as the student's do), and hands its final
hidden states and head to the student's forward (:class:`~retnet.model.distillation.Distillation`), which computes
:func:`~retnet.model.distillation.linear_distillation_loss` over exactly the tokens the cross-entropy counts, a chunk
of them at a time. The step's two parts ride the loss's all-reduce: ``kd_loss`` (the mean temperature² · KL) and
``ce_loss`` (the mean cross-entropy), logged beside ``loss`` (their ``alpha`` mix). Evaluation is the plain
cross-entropy, so a distilled run's ``val_loss`` compares with any other's.

The teacher is not checkpointed: a checkpoint records its path and the fingerprint of its weights
(:func:`~retnet.train.lora.base_fingerprint`), and a resume with other weights is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from retnet.model.context_parallel import ContextShard
from retnet.model.distillation import Distillation
from retnet.train.config import ConfigError, DistillConfig

logger = logging.getLogger("retnet.train")

METRICS = ("kd_loss", "ce_loss")


def resolve_teacher(cfg: DistillConfig) -> Path:
    """``distill.teacher``'s directory (a hub id's snapshot, downloaded or from the HF cache offline), holding a
    RetNet causal LM's ``config.json``; a ConfigError naming the setting otherwise."""
    from retnet.model.hub import HubError, resolve_pretrained, training_output

    try:
        path = resolve_pretrained(cfg.teacher)
    except HubError as error:
        raise ConfigError(f"distill.teacher {error}; give a save_pretrained directory (another run's "
                          f"train.output_dir/export) or a hub id") from None
    if not path.is_dir():  # e.g. the config.json or model.safetensors file named instead of its directory
        raise ConfigError(f"distill.teacher {str(path)!r} is a file, not a directory; give the save_pretrained "
                          f"directory that holds it (another run's train.output_dir/export)")
    written = training_output(path)  # the likeliest slip: a run's train.output_dir for the export inside it
    if written is not None:
        raise ConfigError(f"distill.teacher {str(path)!r} is {written}")
    if not (path / "config.json").is_file():
        raise ConfigError(f"distill.teacher {str(path)!r} holds no config.json; give a save_pretrained directory "
                          f"(another run's train.output_dir/export, or a retnet-convert-fla output)")
    try:  # here, before the tokenizer's loader reads it too: its refusal then blamed the tokenizer (data.tokenizer)
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # not JSON, not UTF-8, unreadable
        raise ConfigError(f"distill.teacher {str(path)!r}: its config.json could not be read: "
                          f"{type(error).__name__}: {str(error).strip()[:300]}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"distill.teacher {str(path)!r}: its config.json holds a JSON {type(config).__name__}, "
                          f"not an object of the model's settings")
    return path


def teacher_tokenizer(path: Path) -> Path:
    """``path`` (the teacher's directory), the run's tokenizer when ``data.tokenizer`` is unset: after a ConfigError
    unless it holds a tokenizer."""
    if not any((path / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        raise ConfigError(f"distill.teacher {str(path)!r} holds no tokenizer (no tokenizer_config.json or "
                          f"tokenizer.json) and data.tokenizer is unset: the student learns the teacher's next-token "
                          f"ids, so set data.tokenizer to the tokenizer the teacher was trained with")
    from retnet.train.data import load_tokenizer

    try:  # read as the run will read it, so that a refusal names the setting given, not data.tokenizer (unset)
        load_tokenizer(path)
    except ConfigError as error:
        reason = str(error).removeprefix(f"data.tokenizer {str(path)!r} ")
        raise ConfigError(f"distill.teacher {str(path)!r}: its tokenizer cannot be the run's (data.tokenizer is "
                          f"unset): it {reason}; set data.tokenizer to the tokenizer the teacher was trained with (a "
                          f"tokenizer.json alone names no EOS: save the tokenizer with save_pretrained)") from None
    return path


def _own_vocabulary(path: Path) -> dict[str, int] | None:
    """The vocabulary (token -> id) of the tokenizer the teacher's directory holds, whatever files hold it (a
    ``tokenizer.json`` alone is a whole tokenizer); None when it holds none. A ConfigError naming the teacher when
    its files cannot be read: a teacher whose tokenizer cannot be compared is not distilled from."""
    if not any((path / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True).get_vocab()
    except Exception as error:  # tokenizers' and transformers' own errors: a damaged or foreign tokenizer file
        raise ConfigError(f"distill.teacher {str(path)!r}: its tokenizer could not be read to check it against the "
                          f"run's: {type(error).__name__}: {str(error).strip()[:300]}") from None


def teacher_config(path: Path, tokenizer, init_from: str | None = None):
    """The teacher's RetNetConfig, with ``tokenizer`` (the run's) checked against it and against the teacher's own
    tokenizer, when it has one: the same ids must mean the same tokens to both models. ``init_from``: the
    ``model.init_from`` whose tokenizer is the run's (it takes no data.tokenizer), for the refusal's advice."""
    from retnet.model import RetNetConfig
    from retnet.model.convert_fla import is_fla_retnet_config
    from retnet.train.data import tokenizer_mismatch

    try:
        saved, _ = RetNetConfig.get_config_dict(str(path), local_files_only=True)
    except (OSError, ValueError) as error:  # transformers' "not a valid JSON file", an unreadable file
        raise ConfigError(f"distill.teacher {str(path)!r}: its config.json could not be read: "
                          f"{str(error).strip()[:300]}") from None
    if saved.get("model_type") != RetNetConfig.model_type:
        raise ConfigError(f"distill.teacher {str(path)!r} holds a {saved.get('model_type')!r} model, not a RetNet "
                          f"(retnet-convert-fla converts flash-linear-attention checkpoints)")
    if is_fla_retnet_config(saved):  # the same model_type, other fields and weight names
        raise ConfigError(f"distill.teacher {str(path)!r} holds a flash-linear-attention RetNet (its config.json has "
                          f"fla's fields), not this package's: convert it first, `retnet-convert-fla {path} DST`, "
                          f"and distill from DST")
    architectures = saved.get("architectures") or []
    if architectures and not any(name.endswith("ForCausalLM") for name in architectures):
        # A reward model or classifier has a score head, not an LM head: loaded as a causal LM its `score` would be
        # dropped and the tied embedding (or nothing) taken for the head it never trained
        raise ConfigError(f"distill.teacher {str(path)!r} holds a {', '.join(map(str, architectures))} (a reward "
                          f"model, classifier or backbone: no LM head to give next-token distributions), not a "
                          f"RetNetForCausalLM; give a causal LM's export")
    try:
        config = RetNetConfig.from_dict(saved)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"distill.teacher {str(path)!r}: its config.json is not a valid RetNet config: "
                          f"{error}") from None
    # A model.init_from student's tokenizer is its own (data.tokenizer is refused beside it): only another pair fits
    advice = (f"the student, model.init_from {init_from!r}, keeps its own tokenizer: pick a teacher and a student "
              f"trained with one tokenizer" if init_from is not None else
              "train the student with the teacher's tokenizer (leave data.tokenizer unset, or give the teacher's)")
    problem = tokenizer_mismatch(tokenizer, config)
    if problem is not None:
        raise ConfigError(f"distill.teacher {str(path)!r}: the run's tokenizer does not fit it: {problem}; {advice}")
    own = _own_vocabulary(path)
    if own is not None:
        mine = tokenizer.get_vocab()
        differ = sorted(token for token in own.keys() | mine.keys() if own.get(token) != mine.get(token))
        if differ:
            raise ConfigError(
                f"distill.teacher {str(path)!r}: its tokenizer is not the run's ({len(differ)} tokens differ, e.g. "
                f"{differ[:3]!r}): distillation compares the two models' distributions id by id; {advice}")
    return config


def check_vocab(path: Path, config, vocab_size: int, student: str) -> None:
    """A ConfigError (naming both) unless the teacher's vocabulary (its ``config``) is the student's ``vocab_size``
    (``student`` says what the student is)."""
    if config.vocab_size != vocab_size:
        raise ConfigError(
            f"distill.teacher {str(path)!r} has vocab_size {config.vocab_size}, the student ({student}) "
            f"{vocab_size}: distillation compares their next-token distributions id by id; distill into a student "
            f"of the teacher's vocabulary (a preset from scratch takes it)")


def load_teacher(cfg: DistillConfig, path: Path, config, device: torch.device, dtype: torch.dtype) -> Teacher:
    """The frozen teacher on ``device`` in ``dtype``; a ConfigError naming the weights unless ``path`` holds every
    weight of ``config``'s model and no other: a teacher loaded in part would teach from random layers."""
    from safetensors import SafetensorError

    from retnet.model import RetNetForCausalLM
    from retnet.train.checkpoint import loading_mismatches

    try:
        # other-shaped weights reported (and refused below by name), not transformers' bare "see the report above"
        model, info = RetNetForCausalLM.from_pretrained(str(path), config=config, dtype=dtype, local_files_only=True,
                                                        output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:  # no weights, damaged or other-shaped ones
        raise ConfigError(f"distill.teacher {str(path)!r}: its weights could not be loaded: {type(error).__name__}: "
                          f"{str(error).strip()[:400]}") from None
    shown = loading_mismatches(model, info, config)
    if shown:
        raise ConfigError(f"distill.teacher {str(path)!r}: its weights do not match its config.json ({shown}); give a "
                          f"RetNetForCausalLM save_pretrained directory whose weights are all there (another run's "
                          f"train.output_dir/export)")
    model = model.to(device).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    logger.info("distilling from %s (%.2fM parameters, %s), %s at temperature %g, alpha %g", path, params / 1e6,
                str(dtype).removeprefix("torch."), "KL(teacher‖student)" if cfg.kind == "kl" else
                "KL(student‖teacher)", cfg.temperature, cfg.alpha)
    return Teacher(cfg, model)


class Teacher:
    """The frozen teacher and the distillation metrics: :meth:`target` for each training forward, :meth:`collect`
    after it, :meth:`step_stats` and :meth:`record_step` around the step's all-reduce, :meth:`window_metrics` per log
    record, :meth:`state_dict` for checkpoints (the window's sums)."""

    def __init__(self, cfg: DistillConfig, model: torch.nn.Module):
        self.cfg, self.model = cfg, model
        self._step: torch.Tensor | None = None
        self._window, self._window_steps = [0.0] * len(METRICS), 0

    @torch.no_grad()
    def target(self, inputs: dict[str, torch.Tensor], context_parallel: ContextShard | None = None) -> Distillation:
        """The teacher's side of the loss of the student's forward on ``inputs`` (the trainer's model inputs).
        ``context_parallel``: the student's shard, when ``inputs`` are a piece of a row split along time; the
        teacher's states cross the cuts over its group as the student's do, so every rank of the group calls this
        for the same row, in the same order."""
        hidden = self.model.model(input_ids=inputs["input_ids"], cu_seqlens=inputs.get("cu_seqlens"),
                                  context_parallel=context_parallel, use_cache=False,
                                  return_dict=True).last_hidden_state
        return Distillation(hidden, self.model.lm_head.weight, temperature=self.cfg.temperature,
                            alpha=self.cfg.alpha, kind=self.cfg.kind)

    def collect(self, distillation: Distillation) -> None:
        """Add a forward's ``[kd, ce]`` parts (in its loss's units) to this step's."""
        parts = distillation.parts.float()
        self._step = parts if self._step is None else self._step + parts

    def step_stats(self, divisor: int) -> torch.Tensor:
        """This rank's parts of the step, divided as its loss is (by the accumulation count for text), and a fresh
        count."""
        parts, self._step = self._step, None
        return parts / divisor

    def record_step(self, parts: torch.Tensor) -> None:
        """The global batch's parts (means over its targets): into the log window."""
        for index, value in enumerate(parts.tolist()):
            self._window[index] += value
        self._window_steps += 1

    def window_metrics(self) -> dict[str, float]:
        """The parts' means over the steps since the last record, and a fresh window."""
        if not self._window_steps:
            return {}
        means = {name: total / self._window_steps for name, total in zip(METRICS, self._window, strict=True)}
        self._window, self._window_steps = [0.0] * len(METRICS), 0
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self._window), "window_steps": self._window_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._window = [float(v) for v in state.get("window", [0.0] * len(METRICS))]
        self._window_steps = int(state.get("window_steps", 0))


__all__ = ["METRICS", "Teacher", "check_vocab", "load_teacher", "resolve_teacher", "teacher_config",
           "teacher_tokenizer"]
