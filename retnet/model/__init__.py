"""The RetNet model: configuration, recurrent-state cache, HuggingFace model classes, activations."""

import importlib

# Each name's module, imported at first use: `retnet-convert-fla --help` (retnet.model.convert_fla) answers without
# importing torch and transformers.
_MODULES = {"RetNetCache": "cache", "PRESETS": "configuration_retnet", "RetNetConfig": "configuration_retnet",
            "RetNetForCausalLM": "modeling_retnet", "RetNetForSequenceClassification": "modeling_retnet",
            "RetNetModel": "modeling_retnet", "RetNetPreTrainedModel": "modeling_retnet"}

__all__ = ["PRESETS", "RetNetCache", "RetNetConfig", "RetNetForCausalLM", "RetNetForSequenceClassification", "RetNetModel",
           "RetNetPreTrainedModel"]


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
