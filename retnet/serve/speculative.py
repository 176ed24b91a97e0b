"""n-gram speculative decoding (``--speculative-config``): the drafts, by prompt lookup (vLLM's n-gram proposer).

The step that verifies them is :meth:`retnet.serve.engine.Engine._speculative_step`, beside the decode step it
stands in for: it samples through the engine's own ``sample_step`` and ``_advance``, so that speculation changes
no answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retnet.serve.sequence import SeqOutput, Sequence
    from retnet.serve.settings import SpeculativeConfig

# A speculative step feeds a few tokens a row: the recurrent form, as a decode step (the same arithmetic token by
# token; on the reference path the parallel form measured slower for these lengths).
VERIFY_MODE = "recurrent"


class NgramIndex:
    """Prompt lookup (vLLM's n-gram proposer): where each n-gram of a sequence's tokens (prompt, then generated)
    last ended, for n in ``sizes``, so that a step finds the most recent earlier occurrence of the last n tokens
    in O(n) rather than by a scan of the context. Tokens are added as they are generated."""

    __slots__ = ("ends", "indexed", "tokens")

    def __init__(self, tokens: list[int], sizes: range):
        self.tokens = list(tokens)
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}
        self.indexed = 0  # the n-grams ending before this position are in ``ends``

    def propose(self, new_tokens: list[int], count: int) -> list[int]:
        """Append ``new_tokens``, then the ``count`` tokens that followed the latest earlier occurrence of the
        last n tokens, the longest n that has one first; [] when none has."""
        tokens = self.tokens
        tokens.extend(new_tokens)
        last = len(tokens) - 1
        # Every n-gram ending before the last token (the one ending at it is the suffix looked up).
        for end in range(self.indexed, last):
            for n, table in self.ends.items():
                if end + 1 >= n:
                    table[tuple(tokens[end + 1 - n : end + 1])] = end
        self.indexed = max(self.indexed, last)
        for n in sorted(self.ends, reverse=True):
            if n > len(tokens):
                continue
            end = self.ends[n].get(tuple(tokens[len(tokens) - n :]))
            if end is not None:
                # Past the last token, what followed the occurrence is the drafts themselves: a match ``period``
                # tokens back proposes the last ``period`` tokens repeated (a loop of one token, its repeats),
                # not just the few tokens up to the end.
                draft = tokens[end + 1 : end + 1 + count]
                period = last - end
                while len(draft) < count:
                    draft.append(draft[len(draft) - period])
                return draft
        return []


def propose_drafts(running: list[Sequence], config: SpeculativeConfig) -> list[list[int]]:
    """Each of ``running``'s draft tokens by prompt lookup ([]: it decodes one token), never more than its
    ``max_tokens`` leaves after the token the step samples anyway; its :class:`NgramIndex` is made at its first
    step with room for drafts, then fed the tokens sampled since."""
    drafts = []
    for seq in running:
        room = min(config.num_speculative_tokens, seq.group.params.max_tokens - len(seq.tokens) - 1)
        # A row catching up (its state behind by more than the last token) proposes nothing this step: its
        # feed brings the state up to date, so that no row falls further behind.
        if room <= 0 or seq.done or seq.lag > 1:
            drafts.append([])
            continue
        if seq.ngrams is None:
            seq.ngrams = NgramIndex(seq.group.inputs,
                                    range(config.prompt_lookup_min, config.prompt_lookup_max + 1))
        known = len(seq.ngrams.tokens) - len(seq.group.inputs)
        drafts.append(seq.ngrams.propose(seq.tokens[known:], room))
    return drafts


def accepted_drafts(draft: list[int], outputs: list[SeqOutput]) -> int:
    """How many of ``draft``'s tokens the row sampled, in order (its accepted drafts)."""
    tokens = [token for out in outputs for token in out.token_ids]
    return next((p for p, token in enumerate(draft) if p >= len(tokens) or tokens[p] != token), len(draft))


__all__ = ["VERIFY_MODE", "NgramIndex", "accepted_drafts", "propose_drafts"]
