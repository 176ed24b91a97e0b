"""RetNet model configuration.

Every architectural choice of the paper (Sun et al., 2023, "Retentive Network") is a field whose default is
the paper's value. A configuration that cannot work is refused when it is built or loaded, with the field's
name and the value received.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from transformers import PretrainedConfig

from retnet.model.activations import validate_activation

RETENTION_MODES = ("auto", "parallel", "chunkwise", "recurrent")
NORM_TYPES = ("layernorm", "rmsnorm")
DECAY_SCHEDULES = ("paper", "linspace")
# transformers' sequence-classification losses (ForSequenceClassificationLoss), which the server's scores follow.
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# The retention ops' largest head dim (retnet.kernels.checks.MAX_HEAD_DIM; a test keeps them equal), here
# so that loading a config does not import the kernels.
MAX_HEAD_DIM = 512
# torch's sizes and element counts are int64.
TORCH_SIZE_LIMIT = 2**63
BOOL_FIELDS = ("ffn_glu", "ffn_bias", "use_head_norm", "use_output_gate", "use_xpos", "use_cache",
               "tie_word_embeddings", "fuse_linear_cross_entropy")
# JSON or TOML may give a whole number as an int (value_factor = 2), which is fine; a bool or a string is not.
FLOAT_FIELDS = ("value_factor", "rms_norm_eps", "rope_theta", "xpos_scale_base", "decay_exponent_min",
                "decay_exponent_max", "initializer_range", "dropout")
# The sizes of torchscale's RetNet config, which its transformers ports save under model_type "retnet" as well.
FOREIGN_RETNET_FIELDS = frozenset({"decoder_embed_dim", "decoder_value_embed_dim", "decoder_ffn_embed_dim",
                                   "decoder_layers", "decoder_retention_heads"})


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True is not a size.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    # An int beyond float's range (10**400, which JSON and TOML read) makes math.isfinite raise OverflowError.
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _plain_numbers(value: Any) -> Any:
    """``value`` (and the dicts and lists in it) with each real number of another type than Python's (np.float32,
    np.int64, ...) as a Python int or float."""
    if isinstance(value, dict):
        return {key: _plain_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(item) for item in value]
    if isinstance(value, numbers.Real) and type(value) not in (bool, int, float):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return value


# The paper's sizes (Table 1 of Sun et al., 2023) and a tiny one for tests and the CPU demo.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, chunk_size=32,
        tie_word_embeddings=True,
    ),
    "small": dict(
        vocab_size=16384, hidden_size=512, num_hidden_layers=6, num_attention_heads=4, tie_word_embeddings=True,
    ),
    "retnet-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=8),
    "retnet-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=10),
    "retnet-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=16),
}


class RetNetConfig(PretrainedConfig):
    r"""Configuration of a RetNet decoder.

    Shapes: ``hidden_size = d``; each of the ``num_attention_heads = H`` retention heads has a key/query
    dimension ``head_dim`` (default ``d / H``; 256 in the paper's sizes) and a value dimension
    ``value_factor · d / H`` (paper: value_factor 2). The FFN is ``intermediate_size`` wide (paper: 2d).

    ``hidden_act`` is one activation name for every layer or a list with one name per layer (``identity``
    makes a layer's FFN linear); ``hidden_act_kwargs`` is one dict of parameters or a list of dicts.
    Decay: ``decay_schedule="paper"`` gives γ_h = 1 − 2^(−5−h); ``"linspace"`` spaces the exponent evenly
    from ``decay_exponent_min`` to ``decay_exponent_max`` across the heads.
    ``fuse_linear_cross_entropy``: in training mode with ``labels``, the loss is computed from the hidden
    states a chunk of tokens at a time and no logits are returned (their memory, the largest activation of a
    training step, is saved); evaluation and generation are unchanged.
    ``retention_mode``: ``auto`` picks the recurrent form for single-token steps, else the chunkwise form on
    the Triton path and, on the PyTorch references, the parallel form up to 256 tokens and the chunkwise one
    beyond; ``parallel``, ``chunkwise`` and ``recurrent`` force one (all three give the same result).
    """

    model_type = "retnet"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    head_dim: int | None = None
    value_factor: float = 2.0
    intermediate_size: int | None = None
    hidden_act: str | list[str] = "gelu"
    hidden_act_kwargs: dict | list[dict] | None = None
    ffn_glu: bool = False
    ffn_bias: bool = False
    norm_type: str = "layernorm"
    rms_norm_eps: float = 1e-6
    use_head_norm: bool = True
    use_output_gate: bool = True
    rope_theta: float = 10000.0
    use_xpos: bool = False
    xpos_scale_base: float = 512.0
    decay_schedule: str = "paper"
    decay_exponent_min: float = 5.0
    decay_exponent_max: float = 9.0
    chunk_size: int = 64
    retention_mode: str = "auto"
    initializer_range: float = 0.02
    dropout: float = 0.0
    use_cache: bool = True
    # Training with labels: the loss straight from the hidden states, a chunk of tokens at a time, without the
    # [B, T, vocab] logits (retnet.model.loss); the output's logits are then None.
    fuse_linear_cross_entropy: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        # torchscale's RetNet as its transformers ports write it (syncdoth/RetNet, model_type "retnet" too): with
        # trust_remote_code off, AutoConfig took its config.json for ours, every size the default's, and
        # from_pretrained built a random 1.3B model. No converter maps its layout (sub-LN, its own FFN and xPos).
        foreign = sorted(kwargs.keys() & FOREIGN_RETNET_FIELDS)
        if foreign:
            raise ValueError(f"RetNetConfig has no fields {', '.join(foreign)} (sizes are hidden_size, "
                             "num_hidden_layers, num_attention_heads, value_factor and intermediate_size): they are "
                             "torchscale's RetNet config (as syncdoth/RetNet writes it), another implementation, "
                             "whose checkpoints do not load here")
        # flash-linear-attention's RetNet config.json has the same model_type; its fields would be ignored
        # here and the weights fail to load under other names: say what to do instead.
        fla_fields = sorted(kwargs.keys() & {"expand_k", "expand_v", "attn_mode", "num_heads"})
        if fla_fields:
            raise ValueError(f"RetNetConfig has no fields {', '.join(fla_fields)} (heads are num_attention_heads, "
                             "sizes head_dim and value_factor): they are flash-linear-attention's RetNet config; "
                             "convert such a checkpoint with `retnet-convert-fla SRC DST`")
        # Derive only from real integers: a string here would raise a TypeError (or make 2 * "64" == "6464")
        # before validate_retnet could refuse the field by name.
        heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(heads) and heads > 0:
            self.head_dim = self.hidden_size // heads
        if self.intermediate_size is None and _is_int(self.hidden_size):
            self.intermediate_size = 2 * self.hidden_size
        self._check_transformers_fields(kwargs.get("torch_dtype"))
        # PretrainedConfig builds id2label from it with range(): "2" raised a TypeError, -1 gave a classifier of 0 labels
        # (and from_pretrained then a size mismatch on score.weight). from_pretrained(path, num_labels=...) comes here too.
        # None: as if left out (the labels of id2label, or transformers' default), where transformers' range(None)
        # raised a TypeError
        labels = kwargs.get("num_labels")
        if labels is None:
            kwargs.pop("num_labels", None)
        else:
            if not (isinstance(labels, numbers.Integral) and not isinstance(labels, bool) and labels >= 1):
                raise ValueError(f"RetNetConfig.num_labels must be a positive integer (the classifier's outputs); "
                                 f"got {labels!r}")
            kwargs["num_labels"] = int(labels)  # (a NumPy integer too)
        super().__post_init__(**kwargs)
        self.validate_retnet()

    def _check_transformers_fields(self, torch_dtype: Any) -> None:
        """Refuse what PretrainedConfig's own ``__post_init__`` reads unchecked: ``id2label=5`` raised AttributeError
        ('int' object has no attribute 'items'), ``dtype="x"`` AttributeError (module 'torch' has no attribute 'x')."""
        import torch

        for field, dtype in (("dtype", self.dtype), ("torch_dtype", torch_dtype)):
            named = isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
            if dtype is not None and not named and not isinstance(dtype, (torch.dtype, dict)):
                raise ValueError(f"RetNetConfig.{field} must be a torch dtype or its name ('float32', 'bfloat16' ...); "
                                 f"got {dtype!r}")
        if self.id2label is not None and not (isinstance(self.id2label, dict) and all(
                _is_int(key) or (isinstance(key, str) and key.removeprefix("-").isdecimal()) for key in self.id2label)):
            raise ValueError(f"RetNetConfig.id2label must be a dict of label ids (ints, or their strings as "
                             f"config.json keeps them) to names; got {self.id2label!r}")

    # -- derived sizes -------------------------------------------------------------------------------------
    @property
    def value_head_dim(self) -> int:
        return round(self.hidden_size * self.value_factor) // self.num_attention_heads

    @property
    def layer_activations(self) -> list[tuple[str, dict]]:
        """(name, kwargs) of the FFN activation of each layer."""
        return [self.layer_activation(layer) for layer in range(self.num_hidden_layers)]

    def layer_activation(self, layer: int) -> tuple[str, dict]:
        """(name, kwargs) of the FFN activation of layer ``layer``."""
        name = self.hidden_act[layer] if isinstance(self.hidden_act, list) else self.hidden_act
        kwargs = self.hidden_act_kwargs
        if isinstance(kwargs, list):
            kwargs = kwargs[layer]
        # validate_activation takes a null entry (config.json) as no parameters; so must the layers.
        return name, dict(kwargs or {})

    def log_decays(self) -> list[float]:
        """ln γ_h per head, computed in float64 as log1p(−2^−e) so γ ≈ 1 keeps its distance from 1."""
        heads = self.num_attention_heads
        if self.decay_schedule == "paper":
            exponents = [5.0 + h for h in range(heads)]
        else:
            step = (self.decay_exponent_max - self.decay_exponent_min) / max(heads - 1, 1)
            exponents = [self.decay_exponent_min + step * h for h in range(heads)]
        return [math.log1p(-(2.0 ** -e)) for e in exponents]

    # -- validation ----------------------------------------------------------------------------------------
    def validate_retnet(self) -> None:
        """Refuse a configuration that cannot work; the message names the field and the value."""

        def refuse(field: str, expected: str) -> None:
            raise ValueError(f"RetNetConfig.{field} {expected}; got {getattr(self, field)!r}")

        # A list of no stop ids (config.json "eos_token_id": []) means no EOS, as None does: kept as a list,
        # generate failed on an IndexError taking its first id for the pad, and the tokenizer check
        # (retnet.train.data) found the tokenizer's EOS "not the one the model was trained with".
        if isinstance(self.eos_token_id, list) and not self.eos_token_id:
            self.eos_token_id = None

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "chunk_size"):
            value = getattr(self, field)
            if not _is_int(value) or not 0 < value < TORCH_SIZE_LIMIT:
                refuse(field, "must be a positive integer below 2**63 (torch's sizes are int64)")
        # Types first, so the range checks below compare numbers and the truthiness tests read real bools
        # (use_head_norm="no" would otherwise count as true). config.json gives JSON true/false as bools.
        for field in BOOL_FIELDS:
            if not isinstance(getattr(self, field), bool):
                refuse(field, "must be a bool (true or false)")
        for field in FLOAT_FIELDS:
            value = getattr(self, field)
            if (not _is_int(value) and not isinstance(value, float)) or not _is_finite(value):
                refuse(field, "must be a finite number")
        if self.pad_token_id is not None and not _is_int(self.pad_token_id):
            refuse("pad_token_id", "must be None or an integer token id")
        for field in ("bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            ids = value if field == "eos_token_id" and isinstance(value, list) else [value]
            if value is not None and not all(_is_int(i) and 0 <= i < self.vocab_size for i in ids):
                refuse(field, f"must be None or a token id in [0, vocab_size={self.vocab_size})"
                       + (" or a list of them" if field == "eos_token_id" else ""))
        if self.hidden_size % self.num_attention_heads != 0:
            refuse("hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads}")
        # After the divisibility: unset, head_dim is hidden_size // num_attention_heads, 0 for hidden_size 1 and 4
        # heads, and its refusal named a field never given rather than the sizes.
        if not _is_int(self.head_dim) or not 0 < self.head_dim < TORCH_SIZE_LIMIT:
            refuse("head_dim", "must be a positive integer below 2**63 (torch's sizes are int64)")
        # A float value_factor rounds: 1600 * 1.1 is 1760.0000000000002, yet it means 1760 value dims.
        value_dims = self.hidden_size * self.value_factor
        # (1e308 * 16 is inf, which round() raises on)
        if (self.value_factor <= 0 or not math.isfinite(value_dims) or abs(value_dims - round(value_dims)) > 1e-9 * value_dims
                or round(value_dims) % self.num_attention_heads != 0):
            refuse("value_factor", f"must be > 0 and make value_factor * hidden_size ({self.hidden_size}) "
                   f"divisible by num_attention_heads={self.num_attention_heads}")
        # Unset, head_dim is derived from the sizes: its refusal says so, or it would name a field never given.
        derived = (f", by default hidden_size / num_attention_heads = {self.hidden_size} / {self.num_attention_heads}"
                   if self.head_dim == self.hidden_size // self.num_attention_heads else "")
        if self.head_dim % 2 != 0:
            refuse("head_dim", f"must be even (rotary position pairs the key dimensions){derived}")
        if self.head_dim > MAX_HEAD_DIM:
            refuse("head_dim", f"must be <= {MAX_HEAD_DIM} (the retention kernels' largest head dim){derived}")
        if self.value_head_dim > MAX_HEAD_DIM:
            refuse("value_factor", f"must keep the value head dim value_factor * hidden_size / num_attention_heads "
                   f"(now {self.value_head_dim}) <= {MAX_HEAD_DIM} (the retention kernels' largest head dim)")
        # torch indexes a tensor with int64: a weight of more elements cannot be built at all (the first nn.Linear
        # raised a TypeError on the overflow), however much memory there is.
        retention_rows = self.num_attention_heads * max(self.head_dim, self.value_head_dim)
        # hidden_size first: unset, intermediate_size is derived from it and would be named for it.
        for field, what, rows in (("hidden_size", "retention projection", retention_rows),
                                  ("vocab_size", "embedding", self.vocab_size),
                                  ("intermediate_size", "FFN", self.intermediate_size)):
            if rows * self.hidden_size >= TORCH_SIZE_LIMIT:
                refuse(field, f"must keep the {what} weight ({rows} x hidden_size {self.hidden_size}) below 2**63 "
                       "elements, torch's largest tensor")
        if self.retention_mode not in RETENTION_MODES:
            refuse("retention_mode", f"must be one of {RETENTION_MODES}")
        if self.norm_type not in NORM_TYPES:
            refuse("norm_type", f"must be one of {NORM_TYPES}")
        if self.decay_schedule not in DECAY_SCHEDULES:
            refuse("decay_schedule", f"must be one of {DECAY_SCHEDULES}")
        if self.decay_schedule == "linspace" and not 0 < self.decay_exponent_min <= self.decay_exponent_max:
            refuse("decay_exponent_min", f"must satisfy 0 < decay_exponent_min <= decay_exponent_max "
                   f"({self.decay_exponent_max})")
        if self.decay_schedule == "linspace" and not 2.0 ** -self.decay_exponent_min < 1.0:
            # γ = 1 − 2^−e would be 0 and ln γ (log_decays) −inf.
            refuse("decay_exponent_min", "must be large enough that 2^-decay_exponent_min < 1 (γ > 0)")
        if not self.rms_norm_eps > 0:
            refuse("rms_norm_eps", "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            refuse("dropout", "must be in [0, 1)")
        if not self.rope_theta > 0:
            refuse("rope_theta", "must be > 0")
        if self.use_xpos and not 0 < self.xpos_scale_base < math.inf:
            refuse("xpos_scale_base", "must be a finite number > 0 with use_xpos (positions are divided by it)")
        if not self.initializer_range >= 0:
            refuse("initializer_range", "must be >= 0 (it is the init's standard deviation)")
        # Not negative either: generate pads finished sequences with this id and embeds it, and a token id of -1
        # is out of the embedding's range (though nn.Embedding takes -1 for its padding row).
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            refuse("pad_token_id", f"must be None or a token id in [0, vocab_size={self.vocab_size}) (the "
                   "embedding's padding row)")
        # transformers reads it only in the classifier's loss (RuntimeError at the first labelled batch) and the server
        # only to pick the scores' activation, where a misspelt one fell silently to softmax.
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            refuse("problem_type", f"must be None (inferred from the labels) or one of {PROBLEM_TYPES}")
        # (single_label_classification with num_labels 1 is left to transformers, which refuses it at construction
        # only: its loss writes the type into a trained classifier's config, which from_pretrained(path,
        # num_labels=1, ignore_mismatched_sizes=True) re-heads, a reward model's start, as for its own models)
        if self.hidden_act_kwargs is not None and not isinstance(self.hidden_act_kwargs, (dict, list)):
            refuse("hidden_act_kwargs", "must be None, one dict of activation parameters or a list of one per layer")
        # A tuple (or any other non-list) would reach the per-layer check below as one name, refused as "(layer 0):
        # unknown activation ('gelu', 'relu')"; config.json gives a list.
        if not isinstance(self.hidden_act, (str, list)):
            refuse("hidden_act", "must be one activation name or a list of one per layer")
        if isinstance(self.hidden_act, list) and len(self.hidden_act) != self.num_hidden_layers:
            refuse("hidden_act", f"as a list must have one name per layer (num_hidden_layers="
                   f"{self.num_hidden_layers}), but has {len(self.hidden_act)}")
        # Checked here, not per layer below, so the refusal names this field rather than hidden_act.
        if isinstance(self.hidden_act_kwargs, list) and not all(k is None or isinstance(k, dict)
                                                                 for k in self.hidden_act_kwargs):
            refuse("hidden_act_kwargs", "as a list must hold one dict of parameters (or null) per layer")
        if isinstance(self.hidden_act_kwargs, list) and len(self.hidden_act_kwargs) != self.num_hidden_layers:
            refuse("hidden_act_kwargs", f"as a list must have one dict per layer (num_hidden_layers="
                   f"{self.num_hidden_layers}), but has {len(self.hidden_act_kwargs)}")
        # One activation for every layer is checked once: a per-layer pass would build a module for each of
        # num_hidden_layers (2**40 of them hung, then exhausted memory, before any refusal).
        per_layer = isinstance(self.hidden_act, list) or isinstance(self.hidden_act_kwargs, list)
        for layer in range(self.num_hidden_layers if per_layer else 1):
            name, kwargs = self.layer_activation(layer)
            try:
                validate_activation(name, kwargs)
            except ValueError as error:
                raise ValueError(f"RetNetConfig.hidden_act (layer {layer}): {error}") from None
        self._check_json()

    def _check_json(self) -> None:
        # config.json must hold every field: a TOML date (model.extra.output_attentions = 2020-01-01) was accepted and
        # failed when the run wrote its config.
        for field, value in self.to_dict().items():
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                raise ValueError(f"RetNetConfig.{field} must be a JSON value (config.json holds it); got "
                                 f"{value!r}") from None

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # The activations take any real number (numpy's included), which json cannot write: config.json, and the
        # config's repr, get the same values as Python numbers.
        output["hidden_act_kwargs"] = _plain_numbers(output.get("hidden_act_kwargs"))
        return output

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        # transformers sets from_pretrained's overrides (from_pretrained(path, chunk_size=0)) on the config
        # after building it, past __post_init__'s validation: check again with them applied.
        if "num_labels" in kwargs and kwargs["num_labels"] is None:  # as if left out (its setter: range(None))
            del kwargs["num_labels"]
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate_retnet()
        return result

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RetNetConfig:
        """A configuration of one of :data:`PRESETS` (``tiny``, ``small``, ``retnet-1.3b`` ...)."""
        if name not in PRESETS:
            raise ValueError(f"unknown RetNet preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["PRESETS", "RETENTION_MODES", "RetNetConfig"]
