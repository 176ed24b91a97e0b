"""The GRPO sampler (:mod:`retnet.train.grpo`): completions drawn with the model's recurrent cache from
seeded uniforms, so that any world size, batch split and resume sample the same ones.

Each group of ``num_generations`` completions of a prompt draws its uniforms from a ``torch.Generator`` seeded
from (``train.seed``, the step that samples, the prompt's position in the data stream), :func:`uniforms`: not the
global RNG, and not the rank (bit-identical completions on CPU; on a GPU, kernels may round differently by batch
shape). :func:`sample` packs the prompts into one row (``cu_seqlens``), repeats their states per completion, then
runs one token per forward for every row at once, until every row has sampled a stop token (the tokenizer's EOS and
the model's ``generation_config.eos_token_id``, :func:`stop_tokens`) or the uniforms' length. A token is picked by
inverse CDF over the (``repetition_penalty``-adjusted, ``temperature``-scaled; ``top_k``-, ``top_p``-,
``min_p``-cut) distribution in token-id order; the penalty counts the row's own prompt and completion only.
Under FSDP every
forward is a collective: each rank decodes until every rank's rows are done (a max all-reduce per token), its
finished rows fed a stop id and their draws dropped; :func:`gathered_weights` all-gathers each layer's weights
once for the whole loop instead of once per decoded token. Under tensor parallelism the ranks of a group decode the
same rows on the split model, every forward a collective of the group: their logits are the same (``forward``
returns them replicated) and so are their uniforms (not keyed by the rank); the tokens the group's first rank
picks are broadcast to the others besides, so that no rounding can part the ranks' completions (a row one rank
ended sooner would leave the others waiting in the next forward's collectives).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from retnet.serve.sampling import inverse_cdf  # (the server's seeded draw: one inverse CDF for both)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``[R, V]`` logits with transformers' repetition penalty (``RepetitionPenaltyLogitsProcessor``, CTRL's rule)
    on the tokens ``seen`` ``[R, V]`` bool marks: a negative logit multiplied by ``penalty``, another divided."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def _distribution(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0,
                  min_p: float | None = None, repetition_penalty: float = 1.0,
                  seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[R, V]`` the probabilities sampled from, sorted in descending order, what the cuts drop 0 and what they
    keep not yet renormalized; ``[R, V]`` their token ids) of ``[R, V]`` logits. In transformers' order (TRL's
    generate): ``repetition_penalty`` (1: off) on the tokens ``seen`` ``[R, V]`` marks, the temperature, then the
    cuts: ``top_k`` (0: off; the tokens tied with the k-th stay too), ``top_p`` of what it kept, ``min_p`` (None or
    0: off) against the most likely token."""
    logits = logits.float()  # transformers' generate processes the scores in fp32
    if repetition_penalty != 1.0:
        logits = penalize(logits, seen, repetition_penalty)
    probs = torch.softmax(logits / temperature, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True, stable=True)
    if 0 < top_k < probs.shape[-1]:
        # every token as likely as the k-th stays, as TopKLogitsWarper keeps them: bf16 logits tie often, and a
        # cut after exactly k would keep one of equals by its position in the sort
        probs = probs * (probs >= probs[:, top_k - 1:top_k])
    if top_p < 1.0:  # the most likely tokens until their mass reaches top_p (at least one)
        # of the mass top_k left (transformers renormalizes between its warpers); without it, as it always was
        limit = top_p * probs.sum(dim=-1, keepdim=True) if 0 < top_k < probs.shape[-1] else top_p
        probs = probs * ((probs.cumsum(dim=-1) - probs) < limit)
    if min_p:  # a ratio to the most likely token: renormalizing does not move it
        probs = probs * (probs >= min_p * probs[:, :1])
    return probs, order


def _pick(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_p: float, top_k: int = 0,
          min_p: float | None = None, repetition_penalty: float = 1.0,
          seen: torch.Tensor | None = None) -> torch.Tensor:
    """``[R]`` tokens drawn from ``[R, V]`` logits by inverse CDF at ``uniform`` ``[R]`` in [0, 1) over
    :func:`_distribution` (what it keeps renormalized), its tokens in id order."""
    probs, order = _distribution(logits, temperature, top_p, top_k, min_p, repetition_penalty, seen)
    # In token-id order, as the server's seeded draw: in probability order two nearly equal tokens swap places with
    # the float noise of another batch shape, and a uniform far from any boundary took the other one
    return inverse_cdf(torch.zeros_like(probs).scatter_(-1, order, probs), uniform.double())


@contextlib.contextmanager
def gathered_weights(model: torch.nn.Module):
    """Under FSDP2 (``fully_shard``): each sharded module keeps the weights its first forward all-gathers until
    the block ends, then frees them. Sampling runs one small forward per decoded token, each of which would
    otherwise all-gather every layer again (the traffic of the whole model per token); the price is the whole
    model's unsharded weights on every rank for the block, as a colocated sampler holds them. Without FSDP: nothing."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
            # As fully_shard left them: the layers reshard after forward; the root (the outermost) does not.
            module.set_reshard_after_forward(module is not sharded[0], recurse=False)


def stop_tokens(tokenizer, generation_config=None) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, then the model's ``generation_config.eos_token_id``
    (an int or a list, as ``generate`` stops on them), e.g. the ``<|im_end|>`` a chat model ends its turns with."""
    extra = getattr(generation_config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *([] if extra is None else np.atleast_1d(extra).tolist())]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: list[np.ndarray], uniforms: torch.Tensor, *, eos: int | list[int],
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float | None = None,
           repetition_penalty: float = 1.0, all_ranks: bool = False, group=None,
           vocab: int | None = None) -> tuple[list[np.ndarray], list[bool]]:
    """Completions of ``prompts``, ``G = len(uniforms) / len(prompts)`` each (consecutive), and whether each was
    clipped (no stop token within the length). ``uniforms`` ``[len(prompts) · G, max_len]``: row r's draw of each
    step. ``eos``: the stop id or ids (:func:`stop_tokens`). A completion ends with the stop token it sampled.
    ``temperature``, ``top_k``, ``top_p``, ``min_p``: the distribution's cuts (:func:`_pick`);
    ``repetition_penalty`` (1: off) is applied to the tokens of each row's prompt and of its completion so far
    (transformers' ``input_ids``, without the padding a batch would add: a row's draws stay its own).
    ``all_ranks``: decode until every rank's rows are done (a max all-reduce per token), so that each rank runs
    as many forwards as the others (under FSDP each forward is a collective); a finished row is fed a stop id
    and what it samples is dropped, so the completions are those of a run on its own. ``group``: the process group
    of a tensor-parallel group (None: none), whose ranks run the split model on the same rows: each step's tokens
    are its first rank's, broadcast to the others (one small collective a token). ``vocab``: the tokenizer's ids
    (``retnet.tokenization.vocab_bound``): the rows past them of a padded vocabulary are never drawn, as vLLM trims
    them, since no text holds them."""
    rows, length = uniforms.shape
    generations = rows // len(prompts)
    device = uniforms.device
    stop_ids = np.atleast_1d(np.asarray(eos, dtype=np.int64))
    stops = torch.from_numpy(stop_ids).to(device)
    filler = int(stop_ids[0])  # what a finished row is fed: any stop id, its outputs are not read
    bounds = torch.tensor(np.cumsum([0, *map(len, prompts)]), dtype=torch.long, device=device)
    ids = torch.from_numpy(np.concatenate(prompts)).to(device)[None]
    out = model(input_ids=ids, cu_seqlens=bounds, use_cache=True, logits_to_keep=bounds[1:] - 1, return_dict=True)
    cache = out.cache
    cache.batch_repeat_interleave(generations)
    logits = out.logits[0, :, :vocab].repeat_interleave(generations, dim=0)
    seen = None  # [rows, V]: the tokens each row's penalty applies to, its prompt's and those sampled since
    if repetition_penalty != 1.0:
        seen = torch.zeros((len(prompts), logits.shape[-1]), dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, torch.from_numpy(prompt.astype(np.int64)).to(device)] = True  # uint16 cannot index
        seen = seen.repeat_interleave(generations, dim=0)
    tokens = torch.full((rows, length), filler, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    for step in range(length):
        token = torch.where(done, filler, _pick(logits, uniforms[:, step], temperature, top_p, top_k, min_p,
                                                repetition_penalty, seen))
        if group is not None:
            torch.distributed.broadcast(token, group=group, group_src=0)
        if seen is not None:
            seen[torch.arange(rows, device=device), token] = True
        tokens[:, step] = token
        done |= torch.isin(token, stops)
        if step == length - 1:
            break
        running = (~done).any().to(torch.int32).reshape(1)
        if all_ranks:
            torch.distributed.all_reduce(running, op=torch.distributed.ReduceOp.MAX)
        if not bool(running):
            break
        logits = model(input_ids=token[:, None], cache=cache, use_cache=True, return_dict=True).logits[:, -1, :vocab]
    completions, clipped = [], []
    for row in tokens.cpu().numpy():
        ends = np.flatnonzero(np.isin(row, stop_ids))
        completions.append(row[:ends[0] + 1] if len(ends) else row)
        clipped.append(not len(ends))
    return completions, clipped


def uniforms(words: tuple[int, ...], rows: int, length: int) -> torch.Tensor:
    """``[rows, length]`` uniforms of the generator seeded from ``words`` (on the CPU: the same on any device)."""
    seed = int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0])
    return torch.rand((rows, length), generator=torch.Generator().manual_seed(seed))


__all__ = ["sample", "stop_tokens", "uniforms"]
