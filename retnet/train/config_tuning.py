"""The post-training sections of the training configuration: ``[lora]``, ``[dpo]``, ``[kto]``, ``[reward]``,
``[grpo]``, ``[distill]``,
their checks against the rest of a :class:`~retnet.train.config.JobConfig`, and what a resume may not change in
them. :mod:`retnet.train.config` re-exports every public name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retnet.train.config_base import ConfigError, _positive, _refuse, _Section, launch_env_int

if TYPE_CHECKING:
    from retnet.train.config import JobConfig

# TRL's DPOConfig.loss_type names (DPOTrainer.dpo_loss of TRL 0.15 to 0.19; bco_pair, whose shift is a running mean
# of the rewards, and sft, the chosen completions' NLL, as TRL 0.20 to 0.28 compute them: TRL 1's rewrite dropped
# bco_pair's shift and renamed aot_pair aot_unpaired)
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "sppo_hard", "aot", "aot_pair",
                  "discopop", "bco_pair", "sft", "apo_zero", "apo_down")
# Those whose formula reads dpo.label_smoothing in TRL; the others ignore it there, so setting it is a mistake
DPO_SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair")
# Those whose TRL formula takes reference_free's zero reference: the others read the reference model's log-probs
# even with reference_free (TRL still runs it), which a reference-free run here does not compute
DPO_REFERENCE_FREE_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "apo_zero", "apo_down", "sft")
DISCOPOP_TAU = 0.05  # TRL's DPOConfig.discopop_tau default
# SimPO (TRL's CPOTrainer, loss_type "simpo") and ORPO (TRL's ORPOTrainer): losses of the policy's length-averaged
# log-probs alone, so reference-free by definition (a run with them computes no reference, whatever
# dpo.reference_free says); not in DPO_LOSS_TYPES, which are DPOTrainer's
POLICY_ONLY_LOSS_TYPES = ("simpo", "orpo")
SIMPO_GAMMA = 0.5  # TRL's CPOConfig.simpo_gamma default
# TRL's KTOConfig.loss_type names: KTO, and APO-zero's unpaired variant (which estimates no KL term)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo")  # TRL's names; dapo is its default
# Those whose token term is PPO's clipped surrogate (epsilon, epsilon_high, delta): cispo weights the log-probs by the
# capped ratio instead, sapo gates the ratio softly (sapo_temperature_pos / _neg)
GRPO_CLIPPED_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "luspo")
# TRL's generation_kwargs update the GenerationConfig its sampling fields build (they win): the keys this sampler
# implements. Any other (num_beams, suppress_tokens ...) would change what TRL samples and not what this one does.
GRPO_GENERATION_KWARGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "do_sample")
GRPO_SCALE_REWARDS = ("group", "batch", "none")
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32: rewards are weighted and summed in it
GRPO_IMPORTANCE_LEVELS = ("token", "sequence")  # TRL's importance_sampling_level; sequence is GSPO
# TRL's scale_rewards before 0.22 was a boolean, which its GRPOConfig still takes as these
_SCALE_REWARDS_BOOLEANS = {True: "group", False: "none", "true": "group", "false": "none"}
# Every nn.Linear of a decoder layer, retention then FFN (g_proj without use_output_gate and gate_proj without
# ffn_glu do not exist): what LoRA may adapt, and by default does.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True, slots=True)
class LoraConfig(_Section):
    """LoRA fine-tuning (``peft``): low-rank adapters on the decoder layers' Linear modules; only they train.

    ``rank`` 0 (the default) trains every weight as before. ``alpha`` scales the update by ``alpha / rank``
    (``alpha / sqrt(rank)`` with ``use_rslora``); ``dropout`` is applied to the adapters' input. ``use_dora``:
    DoRA (peft's weight-decomposed LoRA), which also trains a magnitude per output row of each adapted Linear.
    ``target_modules``: Linear module names of the decoder layers (``LORA_TARGETS``); empty = every one the
    model has. Meant for a pretrained model (``model.init_from``), whose weights the adapters' checkpoints
    then leave out; on a random init the whole model is checkpointed.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=list)  # of LORA_TARGETS names; [] = all the model has
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        _positive("lora", self, "rank", allow_zero=True)
        _positive("lora", self, "alpha")
        if not 0.0 <= self.dropout < 1.0:  # nan fails it too
            _refuse("lora.dropout", "must be in [0, 1)", self.dropout)
        unknown = [name for name in self.target_modules if not isinstance(name, str) or name not in LORA_TARGETS]
        if unknown:
            # a reward model's head is new: peft trains it in full (modules_to_save), an adapter would not do
            head = ("; a reward model's score head is no LoRA target, it trains in full beside the adapters"
                    if "score" in unknown else "")
            _refuse("lora.target_modules", f"must name Linear modules of the decoder layers, of {LORA_TARGETS} "
                    f"(unknown: {unknown}){head}", self.target_modules)
        if len(set(self.target_modules)) != len(self.target_modules):
            _refuse("lora.target_modules", "must not name a module twice", self.target_modules)
        if self.target_modules and not self.rank:  # most likely a forgotten lora.rank: that run trains every weight
            _refuse("lora.target_modules", "is set but lora.rank is 0 (LoRA off); set lora.rank > 0",
                    self.target_modules)
        for name in ("use_dora", "use_rslora"):  # as above: asked for, the run would train every weight instead
            if getattr(self, name) and not self.rank:
                _refuse(f"lora.{name}", "is set but lora.rank is 0 (LoRA off); set lora.rank > 0", getattr(self, name))

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(kw_only=True, slots=True)
class DpoConfig(_Section):
    """Direct Preference Optimization (``data.format = "preference"``, ``retnet.train.preference``), as TRL's
    DPOTrainer, with its names: ``beta`` the strength of the pull towards the reference (the model as the run
    starts); ``loss_type`` one of :data:`DPO_LOSS_TYPES` (``"sigmoid"``: DPO; ``"ipo"``: IPO, on length-averaged
    log-probs; the others TRL's formulas, see :func:`~retnet.train.preference.dpo_loss`); ``label_smoothing`` the
    assumed share of flipped labels, for the loss types whose TRL formula reads it (:data:`DPO_SMOOTHED_LOSS_TYPES`;
    exo_pair takes 0 as TRL does, as 1e-3); ``discopop_tau`` DiscoPOP's temperature; ``reference_free`` a
    reference that gives every completion log-prob 0 (no reference pass, no reference file); ``rpo_alpha`` (None:
    off) adds that times the chosen completions' mean token NLL to each pair's loss (RPO). ``"bco_pair"`` shifts
    its rewards by their running mean (part of the checkpoint); ``"sft"`` is the chosen completions' mean token NLL.
    ``loss_type`` may be a list of those names (TRL 0.20's combined losses, MPO: ``["sigmoid", "bco_pair",
    "sft"]``), each pair's loss their sum weighted by ``loss_weights`` (None: 1 each; one weight a name); a list of
    one is its name, as TRL's DPOConfig makes it.

    ``loss_type`` may also be one of :data:`POLICY_ONLY_LOSS_TYPES`, reference-free by definition (no reference
    pass or file; ``reference_free`` may say so, or not): ``"simpo"``, TRL's CPOTrainer with ``loss_type="simpo"``
    (``beta`` its β, ``simpo_gamma`` its target margin γ, ``label_smoothing`` as TRL's CPO reads it, ``cpo_alpha``
    (None: off, pure SimPO; TRL's CPOConfig default 1.0 is CPO-SimPO) the weight of the chosen completions' NLL);
    ``"orpo"``, TRL's ORPOTrainer (``beta`` its λ; the chosen completions' NLL is part of the loss)."""

    beta: float = 0.1
    loss_type: str | list = "sigmoid"  # a list: TRL's combined losses
    loss_weights: list | None = None  # of numbers, one per loss_type; None: 1 each
    label_smoothing: float = 0.0
    discopop_tau: float = DISCOPOP_TAU
    reference_free: bool = False
    rpo_alpha: float | None = None
    simpo_gamma: float = SIMPO_GAMMA
    cpo_alpha: float | None = None

    def __post_init__(self) -> None:
        _positive("dpo", self, "beta", "discopop_tau")
        self._check_loss_types()
        kinds = self.types
        if not 0.0 <= self.label_smoothing < 0.5:  # 0.5: the labels are noise; nan fails it too
            _refuse("dpo.label_smoothing", "must be in [0, 0.5)", self.label_smoothing)
        if self.label_smoothing and self.loss_type == "orpo":
            _refuse("dpo.label_smoothing", "does not apply to dpo.loss_type 'orpo' (TRL's ORPOTrainer has none)",
                    self.label_smoothing)
        # SimPO's is TRL's CPOTrainer's conservative sigmoid, which reads it
        if self.label_smoothing and not set(kinds) & {*DPO_SMOOTHED_LOSS_TYPES, "simpo"}:
            takers = ", ".join(map(repr, (*DPO_SMOOTHED_LOSS_TYPES, "simpo")))
            _refuse("dpo.label_smoothing", f"applies to dpo.loss_type {takers} only (TRL's {self.loss_type!r} loss "
                    f"ignores it), not {self.loss_type!r}", self.label_smoothing)
        if self.discopop_tau != DISCOPOP_TAU and "discopop" not in kinds:  # most likely a forgotten loss_type
            _refuse("dpo.discopop_tau", f"applies to dpo.loss_type 'discopop' only, not {self.loss_type!r}",
                    self.discopop_tau)
        reading = [kind for kind in kinds if kind not in DPO_REFERENCE_FREE_LOSS_TYPES + POLICY_ONLY_LOSS_TYPES]
        if self.reference_free and reading:
            takers = ", ".join(map(repr, DPO_REFERENCE_FREE_LOSS_TYPES + POLICY_ONLY_LOSS_TYPES))
            _refuse("dpo.reference_free", f"applies to dpo.loss_type {takers} only: TRL's {reading[0]!r} loss "
                    f"reads the reference model's log-probs even with reference_free, and a reference-free run "
                    f"computes none", self.reference_free)
        if self.rpo_alpha is not None:
            _positive("dpo", self, "rpo_alpha", allow_zero=True)
            if self.loss_type == "simpo":
                _refuse("dpo.rpo_alpha", "does not apply to dpo.loss_type 'simpo': its NLL weight is dpo.cpo_alpha "
                        "(TRL's CPOConfig name)", self.rpo_alpha)
            if self.loss_type == "orpo":
                _refuse("dpo.rpo_alpha", "does not apply to dpo.loss_type 'orpo': ORPO's loss holds the chosen "
                        "completions' NLL already (TRL's ORPOTrainer; dpo.beta weighs the odds-ratio term)",
                        self.rpo_alpha)
        if isinstance(self.simpo_gamma, bool) or not isinstance(self.simpo_gamma, int | float):
            _refuse("dpo.simpo_gamma", "must be a number >= 0", self.simpo_gamma)
        _positive("dpo", self, "simpo_gamma", allow_zero=True)
        if self.simpo_gamma != SIMPO_GAMMA and self.loss_type != "simpo":  # most likely a forgotten loss_type
            _refuse("dpo.simpo_gamma", f"applies to dpo.loss_type 'simpo' only, not {self.loss_type!r}",
                    self.simpo_gamma)
        if self.cpo_alpha is not None:
            if isinstance(self.cpo_alpha, bool) or not isinstance(self.cpo_alpha, int | float):  # True would be 1
                _refuse("dpo.cpo_alpha", "must be a number >= 0 (or None: off)", self.cpo_alpha)
            if self.loss_type != "simpo":
                _refuse("dpo.cpo_alpha", f"applies to dpo.loss_type 'simpo' only, not {self.loss_type!r} (RPO's "
                        f"dpo.rpo_alpha adds the same NLL term to DPO's losses)", self.cpo_alpha)
            _positive("dpo", self, "cpo_alpha", allow_zero=True)

    def _check_loss_types(self) -> None:
        """ConfigError for a ``loss_type`` that is no DPO loss, or a list (TRL's combined losses) naming one that
        is not of :data:`DPO_LOSS_TYPES`, or one twice; and for ``loss_weights`` that are not one finite number
        >= 0 per loss type. A list of one becomes its name (TRL's DPOConfig normalizes it so)."""
        if isinstance(self.loss_type, list) and len(self.loss_type) == 1 and isinstance(self.loss_type[0], str):
            self.loss_type = self.loss_type[0]
        if isinstance(self.loss_type, list):
            unknown = [kind for kind in self.loss_type if not isinstance(kind, str) or kind not in DPO_LOSS_TYPES]
            if unknown or not self.loss_type:
                # SimPO and ORPO are TRL's CPO and ORPO trainers' losses, which combine with no other
                other = " ('simpo' and 'orpo' are not DPOTrainer's: they combine with none)" if any(
                    kind in POLICY_ONLY_LOSS_TYPES for kind in unknown if isinstance(kind, str)) else ""
                _refuse("dpo.loss_type", f"as a list (TRL's combined losses) must name loss types of "
                        f"{DPO_LOSS_TYPES}{other} (unknown: {unknown})", self.loss_type)
            if len(set(self.loss_type)) != len(self.loss_type):
                _refuse("dpo.loss_type", "must not name a loss type twice (weigh it with dpo.loss_weights instead)",
                        self.loss_type)
        elif self.loss_type not in DPO_LOSS_TYPES + POLICY_ONLY_LOSS_TYPES:
            _refuse("dpo.loss_type", f"must be one of {DPO_LOSS_TYPES} (TRL's DPOTrainer), 'simpo' (its CPOTrainer) "
                    f"or 'orpo' (its ORPOTrainer) (TRL's names; or a list of DPOTrainer's, its combined losses)",
                    self.loss_type)
        if self.loss_weights is None:
            return
        if not isinstance(self.loss_weights, list):
            _refuse("dpo.loss_weights", "must be a list of numbers, one per dpo.loss_type (or None: 1 each)",
                    self.loss_weights)
        if self.loss_type in POLICY_ONLY_LOSS_TYPES:
            _refuse("dpo.loss_weights", f"does not apply to dpo.loss_type {self.loss_type!r} (TRL's DPOTrainer weighs "
                    f"its own losses only)", self.loss_weights)
        weights = []
        for weight in self.loss_weights:  # --dpo.loss_weights=0.8,0.2,1 arrives as strings
            try:
                number = float(weight) if isinstance(weight, int | float | str) and not isinstance(weight, bool) \
                    else math.nan
            except (ValueError, OverflowError):
                number = math.nan
            if not (math.isfinite(number) and number >= 0):  # a negative weight would maximize its loss
                _refuse("dpo.loss_weights", f"must be finite numbers >= 0 (not: {weight!r})", self.loss_weights)
            weights.append(number)
        if len(weights) != len(self.types):
            _refuse("dpo.loss_weights", f"must give one weight per loss type of dpo.loss_type {self.loss_type!r} "
                    f"({len(self.types)}), not {len(weights)}", self.loss_weights)
        self.loss_weights = weights

    @property
    def types(self) -> tuple[str, ...]:
        """The loss types, one or (TRL's combined losses) more."""
        return tuple(self.loss_type) if isinstance(self.loss_type, list) else (self.loss_type,)

    @property
    def weights(self) -> tuple[float, ...]:
        """Each of :attr:`types`' weight in the loss: ``loss_weights``, or 1 each."""
        return tuple(self.loss_weights) if self.loss_weights is not None else (1.0,) * len(self.types)

    @property
    def length_averaged(self) -> bool:
        """The loss compares length-averaged log-probs: IPO's (every type of a list holding it, as TRL averages
        its concatenated_forward's log-probs for all of them then), SimPO's, ORPO's."""
        return bool({"ipo", *POLICY_ONLY_LOSS_TYPES} & set(self.types))

    @property
    def logs_nll(self) -> bool:
        """The chosen completions' NLL is part of the loss, logged as TRL's ``nll_loss``: RPO, SimPO's
        ``cpo_alpha``, ORPO, or the ``sft`` loss type."""
        return self.nll_weight is not None or "sft" in self.types

    @property
    def uses_reference(self) -> bool:
        """The loss reads reference log-probs: neither ``reference_free`` nor a loss of the policy alone."""
        return not self.reference_free and self.loss_type not in POLICY_ONLY_LOSS_TYPES

    @property
    def nll_weight(self) -> float | None:
        """The weight of the chosen completions' mean token NLL in each pair's loss: RPO's ``rpo_alpha``, SimPO's
        ``cpo_alpha``, ORPO's 1 (None: none, not logged)."""
        return 1.0 if self.loss_type == "orpo" else self.cpo_alpha if self.loss_type == "simpo" else self.rpo_alpha


@dataclass(kw_only=True, slots=True)
class KtoConfig(_Section):
    """Kahneman-Tversky Optimization on unpaired binary feedback (``data.format = "unpaired"``,
    ``retnet.train.kto``), as TRL's KTOTrainer, with its names: ``beta`` the strength of the pull towards the
    reference (the model as the run starts); ``desirable_weight`` and ``undesirable_weight`` scale the losses of
    the rows labelled true and false (to make up for a set with more of one kind: the KTO paper's eq. 8 asks for
    ``desirable_weight · n_desirable / (undesirable_weight · n_undesirable)`` in [1, 4/3]); ``loss_type`` one of
    :data:`KTO_LOSS_TYPES` (``"kto"``: the paper's, against a KL estimate from mismatched completions;
    ``"apo_zero_unpaired"``: APO-zero's unpaired form, no KL term)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"

    def __post_init__(self) -> None:
        _positive("kto", self, "beta", "desirable_weight", "undesirable_weight")
        if self.loss_type not in KTO_LOSS_TYPES:
            _refuse("kto.loss_type", f"must be one of {KTO_LOSS_TYPES} (TRL's KTOConfig names)", self.loss_type)


@dataclass(kw_only=True, slots=True)
class RewardConfig(_Section):
    """Reward-model training on preference pairs (``data.format = "preference"``, ``retnet.train.reward``), as
    TRL's RewardTrainer: ``enabled`` trains a ``RetNetForSequenceClassification`` (one label) from
    ``model.init_from`` on ``-logsigmoid(r_chosen - r_rejected - margin)`` (``margin``: the dataset's optional
    ``margin`` column, TRL's; 0 without one) instead of DPO; ``center_rewards_coefficient`` (TRL's name) adds that
    times ``mean((r_chosen + r_rejected)^2)``, pulling the rewards towards zero mean.
    With ``lora.rank > 0`` the adapters and the new ``score`` head train, the backbone stays frozen."""

    enabled: bool = False
    center_rewards_coefficient: float = 0.0

    def __post_init__(self) -> None:
        _positive("reward", self, "center_rewards_coefficient", allow_zero=True)
        # most likely a forgotten reward.enabled: without it the run trains DPO, which ignores the coefficient
        if self.center_rewards_coefficient and not self.enabled:
            _refuse("reward.center_rewards_coefficient", "is set but reward.enabled is false; set "
                    "reward.enabled=true", self.center_rewards_coefficient)


def _number(key: str, value: Any) -> float:
    """``value`` as a float, or a ConfigError naming ``key`` (a table's values arrive untyped)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _refuse(key, "must be a number", value)
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range: inf, which every range check here refuses
        return math.inf


def _check_sampling(prefix: str, values: dict[str, Any]) -> None:
    """ConfigError for ``top_p``, ``top_k``, ``min_p`` or ``repetition_penalty`` out of range, named ``prefix``
    and the setting: the ``[grpo]`` fields and the ``generation_kwargs`` that override them share these checks."""
    for name, value in values.items():
        if name == "top_k":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _refuse(f"{prefix}top_k", "must be >= 0 (0: off)", value)
        elif name == "min_p":
            if value is not None and not 0.0 <= _number(f"{prefix}min_p", value) <= 1.0:
                _refuse(f"{prefix}min_p", "must be in [0, 1] (None or 0: off)", value)
        elif name == "top_p":
            if not 0.0 < _number(f"{prefix}top_p", value) <= 1.0:  # nan fails it too
                _refuse(f"{prefix}top_p", "must be in (0, 1]", value)
        elif name == "repetition_penalty":
            number = _number(f"{prefix}repetition_penalty", value)
            if not (math.isfinite(number) and number > 0):  # transformers': strictly positive
                _refuse(f"{prefix}repetition_penalty", "must be > 0 (1: off; above 1 discourages repeating a token "
                        "of the prompt or the completion)", value)


@dataclass(kw_only=True, slots=True)
class GrpoConfig(_Section):
    """Group Relative Policy Optimization (``data.format = "prompts"``, ``retnet.train.grpo``), as TRL's
    GRPOTrainer, with TRL's names and defaults: each prompt is sampled ``num_generations`` times (``temperature``,
    ``top_k``, ``top_p``, ``min_p``, at most ``max_completion_length`` tokens, EOS or the model's
    ``generation_config.eos_token_id`` ends one), the completions are scored by ``reward_funcs``
    (``"module:function"`` import paths, TRL's callable contract; their ``__name__``s, which name their metrics,
    distinct) and/or ``reward_model`` (a ``RetNetForSequenceClassification`` export with the policy's tokenizer),
    summed with ``reward_weights`` (empty: all 1; one per source, the functions then the model), and each
    completion's advantage is its reward minus its group's mean, divided by the group's std (``scale_rewards``
    ``"group"``), the batch's (``"batch"``) or nothing (``"none"``); TRL's legacy booleans are taken as it takes
    them (true ``"group"``, false ``"none"``). ``loss_type`` ``"dapo"`` (tokens' mean over the global batch),
    ``"grpo"`` (each sequence's token mean, then their mean), ``"dr_grpo"`` (tokens' sum over sequences ×
    ``max_completion_length``) or ``"bnpo"`` (each micro-batch's token mean, then their mean); ``num_iterations``
    (TRL's μ) optimizer steps on each generation, the ratio to the sampling policy clipped to [1 − ``epsilon``,
    1 + ``epsilon_high``] (None: ``epsilon``; inactive at μ 1, where the ratio is 1); ``beta`` > 0 adds TRL's k3
    estimate of the KL to the reference (the model as the run starts). ``importance_sampling_level``
    ``"sequence"`` (TRL's GSPO) gives each completion one ratio, exp of its tokens' mean log ratio; ``delta``
    (TRL's two-sided clipping) caps the unclipped ratio. ``mask_truncated_completions`` leaves the completions
    that reached ``max_completion_length`` without a stop token out of the loss (TRL's: their completion mask is
    0; they still count in the advantages). ``repetition_penalty`` (1: off) divides the positive logits of the
    tokens in the prompt or sampled so far and multiplies the negative ones, before the temperature and the cuts
    (transformers'); the loss's log-probs are the model's, without it (TRL's). ``generation_kwargs``: TRL's table
    over those settings, whose keys win (``max_new_tokens`` the sampled length; ``dr_grpo`` still divides by
    ``max_completion_length``, as TRL's); keys this sampler does not implement are refused. ``loss_type``
    ``"cispo"`` (MiniMax-M1): ``-min(ρ, epsilon_high)·A·logp``, the capped ratio detached, tokens' mean over the
    global batch as ``"dapo"``; ``"sapo"`` (SAPO): ``-σ(τ(ρ − 1))·4/τ·A``, τ ``sapo_temperature_pos`` for a
    positive advantage and ``sapo_temperature_neg`` otherwise, aggregated as ``"grpo"``; ``"luspo"`` (LUSPO,
    ``importance_sampling_level = "sequence"``): the clipped term times the completion's length, the mean over
    completions."""

    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (TRL's)
    min_p: float | None = None  # None or 0: off (TRL's)
    max_completion_length: int = 256
    reward_funcs: list = field(default_factory=list)  # of "module:function" strings
    reward_model: str = ""  # a RetNetForSequenceClassification directory; "" = none
    reward_weights: list = field(default_factory=list)  # of numbers; [] = 1 for each source
    scale_rewards: str | bool = "group"  # a bool (TRL's legacy) becomes its string
    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (TRL's default; DAPO's clip-higher sets 0.28)
    num_iterations: int = 1
    mask_truncated_completions: bool = False  # TRL's (DAPO's overlong filtering)
    importance_sampling_level: str = "token"
    delta: float | None = None  # TRL's two-sided clipping (INTELLECT-2); None: off
    repetition_penalty: float = 1.0  # 1: off (TRL's)
    generation_kwargs: dict = field(default_factory=dict)  # of GRPO_GENERATION_KWARGS; they win over the fields
    sapo_temperature_pos: float = 1.0  # TRL's; loss_type "sapo" only
    sapo_temperature_neg: float = 1.05

    def __post_init__(self) -> None:
        if self.num_generations < 2:  # a group of one has no spread: its advantage is always 0
            _refuse("grpo.num_generations", "must be >= 2 (advantages compare a prompt's completions)",
                    self.num_generations)
        _positive("grpo", self, "temperature", "max_completion_length")
        _positive("grpo", self, "beta", allow_zero=True)
        _check_sampling("grpo.", {name: getattr(self, name) for name in ("top_p", "top_k", "min_p",
                                                                          "repetition_penalty")})
        self._check_generation_kwargs()
        if not 0.0 <= self.epsilon < 1.0:
            _refuse("grpo.epsilon", "must be in [0, 1)", self.epsilon)
        if self.epsilon_high is not None and not (math.isfinite(self.epsilon_high) and self.epsilon_high >= 0):
            _refuse("grpo.epsilon_high", "must be >= 0 (the ratio's upper clip is 1 + epsilon_high), or None for "
                    "grpo.epsilon", self.epsilon_high)
        if self.importance_sampling_level not in GRPO_IMPORTANCE_LEVELS:
            _refuse("grpo.importance_sampling_level", f"must be one of {GRPO_IMPORTANCE_LEVELS}",
                    self.importance_sampling_level)
        # at or below 1 the on-policy ratio (1) itself would be capped: no gradient from the unclipped term
        if self.delta is not None and not (math.isfinite(self.delta) and self.delta > 1.0):
            _refuse("grpo.delta", "must be > 1 (the cap of the unclipped ratio; TRL recommends > 1 + epsilon_high), "
                    "or None for none", self.delta)
        if isinstance(self.num_iterations, bool) or not isinstance(self.num_iterations, int) or \
                self.num_iterations < 1:
            _refuse("grpo.num_iterations", "must be an integer >= 1 (optimizer steps per generation)",
                    self.num_iterations)
        # the command line gives a boolean as text: the str annotation comes first
        key = self.scale_rewards.lower() if isinstance(self.scale_rewards, str) else self.scale_rewards
        self.scale_rewards = _SCALE_REWARDS_BOOLEANS.get(key, self.scale_rewards)
        if self.scale_rewards not in GRPO_SCALE_REWARDS:
            _refuse("grpo.scale_rewards", f"must be one of {GRPO_SCALE_REWARDS} (or TRL's booleans: true = 'group', "
                    f"false = 'none')", self.scale_rewards)
        if self.loss_type == "vespo":  # TRL's newest: its gamma weights are not implemented here
            _refuse("grpo.loss_type", f"must be one of {GRPO_LOSS_TYPES} (TRL's 'vespo' is not supported yet)",
                    self.loss_type)
        if self.loss_type not in GRPO_LOSS_TYPES:
            _refuse("grpo.loss_type", f"must be one of {GRPO_LOSS_TYPES}", self.loss_type)
        self._check_loss_settings()
        for spec in self.reward_funcs:
            if not isinstance(spec, str) or not re.fullmatch(r"[\w.]+:[\w.]+", spec):
                _refuse("grpo.reward_funcs", f"must be 'module:function' import paths (as "
                        f"'retnet.train.rewards:exact_match'); not {spec!r}", self.reward_funcs)
        if len(set(self.reward_funcs)) != len(self.reward_funcs):
            _refuse("grpo.reward_funcs", "must not name a function twice (give it a weight instead)",
                    self.reward_funcs)
        weights = []
        for weight in self.reward_weights:  # --grpo.reward_weights=1,0.5 arrives as strings
            try:
                number = float(weight) if isinstance(weight, (int, float, str)) and not isinstance(weight, bool) \
                    else math.nan
            except (ValueError, OverflowError):  # (an int beyond float's range, 10**400)
                number = math.nan
            if not math.isfinite(number) or abs(number) > FLOAT32_MAX:  # rewards are weighted in float32
                _refuse("grpo.reward_weights", f"must be finite numbers within float32's range (not: {weight!r})",
                        self.reward_weights)
            weights.append(number)
        self.reward_weights = weights

    @property
    def sources(self) -> int:
        """The number of reward sources: the functions, then the reward model."""
        return len(self.reward_funcs) + bool(self.reward_model)

    @property
    def epsilon_upper(self) -> float:
        """The ratio's upper clip is 1 + this: ``epsilon_high``, or ``epsilon`` when it is None (TRL's rule); with
        ``loss_type`` ``"cispo"`` the ratio's cap itself (TRL's ε_max, which it recommends at 5)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def sampling(self) -> dict[str, Any]:
        """What the sampler draws with: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``
        and ``max_new_tokens`` (the longest completion), each the field's value unless ``generation_kwargs`` gives
        it (TRL updates its GenerationConfig's arguments with them)."""
        values = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                  "repetition_penalty": self.repetition_penalty, "max_new_tokens": self.max_completion_length}
        values.update((k, v) for k, v in self.generation_kwargs.items() if k != "do_sample")
        return values

    def _check_generation_kwargs(self) -> None:
        """ConfigError for a ``generation_kwargs`` key the sampler does not implement, or a value out of the range
        of the field it overrides; int values of the float settings become floats (a resume compares them)."""
        if not isinstance(self.generation_kwargs, dict):
            _refuse("grpo.generation_kwargs", "must be a table", self.generation_kwargs)
        unknown = sorted(str(k) for k in self.generation_kwargs if k not in GRPO_GENERATION_KWARGS)
        if unknown:
            _refuse("grpo.generation_kwargs", f"has keys this sampler does not implement: {unknown} (TRL would pass "
                    f"them to its GenerationConfig; ignoring them would sample otherwise than it); it takes "
                    f"{list(GRPO_GENERATION_KWARGS)}", self.generation_kwargs)
        kwargs = dict(self.generation_kwargs)
        if kwargs.get("do_sample", True) is not True:
            # greedy decoding gives every completion of a group the same tokens: no spread, no advantage
            _refuse("grpo.generation_kwargs.do_sample", "must be true (GRPO samples; greedy completions of a group "
                    "are all the same)", kwargs["do_sample"])
        if "max_new_tokens" in kwargs and (isinstance(kwargs["max_new_tokens"], bool) or not isinstance(
                kwargs["max_new_tokens"], int) or kwargs["max_new_tokens"] < 1):
            _refuse("grpo.generation_kwargs.max_new_tokens", "must be an integer >= 1", kwargs["max_new_tokens"])
        if "temperature" in kwargs:
            temperature = _number("grpo.generation_kwargs.temperature", kwargs["temperature"])
            if not (math.isfinite(temperature) and temperature > 0):
                _refuse("grpo.generation_kwargs.temperature", "must be > 0", kwargs["temperature"])
            # TRL samples at it but computes the loss's log-probs at its temperature field: every completion would
            # be scored under another distribution than it was drawn from
            if temperature != self.temperature:
                _refuse("grpo.generation_kwargs.temperature", f"must equal grpo.temperature ({self.temperature:g}), "
                        f"which the loss's log-probs are computed at (TRL's would differ from the sampler's); set "
                        f"grpo.temperature instead", kwargs["temperature"])
            kwargs["temperature"] = temperature
        sampling = {k: v for k, v in kwargs.items() if k in ("top_p", "top_k", "min_p", "repetition_penalty")}
        _check_sampling("grpo.generation_kwargs.", sampling)
        for name in ("top_p", "min_p", "repetition_penalty"):
            if kwargs.get(name) is not None:
                kwargs[name] = float(kwargs[name])
        self.generation_kwargs = kwargs

    def _check_loss_settings(self) -> None:
        """ConfigError for settings the loss type ignores (most likely meant for another), and for ``luspo`` where
        TRL's is not defined by the completions alone."""
        clipped = self.loss_type in GRPO_CLIPPED_LOSS_TYPES
        if self.delta is not None and not clipped:
            _refuse("grpo.delta", f"caps the clipped surrogate's unclipped ratio, which grpo.loss_type "
                    f"{self.loss_type!r} has not (it applies to {GRPO_CLIPPED_LOSS_TYPES})", self.delta)
        if self.loss_type == "sapo":  # its soft gate replaces the clip
            for name, default in (("epsilon", 0.2), ("epsilon_high", None)):
                if getattr(self, name) != default:
                    _refuse(f"grpo.{name}", "sets the clip, which grpo.loss_type 'sapo' replaces with its soft gate "
                            "(grpo.sapo_temperature_pos / grpo.sapo_temperature_neg)", getattr(self, name))
        for name, default in (("sapo_temperature_pos", 1.0), ("sapo_temperature_neg", 1.05)):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                _refuse(f"grpo.{name}", "must be > 0 (the soft gate's temperature)", value)
            if value != default and self.loss_type != "sapo":
                _refuse(f"grpo.{name}", f"is set but grpo.loss_type is {self.loss_type!r}; it applies to 'sapo'",
                        value)
        if self.loss_type == "luspo":
            if self.importance_sampling_level != "sequence":
                # TRL's scales each token's term by the completion's length and averages over the padded batch:
                # defined by the completions alone only at the sequence level, as LUSPO is
                _refuse("grpo.importance_sampling_level", "must be 'sequence' with grpo.loss_type 'luspo' (LUSPO "
                        "is GSPO's sequence-level ratio; TRL requires it)", self.importance_sampling_level)
            if self.beta > 0:
                _refuse("grpo.beta", "must be 0 with grpo.loss_type 'luspo': TRL's adds the per-token KL term "
                        "after the sequence-level one and averages it over the padded batch's positions, which "
                        "depends on the padding, not the completions", self.beta)


@dataclass(kw_only=True, slots=True)
class DistillConfig(_Section):
    """Knowledge distillation (``retnet.train.distill``): the model trained (the student: a preset from scratch, or
    ``model.init_from``) learns ``teacher``'s next-token distributions, a frozen causal LM export of the same
    vocabulary (a directory or a hub id, as ``model.init_from``; its tokenizer is the run's unless
    ``model.init_from`` or ``data.tokenizer`` gives one, which must then be the same). Per target token the loss is
    ``alpha · temperature² · KL + (1 − alpha) · cross-entropy``, ``kind`` ``"kl"`` KL(teacher ‖ student) (forward,
    the default) or ``"reverse_kl"`` KL(student ‖ teacher); the validation loss stays the plain cross-entropy.
    ``teacher`` empty (the default): no distillation."""

    teacher: str = ""  # a save_pretrained directory or hub id; "" = no distillation
    temperature: float = 1.0
    alpha: float = 1.0  # the KD term's weight; 1 - alpha the cross-entropy's
    kind: str = "kl"

    def __post_init__(self) -> None:
        from retnet.model.distillation import DISTILL_KINDS, DISTILL_TEMPERATURES  # the loss's own (torch)

        _positive("distill", self, "temperature")
        low, high = DISTILL_TEMPERATURES
        if not low <= self.temperature <= high:  # refused here, not a nan loss after the teacher and data load
            _refuse("distill.temperature", f"must be in [{low:g}, {high:g}]: outside it the float32 loss does not "
                    f"compute temperature² · KL (0, wrong, or nan)", self.temperature)
        if not 0.0 <= self.alpha <= 1.0:  # nan fails it too
            _refuse("distill.alpha", "must be in [0, 1] (the KD term's weight, 1 - alpha the cross-entropy's)",
                    self.alpha)
        if self.kind not in DISTILL_KINDS:
            _refuse("distill.kind", f"must be one of {DISTILL_KINDS}", self.kind)
        if not self.teacher:  # most likely a forgotten distill.teacher: that run would train without a teacher
            for spec in dataclasses.fields(DistillConfig):
                if spec.name != "teacher" and getattr(self, spec.name) != spec.default:
                    _refuse(f"distill.{spec.name}", "is set but distill.teacher is empty (no distillation); set "
                            "distill.teacher to the teacher's directory or hub id", getattr(self, spec.name))

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


def _check_distill(job: JobConfig) -> None:
    """ConfigError for a ``distill.teacher`` that is neither a path nor a hub id, for ``model.vocab_size`` (the
    student's vocabulary is the teacher's), and for distillation with what it does not train under: the preference
    and prompt objectives (their losses are not next-token ones), a reward model, a vocabulary-parallel head.
    Context parallelism trains (the teacher runs each rank's piece, its states crossing the cuts as the student's),
    beside tensor parallelism too (each rank of a piece runs the whole teacher, exchanging its states with the
    ranks of the other pieces that hold the same slice of the student)."""
    distill = job.distill
    if not distill.enabled:
        return
    from retnet.model.hub import is_hub_id

    # os.path's, not Path.exists: a name longer than the OS takes (ENAMETOOLONG) is no directory, not an OSError
    if not os.path.exists(Path(distill.teacher).expanduser()) and not is_hub_id(distill.teacher):
        _refuse("distill.teacher", "must be the teacher's save_pretrained directory (another run's "
                "train.output_dir/export) or a hub id; no such directory", distill.teacher)
    mode = ("a reward model (reward.enabled)" if job.reward.enabled else
            "DPO (data.format 'preference')" if job.data.format == "preference" else
            "KTO (data.format 'unpaired')" if job.data.format == "unpaired" else
            "GRPO (data.format 'prompts')" if job.data.format == "prompts" else None)
    if mode is not None:
        _refuse("distill.teacher", f"cannot be used with {mode}: distillation trains next-token distributions on "
                f"data.format 'text' or 'chat'", distill.teacher)
    if job.model.vocab_size is not None:  # the BPE size, when one is trained: the teacher's tokenizer is used instead
        _refuse("model.vocab_size", f"cannot be set with distill.teacher {distill.teacher!r}: the student's "
                f"vocabulary is the teacher's", job.model.vocab_size)
    if job.train.vocab_parallel:
        _refuse("train.vocab_parallel", f"is not supported with distillation (distill.teacher {distill.teacher!r}) "
                f"yet: its loss takes the student's whole LM head; train it with train.vocab_parallel=false",
                job.train.vocab_parallel)


def _check_dpo(job: JobConfig) -> None:
    """ConfigError for ``[dpo]`` settings without preference data (a forgotten ``data.format``), and for preference
    data without ``model.init_from``: DPO moves a trained model relative to itself; a random init has no
    preferences to keep close to."""
    if job.data.format != "preference":
        for spec in dataclasses.fields(DpoConfig):
            if getattr(job.dpo, spec.name) != spec.default:
                _refuse(f"dpo.{spec.name}", f"is set but data.format is {job.data.format!r}; DPO trains on "
                        f"data.format 'preference'", getattr(job.dpo, spec.name))
    elif job.model.init_from is None:
        _refuse("model.init_from", "must name the model to tune with data.format 'preference' (DPO starts from a "
                "trained model, usually an SFT run's export, which is also its reference)", job.model.init_from)


def _check_kto(job: JobConfig) -> None:
    """ConfigError for ``[kto]`` settings without unpaired data (a forgotten ``data.format``), for unpaired data
    without ``model.init_from`` (KTO, as DPO, moves a trained model relative to itself), and for KTO's KL estimate
    with micro-batches of one row: a row's KL completion is another row's of its micro-batch-sized chunk (TRL
    refuses a ``per_device_train_batch_size`` of 1 so: the KL term would be the row's own reward)."""
    if job.data.format != "unpaired":
        for spec in dataclasses.fields(KtoConfig):
            if getattr(job.kto, spec.name) != spec.default:
                _refuse(f"kto.{spec.name}", f"is set but data.format is {job.data.format!r}; KTO trains on "
                        f"data.format 'unpaired'", getattr(job.kto, spec.name))
        return
    if job.model.init_from is None:
        _refuse("model.init_from", "must name the model to tune with data.format 'unpaired' (KTO starts from a "
                "trained model, usually an SFT run's export, which is also its reference)", job.model.init_from)
    if job.kto.loss_type == "kto" and job.train.micro_batch_size < 2:
        _refuse("train.micro_batch_size", "must be >= 2 with kto.loss_type 'kto': each row's KL completion is "
                "another row's of its micro-batch-sized chunk (TRL's per_device_train_batch_size > 1)",
                job.train.micro_batch_size)


def _check_reward(job: JobConfig) -> None:
    """ConfigError for ``reward.enabled`` without preference pairs or a model to start from, and with ``[dpo]``
    settings (the run trains no DPO: they would be ignored). LoRA works (``retnet.train.lora``: the new ``score``
    head trains in full beside the adapters); ``lora.target_modules`` cannot name it (``LoraConfig``)."""
    if not job.reward.enabled:
        return
    if job.data.format != "preference":
        _refuse("data.format", "must be 'preference' with reward.enabled=true (a reward model trains on TRL's "
                "prompt/chosen/rejected pairs)", job.data.format)
    if job.model.init_from is None:
        _refuse("model.init_from", "must name the model to start from with reward.enabled=true (its backbone, "
                "usually an SFT run's export, under a fresh score head)", job.model.init_from)
    for spec in dataclasses.fields(DpoConfig):
        if getattr(job.dpo, spec.name) != spec.default:
            _refuse(f"dpo.{spec.name}", "is set but reward.enabled=true trains a reward model, not DPO; unset it",
                    getattr(job.dpo, spec.name))


def _check_grpo(job: JobConfig) -> None:
    """ConfigError for ``[grpo]`` settings without prompts (a forgotten ``data.format``), and for a GRPO run that
    cannot work: no model to start from, no reward source, weights that do not match the sources, or a global
    batch that does not split into whole groups per rank."""
    grpo = job.grpo
    if job.data.format != "prompts":
        for spec in dataclasses.fields(GrpoConfig):
            default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
            if getattr(grpo, spec.name) != default:
                _refuse(f"grpo.{spec.name}", f"is set but data.format is {job.data.format!r}; GRPO trains on "
                        f"data.format 'prompts'", getattr(grpo, spec.name))
        return
    if job.model.init_from is None:
        _refuse("model.init_from", "must name the model to tune with data.format 'prompts' (GRPO samples from a "
                "trained model, usually an SFT run's export, which is also its reference)", job.model.init_from)
    if not grpo.sources:
        raise ConfigError("grpo.reward_funcs and grpo.reward_model are both empty with data.format 'prompts': GRPO "
                          "needs at least one reward source (e.g. --grpo.reward_funcs=retnet.train.rewards:"
                          "exact_match, or --grpo.reward_model=runs/rm/export)")
    from retnet.train.rewards import resolve, source_names

    # now, not after the data is read and the model loaded; two sources of one name would share their metrics
    source_names(grpo.reward_funcs, [resolve(spec) for spec in grpo.reward_funcs], grpo.reward_model)
    # (os.path.isfile: a name too long for the OS is no file, as above, not an OSError)
    if grpo.reward_model and not os.path.isfile(Path(grpo.reward_model).expanduser() / "config.json"):
        _refuse("grpo.reward_model", "must be a RetNetForSequenceClassification save_pretrained directory with its "
                "tokenizer (a reward-model run's train.output_dir/export)", grpo.reward_model)
    if grpo.reward_weights and len(grpo.reward_weights) != grpo.sources:
        _refuse("grpo.reward_weights", f"must give one weight per reward source ({grpo.sources}: the "
                f"{len(grpo.reward_funcs)} of grpo.reward_funcs, then grpo.reward_model"
                f"{' (set)' if grpo.reward_model else ' (unset)'}), or none for 1 each", grpo.reward_weights)
    # torchrun sets WORLD_SIZE before the process starts: the split is known now, before the data is read. Under
    # tensor parallelism the prompts are dealt to the data-parallel ranks (a group's ranks sample the same ones).
    world = launch_env_int("WORLD_SIZE", 1)
    ranks = max(world // job.train.group_size, 1)  # (a world the group does not divide is refused at start-up)
    what = "rank(s)" if ranks == world else f"data-parallel ranks (world {world} / train.tensor_parallel " \
                                             f"{job.train.tensor_parallel})"
    share, rest = divmod(job.train.global_batch_size, ranks)
    if rest or share % grpo.num_generations:
        _refuse("train.global_batch_size", f"(completions per step) must split into whole groups of "
                f"grpo.num_generations ({grpo.num_generations}) on each of the {ranks} {what}: each rank "
                f"samples and scores whole groups; make it a multiple of {grpo.num_generations * ranks}",
                job.train.global_batch_size)


def grpo_changes(saved: dict[str, Any], current: JobConfig) -> list[str]:
    """The ``[grpo]`` settings that differ between a checkpoint's config (``saved``) and ``current``, as
    ``"grpo.beta: checkpoint 0.0, now 0.04"``: each decides what is sampled, scored or optimized, so a resume with
    one changed would not continue the run. A checkpoint of another format has none. ``reward_weights`` are
    compared as used: ``[]`` is 1 for each source, the same as those ones spelled out; so is ``epsilon_high``:
    None is ``epsilon`` (:attr:`GrpoConfig.epsilon_upper`), the same as that value spelled out; and so are the
    sampling settings: a ``generation_kwargs`` key is the field it overrides (:attr:`GrpoConfig.sampling`), and
    where either sets ``max_new_tokens`` it is compared as ``generation_kwargs.max_new_tokens``
    (``max_completion_length`` where unset), and ``max_completion_length`` itself only as ``dr_grpo``'s divisor."""
    if "grpo" not in saved or current.data.format != "prompts":
        return []
    old, now = {**GrpoConfig().to_dict(), **saved["grpo"]}, current.grpo.to_dict()
    lengths = any("max_new_tokens" in table["generation_kwargs"] for table in (old, now))
    # with max_new_tokens set, max_completion_length is read only as dr_grpo's divisor
    divisor = "dr_grpo" in (old["loss_type"], now["loss_type"])
    for table in (old, now):
        sources = len(table["reward_funcs"]) + bool(table["reward_model"])
        table["reward_weights"] = [float(w) for w in table["reward_weights"]] or [1.0] * sources
        if table["epsilon_high"] is None:
            table["epsilon_high"] = table["epsilon"]
        kwargs = {k: v for k, v in table.pop("generation_kwargs").items() if k != "do_sample"}
        length = kwargs.pop("max_new_tokens", table["max_completion_length"])
        if lengths:
            table["generation_kwargs.max_new_tokens"] = length
            if not divisor:
                del table["max_completion_length"]
        table.update(kwargs)
    return [f"grpo.{name}: checkpoint {old[name]!r}, now {now[name]!r}" for name in now if old[name] != now[name]]


def reward_changes(saved: dict[str, Any], current: JobConfig) -> list[str]:
    """The ``[reward]`` settings that differ between a checkpoint's config (``saved``; one from before the
    section trained no reward model) and ``current``, as ``"reward.enabled: checkpoint False, now True"``: a DPO
    checkpoint is a causal LM, a reward model's a classifier, and the coefficient is part of the objective."""
    old, now = {**RewardConfig().to_dict(), **saved.get("reward", {})}, current.reward.to_dict()
    return [f"reward.{name}: checkpoint {old[name]!r}, now {now[name]!r}" for name in now if old[name] != now[name]]


def dpo_changes(saved: dict[str, Any], current: JobConfig) -> list[str]:
    """The ``[dpo]`` settings that differ between a checkpoint's config (``saved``) and ``current``, as
    ``"dpo.beta: checkpoint 0.1, now 0.2"``: the objective the run optimizes. A checkpoint of another format has
    none (``data_changes`` reports the format). ``loss_weights`` are compared as used: None is 1 for each loss
    type, the same as those ones spelled out."""
    if "dpo" not in saved:
        return []
    old, now = {**DpoConfig().to_dict(), **saved["dpo"]}, current.dpo.to_dict()

    def used(table: dict[str, Any], name: str) -> Any:
        if name != "loss_weights" or table[name] is not None:
            return table[name]
        return [1.0] * (len(table["loss_type"]) if isinstance(table["loss_type"], list) else 1)

    return [f"dpo.{name}: checkpoint {old[name]!r}, now {now[name]!r}" for name in now
            if old[name] != now[name] and used(old, name) != used(now, name)]


def kto_changes(saved: dict[str, Any], current: JobConfig) -> list[str]:
    """The ``[kto]`` settings that differ between a checkpoint's config (``saved``) and ``current``, as
    ``"kto.beta: checkpoint 0.1, now 0.2"``: the objective the run optimizes; and ``train.micro_batch_size``: the
    rows' KL completions are rotated within chunks of that many rows (TRL's per_device_train_batch_size), so
    another size pairs other completions, whose reference log-probs the run's start did not compute (the reference
    file holds them whatever the loss type). A checkpoint of another format has none (``data_changes`` reports
    the format)."""
    if "kto" not in saved or current.data.format != "unpaired":
        return []
    old, now = {**KtoConfig().to_dict(), **saved["kto"]}, current.kto.to_dict()
    changes = [f"kto.{name}: checkpoint {old[name]!r}, now {now[name]!r}" for name in now if old[name] != now[name]]
    was = saved.get("train", {}).get("micro_batch_size")
    if was is not None and was != current.train.micro_batch_size:
        changes.append(f"train.micro_batch_size: checkpoint {was!r}, now {current.train.micro_batch_size!r} (the "
                       f"chunk KTO's KL completions are rotated within)")
    return changes


def distill_changes(saved: dict[str, Any], current: JobConfig) -> list[str]:
    """The ``[distill]`` settings that differ between a checkpoint's config (``saved``; one from before the
    section distilled nothing) and ``current``, as ``"distill.alpha: checkpoint 1.0, now 0.5"``: the objective the
    run optimizes. The teacher is compared by whether there is one: its path may move, its weights may not (the
    trainer compares their fingerprint)."""
    old, now = {**DistillConfig().to_dict(), **saved.get("distill", {})}, current.distill.to_dict()
    if bool(old["teacher"]) != bool(now["teacher"]):
        return [f"distill.teacher: checkpoint {old['teacher']!r}, now {now['teacher']!r}"]
    return [f"distill.{name}: checkpoint {old[name]!r}, now {now[name]!r}" for name in now
            if name != "teacher" and now["teacher"] and old[name] != now[name]]


# What shapes the adapters or changes what they compute; lora.dropout may change on a resume.
_LORA_FIELDS = ("rank", "alpha", "use_rslora", "use_dora", "target_modules")


def lora_changes(saved: dict[str, Any], current: JobConfig, *,
                 default_targets: Callable[[], list[str]] | None = None,
                 saved_targets: list[str] | None = None) -> list[str]:
    """The ``[lora]`` settings that differ between a checkpoint's config (``saved``, a ``JobConfig.to_dict()``;
    one from before LoRA trained without it) and ``current``, as ``"lora.rank: checkpoint 8, now 16"``.

    ``lora.target_modules`` is compared as resolved, the modules peft wraps: ``[]`` means every projection the model
    has, which ``default_targets()`` names (the trainer's model; a resume keeps the model, ``model_changes``), so
    ``[]`` and that list written out are the same adapters. ``saved_targets``: the checkpoint's own resolved list
    (its ``trainer.pt``; absent from older ones), which wins over resolving its setting again."""
    old = {**LoraConfig().to_dict(), **saved.get("lora", {})}
    now = current.lora.to_dict()

    def resolved(names: list, recorded: list[str] | None = None) -> list[str]:
        if recorded is not None:
            return list(recorded)
        return list(default_targets()) if not names and default_targets is not None else list(names)

    def shown(names: list, targets: list[str]) -> str:
        return f"{names!r} (all the model has: {targets})" if not names and targets else repr(names)

    changes = [f"lora.{name}: checkpoint {old[name]!r}, now {now[name]!r}" for name in _LORA_FIELDS
               if name != "target_modules" and old[name] != now[name]]
    targets = "target_modules"
    # peft adapts the modules the target names match, in whatever order named
    if sorted(map(str, old[targets])) != sorted(map(str, now[targets])):
        was, is_ = resolved(old[targets], saved_targets if old["rank"] else None), resolved(now[targets])
        if sorted(map(str, was)) != sorted(map(str, is_)):
            changes.append(f"lora.target_modules: checkpoint {shown(old[targets], was)}, now "
                           f"{shown(now[targets], is_)}")
    return changes


def __getattr__(name: str):
    # The distillation loss's own names, imported at first use (not in __all__ for that): that imports torch,
    # which retnet-train's check of its overrides is done without (its __main__, before the heavy imports)
    if name in ("DISTILL_KINDS", "DISTILL_TEMPERATURES"):
        from retnet.model import distillation

        return getattr(distillation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DISCOPOP_TAU", "DPO_LOSS_TYPES", "DPO_REFERENCE_FREE_LOSS_TYPES",
    "DPO_SMOOTHED_LOSS_TYPES", "GRPO_CLIPPED_LOSS_TYPES", "GRPO_GENERATION_KWARGS", "GRPO_IMPORTANCE_LEVELS",
    "GRPO_LOSS_TYPES", "GRPO_SCALE_REWARDS", "KTO_LOSS_TYPES",
    "LORA_TARGETS", "POLICY_ONLY_LOSS_TYPES", "SIMPO_GAMMA", "DistillConfig", "DpoConfig", "GrpoConfig",
    "KtoConfig", "LoraConfig", "RewardConfig",
    "distill_changes", "dpo_changes", "grpo_changes", "kto_changes", "lora_changes", "reward_changes",
]
