"""Weight-only quantization of a loaded RetNet for serving and evaluation (vLLM's ``--quantization``).

``int8``: torchao's int8 weight-only tensor (``Int8WeightOnlyConfig``'s), symmetric per output channel: each
``nn.Linear`` weight of the decoder layers (the retention's q/k/v/g/o projections, the FFN's gate/up/down) is held
as int8 with one scale per output row, about a quarter of its fp32 bytes; activations, the recurrent states and
every other weight stay in the model's dtype. ``none`` leaves the model as it is and needs nothing installed.
A row's scale is the smallest that clips nothing (``max(max_w / 127, -min_w / 128)``, torchao's
``SYMMETRIC_NO_CLIPPING_ERR``), not torchao's default ``max|w| / 127.5``: quantizing is then idempotent, so a
quantized model's saved (dequantized) weights quantize back to the same codes and scales.

What is kept unquantized, and why:

- ``embed_tokens``: a lookup, not a matmul (no int8 kernel to run it), and with ``tie_word_embeddings`` (the
  presets' default) it *is* ``lm_head``'s weight: quantizing either would untie or break the other.
- ``lm_head`` (tied or not): the logits are what sampling, logprobs and the eval loss read, and the vocabulary
  projection is the layer whose rounding they feel most; vLLM's methods leave it unquantized by default too.
- a classifier's ``score`` head: a few rows, nothing to save.

Saved (``save_pretrained``, with or without ``state_dict=``: ``RetNetPreTrainedModel.save_pretrained`` calls
:func:`dequantized`), a quantized Linear's weight is the matrix it computes with, dequantized to the model's dtype
one layer at a time onto the CPU: the directory loads without torchao and computes the quantized model's
outputs (quantize it again at load for the int8 memory). ``state_dict()`` keeps torchao's int8 tensors (no copy of
the model: peft's adapter saving calls it for a few keys). Loading a float state dict into a quantized model
quantizes its weights again.

torchao is an optional dependency (``pip install 'retnet-stack[quant]'``), needed only when a method other
than ``none`` is asked for (transformers imports it by itself whenever it is installed).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

QUANTIZATION_METHODS = ("none", "int8")
INSTALL_HINT = "pip install 'retnet-stack[quant]'"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QuantizationReport:
    """What :func:`quantize_model` did: ``layers`` Linear layers quantized; bytes of their weights, and of the
    whole model's parameters and buffers (a tied tensor counted once), before and after."""

    method: str
    layers: int
    linear_bytes_before: int
    linear_bytes_after: int
    model_bytes_before: int
    model_bytes_after: int

    def __str__(self) -> str:
        if self.method == "none":
            return f"--quantization none: {_mib(self.model_bytes_after)} of weights, unquantized"
        return (f"--quantization {self.method}: {self.layers} Linear layers of the decoder, their weights "
                f"{_mib(self.linear_bytes_before)} -> {_mib(self.linear_bytes_after)}; the model "
                f"{_mib(self.model_bytes_before)} -> {_mib(self.model_bytes_after)} (embeddings and lm_head kept "
                "in their dtype)")


def check_quantization(method: str) -> None:
    """Refuse, before any model is loaded, a ``method`` other than :data:`QUANTIZATION_METHODS`, or one whose
    library (torchao) is not installed: ValueError naming ``--quantization`` and the value."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got {method!r}")
    if method != "none":
        _torchao(method)


def quantize_model(model: nn.Module, method: str) -> QuantizationReport:
    """Quantize ``model``'s decoder Linear weights in place by ``method`` (``none``: leave them) and return what
    changed. ``model``: a RetNet causal LM, classifier or backbone, already on the device it will run on (torchao
    quantizes where the weight is). Linear layers already quantized are left as they are, so a second call changes
    nothing. Raises ValueError naming ``--quantization`` for an unknown method or a missing torchao."""
    check_quantization(method)
    layers = _decoder_linears(model)
    linear_before, model_before = sum(_tensor_bytes(m.weight) for m in layers), _model_bytes(model)
    pending = [m for m in layers if not is_quantized_tensor(m.weight)]
    if method != "none" and pending:
        for module in pending:
            module.weight = nn.Parameter(_int8_weight(module.weight.detach()), requires_grad=False)
        for module in layers:
            if is_quantized_tensor(module.weight) and not getattr(module, "_retnet_int8_hooks", False):
                module.register_load_state_dict_pre_hook(_quantized_weight)
                module._retnet_int8_hooks = True
    report = QuantizationReport(method, len(pending) if method != "none" else 0, linear_before,
                                sum(_tensor_bytes(m.weight) for m in layers), model_before, _model_bytes(model))
    logger.info("%s", report)
    return report


def is_quantized_tensor(value) -> bool:
    """A torchao tensor (what :func:`quantize_model` makes of a weight): safetensors cannot write one."""
    return type(value).__module__.split(".", 1)[0] == "torchao"


def dequantized(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each torchao weight dequantized onto the CPU, one at a time (the device holds one layer's
    copy at most); the other tensors as they are. What a quantized model's ``save_pretrained`` writes."""
    return {key: value.detach().dequantize().cpu() if is_quantized_tensor(value) else value
            for key, value in state_dict.items()}


def dequantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` (which keeps the int8 tensors) as the float weights the model computes with."""
    return dequantized(model.state_dict())


def _quantized_weight(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """A float weight loaded into a quantized Linear (a state dict saved from it, or from the unquantized model):
    quantized as quantize_model does, or the weight itself when it is already what the layer computes with (so a
    state dict's round trip keeps the int8 codes exactly)."""
    key, current = prefix + "weight", module.weight
    incoming = state_dict.get(key)
    if incoming is None or is_quantized_tensor(incoming) or not is_quantized_tensor(current) or incoming.shape != current.shape:
        return  # loaded as it is (a wrong shape is load_state_dict's own error, naming the key)
    with torch.no_grad():
        dense = current.dequantize()
        if torch.equal(incoming.to(device=dense.device, dtype=dense.dtype), dense):
            state_dict[key] = current.detach()
            return
        state_dict[key] = _int8_weight(incoming.to(device=dense.device, dtype=dense.dtype))


def unclipped_int8() -> bool:
    """Whether this torchao quantizes without clipping (idempotent): its ``Int8WeightOnlyConfig`` builds the
    ``Int8Tensor`` (version 2, the default from 0.18), whose ``from_hp`` takes a mapping type. Before 0.18 the
    config built another class; 0.15's ``Int8Tensor`` floored a bf16 row's scale at bf16's eps (codes of ±11, 23%
    off the logits), and 0.16-0.17 stored it in bf16 (not idempotent either): those keep their config's own path."""
    return _unclipped(*_torchao("int8"))


def _unclipped(quantization, config) -> bool:
    """:func:`unclipped_int8` of torchao's ``quantization`` module and its int8 ``config``."""
    int8_tensor = getattr(quantization, "Int8Tensor", None)
    return (getattr(config, "version", 1) >= 2 and int8_tensor is not None and hasattr(quantization, "MappingType")
            and "mapping_type" in inspect.signature(int8_tensor.from_hp).parameters)


def _int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (float, ``[out, in]``) as torchao's int8 tensor, one scale per output row."""
    quantization, config = _torchao("int8")
    if not _unclipped(quantization, config):
        # an older torchao: its config's own scale, max|w| / 127.5 (not idempotent)
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
        quantization.quantize_(layer, config)
        return layer.weight.detach()
    # torchao's default max|w| / 127.5 clips the extreme to 127 (or rounds it to -128): its dequantized row peaks
    # at 127 or 128 steps, whose own scale is another one, so a saved quantized model requantized at load would
    # move every row (~0.6% on the logits, over half of what int8 costs). Without clipping, the extreme code is
    # exactly 127 or -128, and requantizing the dequantized row finds the same scale and codes.
    return quantization.Int8Tensor.from_hp(weight, quantization.PerRow(),
                                           mapping_type=quantization.MappingType.SYMMETRIC_NO_CLIPPING_ERR)


def _torchao(method: str):
    """(torchao.quantization, ``method``'s config); ValueError naming the flag and the install command when
    torchao is missing."""
    # torchao logs a warning for each of its CUDA extensions a CPU build of torch cannot load, and torch one for
    # an enum torchao registers; int8 weight-only uses neither, and a server log should not look broken over it.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        import torchao.quantization as quantization
    except ImportError as exc:
        raise ValueError(f"--quantization {method} needs torchao, which is not installed ({exc}): "
                         f"{INSTALL_HINT}") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    config = getattr(quantization, "Int8WeightOnlyConfig", None)
    if config is None:  # a torchao older than the [quant] extra's floor
        raise ValueError(f"--quantization {method} needs torchao >= 0.14 (Int8WeightOnlyConfig); this one is "
                         f"{getattr(__import__('torchao'), '__version__', 'older')}: {INSTALL_HINT}")
    # set_inductor_config=False: torchao would otherwise change torch._inductor's global settings, for a
    # torch.compile nobody runs here.
    return quantization, config(set_inductor_config=False)


def _decoder_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers inside the backbone's decoder layers (not the embedding, lm_head or a score
    head)."""
    backbone = getattr(model, "base_model", model)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"--quantization: expected a RetNet (its backbone's decoder `layers`); got "
                         f"{type(model).__name__}")
    return [module for module in layers.modules() if isinstance(module, nn.Linear)]


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` holds: a tensor subclass's (torchao's int8 data, scales, zero points) summed over the
    inner tensors it is made of, nested ones included."""
    if is_quantized_tensor(tensor) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(inner) for name in names if (inner := getattr(tensor, name)) is not None)
    return tensor.numel() * tensor.element_size()


def _model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:  # a tied lm_head is the embedding's tensor
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


__all__ = ["QUANTIZATION_METHODS", "QuantizationReport", "check_quantization", "dequantized", "dequantized_state_dict",
           "is_quantized_tensor", "quantize_model"]
