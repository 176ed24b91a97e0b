"""Convert a flash-linear-attention RetNet checkpoint (``fla.models.RetNetForCausalLM``, e.g. the fla-hub models)
into this package's format, loadable by :class:`RetNetForCausalLM`, ``retnet-serve`` and ``retnet-train
--model.init_from``.

    retnet-convert-fla fla-hub/retnet-1.3B-100B runs/retnet-1.3b        # a hub id or a local directory
    python -m retnet.model.convert_fla SRC DST --dtype bfloat16

The two architectures are the same computation: pre-RMSNorm blocks, rotary q/k (half-split pairs, θ = 10 000),
the paper's decays γ_h = 1 − 2^(−5−h), scale K^−1/2, a per-head RMSNorm with a swish output gate, and a SwiGLU
FFN. The mapping is exact:
- fla's head norm has one ``[V]`` weight shared by every head; ours has one per head, so it is tiled.
- fla's grouped keys/values (``num_kv_heads``) are repeated into one key and value per head, as fla repeats
  them at run time.
- fla without norm weights (``elementwise_affine: false``) gets weights of one.
- Older fla releases fuse the FFN's gate and up projections into one ``gate_proj`` of twice the width; it is
  split in two.

What has no counterpart here is refused by field name: short convolutions, feature maps, attention layers
(``attn``), AttnRes, and an output gate other than swish. The tokenizer and generation config are copied.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retnet.model.hub import CHAT_TEMPLATES, MODEL_FILES, resolve_pretrained, training_output

# torch and transformers (the model, its configuration) are imported where used: the command answers --help and
# a Ctrl-C in those imports (seconds) as the other commands do (main)
if TYPE_CHECKING:
    import torch

    from retnet.model.configuration_retnet import RetNetConfig

# Copied beside the converted weights: everything but fla's own config and weights.
COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
SWISH = ("swish", "silu")
# The fla field each of our config's fields is read from, so that a value our config refuses is refused under
# the name the fla config.json gives it (head_dim is hidden_size · expand_k / num_heads, value_factor expand_v).
FLA_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
              "num_attention_heads": "num_heads", "head_dim": "expand_k", "value_factor": "expand_v",
              "intermediate_size": "intermediate_size", "rms_norm_eps": "norm_eps",
              "initializer_range": "initializer_range", "pad_token_id": "pad_token_id"}


def is_fla_retnet_config(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` dict is flash-linear-attention's RetNet (its model_type is also ``retnet``)."""
    return "expand_k" in config or "attn_mode" in config or ("num_heads" in config
                                                             and "num_attention_heads" not in config)


def _what_instead(config: Any) -> str:
    """What a ``config.json`` that is no fla RetNet's is instead: each was told it was a retnet-stack checkpoint
    that "needs no conversion" (a Llama's, torchscale's RetNet, a JSON list)."""
    from retnet.model.configuration_retnet import FOREIGN_RETNET_FIELDS

    if not isinstance(config, dict):
        return f"not a JSON object ({type(config).__name__})"
    if "model_type" not in config:
        return "it names no model_type (not a model's config.json)"
    if config.get("model_type") != "retnet":
        return f"model_type {config.get('model_type')!r}, not a RetNet"
    if config.keys() & FOREIGN_RETNET_FIELDS:
        return (f"its {', '.join(sorted(config.keys() & FOREIGN_RETNET_FIELDS))} are torchscale's RetNet config (as "
                "syncdoth/RetNet writes it), another implementation, which this command does not convert")
    return "no expand_k, attn_mode or num_heads; a retnet-stack checkpoint needs no conversion"


def retnet_config_from_fla(fla: dict[str, Any], intermediate_size: int | None = None) -> RetNetConfig:
    """Our :class:`RetNetConfig` for an fla RetNet ``config.json`` dict; a feature we lack is refused by name.

    ``intermediate_size``: the FFN width read from the weights, when fla derived it (``hidden_ratio``).
    """

    def get(field: str, default: Any = None) -> Any:
        return fla.get(field, default)

    def refuse(field: str, why: str) -> None:
        raise ValueError(f"flash-linear-attention RetNet config field {field}={get(field)!r}: {why}; "
                         "this checkpoint cannot be converted")

    if get("model_type", "retnet") != "retnet":
        refuse("model_type", "expected 'retnet'")
    if get("use_short_conv", False):
        refuse("use_short_conv", "short convolutions before retention have no counterpart in retnet-stack")
    if get("feature_map") is not None:
        refuse("feature_map", "q/k feature maps have no counterpart in retnet-stack")
    if get("attn") is not None:
        refuse("attn", "softmax-attention layers (a hybrid model) have no counterpart in retnet-stack")
    if get("attnres_block_size") is not None:
        refuse("attnres_block_size", "AttnRes residuals have no counterpart in retnet-stack")
    act = get("hidden_act", "swish")
    if act not in SWISH:
        # fla uses hidden_act for both the FFN and the output gate; our gate is swish.
        refuse("hidden_act", f"the output gate and SwiGLU FFN must be swish ({' or '.join(SWISH)})")
    hidden, heads = get("hidden_size", 2048), get("num_heads", 8)
    for field, value in (("hidden_size", hidden), ("num_heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # (divided by below)
            refuse(field, "must be a positive integer")
    for field in ("expand_k", "expand_v", "norm_eps", "initializer_range"):
        value = get(field)
        # (a string would be repeated by `hidden *`, None fail in float(): TypeErrors, not a message)
        # (the range is our config's to check, under these names below)
        if field in fla and (isinstance(value, bool) or not isinstance(value, (int, float))):
            refuse(field, "must be a number")
    kv_heads = get("num_kv_heads")
    if kv_heads is not None and (isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1):
        refuse("num_kv_heads", "must be a positive integer (or null: one key and value per head)")
    key_dim, value_dim = hidden * get("expand_k", 1.0), hidden * get("expand_v", 2.0)
    for field, dim in (("expand_k", key_dim), ("expand_v", value_dim)):
        if not math.isclose(dim, round(dim)) or round(dim) % heads:
            refuse(field, f"hidden_size * {field} must be a whole multiple of num_heads={heads}")
    kv_heads = get("num_kv_heads") or heads
    if heads % kv_heads:
        refuse("num_kv_heads", f"must divide num_heads={heads}")
    if intermediate_size is None:
        intermediate_size = get("intermediate_size")
    if intermediate_size is None:
        # fla's GatedMLP derives it so (a missing FFN tensor is then refused by its name, not as this field)
        ratio = get("hidden_ratio", 2)
        if ratio is None:
            ratio = 4
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
            refuse("hidden_ratio", "must be a positive number (intermediate_size is not set)")
        intermediate_size = 256 * ((int(hidden * ratio * 2 / 3) + 255) // 256)
    dtype = get("dtype", get("torch_dtype"))
    try:
        return _retnet_config(fla, hidden, heads, key_dim, value_dim, intermediate_size, dtype)
    except ValueError as error:
        ours = re.match(r"RetNetConfig\.(\w+) ", str(error))
        if ours is None or ours.group(1) not in FLA_FIELDS:
            raise
        given = f" with hidden_size={hidden} and num_heads={heads}" if ours.group(1) in ("head_dim", "value_factor") else ""
        refuse(FLA_FIELDS[ours.group(1)], f"it makes{given} {error}")


def _retnet_config(fla, hidden, heads, key_dim, value_dim, intermediate_size, dtype) -> RetNetConfig:
    from retnet.model.configuration_retnet import RetNetConfig

    get = fla.get
    return RetNetConfig(
        vocab_size=get("vocab_size", 32000), hidden_size=hidden, num_hidden_layers=get("num_hidden_layers", 24),
        num_attention_heads=heads, head_dim=round(key_dim) // heads, value_factor=round(value_dim) / hidden,
        intermediate_size=intermediate_size, hidden_act="silu", ffn_glu=True, ffn_bias=False,
        norm_type="rmsnorm", rms_norm_eps=float(get("norm_eps", 1e-6)), use_head_norm=True,
        use_output_gate=bool(get("use_output_gate", True)), rope_theta=10000.0, use_xpos=False,
        decay_schedule="paper", initializer_range=float(get("initializer_range", 0.02)),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)), pad_token_id=get("pad_token_id"),
        bos_token_id=get("bos_token_id", 1), eos_token_id=get("eos_token_id", 2),
        **({"dtype": dtype} if dtype is not None else {}),
    )


def retnet_state_dict_from_fla(weights: dict[str, torch.Tensor], fla: dict[str, Any],
                               config: RetNetConfig) -> dict[str, torch.Tensor]:
    """Our state dict (``RetNetForCausalLM``'s names) from an fla RetNet one; every fla tensor is used."""
    import torch

    heads, hidden = config.num_attention_heads, config.hidden_size
    groups = heads // (fla.get("num_kv_heads") or heads)
    remaining = dict(weights)

    def take(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        tensor = remaining.pop(name, None)
        if tensor is not None and shape is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"fla checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected {shape} "
                             "from its config.json")
        return tensor

    def need(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = take(name, shape)
        if tensor is None:  # (None in the state dict failed later, as an AttributeError naming nothing)
            raise ValueError(f"fla checkpoint has no {name}")
        return tensor

    def norm_weight(name: str, size: int, optional: bool = False) -> torch.Tensor:
        weight = take(name, (size,))
        if weight is None and not optional:
            raise ValueError(f"fla checkpoint has no {name}")
        return torch.ones(size) if weight is None else weight

    def per_head(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
        """fla's grouped key/value projection rows -> one block of rows per head (head h uses group h // G)."""
        if groups == 1:
            return tensor
        return tensor.view(-1, head_dim, hidden).repeat_interleave(groups, dim=0).reshape(-1, hidden)

    embed = take("model.embeddings.weight", (config.vocab_size, hidden))
    if embed is None:
        raise ValueError("fla checkpoint has no model.embeddings.weight: not a flash-linear-attention RetNet")
    ours = {"model.embed_tokens.weight": embed}
    k_dim, v_dim, width = config.head_dim, config.value_head_dim, config.intermediate_size
    for layer in range(config.num_hidden_layers):
        src, dst = f"model.layers.{layer}.", f"model.layers.{layer}."
        if f"{src}attn.q_proj.weight" not in remaining:
            raise ValueError(f"fla checkpoint has no {src}attn.q_proj.weight (config.json says "
                             f"num_hidden_layers={config.num_hidden_layers})")
        ours[dst + "retention_norm.weight"] = norm_weight(src + "attn_norm.weight", hidden)
        ours[dst + "retention.q_proj.weight"] = need(src + "attn.q_proj.weight", (heads * k_dim, hidden))
        ours[dst + "retention.k_proj.weight"] = per_head(
            need(src + "attn.k_proj.weight", (heads // groups * k_dim, hidden)), k_dim)
        ours[dst + "retention.v_proj.weight"] = per_head(
            need(src + "attn.v_proj.weight", (heads // groups * v_dim, hidden)), v_dim)
        if config.use_output_gate:
            ours[dst + "retention.g_proj.weight"] = need(src + "attn.g_proj.weight", (heads * v_dim, hidden))
        ours[dst + "retention.o_proj.weight"] = need(src + "attn.o_proj.weight", (hidden, heads * v_dim))
        # Fused with the gate or not, fla's head norm is one [V] weight for all heads; without
        # elementwise_affine it has none (a weight of ones). Neither there: the one fla's config makes is missing.
        fused = (src + "attn.g_norm_swish_gate.weight" in remaining
                 or (src + "attn.g_norm.weight" not in remaining and config.use_output_gate
                     and bool(fla.get("fuse_norm", True))))
        head_norm = norm_weight(src + ("attn.g_norm_swish_gate.weight" if fused else "attn.g_norm.weight"),
                                v_dim, optional=not fla.get("elementwise_affine", True))
        ours[dst + "retention.head_norm.weight"] = head_norm.repeat(heads)
        ours[dst + "ffn_norm.weight"] = norm_weight(src + "mlp_norm.weight", hidden)
        fused_ffn = f"{src}mlp.up_proj.weight" not in remaining
        for proj in ("gate_proj", "up_proj", "down_proj"):
            weight = take(f"{src}mlp.{proj}.weight")
            if weight is None and proj == "up_proj" and ours[f"{dst}mlp.gate_proj.weight"].shape[0] == 2 * width:
                # Older fla releases (those of the 2024 fla-hub models) fuse both: gate_proj gives 2I outputs,
                # split as `gate, y = gate_proj(x).chunk(2, -1)`.
                ours[f"{dst}mlp.gate_proj.weight"], weight = ours[f"{dst}mlp.gate_proj.weight"].chunk(2, dim=0)
            if weight is None:
                raise ValueError(f"fla checkpoint has no {src}mlp.{proj}.weight")
            ours[f"{dst}mlp.{proj}.weight"] = weight
        # Checked once split: the width comes from layer 0's down_proj (or config.json), and a layer that
        # disagrees would otherwise fail in load_state_dict, under our names and outside the errors refused here.
        for proj in ("gate_proj", "up_proj", "down_proj"):
            shape = (hidden, width) if proj == "down_proj" else (width, hidden)
            if tuple(ours[f"{dst}mlp.{proj}.weight"].shape) != shape:
                if fused_ffn and proj != "down_proj":  # (the fused gate_proj holds both)
                    proj, shape = "gate_proj", (2 * width, hidden)
                name = f"{src}mlp.{proj}.weight"
                raise ValueError(f"fla checkpoint tensor {name} has shape {tuple(weights[name].shape)}, expected "
                                 f"{shape} (an FFN width of {width}, as layer 0's down_proj or config.json has it)")
    ours["model.norm.weight"] = norm_weight("model.norm.weight", hidden)
    lm_head = take("lm_head.weight", (config.vocab_size, hidden))
    if not config.tie_word_embeddings:
        if lm_head is None:
            raise ValueError("fla checkpoint has no lm_head.weight and tie_word_embeddings is false")
        ours["lm_head.weight"] = lm_head
    if remaining:
        raise ValueError(f"fla checkpoint tensors with no counterpart in retnet-stack: {sorted(remaining)[:8]}")
    return ours


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, found as transformers finds them: ``model.safetensors``, else its
    sharded index, else ``pytorch_model.bin``, else its index. (The index read first, a directory saved sharded and
    then whole, where save_pretrained removes the old shards but leaves their index, was refused for shards no longer
    there, though transformers and fla load it.)"""
    from safetensors.torch import load_file

    for name, loader in (("model.safetensors", load_file), ("model.safetensors.index.json", load_file),
                         ("pytorch_model.bin", _load_bin), ("pytorch_model.bin.index.json", _load_bin)):
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read(loader, path)
        return _read_shards(path, loader)
    raise FileNotFoundError(f"{directory} holds no model.safetensors, pytorch_model.bin or a sharded index of them")


def _read_shards(index: Path, loader) -> dict[str, torch.Tensor]:
    """Every tensor of the shards the index file ``index`` names, each read from the shard it names. A shard
    missing, a tensor it lists under a shard that does not hold it, a tensor a shard holds that it lists elsewhere
    or not at all, or a shard file beside them it does not name, is refused naming both files: the index and the
    shards disagree (a leftover of another save), and the tensors read merged whatever the shards held, the last
    shard's copy of a tensor in two of them the one converted."""
    directory = index.parent
    weight_map = _read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):  # (a KeyError or AttributeError naming neither file nor field)
        raise ValueError(f"{str(index)!r} has no weight_map of tensor names to shard files")
    listed: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:  # (a TypeError when sorted)
            raise ValueError(f"{str(index)!r}: weight_map[{name!r}] is {shard!r}, not a shard file's name")
        listed.setdefault(shard, set()).add(name)
    # (model-00001-of-00002.safetensors beside the index's model.safetensors.index.json)
    stem, suffix = index.name.removesuffix(".index.json").rsplit(".", 1)
    shard_name = re.compile(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.{re.escape(suffix)}")
    unnamed = sorted(path.name for path in directory.iterdir() if shard_name.fullmatch(path.name)
                     and path.name not in listed)
    if unnamed:
        more = " ..." if len(unnamed) > 3 else ""
        raise ValueError(f"{str(index)!r} does not name the shard file(s) {', '.join(unnamed[:3])}{more} beside it: the index "
                         "and the shards come from different saves; remove the shards it does not name, or give "
                         "the index that names them")
    weights: dict[str, torch.Tensor] = {}
    for shard, names in sorted(listed.items()):
        if not (directory / shard).is_file():
            raise ValueError(f"{str(index)!r} names the shard {shard!r}, which is not in {str(directory)!r}")
        tensors = _read(loader, directory / shard)
        for problem, found in (("lists under it but it does not hold", names - tensors.keys()),
                               ("does not list under it but it holds", tensors.keys() - names)):
            if found:
                raise ValueError(f"{str(index)!r} and its shard {shard!r} disagree: tensor(s) the index {problem}: "
                                 f"{', '.join(sorted(found)[:3])}{' ...' if len(found) > 3 else ''}")
        weights.update(tensors)
    return weights


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _read(loader, path: Path) -> dict[str, torch.Tensor]:
    """``loader(path)``; a damaged or cut-short file refused naming it (safetensors' SafetensorError, torch.load's
    UnpicklingError or RuntimeError are neither ValueError nor OSError: tracebacks out of the command)."""
    try:
        return loader(str(path))
    except FileNotFoundError:
        raise
    except Exception as error:  # whatever the loader raises for a file it cannot read
        raise ValueError(f"cannot read {str(path)!r} ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else 'damaged'})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:  # (a JSONDecodeError alone named no file)
        raise ValueError(f"cannot read {str(path)!r} as JSON: {error}") from None


def convert_fla_checkpoint(source: str | os.PathLike, destination: str | os.PathLike,
                           dtype: torch.dtype | None = None) -> RetNetConfig:
    """Convert the fla RetNet checkpoint at ``source`` (directory or hub id) into ``destination``.

    The weights keep their dtype unless ``dtype`` is given. Returns the new config.
    """
    # Path("") is ".": an unset variable ("$DST") wrote the converted model into the working directory, as the
    # source's own check (resolve_pretrained) refuses for the source
    if not str(destination).strip():
        raise ValueError("destination is empty; give the directory to write the converted checkpoint to")
    try:  # "~/out" as the source is read (resolve_pretrained expands it), not a directory "~" made in the cwd
        dst = Path(destination).expanduser()
    except RuntimeError:  # "~name" of no such user, or no home directory
        dst = Path(destination)
    src = resolve_pretrained(source)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{str(source)!r} is not a checkpoint directory (no config.json in it)")
    if dst.exists() and dst.resolve() == src.resolve():
        # save_pretrained would overwrite fla's config.json and weights in place, and copying the tokenizer onto
        # itself then fails: the fla checkpoint lost, ours half written.
        raise ValueError(f"destination {str(destination)!r} is the checkpoint being converted; give a directory "
                         "of its own (writing there would overwrite fla's config.json and weights)")
    copied = _copied(src)
    _check_destination(dst, {path.relative_to(src).as_posix() for path in copied})
    fla = _read_json(src / "config.json")
    if not isinstance(fla, dict) or not is_fla_retnet_config(fla):
        written = training_output(src)  # (its config.json is the run's configuration, of no model_type)
        raise ValueError(f"{src / 'config.json'} is not a flash-linear-attention RetNet config: "
                         f"{_what_instead(fla) if written is None else f'{str(source)!r} is {written}'}")
    weights = load_weights(src)
    down = weights.get("model.layers.0.mlp.down_proj.weight")
    if down is not None and down.dim() != 2:  # (its second dimension is the FFN's width, read here)
        raise ValueError(f"fla checkpoint tensor model.layers.0.mlp.down_proj.weight has shape {tuple(down.shape)}, "
                         "expected (hidden_size, intermediate_size)")
    config = retnet_config_from_fla(fla, None if down is None else down.shape[1])
    state = retnet_state_dict_from_fla(weights, fla, config)
    # One dtype for the whole model (fla keeps its head norms in fp32 under a bf16 model).
    dtype = dtype or state["model.embed_tokens.weight"].dtype
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    config.dtype = dtype
    import torch

    from retnet.model.modeling_retnet import RetNetForCausalLM

    with torch.device("meta"):
        model = RetNetForCausalLM(config)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # (permissions, a read-only file system): a message, not a traceback
        raise ValueError(f"destination {str(destination)!r} cannot be created: {error.strerror or error}") from None
    try:
        _remove_earlier_weights(dst)
        model.save_pretrained(dst)
        for path in copied:
            target = dst / path.relative_to(src)
            target.parent.mkdir(exist_ok=True)
            shutil.copy2(path, target)
    except OSError as error:
        # An existing directory that cannot be written (mkdir above passes it), a full disk: the PermissionError or
        # OSError came out of the command as a traceback, where mkdir's own failure is a message.
        where = f" ({error.filename})" if error.filename else ""
        if str(error.filename) in {str(path) for path in copied}:  # a source file copied (the tokenizer's) unreadable
            raise ValueError(f"source file {error.filename!r} cannot be read: {error.strerror or error}") from None
        raise ValueError(f"destination {str(destination)!r} cannot be written{where}: "
                         f"{error.strerror or error}") from None
    return config


def _copied(src: Path) -> list[Path]:
    # The tokenizer's named chat templates too (transformers keeps them in a folder of their own): the top level
    # alone gave the converted model the default template only, and a request with tools lost its tool_use one.
    return [path for path in sorted(src.iterdir())
            if path.is_file() and path.suffix in COPIED_SUFFIXES and path.name not in NOT_COPIED] + [
            path for path in sorted(src.glob(CHAT_TEMPLATES)) if path.is_file()]


# What save_pretrained writes (its shards' names depend on the size; it deletes stale shards of its own).
_WEIGHTS = r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
_WRITTEN = re.compile(rf"config\.json|generation_config\.json|{_WEIGHTS}")


def _remove_earlier_weights(destination: Path) -> None:
    """The weights an earlier conversion into ``destination`` wrote, removed before this one's are: save_pretrained
    removes only the shards of its own naming it does not write again. Written whole over a sharded save (a smaller
    model's over one above the shard size, 50 GB), it left the old model.safetensors.index.json, which loaders that
    read the index first (vLLM) take; written sharded over a whole save, the old model.safetensors, which
    transformers reads before the index: the earlier model was loaded."""
    for path in destination.iterdir():
        if re.fullmatch(_WEIGHTS, path.name) and path.is_file():
            path.unlink()


def _check_destination(destination: Path, copied: set[str]) -> None:
    """Refuse, before the weights are read and converted, a destination that is a file or lies under one
    (``mkdir`` failed only at the end, with FileExistsError or NotADirectoryError tracebacks), or a directory
    holding files this conversion does not overwrite: another model's tokenizer.json beside a converted
    tokenizer.model, or its pytorch_model.bin, would be loaded with the new weights, without a word."""
    for path in (destination, *destination.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == destination else f"lies under {str(path)!r}, a file"
                raise ValueError(f"destination {str(destination)!r} {where}; give a directory to write the "
                                 "converted checkpoint to")
            break
    if not destination.is_dir():
        return
    # Only what transformers would load from the directory (a clone's .git, README.md or .gitattributes is fine).
    # (another tokenizer's named chat templates, in their folder, are loaded with the copied ones: MODEL_FILES
    # names them)
    names = (path.relative_to(destination).as_posix()
             for path in (*destination.iterdir(), *destination.glob(CHAT_TEMPLATES)))
    stale = sorted(name for name in names if name not in copied and not _WRITTEN.fullmatch(name)
                   and (name.endswith(".py") or any(fnmatch.fnmatch(name, p) for p in MODEL_FILES)))
    if stale:
        raise ValueError(f"destination {str(destination)!r} holds files this conversion would not overwrite "
                         f"({', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}): another checkpoint's "
                         "tokenizer or weights would be loaded with the converted one; give a new or empty directory")


DTYPES = ("float32", "bfloat16", "float16")  # --dtype's choices: torch's dtypes of these names


def main(argv: list[str] | None = None) -> None:
    # (not the module docstring's first paragraph: --help printed its reST markup, ``...`` and :class:)
    parser = argparse.ArgumentParser(
        prog="retnet-convert-fla", description="Convert a flash-linear-attention RetNet checkpoint "
        "(fla.models.RetNetForCausalLM, e.g. the fla-hub models) into this package's format, loadable by "
        "retnet-serve, retnet-train --model.init_from and RetNetForCausalLM.from_pretrained.")
    parser.add_argument("source", help="fla RetNet checkpoint: a local directory or a hub id (org/name)")
    parser.add_argument("destination", help="directory to write the retnet-stack checkpoint to")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep theirs)")
    args = parser.parse_args(argv)
    from retnet.extras import exits_on_ctrl_c

    try:
        # (the imports of torch and transformers: seconds; a hub download or a large checkpoint's read: minutes)
        with exits_on_ctrl_c("retnet-convert-fla"):
            import torch

            import retnet

            retnet.register()  # (a process started as the command registers here: see retnet/__init__)
            dtype = None if args.dtype is None else getattr(torch, args.dtype)
            config = convert_fla_checkpoint(args.source, args.destination, dtype)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"retnet-convert-fla: error: {error}\n")
    print(f"wrote {args.destination}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads (key {config.head_dim}, value {config.value_head_dim}), "
          f"vocab {config.vocab_size}")


if __name__ == "__main__":
    main()
