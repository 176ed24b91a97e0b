"""LoRA fine-tuning through ``peft``: adapters on the decoder layers' Linear modules, the rest frozen.

    retnet-train --config small --model.init_from=runs/base/export --lora.rank=16 --lora.alpha=32

The trainer builds (or loads) the model, then :func:`apply_lora` injects ``peft``'s LoRA layers into it in
place, before DDP/FSDP, activation checkpointing and compile: the model keeps its own class and forward (the
``PeftModel`` around it is kept for ``save_pretrained``), its ``state_dict`` names the frozen weights
``….q_proj.base_layer.weight`` and the adapters ``….q_proj.lora_A.default.weight`` (with ``lora.use_dora``, also
DoRA's magnitudes ``….q_proj.lora_magnitude_vector.default.weight``, one per output row), and only the adapters
require a gradient, so the optimizer, DDP's buckets and FSDP's reduce-scatters hold only them.

Checkpoints of a run with ``model.init_from`` hold only the adapters (and their optimizer state): a resume
loads the pretrained weights from ``init_from`` again, and refuses when they are no longer the ones trained
on (:func:`base_fingerprint`). :func:`export_lora` writes the merged model (``merge_and_unload``: a plain
RetNet, servable as any export) and, in ``adapter/``, ``peft``'s own adapter format.

A reward model (``reward.enabled``: a ``RetNetForSequenceClassification``) is wrapped as peft's ``SEQ_CLS`` task, as
TRL's RewardTrainer with a peft config does: its ``score`` head is new, so peft's ``modules_to_save`` trains a copy of
it in full beside the adapters (``score.modules_to_save.default.weight``, the frozen original
``score.original_module.weight``). It is then one more trainable parameter: checkpoints of adapters hold it, the
merge puts the trained copy back as ``score``, and the adapter directory holds it (peft loads it onto
``AutoModelForSequenceClassification`` of the base).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from torch import nn

from retnet.train.config import LORA_TARGETS, ConfigError, LoraConfig

ADAPTER_DIR = "adapter"  # export/adapter: peft's save_pretrained
ADAPTER_NAME = "default"  # peft's adapter name, part of the state-dict keys (lora_A.default.weight)


def _present(layers: nn.Module) -> list[str]:
    """The ``LORA_TARGETS`` names of the Linear modules under ``layers``, in that order."""
    present = {name.rsplit(".", 1)[-1] for name, module in layers.named_modules() if isinstance(module, nn.Linear)}
    return [name for name in LORA_TARGETS if name in present]


def target_names(cfg: LoraConfig, model: nn.Module) -> list[str]:
    """The ``lora.target_modules`` names resolved against ``model`` (a ``RetNetForCausalLM``, or a reward model's
    ``RetNetForSequenceClassification``, whose ``score`` head is no target: it trains in full): those configured,
    each of which it must have, or every Linear name of ``LORA_TARGETS`` its decoder layers hold."""
    return resolve_targets(cfg, _present(model.model.layers))


def resolve_targets(cfg: LoraConfig, present: list[str]) -> list[str]:
    """:func:`target_names` of a model whose decoder layers hold the ``LORA_TARGETS`` Linears ``present``
    (:func:`default_targets` of its config): a ConfigError naming those it lacks."""
    if not cfg.target_modules:
        return list(present)
    missing = [name for name in cfg.target_modules if name not in present]
    if missing:
        raise ConfigError(f"lora.target_modules names modules this model does not have: {missing} (its decoder "
                          f"layers' Linear modules: {present}; g_proj needs use_output_gate, gate_proj ffn_glu); "
                          f"got {cfg.target_modules!r}")
    return list(cfg.target_modules)


def default_targets(model_config) -> list[str]:
    """What an empty ``lora.target_modules`` adapts on a model of ``model_config`` (a ``RetNetConfig``): every
    ``LORA_TARGETS`` Linear its decoder layers hold, read from one layer built on the meta device (no memory, no
    weights), so a resume compares targets before the data and the model are built."""
    import torch

    from retnet.model.modeling_retnet import RetNetDecoderLayer

    with torch.device("meta"):
        return _present(RetNetDecoderLayer(model_config, 0))


def task_type(model_class: type) -> str:
    """peft's task of a model of ``model_class``: ``SEQ_CLS`` for the classifier (a reward model), whose wrapper
    adds the ``score`` head to ``modules_to_save``, else ``CAUSAL_LM``."""
    from retnet.model import RetNetForSequenceClassification

    return "SEQ_CLS" if issubclass(model_class, RetNetForSequenceClassification) else "CAUSAL_LM"


def peft_config(cfg: LoraConfig, targets: list[str], task: str = "CAUSAL_LM"):
    """The ``peft.LoraConfig`` of this run (its ``base_model_name_or_path`` is set by :func:`_wrap`: the
    pretrained model's directory, absolute, so the adapter names its base wherever it is read). ``task``:
    :func:`task_type`; with ``SEQ_CLS`` peft's wrapper sets ``modules_to_save`` (``["classifier", "score"]``,
    TRL's reward models' too: naming ``score`` here as well would list it twice)."""
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is in the [train] extra
        raise ConfigError("lora.rank > 0 needs peft (pip install 'retnet-stack[train]'); it is not installed") \
            from None
    # A list of names (peft matches them as suffixes: only the decoder layers have modules of these names), not
    # a regex: what other loaders of the adapter format (vLLM) read.
    return peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora, target_modules=list(targets), bias="none", task_type=task,
    )


def _wrap(model: nn.Module, config, base_path: Path | None):
    import peft

    with warnings.catch_warnings():
        # peft reads the attribute transformers renamed (is_activation_checkpointing): a warning for every run
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        wrapped = peft.get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    # get_peft_model takes it from the model's name_or_path (the path as given, or none for a fresh model)
    config = wrapped.peft_config[ADAPTER_NAME]
    config.base_model_name_or_path, revision = adapter_base(base_path)
    if revision is not None:
        config.revision = revision
    return wrapped


def adapter_base(base_path: Path | None) -> tuple[str | None, str | None]:
    """(``base_model_name_or_path``, ``revision``) of an adapter trained on ``base_path``: the directory, absolute;
    but a hub id's snapshot in the HF cache (``…/models--org--name/snapshots/<commit>``, where ``model.init_from``
    = ``org/name`` is read from) is named as peft names a base loaded by its id, ``org/name``, at that commit: a
    cache path would name a directory of this machine only (``AutoPeftModelForCausalLM`` elsewhere, or the
    adapter pushed to the hub, could not find its base)."""
    if base_path is None:
        return None, None
    resolved = base_path.expanduser().resolve()
    parts = resolved.parts
    # (a hub id holds no "--": huggingface_hub refuses one, so the folder's name maps back to one id)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--") and \
            len(parts[-3]) > len("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/"), parts[-1]
    return str(resolved), None


def apply_lora(model: nn.Module, cfg: LoraConfig, targets: list[str], base_path: Path | None):
    """Inject the adapters into the ``targets`` modules (:func:`target_names`) of ``model`` in place and freeze
    everything else; returns the ``PeftModel`` around it (for ``save_pretrained``; train ``model`` itself,
    whose class and forward stay RetNet's). The adapters' init (``lora_A`` Kaiming-uniform, ``lora_B`` zero:
    the model computes what it did; DoRA's magnitudes the norms of the pretrained weight's rows, which keeps it
    so) draws from torch's RNG. A classifier's ``score`` trains in full (peft's copy of it: see the module's
    docstring)."""
    return _wrap(model, peft_config(cfg, targets, task_type(type(model))), base_path)


def trainable_names(model: nn.Module) -> list[str]:
    """The state-dict keys of the parameters that train (the adapters under LoRA)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def base_fingerprint(path: Path, setting: str | None = None) -> str:
    """SHA-256 over the weights of a pretrained directory: every tensor's name, shape and values as the trainer
    loads them (floats in fp32), in name order. What a checkpoint that holds only adapters was trained on top of:
    the same weights saved in other shards, another file format or a dtype that holds them exactly give the same
    fingerprint; other values do not. Reads the safetensors files (without any, the .bin files: what
    ``from_pretrained`` reads) once, a tensor at a time. A file that cannot be read (truncated, damaged) is a
    ConfigError naming it, and ``setting`` (the option that named ``path``, e.g. ``model.init_from``) when given."""
    import pickle

    import torch
    from safetensors import SafetensorError

    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix == ".safetensors")
    readers = {}  # tensor name -> (its file, a function returning it)
    unreadable = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError)

    def refuse(file: Path, error: Exception) -> ConfigError:
        # a resume hashes these weights before anything else reads them: a raw safetensors/pickle traceback
        # would name neither the setting nor the file
        named = f"{setting} {str(path)!r}" if setting else repr(str(path))
        return ConfigError(f"{named}: its weight file {file.name} could not be read ({type(error).__name__}: "
                           f"{str(error).strip()[:300]}); restore it (a truncated copy or download?)")

    if files:
        from safetensors import safe_open

        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except unreadable as error:
                raise refuse(file, error) from None
            readers.update({key: (file, lambda h=handle, k=key: h.get_tensor(k)) for key in handle.keys()})  # noqa: SIM118 - no dict
    else:
        for file in sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix == ".bin"):
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except unreadable as error:
                raise refuse(file, error) from None
            readers.update({key: (file, lambda v=value: v) for key, value in state.items() if torch.is_tensor(value)})
    digest = hashlib.sha256()
    for name in sorted(readers):
        file, read = readers[name]
        try:
            tensor = read()
        except unreadable as error:
            raise refuse(file, error) from None
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def export_lora(directory: Path, model_config, state_dict: dict, tokenizer, cfg: LoraConfig, targets: list[str],
                base_path: Path | None, model_class: type | None = None) -> Path:
    """Write ``directory`` (replaced atomically): the merged model (``merge_and_unload``, fp32 safetensors) with
    the tokenizer, as :func:`~retnet.train.checkpoint.export_pretrained` writes a model, and
    ``directory/adapter``, ``peft``'s ``save_pretrained`` of the adapters (``adapter_config.json``,
    ``adapter_model.safetensors``) whose ``base_model_name_or_path`` is ``base_path``; the merged model keeps
    ``base_path``'s generation config (:func:`~retnet.train.checkpoint.prepare_export`). ``state_dict`` is the
    trained model's (``base_layer``/``lora_A``/``lora_B`` keys, and ``lora_magnitude_vector`` under DoRA, which
    ``merge_and_unload`` folds in as peft's forward computes it). ``model_class``: the trained model's,
    ``RetNetForCausalLM`` by default; a reward model's ``RetNetForSequenceClassification`` exports as
    :func:`~retnet.train.reward.export_reward` does (``AutoModelForSequenceClassification`` loads it), its trained
    ``score`` in the merged model and in the adapter."""
    from retnet.model import RetNetForCausalLM
    from retnet.train.checkpoint import prepare_export, replace_directory

    model_class = model_class or RetNetForCausalLM
    task = task_type(model_class)
    causal_lm = task == "CAUSAL_LM"
    if not causal_lm:
        from retnet.train.reward import classifier_export_config

        classifier_export_config(model_config, tokenizer)
    model = model_class(model_config)
    wrapped = _wrap(model, peft_config(cfg, targets, task), base_path)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model_config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict does not fit the LoRA model: missing {missing}, unexpected "
                           f"{unexpected}")

    def write(tmp: Path) -> None:
        # first: merging replaces the LoRA layers. No embeddings: none is a target and the vocabulary is the base's;
        # peft's "auto" would look base_model_name_or_path up (a hub id: a hub request at every export)
        # peft holds target_modules as a set: written in its hash order, which PYTHONHASHSEED changes every run
        # (the same adapter, another adapter_config.json); sorted, an export is byte-for-byte reproducible
        for adapter_config in wrapped.peft_config.values():
            if isinstance(adapter_config.target_modules, set):
                adapter_config.target_modules = sorted(adapter_config.target_modules)
        # peft's model card (adapter/README.md) names the base by the model's name_or_path (its `base_model` and
        # `base_model:adapter:` tag): the fresh model's is "", an empty base beside an adapter_config.json naming it
        base_name, _ = adapter_base(base_path)
        own = model.name_or_path, model.config.name_or_path
        if base_name is not None:
            model.name_or_path = model.config.name_or_path = base_name
        wrapped.save_pretrained(tmp / ADAPTER_DIR, save_embedding_layers=False)
        model.name_or_path, model.config.name_or_path = own
        merged = wrapped.merge_and_unload()
        if causal_lm:  # a classifier does not generate: no generation config to complete
            prepare_export(merged, tokenizer, base_path)  # the base's generation config, completed
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return replace_directory(Path(directory), write)


__all__ = ["ADAPTER_DIR", "adapter_base", "apply_lora", "base_fingerprint", "default_targets", "export_lora", "peft_config",
           "resolve_targets", "target_names", "task_type", "trainable_names"]
