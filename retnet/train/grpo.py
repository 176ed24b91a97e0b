"""Group Relative Policy Optimization (``data.format = "prompts"``, ``[grpo]``), online RL from rewards, as TRL's
GRPOTrainer.

    retnet-train --config small --model.init_from=runs/sft/export --data.format=prompts \\
        --data.dataset=prompts.jsonl --grpo.reward_funcs=retnet.train.rewards:exact_match \\
        --grpo.num_generations=8 --train.global_batch_size=64 --train.output_dir=runs/grpo

Rows (:mod:`retnet.train.prompts`): a ``prompt`` column, every other column passed to the reward functions; a
conversational prompt is rendered with its row's ``chat_template_kwargs`` (TRL's ``maybe_apply_chat_template``).

One generation: ``train.global_batch_size`` completions, ``global_batch_size / num_generations`` prompts
drawn as :class:`~retnet.train.data.PackedData` draws blocks (a seeded per-epoch permutation, the position one
integer), each rank taking whole groups (a contiguous share). Each prompt is sampled ``num_generations`` times
by the policy as it is (eval mode, no grad), ``micro_batch // num_generations`` groups at a time, by the seeded
sampler of :mod:`retnet.train.grpo_sampling` (the same completions for any world size, batch split and resume;
under FSDP the ranks decode in step).

The completions are scored by each reward source (:class:`~retnet.train.rewards.RewardSources`: the
``grpo.reward_funcs`` with TRL's contract, see :mod:`retnet.train.rewards`; ``grpo.reward_model`` scoring prompt +
completion + EOS as the reward trainer scores a pair), summed with ``grpo.reward_weights`` ignoring None (nansum),
and each completion's advantage is its reward minus its group's mean, divided by the group's std + 1e-4
(``scale_rewards``: the batch's std, or none), TRL's formula.

The loss: per completion token ``-min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A)`` (``grpo.delta``: the first ρ capped
at it; ``importance_sampling_level`` ``"sequence"``: ρ the completion's, exp of its tokens' mean log ratio, GSPO);
with ``mask_truncated_completions`` the tokens of a completion without a stop token are left out (TRL's completion
mask). ``num_iterations`` (TRL's μ) optimizer steps are taken on each generation, TRL's counting (the step number
advances at each, the data position at each generation): with μ 1, ``ρ = exp(logp − logp.detach())``: 1, the clip
inactive, the gradient ``-A ∇logp``; so is every generation's first step with μ > 1, whose training forwards'
log-probs (train mode, before its update, as TRL computes them) are kept as ``old``, with everything else the μ
steps need, in a :class:`Generation` (checkpointed while steps on it remain); its later steps have
``ρ = exp(logp − old)``.
Log-probs are of the logits divided by ``temperature``, as TRL computes them (without the sampler's cuts and
``repetition_penalty``, as TRL's). With ``beta`` > 0,
``beta × (exp(ref − logp) − (ref − logp) − 1)`` (TRL's k3 KL estimate) is added per token; the reference is the
model as the run starts: ``model.init_from``'s weights, loaded once (under FSDP sharded as the policy is; with
LoRA: the same model with its adapters disabled, peft's ``disable_adapter``), its log-probs computed when the
completions are. The tokens are aggregated over the global batch by ``loss_type``: ``dapo`` sum / the batch's
completion tokens, ``grpo`` each sequence's mean then the mean over sequences, ``dr_grpo`` sum / (sequences ×
``max_completion_length``), ``bnpo`` each micro-batch's token mean then the mean over the micro-batches, ``luspo``
(sequence-level ratio) each completion's term times its length, the mean over sequences. ``cispo`` replaces the
clipped term by ``-min(ρ, ε_high)·A·logp`` (the capped ratio detached; aggregated as ``dapo``), ``sapo`` by
``-σ(τ(ρ − 1))·4/τ·A`` (τ by the advantage's sign; aggregated as ``grpo``), TRL's. A
micro-batch's sequences (prompt + completion, stop token included, nothing after it) are packed into one row, logits
only where a completion token is predicted; its loss is its share of that global normalization, scaled by the
accumulation count and the world size, which the trainer's division and DDP's average undo: the gradient is the
global batch's whatever the split (``bnpo``'s, as TRL's, depends on ``train.micro_batch_size``).

Under tensor parallelism (``train.tensor_parallel`` T > 1) the prompts are dealt to the W / T data-parallel ranks
(``rank`` and ``world_size`` are those): the T ranks of a group sample, score and train on the same completions, the
split model's forwards collectives of the group in step. Their uniforms are not keyed by the rank and the logits
``forward`` returns are replicated, so they draw the same tokens; the sampler broadcasts the group's first rank's
picks besides. The group's first rank alone scores the completions and broadcasts the values (a judge's calls once a
group, and a reward function drawing from the per-rank seeded RNGs cannot part the ranks). The generation's totals, the batch std and the evaluation's sums are all-reduced over the data-parallel
ranks (``mesh["dp"]``), and the trainer counts the step's sums of a group's first rank only. The KL reference is
split as the policy is (and, under FSDP2, sharded over ``mesh["dp"]``), its forwards the group's collectives too.

Under context parallelism (``train.context_parallel`` C > 1) the prompts are dealt to the data-parallel groups as
above, and the C ranks of a group split its prompts again to sample (a contiguous share each, whole sequences with
the cache: the uniforms are keyed by the prompt's position, so the completions are those of any other split), score
their share, and all-gather the completions and rewards: every rank of the group then holds all of them, and the
advantages, totals and metric sums are computed from them as one data-parallel rank's (the totals summed over the
ranks holding the same piece in each group). The policy, reference and old-policy passes split each micro-batch's
row along time (:func:`token_logps` with a :class:`~retnet.model.context_parallel.ContextGroup`): each piece computes
the log-probs of the tokens it predicts, and their sum over the group gives every rank all of them, from which it
computes the whole loss, every loss type and normalization as one process does; its loss is its 1/C share, the
backward of the sum hands each piece the gradient of its tokens, and the metrics count once a group (the trainer
counts its first rank's). Beside tensor parallelism each piece's T ranks sample, score and train as a
tensor-parallel group does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from retnet.tokenization import vocab_bound
from retnet.train.config import ConfigError, DataConfig, GrpoConfig, ModelConfig
from retnet.train.data import (
    PackedData,
    _hub_changed,
    data_cache_dir,
    load_hub,
    load_tokenizer,
    local_files,
    split_documents,
)
from retnet.train.distributed import data_parallel_group, is_distributed
from retnet.train.grpo_sampling import gathered_weights, sample, stop_tokens, uniforms
from retnet.train.preference import check_rows_digest, pack_completions
from retnet.train.prompts import PromptEncoder, Prompts, load_prompt_rows, prompts_digest
from retnet.train.rewards import RewardSources, reward_arguments, reward_values

if TYPE_CHECKING:  # (the model package imports transformers)
    from retnet.model.context_parallel import ContextGroup

logger = logging.getLogger(__name__)

VAL_STREAM = 2**32 - 1  # the seed word of the validation samples where a training step's number goes
EPSILON = 1e-4  # TRL's, added to the std the advantages are divided by
# The step's sums (every rank's, all-reduced with the loss): then, per reward source, its sum and count. The
# first six are a generation's (added at the step that samples it); "kl", "tokens" (the completion tokens the loss
# was computed on), the clipped tokens and "steps" are every step's; "clip_low_min" / "clip_high_max" add up the
# steps' extreme per-rank shares (TRL's min / max over processes).
SUMS = ("completions", "reward", "reward_std", "length", "clipped", "zero_std", "kl", "tokens", "clip_low",
        "clip_high", "clip_region", "clip_low_min", "clip_high_max", "steps")
_SUMS_BEFORE_CLIP = 8  # a checkpoint's window written before the clip sums: SUMS[:8], then the sources'


class Totals(NamedTuple):
    """The global batch's counts a micro-batch's loss is normalized by: completions and completion tokens."""

    sequences: float
    tokens: float


class GrpoBatch(NamedTuple):
    """A micro-batch of S completions as one packed row. ``input_ids`` ``[1, N]``; ``cu_seqlens`` ``[S + 1]``;
    ``keep`` ``[M]`` the positions whose next token is a completion token, ``labels`` ``[M]`` that token,
    ``sequence`` ``[M]`` its completion; ``advantages`` ``[S]``; ``lengths`` ``[S]`` completion tokens; ``active``
    ``[S]`` bool, whether a completion's tokens count in the loss (False: truncated, with
    ``grpo.mask_truncated_completions``); ``old`` ``[M]`` the old policy's log-probs of the labels (empty with
    ``num_iterations`` 1, and at a generation's first step, where the policy is the old one); ``reference`` ``[M]``
    the reference's (empty with ``beta`` 0)."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    keep: torch.Tensor
    labels: torch.Tensor
    sequence: torch.Tensor
    advantages: torch.Tensor
    lengths: torch.Tensor
    active: torch.Tensor
    old: torch.Tensor
    reference: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> GrpoBatch:
        return GrpoBatch(*(t.to(device, non_blocking=non_blocking) for t in self))


def pack(prompts: list[np.ndarray], completions: list[np.ndarray], advantages: torch.Tensor,
         active: torch.Tensor | None = None) -> GrpoBatch:
    """The :class:`GrpoBatch` of (prompt, completion) ids with their advantages; ``active``: which completions'
    tokens count in the loss (default: all)."""
    input_ids, bounds, keep, labels, sequence, lengths = pack_completions(list(zip(prompts, completions, strict=True)))
    active = torch.ones(len(completions), dtype=torch.bool) if active is None else torch.as_tensor(active).bool()
    return GrpoBatch(input_ids, torch.tensor(bounds, dtype=torch.long), keep, labels, sequence,
                     advantages.float().cpu(), lengths, active.cpu(), torch.zeros(0), torch.zeros(0))


def finished(completions: list[np.ndarray], stops: list[int]) -> np.ndarray:
    """``[n]`` bool: whether each completion ends with a stop token; the others reached ``max_completion_length``
    (truncated, TRL's test: no EOS)."""
    return np.array([len(c) > 0 and int(c[-1]) in stops for c in completions], dtype=bool)


def token_logps(model: torch.nn.Module, batch: GrpoBatch, temperature: float = 1.0,
                context: ContextGroup | None = None) -> torch.Tensor:
    """``[M]`` fp32: each completion token's log-probability under ``model`` (its logits divided by
    ``temperature``, the distribution it was sampled from, as TRL scores it). ``context``: the row is split along
    time across its ranks (context parallelism), each computing the tokens its piece predicts; every rank returns
    all ``M`` (each token's value from the one piece holding it, exactly: the others add zeros), the gradient of
    each reaching its piece."""
    inputs, keep, labels = {"input_ids": batch.input_ids, "cu_seqlens": batch.cu_seqlens}, batch.keep, batch.labels
    mine = None
    if context is not None:
        inputs, shard, start = context.shard(batch.input_ids, batch.cu_seqlens)
        inputs["context_parallel"] = shard
        # the positions predicting a completion token on this piece (the token itself may lie on the next)
        mine = (keep >= start) & (keep < start + shard.length)
        keep, labels = keep[mine] - start, labels[mine]
    logits = model(**inputs, logits_to_keep=keep, use_cache=False, return_dict=True).logits[0].float() / temperature
    logps = logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    if context is None:
        return logps
    return context.sum(logps.new_zeros(len(batch.keep)).masked_scatter(mine, logps))


def importance_ratio(logps: torch.Tensor, batch: GrpoBatch, cfg: GrpoConfig, mask: torch.Tensor) -> torch.Tensor:
    """``[M]`` each token's ratio to the old policy (without ``batch.old``, to ``logps`` detached: 1, the old policy
    is this one): its own (``importance_sampling_level`` ``"token"``), or its completion's, exp of the mean of its
    (unmasked) tokens' log ratios (``"sequence"``, TRL's GSPO)."""
    log_ratio = logps - (batch.old if len(batch.old) else logps.detach())
    if cfg.importance_sampling_level == "sequence":
        sums = torch.zeros(len(batch.lengths), dtype=log_ratio.dtype, device=log_ratio.device)
        counts = (batch.lengths * batch.active).to(log_ratio.device, log_ratio.dtype).clamp(min=1.0)
        log_ratio = (sums.index_add(0, batch.sequence, log_ratio * mask) / counts)[batch.sequence]
    return torch.exp(log_ratio)


def token_terms(logps: torch.Tensor, ratio: torch.Tensor, advantages: torch.Tensor,
                cfg: GrpoConfig) -> torch.Tensor:
    """``[M]`` each completion token's policy term, TRL's by ``cfg.loss_type``: PPO's clipped surrogate, CISPO's
    log-prob weighted by the capped ratio (detached), or SAPO's soft gate of the ratio. ``logps``, ``ratio`` and
    ``advantages`` ``[M]``, the ratio to the old policy with its graph."""
    if cfg.loss_type == "cispo":  # the cap's gradient is none: the weight of a REINFORCE term, never cut off
        return -ratio.clamp(max=cfg.epsilon_upper).detach() * advantages * logps
    if cfg.loss_type == "sapo":  # σ(τ(ρ − 1))·4/τ: ρ's value and gradient at ρ = 1 (σ' = 1/4), fading off it
        tau = torch.where(advantages > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg).to(ratio.dtype)
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    clipped = ratio.clamp(1 - cfg.epsilon, 1 + cfg.epsilon_upper)
    if cfg.delta is not None:  # TRL's two-sided clipping: the unclipped term's ratio capped too
        ratio = ratio.clamp(max=cfg.delta)
    return -torch.min(ratio * advantages, clipped * advantages)


def grpo_loss(logps: torch.Tensor, batch: GrpoBatch, cfg: GrpoConfig,
              totals: Totals) -> tuple[torch.Tensor, torch.Tensor]:
    """(the micro-batch's share of the global batch's loss, the sum of its tokens' KL estimates). ``logps``
    ``[M]`` the policy's, with their graph; the ratio is to ``batch.old`` (without them, to ``logps`` detached:
    1, the old policy is this one)."""
    # TRL's completion mask: 0 on a truncated completion's tokens with mask_truncated_completions, else 1 (exact)
    mask = batch.active[batch.sequence].to(logps.dtype)
    ratio = importance_ratio(logps, batch, cfg, mask)
    per_token = token_terms(logps, ratio, batch.advantages[batch.sequence], cfg)
    kl = torch.zeros((), device=logps.device)
    if cfg.beta > 0:
        delta = batch.reference - logps
        per_token_kl = torch.exp(delta) - delta - 1  # k3: unbiased, never negative
        per_token = per_token + cfg.beta * per_token_kl
        kl = (per_token_kl.detach() * mask).sum()
    per_token = per_token * mask
    if cfg.loss_type in ("grpo", "sapo"):  # a masked sequence's mean is 0, and it still counts (TRL's .mean())
        sums = torch.zeros(len(batch.lengths), device=logps.device).index_add(0, batch.sequence, per_token)
        return (sums / batch.lengths).sum() / totals.sequences, kl
    if cfg.loss_type in ("dapo", "cispo"):  # totals.tokens: every completion token, masked ones too
        return per_token.sum() / max(totals.tokens, 1.0), kl
    if cfg.loss_type == "luspo":
        # TRL's mean over sequences of the (sequence-level) term times the sequence's unmasked length: the term
        # summed over its unmasked tokens is that product
        return per_token.sum() / totals.sequences, kl
    if cfg.loss_type == "bnpo":
        # TRL's: the micro-batch's token mean, averaged over every rank's micro-batches (its division by the
        # accumulation, DDP's average): this one's share of that average is its S of the global batch's completions
        return per_token.sum() / mask.sum().clamp(min=1.0) * (len(batch.lengths) / totals.sequences), kl
    return per_token.sum() / (totals.sequences * cfg.max_completion_length), kl  # dr_grpo


@torch.no_grad()
def clipped_tokens(logps: torch.Tensor, batch: GrpoBatch, cfg: GrpoConfig) -> torch.Tensor:
    """``[3]`` the micro-batch's completion tokens whose ratio the clip holds (TRL's): below 1 − ``epsilon`` with
    a negative advantage, above 1 + ``epsilon_high`` with a positive one, either (a sequence-level ratio: each of
    its tokens; a masked completion's: none). ``logps`` ``[M]`` the policy's; none without ``batch.old`` (the
    ratio is 1). ``cispo``: those whose ratio is above its cap ``epsilon_high`` with a positive advantage, as
    high and region (TRL's ``cispo_clip_ratio``; a ratio of 1 is above a cap below 1); ``sapo``: none."""
    if cfg.loss_type == "sapo" or not (len(batch.old) or cfg.loss_type == "cispo"):
        return torch.zeros(3, device=logps.device)
    active = batch.active[batch.sequence]
    ratio = importance_ratio(logps.detach(), batch, cfg, active.to(logps.dtype))
    advantages = batch.advantages[batch.sequence]
    if cfg.loss_type == "cispo":
        capped = ((ratio > cfg.epsilon_upper) & (advantages > 0) & active).sum()
        return torch.stack([torch.zeros_like(capped), capped, capped]).float()
    low = (ratio < 1 - cfg.epsilon) & (advantages < 0) & active
    high = (ratio > 1 + cfg.epsilon_upper) & (advantages > 0) & active
    return torch.stack([low.sum(), high.sum(), (low | high).sum()]).float()


def unscored_warning(per_source: torch.Tensor, rows: np.ndarray, names: list[str]) -> str | None:
    """What to warn of when every reward source returned None for some completions (``per_source`` ``[N, S]``,
    NaN for None), as TRL warns: they get a reward of 0, and a group of them no gradient, which a run would
    otherwise show only as a flat reward curve (``exact_match`` on a dataset without a ``solution`` column ...).
    None when every completion has a reward."""
    unscored = per_source.isnan().all(dim=1)
    if not bool(unscored.any()):
        return None
    first = int(rows[int(unscored.nonzero()[0, 0])])
    return (f"every reward source ({', '.join(names)}) returned None for {int(unscored.sum())} of {len(unscored)} "
            f"completions (the first of prompt row {first}): they get a reward of 0, and a group of them no "
            f"gradient. Check that the reward functions find the columns they read (exact_match: 'solution', "
            f"matches_pattern: 'pattern', length_target: 'target_length'); warned once a run")


def advantages(rewards: torch.Tensor, generations: int, scale: str,
               batch_std: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, the std each was scaled by, whether its group's std is 0) of ``[n]`` rewards in groups of
    ``generations`` consecutive ones, TRL's formula; ``batch_std``: the global batch's (``scale`` ``"batch"``,
    :func:`batch_std`). Computed in float64, returned in float32: a float32 mean of equal rewards can round off
    them, and that rounding divided by a zero std + 1e-4 would be an advantage where there is no signal; in
    float64 the mean of equal float32 rewards is exactly their value."""
    grouped = rewards.double().view(-1, generations)
    mean = grouped.mean(dim=1).repeat_interleave(generations)
    group_std = grouped.std(dim=1).repeat_interleave(generations)  # torch's std is never below 0
    std = torch.full_like(mean, batch_std) if scale == "batch" else group_std
    # By the group's std under every scaling (TRL takes the batch's under "batch", which says only whether the whole
    # batch is flat): a group of equal rewards has no signal however the advantages are scaled.
    zero = torch.isclose(group_std, torch.zeros_like(group_std))
    out = rewards.double() - mean
    return (out if scale == "none" else out / (std + EPSILON)).float(), std.float(), zero


def batch_std(rewards: torch.Tensor, count: float, total: float, device: torch.device, group=None) -> float:
    """The unbiased std of the global batch's rewards (``scale_rewards`` ``"batch"``): ``rewards`` ``[n]`` this
    rank's, ``count`` and ``total`` the global batch's number and sum. Two passes: the squared deviations from the
    global mean are summed (an all-reduce under torchrun, over ``group``: None the world, under tensor parallelism the
    data-parallel ranks'). The one-pass ``(Σx² − (Σx)²/n) / (n − 1)`` rounds below 0 for equal rewards, and a
    negative variance's ``** 0.5`` is a complex number; here equal rewards give 0."""
    mean = total / count
    squares = ((rewards.double() - mean) ** 2).sum().reshape(1).to(device)
    if is_distributed():
        torch.distributed.all_reduce(squares, group=group)
    return (squares.item() / max(count - 1, 1)) ** 0.5


class Generation(NamedTuple):
    """What the ``num_iterations`` steps from ``step`` (the step that sampled it) train on, this rank's share:
    ``rows`` ``[n]`` each completion's prompt (its index in the split), the ``completions``, their ``advantages``
    ``[n]``, the micro-batches (with the reference's log-probs and, after its first step, the old policy's), the
    global batch's :class:`Totals` and ``tokens`` (its prompts' and completions')."""

    step: int
    rows: np.ndarray
    completions: list[np.ndarray]
    advantages: torch.Tensor
    batches: list[GrpoBatch]
    totals: Totals
    tokens: int


class GrpoData:
    """The prompts of a GRPO run, its sampler, rewards, loss and metrics, through the trainer's hooks of an
    objective computed by the data (``preference``): :meth:`start` once the model is built (and a checkpoint
    loaded), :meth:`micro_batches` (which samples and scores the step's completions), :meth:`loss` per
    micro-batch, :meth:`step_stats` / :meth:`record_step` around the step's all-reduce, :meth:`window_metrics`
    per record, :meth:`evaluate`. The position, the sampler's step and the log window are the data state."""

    preference = True  # the trainer's hooks of an objective the data computes (DPO's)
    grpo = True
    masked = False
    model_class = None  # RetNetForCausalLM
    _permutation = PackedData._permutation
    block_rows = PackedData.block_rows

    def __init__(self, train: Prompts, val: Prompts, tokenizer, encoder: PromptEncoder, *, seed: int,
                 micro_batch: int, global_batch: int, rank: int, world_size: int, dataset: str = ""):
        self.train, self.val, self.tokenizer, self.encoder, self.dataset = train, val, tokenizer, encoder, dataset
        self.seed, self.micro_batch, self.global_batch = seed, micro_batch, global_batch
        self.rank, self.world_size = rank, world_size
        self.consumed = 0  # global prompts drawn: the data position
        self.steps = 0  # steps sampled: the sampler's seed word
        self._perm_epoch, self._perm = -1, None
        self.hub_fingerprint: str | None = None
        self.step_tokens: int | None = None  # the tokens of the last step's global batch (prompts and completions)
        self.step_head_tokens: int | None = None  # its completions' tokens, whose logits are computed (the MFU's)
        self.step_reference = False  # whether the step ran the reference's forward over them (a sampling step's)
        self.longest_prompt = max(len(t) for t in [*train.tokens, *val.tokens])
        self.seq_len = self.longest_prompt  # the longest sequence, with its completion from start() on
        self.stops = [tokenizer.eos_token_id]  # the ids that end a completion; the model's added at start()
        self.vocab = vocab_bound(tokenizer)  # the ids the sampler draws from (a padded vocabulary's rows: none)
        self.reference_fingerprint: str | None = None
        self._prompts_sha256: str | None = None  # prompts_digest of train and val, once computed (:meth:`prompts_sha256`)
        self._window: list[float] | None = None
        self._step: torch.Tensor | None = None
        self._totals: Totals | None = None
        # The generation whose num_iterations steps are not all taken, and (a resume) its checkpointed form
        self._generation: Generation | None = None
        self._saved_generation: dict[str, Any] | None = None
        self._first: int | None = None  # the micro-batch whose old log-probs loss() takes next
        self.all_ranks = False  # FSDP: every rank samples as many forwards as the others
        # Under tensor parallelism: the data-parallel ranks' process group (mesh["dp"]), which the generation's
        # totals and the evaluation's sums are all-reduced over, and the tensor-parallel group's (mesh["tp"]), whose
        # ranks sample the same completions (its first rank's tokens and rewards broadcast). None: the world, none.
        self.group = self.tp_group = None
        # Under context parallelism: the group's ranks, which split its prompts to sample, then each hold every
        # completion, each row split along time across them for the log-prob passes (None: no split)
        self.context: ContextGroup | None = None
        self._warned_unscored = False  # unscored_warning's, once a run

    def model_overrides(self, model: ModelConfig, init_from: Path | None, lora_dropout: float) -> dict[str, Any]:
        """None: the policy keeps ``model.init_from``'s settings (TRL's GRPOConfig ``disable_dropout`` is off)."""
        return {}

    def sequence_length(self, cfg: GrpoConfig) -> int:
        """The longest sequence a step trains on, the longest prompt and the longest completion (``max_new_tokens``
        of :attr:`~retnet.train.config.GrpoConfig.sampling`): what the trainer's FLOPs per token read, before
        :meth:`start`."""
        return self.longest_prompt + cfg.sampling["max_new_tokens"]

    def val_summary(self, record: dict[str, float]) -> str:
        return f"reward {record['val_reward']:.4f}, reward_std {record['val_reward_std']:.4f}"

    def start(self, trainer) -> None:
        """The reward sources and the reference policy, from the trainer's model and settings; one log line."""
        cfg = self.cfg = trainer.cfg.grpo
        self.device, self.autocast, self.policy, self.peft = trainer.device, trainer.autocast, trainer.raw_model, \
            trainer.peft_model
        self.all_ranks = trainer.fsdp
        if trainer.tp_mesh is not None:
            self.group, self.tp_group = trainer.tp_mesh["dp"].get_group(), trainer.tp_mesh["tp"].get_group()
        share, rest = divmod(self.global_batch, self.world_size)
        if rest or share % cfg.num_generations:  # the config refused it when torchrun set WORLD_SIZE
            raise ConfigError(f"train.global_batch_size ({self.global_batch}) must split into whole groups of "
                              f"grpo.num_generations ({cfg.num_generations}) on each of the {self.world_size} ranks")
        if trainer.cp_size > 1:
            from retnet.model.context_parallel import ContextGroup

            if share // cfg.num_generations % trainer.cp_size:  # likewise
                raise ConfigError(f"train.global_batch_size ({self.global_batch}) must split into whole groups of "
                                  f"grpo.num_generations ({cfg.num_generations}) on each of the "
                                  f"{self.world_size * trainer.cp_size} ranks (the pieces of a context-parallel "
                                  f"group sample a share each)")
            self.context = ContextGroup(trainer.cp_rank, trainer.cp_size, trainer.cp_group)
            # The generation's totals and the evaluation's sums: every rank of a context-parallel group holds its
            # group's, so they are summed over the ranks holding the same piece (and slice) in each group, once a
            # group (mesh["dp"] would count each C times). A collective of every rank, here at the same point.
            self.group = data_parallel_group(trainer.rank, trainer.world_size, trainer.cfg.train.group_size)
        self.stops = stop_tokens(self.tokenizer, getattr(self.policy, "generation_config", None))
        self.sources = RewardSources(cfg, self.tokenizer, self.encoder, self.device, self.autocast, self.stops)
        self.sources.state.max_steps = trainer.cfg.train.steps
        self.seq_len = self.sequence_length(cfg)
        self.reference = None
        what = "none (grpo.beta 0)"
        if cfg.beta > 0 and self.peft is not None:
            what = "the policy with its LoRA adapters disabled"
        elif cfg.beta > 0:
            self.reference = self._reference(trainer._init_from_dir(), trainer.model_config)
            what = f"model.init_from's weights, frozen ({trainer.cfg.model.init_from})"
            if trainer.tp_mesh is not None:  # split as the policy is: its forwards are the group's collectives
                from retnet.model.tensor_parallel import parallelize_retnet

                parallelize_retnet(self.reference, trainer.tp_mesh["tp"], vocab_parallel=trainer.cfg.train.vocab_parallel,
                                   sequence_parallel=trainer.cfg.train.sequence_parallel)
                what += f", split across the {trainer.tp_size} tensor-parallel ranks"
            if trainer.fsdp:  # sharded as the policy is: its forwards are collectives in the same order
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if (
                    trainer.cfg.train.mixed_precision == "bf16" and self.device.type == "cuda") else \
                    MixedPrecisionPolicy()
                mesh = None if trainer.tp_mesh is None else trainer.tp_mesh["dp"]  # over the data-parallel ranks
                for layer in self.reference.model.layers:
                    fully_shard(layer, mesh=mesh, mp_policy=policy)
                fully_shard(self.reference, mesh=mesh, mp_policy=policy)
                what += ", sharded"
        sources = 2 * len(self.sources.names)
        if self._window is None:
            self._window = [0.0] * (len(SUMS) + sources)
        elif len(self._window) == _SUMS_BEFORE_CLIP + sources:  # a checkpoint's from before the clip sums
            old = self._window
            steps = old[0] / self.global_batch  # one generation a step then
            self._window = [*old[:_SUMS_BEFORE_CLIP], 0.0, 0.0, 0.0, 0.0, 0.0, steps, *old[_SUMS_BEFORE_CLIP:]]
        weights = ", ".join(f"{n} ×{w:g}" for n, w in zip(self.sources.names, self.sources.weights.tolist()))
        drawn = cfg.sampling
        region = {"cispo": f"ratio cap {cfg.epsilon_upper:g}",
                  "sapo": f"soft gate τ+ {cfg.sapo_temperature_pos:g}, τ- {cfg.sapo_temperature_neg:g}"}.get(
            cfg.loss_type, f"clip [{1 - cfg.epsilon:g}, {1 + cfg.epsilon_upper:g}]")
        logger.info("GRPO: %d prompts × %d generations = %d completions a generation (%d groups per rank), %d "
                    "step(s) on each (%s), at most %d tokens each (temperature %g, top_p %g%s, stop ids "
                    "%s); rewards: %s; advantages %s; loss %s%s, beta %g, reference: %s",
                    self.global_batch // cfg.num_generations, cfg.num_generations, self.global_batch,
                    self.global_batch // cfg.num_generations // self.world_size // (
                        1 if self.context is None else self.context.size), cfg.num_iterations, region,
                    drawn["max_new_tokens"], drawn["temperature"], drawn["top_p"],
                    (f", top_k {drawn['top_k']}" if drawn["top_k"] else "")
                    + (f", min_p {drawn['min_p']:g}" if drawn["min_p"] else "")
                    + (f", repetition_penalty {drawn['repetition_penalty']:g}"
                       if drawn["repetition_penalty"] != 1.0 else ""),
                    self.stops, weights, "not scaled (grpo.scale_rewards 'none')" if cfg.scale_rewards == "none" else
                    f"scaled by the {cfg.scale_rewards} std", cfg.loss_type,
                    " (truncated completions masked)" if cfg.mask_truncated_completions else "", cfg.beta, what)

    def _reference(self, init_from: Path, config) -> torch.nn.Module:
        """``init_from``'s model, frozen; a ConfigError when a resume finds other weights there than its run's."""
        from retnet.model import RetNetForCausalLM
        from retnet.train.lora import base_fingerprint

        fingerprint = base_fingerprint(init_from, "model.init_from")
        if self.reference_fingerprint not in (None, fingerprint):
            raise ConfigError(f"model.init_from {str(init_from)!r}: its weights are not those the checkpoint's run "
                              f"started from, its KL reference (grpo.beta > 0): restore that model, or start in "
                              f"another train.output_dir")
        self.reference_fingerprint = fingerprint
        model = RetNetForCausalLM.from_pretrained(str(init_from), config=config, dtype=torch.float32,
                                                  local_files_only=True)
        return model.to(self.device).eval().requires_grad_(False)

    # -- rollouts ---------------------------------------------------------------------------------------
    def _set_trainer_state(self) -> None:
        """TRL's ``trainer_state`` the reward functions get, as TRL's is when it samples: the optimizer steps taken
        (a generation for step N + 1, or an evaluation after step N: N) and the epochs of prompts drawn before."""
        self.sources.state.global_step = self.steps
        self.sources.state.epoch = self.consumed / len(self.train)

    def _rollout(self, split: Prompts, ids: np.ndarray, seeds: list[tuple[int, ...]],
                 step: int = -1) -> tuple[Generation, torch.Tensor]:
        """This rank's groups of prompts ``ids`` sampled and scored: the :class:`Generation` of ``step`` (its
        micro-batches of ``micro_batch`` completions with the reference's log-probs; the old policy's are added by
        :meth:`loss` at the generation's first step) and its metric sums (a collective of the data-parallel ranks:
        the global :class:`Totals`). Under context parallelism the group's ranks sample and score a share of
        ``ids`` each (:meth:`_context_share`), then all-gather them: each holds every completion of its group."""
        cfg, generations = self.cfg, self.cfg.num_generations
        own, real = (np.arange(len(ids)), len(ids)) if self.context is None else self._context_share(len(ids))
        completions, clipped = self._sample(split, ids[own], [seeds[i] for i in own])
        # The padding copies (an evaluation's last shares) are sampled in step with the other pieces but not
        # scored: a judge's calls and a reward function's side effects once a completion, as in one process
        per_source = self._score(split, np.repeat(ids[own[:real]], generations), completions[:real * generations])
        if self.context is not None:
            shares = [None] * self.context.size
            torch.distributed.all_gather_object(shares, (completions, clipped, per_source), group=self.context.group)
            count = len(ids) * generations  # (the shares' padding, at their end, dropped)
            completions = [c for share in shares for c in share[0]][:count]
            clipped = [c for share in shares for c in share[1]][:count]
            per_source = torch.cat([share[2] for share in shares])[:count]
        rows = np.repeat(ids, generations)
        warning = None if self._warned_unscored else unscored_warning(per_source, rows, self.sources.names)
        if warning:
            self._warned_unscored = True
            logger.warning("%s", warning)
        rewards = torch.nansum(per_source * self.sources.weights, dim=1)
        if not bool(rewards.isfinite().all()):  # each source's finite, the weighted sum past float32's range
            first = int((~rewards.isfinite()).nonzero()[0, 0])
            raise RuntimeError(f"the weighted rewards of completion {first} are not finite in float32: rewards "
                               f"{per_source[first].tolist()} × grpo.reward_weights {self.sources.weights.tolist()}")
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
        counted = lengths * torch.from_numpy(self._active(completions))  # the tokens the loss is computed on
        prompt_tokens = float(sum(len(split.tokens[i]) for i in rows))
        totals = torch.tensor([len(rows), lengths.sum(), prompt_tokens, rewards.double().sum()], dtype=torch.float64,
                              device=self.device)
        if is_distributed():
            torch.distributed.all_reduce(totals, group=self.group)
        n, tokens, prompt_tokens, total = totals.tolist()
        spread = batch_std(rewards, n, total, self.device, self.group) if cfg.scale_rewards == "batch" else None
        advantage, std, zero = advantages(rewards, generations, cfg.scale_rewards, spread)
        present = ~per_source.isnan()
        sums = torch.tensor([len(rows), rewards.sum().item(), std.sum().item(), lengths.sum().item(), sum(clipped),
                             zero.sum().item(), 0.0, counted.sum().item()])
        sums = torch.cat([sums, torch.zeros(len(SUMS) - len(sums))])  # the loss's: kl, clipped tokens, steps
        sums = torch.cat([sums, torch.stack([per_source.nan_to_num().sum(0), present.sum(0)], 1).flatten()])
        batches = self._pack(split, rows, completions, advantage)
        if cfg.beta > 0:
            batches = [batch._replace(reference=self._reference_logps(batch)) for batch in batches]
        # dapo's and cispo's token count is every completion token, masked ones too (TRL's num_items_in_batch is
        # counted before mask_truncated_completions zeroes their mask)
        generation = Generation(step, rows, completions, advantage, batches, Totals(n, tokens),
                                int(tokens + prompt_tokens))
        return generation, sums.float().to(self.device)

    def _context_share(self, count: int) -> tuple[np.ndarray, int]:
        """Which of ``count`` prompts this rank of a context-parallel group samples, and how many of them lead
        before its padding: a contiguous share of ceil(``count`` / C), the last shares padded with the last prompt
        (whose completions the gather drops), so that every rank runs as many sampling forwards as the others
        (under FSDP, or tensor parallelism beside it, each is a collective). Training steps' shares divide (the
        config refuses others); an evaluation's may not."""
        size = -(-count // self.context.size)
        first = self.context.rank * size
        return np.minimum(np.arange(first, first + size), count - 1), min(max(count - first, 0), size)

    def _sample(self, split: Prompts, ids: np.ndarray,
                seeds: list[tuple[int, ...]]) -> tuple[list[np.ndarray], list[bool]]:
        """The completions of the prompts ``ids`` of ``split`` (``num_generations`` each, consecutive), drawn from
        the uniforms of ``seeds`` (one per prompt) by the policy in eval mode, and whether each was clipped."""
        generations, drawn = self.cfg.num_generations, self.cfg.sampling
        completions, clipped = [], []
        training = self.policy.training
        self.policy.eval()
        try:
            with gathered_weights(self.policy):
                groups = max(1, self.micro_batch // generations)  # sampled together
                for lo in range(0, len(ids), groups):
                    noise = torch.cat([uniforms(words, generations, drawn["max_new_tokens"])
                                       for words in seeds[lo:lo + groups]]).to(self.device)
                    with self.autocast:
                        done, cut = sample(self.policy, [split.tokens[i] for i in ids[lo:lo + groups]], noise,
                                           eos=self.stops, temperature=drawn["temperature"], top_p=drawn["top_p"],
                                           top_k=drawn["top_k"], min_p=drawn["min_p"],
                                           repetition_penalty=drawn["repetition_penalty"], all_ranks=self.all_ranks,
                                           group=self.tp_group, vocab=self.vocab)
                    completions += done
                    clipped += cut
        finally:
            self.policy.train(training)
        return completions, clipped

    def _score(self, split: Prompts, rows: np.ndarray, completions: list[np.ndarray]) -> torch.Tensor:
        """``[n, sources]`` on the CPU: each completion's value from each reward source (NaN for None)."""
        if not len(rows):  # a piece holding padding alone (its tensor-parallel ranks alike): nothing to call
            return torch.zeros((0, len(self.sources.names)))
        if self.tp_group is None:
            return self.sources(split, rows, completions)
        # Scored by the group's first rank alone, its values broadcast: a judge's or an API's calls (and their side
        # effects) once a group rather than T times, and a reward function drawing random numbers from the per-rank
        # seeded RNGs cannot part the ranks.
        first = torch.distributed.get_rank(self.tp_group) == 0
        shared = self.sources(split, rows, completions).to(self.device) if first else \
            torch.empty((len(rows), len(self.sources.names)), dtype=torch.float32, device=self.device)
        torch.distributed.broadcast(shared, group=self.tp_group, group_src=0)
        return shared.cpu()

    def _pack(self, split: Prompts, rows: np.ndarray, completions: list[np.ndarray],
              advantage: torch.Tensor) -> list[GrpoBatch]:
        """The micro-batches of ``micro_batch`` completions of the prompts ``rows`` of ``split``, on the device."""
        active = torch.from_numpy(self._active(completions))
        return [pack([split.tokens[i] for i in rows[lo:lo + self.micro_batch]], completions[lo:lo + self.micro_batch],
                     advantage[lo:lo + self.micro_batch], active[lo:lo + self.micro_batch]).to(self.device)
                for lo in range(0, len(rows), self.micro_batch)]

    def _active(self, completions: list[np.ndarray]) -> np.ndarray:
        """``[n]`` bool: whether each completion's tokens count in the loss: all, or with
        ``grpo.mask_truncated_completions`` (TRL's) those that end with a stop token. Derived from the ids alone,
        so that a resume within a generation masks the same ones."""
        if not self.cfg.mask_truncated_completions:
            return np.ones(len(completions), dtype=bool)
        return finished(completions, self.stops)

    def _token_logps(self, model: torch.nn.Module, batch: GrpoBatch) -> torch.Tensor:
        """:func:`token_logps` at the sampling temperature, each row split along time under context parallelism
        (without it, called as before it took the split: the tests' recording stand-in keeps that signature)."""
        if self.context is None:
            return token_logps(model, batch, self.cfg.temperature)
        return token_logps(model, batch, self.cfg.temperature, self.context)

    @torch.no_grad()
    def _reference_logps(self, batch: GrpoBatch) -> torch.Tensor:
        with self.autocast:
            if self.reference is not None:
                return self._token_logps(self.reference, batch)
            training = self.policy.training
            self.policy.eval()  # as the policy samples: the adapters' dropout off, as the reference's is
            try:
                with self.peft.disable_adapter():
                    return self._token_logps(self.policy, batch)
            finally:
                self.policy.train(training)

    # -- training ---------------------------------------------------------------------------------------
    def micro_batches(self, accum: int) -> list[GrpoBatch]:
        """This rank's ``accum`` micro-batches of ``micro_batch`` completions for the next step: sampled now at
        every ``num_iterations``-th step (seeded by that step's number, TRL's counting: each of the iterations is
        one optimizer step), else those of the generation still in use. :meth:`loss` is then called once on each,
        in order (the trainer's accumulation)."""
        iterations = self.cfg.num_iterations
        self._first = None
        self.step_reference = self.steps % iterations == 0 and self.cfg.beta > 0
        if self.steps % iterations == 0:
            prompts = self.global_batch // self.cfg.num_generations
            ids = self.block_rows(self.consumed, prompts)
            positions = range(self.consumed, self.consumed + prompts)
            share = prompts // self.world_size
            mine = slice(self.rank * share, (self.rank + 1) * share)
            seeds = [(self.seed, self.steps, position) for position in positions[mine]]
            self._set_trainer_state()
            self.consumed += prompts
            generation, self._step = self._rollout(self.train, ids[mine], seeds, self.steps)
            if iterations > 1:  # the old policy's log-probs: this step's training forwards', taken by loss()
                self._first = 0
        else:
            generation = self._generation or self._restore(self._saved_generation)
            self._step = torch.zeros(len(SUMS) + 2 * len(self.sources.names), device=self.device)
            active = self._active(generation.completions)
            self._step[SUMS.index("tokens")] = float(sum(len(c) for c, a in zip(generation.completions, active) if a))
        self.steps += 1
        self._generation = generation if self.steps - generation.step < iterations else None
        self._saved_generation = None
        self._totals, self.step_tokens = generation.totals, generation.tokens
        self.step_head_tokens = int(generation.totals.tokens)
        if len(generation.batches) != accum:  # load_state_dict refuses another global batch; not an assert: -O
            raise RuntimeError(f"GRPO step {self.steps}: {len(generation.batches)} micro-batches for an "
                               f"accumulation of {accum}")
        return generation.batches

    def _restore(self, saved: dict[str, Any] | None) -> Generation:
        """The :class:`Generation` a checkpoint taken between its steps holds (:meth:`state_dict`)."""
        if saved is None:  # load_state_dict refuses a checkpoint that would need one and lacks it
            raise RuntimeError(f"GRPO step {self.steps}: within a generation's grpo.num_iterations "
                               f"({self.cfg.num_iterations}) steps, and no generation to train on")
        completions = np.split(saved["completions"], np.cumsum(saved["lengths"])[:-1])
        advantage = saved["advantages"]
        batches = self._pack(self.train, saved["rows"], completions, advantage)
        sizes = [len(batch.labels) for batch in batches]
        for name in ("old", "reference"):
            if len(saved[name]):
                parts = saved[name].to(self.device).split(sizes)
                batches = [batch._replace(**{name: part}) for batch, part in zip(batches, parts, strict=True)]
        return Generation(int(saved["step"]), saved["rows"], completions, advantage, batches,
                          Totals(*saved["totals"]), int(saved["tokens"]))

    def loss(self, model: torch.nn.Module, batch: GrpoBatch) -> torch.Tensor:
        """The micro-batch's share of the global batch's loss, times the accumulation count and the world size:
        the trainer divides by the one and DDP averages over the other, so the gradients add up to the global
        batch's and the logged loss (the ranks' sum over the world size) is its loss. Under context parallelism each
        rank of a group computes the micro-batch's whole loss from every token's log-prob (:func:`token_logps`) and
        returns its 1/C share: the shares add up to the loss, and the backward of the log-probs' sum hands each
        piece the whole loss's gradient of its tokens (the metrics, whole on every rank, count once a group)."""
        logps = self._token_logps(model, batch)
        if self._first is not None:
            # A generation's first step with num_iterations > 1: the old policy is the model as it is now, before
            # this step's update, in train mode (its dropout as the later steps', TRL's). batch has no old yet:
            # ρ is exactly 1, as with num_iterations 1, and no extra forward computes old.
            batches = self._generation.batches
            batches[self._first] = batches[self._first]._replace(old=logps.detach())
            self._first = self._first + 1 if self._first + 1 < len(batches) else None
        part, kl = grpo_loss(logps, batch, self.cfg, self._totals)
        self._step[SUMS.index("kl")] += kl
        if len(batch.old) or self.cfg.loss_type == "cispo":  # else the ratio is 1: nothing clipped
            low = SUMS.index("clip_low")
            self._step[low:low + 3] += clipped_tokens(logps, batch, self.cfg)
        scale = self.global_batch // self.micro_batch  # accumulation count × world size
        return part * scale if self.context is None else part * scale / self.context.size

    def step_stats(self) -> torch.Tensor:
        """The step's sums, then this rank's shares of clipped tokens (low, then high) at its place among
        ``world_size`` zeros each: the sum all-reduce gives every rank's, for TRL's min and max over ranks."""
        sums, self._step = self._step, None
        tokens = sums[SUMS.index("tokens")].clamp(min=1.0)
        shares = torch.zeros(2, self.world_size, device=sums.device)
        shares[:, self.rank] = sums[[SUMS.index("clip_low"), SUMS.index("clip_high")]] / tokens
        return torch.cat([sums, shares.flatten()])

    def record_step(self, sums: torch.Tensor) -> None:
        values = sums.tolist()
        step, shares = values[:len(self._window)], values[len(self._window):]
        step[SUMS.index("clip_low_min")] = min(shares[:self.world_size])
        step[SUMS.index("clip_high_max")] = max(shares[self.world_size:])
        step[SUMS.index("steps")] = 1.0  # (each rank's 0 summed)
        self._window = [a + b for a, b in zip(self._window, step, strict=True)]

    def _means(self, sums: list[float], prefix: str = "") -> dict[str, float]:
        """TRL's metric names and their means over the completions (``kl`` over the tokens) of ``sums``."""
        value = dict(zip(SUMS, sums))
        out = {}
        if value["completions"]:  # a window of steps on an earlier generation has none (TRL logs none either)
            count = value["completions"]
            out = {"reward": value["reward"] / count, "reward_std": value["reward_std"] / count}
            for number, name in enumerate(self.sources.names):
                total, present = sums[len(SUMS) + 2 * number:len(SUMS) + 2 * number + 2]
                if present:  # TRL's nanmean: only the completions the function applies to
                    out[f"rewards/{name}/mean"] = total / present
            out.update({"completions/mean_length": value["length"] / count,
                        "completions/clipped_ratio": value["clipped"] / count,
                        "frac_reward_zero_std": value["zero_std"] / count})
        tokens = max(value["tokens"], 1.0)
        if self.cfg.beta > 0:
            out["kl"] = value["kl"] / tokens
        if value["steps"] and self.cfg.loss_type == "cispo":  # TRL's one figure: ratios above the cap
            out["cispo_clip_ratio"] = value["clip_high"] / tokens
        elif value["steps"] and self.cfg.loss_type != "sapo":  # training steps (evaluation: its ratio is 1)
            out.update({"clip_ratio/low_mean": value["clip_low"] / tokens,
                        "clip_ratio/low_min": value["clip_low_min"] / value["steps"],
                        "clip_ratio/high_mean": value["clip_high"] / tokens,
                        "clip_ratio/high_max": value["clip_high_max"] / value["steps"],
                        "clip_ratio/region_mean": value["clip_region"] / tokens})
        return {f"{prefix}{name}": v for name, v in out.items()}

    def window_metrics(self) -> dict[str, float]:
        """The metrics' means over the completions since the last record (TRL's names), and a fresh window."""
        if not self._window or not self._window[SUMS.index("steps")]:
            return {}
        means = self._means(self._window)
        self._window = [0.0] * len(self._window)
        return means

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, max_prompts: int) -> dict[str, float]:
        """``val_loss`` and ``val_<metric>`` over the completions sampled for ``max_prompts`` validation prompts
        (evenly spaced over the split, rounded down to a multiple of the world size; ``num_generations`` each,
        seeded by the prompt alone: every evaluation draws the same uniforms)."""
        total = min(max_prompts, len(self.val))
        total = max(total - total % self.world_size, self.world_size)
        chosen = np.linspace(0, len(self.val) - 1, total).round().astype(np.int64)
        mine = chosen[self.rank::self.world_size]
        self._set_trainer_state()
        generation, sums = self._rollout(self.val, mine, [(self.seed, VAL_STREAM, int(i)) for i in mine])
        batches, totals = generation.batches, generation.totals
        loss = torch.zeros(1, device=self.device)
        training = self.policy.training
        self.policy.eval()
        try:
            for batch in batches:
                with self.autocast:
                    logps = self._token_logps(self.policy, batch)
                    part, kl = grpo_loss(logps, batch, self.cfg, totals)
                loss += part.float()
                sums[SUMS.index("kl")] += kl
        finally:
            self.policy.train(training)
        stats = torch.cat([loss, sums])
        # over the data-parallel ranks: a tensor-parallel group's score the same prompts, and every rank of a
        # context-parallel group holds all of its group's
        if is_distributed():
            torch.distributed.all_reduce(stats, group=self.group)
        return {"val_loss": stats[0].item(), **self._means(stats[1:].tolist(), "val_")}

    # -- position ---------------------------------------------------------------------------------------
    def prompts_sha256(self) -> str:
        """:func:`~retnet.train.prompts.prompts_digest` of the train and validation prompts, computed once."""
        if self._prompts_sha256 is None:
            self._prompts_sha256 = prompts_digest([self.train, self.val])
        return self._prompts_sha256

    def state_dict(self) -> dict[str, Any]:
        """The position, the sampler's step, the log window and, between the ``num_iterations`` steps of a
        generation, this rank's share of it: prompt rows, completion ids, advantages and the old and reference
        log-probs (8 bytes per completion token, 12 with ``beta`` > 0), from which :meth:`_restore` rebuilds its
        micro-batches."""
        state = {"kind": "prompts", "consumed": self.consumed, "steps": self.steps,
                 "window": list(self._window or []), "reference": self.reference_fingerprint,
                 "prompts": {"sha256": self.prompts_sha256(), "train": len(self.train), "val": len(self.val)}}
        generation = self._generation
        if generation is not None:
            state["generation"] = {
                "step": generation.step, "world_size": self.world_size, "rows": generation.rows,
                "completions": np.concatenate(generation.completions).astype(np.int32),
                "lengths": np.array([len(c) for c in generation.completions], dtype=np.int64),
                "advantages": generation.advantages.cpu(),
                "old": torch.cat([b.old for b in generation.batches]).cpu(),
                "reference": torch.cat([b.reference for b in generation.batches]).cpu(),
                "totals": tuple(generation.totals), "tokens": generation.tokens}
        elif self._saved_generation is not None:  # loaded, not yet trained on
            state["generation"] = self._saved_generation
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "prompts":
            raise ValueError(f"data state of kind {state.get('kind')!r} cannot resume a GRPO run")
        self.consumed, self.steps = int(state["consumed"]), int(state["steps"])
        self._window = [float(v) for v in state["window"]] or None
        self.reference_fingerprint = state.get("reference")
        self._generation, self._saved_generation = None, state.get("generation")
        if self._saved_generation is not None:
            self._check_generation(self._saved_generation)
        self._check_prompts(state.get("prompts"))  # (after: the settings' refusals name what to set)

    def _check_generation(self, saved: dict[str, Any]) -> None:
        """A ConfigError when this run cannot go on with the generation a checkpoint taken within it holds."""
        within = f"the checkpoint at GRPO step {self.steps} is within the grpo.num_iterations steps on the " \
                 f"generation of step {saved['step']}"
        between = "or from a checkpoint between generations (at a step that is a multiple of grpo.num_iterations)"
        if saved["world_size"] != self.world_size:
            # each rank holds its share of the generation's completions: another split has no exact mapping
            # (data-parallel ranks: under tensor parallelism a group's ranks share one)
            raise ConfigError(f"{within}, which its {saved['world_size']} data-parallel rank(s) hold one share each: "
                              f"resume it with {saved['world_size']} data-parallel rank(s) (world size / "
                              f"train.tensor_parallel), {between}")
        sampled = int(saved["totals"][0])  # the generation's completions, every rank's: its global batch
        if sampled != self.global_batch:
            # its steps train on the completions sampled, whose loss is normalized over that global batch: another
            # size would need other completions (and another accumulation count than the micro-batches held)
            raise ConfigError(f"{within}, sampled with train.global_batch_size {sampled}; this run has "
                              f"train.global_batch_size {self.global_batch}: resume it with "
                              f"train.global_batch_size={sampled}, {between}")

    def _check_prompts(self, saved: dict[str, Any] | None) -> None:
        """A ConfigError when the data now gives other prompts than the checkpoint's run was trained on (the same
        path edited in place: data_changes compares only the settings, and a local set has no revision the hub
        fingerprint would name). Its position counts prompts of the shuffled train split: it would go on in other
        prompts, and prompts held out for validation could now be trained on. Every rank reads all the prompts,
        so each refuses alike. A checkpoint written before it held the digest resumes unchecked."""
        check_rows_digest(saved, self.prompts_sha256, dataset=self.dataset, kind="GRPO", rows="prompts",
                          counts=(len(self.train), len(self.val)),
                          changed="prompts edited, added or removed, or their other columns, which the reward "
                                  "functions get")


def build_grpo_data(cfg: DataConfig, *, seed: int, micro_batch: int, global_batch: int, rank: int, local_rank: int,
                    world_size: int, tokenizer_dir: Path | None, barrier: Callable[[], None],
                    hub_fingerprint: str | None = None) -> GrpoData:
    """:func:`~retnet.train.data.build_data` of ``data.format = "prompts"``: the rows read (local rank 0 first,
    which writes the ``datasets`` cache the others then read), a held-out ``val_fraction`` of them, encoded in
    memory with ``tokenizer_dir``'s tokenizer (the run's, ``model.init_from``'s)."""
    cache_dir = data_cache_dir(cfg)
    files = local_files(cfg.dataset)
    loaded, fingerprint = None, None
    if files is None:
        loaded, fingerprint = load_hub(cfg, cache_dir, local_rank, barrier)
        if hub_fingerprint is not None and fingerprint != hub_fingerprint:
            raise _hub_changed(cfg)
    if tokenizer_dir is None:  # the config refuses it first (model.init_from is required)
        raise ConfigError("data.format 'prompts' needs the tokenizer of the model it tunes: set model.init_from")
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = None
    for turn in (0, 1):  # local rank 0 reads first (and fills the datasets cache), then the others
        if (local_rank == 0) == (turn == 0):
            rows = load_prompt_rows(cfg, files, cache_dir, loaded)
        barrier()
    train, val = split_documents(rows, cfg.val_fraction, dataset=cfg.dataset, max_documents=cfg.max_documents)
    encoder = PromptEncoder(tokenizer, cfg)
    data = GrpoData(encoder.split(train), encoder.split(val), tokenizer, encoder, seed=seed, micro_batch=micro_batch,
                    global_batch=global_batch, rank=rank, world_size=world_size, dataset=cfg.dataset)
    logger.info("data: %d train, %d validation prompts from %s", len(data.train), len(data.val), cfg.dataset)
    data.hub_fingerprint = fingerprint
    return data


__all__ = ["EPSILON", "SUMS", "Generation", "GrpoBatch", "GrpoData", "RewardSources", "Totals", "advantages",
           "batch_std", "build_grpo_data", "clipped_tokens", "finished", "grpo_loss", "importance_ratio", "pack",
           "reward_arguments", "reward_values", "token_logps", "token_terms"]
