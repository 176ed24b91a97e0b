"""`retnet-lm-eval`: EleutherAI's lm-evaluation-harness (``lm_eval``) with RetNet registered.

lm-eval's ``--model hf`` loads ``pretrained=`` with ``AutoModelForCausalLM``, which knows RetNet only once
``retnet`` is imported (that import registers the Auto classes). This script registers them for a ``pretrained=``
it is given (``retnet.register``: as a command, its ``import retnet`` leaves that to it), then runs lm-eval's
own command line with the arguments unchanged, so every lm-eval flag and subcommand works as documented::

    retnet-lm-eval --model hf --model_args pretrained=runs/demo/export,dtype=float32 \\
        --tasks hellaswag,arc_easy --device cpu --batch_size 8 --output_path results/
    python -m retnet.harness ...        # the same
    accelerate launch -m retnet.harness --model hf ...   # data parallel over GPUs, as lm-eval's docs do

Against ``retnet-serve`` no registration is needed (``--model local-completions``; see the README), but the
same script runs it too. Needs the ``[eval]`` extra (``pip install 'retnet-stack[eval]'``).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import retnet  # (imported from Python, it registers RetNet with the Auto classes; as retnet-lm-eval, main does)
from retnet.model.hub import training_output

# lm-eval's console scripts, as its package metadata names them (both point at one function in 0.4.x).
_LM_EVAL_SCRIPTS = ("lm-eval", "lm_eval")


def lm_eval_cli() -> Callable[[], object]:
    """lm-eval's command-line entry point, found the way its own ``lm-eval`` script finds it: through the
    installed distribution's ``console_scripts`` entry point (``lm_eval.__main__:cli_evaluate`` in 0.4.x), so a
    release that moves the function still works. It reads its arguments from ``sys.argv``."""
    try:
        dist = metadata.distribution("lm_eval")
    except metadata.PackageNotFoundError:
        raise SystemExit("retnet-lm-eval needs lm-evaluation-harness, which is not installed: "
                         "pip install 'retnet-stack[eval]' (or 'lm_eval[hf,api]>=0.4.10,<0.5')") from None
    scripts = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
    for name in _LM_EVAL_SCRIPTS:
        if name in scripts:
            return scripts[name].load()
    raise SystemExit(f"lm_eval {dist.version} declares no console script named {' or '.join(_LM_EVAL_SCRIPTS)} "
                     f"(it declares: {sorted(scripts) or 'none'}); expected lm_eval>=0.4.10,<0.5")


# lm-eval's short options that take no value (--log_samples, --write_out, --predict_only): argparse reads
# "-sa v" as "-s -a v" and "-sCPATH" as "-s -CPATH"
_VALUELESS_SHORTS = "swx"


def _option(word: str, long: str, short: str, shortest: str) -> tuple[bool, str | None]:
    """Whether argparse reads ``word`` as lm-eval's option ``long`` (``short``), and the value attached to it (None:
    its values follow). argparse takes any unambiguous prefix of a long name (``--model_arg`` for ``--model_args``;
    ``shortest`` is the shortest one lm-eval's options leave unambiguous), ``--long=v``, and a short option's value
    attached, ``-sv`` or ``-s=v``: each form lm-eval runs with."""
    if word.startswith("--"):
        name, equals, value = word.partition("=")
        if len(name) >= len(shortest) and long.startswith(name):
            return True, value if equals else None
        return False, None
    if word.startswith("-"):  # "-sa v" is "-s -a v": -s, -w and -x (lm-eval's short options that take no value)
        word = "-" + word[1:].lstrip(_VALUELESS_SHORTS)
    if word.startswith(short):
        attached = word[len(short):]
        return True, (attached.removeprefix("=") if attached else None)
    return False, None


def _pretrained_values(argv: Sequence[str]) -> list[str]:
    """What ``--model_args`` (``-a``) names as ``pretrained=``, in each form lm-eval takes: ``k=v,k=v``, several
    ``k=v`` words, or one JSON object."""
    values: list[str] = []
    words = list(argv)
    given = False
    for index, word in enumerate(words):
        if word == "--":  # what follows is no option
            break
        # (no other lm-eval option begins with "--model_")
        matched, attached = _option(word, "--model_args", "-a", "--model_")
        if not matched:
            continue
        if attached is not None:  # argparse gives an attached value alone
            group = [attached]
        else:
            group = []
            for following in words[index + 1:]:
                if following.startswith("-"):
                    break
                group.append(following)
        given = True
        for text in group:
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                if isinstance(parsed.get("pretrained"), str):
                    values.append(parsed["pretrained"])
                continue
            values += _pretrained_of_text(text)
    if not given:  # the --config YAML's model_args are used only when the command line gives none
        values += _config_pretrained(words)
    return values


def _pretrained_of_text(text: str) -> list[str]:
    return [item.split("=", 1)[1].strip().strip("'\"") for item in text.split(",")
            if item.strip().startswith("pretrained=")]


def _config_pretrained(words: list[str]) -> list[str]:
    """``pretrained`` of the ``model_args`` of lm-eval's ``--config`` (``-C``) YAML file, a mapping or a
    ``k=v,k=v`` string; none when the file cannot be read (lm-eval reports that itself)."""
    paths = []
    for word, following in itertools.pairwise([*words, None]):
        if word == "--":
            break
        # "--config" has no abbreviation of its own ("--confi" is also "--confirm_run_unsafe_code")
        matched, attached = _option(word, "--config", "-C", "--config")
        if matched and (attached is not None or following is not None):
            paths.append(following if attached is None else attached)
    import yaml  # (PyYAML: a dependency of transformers and of lm-eval)

    values: list[str] = []
    for path in paths:
        try:
            saved = yaml.safe_load(Path(path).expanduser().read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        model_args = saved.get("model_args") if isinstance(saved, dict) else None
        if isinstance(model_args, dict) and isinstance(model_args.get("pretrained"), str):
            values.append(model_args["pretrained"])
        elif isinstance(model_args, str):
            values += _pretrained_of_text(model_args)
    return values


def check_pretrained(argv: Sequence[str]) -> None:
    """Refuse (SystemExit naming it) a ``pretrained=`` directory holding a RetNet that is not a causal LM: a reward
    model or classifier loads through ``AutoModelForCausalLM`` with its ``score`` head dropped (transformers only
    lists it as unexpected) and its tied embedding taken for an LM head it never trained, and would be scored
    without a word."""
    for value in _pretrained_values(argv):
        root = Path(value).expanduser()
        # a run's train.output_dir, checkpoint or adapter: lm-eval ended in transformers' traceback ("Unrecognized
        # model ... Should have a `model_type` key", or no config.json)
        written = training_output(root) if root.is_dir() else None
        if written is not None:
            raise SystemExit(f"retnet-lm-eval: --model_args pretrained={value} is {written}")
        config = root / "config.json"
        if not config.is_file():
            continue  # a hub id, or a path lm-eval will report missing itself
        try:
            saved = json.loads(config.read_text())
        except (OSError, ValueError):
            continue  # transformers' own error says what is wrong with it
        if not isinstance(saved, dict):
            continue
        architectures = saved.get("architectures") or []
        if saved.get("model_type") == "retnet" and architectures and not any(
                str(name).endswith("ForCausalLM") for name in architectures):
            raise SystemExit(f"retnet-lm-eval: --model_args pretrained={value} holds a "
                             f"{', '.join(map(str, architectures))} (a reward model, classifier or backbone), not a "
                             f"RetNetForCausalLM: lm-eval scores next-token loglikelihoods and generations, which "
                             f"need a causal LM's head; give a causal LM's export")


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's CLI on ``argv`` (default: this process's own arguments), RetNet registered.

    Exits as lm-eval does: status 0 after writing its table (and ``--output_path`` files), an exception or
    ``SystemExit`` from it otherwise; a ``pretrained=`` RetNet that is not a causal LM is refused first
    (:func:`check_pretrained`). A Ctrl-C ends it as every retnet command: one line, status 130."""
    from retnet.extras import exits_on_ctrl_c

    with exits_on_ctrl_c("retnet-lm-eval"):
        _run_command(argv)


def _run_command(argv: Sequence[str] | None) -> None:
    words = sys.argv[1:] if argv is None else argv
    check_pretrained(words)
    if _pretrained_values(words):
        # a model lm-eval loads through transformers' Auto classes; without one (--help, a mistyped option,
        # --model local-completions) no torch is imported here
        retnet.register()
    cli = lm_eval_cli()
    if argv is None:
        cli()
        return
    saved = sys.argv
    sys.argv = [saved[0] if saved else "retnet-lm-eval", *argv]
    try:
        cli()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
