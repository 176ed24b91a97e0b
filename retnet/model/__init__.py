"""The RetNet model: configuration, recurrent-state cache, HuggingFace model classes, activations."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (what type checkers and IDEs read; at run time each is imported at first use, below)
    from retnet.model.cache import RetNetCache
    from retnet.model.configuration_retnet import PRESETS, RetNetConfig
    from retnet.model.modeling_retnet import (
        RetNetForCausalLM,
        RetNetForSequenceClassification,
        RetNetModel,
        RetNetPreTrainedModel,
    )

# Each name's module, imported at first use: a submodule that needs no model (retnet-eval's parser reads
# retnet.model.quantization's methods) is imported without torch's and transformers' model code.
_MODULES = {"RetNetCache": "cache", "PRESETS": "configuration_retnet", "RetNetConfig": "configuration_retnet",
            "RetNetForCausalLM": "modeling_retnet", "RetNetForSequenceClassification": "modeling_retnet",
            "RetNetModel": "modeling_retnet", "RetNetPreTrainedModel": "modeling_retnet"}

__all__ = ["PRESETS", "RetNetCache", "RetNetConfig", "RetNetForCausalLM", "RetNetForSequenceClassification", "RetNetModel",
           "RetNetPreTrainedModel"]


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
