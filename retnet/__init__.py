"""retnet-stack: RetNet language models for HuggingFace transformers, Triton kernels, training and serving.

Importing ``retnet`` registers ``RetNetConfig`` / ``RetNetModel`` / ``RetNetForCausalLM`` /
``RetNetForSequenceClassification`` with transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)``
(or ``AutoModelForSequenceClassification``) loads a saved RetNet without ``trust_remote_code``.
"""

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from retnet.model import RetNetConfig, RetNetForCausalLM, RetNetForSequenceClassification, RetNetModel

    AutoConfig.register(RetNetConfig.model_type, RetNetConfig, exist_ok=True)
    AutoModel.register(RetNetConfig, RetNetModel, exist_ok=True)
    AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(RetNetConfig, RetNetForSequenceClassification, exist_ok=True)


_register_auto_classes()
