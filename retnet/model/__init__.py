"""The RetNet model: configuration, recurrent-state cache, HuggingFace model classes, activations."""

from retnet.model.cache import RetNetCache
from retnet.model.configuration_retnet import PRESETS, RetNetConfig
from retnet.model.modeling_retnet import (
    RetNetForCausalLM,
    RetNetForSequenceClassification,
    RetNetModel,
    RetNetPreTrainedModel,
)

__all__ = ["PRESETS", "RetNetCache", "RetNetConfig", "RetNetForCausalLM", "RetNetForSequenceClassification", "RetNetModel",
           "RetNetPreTrainedModel"]
