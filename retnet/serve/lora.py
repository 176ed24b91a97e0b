"""LoRA adapters served beside the base model, several in one batch (vLLM's ``--lora-modules``).

An adapter is what peft's ``save_pretrained`` writes: ``adapter_config.json`` and ``adapter_model.safetensors``
with, per targeted ``nn.Linear``, ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]``. It is read here with safetensors and json alone (no peft at serve time), checked against the base
model at startup, and applied unmerged: each targeted Linear is replaced by a :class:`LoraLinear` that adds
``scale * (x @ A.T) @ B.T`` to the tokens of each adapter's requests only, so rows of one decode batch (and the
pieces of one packed prefill) may each run under another adapter or the base model.

DoRA adapters (``use_dora``) also hold ``...lora_magnitude_vector`` ``[out]``, ``m``. Their Linear computes
``m / ||W + scale*B A||_row * (W x + scale * B A x)`` (+ the bias), with the norm of each output row of the
adapted weight, a constant of the adapter: it is computed once, in fp32, when the adapter is installed on the
model's weights, and the forward only multiplies that adapter's rows by it. This is peft's ``DoraLinearLayer`` in
eval (which detaches the norm: it trains as a constant too) and what its ``merge_and_unload`` folds into the weight.

The engine says which adapter each token of the next forward runs under (:meth:`LoraSlots.tokens`): per row of a
decode batch ``[B, 1]``, per sequence of a packed prefill row (``cu_seqlens``), or one for a single piece. Slot 0
is the base model: its tokens cost nothing, and with no adapter loaded no module is wrapped at all.

Adapters may also come and go while the server runs (vLLM's ``/v1/load_lora_adapter``): :func:`install_adapter`
adds one under a slot number never used before, wrapping the Linear layers no adapter wrapped yet, and
:func:`uninstall_adapter` drops a slot's matrices; both are called by the thread that runs the forwards, between
two of them.

A server bounding the adapters it holds (``--max-cpu-loras``) drops an idle adapter's matrices
(:func:`uninstall_adapter`) and reads it again from its directory when a request needs it (:func:`read_again`),
under the same slot, provided its files are the ones first read (:func:`files_fingerprint`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# peft's key prefix: the PeftModel's ``base_model`` (a LoraModel) holding the causal LM as ``model``.
KEY_PREFIX = "base_model.model."
# peft writes DoRA's magnitude without ".weight" (its state-dict name for it is ...lora_magnitude_vector.weight).
_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<part>[AB])\.weight|lora_magnitude_vector(?:\.weight)?)$")
# Modules whose rows are not the forward's tokens (the embedding's input is ids; lm_head sees only the positions
# whose logits are kept), so a per-token adapter index cannot be applied to them.
_NOT_PER_TOKEN = ("lm_head", "embed_tokens")


@dataclass(slots=True)
class LoraModule:
    """One ``--lora-modules`` entry: ``name=path`` or vLLM's JSON ``{"name", "path", "base_model_name"}``."""

    name: str
    path: str
    base_model_name: str | None = None


@dataclass(slots=True)
class LoraAdapter:
    """An adapter read and checked: per module name (``model.layers.0.retention.q_proj``), ``A`` ``[r, in]`` and
    ``B`` ``[out, r]`` with the scale folded into ``B`` (fp32, on the CPU until installed)."""

    name: str
    path: str
    base_model_name: str | None
    rank: int  # the largest of its modules' ranks
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # DoRA (use_dora): per module, its magnitude m [out] (fp32); the scale it makes needs the base weight, so
    # install_adapter computes it.
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    # Its LoraSlots number, given by the engine (0 until then). Never reused after an unload: prefix-cache entries
    # and sessions keyed by a slot then cannot be taken up by a later adapter of the same name.
    slot: int = 0
    # The directory its files were read from (a hub id's snapshot), and their files_fingerprint then: an adapter
    # evicted under --max-cpu-loras is read again from there, and only if the files are still those.
    directory: str = ""
    fingerprint: tuple[int, ...] = ()


class LoraError(ValueError):
    """An adapter this server cannot serve; the message names the adapter and the field."""


class LoraChanged(LoraError):
    """An evicted adapter's files are not the ones its slot was first read from (:func:`read_again`)."""


def parse_lora_modules(value) -> list[LoraModule]:
    """``--lora-modules`` items (``name=path``, a JSON object, or a dict) as :class:`LoraModule`; a whole
    environment value may also be a JSON list or whitespace-separated items."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        value = json.loads(text) if text.startswith("[") else [text] if text.startswith("{") else text.split()
    if isinstance(value, (dict, LoraModule)):
        value = [value]
    modules = []
    for item in value:
        if isinstance(item, LoraModule):
            modules.append(item)
            continue
        if isinstance(item, str) and item.strip().startswith("{"):
            item = json.loads(item)
        if isinstance(item, dict):
            unknown = set(item) - {"name", "path", "base_model_name"}
            if unknown or not item.get("name") or not item.get("path"):
                raise ValueError(f"lora_modules: a JSON entry needs 'name' and 'path' (and may have "
                                 f"'base_model_name'); got {item!r}")
            # Each is a model card's string (base_model_name its parent): a number or an object there made every
            # GET /v1/models a 500 for as long as the server ran.
            wrong = next((key for key in ("name", "path", "base_model_name")
                          if not isinstance(item.get(key), str) and not (key == "base_model_name"
                                                                         and item.get(key) is None)), None)
            if wrong is not None:
                raise ValueError(f"lora_modules: {wrong} must be a string; got {json.dumps(item[wrong])} in {item!r}")
            modules.append(LoraModule(item["name"], item["path"], item.get("base_model_name")))
            continue
        name, sep, path = str(item).partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"lora_modules: each entry is name=path (or vLLM's JSON form); got {item!r}")
        modules.append(LoraModule(name.strip(), path.strip()))
    names = [m.name for m in modules]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"lora_modules: each adapter needs its own name; {duplicated[0]!r} is given twice")
    return modules


def load_adapter(module: LoraModule, linears: dict[str, nn.Linear], max_rank: int) -> LoraAdapter:
    """Read and check one adapter against the base model's ``linears`` (module name -> its Linear; only shapes
    are read, so a meta-device model does). Raises :class:`LoraError` naming the adapter and the field."""
    from safetensors.torch import load_file

    from retnet.model.hub import ADAPTER_FILES, HubError, resolve_pretrained

    where = f"LoRA adapter {module.name!r} ({module.path})"
    try:  # a hub id (org/name) is its snapshot, as peft and vLLM read it
        root = resolve_pretrained(module.path, allow_patterns=ADAPTER_FILES)
    except HubError as exc:
        raise LoraError(f"LoRA adapter {module.name!r}: {exc}") from None
    if not (root / CONFIG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        raise LoraError(f"{where}: expected peft's {CONFIG_FILE} and {WEIGHTS_FILE} in the directory")
    try:  # before reading: a file replaced during the read then differs from it at the next read_again
        fingerprint = files_fingerprint(root)
    except OSError as exc:
        raise LoraError(f"{where}: its files could not be read: {exc}") from exc
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise LoraError(f"{where}: {CONFIG_FILE} is not JSON: {exc}") from exc
    if not isinstance(config, dict):  # read below with .get: a list would fail as a 500, not name the file
        raise LoraError(f"{where}: {CONFIG_FILE} must be a JSON object (peft's LoraConfig); got "
                        f"{type(config).__name__}")
    _check_config(where, config)
    try:
        tensors = load_file(str(root / WEIGHTS_FILE))
    except Exception as exc:  # safetensors' own error type: a truncated or foreign file
        raise LoraError(f"{where}: {WEIGHTS_FILE} could not be read: {' '.join(str(exc).split())}") from exc
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not key.startswith(KEY_PREFIX) or match is None:
            raise LoraError(f"{where}: weight {key!r} is not a LoRA A/B matrix of a Linear (expected "
                            f"'{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight', and DoRA's "
                            f"'.lora_magnitude_vector'; embeddings, biases and modules_to_save are not supported)")
        name = match["module"][len(KEY_PREFIX):]
        parts.setdefault(name, {})[match["part"] or "m"] = tensor
    if not parts:
        raise LoraError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")
    rank_pattern, alpha_pattern = _patterns(where, config, "rank_pattern"), _patterns(where, config, "alpha_pattern")
    adapter = LoraAdapter(module.name, module.path, module.base_model_name, 0, directory=str(root),
                          fingerprint=fingerprint)
    for name, pair in sorted(parts.items()):
        if name.split(".")[-1] in _NOT_PER_TOKEN:
            raise LoraError(f"{where}: target_modules: {name!r} is not supported (only the layers' Linear "
                            f"projections; not the embedding or lm_head)")
        linear = linears.get(name)
        if linear is None:
            raise LoraError(f"{where}: target_modules: {name!r} is not a Linear layer of the base model")
        magnitude = pair.pop("m", None)
        if bool(config.get("use_dora")) != (magnitude is not None):
            raise LoraError(f"{where}: use_dora = {config.get('use_dora')!r} but {name!r} has "
                            f"{'a' if magnitude is not None else 'no'} lora_magnitude_vector (DoRA's magnitudes)")
        if set(pair) != {"A", "B"}:
            raise LoraError(f"{where}: {name!r} has " + (f"lora_{next(iter(pair))} without its other matrix"
                                                          if pair else "lora_magnitude_vector without lora_A/B"))
        a, b = pair["A"], pair["B"]
        r = a.shape[0] if a.dim() == 2 else 0
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != linear.in_features or b.shape != (linear.out_features, r):
            raise LoraError(f"{where}: {name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the base "
                            f"model's Linear is [{linear.out_features}, {linear.in_features}], so they must be "
                            f"[r, {linear.in_features}] and [{linear.out_features}, r]")
        if r < 1:  # its scale, alpha / r, would divide by zero (peft refuses r <= 0 too)
            raise LoraError(f"{where}: r: {name!r} has rank 0 in its weights; a LoRA rank is at least 1")
        expected_r = _number(where, "r / rank_pattern",
                             _pattern_value(where, "rank_pattern", rank_pattern, name, config.get("r")), int)
        if expected_r is not None and expected_r != r:
            raise LoraError(f"{where}: r / rank_pattern: {name!r} has rank {r} in its weights but {expected_r} in "
                            f"{CONFIG_FILE}")
        if r > max_rank:
            raise LoraError(f"{where}: r: {name!r} has rank {r}, over max_lora_rank ({max_rank}; raise "
                            f"--max-lora-rank)")
        if magnitude is not None and tuple(magnitude.shape) != (linear.out_features,):
            raise LoraError(f"{where}: {name!r} has lora_magnitude_vector {tuple(magnitude.shape)}; the base "
                            f"model's Linear has {linear.out_features} outputs, so it must be "
                            f"[{linear.out_features}]")
        alpha = _number(where, "lora_alpha / alpha_pattern", _pattern_value(where, "alpha_pattern", alpha_pattern,
                                                                             name, config.get("lora_alpha", 8)), float)
        if alpha is None:
            raise LoraError(f"{where}: lora_alpha / alpha_pattern: {name!r} has no alpha (null)")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        a, b = a.float().contiguous(), (b.float() * scale).contiguous()
        magnitude = None if magnitude is None else magnitude.float().contiguous()
        # A diverged run's export: its tokens would all decode as NaN logits (garbage text, a logprobs answer a 500).
        for part, tensor in (("lora_A", a), ("lora_B", b), ("lora_magnitude_vector", magnitude)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise LoraError(f"{where}: {name!r} has a {part} holding values that are not finite (NaN or inf); "
                                "an adapter from a training run that diverged cannot be served")
        adapter.weights[name] = (a, b)
        if magnitude is not None:
            adapter.magnitudes[name] = magnitude
        adapter.rank = max(adapter.rank, r)
    return adapter


def files_fingerprint(directory: str | Path) -> tuple[int, ...]:
    """``(size, mtime_ns)`` of the adapter's config and weights files in ``directory``: cheap (two ``stat``), and
    any rewrite of either file changes it. Raises OSError when a file is gone."""
    out: tuple[int, ...] = ()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        stat = (Path(directory) / name).stat()
        out += (stat.st_size, stat.st_mtime_ns)
    return out


def read_again(adapter: LoraAdapter, linears: dict[str, nn.Linear], max_rank: int) -> LoraAdapter:
    """``adapter`` (evicted: its matrices freed) read again from its ``directory``, as :func:`load_adapter` does,
    returned as a new :class:`LoraAdapter` holding the matrices. Raises :class:`LoraChanged` when its files
    differ from those first read (its slot's cached states were computed under those), :class:`LoraError` when
    they cannot be read or are refused (a directory gone, a file truncated)."""
    where = f"LoRA adapter {adapter.name!r} ({adapter.directory})"
    try:
        now = files_fingerprint(adapter.directory)
    except OSError as exc:
        raise LoraError(f"{where} was evicted (--max-cpu-loras) and could not be read again: {exc}") from exc
    if now != adapter.fingerprint:
        raise LoraChanged(f"{where} was evicted (--max-cpu-loras) and its files have changed since it was loaded "
                          f"(size or modification time of {CONFIG_FILE} / {WEIGHTS_FILE}); reload it with "
                          f"/v1/load_lora_adapter and load_inplace, or restart the server, to serve the new files")
    try:
        fresh = load_adapter(LoraModule(adapter.name, adapter.directory, adapter.base_model_name), linears,
                             max_rank)
    except LoraError as exc:
        raise LoraError(f"{exc} (read again after an eviction, --max-cpu-loras)") from exc
    try:  # load_adapter's fingerprint is taken before it reads: a file rewritten during the read shows only after
        after = files_fingerprint(adapter.directory)
    except OSError as exc:
        raise LoraError(f"{where} was evicted (--max-cpu-loras) and could not be read again: {exc}") from exc
    if fresh.fingerprint != adapter.fingerprint or after != adapter.fingerprint:
        raise LoraChanged(f"{where} was evicted (--max-cpu-loras) and its files changed while it was read again")
    fresh.slot, fresh.path = adapter.slot, adapter.path
    return fresh


# adapter_config.json fields that, set, change the model in a way LoraLinear does not apply, and why.
UNSUPPORTED_WHEN_SET = {
    "lora_bias": "lora_B without a bias only",
    "modules_to_save": "whole modules replaced",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "target_parameters": "LoRA on bare parameters",
    "trainable_token_indices": "trained embedding rows",
    "layer_replication": "layers added to the base model",
}


def _check_config(where: str, config: dict) -> None:
    """Refuse, naming the field, what would change the model in a way :class:`LoraLinear` does not apply."""
    def refuse(name: str, why: str):
        raise LoraError(f"{where}: {name} = {config.get(name)!r} is not supported ({why})")

    if config.get("peft_type", "LORA") != "LORA":
        refuse("peft_type", "only LoRA adapters")
    if config.get("bias", "none") != "none":
        refuse("bias", "only bias='none': trained biases would change the base model's")
    for name, why in UNSUPPORTED_WHEN_SET.items():
        if config.get(name):
            refuse(name, why)
    # PiSSA, CorDA, OLoRA, LoRA-GA and LoftQ start from (and save beside) changed base weights: their adapters hold
    # the difference to those, not to this model's, unless peft converted them back (it then writes True here).
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "corda", "olora", "lora_ga", "loftq")):
        refuse("init_lora_weights", "the adapter was trained on changed base weights; convert it to a plain LoRA "
               "adapter with peft's save_pretrained(path_initial_model_for_weight_conversion=...)")
    # Newer LoRA variants whose forward is not base + scale * B A x (activated LoRA, routing, quantized or block
    # variants): refused rather than served wrong.
    for name in ("alora_invocation_tokens", "arrow_config", "use_bdlora", "use_qalora", "kasa_config",
                 "monteclora_config", "velora_config"):
        if config.get(name):
            refuse(name, "a LoRA variant whose forward this server does not apply")


def _patterns(where: str, config: dict, key: str) -> dict:
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise LoraError(f"{where}: {key} must be an object (module pattern -> value); got {json.dumps(patterns)[:80]}")
    return patterns


def _number(where: str, field: str, value, kind):
    """``value`` (a config number) as ``kind``, None kept; a 400 naming ``field`` for anything else (a string, a
    list, a boolean), not a 500."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise LoraError(f"{where}: {field} must be a number; got {json.dumps(value)[:80]}")
    try:
        # float first: int(2.7) would silently serve a rank-2.7 config as 2, and int() of an infinity (JSON's
        # 1e400 or Infinity) or float() of a 400-digit integer raise OverflowError, which was a 500 / traceback
        number = float(value)
    except ValueError:
        raise LoraError(f"{where}: {field} must be a number; got {json.dumps(value)[:80]}") from None
    except OverflowError:  # an integer past float's range
        number = math.inf
    if not math.isfinite(number):
        raise LoraError(f"{where}: {field} must be finite; got {json.dumps(value)[:80]}")
    if kind is int:
        if not number.is_integer():
            raise LoraError(f"{where}: {field} must be a whole number (a rank); got {json.dumps(value)[:80]}")
        return int(number)
    return number


def _pattern_value(where: str, key: str, patterns: dict, name: str, default):
    """peft's rule (``get_pattern_key``): the first pattern matching the module name's end. A key that is no
    regular expression is the adapter's error, naming ``key`` (re.error is no ValueError: it was a 500)."""
    for pattern, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", name)
        except re.error as exc:
            raise LoraError(f"{where}: {key}: {pattern!r} is not a regular expression ({exc})") from None
        if matched:
            return value
    return default


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Module name -> the base model's Linear at that name (a wrapped one's own Linear: adapters are checked
    against the base model, whatever is installed already)."""
    modules = dict(model.named_modules())
    out = {}
    for name, module in modules.items():
        if isinstance(module, LoraLinear):
            out[name] = module.base
        elif isinstance(module, nn.Linear) and not isinstance(modules.get(name.rpartition(".")[0]), LoraLinear):
            out[name] = module
    return out


def meta_model(config) -> nn.Module:
    """The base model's modules without weights (for checking adapters' shapes before the model loads)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class LoraSlots:
    """Which adapter each token of the next forward runs under, shared by every :class:`LoraLinear` of a model.

    ``groups``: per adapter slot present (never 0, the base), the flat token indices of its tokens, or None
    when every token is its own. Empty: the forward is the base model's.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        self.num_tokens = 0

    @contextlib.contextmanager
    def tokens(self, slots: list[int], counts: list[int] | None = None):
        """For the forward run inside: ``slots[i]`` is the adapter of the i-th row (a decode batch, ``counts``
        None: one token each) or of the i-th packed sequence (``counts[i]`` tokens, in order)."""
        counts = counts if counts is not None else [1] * len(slots)
        self.num_tokens = sum(counts)
        present = sorted(set(slots) - {0})
        if len(present) == 1 and all(s == present[0] for s in slots):
            self.groups = [(present[0], None)]  # every token under one adapter: no gather, no scatter
        elif present:
            per_token = torch.repeat_interleave(torch.tensor(slots), torch.tensor(counts))
            self.groups = [(slot, torch.nonzero(per_token == slot).flatten().to(self.device)) for slot in present]
        try:
            yield
        finally:
            self.groups = []


class LoraLinear(nn.Module):
    """``base(x)`` plus, for each adapter's tokens, ``(x @ A.T) @ B.T`` (the scale is in ``B``): peft's unmerged
    LoRA, per token. A DoRA adapter's tokens then have that sum (less the bias) multiplied by its per-output
    scale ``m / ||W + B A||_row`` (:func:`dora_scale`). ``x`` is ``[..., in]``; its flattened leading dimensions
    are the forward's tokens."""

    def __init__(self, base: nn.Linear, slots: LoraSlots):
        super().__init__()
        self.base = base
        self.slots = slots
        # slot -> (A [r, in], B*scale [out, r], DoRA's scale [out] or None for plain LoRA)
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    @property
    def weight(self) -> torch.Tensor:  # the base model's weight, for code that reads it (tied embeddings ...)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        groups = self.slots.groups
        if not groups:
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if flat_x.shape[0] != self.slots.num_tokens:
            raise RuntimeError(f"LoRA: the forward has {flat_x.shape[0]} tokens; the adapter slots were set for "
                               f"{self.slots.num_tokens}")
        for slot, index in groups:
            weights = self.adapters.get(slot)
            if weights is None:
                continue  # this adapter leaves the module as it is
            a, b, dora = weights
            if dora is None:
                if index is None:
                    flat_y.addmm_(flat_x @ a.T, b.T)
                else:
                    flat_y.index_add_(0, index, (flat_x[index] @ a.T) @ b.T)
                continue
            # DoRA rescales W x + B A x; the bias is added after, unscaled (peft's forward and merged weight).
            bias = self.base.bias
            rows, rows_x = (flat_y, flat_x) if index is None else (flat_y[index], flat_x[index])
            if bias is not None:
                rows.sub_(bias)
            rows.addmm_(rows_x @ a.T, b.T).mul_(dora)
            if bias is not None:
                rows.add_(bias)
            if index is not None:
                flat_y.index_copy_(0, index, rows)
        return y


def install(model: nn.Module, adapters: list[LoraAdapter], device: torch.device, dtype: torch.dtype) -> LoraSlots:
    """Replace each Linear some adapter targets by a :class:`LoraLinear` holding every adapter's matrices (each
    under its ``slot``), in ``dtype`` on ``device``. Returns the slots the engine sets before each forward."""
    slots = LoraSlots(device)
    for adapter in adapters:
        install_adapter(model, slots, adapter, dtype)
    return slots


def install_adapter(model: nn.Module, slots: LoraSlots, adapter: LoraAdapter, dtype: torch.dtype) -> None:
    """Put ``adapter``'s matrices under its ``slot`` in every Linear it targets, wrapping those not wrapped yet
    (in ``dtype`` on ``slots.device``). Only between forwards: a forward must not see a half-installed adapter. If
    a copy fails (out of device memory), what was installed of it is taken out again before the error leaves."""
    if adapter.slot < 1:
        raise ValueError(f"LoRA adapter {adapter.name!r}: slot {adapter.slot}; slot 0 is the base model's")
    try:
        for name, (a, b) in adapter.weights.items():
            module = model.get_submodule(name)
            if not isinstance(module, LoraLinear):
                parent_name, _, attr = name.rpartition(".")
                module = LoraLinear(module, slots)
                setattr(model.get_submodule(parent_name), attr, module)
            magnitude = adapter.magnitudes.get(name)
            dora = None if magnitude is None else dora_scale(module.base.weight, a, b, magnitude)
            module.adapters[adapter.slot] = (a.to(slots.device, dtype), b.to(slots.device, dtype),
                                             None if dora is None else dora.to(slots.device, dtype))
    except BaseException:
        uninstall_adapter(model, adapter.slot)
        raise


def dora_scale(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output scale ``m / ||W + B A||`` ``[out]``, fp32, the norm of each row of the adapted weight
    (over the input dimension): ``weight`` the base Linear's ``[out, in]``, ``a`` ``[r, in]``, ``b`` ``[out, r]``
    with the LoRA scale in it, ``magnitude`` ``[out]``. On ``weight``'s device: the model's real weights, which is
    why it is computed at install time, not when the adapter is read (against shapes only)."""
    with torch.no_grad():
        # A --quantization int8 weight (a tensor subclass) as the float matrix its layer computes with; a plain
        # weight as it is (aten's dequantize of a float tensor exists on CPU and CUDA only).
        w = weight.dequantize() if type(weight) not in (torch.Tensor, nn.Parameter) else weight
        w = w.detach().to(torch.float32)
        adapted = torch.addmm(w, b.to(w.device, torch.float32), a.to(w.device, torch.float32))
        return magnitude.to(w.device, torch.float32) / torch.linalg.vector_norm(adapted, dim=1)


def uninstall_adapter(model: nn.Module, slot: int) -> None:
    """Free adapter ``slot``'s matrices in every wrapped Linear. The wrappers stay: a module no adapter adapts
    any more costs the check that none is present, as the base model's tokens do."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.adapters.pop(slot, None)


__all__ = ["LoraAdapter", "LoraChanged", "LoraError", "LoraLinear", "LoraModule", "LoraSlots", "dora_scale",
           "files_fingerprint", "install", "install_adapter", "linear_modules", "load_adapter", "meta_model",
           "parse_lora_modules", "read_again", "uninstall_adapter"]
