"""Reward models on preference pairs (``reward.enabled = true``), as TRL's RewardTrainer.

    retnet-train --config small --model.init_from=runs/sft/export --data.format=preference \\
        --data.dataset=pairs.jsonl --reward.enabled=true --train.output_dir=runs/rm

The pairs, their packing (a micro-batch of B pairs is one row of 2B ``cu_seqlens`` segments, the chosen sequences
then the rejected ones), the batches and the resume position are :class:`~retnet.train.preference.PreferenceData`'s;
:class:`RewardData` swaps the objective. The model is a ``RetNetForSequenceClassification`` with one label loaded
from ``model.init_from`` (its backbone; ``score`` freshly initialised from ``train.seed``), and a sequence's reward
is the score at its last token (the prompt, the completion and EOS: the whole sequence). A prompt-less row whose
chosen and rejected share no beginning (which DPO refuses) is scored as TRL's RewardTrainer scores every row: each
sequence is the whole text, or the whole conversation rendered with the chat template, then EOS, no prompt before
it (:func:`~retnet.train.preference.implicit_pair`). A pair's loss is
``-logsigmoid(r_chosen - r_rejected - margin)`` (``margin``: the dataset's ``margin`` column, TRL's; 0 without
one; the ``accuracy`` and ``margin`` metrics are of the rewards alone, as TRL's), plus
``reward.center_rewards_coefficient * (r_chosen + r_rejected)^2`` (TRL's ``center_rewards_coefficient``: its mean
over the batch is TRL's term). There is no reference model and no reference pass. Under context parallelism
(``train.context_parallel``) each rank runs its piece of the row, scores the sequences whose last token lies on it,
and the scores are summed over the group (the others' zero), so every rank holds them all and the gradient reaches
the piece that scored each. Dropout is off unless ``model.dropout`` sets it (TRL's ``disable_dropout``). The export
is the classifier's ``save_pretrained`` with the tokenizer: ``AutoModelForSequenceClassification`` loads it.

With ``lora.rank > 0`` (TRL's RewardTrainer with a peft config, task ``SEQ_CLS``) the backbone stays frozen under
the adapters and the new ``score`` head trains in full beside them (:mod:`retnet.train.lora`: peft's
``modules_to_save``); checkpoints hold the adapters and the head, and the export is the merged classifier (the same
``save_pretrained`` directory) plus ``adapter/``, peft's adapter with the head.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from retnet.train.checkpoint import replace_directory
from retnet.train.config import DpoConfig, ModelConfig, RewardConfig
from retnet.train.preference import MARGIN, PairBatch, PreferenceData

if TYPE_CHECKING:
    from retnet.model.context_parallel import ContextGroup

logger = logging.getLogger(__name__)

# What each step and evaluation records beside the loss: means over the global batch of pairs.
METRICS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected")


def sequence_rewards(model: torch.nn.Module, batch: PairBatch, context: ContextGroup | None = None) -> torch.Tensor:
    """``[2B]`` fp32: each packed sequence's score at its last token (chosen then rejected) under ``model`` (a
    one-label RetNetForSequenceClassification, or DDP/FSDP around one: called through its forward). ``context``:
    the row is split along time across its ranks (context parallelism); a sequence's last token lies on one piece,
    whose rank scores it, and the scores are summed over the ranks (each the others' zero), every rank returning
    them all (the gradient reaching the piece that scored each)."""
    if context is None:
        return model(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens, use_cache=False,
                     return_dict=True).logits[:, 0].float()
    inputs, shard, start = context.shard(batch.input_ids, batch.cu_seqlens)
    # one score per segment of the piece: at each sequence's end on it, and at its own last token
    scores = model(**inputs, context_parallel=shard, use_cache=False, return_dict=True).logits[:, 0].float()
    ends = batch.cu_seqlens[1:].to(scores.device)
    segment_ends = inputs["cu_seqlens"][1:].to(scores.device) + start
    found = torch.searchsorted(ends, segment_ends).clamp(max=len(ends) - 1)
    # A segment that ends no sequence (the piece's cut, the row's padding) goes to a slot left out: every score
    # stays in the graph, so that the head's gradient is there (zero) on a rank that scores no sequence.
    slot = torch.where(ends[found] == segment_ends, found, len(ends))
    rewards = torch.zeros(len(ends) + 1, dtype=torch.float32, device=scores.device).index_add(0, slot, scores)
    return context.sum(rewards[:-1])


def scores_within_frames(model: torch.nn.Module, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                         lengths: list[int] | None = None) -> torch.Tensor:
    """``[S]`` fp32: the score at the last token of each of the ``cu_seqlens`` sequences packed in ``input_ids``
    ``[1, N]`` (``model`` a one-label classifier, no gradient needed). With xPos a sequence longer than one packed
    frame (:func:`~retnet.model.modeling_retnet.xpos_span`) is scored alone and unpacked, in the model's own frames,
    as the pooling server scores such an input: packed, the model refuses it (XPosFrameError), and with it the
    others. ``lengths``: the sequences' lengths, where the caller holds them on the host (then cu_seqlens is not
    read back from the device). What ``retnet-eval`` scores pairs with, and GRPO's ``grpo.reward_model`` its
    completions."""
    from retnet.model.modeling_retnet import XPOS_PACKED_MAX_GROWTH, xpos_span

    def score(ids: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        # Alone, the mask makes the last token the scored one (transformers' rule would skip a final EOS that is
        # the pad id)
        rows = {"attention_mask": torch.ones_like(ids)} if offsets is None else {"cu_seqlens": offsets}
        return model(input_ids=ids, use_cache=False, return_dict=True, **rows).logits[:, 0].float()

    config = getattr(model, "config", None)
    frame = xpos_span(config, XPOS_PACKED_MAX_GROWTH) if getattr(config, "use_xpos", False) else None
    if frame is not None and lengths is None:  # (without xPos no host read of the bounds: every batch packs whole)
        lengths = [hi - lo for lo, hi in itertools.pairwise(cu_seqlens.tolist())]
    if frame is None or max(lengths) <= frame:
        return score(input_ids, cu_seqlens)
    bounds = [0, *itertools.accumulate(lengths)]
    rewards = torch.empty(len(lengths), dtype=torch.float32, device=input_ids.device)
    short = [i for i, length in enumerate(lengths) if length <= frame]
    if short:
        ids = torch.cat([input_ids[:, bounds[i]:bounds[i + 1]] for i in short], dim=1)
        packed = torch.tensor([0, *itertools.accumulate(lengths[i] for i in short)], dtype=cu_seqlens.dtype,
                              device=cu_seqlens.device)
        rewards[short] = score(ids, packed)
    for i in (i for i, length in enumerate(lengths) if length > frame):
        rewards[i] = score(input_ids[:, bounds[i]:bounds[i + 1]])[0]
    return rewards


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_rewards_coefficient: float = 0.0,
                margin: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` the pairs' losses, TRL's RewardTrainer's per pair: their mean is TRL's loss of the batch.
    ``margin`` ``[B]``: the reward difference each pair asks for (the dataset's ``margin`` column)."""
    difference = chosen - rejected
    losses = -F.logsigmoid(difference if margin is None else difference - margin)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def cut_pairs(pairs, eos_token_id: int | list[int]) -> int:
    """How many of ``pairs`` (:class:`~retnet.train.preference.Pairs`) have a completion that does not end with EOS
    (cut to fit ``data.seq_len``). ``eos_token_id`` may be a list, a model config's (generate's form)."""
    ends = {int(i) for i in np.atleast_1d(eos_token_id)}
    count = 0
    for index in range(len(pairs)):
        _, chosen, rejected = pairs.parts(index)
        count += int(any(len(part) == 0 or int(part[-1]) not in ends for part in (chosen, rejected)))
    return count


class RewardData(PreferenceData):
    """The preference pairs of a reward-model run: :class:`PreferenceData`'s batches and position, the loss and
    metrics of :func:`reward_loss`, nothing to start (no reference)."""

    metrics = METRICS
    changed = f"pairs edited, added or removed, or their {MARGIN!r} values"  # (the loss reads them too)

    @classmethod
    def of(cls, data: PreferenceData, cfg: RewardConfig) -> RewardData:
        """``data`` (as :func:`~retnet.train.preference.build_preference_data` built it) with this objective. Pairs
        whose completions were cut to ``data.seq_len`` are scored at their last kept token, not at EOS: counted
        in the log, so a run that cuts many raises ``data.seq_len``."""
        reward = cls.__new__(cls)
        reward.__dict__.update(data.__dict__)
        reward.reward = cfg
        reward._window = [0.0] * len(cls.metrics)
        reward._pairs_sha256 = None  # its digest holds the margins too (_content_digest)
        reward.margins = None  # on the device from start(): the margin column's values, by split
        if data.train.margins is not None or data.val.margins is not None:
            logger.info("reward model: each pair's loss is -logsigmoid(r_chosen - r_rejected - margin), margin the "
                        "dataset's %r column (TRL's)", MARGIN)
        whole = sum(int((np.asarray(pairs.lengths)[:, 0] == 0).sum()) for pairs in (data.train, data.val))
        if whole:  # what PreferenceData.start (DPO) would refuse: said, as the pairs are not split at a prompt
            logger.info("reward model: %d of %d pairs have no prompt (chosen and rejected share no beginning): each "
                        "of their sequences is scored whole (TRL's RewardTrainer)", whole,
                        len(data.train) + len(data.val))
        cut = sum(cut_pairs(pairs, data.tokenizer.eos_token_id) for pairs in (data.train, data.val))
        if cut:
            logger.warning("reward model: %d of %d pairs were cut to data.seq_len (%d) before their EOS; their "
                           "rewards are read at the last kept token, not at the end of the text: raise data.seq_len "
                           "or data.max_prompt_length's room", cut, len(data.train) + len(data.val), data.seq_len)
        return reward

    @property
    def model_class(self):
        from retnet.model import RetNetForSequenceClassification

        return RetNetForSequenceClassification

    def model_overrides(self, model: ModelConfig, init_from: Path | None, lora_dropout: float) -> dict[str, Any]:
        """One label, and dropout off unless ``model.dropout`` (or ``model.extra.dropout``) sets it (TRL's
        ``disable_dropout``, on by default in its RewardConfig). Logged."""
        explicit = model.dropout if model.dropout is not None else model.extra.get("dropout")
        lora = (f"; lora.dropout {lora_dropout} applies to the adapters' input as configured (set lora.dropout=0 "
                "for none)" if lora_dropout else "")
        if explicit is not None:
            logger.info("reward model: trains with dropout %s, as model.dropout sets it%s", explicit, lora)
            return {"num_labels": 1}
        try:
            pretrained = json.loads((Path(init_from) / "config.json").read_text()).get("dropout", 0.0)
        except (OSError, TypeError, ValueError, AttributeError):  # the model's loading refuses such a directory
            pretrained = "?"
        logger.info("reward model: dropout off (model.init_from's %s -> 0; TRL's disable_dropout); set "
                    "model.dropout to train with one%s", pretrained, lora)
        return {"num_labels": 1, "dropout": 0.0}

    def val_summary(self, record: dict[str, float]) -> str:
        return f"accuracy {record['val_accuracy']:.3f}, margin {record['val_margin']:.4f}"

    def start(self, dpo: DpoConfig, model: torch.nn.Module, autocast, device: torch.device, *, output_dir: Path,
              checkpoint: Path | None, progress: bool, barrier: Callable[[], None], group=None,
              context: ContextGroup | None = None) -> None:
        """Only where to compute, the data-parallel ranks' process group the evaluation sums over and the
        context-parallel ranks splitting each row: a reward model has no reference (its checkpoints' ``reference``
        is None), and takes pairs without a prompt, which DPO's start refuses
        (:meth:`~retnet.train.preference.PreferenceData.check_prompted`)."""
        self.device, self.autocast, self.group, self.context = device, autocast, group, context
        self.check_pairs(checkpoint)  # a resume on other pairs (or margins) at the same path is refused
        splits = {"train": self.train, "val": self.val}
        if any(pairs.margins is not None for pairs in splits.values()):
            # (a split of no pairs is encoded without its dataset's columns: no margins, and none needed)
            self.margins = {name: torch.zeros(len(pairs), device=device) if pairs.margins is None else
                            torch.as_tensor(np.asarray(pairs.margins), dtype=torch.float32, device=device)
                            for name, pairs in splits.items()}

    def _content_digest(self) -> str:
        """The pairs' tokens (:func:`~retnet.train.preference.pairs_digest`) and their ``margin`` values, which the
        loss reads too: a resume on changed margins is refused as one on changed pairs."""
        digest = hashlib.sha256(super()._content_digest().encode())
        for pairs in (self.train, self.val):
            digest.update(b"-" if pairs.margins is None else np.ascontiguousarray(pairs.margins, np.float32).tobytes())
        return digest.hexdigest()

    def _pair_loss(self, model: torch.nn.Module, batch: PairBatch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the pairs' losses ``[B]``, the sums of :data:`METRICS`, in that order)."""
        chosen, rejected = sequence_rewards(model, batch, self.context).chunk(2)
        margin = None if self.margins is None else self.margins[split][batch.pairs]
        losses = reward_loss(chosen, rejected, self.reward.center_rewards_coefficient, margin)
        chosen, rejected = chosen.detach(), rejected.detach()
        sums = torch.stack([(chosen > rejected).float().sum(), (chosen - rejected).sum(), chosen.sum(),
                            rejected.sum()])
        return losses, sums.float()


def classifier_export_config(model_config, tokenizer):
    """``model_config`` (changed in place, and returned) as a reward model's export saves it: with the tokenizer's
    pad id when it has none."""
    if model_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        # so that a batch padded by this tokenizer can be scored from input_ids alone (transformers' rule: the
        # last non-pad token), as for TRL's reward models; with an attention_mask the model needs no pad id
        model_config.pad_token_id = tokenizer.pad_token_id
    return model_config


def export_reward(directory: Path, model_config, state_dict: dict, tokenizer) -> Path:
    """``save_pretrained`` the classifier (fp32, safetensors) and tokenizer into ``directory``, replacing it
    atomically, so ``AutoModelForSequenceClassification.from_pretrained(directory)`` loads the reward model. (With
    LoRA :func:`~retnet.train.lora.export_lora` writes the merged classifier the same way.)"""
    from retnet.model import RetNetForSequenceClassification

    model = RetNetForSequenceClassification(classifier_export_config(model_config, tokenizer))
    model.load_state_dict(state_dict)  # strict: the trained classifier's own keys

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return replace_directory(Path(directory), write)


__all__ = ["METRICS", "RewardData", "classifier_export_config", "cut_pairs", "export_reward", "reward_loss",
           "scores_within_frames", "sequence_rewards"]
