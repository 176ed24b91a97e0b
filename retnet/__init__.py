"""retnet-stack: RetNet language models for HuggingFace transformers, Triton kernels, training and serving.

Importing ``retnet`` registers ``RetNetConfig`` / ``RetNetModel`` / ``RetNetForCausalLM`` /
``RetNetForSequenceClassification`` with transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)``
(or ``AutoModelForSequenceClassification``) loads a saved RetNet without ``trust_remote_code``.
"""

import logging

__version__ = "0.1.0"


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


def _register_peft_targets() -> None:
    # peft picks a model's default LoRA targets by its model_type and has none for "retnet" (get_peft_model then
    # asks for target_modules): the ones retnet-train adapts by default, every Linear of the decoder layers (a
    # name a model lacks, g_proj without the output gate, matches nothing). The same dict peft's tuners read.
    try:
        from peft.utils import constants
    except ImportError:  # (peft comes with the [train] extra)
        return
    from retnet.train.config_tuning import LORA_TARGETS

    constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("retnet", list(LORA_TARGETS))


_register_auto_classes()
_register_peft_targets()
