"""retnet-stack: RetNet language models for HuggingFace transformers, Triton kernels, training and serving.

Importing ``retnet`` registers ``RetNetConfig`` / ``RetNetModel`` / ``RetNetForCausalLM`` /
``RetNetForSequenceClassification`` with transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)``
(or ``AutoModelForSequenceClassification``) loads a saved RetNet without ``trust_remote_code``.

A process started as one of retnet's commands (``retnet-train``, ``python -m retnet.serve`` ...) is the exception:
its ``main`` calls :func:`register` once it has read its command line, so that ``--help`` and a mistyped option
answer without importing torch and transformers.
"""

import logging
import os
import sys

__version__ = "0.1.0"

# The console scripts of pyproject.toml's [project.scripts], and the modules `python -m` runs them as (and the
# demo's, which has no script).
_COMMANDS = frozenset({"retnet-train", "retnet-serve", "retnet-eval", "retnet-lm-eval", "retnet-run-batch",
                       "retnet-convert-fla"})
_COMMAND_MODULES = frozenset({"retnet.train", "retnet.train.__main__", "retnet.serve", "retnet.serve.__main__",
                              "retnet.train.evaluate", "retnet.harness", "retnet.serve.run_batch",
                              "retnet.serve.demo", "retnet.model.convert_fla"})
_registered = False


def _register_auto_classes() -> None:
    # transformers imports torchao at its own import whenever it is installed (the [quant] extra): torchao then logs
    # a warning for each CUDA extension a CPU build of torch cannot load, and torch one for each enum torchao
    # registers. Neither concerns what retnet runs, and they would open every command's stderr (its one-line
    # startup errors among them); errors still show.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
        )

        from retnet.model import RetNetConfig, RetNetForCausalLM, RetNetForSequenceClassification, RetNetModel
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)

    AutoConfig.register(RetNetConfig.model_type, RetNetConfig, exist_ok=True)
    AutoModel.register(RetNetConfig, RetNetModel, exist_ok=True)
    AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(RetNetConfig, RetNetForSequenceClassification, exist_ok=True)


# LN tuning trains norms, not Linears: the decoder layers' two and the final one (not the retention's head_norm,
# which Llama has no counterpart of).
_LN_TUNING_TARGETS = ("retention_norm", "ffn_norm", "norm")


def _register_peft_targets() -> None:
    # peft picks a model's default targets by its model_type and has none for "retnet" (get_peft_model then asks
    # for target_modules). LoRA's: the ones retnet-train adapts by default, every Linear of the decoder layers (a
    # name a model lacks, g_proj without the output gate, matches nothing). Each other tuner reads a dict of its
    # own, most of them copies of LoRA's made when peft was imported, so LoRA's entry alone reached none of them.
    # Which dicts a peft has changes with its version, so they are found by name. RetNet's Linears bear Llama's
    # names: where a tuner's Llama default is LoRA's or every Linear (OSF's), RetNet's is LoRA's; where it is some of
    # them (IA3's k/v and FFN down projection, and its feed-forward subset; BEFT's v_proj) it is taken as it stands.
    # A dict whose Llama entry is neither (a new kind of tuner) is left alone: peft then asks for target_modules.
    try:
        from peft.utils import constants
    except ImportError:  # (peft comes with the [train] extra)
        return
    from retnet.train.config_tuning import LORA_TARGETS

    lora = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    lora.setdefault("retnet", list(LORA_TARGETS))
    llama_linears = set(LORA_TARGETS) - {"g_proj"}
    for name, mapping in vars(constants).items():
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_MODULES_MAPPING")
                and isinstance(mapping, dict)) or mapping is lora:
            continue
        llama = mapping.get("llama")
        names = set(llama) if isinstance(llama, list) else set()
        if name == "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING":
            mapping.setdefault("retnet", list(_LN_TUNING_TARGETS))
        elif (llama is not None and llama == lora.get("llama")) or names >= llama_linears:
            mapping.setdefault("retnet", list(LORA_TARGETS))
        elif names and names <= llama_linears:
            mapping.setdefault("retnet", list(llama))


def register() -> None:
    """Register RetNet with transformers' Auto classes and peft's default adapter targets (once; ``import retnet``
    has done it, but in a process started as one of retnet's commands, whose ``main`` calls it)."""
    global _registered
    if not _registered:
        _register_auto_classes()
        _register_peft_targets()
        _registered = True


def _started_as_command() -> bool:
    """Whether this import is a retnet command's on the way to its ``main``, which registers after its parse.

    A registration at import pays torch and transformers (seconds) before argparse could answer ``--help``;
    every package module imports this one first, so the entry modules cannot avoid it on their own. Only the
    start of the process is told apart, from its command line: any other import registers as before."""
    if not sys.argv:
        return False
    if sys.argv[0] == "-m":  # python -m: runpy imports the packages before argv[0] becomes the module's path
        words = getattr(sys, "orig_argv", [])
        return "-m" in words[:-1] and words[words.index("-m") + 1] in _COMMAND_MODULES
    return os.path.basename(sys.argv[0]).removesuffix(".exe").removesuffix("-script.py") in _COMMANDS


if not _started_as_command():
    register()
