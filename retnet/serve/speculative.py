"""Speculative decoding (``--speculative-config``): the drafts, by prompt lookup (vLLM's n-gram proposer) or by a
small draft RetNet (vLLM's ``draft_model``).

The step that verifies them is :meth:`retnet.serve.engine.Engine._speculative_step`, beside the decode step it
stands in for: it samples through the engine's own ``sample_step`` and ``_advance``, so that speculation changes
no answer, whoever proposed the drafts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from retnet.model import RetNetCache

if TYPE_CHECKING:
    from retnet.serve.sequence import SeqOutput, Sequence
    from retnet.serve.settings import SpeculativeConfig

# A speculative step feeds a few tokens a row: the recurrent form, as a decode step (the same arithmetic token by
# token; on the reference path the parallel form measured slower for these lengths).
VERIFY_MODE = "recurrent"
# A draft state catching up on a prompt: the chunkwise form, as the engine's prefill (linear in the length).
DRAFT_PREFILL_MODE = "chunkwise"


class PromptNgrams:
    """Where each n-gram of a prompt last ended, for n in ``sizes``: the part of prompt lookup that a request's
    ``n`` choices share (their prompt is one), built once for them all; each choice's :class:`NgramIndex` adds the
    n-grams of its own tokens. The n-gram ending at the prompt's last token is left to the choices: looked up before
    any token is generated, it is the suffix itself, not an earlier occurrence."""

    __slots__ = ("ends", "tokens")

    def __init__(self, tokens: list[int], sizes: range):
        self.tokens = tokens  # the group's inputs, never changed once it decodes: not copied
        last = len(tokens) - 1
        # zip of the shifted lists gives the n-grams in order, so a later occurrence overwrites an earlier one.
        self.ends: dict[int, dict[tuple[int, ...], int]] = {
            n: dict(zip(zip(*(tokens[i:] for i in range(n))), range(n - 1, last))) for n in sizes}


class NgramIndex:
    """Prompt lookup (vLLM's n-gram proposer) for one choice: where each n-gram of its tokens (prompt, then
    generated) last ended, for n in ``sizes``, so that a step finds the most recent earlier occurrence of the last n
    tokens in O(n) rather than by a scan of the context. The n-grams within the prompt ``tokens`` are ``prompt``'s,
    their :class:`PromptNgrams` shared with the other choices of its request (made here when not given); those
    reaching into the choice's generated tokens are its own, added as they are generated, so that no choice
    proposes another's tokens."""

    __slots__ = ("ends", "generated", "indexed", "prompt")

    def __init__(self, tokens: list[int], sizes: range, prompt: PromptNgrams | None = None):
        self.prompt = prompt if prompt is not None else PromptNgrams(list(tokens), sizes)
        self.generated: list[int] = []
        # The n-grams ending before this position are indexed: in ``prompt`` up to the prompt's last token (not
        # included), in ``ends`` from there on.
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}
        self.indexed = max(len(self.prompt.tokens) - 1, 0)

    def _span(self, start: int, end: int) -> list[int]:
        """``(prompt + generated)[start:end]``, without building the whole list."""
        prompt = self.prompt.tokens
        head = prompt[start:end] if start < len(prompt) else []
        return head + self.generated[max(0, start - len(prompt)) : max(0, end - len(prompt))]

    def propose(self, new_tokens: list[int], count: int) -> list[int]:
        """Append ``new_tokens``, then the ``count`` tokens that followed the latest earlier occurrence of the
        last n tokens, the longest n that has one first; [] when none has."""
        self.generated.extend(new_tokens)
        total = len(self.prompt.tokens) + len(self.generated)
        last = total - 1
        # The tokens this step reads, from ``start`` on: the n-grams to add and the suffixes to look up.
        longest = max(self.ends)
        start = max(0, min(self.indexed, total - longest) - longest + 1)
        tail = self._span(start, total)
        # Every n-gram ending before the last token (the one ending at it is the suffix looked up).
        for end in range(self.indexed, last):
            for n, table in self.ends.items():
                if end + 1 >= n:
                    table[tuple(tail[end + 1 - n - start : end + 1 - start])] = end
        self.indexed = max(self.indexed, last)
        for n in sorted(self.ends, reverse=True):
            if n > total:
                continue
            suffix = tuple(tail[total - n - start :])
            # The choice's own n-grams all end after the prompt's: the latest occurrence is one of them if any.
            end = self.ends[n].get(suffix)
            if end is None:
                end = self.prompt.ends[n].get(suffix)
            if end is not None:
                # Past the last token, what followed the occurrence is the drafts themselves: a match ``period``
                # tokens back proposes the last ``period`` tokens repeated (a loop of one token, its repeats),
                # not just the few tokens up to the end.
                draft = self._span(end + 1, end + 1 + count)
                period = last - end
                while len(draft) < count:
                    draft.append(draft[len(draft) - period])
                return draft
        return []


def propose_drafts(running: list[Sequence], config: SpeculativeConfig) -> list[list[int]]:
    """Each of ``running``'s draft tokens by prompt lookup ([]: it decodes one token), never more than its
    ``max_tokens`` leaves after the token the step samples anyway; its :class:`NgramIndex` is made at its first
    step with room for drafts, then fed the tokens sampled since. A prompt's n-grams are indexed once
    (``Group.ngrams``), at the first of its choices to draft: its ``n`` choices share them."""
    drafts = []
    for seq in running:
        room = min(config.num_speculative_tokens, seq.group.params.max_tokens - len(seq.tokens) - 1)
        # A row that refused a draft last step drafts as well: its drafts follow the tokens it has to feed again.
        if room <= 0 or seq.done:
            drafts.append([])
            continue
        if seq.ngrams is None:
            sizes = range(config.prompt_lookup_min, config.prompt_lookup_max + 1)
            group = seq.group
            if group.ngrams is None:
                group.ngrams = PromptNgrams(group.inputs, sizes)
            seq.ngrams = NgramIndex(group.inputs, sizes, group.ngrams)
        drafts.append(seq.ngrams.propose(seq.tokens[len(seq.ngrams.generated) :], room))
    return drafts


@dataclass(slots=True)
class DraftState:
    """A sequence's state in the draft model: ``cache`` (one row) has absorbed the first ``fed`` tokens of its
    ``group.inputs + tokens``."""

    cache: RetNetCache
    fed: int


class DraftModel:
    """vLLM's ``draft_model`` proposer: a small RetNet with the target's tokenizer proposes each row's drafts
    greedily from its own recurrent state (``Sequence.draft_state``), batched over the rows that speculate: one
    packed forward feeds every row the tokens its draft state lacks (``cu_seqlens``; the tokens of the last step,
    or a prompt at a sequence's first step), then one one-token recurrent forward each further draft token.

    A row's draft state is kept as it is after the tokens it lacked, before its drafts: whatever the verification
    accepts, it holds a prefix of the sequence's tokens, and the next step feeds it the rest (as ``Sequence.lag``
    does the target's). So joining, leaving, preemption, a prefix-cache hit or a session's restored state need
    nothing of it: a sequence without one is prefilled on its tokens (a session's earlier turns, which only the
    target's state holds, are not among them: its drafts know the current turn alone). Drafts are proposals only
    (the target accepts a token iff its own sample is it), so the draft runs without LoRA adapters or quantization
    and no state of it needs to be exact."""

    def __init__(self, model, config: SpeculativeConfig, chunk_tokens: int, budget_tokens: int):
        self.model = model
        self.k = config.num_speculative_tokens
        # A row far behind (a prompt, a prefix-cache hit, a session's turn) is caught up in pieces, ``chunk_tokens``
        # a row and ``budget_tokens`` a step (the prefill's bounds), so that no step stalls the batch on it; the
        # row proposes once its state has the whole context. A piece of at least k + 2 tokens: a row that proposes
        # nothing still gains a token a step, and one with drafts up to k + 1, so a smaller piece could fall
        # behind for ever (--prefill-chunk-tokens 1 would never draft).
        self.chunk_tokens = max(chunk_tokens, self.k + 2)
        self.budget_tokens = max(budget_tokens, self.chunk_tokens)
        # The rows catching up (by id: no reference kept to a sequence that left), in the order they are served,
        # first the one served longest ago: a row served goes to the back, so that however many rows are behind,
        # each gets its piece in turn.
        self.behind: dict[int, None] = {}
        self.device = next(model.parameters()).device

    def propose(self, running: list[Sequence]) -> list[list[int]]:
        """Each of ``running``'s draft tokens, never more than its ``max_tokens`` leaves after the token the step
        samples anyway ([]: it decodes one token, as a row whose draft state is still catching up).

        A row's steady feed (the tokens of its last step, at most k + 1) is fed whatever the budget: charging it
        would leave the rows past the budget without drafts, further behind each step. Only catching up (more
        than k + 1 tokens behind) is charged to the budget, round robin.

        The choices of one prompt (its ``n``) at the same place in it catch up on it together: one piece fed once,
        in a forward of its own before the rows' (the prompt's states of its choices are one, as the target's
        prefill is), its state then shared by them; past the prompt each feeds its own tokens."""
        drafts: list[list[int]] = [[] for _ in running]
        room_of: dict[int, int] = {}
        steady: set[int] = set()  # the rows at most k + 1 tokens behind: their steady feed
        for i, seq in enumerate(running):
            room = min(self.k, seq.group.params.max_tokens - len(seq.tokens) - 1)
            if room <= 0 or seq.done:
                continue
            fed = _fed(seq)
            total = len(seq.group.inputs) + len(seq.tokens)
            if total <= fed:  # every step samples a token: a state holding them all is a bug, not a case
                raise AssertionError(f"the draft state holds {fed} tokens of {total}")
            room_of[i] = room
            if total - fed <= self.k + 1:
                steady.add(i)
        # The rows catching up within their prompt, by (prompt, tokens held): those of one key hold the same state.
        # A steady row is fed its tokens at once, whatever the budget (below), not queued as a group.
        in_prompt: dict[tuple[int, int], list[int]] = {}
        for i in room_of:
            seq = running[i]
            if i not in steady and _fed(seq) < len(seq.group.inputs):
                in_prompt.setdefault((id(seq.group), _fed(seq)), []).append(i)
        sharing = {i for rows in in_prompt.values() if len(rows) > 1 for i in rows}
        ends: dict[int, int] = {}  # row -> how many of its tokens its draft state holds after this step's feed
        # What catches up, by the id of its first sequence: a row alone, or the choices sharing a prompt's piece.
        behind: dict[int, list[int]] = {}
        for i in room_of:
            seq = running[i]
            if i in steady:
                ends[i] = len(seq.group.inputs) + len(seq.tokens)
            elif i not in sharing:
                behind[id(seq)] = [i]
        behind.update((id(running[rows[0]]), rows) for rows in in_prompt.values() if len(rows) > 1)
        # Those still behind keep their turn; the others are forgotten (they left, or caught up).
        self.behind = {key: None for key in self.behind if key in behind}
        self.behind.update(dict.fromkeys(behind))
        budget = self.budget_tokens
        shared: list[tuple[list[int], int]] = []  # the choices sharing a piece, and where it ends
        for key in list(self.behind):
            if budget <= 0:
                break
            rows = behind[key]
            seq = running[rows[0]]
            fed = _fed(seq)
            # Shared, a piece stops at the prompt's end: past it the choices' tokens differ.
            last = len(seq.group.inputs) + (0 if len(rows) > 1 else len(seq.tokens))
            piece = min(last - fed, self.chunk_tokens)
            end = fed + min(piece, budget)
            budget -= end - fed
            if len(rows) > 1:
                shared.append((rows, end))
            else:
                ends[rows[0]] = end
            if end - fed == piece:  # a row cut short by the budget keeps its turn
                del self.behind[key]
                self.behind[key] = None
        if shared:
            states = [running[rows[0]].draft_state for rows, _ in shared]
            out, _ = self._forward(states, [_context(running[rows[0]], _fed(running[rows[0]]), end)
                                            for rows, end in shared])
            # The choices' states are one object, never written into (see below): each forward copies its rows.
            for (rows, end), row in zip(shared, out.cache.split()):
                for i in rows:
                    seq = running[i]
                    seq.draft_state = DraftState(row, end)
                    total = len(seq.group.inputs) + len(seq.tokens)
                    if end == len(seq.group.inputs) and total - end <= self.k + 1:  # its own tokens: fed below
                        ends[i] = total
        rows = sorted(ends)
        if not rows:
            return drafts
        feeds = [_context(running[i], _fed(running[i]), ends[i]) for i in rows]
        # A row proposes once its draft state holds every token (a row still catching up decodes one).
        rooms = [room_of[i] if ends[i] == len(running[i].group.inputs) + len(running[i].tokens) else 0 for i in rows]
        states = [running[i].draft_state for i in rows]
        out, first = self._forward(states, feeds)
        # Views of the forward's rows: the forwards below replace the cache's tensors, never write into them.
        for i, state, feed, row in zip(rows, states, feeds, out.cache.split()):
            running[i].draft_state = DraftState(row, (0 if state is None else state.fed) + len(feed))
        wanted = max(rooms)
        if wanted == 0:
            return drafts
        # Greedy: with a one-hot proposal, the draft most likely to be the target's sample. The tokens stay on the
        # device, fed back as the next input, read once at the end.
        tokens = [first.argmax(-1)]
        cache = out.cache
        for _ in range(wanted - 1):
            step = self.model(input_ids=tokens[-1][:, None], cache=cache, use_cache=True, retention_mode="recurrent",
                              logits_to_keep=1, return_dict=True)
            cache = step.cache
            tokens.append(step.logits[:, -1].argmax(-1))
        for i, room, proposed in zip(rows, rooms, torch.stack(tokens, 1).tolist()):
            drafts[i] = proposed[:room]
        return drafts

    def _forward(self, states: list[DraftState | None], feeds: list[list[int]]):
        """One forward of the draft feeding row r ``feeds[r]`` from ``states[r]`` (None: from nothing): the output,
        and each row's logits at its last token ``[rows, V]``."""
        if all(state is None for state in states):
            cache = RetNetCache(self.model.config.num_hidden_layers)  # the model starts every row from zero
        else:
            cache = RetNetCache.concat([state.cache if state is not None
                                        else RetNetCache.zeros(self.model.config, 1, self.device) for state in states])
        longest = max(len(feed) for feed in feeds)
        if longest == 1:  # every draft refused last step: a decode step's shape, with no packing to do
            out = self.model(input_ids=torch.tensor(feeds, dtype=torch.long, device=self.device), cache=cache,
                             use_cache=True, retention_mode="recurrent", logits_to_keep=1, return_dict=True)
            return out, out.logits[:, -1]
        cu_seqlens = torch.tensor([0, *itertools.accumulate(len(feed) for feed in feeds)], dtype=torch.long,
                                  device=self.device)
        ids = torch.tensor([[token for feed in feeds for token in feed]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=cache, use_cache=True, cu_seqlens=cu_seqlens,
                         retention_mode=VERIFY_MODE if longest <= self.k + 1 else DRAFT_PREFILL_MODE,
                         logits_to_keep=cu_seqlens[1:] - 1, return_dict=True)
        return out, out.logits[0]


def _fed(seq: Sequence) -> int:
    return 0 if seq.draft_state is None else seq.draft_state.fed


def _context(seq: Sequence, start: int, end: int) -> list[int]:
    """``(seq.group.inputs + seq.tokens)[start:end]``, without building the whole list."""
    inputs = seq.group.inputs
    head = inputs[start:end] if start < len(inputs) else []
    return head + seq.tokens[max(0, start - len(inputs)) : max(0, end - len(inputs))]


def accepted_drafts(draft: list[int], outputs: list[SeqOutput]) -> int:
    """How many of ``draft``'s tokens the row sampled, in order (its accepted drafts)."""
    tokens = [token for out in outputs for token in out.token_ids]
    return next((p for p, token in enumerate(draft) if p >= len(tokens) or tokens[p] != token), len(draft))


__all__ = ["VERIFY_MODE", "DraftModel", "DraftState", "NgramIndex", "PromptNgrams", "accepted_drafts",
           "propose_drafts"]
