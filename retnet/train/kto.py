"""Unpaired binary feedback and Kahneman-Tversky Optimization (``data.format = "unpaired"``), as TRL's KTOTrainer.

    retnet-train --config small --model.init_from=runs/sft/export --data.format=unpaired \\
        --data.dataset=feedback.jsonl --kto.beta=0.1 --train.output_dir=runs/kto

Rows are TRL's unpaired preference format, the columns ``prompt``, ``completion`` and ``label`` (a boolean: true
for a desirable completion, false for an undesirable one): two strings (*standard*) or two lists of
``{"role", "content"}`` messages (*conversational*, with the row's ``chat_template_kwargs`` if it has one), templated
and cut as DPO's pairs are (see :mod:`retnet.train.preference`: the prompt rendered with the generation prompt, or
continued when it ends with an assistant message; the completion what ``render(prompt + completion)`` adds; EOS
once; ``data.max_prompt_length`` keeps a long prompt's end, ``data.seq_len`` cuts the completion). A row is
refused, naming the dataset and the row, for a missing or mistyped field, a label that is no boolean, and a prompt
that encodes to no tokens.

KTO's KL term: each row's prompt is also paired with another row's completion (TRL's KL dataset): the completions
are rotated by one within consecutive chunks of ``train.micro_batch_size`` rows of each split (TRL's ``map`` over
``per_device_train_batch_size`` rows: a chunk's first row takes its last row's completion), their tokens as encoded
after their own prompt. A row is encoded as a :class:`~retnet.train.preference.Pairs` "pair" (prompt, completion,
KL completion), with its label beside it, so DPO's batching, packing, log-probs, reference pass and reference file
serve it: the reference log-probs of the completions and of the KL completions are computed once as the run starts
(TRL's ``precompute_ref_log_probs``), saved in ``<output_dir>/reference_logps.pt`` with a content hash of the rows
and labels, and read back (never recomputed) on a resume. The rows are shuffled per epoch as DPO's pairs (TRL's
KTOTrainer reads them in order), so a micro-batch's KL completions are those of its rows' chunks, not always its
own rows' completions; the estimate is of the same expectation.

The loss (:func:`kto_loss`, TRL's ``kto_loss``): with ``r`` a completion's log-ratio of the policy to the reference
and ``z`` the KL estimate, the mean over a micro-batch's KL completions of the policy's log-ratio, averaged over the
data-parallel ranks' micro-batches, detached and clamped at 0 (TRL's ``gather_for_metrics(kl).mean()``), a
desirable row's loss is ``desirable_weight · (1 − σ(β(r − z)))``, an undesirable one's ``undesirable_weight ·
(1 − σ(β(z − r)))``; the step's loss their mean. ``kto.loss_type = "apo_zero_unpaired"``: ``1 − σ(βr)`` and
``σ(βr)``, no KL term (the KL completions are not scored during training). The KL completions' log-probs are taken
in the same packed forward as the completions and detached (TRL scores them under ``no_grad``).

Metrics (TRL's names): ``rewards/chosen`` and ``logps/chosen`` (means over the log window's desirable rows of
``β·r`` and the policy's summed log-prob), ``rewards/rejected`` and ``logps/rejected`` (over the undesirable ones;
a kind the window has no row of is not logged, as TRL's), ``rewards/margins`` (their difference) and ``kl`` (the
mean of the micro-batches' ``z``). TRL's ``logits/chosen`` (the mean logit over a padded batch) is not computed:
only the logits of the completion tokens are.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from retnet.tokenization import closed_by_eos
from retnet.train.chat import KWARGS_COLUMN, check_template_kwargs, template_messages
from retnet.train.chat import template_identity as chat_template_identity
from retnet.train.config import ConfigError, DataConfig, KtoConfig, ModelConfig
from retnet.train.data import (
    _atomic_dir,
    _hash,
    _hf_dataset,
    column_values,
    data_fingerprint,
    first_rows,
    split_documents,
    tokenizer_fingerprint,
)
from retnet.train.distributed import is_distributed
from retnet.train.preference import (
    PairBatch,
    PairEncoder,
    Pairs,
    PreferenceData,
    _with_variables,
    completion_logps,
    field_problem,
    open_rows,
    pack_completions,
    pairs_digest,
    policy_overrides,
    prompt_tokens_key,
)

if TYPE_CHECKING:
    from retnet.model.context_parallel import ContextGroup

logger = logging.getLogger(__name__)

FIELDS = ("prompt", "completion", "label")  # TRL's unpaired preference columns
# Bumped when the cached rows change for the same key, so an old cache is not misread.
# 2: a conversational row's chat_template_kwargs column rendered with it (a cache of before rendered without)
ROWS_VERSION = 2
# The sums each micro-batch adds up (over the ranks and the log window), from which the metrics are taken: the
# desirable rows' rewards, log-probs and count, the undesirable rows' likewise, then the KL estimates' sum and count
# (each data-parallel rank adds its share, 1 / world, of a micro-batch's estimate and of one micro-batch).
SUMS = ("rewards/chosen_sum", "logps/chosen_sum", "count/chosen", "rewards/rejected_sum", "logps/rejected_sum",
        "count/rejected", "kl_sum", "count/kl")


# ----------------------------------------------------------------------------------------------------------
# Rows -> tokens
# ----------------------------------------------------------------------------------------------------------
def check_row(dataset: str, row: int, prompt: Any, completion: Any, label: Any,
              template_kwargs: Any = None) -> tuple[tuple, bool]:
    """A row's ((prompt, completion), label), messages as the template reads them; a ConfigError naming the dataset,
    the row and the field when they are neither two strings nor two non-empty lists of messages, or the label no
    boolean (TRL tells the rows by ``label is True`` / ``is False``: a 1 or "yes" would be neither).
    ``template_kwargs``: the row's ``chat_template_kwargs`` (TRL's column), carried by a conversational row's
    messages for the template (:func:`~retnet.train.preference.check_pair`'s); a standard row's has no effect."""
    where = lambda name: f"data.format 'unpaired': {name!r} of {dataset!r}, row {row}"
    if isinstance(label, np.bool_):
        label = bool(label)
    if not isinstance(label, bool):
        raise ConfigError(f"{where('label')}: holds {type(label).__name__} {label!r:.80}; expected a boolean "
                          f"(true: a desirable completion, false: an undesirable one)")
    standard = isinstance(prompt, str)
    checked = []
    for name, value in (("prompt", prompt), ("completion", completion)):
        problem = field_problem(name, value, standard, "the prompt and completion")
        if problem:
            raise ConfigError(f"{where(name)}: {problem}")
        checked.append(value if standard else template_messages(value))
    variables = None if standard else check_template_kwargs(dataset, row, template_kwargs, "unpaired")
    if variables:
        checked = [_with_variables(value, variables) for value in checked]
    return tuple(checked), label


def load_rows(cfg: DataConfig, files: list[Path] | None, cache_dir: Path, loaded=None) -> list[tuple]:
    """(row index, (prompt, completion), label) of every row (at most ``max_documents``), in row order."""
    dataset = loaded if loaded is not None else _hf_dataset(cfg, files, cache_dir, streaming=False)
    missing = [name for name in FIELDS if name not in dataset.column_names]
    if missing:
        paired = {"chosen", "rejected"} <= set(dataset.column_names)
        hint = ("; preference pairs (chosen/rejected) train with DPO, data.format 'preference' (TRL's KTOTrainer "
                "would unpair them: write them as rows of each completion with its label)" if paired else "")
        raise ConfigError(f"data.dataset {cfg.dataset!r} has no {missing} column(s) (columns: {dataset.column_names}); "
                          f"data.format 'unpaired' reads TRL's {list(FIELDS)}{hint}")
    if cfg.max_documents:
        dataset = first_rows(dataset, cfg.max_documents)
    columns = [column_values(dataset, name, cfg.dataset) for name in FIELDS]
    # TRL's apply_chat_template renders a conversational row's prompt and prompt + completion with its
    # chat_template_kwargs (the KL completions are rotated after, as encoded after their own prompts)
    columns.append(column_values(dataset, KWARGS_COLUMN, cfg.dataset) if KWARGS_COLUMN in dataset.column_names
                   else [None] * len(dataset))
    return [(row, *check_row(cfg.dataset, row, *values)) for row, values in enumerate(zip(*columns, strict=True))]


def kl_order(count: int, chunk: int) -> np.ndarray:
    """Whose completion each of ``count`` rows takes as its KL completion: the one before it within its chunk of
    ``chunk`` rows, a chunk's first row its last row's (TRL's ``_get_kl_dataset`` over batches of ``chunk``)."""
    order = np.arange(count)
    for lo in range(0, count, chunk):
        order[lo:lo + chunk] = np.roll(order[lo:lo + chunk], 1)
    return order


def encode_rows(encoder: PairEncoder, rows: list[tuple], chunk: int, batch: int = 256) -> tuple[Pairs, np.ndarray]:
    """(:class:`Pairs` of (prompt, completion, KL completion), labels ``[N]`` bool) of ``rows`` (as
    :func:`load_rows` gives them): each completion encoded after its own prompt (:meth:`PairEncoder.texts`), the KL
    completions those tokens rotated by :func:`kl_order`, each cut to the room its row's prompt leaves."""
    prompts, completions = [], []
    for start in range(0, len(rows), batch):
        chunk_rows = rows[start:start + batch]
        texts = [text for row, (prompt, completion), _ in chunk_rows
                 for text in encoder.texts(row, (prompt, completion, completion))[:2]]
        # a standard row's prompt with the tokenizer's added special tokens (a BOS), as DPO's
        encodings = encoder.encode_texts(texts, [added for _, (prompt, completion), _ in chunk_rows
                                                 for added in encoder.added((prompt, completion, completion))[:2]])
        prompts += [encodings[2 * i] for i in range(len(chunk_rows))]
        # a completion the template already closed with the EOS gets no second one
        completions += [closed_by_eos(encodings[2 * i + 1], encoder.eos) for i in range(len(chunk_rows))]
    tokens, lengths = [], []
    for (row, *_), prompt, completion, other in zip(rows, prompts, completions, kl_order(len(rows), chunk),
                                                    strict=True):
        parts = encoder._cut(row, prompt, completion, completions[other], distinct=False)
        tokens += [np.asarray(part, dtype=encoder.dtype) for part in parts]
        lengths.append([len(part) for part in parts])
    flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=encoder.dtype)
    pairs = Pairs(flat, np.asarray(lengths, dtype=np.int64).reshape(-1, 3),
                  np.asarray([row for row, *_ in rows], dtype=np.int64))
    return pairs, np.asarray([label for *_, label in rows], dtype=bool)


# ----------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------
def kto_loss(policy: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor,
             cfg: KtoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses ``[B]``, rewards ``[B]``) of B rows from their completions' summed log-probs under the policy and
    the reference, their ``labels`` (True: desirable) and the KL estimate ``kl`` (detached, clamped; ignored by
    ``apo_zero_unpaired``), as TRL's ``KTOTrainer.kto_loss`` computes each ``loss_type``. The rewards are ``beta``
    times the policy's log-ratio to the reference, as TRL's."""
    logratios = policy - reference
    beta = cfg.beta
    if cfg.loss_type == "kto":  # the KTO paper's eq. 7: the value of a gain, or of a loss, against the KL point
        desirable = 1 - torch.sigmoid(beta * (logratios - kl))
        undesirable = 1 - torch.sigmoid(beta * (kl - logratios))
    elif cfg.loss_type == "apo_zero_unpaired":  # APO-zero unpaired: raise the desirable, lower the undesirable
        desirable = 1 - torch.sigmoid(beta * logratios)
        undesirable = torch.sigmoid(beta * logratios)
    else:  # the config refuses any other
        raise ValueError(f"kto.loss_type {cfg.loss_type!r} is not one of KTO's")
    losses = torch.where(labels, cfg.desirable_weight * desirable, cfg.undesirable_weight * undesirable)
    return losses, beta * logratios.detach()


def kto_metrics(sums: list[float]) -> dict[str, float]:
    """The metrics (TRL's names) of :data:`SUMS` added up over a window or an evaluation: a kind of row that none
    was of is left out (TRL's KTOTrainer logs only the kinds its batches held), and so are its margins."""
    reward_c, logps_c, count_c, reward_r, logps_r, count_r, kl, batches = sums
    out = {}
    if count_c:
        out["rewards/chosen"], out["logps/chosen"] = reward_c / count_c, logps_c / count_c
    if count_r:
        out["rewards/rejected"], out["logps/rejected"] = reward_r / count_r, logps_r / count_r
    if count_c and count_r:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if batches:
        out["kl"] = kl / batches
    return out


# ----------------------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------------------
class KtoData(PreferenceData):
    """The labelled rows of a KTO run as :class:`PreferenceData`'s pairs (prompt, completion, KL completion) and
    their labels: the same batches, reference log-probs (of the completions and the KL completions), resume
    position and trainer hooks, with KTO's loss (:func:`kto_loss`) and metrics (:func:`kto_metrics`)."""

    kto = True
    metrics = SUMS
    rows_called = "rows"  # (labelled rows, each scored alone: no pairs)

    def __init__(self, train: Pairs, val: Pairs, labels: dict[str, np.ndarray], tokenizer, **settings):
        super().__init__(train, val, tokenizer, **settings)
        self.row_labels = labels  # "train" / "val": [N] bool, the rows' labels (True: desirable)
        self.labels: dict[str, torch.Tensor] = {}
        self.cfg: KtoConfig | None = None
        self._saved_kl_ranks: int | None = None  # a resumed checkpoint's (state_dict's kl_ranks)

    @property
    def with_kl(self) -> bool:
        """The loss estimates the KL term (``apo_zero_unpaired`` has none: its KL completions are not scored)."""
        return self.cfg is None or self.cfg.loss_type == "kto"

    def model_overrides(self, model: ModelConfig, init_from: Path | None, lora_dropout: float) -> dict[str, Any]:
        """Dropout off in the policy, as DPO's (:func:`~retnet.train.preference.policy_overrides`; TRL's KTOConfig
        has the same ``disable_dropout``)."""
        return policy_overrides(model, init_from, lora_dropout, objective="KTO")

    def val_summary(self, record: dict[str, float]) -> str:
        shown = [f"{name} {record[f'val_{name}']:.4f}" for name in ("kl", "rewards/margins") if f"val_{name}" in record]
        return ", ".join(shown) or "no labelled rows scored"

    def start(self, kto: KtoConfig, model: torch.nn.Module, autocast, device: torch.device, *, output_dir: Path,
              checkpoint: Path | None, progress: bool, barrier: Callable[[], None], group=None,
              context: ContextGroup | None = None) -> None:
        """Hold the reference log-probs of the completions and the KL completions, as
        :meth:`PreferenceData.start` holds DPO's (computed and written as the run starts, read back on a resume),
        and the labels on ``device``."""
        self.cfg, self.device, self.autocast, self.group, self.context = kto, device, autocast, group, context
        self.labels = {name: torch.from_numpy(np.asarray(labels, dtype=bool)).to(device)
                       for name, labels in self.row_labels.items()}
        self._warn_of_weights()
        self._warn_of_kl_ranks()
        self._hold_reference(model, output_dir=output_dir, checkpoint=checkpoint, progress=progress, barrier=barrier)

    def _warn_of_weights(self) -> None:
        """TRL's warning when the weighted counts of the desirable and undesirable rows are out of balance and
        neither weight alone would restore it (the KTO paper's eq. 8: desirable_weight · n_desirable /
        (undesirable_weight · n_undesirable) in [1, 4/3]; equal counts under unequal weights too, which TRL
        does not check);
        a set of one kind is said to be so (TRL counts a missing kind as 1 row and gives ranges for it)."""
        labels = np.asarray(self.row_labels["train"], dtype=bool)
        counts = int(labels.sum()), int((~labels).sum())
        if 0 in counts:  # no weight makes up for a kind the set lacks: TRL's ranges (of a count of 1) would mislead
            kind, other = ("desirable", "undesirable") if counts[0] else ("undesirable", "desirable")
            logger.warning("KTO: all %d training rows are %s (none %s): no weight balances the two kinds (the KTO "
                           "paper's eq. 8); kto.%s_weight only scales the loss", len(labels), kind, other, kind)
            return
        desirable, undesirable = counts
        # Equal counts are checked too: weights that differ (kto.desirable_weight=2 on a balanced set) unbalance
        # them as eq. 8 reads (TRL checks only sets whose counts differ)
        weights = self.cfg.desirable_weight, self.cfg.undesirable_weight
        desirable_range = [round(undesirable * weights[1] / desirable * bound, 2) for bound in (1, 1.33)]
        undesirable_range = [round(desirable * weights[0] / undesirable / bound, 2) for bound in (1.33, 1)]
        if not (desirable_range[0] <= weights[0] <= desirable_range[1]
                or undesirable_range[0] <= weights[1] <= undesirable_range[1]):
            how = (f"kto.desirable_weight {weights[0]:g} and kto.undesirable_weight {weights[1]:g} unbalance them"
                   if desirable == undesirable else "the weights do not make up for the difference")
            source = "the KTO paper's eq. 8" if desirable == undesirable else "the KTO paper's eq. 8, as TRL's KTOTrainer warns"
            logger.warning("KTO: %d desirable and %d undesirable training rows, and %s: set EITHER "
                           "kto.desirable_weight in %s or kto.undesirable_weight in %s (not both; %s)", desirable,
                           undesirable, how, desirable_range, undesirable_range, source)

    def _warn_of_kl_ranks(self) -> None:
        """A resume on another number of data-parallel ranks: the KL estimate is over the ranks' micro-batches of
        an accumulation index (TRL's gather over the processes), so it takes other rows than the checkpoint's run
        did, and the run continues on another trajectory than the uninterrupted one (DPO's would not)."""
        saved = self._saved_kl_ranks
        if self.with_kl and saved is not None and saved != self.world_size:
            logger.warning("KTO: resuming on %d data-parallel rank(s) a run whose KL estimates each spanned %d "
                           "rank(s)' micro-batches: the estimates, and so the steps, are not those the run would "
                           "have taken (resume on %d data-parallel rank(s) to continue it exactly)", self.world_size,
                           saved, saved)

    def _content_digest(self) -> str:
        """The rows' tokens (:func:`pairs_digest`) and their labels: a resume on relabelled rows is refused too."""
        digest = hashlib.sha256(pairs_digest([self.train, self.val]).encode())
        for name in ("train", "val"):
            digest.update(np.ascontiguousarray(self.row_labels[name], dtype=bool).tobytes())
        return digest.hexdigest()

    def _batch(self, pairs: Pairs, ids: np.ndarray) -> PairBatch:
        """Completions then KL completions (B + B sequences); the completions alone without a KL term."""
        if self.with_kl:
            return pairs.batch(ids)
        parts = [pairs.parts(i) for i in ids]
        input_ids, bounds, keep, labels, sequence, lengths = pack_completions([(p, c) for p, c, _ in parts])
        return PairBatch(input_ids, torch.tensor(bounds, dtype=torch.int32), keep, labels, sequence, lengths,
                         torch.as_tensor(np.asarray(ids, dtype=np.int64)))

    def micro_batches(self, accum: int) -> list[PairBatch]:
        batches = super().micro_batches(accum)
        if not self.with_kl:  # the step's tokens are the completions' sequences alone
            lengths = self.train.lengths[self.block_rows(self.consumed - self.global_batch, self.global_batch)]
            self.step_tokens, self.step_head_tokens = int(lengths[:, :2].sum()), int(lengths[:, 1].sum())
        return batches

    def _kl(self, logratios: torch.Tensor) -> torch.Tensor:
        """The KL estimate of a micro-batch from its KL completions' log-ratios: their mean over every
        data-parallel rank's micro-batch (:attr:`group`, whose ranks all score one now), clamped at 0."""
        stats = torch.stack([logratios.detach().sum(), torch.tensor(float(len(logratios)), device=logratios.device)])
        if is_distributed():
            torch.distributed.all_reduce(stats, group=self.group)
        return (stats[0] / stats[1]).clamp(min=0)

    def _pair_loss(self, model: torch.nn.Module, batch: PairBatch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the rows' losses ``[B]``, their :data:`SUMS`)."""
        policy = completion_logps(model, batch, self.context)
        rows = len(batch.pairs)
        reference = self.reference[split][batch.pairs]
        labels = self.labels[split][batch.pairs]
        completions = policy[:rows]
        kl = self._kl(policy[rows:] - reference[:, 1]) if self.with_kl else torch.zeros((), device=policy.device)
        losses, rewards = kto_loss(completions, reference[:, 0], labels, kl, self.cfg)
        logps, share = completions.detach(), 1 / self.world_size
        sums = torch.stack([rewards[labels].sum(), logps[labels].sum(), labels.sum().float(),
                            rewards[~labels].sum(), logps[~labels].sum(), (~labels).sum().float(),
                            kl * share, torch.tensor(share, device=policy.device)]).float()
        return losses, sums

    def record_step(self, sums: torch.Tensor) -> None:
        """The global batch's :data:`SUMS` (every rank's) go into the log window as they are."""
        self._add_to_window(sums)

    def _window_record(self) -> dict[str, float]:
        """:func:`kto_metrics` of the window's sums (they carry their own counts)."""
        return kto_metrics(self._window)

    def _val_record(self, sums: torch.Tensor, total: int) -> dict[str, float]:
        values = sums.tolist()
        return {"val_loss": values[0] / total,
                **{f"val_{name}": value for name, value in kto_metrics(values[1:]).items()}}

    def state_dict(self) -> dict[str, Any]:
        # kl_ranks: the data-parallel ranks each KL estimate spans, which a resume on other ranks warns of
        return {**super().state_dict(), "kind": "unpaired", "kl_ranks": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "unpaired":
            raise ValueError(f"data state of kind {state.get('kind')!r} cannot resume an unpaired (KTO) run")
        super().load_state_dict({**state, "kind": "preference"})
        self._saved_kl_ranks = state.get("kl_ranks")


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------
def build_kto_data(cfg: DataConfig, *, seed: int, micro_batch: int, global_batch: int, rank: int, local_rank: int,
                   world_size: int, tokenizer_dir: Path | None, barrier: Callable[[], None],
                   hub_fingerprint: str | None = None) -> KtoData:
    """:func:`~retnet.train.data.build_data` of ``data.format = "unpaired"``, as
    :func:`~retnet.train.preference.build_preference_data` builds pairs: a held-out ``val_fraction`` of the rows,
    tokenized by local rank 0 into a cache keyed by the data, the tokenizer, its template, ``seq_len``,
    ``max_prompt_length`` and ``micro_batch`` (the KL completions' chunk); the other ranks wait at ``barrier``."""
    cache_dir, files, loaded, fingerprint, tokenizer = open_rows(
        cfg, "unpaired", FIELDS, local_rank=local_rank, tokenizer_dir=tokenizer_dir, barrier=barrier,
        hub_fingerprint=hub_fingerprint)
    key = prompt_tokens_key(tokenizer, _hash(ROWS_VERSION, data_fingerprint(cfg, files, fingerprint),
                                             tokenizer_fingerprint(tokenizer), chat_template_identity(tokenizer),
                                             cfg.seq_len, cfg.max_prompt_length, micro_batch))
    cache = cache_dir / f"unpaired-{key}"
    if local_rank == 0 and not (cache / "meta.json").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        logger.info("data: reading %s", cfg.dataset)
        splits = split_documents(load_rows(cfg, files, cache_dir, loaded), cfg.val_fraction, dataset=cfg.dataset,
                                 max_documents=cfg.max_documents)
        encoder = PairEncoder(tokenizer, cfg)

        def write(tmp: Path) -> None:
            for name, rows in zip(("train", "val"), splits, strict=True):
                pairs, labels = encode_rows(encoder, rows, micro_batch)
                pairs.save(tmp, name)
                np.save(tmp / f"{name}.labels.npy", labels)
            (tmp / "meta.json").write_text(f'{{"rows": [{len(splits[0])}, {len(splits[1])}]}}')  # last: complete

        _atomic_dir(cache, write)
        logger.info("data: %d + %d unpaired rows tokenized in %.1fs", *map(len, splits), time.perf_counter() - started)
    barrier()
    labels = {name: np.load(cache / f"{name}.labels.npy") for name in ("train", "val")}
    data = KtoData(Pairs.load(cache, "train"), Pairs.load(cache, "val"), labels, tokenizer, key=key,
                   seq_len=cfg.seq_len, seed=seed, micro_batch=micro_batch, global_batch=global_batch, rank=rank,
                   world_size=world_size, dataset=cfg.dataset)
    counts = [int(labels[name].sum()) for name in ("train", "val")]
    logger.info("data: %d train (%d desirable), %d validation (%d desirable) unpaired rows (cache %s)",
                len(data.train), counts[0], len(data.val), counts[1], cache)
    data.hub_fingerprint = fingerprint
    return data


__all__ = ["FIELDS", "SUMS", "KtoData", "build_kto_data", "check_row", "encode_rows", "kl_order", "kto_loss",
           "kto_metrics", "load_rows"]
