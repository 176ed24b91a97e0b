"""Train a RetNet: ``retnet-train`` / ``python -m retnet.train`` / ``torchrun -m retnet.train``.

    retnet-train --config tiny                                  # CPU demo, ~2-3 minutes on 2 cores
    python -m retnet.train --config tiny --train.output_dir=runs/demo --optim.lr=3e-3
    python -m retnet.train --config my.toml --data.dataset='corpus/*.jsonl' --data.tokenizer=tok/
    torchrun --standalone --nproc_per_node=8 -m retnet.train --config small
    torchrun --standalone --nproc_per_node=8 -m retnet.train --config retnet-1.3b --train.parallelism=fsdp

Multi-node (run the same command on every node; output_dir and data.cache_dir on a shared filesystem)::

    torchrun --nnodes=4 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 --rdzv_id=$JOB_ID \\
        -m retnet.train --config retnet-6.7b --train.parallelism=fsdp --train.output_dir=/shared/runs/6.7b

``--config`` is a shipped preset (``tiny``, ``small``, ``retnet-1.3b``, ``retnet-2.7b``, ``retnet-6.7b``) or
a TOML file; every field can be overridden as ``--section.key=value``. Exit status: 0 when finished or
stopped by SIGTERM/SIGINT after saving, 2 for a configuration, data or checkpoint error (also a checkpoint or
export that cannot be written: a full disk, a permission), 3 when the loss became NaN/inf.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
import typing
from pathlib import Path

from retnet.extras import EXIT_INTERRUPTED

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE = 0, 2, 3


def _preset_names() -> list[str]:
    # config.preset_names' listing, read without importing the configuration (torch): --help answers at once
    from importlib import resources

    folder = resources.files("retnet.train") / "configs"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retnet-train", description="Train a RetNet language model.",
        epilog="Overrides: --section.key=value, e.g. --optim.lr=3e-4 --train.steps=2000 "
               "--data.dataset='data/*.jsonl' --model.extra.use_xpos=true",
    )
    parser.add_argument("--config", default="tiny",
                        help=f"a preset ({', '.join(_preset_names())}) or a TOML file (default: tiny)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (the preset or TOML file, with the overrides) as "
                             "JSON and exit; exit status 2, the errors on stderr, for a path a start would refuse (a dataset "
                             "glob that matches nothing, an output_dir that is a file, a missing init_from ...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the trainer from the config, run it, and always close it and the process group."""
    from retnet.extras import exits_on_ctrl_c, warnings_above_bars

    # (a Ctrl-C from the trainer's start on: _run_command's own line, which says what was saved; the bars: the
    # trainer's and a preference run's reference log-probs at its start)
    with exits_on_ctrl_c("retnet-train"), warnings_above_bars():
        return _run_command(argv)


def _run_command(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers would warn after DataLoader forks
    args, overrides = _parser().parse_known_args(argv)
    import retnet
    from retnet.extras import missing_extra
    from retnet.train.config import ConfigError, check_config, load_config  # (neither imports torch)
    from retnet.train.config_base import launch_env_int

    try:
        # before torch and transformers are imported (~5 s): a mistyped key or value is refused at once, and so is
        # a launcher's variable that is no count (the trainer reads them once torch is imported)
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            launch_env_int(name, 0)
        check_config(args.config, overrides)
    except ConfigError as error:
        return _config_error(error)
    # first, before torch and transformers are imported: it quiets torchao's import-time warnings (see there)
    retnet.register()
    import torch.distributed as dist

    from retnet.model.modeling_retnet import XPosFrameError
    from retnet.train.checkpoint import CheckpointError
    from retnet.train.trainer import NonFiniteLossError, Trainer

    trainer, status, config = None, None, None
    try:
        config = load_config(args.config, overrides)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            problems = start_problems(config)
            for problem in problems:
                print(f"retnet-train: error: {problem}", file=sys.stderr)
            return EXIT_CONFIG if problems else EXIT_OK
        try:
            # torchrun's world size is every rank's, so its refusals (C or T not dividing it, a global batch that
            # does not split) are the configuration's, printed once a node: met in the trainer, each rank printed
            config.train.grad_accum_steps(launch_env_int("WORLD_SIZE", 1))
        except ConfigError as error:
            return _config_error(error)
        trainer = Trainer(config)
        trainer.train()
        status = EXIT_OK
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        if config is None and isinstance(error, ConfigError):  # the configuration's, which every rank reads alike
            status = _config_error(error)
        else:  # (a rank's own files, its own state: printed by each rank that met it)
            print(f"retnet-train: error: {error}", file=sys.stderr)
            status = EXIT_CONFIG
    except OSError as error:
        if error.errno != errno.ENAMETOOLONG:
            raise
        # a path setting longer than the OS takes, met wherever it is first looked at (data, tokenizer, resume ...)
        print(f"retnet-train: error: a path setting is longer than this file system allows: "
              f"{str(error.filename)[:80]!r}... ({len(str(error.filename))} characters)", file=sys.stderr)
        status = EXIT_CONFIG
    except NonFiniteLossError as error:
        print(f"retnet-train: error: {error}", file=sys.stderr)
        status = EXIT_NONFINITE
    except ModuleNotFoundError as error:
        # datasets (a local file or a hub dataset), tensorboard, matplotlib ... met where the run first needs them
        message = missing_extra(error, "train")
        if message is None:
            raise
        status = _config_error(ConfigError(message))  # (the same environment on every rank of a node)
    except KeyboardInterrupt:
        # The second Ctrl-C (the first asks for a save after the step): one line, not the traceback of wherever the
        # step was
        last = getattr(trainer, "last_checkpoint", None)
        if trainer is None:  # (a Ctrl-C at the start, before the handler that turns the first into a save)
            print("retnet-train: interrupted before training started", file=sys.stderr)
        else:
            print("retnet-train: interrupted: stopped without saving; "
                  + (f"the last checkpoint is {last}" if last else "no checkpoint was saved"), file=sys.stderr)
        status = EXIT_INTERRUPTED
    except XPosFrameError as error:
        # The data's: a document longer than a packed xPos frame, met when a batch holds one (the start warned);
        # the checkpoints saved before it are kept
        print(f"retnet-train: error: {error}", file=sys.stderr)
        status = EXIT_CONFIG
    finally:
        if trainer is not None:
            # After a stop a signal asked for, this process's own command exits next: a SIGTERM until then (Slurm's
            # to a rank beside the one torchrun passes on) is only logged, as during the save, not the default's 143
            trainer.close(log_sigterm=trainer.signal_received and argv is None)
        if dist.is_available() and dist.is_initialized():
            if status is not None:
                _exit_without_teardown(status)
            dist.destroy_process_group()  # an unexpected error: let its traceback through
    return status


# How long a rank other than its node's first waits before printing a configuration error itself (_config_error).
PEER_WAIT_S = 30.0


def _config_error(error: Exception) -> int:
    """Print a configuration's error once a node; returns the exit status. Every rank of a torchrun launch reads
    the same configuration and meets the same error: the node's first rank (``LOCAL_RANK`` 0) prints it and exits,
    and torchrun then stops the others. Those wait meanwhile rather than exit at once: torchrun stops the rest of a
    launch within 0.1 s of a rank's end, which could be before the first rank printed. One not stopped within
    :data:`PEER_WAIT_S` (the first rank got past the error) prints the error itself. Only under torchrun's agent
    (``TORCHELASTIC_RUN_ID``) with several ranks on the node: a process of its own with a leftover ``LOCAL_RANK``, or
    one of a launcher that stops no one (a Kubeflow pod, srun setting ``RANK``), prints at once."""
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_WORLD_SIZE", "1").strip() != "1"
    if under_torchrun and os.environ.get("LOCAL_RANK", "0").strip() not in ("", "0"):
        time.sleep(PEER_WAIT_S)
    print(f"retnet-train: error: {error}", file=sys.stderr)
    return EXIT_CONFIG


def start_problems(config) -> list[str]:
    """What a start of ``config`` would refuse in its paths, each in the words of that refusal, found without a
    side effect: nothing created (a start makes ``train.output_dir`` before it reads the data), downloaded (a hub
    id is taken as given), hashed (a checkpoint is only looked up) or read but a dataset's file listing."""
    from retnet.model.hub import is_hub_id
    from retnet.train.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
    from retnet.train.config import ConfigError
    from retnet.train.data import data_cache_dir, local_files, resolve_tokenizer_dir
    from retnet.train.trainer import _check_pretrained_dir, _init_from_dir, make_output_dir, named_checkpoint

    output_dir = Path(config.train.output_dir)
    checkpoints, resume = output_dir / "checkpoints", config.train.resume
    init_from = config.model.init_from

    def resume_problem() -> None:  # a checkpoint named is looked up, not verified (hashed)
        named = named_checkpoint(resume, checkpoints)
        if named is not None and not named.is_dir():
            verify_checkpoint(named)  # its refusal of a missing directory, before it reads anything

    def init_from_problem() -> None:
        if init_from and (os.path.exists(os.path.expanduser(init_from)) or not is_hub_id(init_from)):
            _check_pretrained_dir(_init_from_dir(init_from))

    def tokenizer_problem() -> None:
        # Read only by a run that neither continues another model (init_from's tokenizer) nor resumes with the
        # tokenizer it saved in output_dir.
        # (Trainer: reuse = self.resumed and ...: auto resumes only where checkpoints are)
        resumed = resume not in ("none", "auto") or (resume == "auto" and bool(list_checkpoints(checkpoints)))
        saved = resumed and (output_dir / "tokenizer" / "tokenizer_config.json").exists()
        if config.data.tokenizer and not init_from and not saved:
            resolve_tokenizer_dir(config.data.tokenizer, download=False)

    def dataset_problem(label: str | None, source) -> None:
        if source.dataset == "stdlib":
            return
        if label is None:
            local_files(source.dataset)
            return
        from retnet.train.mixture import _naming

        # A mixture source's refusal in the start's words (data.mixture.<label> (dataset ...): ...), each source's
        # own: the first bad source no longer hides the others
        with _naming(label, source.dataset):
            local_files(source.dataset)

    sources = [(label, source) for label, _, source in config.data.sources()] or [(None, config.data)]
    problems = []
    for check in (lambda: make_output_dir(output_dir, create=False), resume_problem, init_from_problem,
                  tokenizer_problem, lambda: data_cache_dir(config.data, create=False),
                  *(lambda label=label, source=source: dataset_problem(label, source) for label, source in sources)):
        try:
            check()
        except (ConfigError, CheckpointError, FileNotFoundError) as error:
            problems.append(str(error))
    return problems


def _exit_without_teardown(status: int) -> typing.NoReturn:
    """End a distributed run without running destructors.

    Destroying a gloo process group (the last reference is DDP's reducer, released when ``main`` returns)
    joins gloo's worker thread, and that thread may still be releasing the last collective's tensors, which
    needs the GIL the destroying thread holds: an intermittent hang at exit after the run has finished. Every
    rank is past its last collective here, and the checkpoint, metrics and plot are written and closed.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
