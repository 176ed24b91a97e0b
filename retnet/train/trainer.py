"""The training loop: data, model, optimizer, accumulation, clipping, evaluation, logging, checkpoints.

Launch (see also ``retnet/train/__main__.py``)::

    retnet-train --config tiny                                   # one process (CPU or one GPU)
    python -m retnet.train --config tiny --train.output_dir=runs/demo
    torchrun --standalone --nproc_per_node=8 -m retnet.train --config retnet-1.3b
    # two nodes, run on each (node_rank 0 and 1), MASTER reachable from both:
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 --rdzv_id=$JOB_ID \\
        -m retnet.train --config retnet-6.7b --train.parallelism=fsdp

One optimizer step: ``global_batch_size`` blocks of ``seq_len`` tokens, as ``micro_batch_size`` per forward,
``grad_accum_steps`` forwards per rank and ``world_size`` ranks. Gradients are only all-reduced on the last
micro-batch (DDP ``require_backward_grad_sync`` / FSDP2 ``set_requires_gradient_sync``), then clipped to
``optim.grad_clip`` and stepped with AdamW (``optim.name="muon"``: Muon on the decoder layers' matrices, AdamW
on the rest, ``retnet.train.muon``). ``retnet.train.optim.get_lr`` is linear warmup then cosine (or linear) decay.
Each step's loss is the mean over the whole global batch (every block has the same token count, so the mean
of per-rank means is the global mean): a 2-rank run logs the same losses as a 1-rank run with the same
global batch. Chat data (``data.format = "chat"``) counts only the assistant tokens, a different number in
every block: each micro-batch's summed loss is divided by the global batch's target count
(``num_items_in_batch``), so the micro-batches and ranks add up to the mean over the global batch's targets.
With ``train.context_parallel`` C > 1 every C consecutive ranks form a group that holds one micro-batch, each
rank running one piece of its row along time (``retnet.model.context_parallel``): the W / C groups are the
data-parallel ranks the batches are dealt to, each piece's loss is its share of the row's (over the row's target
count), and the run logs the losses a run without it logs. With ``train.tensor_parallel`` T > 1 every T consecutive
ranks run one micro-batch with each decoder layer split between them (``retnet.model.tensor_parallel``); the W / T
groups are the data-parallel ranks, whose gradients ``_average_gradients`` averages (no DDP wrapper) or, with
``train.parallelism = "fsdp"``, FSDP2 shards each split layer and the rest over them (``mesh["dp"]``; torchtitan's
FSDP+TP), its reduce-scatter taking that mean; either way the run logs the losses a run without it logs.
With ``lora.rank > 0`` (``retnet.train.lora``) peft's adapters are injected into the model before it is wrapped,
and only they train: the optimizer holds them alone and, on a pretrained model, checkpoints hold only them.
Preference pairs (``data.format = "preference"``) train with DPO: ``retnet.train.preference`` holds the reference
log-probs (computed at the start), the loss per micro-batch and its rewards, which ride the step's all-reduce
(under tensor parallelism counted once a group, as the loss is; the reference pass and the evaluation gather and sum
over ``mesh["dp"]``; under context parallelism each rank's piece of the row gives its part of every sequence's
log-prob or score, summed over the group, its loss its share, the metrics counted by the group's first rank, the
reference pass and the evaluation over the ranks holding the same piece in each group); with ``reward.enabled``
``retnet.train.reward`` trains a reward model (a classifier) on them instead. Unpaired labelled completions
(``data.format = "unpaired"``) train with KTO through the same hooks (``retnet.train.kto``). Prompts (``data.format = "prompts"``)
train with GRPO through the same hooks: ``retnet.train.grpo`` samples and scores each step's completions when it
hands out the micro-batches (under tensor parallelism a group's ranks the same ones, its sums over ``mesh["dp"]``).
With ``distill.teacher`` (``retnet.train.distill``) a frozen teacher runs on each training micro-batch and the loss
is the distillation loss towards it, its parts (``kd_loss``, ``ce_loss``) riding the step's all-reduce like DPO's
metrics (under context parallelism the teacher runs each rank's piece, and the parts are its shares, as the loss);
the validation loss stays the plain one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from time import monotonic
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from retnet.extras import bar_open, emit_above_bars, warnings_above_bars
from retnet.train.chat import target_count
from retnet.train.checkpoint import (
    CheckpointError,
    checkpoint_layout,
    commit_checkpoint,
    export_pretrained,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_checkpoint_trainer,
    load_sharded_state,
    loading_mismatches,
    lock_output_dir,
    new_temp_dir,
    note_verified,
    remove_stale_export,
    remove_stale_temp,
    replace_directory,
    retire_export,
    rng_state,
    save_checkpoint,
    save_sharded_state,
    saved_model_shapes,
    set_rng_state,
    step_dir_name,
    supersede_after,
    unlock_output_dir,
    verified_identity,
)
from retnet.train.config import (
    FREE_MODEL_FIELDS,
    ConfigError,
    JobConfig,
    architecture_changes,
    data_changes,
    distill_changes,
    dpo_changes,
    grpo_changes,
    kto_changes,
    lora_changes,
    model_changes,
    optim_changes,
    reward_changes,
    schedule_warnings,
    validation_split_warnings,
)
from retnet.train.data import (
    build_data,
    document_prefix,
    masked_labels,
    model_vocab_size,
    packed_segments,
    tokenizer_mismatch,
    vocab_bound,
)
from retnet.train.distributed import (
    barrier,
    context_parallel_group,
    copy_full_state,
    data_parallel_group,
    init_distributed,
    is_distributed,
    tensor_parallel_mesh,
)
from retnet.train.flops import StepFlops, flops_per_token, head_flops_per_token, peak_flops
from retnet.train.muon import MuonWithAdamW
from retnet.train.optim import adamw_kernel, build_optimizer, get_lr, optimizer_note, set_lr
from retnet.train.wandb_logging import WandbLogger, scalars

logger = logging.getLogger("retnet.train")
# Tensor parallelism's data-parallel gradient mean: the elements one flat all-reduce carries (100 MiB of fp32, four
# of DDP's default buckets): few collectives, and a bounded extra copy of the gradients
GRAD_BUCKET_ELEMENTS = 25 * 2**20

class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or inf; the run stops without saving (the last checkpoint stays
    the last good one)."""


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------
def _log_sigterm(signum, frame) -> None:
    logger.warning("received SIGTERM again: the run has stopped and saved; exiting")


class Trainer:
    """Builds everything from a JobConfig; ``train()`` runs to ``train.steps`` (or a stop signal);
    ``close()`` releases loggers and signal handlers."""

    def __init__(self, cfg: JobConfig):
        try:
            self._set_up(cfg)
        except BaseException:
            # The lock rank 0 took on output_dir (_resolve_resume) goes with a run that never starts: a program of
            # its own that built this trainer lives on, and would keep the directory from every other run
            if hasattr(self, "output_dir"):
                unlock_output_dir(self.output_dir)
            raise

    def _set_up(self, cfg: JobConfig) -> None:
        from retnet.model import RetNetConfig, RetNetForCausalLM

        self.cfg = cfg
        self.rank, self.local_rank, self.world_size, self.device = init_distributed(cfg.train.device)
        self.is_main = self.rank == 0
        self.accum = cfg.train.grad_accum_steps(self.world_size)  # (refuses a world that C or T does not divide)
        # Context parallelism: the C ranks of a group hold one micro-batch, each a piece of its row. Tensor
        # parallelism: the T ranks of a group run it together, each a slice of every layer. The groups are the
        # data-parallel ranks, and the data is dealt to them (the ranks of a group read the same blocks).
        self.cp_size, self.tp_size = cfg.train.context_parallel, cfg.train.tensor_parallel
        group_size = cfg.train.group_size
        self.group_rank, self.dp_rank = self.rank % group_size, self.rank // group_size
        # Both: a group is C pieces of T consecutive ranks each, a piece's T ranks splitting its layers.
        self.cp_rank, self.tp_rank = divmod(self.group_rank, self.tp_size)
        self.dp_size = self.world_size // group_size
        self.cp_group = context_parallel_group(self.rank, self.world_size, self.cp_size, stride=self.tp_size)
        self.tp_mesh = tensor_parallel_mesh(self.device, self.world_size, self.tp_size)
        # Preference pairs under context parallelism: the ranks of the other groups holding this rank's piece, over
        # which the reference pass gathers and the evaluation sums (each pair once, not once a piece)
        self.dp_group = (data_parallel_group(self.rank, self.world_size, group_size)
                         if self.cp_size > 1 and cfg.data.format in ("preference", "unpaired") else None)
        # The ranks that read the same micro-batches (streamed data: one reads, broadcasts to the others)
        if self.cp_size > 1 and self.tp_size > 1:
            self.batch_group = (context_parallel_group(self.rank, self.world_size, group_size)
                                if cfg.data.streaming else None)
        else:
            self.batch_group = self.cp_group if self.tp_mesh is None else self.tp_mesh["tp"].get_group()
        # The all-reduced loss sums count each rank's loss, a context-parallel piece's share of its group's; every
        # rank of a tensor-parallel group (a piece's, with both) computes the same loss, counted once, by its first.
        self.counts_loss = self.tp_size == 1 or self.tp_rank == 0
        # The ranks holding the same slice of the weights, whose gradients are combined: every rank under DDP and
        # FSDP2; under tensor parallelism mesh["dp"], the data-parallel groups' (and their pieces') ranks of that
        # slice (_average_gradients, or FSDP2 over mesh["dp"]).
        self.gradient_ranks = self.world_size // self.tp_size
        self.output_dir = Path(cfg.train.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.step, self.stop_requested, self.last_saved_step = 0, False, -1
        # The steps since the last metrics record (global-batch losses, training seconds): checkpoints carry
        # them, so a resumed run's next record averages the same steps as that of a run never stopped.
        self.window_losses: list[float] = []
        self.window_seconds = 0.0
        # The learning rate(s) and gradient norm of the last step trained, which its record reports: checkpoints carry
        # them with the window, whose record a run resumed at train.steps writes without training a step.
        self._last: dict[str, float] = {}
        # Counted, not step × global batch: a resume may change the batch (and so the tokens of a step).
        self.tokens = self.window_tokens = 0
        self.window_flops = 0.0  # the window's tokens' (:attr:`step_flops`), for the MFU
        # The evaluation a stop left undone at its step (a preemption's grace period is for the checkpoint);
        # checkpoints carry it, and the resumed run evaluates that step before its first step.
        self.pending_eval = False
        # The step whose validation metrics.jsonl holds last: this run's evaluations, or (rank 0's) the record kept
        # of a resumed checkpoint's step. A run ends by evaluating its final step unless that step has one.
        self.evaluated_step = -1
        self.logged_step = -1  # likewise the step of the last training record (rank 0's)
        # A signal only marks this rank; the loop stops on stop_requested, which every rank takes from the same
        # all-reduce, because a rank that left alone would leave the others waiting in the next collective.
        self.signal_received = False
        self._writer = self._progress = self._metrics = self._wandb = None
        self._progress_hooks = contextlib.ExitStack()  # what the bar holds while open (warnings_above_bars)
        self._completed = False  # train() returned: the W&B run finishes as finished, else as failed
        self._closing_interrupts = 0  # Ctrl-Cs since train() returned: the second leaves the closing
        self._plotted_at: float | None = None  # when loss.png was last drawn (math.inf: matplotlib is missing)
        self._plot_gap = _PLOT_EVERY_S  # the least time before the next draw while the run goes on (_plot)
        self._previous_handlers: dict[int, Any] = {}
        _setup_logging(self.rank)
        if self.is_main:
            for warning in [*schedule_warnings(cfg), *validation_split_warnings(cfg)]:
                logger.warning(warning)

        resume_path = self._resolve_resume()  # (rank 0 also creates output_dir)
        self.resumed = resume_path is not None
        if self.is_main:
            stale = [*remove_stale_export(self.output_dir / "export"),
                     *remove_stale_export(self.output_dir / "tokenizer")]
            if stale:
                logger.info("removed stale temporary export or tokenizer directories of an interrupted write: %s",
                            ", ".join(p.name for p in stale))
            # An export here is another run's: left until this one's replaced it, it would pass for this run's
            if not self.resumed and retire_export(self.output_dir / "export") is not None:
                logger.warning("removed %s, the export of an earlier run in this train.output_dir (%s)",
                               self.output_dir / "export", "this run writes its own when it finishes"
                               if self.cfg.checkpoint.export else "this run writes none: checkpoint.export=false")
            # likewise an earlier run's loss.png, drawn again by this run at its first evaluation or checkpoint (a
            # resumed run's is its own: its metrics.jsonl keeps the records up to the checkpoint)
            from retnet.train.plots import remove_stale_plots

            try:
                if remove_stale_plots(self.output_dir / "loss.png", keep=self.resumed):
                    logger.info("removed %s, the loss plot of an earlier run in this train.output_dir",
                                self.output_dir / "loss.png")
            except OSError as error:  # a convenience: the run goes on
                logger.warning("could not remove the loss plot of an earlier run: %s", error)
        barrier()

        # Data (and tokenizer): a resumed run keeps using the tokenizer its checkpoints were trained with; a
        # run that starts (even in an output_dir whose earlier run died before its first checkpoint) takes the
        # configured one, and saves it for its own resumes.
        saved_tokenizer = self.output_dir / "tokenizer"
        reuse = self.resumed and (saved_tokenizer / "tokenizer_config.json").exists()
        hub_fingerprint = None
        if resume_path is not None:
            # Before the data is built: reading and tokenizing another dataset can take hours, only to be refused.
            hub_fingerprint = self._check_resume_data(resume_path, tokenizer_reused=reuse)
        if cfg.lora.target_modules:  # likewise: a target the model lacks (g_proj without use_output_gate ...)
            from retnet.train.lora import resolve_targets

            resolve_targets(cfg.lora, self._default_lora_targets())
        if reuse and cfg.data.tokenizer and self.is_main:
            logger.info("resuming: using the tokenizer saved in %s (data.tokenizer is only read by a run that "
                        "starts)", saved_tokenizer)
        preset_vocab = RetNetConfig.from_preset(cfg.model.preset).vocab_size
        init_from = self._init_from_dir()
        if init_from is not None:  # a resume reads its architecture there too (its weights: the checkpoint's)
            _check_pretrained_dir(init_from, causal_lm=not cfg.reward.enabled)
            if self.tp_size > 1:  # its heads, FFN width and dropout are known now, not after hours of tokenizing
                planned = self._planned_model_config()
                if "dropout" not in cfg.model.overrides() and (cfg.reward.enabled or
                                                                 cfg.data.format in ("preference", "unpaired")):
                    planned.dropout = 0.0  # the objective turns it off (TRL's disable_dropout; model_overrides)
                self._check_splits(planned, f"model.init_from {str(init_from)!r}")
        teacher_dir = self._teacher_dir()
        # Distilling into a new model without data.tokenizer: the teacher's tokenizer, whose ids its head predicts
        tokenizer_dir = init_from
        if tokenizer_dir is None and teacher_dir is not None and not cfg.data.tokenizer:
            from retnet.train.distill import teacher_tokenizer

            tokenizer_dir = teacher_dir if reuse else teacher_tokenizer(teacher_dir)
        teacher_config = None
        if teacher_dir is not None:  # before the data is built, and the student (its vocabulary is the teacher's)
            teacher_config = self._check_teacher(teacher_dir, saved_tokenizer if reuse else tokenizer_dir)
        if resume_path is not None:  # before the data is built: tokenized with another tokenizer, it is refused
            self._check_resume_tokenizer(resume_path, saved_tokenizer if reuse else tokenizer_dir, reuse)
        self.data = build_data(
            cfg.data, vocab_size=cfg.model.vocab_size or preset_vocab, seed=cfg.train.seed,
            micro_batch=cfg.train.micro_batch_size, global_batch=cfg.train.global_batch_size, rank=self.dp_rank,
            local_rank=self.local_rank, world_size=self.dp_size,
            tokenizer_dir=saved_tokenizer if reuse else tokenizer_dir, barrier=barrier, hub_fingerprint=hub_fingerprint,
        )
        if cfg.reward.enabled:  # the same pairs, batches and position; a classifier's objective
            from retnet.train.reward import RewardData

            self.data = RewardData.of(self.data, cfg.reward)
        self.tokenizer = self.data.tokenizer
        # A packed text segment starts at the BOS that opens each document (document_prefix: a Llama-style
        # tokenizer's), from a fresh state as a served prompt does; else at the EOS before it, which then opens it.
        prefix = document_prefix(self.tokenizer)
        self.segment_start_id = prefix[0] if prefix else self.tokenizer.eos_token_id
        self.document_prefix = prefix if cfg.data.format == "text" else []  # what text documents open with
        if self.is_main and not reuse:
            # Replacing what was there: files of another tokenizer left beside these could be what a load picks.
            replace_directory(saved_tokenizer, self.tokenizer.save_pretrained)

        # Model: the same init on every rank (one seed), then per-rank seeds for anything random after.
        # The loss without the [B, T, vocab] logits unless the config says otherwise
        overrides = {"fuse_linear_cross_entropy": True, **cfg.model.overrides()}
        # Settings of the training alone, which the export writes back as the starting model had them: TRL's
        # disable_dropout zeroes the training's dropout, not the model's config, so a model tuned further from the
        # export (an SFT after DPO) trains with the dropout it had, and one loaded from it returns its logits in
        # training mode. An objective's setting of what the model is (a reward model's num_labels) stays.
        training_only = {"fuse_linear_cross_entropy"}
        if hasattr(self.data, "model_overrides"):  # DPO, KTO, reward model: without dropout (TRL disable_dropout)
            objective = self.data.model_overrides(cfg.model, init_from, cfg.lora.dropout if cfg.lora.enabled else 0.0)
            training_only |= objective.keys() & FREE_MODEL_FIELDS
            overrides.update(objective)
        torch.manual_seed(cfg.train.seed)
        if init_from is not None:
            # Loaded on every rank (the same file, the same weights), before DDP or FSDP wraps it. A resume
            # loads its checkpoint over them; the architecture is the same.
            self.model_config = _pretrained_config(init_from, overrides, self.tokenizer)
            if self.tp_size > 1:  # the config checks a preset's; this model's are known now, before its weights load
                self._check_splits(self.model_config, f"model.init_from {str(init_from)!r}")
            self.raw_model = _pretrained_model(init_from, self.model_config,
                                               getattr(self.data, "model_class", None)).to(self.device)
            if cfg.lora.enabled:
                # Now, of the weights just loaded, not at the first save: init_from may be rewritten meanwhile.
                # The other ranks wait on the long-timeout barrier, not in DDP's or the first step's collective.
                if self.is_main:
                    self._base_fingerprint()
                barrier()
        else:
            if resume_path is not None and teacher_config is None:
                # A resume keeps the vocabulary its checkpoint was trained with, as it keeps its tokenizer
                rows = saved_model_shapes(resume_path).get("model.embed_tokens.weight", [0])[0]
                vocab_size = max(rows, vocab_bound(self.tokenizer))  # (_check_fits names a checkpoint too small)
                if self.is_main and cfg.data.tokenizer and cfg.model.vocab_size not in (None, vocab_size):
                    logger.info("resuming: the model keeps its checkpoint's %d embedding rows (model.vocab_size %d "
                                "is read by a run that starts)", vocab_size, cfg.model.vocab_size)
            elif teacher_config is None:
                # model.vocab_size is the BPE's size when one is trained; beside a given tokenizer it pads the
                # embedding past the tokenizer's ids
                vocab_size = model_vocab_size(self.tokenizer, cfg.model.vocab_size if cfg.data.tokenizer else None)
            elif cfg.model.vocab_size is not None and cfg.model.vocab_size != teacher_config.vocab_size:
                raise ConfigError(f"model.vocab_size must be the teacher's ({teacher_config.vocab_size}, whose ids "
                                  f"the student predicts) or unset; got {cfg.model.vocab_size}")
            else:
                vocab_size = teacher_config.vocab_size
            try:
                self.model_config = RetNetConfig.from_preset(
                    cfg.model.preset, **overrides, vocab_size=vocab_size,
                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                )
            except (TypeError, ValueError) as error:
                raise ConfigError(f"model: {error}") from None
            self.raw_model = RetNetForCausalLM(self.model_config).to(self.device)
        self.export_overrides = _starting_values(init_from, cfg.model.preset, training_only)
        # LoRA: the adapters injected in place (the model keeps its class and forward), before DDP or FSDP,
        # activation checkpointing and compile see it; initialized alike on every rank (the seed above).
        self.peft_model, self.lora_targets = None, []
        if cfg.lora.enabled:
            from retnet.train.lora import apply_lora, target_names

            self.lora_targets = target_names(cfg.lora, self.raw_model)
            self.peft_model = apply_lora(self.raw_model, cfg.lora, self.lora_targets, init_from)
        self.teacher = None
        if teacher_dir is not None:  # before the per-rank seeds: a run at distill.alpha 0 draws as one without it
            from retnet.train.distill import load_teacher

            dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" and self.device.type == "cuda" \
                else torch.float32
            self.teacher = load_teacher(cfg.distill, teacher_dir, teacher_config, self.device, dtype)
            self._teacher_fingerprint()  # of the weights just loaded, as LoRA's base (a resume's: already)
        if self.is_main:
            self._warn_of_xpos_frames()
        self.n_params = sum(p.numel() for p in self.raw_model.parameters())
        self.n_trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        # GRPO: a sequence is a prompt and its completion, whose length the data learns from [grpo] only at start()
        seq_len = self.data.sequence_length(cfg.grpo) if getattr(self.data, "grpo", False) else self.data.seq_len
        if self.cp_size > 1:
            # A rank's retention runs over its piece of each row (a block, or a packed micro-batch's blocks), so
            # its chunks hold no more than the piece's tokens. The share of the incoming state (one more q·S per
            # token of a piece's first document) is the split's overhead, not counted, as recomputation is not.
            row = seq_len * (cfg.train.micro_batch_size if cfg.data.document_boundaries else 1)
            seq_len = min(seq_len, row // self.cp_size)
        # (the retention's in the form it runs in on this device: parallel on a CPU up to 256 tokens)
        self.flops_per_token = flops_per_token(self.model_config, seq_len,
                                               self.n_trainable if cfg.lora.enabled else None,
                                               output_head=not cfg.reward.enabled, device=self.device)
        if teacher_config is not None:  # the teacher's forward: a third of its training FLOPs
            self.flops_per_token += flops_per_token(teacher_config, seq_len, device=self.device) / 3
        # DPO, KTO and GRPO compute the logits at the completion tokens alone (the data's step_head_tokens); a
        # reward model's head is a score, no vocabulary projection
        adapters = self.n_trainable if cfg.lora.enabled else None
        self.step_flops = StepFlops(self.flops_per_token, 0.0 if cfg.reward.enabled
                                    else head_flops_per_token(self.model_config, adapters))
        # GRPO's reference log-probs (grpo.beta > 0): a forward without grad of the model as it started
        self.reference_flops = StepFlops(flops_per_token(self.model_config, seq_len, device=self.device) / 3,
                                         head_flops_per_token(self.model_config) / 3)
        self.peak_flops = peak_flops(self.device, cfg.logging.peak_flops)
        self._seed_rank()
        self.model = self._wrap(self.raw_model)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, self.device)
        logger.info("optimizer: %s", optimizer_note(self.raw_model, self.optimizer))
        use_bf16 = cfg.train.mixed_precision == "bf16" and self.device.type == "cuda"
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if use_bf16 and not self.fsdp else contextlib.nullcontext())

        self.last_checkpoint: Path | None = resume_path  # the newest this run knows to be good
        if resume_path is not None:
            self._load(resume_path)
            if self.is_main and cfg.train.resume not in ("auto", "none"):
                abandoned = supersede_after(self.ckpt_root, self.step)
                if abandoned:
                    # the export was of that trajectory's last step: it goes aside with its checkpoints
                    export = retire_export(self.output_dir / "export", f"export.abandoned-{int(time.time())}")
                    logger.warning("resuming explicitly from step %d: the later checkpoints of the trajectory it "
                                   "leaves are moved aside (delete them when no longer needed; a command relaunched in a loop "
                                   "should resume with train.resume=auto, which continues the newest): %s", self.step,
                                   ", ".join(p.name for p in [*abandoned, *([export] if export else [])]))
        if getattr(self.data, "grpo", False):  # GRPO: the reward sources, the reference policy
            self.data.start(self)
        elif getattr(self.data, "preference", False):  # DPO: the reference log-probs of the model as it starts
            # Its collectives over the data-parallel ranks: a tensor-parallel group's ranks hold the same pairs
            dp_group = None if self.tp_mesh is None else self.tp_mesh["dp"].get_group()
            context = None
            if self.cp_size > 1:  # each rank a piece of every row of its group's pairs
                from retnet.model.context_parallel import ContextGroup

                dp_group, context = self.dp_group, ContextGroup(self.cp_rank, self.cp_size, self.cp_group)
            # KTO's rows (data.format "unpaired") go through the same hooks with their own objective
            objective = cfg.kto if getattr(self.data, "kto", False) else cfg.dpo
            self.data.start(objective, self.model, self.autocast, self.device, output_dir=self.output_dir,
                            checkpoint=resume_path, progress=self.is_main and cfg.logging.progress, barrier=barrier,
                            group=dp_group, context=context)
        self.start_step = self.step
        self._start_wandb()  # every rank: the others take rank 0's failure to start it, and exit with it
        try:
            if self.is_main:
                self._open_loggers()
            self._install_signal_handlers()
        except BaseException:
            self.close()  # main() has no trainer to close: the W&B run (as failed), the files opened
            raise
        logger.info(
            "model %s: %.2fM parameters, %s trainable; world %d%s × micro %d × accum %d = global %d %s; %s on %s%s",
            self.model_name, self.n_params / 1e6, self._trainable_note(), self.world_size, self._split_note(),
            cfg.train.micro_batch_size, self.accum, cfg.train.global_batch_size, self._batch_unit_note(),
            self._parallelism_note(), self.device, f"; resumed from {resume_path} at step {self.step}"
            if resume_path else "",
        )

    # -- setup -------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """What the logs and the loss plot call the model: its preset, or what it was fine-tuned from."""
        init_from = self.cfg.model.init_from
        return f"fine-tuned from {Path(init_from).name or init_from}" if init_from else self.cfg.model.preset

    def _split_note(self) -> str:
        """The start-up line's split of the world into data-parallel groups (empty without one)."""
        splits = "".join(f" / {name} parallel {size}" for name, size in (("context", self.cp_size),
                                                                         ("tensor", self.tp_size)) if size > 1)
        return f"{splits} = {self.dp_size} data-parallel groups" if splits else ""

    def _batch_unit_note(self) -> str:
        """What the start-up line's batch sizes count: DPO and reward models batch preference pairs (two sequences
        each) and GRPO completions, not the packed blocks of data.seq_len tokens of text and chat data."""
        if getattr(self.data, "grpo", False):
            return f"completions (prompt + completion: up to {self.data.seq_len} tokens)"
        if getattr(self.data, "kto", False):
            return f"unpaired rows (completion + KL completion: up to {self.data.seq_len} tokens each)"
        if getattr(self.data, "preference", False):
            return f"preference pairs (chosen + rejected: up to {self.data.seq_len} tokens each)"
        return f"blocks of {self.data.seq_len} tokens"

    def _parallelism_note(self) -> str:
        if not is_distributed():
            return "single process"
        if self.tp_size > 1:  # no DDP (it takes no DTensor parameters): FSDP2 over mesh["dp"], or _average_gradients
            also = [what for what, on in (("vocabulary", self.cfg.train.vocab_parallel),
                                          ("sequence", self.cfg.train.sequence_parallel)) if on]
            split = "tensor parallel" + (f" ({' and '.join(also)} split too)" if also else "")
            if self.fsdp:
                return f"{split}, fsdp over the data-parallel groups"
            return split + (", data-parallel gradient mean" if self.dp_size > 1 else "")
        return self.cfg.train.parallelism

    def _trainable_note(self) -> str:
        if not self.cfg.lora.enabled:
            return "all"
        kind = "DoRA" if self.cfg.lora.use_dora else "LoRA"
        head = " and the score head" if self.cfg.reward.enabled else ""  # peft's modules_to_save: trained in full
        return (f"{self.n_trainable / 1e6:.3f}M ({100 * self.n_trainable / self.n_params:.2f}%: {kind} rank "
                f"{self.cfg.lora.rank} on {','.join(self.lora_targets)}{head})")

    @property
    def adapters_only(self) -> bool:
        """Checkpoints hold only the adapters (and their optimizer state): LoRA on a pretrained model, whose
        weights a resume loads from ``model.init_from`` again. On a random init they hold the whole model."""
        return self.cfg.lora.enabled and self.cfg.model.init_from is not None

    def _init_from_dir(self) -> Path | None:
        """``model.init_from``'s directory, resolved once: a hub id's snapshot is not looked up at every save."""
        if not hasattr(self, "_init_from"):
            self._init_from = _init_from_dir(self.cfg.model.init_from)
        return self._init_from

    def _base_fingerprint(self) -> str:
        """:func:`~retnet.train.lora.base_fingerprint` of ``model.init_from``, computed once."""
        if getattr(self, "_fingerprint", None) is None:
            from retnet.train.lora import base_fingerprint

            path = self._init_from_dir()
            _check_pretrained_dir(path)  # a resume checks it here, before the data is built (a ConfigError naming it)
            self._fingerprint = base_fingerprint(path, "model.init_from")
        return self._fingerprint

    def _default_lora_targets(self) -> list[str]:
        """What an empty ``lora.target_modules`` adapts on this run's model, known before the model is built (a
        resume compares it with its checkpoint's before the data is read): the architecture of ``model.init_from``,
        else the preset's with ``[model]`` on top."""
        from retnet.train.lora import default_targets

        if getattr(self, "_lora_defaults", None) is not None:
            return self._lora_defaults
        self._lora_defaults = default_targets(self._planned_model_config())
        return self._lora_defaults

    def _planned_model_config(self):
        """The RetNetConfig this run's model will have but for the tokenizer's ids, known before the data is read:
        ``model.init_from``'s config.json, else the preset's, with ``[model]`` on top."""
        from retnet.model import RetNetConfig

        overrides = self.cfg.model.overrides()
        init_from = self._init_from_dir()
        try:
            if init_from is None:
                return RetNetConfig.from_preset(self.cfg.model.preset, **overrides)
            _check_pretrained_dir(init_from)
            saved, _ = RetNetConfig.get_config_dict(str(init_from), local_files_only=True)
            if saved.get("model_type") != RetNetConfig.model_type:  # _pretrained_config's refusal, first here
                raise ConfigError(f"model.init_from {str(init_from)!r} holds a {saved.get('model_type')!r} model, "
                                  "not a RetNet")
            return RetNetConfig.from_dict({**saved, **overrides})
        except ConfigError:
            raise
        except (TypeError, ValueError) as error:  # as the model's own build reports it, once the data is read
            where = f" (on model.init_from {str(init_from)!r})" if init_from is not None else ""
            raise ConfigError(f"model{where}: {error}") from None

    def _warn_of_xpos_frames(self) -> None:
        """Warn when a packed row piece can hold a sequence longer than one packed xPos frame of the model or of the
        distillation teacher (which runs the same packed rows): the forward stops the run at the first batch that
        holds one (XPosFrameError), maybe hours in. Warned, not refused: shorter documents never meet it. Text rows
        are packed with data.document_boundaries; preference pairs (DPO and its variants, reward models), KTO's rows
        and GRPO's completions always, a prompt and its completion a segment."""
        from retnet.model.modeling_retnet import XPOS_PACKED_MAX_GROWTH, xpos_span

        cfg = self.cfg
        models = [("model", self.model_config)]
        if self.teacher is not None:
            models.append(("distill.teacher", self.teacher.model.config))
        models = [(name, config) for name, config in models if getattr(config, "use_xpos", False)]
        grpo, pairs = getattr(self.data, "grpo", False), getattr(self.data, "preference", False)
        if not models or not (cfg.data.document_boundaries or grpo or pairs):
            return
        mb = cfg.train.micro_batch_size
        if grpo:
            seq_len = self.data.sequence_length(cfg.grpo)
            source = (f"the longest prompt, {self.data.longest_prompt} tokens, and "
                      f"{cfg.grpo.sampling['max_new_tokens']} sampled ones")
            what, row = "a prompt and its completion", seq_len * mb
            advice = ("Prompts and completions of at most {span} tokens together keep every sequence within a frame "
                      "(data.max_prompt_length cuts the prompts, grpo.max_completion_length the completions)")
        elif pairs:
            seq_len, source = self.data.seq_len, f"data.seq_len {self.data.seq_len}"
            # two sequences a pair (KTO: a completion and a KL completion, but for a loss without the KL term)
            unpaired = getattr(self.data, "kto", False) and cfg.kto.loss_type != "kto"
            what, row = "a prompt and its completion", seq_len * (1 if unpaired else 2) * mb
            advice = ("A data.seq_len of at most {span} keeps every sequence within a frame (a completion is cut to "
                      "fit it after its prompt)")
        else:
            seq_len, source = self.data.seq_len, f"data.seq_len {self.data.seq_len}"
            what, row = "a document", seq_len * mb
            advice = ("A data.seq_len of at most {span} keeps every sequence within a frame "
                      "(data.document_boundaries=false runs whole rows in frames of their own, the state flowing "
                      "across documents)")
        # A packed sequence is one within a row (a text block starts a document's part), cut further by a
        # context-parallel rank's piece of the micro-batch's row (a row of pairs padded to a length the ranks divide)
        longest = min(seq_len, -(-row // self.cp_size))
        how = "with data.document_boundaries" if not (grpo or pairs) else f"on data.format {cfg.data.format!r}"
        for name, config in models:
            span = xpos_span(config, XPOS_PACKED_MAX_GROWTH)
            if longest > span:
                logger.warning(
                    "%s use_xpos %s: a packed sequence may hold %d tokens (%s%s), more than one packed xPos frame of "
                    "the %s, %d positions at xpos_scale_base %s: a batch holding %s that long stops the run. %s",
                    name, how, longest, source,
                    ", cut to a context-parallel rank's piece of the row" if longest < seq_len else "",
                    "teacher" if name == "distill.teacher" else "model", span, config.xpos_scale_base, what,
                    advice.format(span=span))

    def _teacher_dir(self) -> Path | None:
        """``distill.teacher``'s directory, resolved once (None without distillation)."""
        if not hasattr(self, "_teacher_path"):
            from retnet.train.distill import resolve_teacher

            self._teacher_path = resolve_teacher(self.cfg.distill) if self.cfg.distill.enabled else None
        return self._teacher_path

    def _check_teacher(self, path: Path, tokenizer_dir: Path | None):
        """The teacher's RetNetConfig, checked against the run's tokenizer (read from ``tokenizer_dir``, else
        ``data.tokenizer``, as build_data reads it) and a ``model.init_from`` student's vocabulary: before the data
        is built, whose reading and tokenizing can take hours, only to be refused."""
        from retnet.model import RetNetConfig
        from retnet.train.data import load_tokenizer
        from retnet.train.distill import check_vocab, teacher_config

        init_from = self._init_from_dir()
        config = teacher_config(path, load_tokenizer(tokenizer_dir or self.cfg.data.tokenizer),
                                self.cfg.model.init_from if init_from is not None else None)
        if init_from is not None:  # a preset student takes the teacher's vocabulary
            saved, _ = RetNetConfig.get_config_dict(str(init_from), local_files_only=True)
            check_vocab(path, config, saved.get("vocab_size", RetNetConfig().vocab_size),
                        f"model.init_from {self.cfg.model.init_from!r}")
        return config

    def _teacher_fingerprint(self) -> str:
        """:func:`~retnet.train.lora.base_fingerprint` of the teacher's weights, computed once, by rank 0: the
        others take its answer rather than each reading every weight again. A collective under torchrun (every rank
        calls it at the same point the first time): the others wait for the hashing on the long-timeout barrier."""
        if getattr(self, "_teacher_sha", None) is None:
            from retnet.train.lora import base_fingerprint

            answer: list[str | None] = [None]
            failure = None
            if self.is_main:
                try:
                    answer[0] = base_fingerprint(self._teacher_dir(), "distill.teacher")
                except Exception as error:  # told to the others (answer None) before it is raised here
                    failure = error
            if is_distributed():
                barrier()
                dist.broadcast_object_list(answer, src=0)
            if failure is not None:
                raise failure
            if answer[0] is None:
                raise ConfigError(f"distill.teacher {self.cfg.distill.teacher!r}: rank 0 could not read its weights "
                                  f"to fingerprint them (its error is in rank 0's log)")
            self._teacher_sha = answer[0]
        return self._teacher_sha

    def _checkpointed(self, model_state: dict) -> dict:
        """The part of a model state dict a checkpoint holds: all of it, or only the adapters."""
        if not self.adapters_only:
            return model_state
        from retnet.train.lora import trainable_names

        keep = set(trainable_names(self.raw_model))
        return {key: value for key, value in model_state.items() if key in keep}

    @property
    def fsdp(self) -> bool:
        return self.cfg.train.parallelism == "fsdp" and is_distributed()

    @property
    def split_parameters(self) -> bool:
        """The parameters are DTensors, FSDP2's shards or tensor-parallel slices: their full state dicts are
        gathered and loaded through torch's distributed state-dict API, a collective of every rank."""
        return self.fsdp or self.tp_mesh is not None

    def _seed_rank(self) -> None:
        seed = self.cfg.train.seed + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _check_splits(self, config, source: str) -> None:
        """ConfigError for a model the tensor-parallel ranks cannot split, naming the setting (``source`` says
        where its value comes from): the config refuses a preset's before the data is read."""
        for name in ("num_attention_heads", "intermediate_size"):
            value = getattr(config, name)
            if value % self.tp_size:
                raise ConfigError(f"model.{name} (of {source}) must be divisible by train.tensor_parallel "
                                  f"({self.tp_size}): each rank holds 1/{self.tp_size} of them; got {value}")
        if config.dropout:
            raise ConfigError(f"model.dropout (of {source}) must be 0 with train.tensor_parallel {self.tp_size} (each "
                              f"rank would draw its own dropout mask on the replicated residual stream): set "
                              f"model.dropout=0; got {config.dropout}")

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.tp_mesh is not None:  # first: checkpointing and the optimizer then see the split layers
            from retnet.model.tensor_parallel import parallelize_retnet, vocab_split_problem

            problem = self.cfg.train.vocab_parallel and vocab_split_problem(model.config.vocab_size, self.tp_size)
            if problem:
                raise ConfigError(f"train.vocab_parallel: {problem} of model.vocab_size={model.config.vocab_size}; "
                                  f"or set train.vocab_parallel=false")
            try:
                parallelize_retnet(model, self.tp_mesh["tp"], vocab_parallel=self.cfg.train.vocab_parallel,
                                   sequence_parallel=self.cfg.train.sequence_parallel)
            except ValueError as error:  # what the checks before could not see
                raise ConfigError(f"train.tensor_parallel {self.tp_size}: {error}") from None
        if self.cfg.train.activation_checkpointing:
            # transformers 5.2x renamed it activation_checkpointing_enable; 5.17 (still in use) has only the old name
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.train.compile:
            # Under sequence parallelism a dynamic-shape recompile (a second row length: DPO, reward models, GRPO)
            # fails in AOTAutograd's backward of the time-split output's redistribute (RecursionError, torch 2.13):
            # each length compiled for itself (up to dynamo's recompile limit, then eager).
            dynamic = False if self.tp_mesh is not None and self.cfg.train.sequence_parallel else None
            for layer in model.model.layers:
                layer.compile(dynamic=dynamic)
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if (
                self.cfg.train.mixed_precision == "bf16" and self.device.type == "cuda") else MixedPrecisionPolicy()
            # Sharded over the data-parallel ranks: every rank, or under tensor parallelism those holding the same
            # slices (mesh["dp"]), each split weight's slice sharded again (a 2-D DTensor on the (dp, tp) mesh)
            dp_mesh = None if self.tp_mesh is None else self.tp_mesh["dp"]
            for layer in model.model.layers:
                fully_shard(layer, mesh=dp_mesh, mp_policy=policy)
            fully_shard(model, mesh=dp_mesh, mp_policy=policy)
            return model
        if is_distributed() and self.tp_mesh is None:  # (DDP does not take DTensor parameters)
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def _resolve_resume(self) -> Path | None:
        """Rank 0 picks the checkpoint (or the error) and every rank gets the same answer."""
        answer: list[Any] = [None]
        if self.is_main:
            try:
                self._make_output_dir()
                lock_output_dir(self.output_dir)  # before anything here is removed or picked: see its doc
                # Before the pick: it puts back a checkpoint that an interrupted save of the same step moved aside,
                # which the pick (resume=auto, or that step's path) is to find
                stale = remove_stale_temp(self.ckpt_root)
                if stale:
                    logger.info("removed stale temporary checkpoint directories of an interrupted save: %s",
                                ", ".join(p.name for p in stale))
                picked = self._pick_checkpoint()
                answer[0] = ("ok", picked, picked and verified_identity(Path(picked)))
            except (CheckpointError, ConfigError) as error:
                answer[0] = (type(error).__name__, str(error), None)
        if is_distributed():
            barrier()  # while rank 0 hashes the checkpoints it verifies (tens of GB for a large model)
            dist.broadcast_object_list(answer, src=0)
        kind, value, identity = answer[0]
        if kind == "CheckpointError":
            raise CheckpointError(value)
        if kind == "ConfigError":
            raise ConfigError(value)
        if value is not None and not self.is_main:
            note_verified(Path(value), identity)
        return None if value is None else Path(value)

    def _make_output_dir(self) -> None:
        """Create ``train.output_dir`` (a ConfigError naming it, not a traceback, when it cannot be)."""
        make_output_dir(self.output_dir)

    def _pick_checkpoint(self) -> str | None:
        if self.cfg.train.resume == "auto":
            found = find_resume_checkpoint(self.ckpt_root)
            return None if found is None else str(found)
        named = named_checkpoint(self.cfg.train.resume, self.ckpt_root)
        if named is None:
            return None
        from retnet.train.checkpoint import verify_checkpoint

        verify_checkpoint(named)
        return str(named)

    def _open_loggers(self) -> None:
        # A resumed run drops the records after its checkpoint (they will be redone), and that of the evaluation
        # the checkpoint left pending (an earlier resume may have written it before dying); a run that starts
        # drops them all (those of an earlier run here that died before its first checkpoint), step 0 included.
        keep: list[str] = []
        if self.metrics_path.exists():
            redone = (self.step, "val") if self.pending_eval else None
            keep = [line for line in self.metrics_path.read_text().splitlines()
                    if self.resumed and line.strip() and (key := _record_key(line))[0] <= self.step
                    and key != redone]
            tmp = self.metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.metrics_path)
            if any(_record_key(line) == (self.step, "val") for line in keep):
                self.evaluated_step = self.step
            if any(_record_key(line) == (self.step, "train") for line in keep):
                self.logged_step = self.step
        self._metrics = open(self.metrics_path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if self.cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed; logging.tensorboard ignored")
            else:
                # TensorBoard purges whole steps, every tag. The evaluation a stop left pending is redone at the
                # checkpoint's step, where an earlier resume that died may have logged it already: that step is
                # purged too, and its records kept in metrics.jsonl (its training record) are written again.
                purge = (self.step if self.pending_eval else self.step + 1) if self.resumed else 0
                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=purge)
                for line in keep:
                    if _record_key(line)[0] >= purge:
                        self._write_scalars(json.loads(line))
        if self._wandb is not None:  # a new W&B run gets the records up to here; a resumed one those it lacks
            for line in keep:
                self._wandb.log(json.loads(line))
        (self.output_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            if self._completed:  # train() returned, saved: no step left to stop, and the closing is not cut short
                if signum == signal.SIGINT and self._closing_interrupts:
                    raise KeyboardInterrupt  # a second Ctrl-C: the closing hangs (a W&B upload), leave it
                self._closing_interrupts += signum == signal.SIGINT
                logger.warning("received %s: the run has %s and saved; closing (Ctrl-C again to leave it)",
                               signal.Signals(signum).name, "stopped" if self.signal_received else "finished")
                return
            if self.signal_received and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal_received = True
            logger.warning("received %s: saving a checkpoint after this step, then exiting",
                           signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (embedded): signals stay as they are
                self._previous_handlers[sig] = signal.signal(sig, request_stop)

    # -- state -------------------------------------------------------------------------------------------
    def _full_state(self) -> tuple[dict, dict]:
        """(model, optimizer) full state dicts on CPU (rank 0's; the others get empty ones); a collective under FSDP
        and tensor parallelism (every rank calls it). Under those the optimizer's is keyed by parameter name, which
        a process without them loads as one keyed by index (the groups' order is the same)."""
        if self.split_parameters:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (self._checkpointed(get_model_state_dict(self.model, options=options)),
                    get_optimizer_state_dict(self.model, self.optimizer, options=options))
        if not self.is_main:
            return {}, {}
        state = self._checkpointed(self.raw_model.state_dict())
        model = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        return model, self.optimizer.state_dict()

    def _set_full_state(self, model_state: dict, optim_state: dict) -> None:
        if self.fsdp and self.tp_mesh is not None:
            # FSDP2 over tensor parallelism: torch's full-state load below refuses FSDP2's uneven shards of a split
            # weight, so each rank cuts its own (copy_full_state) and loads them as a sharded checkpoint's
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_state_dict,
                set_state_dict,
            )

            model_local, optim_local = get_state_dict(self.model, self.optimizer)
            # adapters only: the frozen weights stay those loaded from init_from (_check_fits checked the keys)
            set_state_dict(self.model, self.optimizer, model_state_dict=copy_full_state(model_state, model_local),
                           optim_state_dict=copy_full_state(self._named_optim_state(optim_state), optim_local),
                           options=StateDictOptions(strict=not self.adapters_only))
        elif self.split_parameters:  # each rank keeps its shard or slice of the full tensors
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            # adapters only: the frozen weights stay those loaded from init_from (_check_fits checked the keys)
            options = StateDictOptions(full_state_dict=True, strict=not self.adapters_only)
            set_model_state_dict(self.model, model_state, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, self._named_optim_state(optim_state),
                                     options=options)
        else:
            self.raw_model.load_state_dict(model_state, strict=not self.adapters_only)
            self.optimizer.load_state_dict(optim_state)
        # On the CPU the optimizer takes the loaded tensors as they are: views of the memory-mapped checkpoint,
        # which would then stay mapped (its disk space held after pruning deletes it; on NFS a .nfs file that
        # makes the pruning fail). Adam rewrites all of them at the first step anyway: copied now.
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.device.type == "cpu":
                    state[key] = value.clone()

    def _named_optim_state(self, optim_state: dict) -> dict:
        """``optim_state`` keyed by parameter name, as torch's ``set_optimizer_state_dict`` reads it: a checkpoint
        written without FSDP (one process, DDP) holds ``optimizer.state_dict()``, keyed by index in the order of
        build_optimizer's groups, which this optimizer's follow (_check_fits checked the model is the same)."""
        groups = optim_state.get("param_groups", [])
        indexed = self._saved_indices_and_names(groups)
        if indexed is None:
            return optim_state  # written under FSDP: already by name
        saved, mine = indexed
        if len(saved) != len(mine):
            raise CheckpointError(f"the checkpoint's optimizer holds {len(saved)} parameters, this model's "
                                  f"{len(mine)}: resume with the settings it was saved with")
        name_of = dict(zip(saved, mine, strict=True))
        return {"state": {name_of[index]: value for index, value in optim_state["state"].items()},
                "param_groups": [{**group, "params": [name_of[index] for index in group["params"]]}
                                 for group in groups]}

    def _saved_indices_and_names(self, groups: list[dict]) -> tuple[list[int], list[str]] | None:
        """For a saved optimizer's ``param_groups`` keyed by index (written without FSDP, in the order of
        build_optimizer's groups, which this optimizer's follow): its indices and this optimizer's parameter
        names, each in that order (not checked to be as many). None when keyed by name (written under FSDP)."""
        if not any(isinstance(index, int) for group in groups for index in group["params"]):
            return None
        by_id = {id(param): name for name, param in self.raw_model.named_parameters()}
        return ([index for group in groups for index in group["params"]],
                [by_id[id(param)] for group in self.optimizer.param_groups for param in group["params"]])

    def _former_scalars_as_one_element(self, model_state: dict, optim_state: dict, former: set[str]) -> None:
        """Reshape to ``[1]`` the activation parameters that a checkpoint written before they became one-element
        tensors holds 0-dim (``_former_scalar``), and their optimizer state with them: AdamW's moments of a 0-dim
        parameter are 0-dim, and the first step, updating them in place by a ``[1]`` gradient, failed. (SAU's and
        gSmeLU's ``_load_from_state_dict`` reshape the parameters for a plain ``load_state_dict``, but neither the
        optimizer's load nor torch's full-state load of split parameters goes through it.) ``former``: their keys,
        as ``_check_fits`` found them."""
        if not former:
            return
        for key in former:
            model_state[key] = model_state[key].reshape(1)
        indexed = self._saved_indices_and_names(optim_state.get("param_groups", []))
        # (a count that differs is refused when the state loads)
        names = {} if indexed is None else dict(zip(*indexed, strict=False))
        for key, entry in optim_state.get("state", {}).items():
            if names.get(key, key) in former:
                for name, value in entry.items():
                    if name != "step" and torch.is_tensor(value) and value.dim() == 0:
                        entry[name] = value.reshape(1)

    @property
    def sharded_checkpoints(self) -> bool:
        layout = self.cfg.checkpoint.layout
        return layout == "sharded" or (layout == "auto" and self.fsdp)

    def _shared_temp_dir(self) -> Path:
        """The temporary directory of this step's checkpoint, made by rank 0 and named to every rank."""
        answer = [str(new_temp_dir(self.ckpt_root, self.step)) if self.is_main else None]
        if is_distributed():
            dist.broadcast_object_list(answer, src=0)
        return Path(answer[0])

    def save(self) -> None:
        """Checkpoint the current step (every rank calls it; rank 0 writes, or under the sharded layout every
        rank writes its shard and rank 0 commits)."""
        if self.step == self.last_saved_step:
            return
        try:
            self._write_checkpoint()
        except BaseException as error:
            # A full disk or a permission raises a bare "[Errno 28] No space left on device" that names no path
            # (under the sharded layout inside torch's CheckpointException, with a traceback per rank), after the
            # half-written copy was removed: say where, and which checkpoint a resume would take.
            cause = _os_error(error)
            if cause is None:
                raise
            last = self.last_checkpoint
            raise CheckpointError(
                f"could not write the checkpoint of step {self.step} in {str(self.ckpt_root)!r}: {cause}. The last "
                f"good checkpoint is {str(last) if last else 'none (no checkpoint yet)'}; free disk space there (or "
                f"fix its permissions) and rerun the command (train.resume=auto resumes from it)") from error
        barrier()
        self.last_saved_step = self.step
        self.last_checkpoint = self.ckpt_root / step_dir_name(self.step)

    def _write_checkpoint(self) -> None:
        mine = {"rng": rng_state(), "data": self.data.state_dict()}
        if self.sharded_checkpoints:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            tmp = self._shared_temp_dir()
            try:
                model_state, optim_state = get_state_dict(self.model, self.optimizer)
                model_state = self._checkpointed(model_state)
                mine["files"] = save_sharded_state(tmp, model_state, optim_state, rank=self.rank,
                                                   distributed=is_distributed())
            except BaseException:
                # as save_checkpoint's: a full disk must not stay full of the shards written (a failed write is
                # every rank's: torch's distributed save raises on all of them)
                if self.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            model_state = optim_state = None
        else:
            model_state, optim_state = self._full_state()
        ranks = [None] * self.world_size
        if is_distributed():
            # Only rank 0 writes: gathered there alone (a GRPO generation's share is megabytes a rank, which an
            # all-gather would copy onto every rank at every checkpoint).
            dist.gather_object(mine, ranks if self.is_main else None, dst=0)
        else:
            ranks = [mine]
        if self.is_main:
            hashed = {name: entry for saved in ranks for name, entry in saved.pop("files", {}).items()}
            trainer = {
                "step": self.step, "world_size": self.world_size, "context_parallel": self.cp_size,
                "tensor_parallel": self.tp_size, "ranks": ranks,
                "config": self.cfg.to_dict(),
                "log_window": {"losses": list(self.window_losses), "seconds": self.window_seconds,
                               "tokens": self.window_tokens, "flops": self.window_flops, "last": dict(self._last),
                               **({"distill": self.teacher.state_dict()} if self.teacher is not None else {})},
                "tokens": self.tokens,
                "pending_eval": self.pending_eval, "hub_fingerprint": self.data.hub_fingerprint,
                "tokenizer_vocab_sha256": self._tokenizer_fingerprint(),
                "document_prefix": self.document_prefix,
                "model_config": self.model_config.to_dict(),  # a fine-tune's: its model.init_from's config.json
            }
            if self.cfg.lora.enabled:  # what peft wrapped: lora.target_modules [] resolved against the model
                trainer["lora_targets"] = list(self.lora_targets)
            if self.adapters_only:  # what a resume must load from init_from again under these adapters
                trainer["lora_base"] = {"path": str(self._init_from_dir().resolve()),
                                        "sha256": self._base_fingerprint()}
            if self.teacher is not None:  # not saved: a resume loads it again, and must find the same weights
                trainer["distill_teacher"] = {"path": str(self._teacher_dir().resolve()),
                                              "sha256": self._teacher_fingerprint()}
            keep_last = self.cfg.checkpoint.keep_last
            if self.sharded_checkpoints:
                path = commit_checkpoint(self.ckpt_root, self.step, tmp, trainer=trainer, keep_last=keep_last,
                                         layout="sharded", hashed=hashed)
            else:
                path = save_checkpoint(self.ckpt_root, self.step, model=model_state, optimizer=optim_state,
                                       trainer=trainer, keep_last=keep_last)
            logger.info("saved checkpoint %s", path)

    def _tokenizer_fingerprint(self) -> str:
        """:func:`_vocab_fingerprint` of the run's tokenizer, computed once: a resume compares the tokenizer it would
        use with it."""
        if getattr(self, "_tokenizer_sha", None) is None:
            self._tokenizer_sha = _vocab_fingerprint(self.tokenizer)
        return self._tokenizer_sha

    def _check_resume_data(self, path: Path, *, tokenizer_reused: bool) -> str | dict[str, str | None] | None:
        """ConfigError unless this run continues the checkpoint's: ``train.steps`` not below its step, the same
        model, LoRA and optimizer settings (:func:`~retnet.train.config.model_changes` and its siblings), the same
        data mode (packed or streamed), a world size its stream positions hold for, and the same data-defining
        settings (:func:`~retnet.train.config.data_changes`). Every rank reads the checkpoint, so each refuses
        alike. Returns the fingerprint of the hub data it was trained on (None for local data; for a
        ``data.mixture``, one per source label), which build_data holds the hub set to."""
        # rank 0 verified it in _resolve_resume; _load verifies it again before the state is used
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        if int(trainer["step"]) > self.cfg.train.steps:
            # Nothing would train, and the export would be of a later step than asked for: most likely a
            # train.steps meant to extend the run, or the wrong train.output_dir.
            raise ConfigError(
                f"train.steps is {self.cfg.train.steps} but checkpoint {str(path)!r} is at step "
                f"{trainer['step']}, past it: raise train.steps to at least {trainer['step']} to resume it (equal: "
                f"only export it again), resume an earlier checkpoint with train.resume=PATH, or start a new run "
                f"in another train.output_dir")
        ranks = trainer["ranks"]
        saved = str(ranks[0]["data"].get("kind") == "streaming").lower()
        current = str(self.cfg.data.streaming).lower()
        if saved != current:
            # A packed position counts shuffled blocks of the token cache, a streamed one blocks read in file
            # order: neither means anything in the other mode, so there is no data position to resume from.
            raise ConfigError(
                f"checkpoint {str(path)!r} was written with data.streaming={saved} and this run has "
                f"data.streaming={current}: its data position cannot resume the other mode; resume it with "
                f"data.streaming={saved}, or start in another train.output_dir")
        saved_cp, saved_tp = _saved_context_parallel(trainer), _saved_tensor_parallel(trainer)
        saved_group = saved_cp * saved_tp
        if len(ranks) // saved_group != self.dp_size and saved == "true":
            # Each data-parallel rank's position counts blocks of the part split_dataset_by_node gave it; under
            # another split those counts skip or repeat data, and there is no exact mapping between splits.
            if saved_group == self.cfg.train.group_size == 1:
                raise ConfigError(
                    f"checkpoint {str(path)!r} was written by {len(ranks)} ranks on streamed data "
                    f"(data.streaming=true) and this run has world size {self.world_size}: each rank's stream "
                    f"position holds only for the split it was read with; resume it with {len(ranks)} ranks")
            def splits(cp: int, tp: int) -> str:
                named = [f"train.{name}" for name, size in (("context_parallel", cp), ("tensor_parallel", tp))
                         if size > 1]
                return " × ".join(named) or "train.context_parallel"

            was = splits(saved_cp, saved_tp)
            now = splits(self.cp_size, self.tp_size) if self.cfg.train.group_size > 1 else was
            raise ConfigError(
                f"checkpoint {str(path)!r} was written by {len(ranks) // saved_group} data-parallel ranks "
                f"({len(ranks)} ranks / {was} {saved_group}) on streamed data (data.streaming=true) and this run "
                f"has {self.dp_size} ({self.world_size} / {self.cfg.train.group_size}): each data-parallel rank's "
                f"stream position holds only for the split it was read with; resume it with world size / "
                f"{now} = {len(ranks) // saved_group}")
        # Here, before the data is built, like the data checks: reading and tokenizing can take hours.
        # Settings a checkpoint's state only means something under: (what differs, why, what to do).
        elsewhere = "or start in another train.output_dir"
        for changed, what, advice in (
            (model_changes, "other model settings",
             f"With them its weights would compute another model: resume with those settings, {elsewhere}"),
            (functools.partial(lora_changes, default_targets=self._default_lora_targets,
                               saved_targets=trainer.get("lora_targets")),
             "other LoRA settings", f"Resume with those settings, {elsewhere}"),
            (dpo_changes, "another DPO objective", f"Resume with those settings, {elsewhere}"),
            (kto_changes, "another KTO objective", f"Resume with those settings, {elsewhere}"),
            (reward_changes, "other reward-model settings", f"Resume with those settings, {elsewhere}"),
            (grpo_changes, "other GRPO settings", f"Resume with those settings, {elsewhere}"),
            (distill_changes, "another distillation objective", f"Resume with those settings, {elsewhere}"),
            (optim_changes, "another optimizer",
             f"Its optimizer state is that optimizer's: resume with it, {elsewhere} (a fine-tune from its export, "
             f"model.init_from, starts a new optimizer)"),
        ):
            changes = changed(trainer.get("config", {}), self.cfg)
            if changes:
                raise ConfigError(f"checkpoint {str(path)!r} was trained with {what}: {'; '.join(changes)}. {advice}")
        saved_model = trainer.get("model_config")  # (absent from older checkpoints)
        base = trainer.get("lora_base")
        if base is not None and not self.adapters_only:  # lora.rank 0 is lora_changes'
            raise ConfigError(
                f"checkpoint {str(path)!r} holds only the LoRA adapters, trained on {base['path']!r}, and "
                f"model.init_from is not set: a resume loads those pretrained weights again; resume with "
                f"--model.init_from={base['path']}, or start in another train.output_dir")
        if base is not None and base["sha256"] != self._base_fingerprint():
            # The checkpoint holds only adapters: their base is read from init_from again, and must be the same.
            raise ConfigError(
                f"model.init_from {self.cfg.model.init_from!r}: its weights are not those checkpoint "
                f"{str(path)!r} trained its LoRA adapters on (it holds only the adapters; their base was "
                f"{base['path']!r}, sha256 {base['sha256'][:16]}…, now {self._base_fingerprint()[:16]}…): restore "
                f"that model, or start in another train.output_dir")
        trained_from = trainer.get("config", {}).get("model", {}).get("init_from")
        if saved_model is not None and (self.cfg.model.init_from is not None or trained_from is not None):
            # model_changes compares the [model] settings; a fine-tune's architecture is the config.json of
            # model.init_from, which may name another model now, or have been rewritten, or be left out (the
            # preset's then), with weights of the same shapes: the checkpoint's weights would load, and compute
            # another model
            changes = architecture_changes(saved_model, self._planned_model_config())
            if changes:
                now = (f"model.init_from {self.cfg.model.init_from!r} has now (its config.json)"
                       if self.cfg.model.init_from is not None else
                       f"model.preset {self.cfg.model.preset!r} gives without model.init_from")
                raise ConfigError(
                    f"checkpoint {str(path)!r} was trained on another architecture than {now}: "
                    f"{'; '.join(changes)}. With it its weights would compute another model: resume with the "
                    f"model.init_from it was trained from ({trained_from!r}), {elsewhere}")
        taught = trainer.get("distill_teacher")
        if taught is not None and self.cfg.distill.enabled and taught["sha256"] != self._teacher_fingerprint():
            raise ConfigError(
                f"distill.teacher {self.cfg.distill.teacher!r}: its weights are not those of the teacher checkpoint "
                f"{str(path)!r} was distilled from ({taught['path']!r}, sha256 {taught['sha256'][:16]}…, now "
                f"{self._teacher_fingerprint()[:16]}…): resume with that teacher, {elsewhere}")
        changes = data_changes(trainer.get("config", {}), self.cfg, tokenizer_reused=tokenizer_reused)
        if changes:
            raise ConfigError(
                f"checkpoint {str(path)!r} was trained on other data: {'; '.join(changes)}. Its data position "
                f"counts blocks of the token stream those settings made, so resuming would not continue that run. "
                f"Restore the checkpoint's settings to resume it, or start a new run in another train.output_dir")
        if len(ranks) != self.world_size or saved_cp != self.cp_size or saved_tp != self.tp_size:
            # Each rank's RNG draws the dropout masks of its own piece's tokens: under another split, other masks
            def split(cp: int, tp: int) -> str:
                notes = [f"train.context_parallel {cp}" if saved_cp != self.cp_size else "",
                         f"train.tensor_parallel {tp}" if saved_tp != self.tp_size else ""]
                return f" ({', '.join(note for note in notes if note)})" if any(notes) else ""

            logger.warning("checkpoint was written by %d ranks%s, resuming with %d%s: data order is kept, RNG "
                           "streams are not (no exact replay)", len(ranks), split(saved_cp, saved_tp),
                           self.world_size, split(self.cp_size, self.tp_size))
        self._saved_tokenizer_sha = trainer.get("tokenizer_vocab_sha256")  # (_check_resume_tokenizer)
        # (_check_resume_prefix; checkpoints written before 2026-12-06 encoded documents without one)
        self._saved_document_prefix = trainer.get("document_prefix", [])
        return trainer.get("hub_fingerprint")  # absent from checkpoints written before it was saved

    def _check_resume_prefix(self, path: Path, prefix: list[int]) -> None:
        """Refuse a checkpoint trained on text documents opened otherwise than with ``prefix`` (data.document_prefix
        of the resume's tokenizer: a BOS tokenizer's run from before documents opened with its BOS): its data
        position counts blocks of the stream those documents made (a hub set's cache would be rebuilt under a new
        key, and the resume go on elsewhere). Before the data is read, as the other resume checks."""
        saved = getattr(self, "_saved_document_prefix", [])
        if saved != prefix:
            raise ConfigError(
                f"checkpoint {str(path)!r} was trained on documents opened with {saved or 'no BOS'}, and this "
                f"version opens them with {prefix or 'none'} (the ids the tokenizer puts before a "
                f"text, as its prompts start; since 2026-12-06): its data position counts the blocks those documents "
                f"made, so the resume would not continue that run. Start a new run in another train.output_dir")

    def _check_resume_tokenizer(self, path: Path, directory: Path | None, reused: bool) -> None:
        """ConfigError naming the tokenizer a resume would tokenize with when it cannot be read, or is not the one
        the checkpoint trained with (``trainer.pt``'s ``tokenizer_vocab_sha256``; older checkpoints hold none).
        Otherwise its blocks differ from those the checkpoint recorded, and the resume is refused blaming
        ``data.dataset``'s files, after they are read and tokenized again."""
        from retnet.train.data import load_tokenizer

        source = directory or self.cfg.data.tokenizer
        if not source:  # a BPE trained on the data, from its cache: the settings that make it are data_changes'
            return
        if reused:
            where = f"the tokenizer this run saved in {str(source)!r} for its resumes"
            advice = ("restore that directory, or remove it to resume with the configured tokenizer (model.init_from's "
                      "or distill.teacher's, data.tokenizer, or the BPE data.cache_dir holds), which must be the one "
                      "the checkpoint trained with")
        else:
            key = ("model.init_from" if self.cfg.model.init_from else "distill.teacher") if directory is not None \
                else "data.tokenizer"
            where = f"the tokenizer of {key} {str(source)!r}"
            advice = "restore it, or start a new run in another train.output_dir"
        try:
            tokenizer = load_tokenizer(source)
        except ConfigError as error:
            if not reused:
                raise
            raise ConfigError(f"resuming from {str(path)!r}: {where} cannot be read ({error}); {advice}") from None
        saved = getattr(self, "_saved_tokenizer_sha", None)
        if saved is not None and _vocab_fingerprint(tokenizer) != saved:
            raise ConfigError(
                f"resuming from {str(path)!r}: {where} is not the tokenizer the checkpoint trained with (other "
                f"tokens, or another EOS): its token ids would mean other tokens to the model; {advice}")
        self._check_resume_prefix(path, document_prefix(tokenizer) if self.cfg.data.format == "text" else [])

    def _load(self, path: Path) -> None:
        saved_shapes = saved_model_shapes(path)
        former = self._check_fits(path, saved_shapes)
        if checkpoint_layout(path) == "full":
            state = load_checkpoint(path)
            self._former_scalars_as_one_element(state["model"], state["optimizer"], former)
            self._set_full_state(state["model"], state["optimizer"])
            trainer = state["trainer"]
        else:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_state_dict,
                set_state_dict,
            )

            trainer = load_checkpoint_trainer(path)
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            model_state = self._checkpointed(model_state)
            slots = _former_scalar_slots(saved_shapes, model_state, optim_state)
            load_sharded_state(path, model_state, optim_state, distributed=is_distributed())
            for entries, key, template in slots:
                entries[key] = _like(entries[key].reshape(1), template)
            set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                           options=StateDictOptions(strict=not self.adapters_only))
            # torch's set_state_dict matches the saved groups by their parameters, and maps a group of none (Muon's
            # AdamW group of decayed weights when Muon steps every one) to the wrong saved group: it keeps the
            # rate it was built with, which the next checkpoint would save
            saved_groups = optim_state.get("param_groups", [])
            for group, saved in zip(self.optimizer.param_groups, saved_groups, strict=False):
                if not group["params"] and len(saved_groups) == len(self.optimizer.param_groups):
                    group.update({key: value for key, value in saved.items() if key != "params"})
        self._apply_optim_settings()
        ranks = trainer["ranks"]
        self.step = int(trainer["step"])
        # Saved already only where this run keeps its checkpoints: one resumed from another run's (train.resume=PATH
        # into a new output_dir) saves its final step there too, or a relaunch of it would find none and start afresh
        self.last_saved_step = self.step if path.resolve().parent == self.ckpt_root.resolve() else -1
        window = trainer.get("log_window", {})  # absent from checkpoints written before it was saved
        self.window_losses, self.window_seconds = list(window.get("losses", [])), float(window.get("seconds", 0.0))
        self._last = dict(window.get("last", {}))
        if self.teacher is not None:
            self.teacher.load_state_dict(window.get("distill", {}))
        tokens_per_step = self.cfg.train.global_batch_size * self.data.seq_len  # older checkpoints: as counted then
        self.tokens = int(trainer.get("tokens", self.step * tokens_per_step))
        self.window_tokens = int(window.get("tokens", len(self.window_losses) * tokens_per_step))
        self.window_flops = float(window.get("flops", self.window_tokens * self.flops_per_token))
        self.pending_eval = bool(trainer.get("pending_eval", False))
        # The data position of this data-parallel rank, held alike by every rank of its group then: the group's
        # first (streamed data resumes only on the same data-parallel size, _check_resume_data)
        group = _saved_context_parallel(trainer) * _saved_tensor_parallel(trainer)
        self.data.load_state_dict(ranks[(self.dp_rank % (len(ranks) // group)) * group]["data"])
        set_rng_state(ranks[self.rank % len(ranks)]["rng"])

    def _apply_optim_settings(self) -> None:
        """The configured AdamW (and Muon) settings over those the loaded param groups hold (the checkpoint's):
        ``optim.*`` may change on resume, ``optim.name`` excepted. The learning rate is set every step
        (``set_lr``)."""
        cfg = self.cfg.optim
        adamw_groups = self.optimizer.param_groups
        if isinstance(self.optimizer, MuonWithAdamW):
            for group in self.optimizer.muon_groups:
                group.update(weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps,
                             adjust_lr_fn=cfg.muon_adjust_lr)
            adamw_groups = self.optimizer.adamw_groups
        # The kernel too: load_state_dict took the checkpoint's, chosen for its own split (fused under FSDP2 over
        # tensor parallelism on CUDA), which a resume under another (TP alone: DTensors mixed with plain tensors,
        # which the fused kernel refuses) cannot run
        kernel = {"fused": None, "foreach": None, **adamw_kernel(self.model, self.device)}
        # build_optimizer's AdamW groups: the decayed parameters, then the others
        for group, decay in zip(adamw_groups, (cfg.weight_decay, 0.0), strict=True):
            group.update(weight_decay=decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kernel)
            if kernel.get("fused") or group.get("capturable"):
                # load_state_dict leaves the step counts on the CPU unless the saved groups were fused (a CPU run's,
                # or tensor parallelism's without FSDP): the fused kernel wants them on the parameter's device
                for param in group["params"]:
                    state = self.optimizer.state.get(param, {})
                    step = state.get("step")
                    if isinstance(step, torch.Tensor) and step.device != param.device:
                        state["step"] = step.to(device=param.device, dtype=torch.float32)

    def _check_fits(self, path: Path, got: dict[str, list[int]]) -> set[str]:
        """CheckpointError naming the tensors when the saved model (``got``: its tensors' shapes) is not the
        configured one (loading would stop with a bare traceback). Under resume=auto too: the checkpoint is
        valid, the config changed. Returns the keys it holds 0-dim that now are ``[1]`` (``_former_scalar``)."""
        # DTensor: global shape. Adapters only: the checkpoint holds those, the rest comes from init_from.
        expected = {k: list(v.shape) for k, v in self._checkpointed(self.raw_model.state_dict()).items()}
        former = {k for k, shape in expected.items() if k in got and _former_scalar(k, got[k], shape)}
        problems = [f"{k}: checkpoint {got[k]}, model {shape}" for k, shape in expected.items()
                    if k in got and got[k] != shape and k not in former]
        missing, unexpected = [k for k in expected if k not in got], [k for k in got if k not in expected]
        if missing:
            problems.append(f"missing from the checkpoint: {', '.join(missing[:3])}"
                            + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        if unexpected:
            problems.append(f"not in the model: {', '.join(unexpected[:3])}"
                            + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
        if problems:
            shown = problems[:4] + ([f"… {len(problems) - 4} more"] if len(problems) > 4 else [])
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit the configured model: {'; '.join(shown)}. The model "
                f"settings differ from those it was saved with (its trainer.pt holds its config): resume with "
                f"those, or start in another train.output_dir")
        return former

    # -- loop --------------------------------------------------------------------------------------------
    def _set_grad_sync(self, sync: bool) -> None:
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
        elif is_distributed() and self.tp_mesh is None:
            self.model.require_backward_grad_sync = sync  # DDP: skip the all-reduce until the last micro-batch

    def _loss(self, blocks: torch.Tensor, flags: torch.Tensor | None = None,
              num_items: int | None = None) -> torch.Tensor:
        """Mean next-token loss of ``[B, T]`` blocks, documents isolated when ``data.document_boundaries``.
        Chat data: only the tokens ``flags`` marks as targets count, and with ``num_items`` the loss is their
        summed loss divided by it (not by this batch's count).

        Under context parallelism this rank's share of it: its piece's summed loss over the same denominator
        (the whole row's targets without ``num_items``), so the group's shares add up to the loss above; a
        distillation's KD and CE parts likewise."""
        if self.cfg.data.document_boundaries:
            inputs = packed_segments(blocks, self.segment_start_id, flags, self.tokenizer.eos_token_id)
        else:
            inputs = {"input_ids": blocks, "labels": blocks if flags is None else masked_labels(blocks, flags)}
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        if self.cp_size > 1:
            from retnet.model.context_parallel import shard_sequences

            inputs, shard, targets = shard_sequences(inputs["input_ids"], inputs["labels"], rank=self.cp_rank,
                                                     size=self.cp_size, cu_seqlens=inputs.get("cu_seqlens"),
                                                     group=self.cp_group)
            extra = {"context_parallel": shard, "num_items_in_batch": targets if num_items is None else num_items}
        if self.teacher is not None and self.model.training:  # evaluation: the plain loss, comparable across runs
            # Under context parallelism the teacher runs the same piece, its states crossing the cuts over the group
            distill = self.teacher.target(inputs, extra.get("context_parallel"))
            loss = self.model(**inputs, use_cache=False, distill=distill, return_dict=True, **extra).loss
            self.teacher.collect(distill)
            return loss
        # By name whatever the config's return_dict (a model.init_from config may say False), as transformers' own
        # callers ask for it
        return self.model(**inputs, use_cache=False, return_dict=True, **extra).loss

    def train_step(self) -> float:
        """One optimizer step; returns the global-batch mean loss. Raises NonFiniteLossError before the
        update if it or the gradient norm is NaN/inf (nothing is saved, so the last checkpoint stays good)."""
        lr = get_lr(self.step, self.cfg.optim, self.cfg.train.steps)
        set_lr(self.optimizer, lr, self.cfg.optim)
        loss_sum = torch.zeros((), device=self.device)
        batches = self._micro_batches()
        masked, preference = self.data.masked, getattr(self.data, "preference", False)
        # Chat data: blocks hold different numbers of targets, so each micro-batch's summed loss is divided by
        # the global batch's count (every rank's; 1 when none: a zero loss, zero gradients), and
        # the micro-batches' and ranks' losses add up to the global mean. DDP and FSDP average the gradients over
        # the ranks: scaled up by the world size, the average is that sum's. Under context parallelism too: the
        # pieces of a group's blocks hold each of their targets once. Under tensor parallelism the average is over
        # the W / T ranks holding the same slices (gradient_ranks), each of whose ranks holds slices of its group's
        # gradient. Text: each rank's loss is its micro-batches' mean, so the average over the ranks is the global
        # mean; a context-parallel rank's is only its piece's share of that mean (the C shares add up to it), so its
        # gradient is scaled up by C to make the average over the W ranks that over the W / C groups.
        # _average_gradients (tensor parallelism without FSDP2) sums over mesh["dp"] and divides by the data-parallel
        # groups alone: there the pieces' shares are summed as they are, and the scale is that divisor's.
        divisor = self.dp_size if self._averages_gradients else self.gradient_ranks
        targets = max(self._step_targets(), 1) if masked else None
        for index, batch in enumerate(batches):
            self._set_grad_sync(index == self.accum - 1)
            if masked:
                tokens, flags = (t.to(self.device, non_blocking=True) for t in batch)
                with self.autocast:
                    loss = self._loss(tokens, flags, num_items=targets)
                (loss * divisor).backward()
            else:
                batch = batch.to(self.device, non_blocking=True)
                with self.autocast:  # DPO: each micro-batch holds micro_batch pairs, as text one of equal blocks
                    loss = (self.data.loss(self.model, batch) if preference else self._loss(batch)) / self.accum
                (loss * (divisor // self.dp_size)).backward()
            loss_sum += loss.detach()
        if self._averages_gradients and self.gradient_ranks > 1:
            self._average_gradients()
        # One small all-reduce carries the loss and any rank's stop request.
        stats = torch.stack([loss_sum.float(), torch.tensor(float(self.signal_received), device=self.device)])
        if preference:  # the DPO metrics' sums in the same all-reduce
            stats = torch.cat([stats, self.data.step_stats()])
        elif self.teacher is not None:  # the KD and CE parts, divided as the loss is
            stats = torch.cat([stats, self.teacher.step_stats(1 if masked else self.accum)])
        if not self.counts_loss:  # every rank of a tensor-parallel group holds them: the first one's count
            stats[0] = 0
            stats[2:] = 0
        elif preference and self.cp_rank:  # every piece holds its pairs' whole metrics (its loss is its share)
            stats[2:] = 0
        if is_distributed():
            dist.all_reduce(stats)
        # text: the mean of the groups' means (equal token counts; a group's pieces sum to its mean); chat: the
        # ranks' parts of the global mean
        loss_value = stats[0].item() / (1 if masked else self.dp_size)
        self.stop_requested = stats[1].item() > 0
        if not math.isfinite(loss_value):
            self._stop_nonfinite(f"loss is {loss_value}")
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        if self.tp_mesh is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        else:  # torch's refuses to mix the split weights' (DTensor) gradients with the replicated ones' (or, under
            # FSDP2, DTensors on the (dp, tp) mesh with those on the dp mesh); this one's norm is over both dims
            from retnet.model.tensor_parallel import clip_grad_norm_

            grad_norm = clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        if not math.isfinite(float(grad_norm)):  # a finite loss can still backpropagate NaN/inf into the weights
            self._stop_nonfinite(f"gradient norm is {float(grad_norm)} (loss {loss_value})")
        # Into the log window only once the step is known good: a step stopped as non-finite is in no record, and
        # the record _stop_nonfinite writes of the steps before it must not average its metrics in
        if preference:
            self.data.record_step(stats[2:])
        elif self.teacher is not None:
            self.teacher.record_step(stats[2:] / (1 if masked else self.dp_size))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._last = {"lr": lr, "grad_norm": float(grad_norm)}
        muon_groups = getattr(self.optimizer, "muon_groups", None)
        if muon_groups:  # its own rate: optim.muon_lr's share of the schedule
            self._last["muon_lr"] = muon_groups[0]["lr"]
        return loss_value

    @property
    def _averages_gradients(self) -> bool:
        """Tensor parallelism without FSDP2 (whose reduce-scatter takes the mean; DDP takes no DTensor parameters):
        the trainer combines the gradients itself."""
        return self.tp_mesh is not None and not self.fsdp

    def _average_gradients(self) -> None:
        """The data-parallel mean of the gradients under tensor parallelism, which DDP would take without it (DDP
        does not take DTensor parameters): each rank's gradients (its slices of the split weights, the replicated
        ones whole) averaged with those of the ranks holding the same slices in the other groups (``mesh["dp"]``),
        in flat buckets, so a step costs a few all-reduces rather than one per tensor. Under context parallelism
        too, ``mesh["dp"]`` also holds the other pieces' ranks of that slice: their shares are summed, the sum
        divided by the data-parallel groups alone."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in self.raw_model.parameters() if p.grad is not None]
        group = self.tp_mesh["dp"].get_group()
        bucket: list[torch.Tensor] = []
        for index, grad in enumerate(grads):
            bucket.append(grad)
            if index + 1 < len(grads) and sum(g.numel() for g in bucket) < GRAD_BUCKET_ELEMENTS:
                continue
            flat = torch.cat([g.reshape(-1) for g in bucket]).div_(self.dp_size)
            dist.all_reduce(flat, group=group)
            for grad_part, averaged in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                grad_part.copy_(averaged.view_as(grad_part))
            bucket = []

    def _micro_batches(self) -> list:
        """This step's micro-batches. Streamed data under context or tensor parallelism: read and tokenized by the
        group's first rank alone and broadcast to the others (the cached token arrays cost every rank only a
        lookup)."""
        group_size = self.cfg.train.group_size
        if group_size > 1 and self.cfg.data.streaming:
            from retnet.train.streaming import group_micro_batches

            return group_micro_batches(self.data, self.accum, source=self.dp_rank * group_size,
                                       group=self.batch_group, device=self.device)
        return self.data.micro_batches(self.accum)

    def _step_targets(self) -> int:
        """The targets of this step's global batch (chat data). Streamed data counts only this rank's blocks,
        which no other data-parallel rank reads: summed over the ranks, one small all-reduce (in which only a
        context- or tensor-parallel group's first rank, the one that read the group's blocks, counts them)."""
        count = self.data.step_targets
        if self.data.step_targets_per_rank and is_distributed():
            total = torch.tensor(count if self.group_rank == 0 else 0, dtype=torch.int64, device=self.device)
            dist.all_reduce(total)
            count = int(total.item())
        return count

    def _stop_nonfinite(self, problem: str) -> NoReturn:
        # The one this run saved or resumed from, not the newest step_* directory: that may be one resume=auto
        # skipped as invalid (a save cut short), which a resume would skip again (train.resume=PATH: elsewhere)
        last = self.last_checkpoint
        # The steps since the last record (finite, trained): those just before the divergence, which the curve is
        # for, left out with logging.log_interval above 1. Not when a checkpoint of this step carries them, whose
        # resume writes their record itself (a record here too would count them twice).
        checkpointed = self.step == self.last_saved_step or (self.resumed and self.step == self.start_step)
        if self.window_losses and self._last and not checkpointed:
            self._log_window()
        self._plot(final=True)  # the curve up to the stop, for finding where it went wrong
        raise NonFiniteLossError(
            f"{problem} at step {self.step + 1}; stopping without saving. The last good checkpoint "
            f"is {str(last) if last else 'none (no checkpoint yet)'}; lower optim.lr or raise "
            f"optim.warmup_steps and resume")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``train.eval_blocks`` validation blocks (all ranks); for chat data, the mean
        over their target tokens. A data mixture's sources are also measured one by one (``val_loss.<label>``
        in the record); ``val_loss`` pools their blocks."""
        self.model.eval()
        self.evaluated_step = self.step
        eval_blocks = self.cfg.train.eval_blocks
        if getattr(self.data, "preference", False):  # DPO: the loss and rewards of validation pairs
            record = self.data.evaluate(self.model, eval_blocks)
            self.model.train()
            self._log({"kind": "val", "step": self.step, **record})
            if self.is_main:  # with the bar too: it shows the training loss only
                logger.info("step %d: val loss %.4f, %s", self.step, record["val_loss"], self.data.val_summary(record))
            return record["val_loss"]
        groups = self.data.val_groups(eval_blocks) if hasattr(self.data, "val_groups") else \
            {"": self.data.val_batches(eval_blocks)}
        stats = torch.zeros(len(groups), 2, device=self.device)  # per group: the summed loss, the count
        for group, batches in enumerate(groups.values()):
            for batch in batches:
                # The ranks of a context-parallel group hold the same batch, each computing its piece's share of the
                # loss: the shares add up to the batch's loss, and the batch is counted once, by the group's first
                # rank. Those of a tensor-parallel group each compute the whole loss: counted once too.
                counted = self.group_rank == 0
                if self.data.masked:  # chat: the summed loss of the targets, and their count
                    tokens, flags = (t.to(self.device) for t in batch)
                    with self.autocast:
                        stats[group, 0] += self._loss(tokens, flags, num_items=1).float() * self.counts_loss
                    stats[group, 1] += target_count(batch.flags.numpy()) if counted else 0
                    continue
                batch = batch.to(self.device)
                with self.autocast:  # blocks have equal lengths: the mean of block means is the token mean
                    stats[group, 0] += self._loss(batch).float() * len(batch) * self.counts_loss
                stats[group, 1] += len(batch) if counted else 0
        if is_distributed():
            dist.all_reduce(stats)  # every group in one collective
        self.model.train()
        pooled = stats.sum(dim=0)
        val_loss = (pooled[0] / pooled[1]).item()
        per_source = {f"val_loss.{label}": loss
                      for label, loss in zip(groups, (stats[:, 0] / stats[:, 1]).tolist(), strict=True) if label}
        self._log({"kind": "val", "step": self.step, "val_loss": val_loss,
                   "val_ppl": math.exp(min(val_loss, 50.0)), **per_source})
        if self.is_main:  # with the bar too: it shows the training loss only
            logger.info("step %d: val loss %.4f, ppl %.2f", self.step, val_loss, math.exp(min(val_loss, 50)))
        return val_loss

    def train(self) -> dict[str, Any]:
        """Run to ``train.steps``; returns a summary. Saves every ``checkpoint.interval`` steps and at the end
        (or, without evaluating first, when a SIGTERM/SIGINT arrives), then exports and plots."""
        cfg = self.cfg
        self.model.train()
        # The global batch's, once: the C ranks of a context-parallel group each read a piece of the same blocks
        tokens_per_step = cfg.train.global_batch_size * self.data.seq_len
        # Opened after the start-up lines and closed before the final ones: log records written while it is open go
        # through tqdm.write (_CurrentStderrHandler), and a bar still open at the end was drawn again below them.
        if self.is_main and cfg.logging.progress:
            from tqdm.auto import tqdm

            self._progress = tqdm(total=cfg.train.steps, initial=self.step, desc="train", unit="step",
                                  dynamic_ncols=True, mininterval=0.5)
            # (a library's warnings and last-resort log records too, which went on the bar's line; entered once the
            # bar is, as _close_progress closes them with it: entered first, a bar that failed left them patched)
            self._progress_hooks.enter_context(warnings_above_bars())
        if self.step == 0 or self.pending_eval:
            self.evaluate()
            if self.pending_eval:
                # The checkpoint of this step still says its evaluation is pending: a run stopped in its final
                # step saves nothing newer, and each later start of the finished run would evaluate it again.
                self.last_saved_step = -1
            self.pending_eval = False
        loss = float("nan")
        while self.step < cfg.train.steps and not self.stop_requested:
            started = time.perf_counter()
            self.window_losses.append(self.train_step())
            # Only the steps count: evaluations and checkpoints are not training throughput.
            self.window_seconds += time.perf_counter() - started
            step_tokens = getattr(self.data, "step_tokens", None) or tokens_per_step  # DPO pairs' lengths vary
            self.tokens += step_tokens
            self.window_tokens += step_tokens
            head_tokens = getattr(self.data, "step_head_tokens", None)
            self.window_flops += self.step_flops(step_tokens, head_tokens)
            if getattr(self.data, "step_reference", False):
                self.window_flops += self.reference_flops(step_tokens, head_tokens)
            final = self.step == cfg.train.steps
            if self.step % cfg.logging.log_interval == 0 or final:
                loss = self._log_window()
            if self._progress is not None:
                self._progress.update(1)
            eval_due = bool(cfg.train.eval_interval) and self.step % cfg.train.eval_interval == 0
            if self.stop_requested:
                self.pending_eval = eval_due or final
                break
            if eval_due and not final:
                self.evaluate()
            save_due = bool(cfg.checkpoint.interval) and self.step % cfg.checkpoint.interval == 0
            if save_due and not final:
                self.save()
            if (eval_due or save_due) and not final:
                self._plot()
        self._close_progress()
        interrupted = self.stop_requested
        if not interrupted and self.window_losses and self._last and self.logged_step != self.step:
            # Resumed at train.steps from a checkpoint taken inside a log window (a run shortened to a checkpoint's
            # step): the final record a run never stopped writes, of the steps the checkpoint carries, before the
            # final validation as there. (A checkpoint from before it carried the last step's values: none.)
            loss = self._log_window()
        val_loss = None
        if not interrupted and not self._final_step_evaluated():  # (a finished run resumed again only re-exports)
            val_loss = self.evaluate()
        self.save()
        summary = {"step": self.step, "loss": loss, "interrupted": interrupted}
        exporting = not interrupted and cfg.checkpoint.export
        export_state = self.export_state() if exporting else None
        if self.is_main:
            written = []  # what the last line names besides the output directory
            if exporting:
                from retnet.extras import transformers_bars_hidden

                try:
                    with transformers_bars_hidden():
                        written.append(f"model: {self.export(export_state)}")
                except Exception as failure:
                    if (error := _os_error(failure)) is None:
                        raise
                    raise CheckpointError(
                        f"could not write the export {str(self.output_dir / 'export')!r}: {error}. The checkpoint of "
                        f"step {self.step} is saved ({self.last_checkpoint}): free disk space (or fix the "
                        f"permissions) and rerun the command, which exports it again") from error
            if self._plot(final=True):
                written.append(f"loss plot: {self.output_dir / 'loss.png'}")
            summary["val_loss"] = val_loss
            outputs = f"{self.output_dir}" + (f" ({', '.join(written)})" if written else "")
            if interrupted:
                logger.info("stopped by signal at step %d; outputs in %s%s", self.step, outputs,
                            "; the resumed run evaluates this step first" if self.pending_eval else "")
            else:
                logger.info("finished at step %d; outputs in %s", self.step, outputs)
        barrier()
        self._completed = True
        return summary

    def _plot(self, final: bool = False) -> bool:
        """Draw loss.png again from metrics.jsonl (rank 0), so that it follows the run: after an evaluation or a
        checkpoint, at most once every ``_PLOT_EVERY_S`` seconds or ``_PLOT_COST_SHARE`` times the last draw's
        time, whichever is longer (a draw reads the whole file: seconds, late in a long run, which every rank waits
        out at the next step's all-reduce), and at the end. A plot that cannot be drawn is a warning: it is a
        convenience, metrics.jsonl holds the curve, and the run goes on (at the end, only an OS error is). Whether
        it drew loss.png."""
        if not self.is_main or self._plotted_at == math.inf:
            return False
        start = monotonic()
        if not final and self._plotted_at is not None and start - self._plotted_at < self._plot_gap:
            return False
        self._plotted_at = start
        self._metrics.flush()
        try:
            from retnet.train.plots import plot_losses

            plot_losses(self.metrics_path, self.output_dir / "loss.png",
                        title=f"RetNet {self.model_name} ({self.n_params / 1e6:.2f}M params"
                              + (f", LoRA rank {self.cfg.lora.rank})" if self.cfg.lora.enabled else ")"))
        except ImportError:  # a bring-your-own-torch machine without the [train] extra: keep the run
            logger.warning("matplotlib is not installed; no loss.png (metrics.jsonl has the curve)")
            self._plotted_at = math.inf
            return False
        except Exception as failure:
            error = _os_error(failure)
            if error is None and final:
                raise
            logger.warning("could not write %s: %s (metrics.jsonl has the curve)", self.output_dir / "loss.png",
                           error if error is not None else f"{type(failure).__name__}: {failure}")
            drawn = False
        else:
            drawn = True
        self._plot_gap = max(_PLOT_EVERY_S, _PLOT_COST_SHARE * (monotonic() - start))
        return drawn

    def _final_step_evaluated(self) -> bool:
        """Whether metrics.jsonl holds the validation of the step the run ends at. A run that trained evaluates
        its last step at the end (the loop evaluates no final step); one resumed at train.steps has it only if
        the records kept of its checkpoint's step do (a checkpoint of a shortened run may have none): rank 0 read
        them, and its answer is every rank's."""
        evaluated = self.evaluated_step == self.step
        if self.step == self.start_step and is_distributed():
            answer = [evaluated]
            dist.broadcast_object_list(answer, src=0)
            evaluated = bool(answer[0])
        return evaluated

    def _log_window(self) -> float:
        """Write the record of the steps since the last one and start the next window; returns its mean loss."""
        loss = sum(self.window_losses) / len(self.window_losses)
        tokens_per_s = self.window_tokens / max(self.window_seconds, 1e-9)
        # Over every device, context and tensor parallelism included: a group's devices share its tokens' FLOPs
        mfu = (self.window_flops / max(self.window_seconds, 1e-9) / (self.peak_flops * self.world_size)
               if self.peak_flops else None)
        muon_lr = {"muon_lr": self._last["muon_lr"]} if "muon_lr" in self._last else {}
        self._log({"kind": "train", "step": self.step, "loss": loss, "lr": self._last["lr"], **muon_lr,
                   "grad_norm": self._last["grad_norm"], "tokens_per_s": tokens_per_s,
                   "tokens": self.tokens, "mfu": mfu, **getattr(self.data, "window_metrics", dict)(),
                   **(self.teacher.window_metrics() if self.teacher is not None else {})})
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{loss:.3f}", lr=f"{self._last['lr']:.2e}",
                                       tok_s=f"{tokens_per_s:,.0f}", mfu="n/a" if mfu is None
                                       else f"{100 * mfu:.1f}%", refresh=False)
        elif self.is_main:
            logger.info("step %d: loss %.4f lr %.2e %.0f tok/s", self.step, loss, self._last["lr"], tokens_per_s)
        self.window_losses, self.window_seconds, self.window_tokens, self.window_flops = [], 0.0, 0, 0.0
        self.logged_step = self.step
        return loss

    def export_state(self) -> dict:
        """The full model state dict for :meth:`export` on rank 0 (a collective under FSDP and tensor parallelism:
        every rank calls it; the others get an empty dict)."""
        if self.split_parameters:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.raw_model.state_dict() if self.is_main else {}

    def export(self, state: dict) -> Path:
        """save_pretrained model + tokenizer into ``<output_dir>/export`` (rank 0, after ``save``): a fine-tune's
        generation config is its base's (``model.init_from``'s, else a distillation's teacher's), completed from the
        tokenizer (:func:`~retnet.train.checkpoint.prepare_export`); the tokenizer is :meth:`export_tokenizer`."""
        config = copy.deepcopy(self.model_config)
        for key, value in self.export_overrides.items():
            setattr(config, key, value)
        tokenizer = self.export_tokenizer()
        init_from = self._init_from_dir()
        if self.cfg.lora.enabled:
            from retnet.train.lora import ADAPTER_DIR, export_lora

            path = export_lora(self.output_dir / "export", config, state, tokenizer, self.cfg.lora,
                               self.lora_targets, init_from, getattr(self.data, "model_class", None))
            logger.info("exported the merged model and tokenizer to %s, the LoRA adapter to %s", path,
                        path / ADAPTER_DIR)
            return path
        if self.cfg.reward.enabled:
            from retnet.train.reward import export_reward

            path = export_reward(self.output_dir / "export", config, state, tokenizer)
        else:
            # A student distilled into a new model answers as its teacher was tuned to: the teacher's stop ids
            # (a chat teacher's end-of-turn token) and sampling defaults, its tokenizer being the run's.
            base = init_from if init_from is not None else self._teacher_dir()
            path = export_pretrained(self.output_dir / "export", config, state, tokenizer, base)
        logger.info("exported model and tokenizer to %s", path)
        return path

    def export_tokenizer(self):
        """The tokenizer the export saves: the run's, or, when the run rendered conversations (``data.format``
        other than ``text``) with a template the tokenizer does not hold (it has none: the project's default,
        :func:`retnet.train.chat.chat_template`), a copy of it holding that template, so that
        ``apply_chat_template`` on the export renders them as training did."""
        if self.cfg.data.format == "text":
            return self.tokenizer
        from retnet.train.chat import chat_template

        template = chat_template(self.tokenizer)
        if template is None:  # its own: what training rendered with, saved with it
            return self.tokenizer
        tokenizer = copy.deepcopy(self.tokenizer)  # the run's own (its resumes' output_dir/tokenizer) unchanged
        tokenizer.chat_template = template
        return tokenizer

    # -- logging -----------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {**record, "time": time.time()}
        self._metrics.write(json.dumps(record) + "\n")
        if self._writer is not None:
            self._write_scalars(record)
        if self._wandb is not None:
            self._wandb.log(record)

    def _write_scalars(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, record["step"], walltime=record.get("time"))

    def _start_wandb(self) -> None:
        """The W&B run (logging.wandb, ``retnet.train.wandb_logging``), started on rank 0 and awaited by the others;
        ``_wandb`` holds it while there is one."""
        wandb_logger = WandbLogger(self.cfg, self.output_dir, is_main=self.is_main, resumed=self.resumed,
                                   step=self.step)
        wandb_logger.start()
        self._wandb = wandb_logger if wandb_logger.run is not None else None

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
            self._progress_hooks.close()  # (entered with the bar)

    def close(self, log_sigterm: bool = False) -> None:
        """``log_sigterm``: leave a handler that only logs a SIGTERM instead of the one before the run (a process
        about to exit after a signal stop: the default's would end it with 143)."""
        previous = self._previous_handlers
        # The log-only handler first: a SIGTERM from here on finds it, never the default's 143. The others are given
        # back last, once all is closed: until then this run's handler only logs (train() returned), where the
        # default SIGINT's KeyboardInterrupt cut the closing short (the lock, the W&B run left behind).
        if log_sigterm and signal.SIGTERM in previous:
            signal.signal(signal.SIGTERM, _log_sigterm)
        try:
            unlock_output_dir(self.output_dir)
            self._close_progress()
            if self._writer is not None:
                self._writer.close()
            if self._metrics is not None:
                self._metrics.close()
            if self._wandb is not None:
                # As the process exits: 0 when train() returned (train.steps reached, or stopped by a signal), else
                # an error ended it (a non-finite loss, an exception, also after the last step: W&B's "failed")
                self._wandb.finish(exit_code=0 if self._completed else 1)
                self._wandb = None
        finally:
            for sig, handler in previous.items():
                if not (sig == signal.SIGTERM and log_sigterm):
                    signal.signal(sig, handler)
            previous.clear()


# The least time between two draws of loss.png while a run goes on (evaluations may come every few seconds)
_PLOT_EVERY_S = 30.0
# ... and at least this many times the last draw's own time: the draws take at most 2 % of the run
_PLOT_COST_SHARE = 50


def _vocab_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary (every token and its id, added tokens included) and its EOS id: what the
    model's embedding rows mean. Not its serialized form, which another ``tokenizers`` release may write otherwise
    for the same tokenizer (a resume after an upgrade is no other tokenizer)."""
    import hashlib

    # by id, then token: tokens sharing an id come from get_vocab (a Rust HashMap) in another order in each process
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps([vocab, tokenizer.eos_token_id]).encode()).hexdigest()


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write, or None for any other error. A real full disk seldom raises a bare one:
    torch.save into a file raises RuntimeError "unexpected pos" with the OSError as its context, torch's distributed
    checkpoint wraps the ranks' failures in its CheckpointException (a BaseException), and safetensors raises its
    own SafetensorError, "… (os error 28)"."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        failures = getattr(current, "failures", None)
        if type(current).__name__ == "CheckpointException" and isinstance(failures, dict):
            pending.extend(failure[0] for failure in failures.values() if isinstance(failure, tuple) and failure)
        elif not isinstance(current, Exception):
            continue  # a KeyboardInterrupt raised while an OSError was handled stays an interrupt
        found = re.search(r"\(os error (\d+)\)", str(current)) if type(current).__name__ == "SafetensorError" else None
        if found:
            return OSError(int(found.group(1)), os.strerror(int(found.group(1))))
        pending.extend((current.__cause__, current.__context__))
    return None


def _saved_context_parallel(trainer: dict[str, Any]) -> int:
    """The ``train.context_parallel`` a checkpoint's ``trainer.pt`` was written under (1 before it was saved)."""
    return int(trainer.get("context_parallel", 1))


def _saved_tensor_parallel(trainer: dict[str, Any]) -> int:
    """The ``train.tensor_parallel`` a checkpoint's ``trainer.pt`` was written under (1 before it was saved)."""
    return int(trainer.get("tensor_parallel", 1))


def _former_scalar(key: str, saved: list[int] | None, now: list[int] | None) -> bool:
    """Whether the model's ``key`` (shape ``now``) is an activation parameter that a checkpoint written before it
    became a one-element tensor (SAU's, a trainable gSmeLU's; FSDP2 shards no 0-dim parameter) holds 0-dim
    (``saved``): such a checkpoint still resumes, the parameter reshaped."""
    from retnet.model.modeling_retnet import FORMER_SCALAR_ACT_PARAMETERS

    module, _, name = key.rpartition(".")
    return saved == [] and now == [1] and module.endswith("mlp.act_fn") and name in FORMER_SCALAR_ACT_PARAMETERS


def _former_scalar_slots(saved: dict[str, list[int]], model_state: dict, optim_state: dict
                         ) -> list[tuple[dict, str, torch.Tensor]]:
    """The entries of a sharded load's state dicts that the checkpoint holds 0-dim (``_former_scalar``: ``saved``
    its model's shapes), each replaced by a 0-dim tensor for torch's loader to read into (it refuses ``[]`` into
    ``[1]``): ``(state dict, key, the tensor replaced)``. The parameters and their optimizer state (AdamW's moments
    were 0-dim with them; its ``step`` is 0-dim either way)."""
    former = [key for key, value in model_state.items() if _former_scalar(key, saved.get(key), list(value.shape))]
    slots = [(model_state, key, model_state[key]) for key in former]
    for key in former:
        entry = optim_state.get("state", {}).get(key, {})
        slots += [(entry, name, value) for name, value in entry.items() if name != "step" and torch.is_tensor(value)]
    for entries, key, template in slots:
        entries[key] = torch.empty((), dtype=template.dtype)
    return slots


def _like(value: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) placed as ``template`` is: on its device, or a DTensor split as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(template, DTensor):
        return distribute_tensor(value.to(template.device), template.device_mesh, template.placements)
    return value.to(template.device)


def _record_key(line: str) -> tuple[int, str | None]:
    """(step, kind) of a metrics.jsonl line; a line cut short by a crash, or any other that is no record (JSON but
    no object, a step that is no number: a hand-edited file), sorts after every step."""
    try:
        record = json.loads(line)
        return int(record.get("step", 0)), record.get("kind")
    except (ValueError, TypeError, AttributeError, OverflowError):
        return 1 << 62, None


class _CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is when a record is emitted: ``main`` may run again in the
    same process after the stderr of the first run was replaced and closed (pytest's capsys, a notebook cell
    with redirected output), and a handler holding that old stream would only print "Logging error"."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # StreamHandler.__init__ and setStream assign it; the current sys.stderr always wins

    def emit(self, record: logging.LogRecord) -> None:
        # Written as is, a record went on the line of an open progress bar (after its "tok_s=536]"), and the bar's
        # next frame over it.
        if bar_open():
            emit_above_bars(self, record)
        else:
            super().emit(record)


def make_output_dir(output_dir: Path, *, create: bool = True) -> None:
    """``train.output_dir`` created, or with ``create`` false only found creatable (``--print-config``): a
    ConfigError naming it when it or its ``checkpoints/`` is a file, or it cannot be created."""
    from retnet.train.data import creation_problem

    for path in (output_dir, output_dir / "checkpoints"):
        if os.path.exists(path) and not os.path.isdir(path):  # (os.path's: no OSError on a name too long)
            raise ConfigError(f"train.output_dir: {str(path)!r} exists and is not a directory")
    if not create:
        if (problem := creation_problem(output_dir)) is not None:
            raise ConfigError(f"train.output_dir {str(output_dir)!r} cannot be created: {problem}")
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"train.output_dir {str(output_dir)!r} cannot be created: {error}") from None


def named_checkpoint(resume: str, ckpt_root: Path) -> Path | None:
    """The checkpoint ``train.resume`` names, still to verify (None for 'none' and 'auto'), after its refusals
    that read no checkpoint: 'none' where ``ckpt_root`` holds checkpoints, a folder of checkpoints named as one."""
    if resume == "none":
        if existing := list_checkpoints(ckpt_root):
            raise ConfigError(f"train.resume is 'none' but {str(ckpt_root)!r} already holds checkpoints "
                              f"({existing[-1].name}); use --train.resume=auto or another train.output_dir")
        return None
    if resume == "auto":
        return None
    # A folder of checkpoints (a run's checkpoints/, or its output_dir) would be refused as a checkpoint whose
    # write crashed: name the one to give instead
    for root in (Path(resume), Path(resume) / "checkpoints"):
        if held := list_checkpoints(root):
            raise CheckpointError(f"train.resume {resume!r} holds checkpoints, it is not one: name one of them "
                                  f"({str(held[-1])!r} is the newest), or use train.resume=auto with "
                                  f"train.output_dir {str(root.parent)!r} to resume from its newest valid one")
    return Path(resume)


def _init_from_dir(init_from: str | None) -> Path | None:
    """``model.init_from``'s directory: itself, or a hub id's snapshot (downloaded, or from the HF cache offline)."""
    if not init_from:
        return None
    from retnet.model.hub import HubError, resolve_pretrained

    try:
        return resolve_pretrained(init_from)
    except HubError as error:
        raise ConfigError(f"model.init_from {error}; give a save_pretrained directory (another run's "
                          f"train.output_dir/export) or a hub id") from None


def _starting_values(init_from: Path | None, preset: str, keys: set[str]) -> dict[str, Any]:
    """The RetNetConfig fields ``keys`` of the model a run starts from, before any override: ``init_from``'s
    config.json (RetNetConfig's defaults for those it names none of, as save_pretrained leaves them out), else the
    preset's."""
    from retnet.model import RetNetConfig

    if init_from is None:
        start = RetNetConfig.from_preset(preset)
        return {key: getattr(start, key) for key in sorted(keys)}
    saved, _ = RetNetConfig.get_config_dict(str(init_from), local_files_only=True)
    default = RetNetConfig()
    return {key: getattr(default, key) if saved.get(key) is None else saved[key] for key in sorted(keys)}


def _check_pretrained_dir(path: Path, causal_lm: bool = False) -> None:
    """``model.init_from`` holds a model and its tokenizer (what ``train.output_dir/export`` holds); with
    ``causal_lm`` (the run trains a RetNetForCausalLM, not a reward model's classifier) not a classifier's export."""
    if not path.is_dir():
        raise ConfigError(f"model.init_from {str(path)!r} is no directory; give a save_pretrained directory "
                          f"(another run's train.output_dir/export)")
    from retnet.model.hub import training_output

    written = training_output(path)  # a run's output_dir holds a config.json and a tokenizer too: no model
    if written is not None:
        raise ConfigError(f"model.init_from {str(path)!r} is {written}")
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (path / name).is_file()]
    if missing:
        raise ConfigError(f"model.init_from {str(path)!r} holds no {' and no '.join(missing)}; give a "
                          f"save_pretrained directory with its tokenizer (another run's train.output_dir/export)")
    if causal_lm:
        # Before the data is built. A reward model's export loaded as a causal LM drops its score head and takes the
        # tied embedding (or, untied, a random matrix) for an LM head it never trained (as distill.teacher refuses)
        try:
            architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError):  # _pretrained_config reports an unreadable config.json
            architectures = []
        if not any(str(name).endswith("ForCausalLM") for name in architectures) and \
                any(str(name).endswith("ForSequenceClassification") for name in architectures):
            raise ConfigError(f"model.init_from {str(path)!r} holds a {', '.join(map(str, architectures))} (a reward "
                              f"model's export: a score head, no LM head), not a RetNetForCausalLM; give a causal "
                              f"LM's export (a pre-training or SFT run's train.output_dir/export)")


def _pretrained_config(path: Path, overrides: dict[str, Any], tokenizer):
    """The pretrained model's config with this run's settings on top, checked (a value that cannot work is
    refused naming it), and its tokenizer checked against it."""
    from retnet.model import RetNetConfig

    saved, _ = RetNetConfig.get_config_dict(str(path), local_files_only=True)
    if saved.get("model_type") != RetNetConfig.model_type:
        raise ConfigError(f"model.init_from {str(path)!r} holds a {saved.get('model_type')!r} model, not a RetNet")
    try:
        config = RetNetConfig.from_dict({**saved, **overrides})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model (on model.init_from {str(path)!r}): {error}") from None
    problem = tokenizer_mismatch(tokenizer, config)
    if problem is not None:
        raise ConfigError(f"model.init_from {str(path)!r}: {problem}")
    return config


def _pretrained_model(path: Path, config, model_class=None) -> nn.Module:
    """The pretrained weights in fp32 (the master weights; autocast or FSDP's policy casts for compute), as a
    ``model_class`` (a reward model's classifier: the backbone's; its new head drawn from torch's RNG). A
    ConfigError naming the weights unless ``path`` holds every weight of the model and no other (but for the
    classifier's head): from_pretrained draws the weights a checkpoint lacks at random and only reports them."""
    from safetensors import SafetensorError

    from retnet.model import RetNetForCausalLM, RetNetForSequenceClassification

    model_class = model_class or RetNetForCausalLM
    try:
        model, info = model_class.from_pretrained(str(path), config=config, dtype=torch.float32,
                                                  local_files_only=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:  # no weights, or of other shapes
        raise ConfigError(f"model.init_from {str(path)!r}: its weights could not be loaded: {type(error).__name__}: "
                          f"{str(error).strip()[:400]}") from None
    # Weights this run's model.* settings add or drop (hidden_act "sau" adds its alpha and sigma, extra.ffn_bias its
    # biases; each new one starts at its constructor's value, as before this check): not the export's fault
    # (two meta models built only when something did not match: the common load pays nothing)
    unmatched = info.get("missing_keys") or info.get("unexpected_keys")
    added, dropped = _weights_of_overrides(path, config, model_class) if unmatched else (set(), set())
    if added & set(info.get("missing_keys", ())) or dropped & set(info.get("unexpected_keys", ())):
        logger.info("model.init_from: this run's model settings add %d weight(s) (new: %s) and drop %d",
                    len(added), ", ".join(sorted(added)[:3]) or "none", len(dropped))
    info = {**info, "missing_keys": [key for key in info.get("missing_keys", ()) if key not in added],
            "unexpected_keys": [key for key in info.get("unexpected_keys", ()) if key not in dropped]}
    # A reward model from a causal LM's export: its score head is new (drawn at random, as TRL's)
    classifier = issubclass(model_class, RetNetForSequenceClassification)
    shown = loading_mismatches(model, info, config, new_head="score." if classifier else None)
    if shown:
        raise ConfigError(f"model.init_from {str(path)!r}: its weights do not match its config.json's "
                          f"{model_class.__name__} ({shown}); give a save_pretrained directory whose weights are all "
                          f"there (another run's train.output_dir/export)")
    return model


def _weights_of_overrides(path: Path, config, model_class) -> tuple[set[str], set[str]]:
    """The weight names ``config`` (the saved config with this run's settings on top) adds to and drops from those
    of ``path``'s own config.json, for ``model_class`` (both models built on the meta device: no memory)."""
    from retnet.model import RetNetConfig

    try:
        saved = RetNetConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            before = set(model_class(saved).state_dict())
    except (OSError, TypeError, ValueError):  # a saved config only this run's settings make valid: nothing excused
        return set(), set()
    with torch.device("meta"):
        after = set(model_class(copy.deepcopy(config)).state_dict())
    return after - before, before - after


def _setup_logging(rank: int) -> None:
    root = logging.getLogger("retnet")
    if not root.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


__all__ = ["NonFiniteLossError", "Trainer"]
