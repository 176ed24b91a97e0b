"""Weights & Biases logging (``logging.wandb``): start or resume a run's W&B run, send it the metrics records.

Its run id is kept in ``output_dir/wandb-run.json``, so a resume continues the same W&B run, with the order key
(``_record_order``) of the last record sent: W&B drops, with a warning each, a step below the one it is at, and
a resume redoes (bit for bit) the steps between its checkpoint and where the run stopped, so those it already
has are not sent again. ``wandb.log`` only queues a record for W&B's service: the mark is written when the W&B
run has finished (``finish()`` waits for every record), never ahead of what W&B has; after a crash the resume
sends again what followed the last mark (online, W&B's ``starting_step`` drops those it holds; offline, W&B
drops them when synced).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from retnet.train.config import ConfigError, JobConfig
from retnet.train.distributed import barrier, is_distributed

logger = logging.getLogger("retnet.train")  # the trainer's: these are its messages

# The W&B run of a run's output_dir: its id, project and the last record sent (step, kind) when it last finished.
WANDB_STATE = "wandb-run.json"
_KIND_ORDER = {"train": 0, "val": 1}  # a step's training record is written before its evaluation's


class WandbLogger:
    """The W&B run of one training run, on rank 0 (``run`` is None elsewhere, when W&B is off or disabled, and
    after a failure to log). ``start()`` on every rank, then ``log(record)`` per metrics record, ``finish()``."""

    def __init__(self, cfg: JobConfig, output_dir: Path, *, is_main: bool, resumed: bool, step: int):
        self.cfg, self.output_dir, self.is_main = cfg, output_dir, is_main
        self.resumed, self.step = resumed, step  # the step this run starts at (a resume: its checkpoint's)
        self.run = None

    def start(self) -> None:
        """Rank 0 starts or resumes the W&B run; a failure there is an error on every rank."""
        if not self.cfg.logging.wandb:
            if self.is_main:
                self._keep_or_drop_state()
            return
        answer: list[Any] = [None]
        failure: Exception | None = None
        if self.is_main:
            try:
                self._init()
            except Exception as error:  # whatever it is, the other ranks wait for this answer
                failure = error
                answer[0] = str(error) if isinstance(error, ConfigError) else (
                    f"logging.wandb: rank 0 could not start the W&B run: {type(error).__name__}: {error}")
        if is_distributed():
            # else the other ranks would wait for rank 0 in the first collective; and after the long-timeout
            # barrier, since W&B's init (its init_timeout, retries online) may outlast the default group's timeout
            barrier()
            dist.broadcast_object_list(answer, src=0)
        if failure is not None:
            raise failure
        if answer[0] is not None:
            raise ConfigError(answer[0])

    def log(self, record: dict[str, Any]) -> None:
        """Log ``record`` to the W&B run at its step, unless the run has it (or a later step) already."""
        if self.run is None or _record_order(record) <= self._sent or record["step"] < self._floor:
            return  # (None: a failure turned it off)
        try:
            self.run.log(scalars(record), step=record["step"])
        except Exception as error:  # a W&B failure mid-run does not stop the training: it keeps metrics.jsonl
            logger.warning("W&B logging failed at step %d (%s: %s); logging.wandb is off for the rest of this "
                           "run (metrics.jsonl has every record)", record["step"], type(error).__name__, error)
            self.finish(exit_code=1)
            return
        self._sent = _record_order(record)
        self._mark = [record["step"], record["kind"]]

    def finish(self, exit_code: int) -> None:
        """Finish the W&B run (0: finished, else failed), then save the mark of what it has; no run: nothing."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:  # keep close() going (and an exception on its way out, its own)
            logger.warning("W&B run could not finish cleanly: %s: %s", type(error).__name__, error)
            return  # the mark stays where it was: a resume sends those records again
        try:  # W&B has every record sent now: a resume sends only later ones
            self._save_state()
        except OSError as error:
            logger.warning("%s could not be written (%s); a resume sends W&B records it may have already",
                           self.output_dir / WANDB_STATE, error)

    def _state(self) -> tuple[dict[str, Any], str | None]:
        """(the W&B run this run continues: {"id", "project", "sent"}, or {}; why not, for the log)."""
        path = self.output_dir / WANDB_STATE
        if not self.resumed or not path.exists():  # a run that starts anew: not the W&B run of the one it replaces
            return {}, None
        project = self.cfg.logging.wandb_project
        try:
            state = json.loads(path.read_text())
            state = {"id": str(state["id"]), "project": str(state.get("project", project)),
                     "sent": [int(state["sent"][0]), str(state["sent"][1])]}
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return {}, f"{path} is unreadable"
        # Resuming from an older checkpoint's path starts a new trajectory, and a W&B run's history cannot be
        # rewound: a new W&B run, given the records up to the checkpoint. A run that starts anew gets one too.
        if self.cfg.train.resume != "auto" and state["sent"][0] > self.step:
            return {}, (f"train.resume goes back to step {self.step}, before the last step W&B run {state['id']} "
                        f"has ({state['sent'][0]})")
        return state, None

    def _keep_or_drop_state(self) -> None:
        """No W&B run this time: wandb-run.json stays for a later resume with W&B on (which sends that W&B run
        what it missed) unless this run leaves that run's trajectory."""
        if not self._state()[0]:
            (self.output_dir / WANDB_STATE).unlink(missing_ok=True)

    def _init(self) -> None:
        import secrets

        try:
            import wandb
        except ImportError as error:  # installed when the config was checked, but broken
            raise ConfigError(f"logging.wandb: wandb cannot be imported ({error}); pip install "
                              f"'retnet-stack[wandb]' (or --logging.wandb=false)") from None
        log = self.cfg.logging
        state, why_new = self._state()
        if state and state["project"] != log.wandb_project:  # W&B would make a run of that id there, empty
            why_new, state = f"logging.wandb_project is no longer {state['project']!r}", {}
        if why_new:
            logger.info("%s: logging to a new W&B run", why_new)
        state = state or {"id": secrets.token_hex(6), "sent": [-1, ""]}  # hex: valid in any W&B run id
        try:
            run = wandb.init(project=log.wandb_project, name=log.wandb_run_name or self.output_dir.resolve().name,
                             id=state["id"], resume="allow", config=self.cfg.to_dict(), dir=str(self.output_dir),
                             tags=list(log.wandb_tags) or None,
                             reinit="create_new")  # never another run of this process in its place
        except Exception as error:  # no API key, no network when online, a refused entity ...: W&B's own words
            raise ConfigError(f"logging.wandb: W&B could not start run {state['id']} of project "
                              f"{log.wandb_project!r}: {type(error).__name__}: {error} (set WANDB_API_KEY or run "
                              f"`wandb login`, or WANDB_MODE=offline, or --logging.wandb=false)") from None
        self.run = run
        try:
            if getattr(run, "disabled", False) is True:  # WANDB_MODE=disabled: no W&B run, nothing is sent
                self.run = None
                run.finish()
                logger.info("W&B is disabled (WANDB_MODE=disabled): no W&B run")
                self._keep_or_drop_state()
                return
            self._id = state["id"]
            self._mark = list(state["sent"])  # the last record sent: [step, kind]
            self._sent = (state["sent"][0], _KIND_ORDER.get(state["sent"][1], -1))
            # Online, a resumed W&B run is at the step after the last it holds, which may be past what this file
            # says (a crash before the run finished)
            self._floor = int(getattr(run, "starting_step", 0) or 0)
            self._save_state()  # the id, for a resume after a crash
        except BaseException:
            run, self.run = self.run, None
            if run is not None:
                with contextlib.suppress(Exception):  # (its own error is the one to report)
                    run.finish(exit_code=1)
            raise
        logger.info("W&B run %s (project %s)%s", state["id"], log.wandb_project,
                    f", resumed after step {state['sent'][0]}" if state["sent"][0] >= 0 else "")

    def _save_state(self) -> None:
        path = self.output_dir / WANDB_STATE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": self._id, "project": self.cfg.logging.wandb_project,
                                   "sent": self._mark}))
        os.replace(tmp, path)  # a crash mid-write leaves the previous file, never half of one


def _record_order(record: dict[str, Any]) -> tuple[int, int]:
    """The order of a record in a run: by step, then kind."""
    return int(record["step"]), _KIND_ORDER.get(record["kind"], len(_KIND_ORDER))


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's numbers under TensorBoard's and W&B's names (``train/loss``, ``val/val_loss`` ...)."""
    prefix = "train" if record["kind"] == "train" else "val"
    return {f"{prefix}/{key}": value for key, value in record.items()
            if key not in ("kind", "step", "time") and isinstance(value, (int, float))}


__all__ = ["WANDB_STATE", "WandbLogger", "scalars"]
