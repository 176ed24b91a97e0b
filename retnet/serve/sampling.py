"""Per-sequence sampling parameters and the batched sampler of one decode step.

Every rule is row-wise (a row's result never depends on the other rows), and every random draw comes
from the sequence's own ``torch.Generator``, so a request samples the same tokens alone or in any batch:
``seed`` makes a request reproducible however busy the server is.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from retnet.serve.structured import GrammarMatcher

GREEDY_BELOW_TEMPERATURE = 1e-5
# A repetition penalty near 0 (the range allows any > 0) divides a logit past fp32's range: inf, then NaN from
# softmax. Penalised logits stay within this, which even / GREEDY_BELOW_TEMPERATURE keeps finite.
PENALISED_LOGIT_LIMIT = 1e30


@dataclass(slots=True)
class SamplingParams:
    """What one request asks of the sampler and the stopping rules (OpenAI's names; 0 temperature: greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (before penalties and sampling)
    ignore_eos: bool = False
    min_tokens: int = 0  # before this many tokens, no stop token may be sampled and no stop condition holds
    stop_token_ids: frozenset[int] = frozenset()  # end the choice as EOS does
    include_stop_str_in_output: bool = False
    allowed_token_ids: frozenset[int] | None = None  # None: every token
    bad_words_ids: list[list[int]] = field(default_factory=list)  # each bad word's spellings, as token ids
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top-k alternatives'
    # None: the prompt is not scored; k >= 0: each prompt token's logprob, rank and top-k alternatives (a
    # completion's echo with logprobs, vLLM's prompt_logprobs; a caller wanting fewer alternatives keeps fewer).
    prompt_logprobs: int | None = None
    # vLLM's detokenizer options: special tokens' text kept in the output (skip_special_tokens false), and
    # whether a slow tokenizer joins them with spaces (fast tokenizers have no such option, as in HF and vLLM).
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    grammar: Any = None  # structured output: a compiled retnet.serve.structured.Grammar, a matcher per choice
    # A beam search's step, (search, step): the prefix cache keeps the states of its last two steps only, the ones
    # the next step can start from (retnet.serve.beam_search); None: an ordinary request.
    prefix_cache_tag: tuple[int, int] | None = None
    # A beam search's step, its first included: the engine leaves it out of the request metrics (sequences, prompt
    # and generated tokens, TTFT), where the search counts itself once, as a request of its n choices.
    beam_step: bool = False
    # vLLM's cache_salt: the prefix cache shares states only between requests of the same salt (None: the unsalted)
    cache_salt: str | None = None

    @property
    def scores_prompt(self) -> bool:
        """Whether every prompt position's logits are needed (no cached prefix, no packed prefill)."""
        return self.prompt_logprobs is not None

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows fp32 to inf and softmax gives NaN; the limit is greedy.
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def truncates(self, vocab: int) -> bool:
        """Whether top_k, top_p or min_p can cut a vocabulary of ``vocab`` tokens (a top_k past it cannot)."""
        return 0 < self.top_k < vocab or self.top_p < 1.0 or self.min_p > 0.0


class RowSampler:
    """One sequence's sampling state: its generator and the token counts the penalties need."""

    __slots__ = ("adjusts", "bad_prefixes", "ban_ids", "ban_left", "bias_ids", "bias_values", "blocked", "counts",
                 "counts_view", "generator", "grammar", "output", "params", "seen", "seen_view")

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, seed_offset: int = 0,
                 ban_ids: torch.Tensor | None = None, blocked: torch.Tensor | None = None,
                 grammar: GrammarMatcher | None = None, history: torch.Tensor | None = None):
        """``ban_ids``: token ids masked out until ``params.min_tokens`` tokens were sampled (the stop tokens).
        ``blocked``: a ``[V]`` bool mask of the tokens never sampled (outside ``allowed_token_ids``, single-token
        bad words), shared by the request's rows; the multi-token bad words are matched here, step by step.
        ``grammar``: this row's structured-output matcher, which masks every step to the tokens it allows.
        ``history``: token ids before ``prompt_ids`` that the repetition penalty counts as prompt (a session's
        earlier turns, which its state holds instead of the prompt)."""
        self.params = params
        self.grammar = grammar
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed((seed + seed_offset) % (2**63))
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.counts_view = self.seen_view = None
        self.bias_ids = self.bias_values = None
        if params.logit_bias:
            self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            self.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        if params.needs_penalties:
            self.counts = torch.zeros(vocab_size)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            ids = torch.tensor([i for i in prompt_ids if i < vocab_size], dtype=torch.long)
            self.seen[ids] = True
            if history is not None:
                self.seen[history[history < vocab_size]] = True
            # record() writes one element of each a step through these views of the same (CPU) memory: a tensor's
            # element write costs 7-14 µs in torch's indexing, a numpy one well under 1.
            self.counts_view, self.seen_view = self.counts.numpy(), self.seen.numpy()
        self.ban_left = params.min_tokens
        self.ban_ids = ban_ids if ban_ids is not None and ban_ids.numel() and self.ban_left > 0 else None
        self.blocked = blocked
        # (prefix, last token) of each multi-token bad word: its last token is banned right after its prefix.
        self.bad_prefixes = [(tuple(ids[:-1]), ids[-1]) for ids in params.bad_words_ids if len(ids) > 1]
        # Only the generated tokens, as vLLM matches them: a prompt ending with a prefix bans nothing.
        self.output: list[int] | None = [] if self.bad_prefixes else None
        # Whether sample_step must touch this row's logits: computed here and when the ban ends, so that a
        # step over rows that need nothing costs one attribute read per row.
        self.adjusts = self._adjusts()

    def _adjusts(self) -> bool:
        return (self.ban_ids is not None or self.bias_ids is not None or self.params.needs_penalties
                or self.blocked is not None or bool(self.bad_prefixes) or self.grammar is not None)

    def record(self, token: int) -> None:
        if self.counts is not None and token < len(self.counts_view):
            self.counts_view[token] += 1
            self.seen_view[token] = True
        if self.output is not None:
            self.output.append(token)
        if self.grammar is not None:
            self.grammar.consume(token)
        if self.ban_ids is not None:
            self.ban_left -= 1
            if self.ban_left <= 0:
                self.ban_ids = None
                self.adjusts = self._adjusts()

    def bad_now(self) -> list[int]:
        """The last tokens of the multi-token bad words whose prefix the output ends with."""
        out = self.output
        return [last for prefix, last in self.bad_prefixes
                if len(prefix) <= len(out) and tuple(out[len(out) - len(prefix):]) == prefix]


@dataclass(slots=True)
class StepSample:
    """One step's result for B rows."""

    tokens: list[int]
    # The chosen tokens' logprobs (raw model distribution); None for a row that asked for none (or all None: no
    # row asked).
    logprobs: list[float | None] | None
    top: list[list[tuple[int, float]]] | None  # per row, the top-k alternatives (k per row's request)


def sample_step(logits: torch.Tensor, rows: list[RowSampler], grammar_masks: torch.Tensor | None = None) -> StepSample:
    """Pick one token per row.

    Args:
        logits: ``[B, V]`` float32, the model's next-token logits.
        rows: B samplers, row-aligned.
        grammar_masks: :func:`grammar_masks_of` ``rows``, computed ahead (while a GPU runs the forward that
            gives ``logits``); None: computed here.
    """
    logits = logits.float()
    raw = logits  # logprobs report the model's distribution, before bias and penalties
    adjusted = [i for i, r in enumerate(rows) if r.adjusts]
    if adjusted:
        logits = logits.clone()
        biased = [i for i in adjusted if rows[i].bias_ids is not None]
        if biased:
            _add_biases(logits, biased, rows)
        penalised = [i for i in adjusted if rows[i].params.needs_penalties]
        if penalised:
            _penalise(logits, penalised, rows)
        banned, masked, bad = [], [], []
        for i in adjusted:
            row = rows[i]
            if row.ban_ids is not None:
                banned.append((i, row.ban_ids))
            if row.blocked is not None:
                masked.append(i)
            if row.bad_prefixes:
                ids = row.bad_now()
                if ids:
                    bad.append((i, torch.tensor(ids, dtype=torch.long)))
        # Last, after the penalties (which clamp -inf back to a finite logit): the greedy argmax and every
        # sampling rule below then see a probability of exactly 0. One write for every masked row, and one
        # for every banned one.
        if masked:
            index = torch.tensor(masked, dtype=torch.long)
            blocked = torch.stack([rows[i].blocked for i in masked])
            logits[index] = logits.index_select(0, index).masked_fill(blocked, float("-inf"))
        if banned:
            _ban(logits, banned)
        if bad:
            # A bad word's last token may be all the other masks left (allowed_token_ids): a row of -inf has
            # no distribution (greedy would take token 0, sampling NaN). Such a row keeps its bad tokens
            # instead: the word is spelt, but no token outside allowed_token_ids or banned by min_tokens is.
            which, ids, saved = _ban(logits, bad)
            dead = ~logits.index_select(0, torch.tensor([i for i, _ in bad])).isfinite().any(-1)
            if dead.any():
                lost = torch.tensor([i for (i, _), gone in zip(bad, dead.tolist()) if gone])
                entries = torch.isin(which, lost)
                logits[which[entries], ids[entries]] = saved[entries]
        grammars = [i for i in adjusted if rows[i].grammar is not None]
        if grammars:
            _follow_grammars(logits, raw, grammars, rows,
                             grammar_masks if grammar_masks is not None else grammar_masks_of(rows))

    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not sampled:  # every row greedy, or no row at all (an empty step picks nothing, as before the batching)
        chosen = logits.argmax(-1)
    elif len(sampled) < len(rows):
        # The argmax of the greedy rows alone: a sampled row's would be thrown away (argmax is row-wise).
        greedy = torch.tensor([i for i, r in enumerate(rows) if r.params.greedy])
        chosen = logits.index_select(0, greedy).argmax(-1)
    if sampled:
        index = torch.tensor(sampled, dtype=torch.long)
        temperature = torch.tensor([rows[i].params.temperature for i in sampled])
        scaled = logits.index_select(0, index) / temperature[:, None]
        probs = scaled.softmax(-1)
        # One uniform draw from each row's own generator. Each draw fills its element of ``draws`` in place: the
        # value torch.rand(1) would give (rand is uniform_ on a new tensor), without a tensor, a host read and a
        # list a row.
        draws = torch.empty(len(sampled), dtype=torch.float64)
        for j, i in enumerate(sampled):
            draws[j : j + 1].uniform_(generator=rows[i].generator)
        picks = torch.empty(len(sampled), dtype=torch.long)
        whole = list(range(len(sampled)))  # the rows drawn over the whole vocabulary
        cut = [j for j, i in enumerate(sampled) if rows[i].params.truncates(probs.shape[-1])]
        if cut:
            whole = _sample_truncated(probs, cut, [rows[sampled[j]].params for j in cut], draws, picks)
        if whole:
            rest = torch.tensor(whole, dtype=torch.long)
            picks[rest] = inverse_cdf(probs.index_select(0, rest), draws.index_select(0, rest))
        if len(sampled) == len(rows):
            chosen = picks
        else:
            greedy_picks, chosen = chosen, torch.empty(len(rows), dtype=torch.long)
            chosen[greedy] = greedy_picks
            chosen[index] = picks

    tokens = chosen.tolist()
    # A row that adjusts nothing has nothing to record (no counts, bad-word output, grammar or ban): see _adjusts.
    for i in adjusted:
        rows[i].record(tokens[i])

    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return StepSample(tokens, None, None)
    # Only the rows asking for logprobs are scored (every op below is row-wise: a row's values are the same
    # whichever rows are scored with it); the others get None and no alternatives, which they never read.
    everyone = len(want) == len(rows)
    index = None if everyone else torch.tensor(want, dtype=torch.long)
    logprobs_all = raw.log_softmax(-1) if everyone else raw.index_select(0, index).log_softmax(-1)
    picked = chosen if everyone else chosen.index_select(0, index)
    scored = logprobs_all.gather(-1, picked[:, None]).squeeze(-1).tolist()
    chosen_lp: list[float | None] = scored if everyone else [None] * len(rows)
    if not everyone:
        for i, value in zip(want, scored):
            chosen_lp[i] = value
    top: list[list[tuple[int, float]]] = [[] for _ in rows]
    if any(rows[i].params.logprobs for i in want):
        for i, alternatives in zip(want, _top_alternatives(logprobs_all, [rows[i].params.logprobs for i in want])):
            top[i] = alternatives
    return StepSample(tokens, chosen_lp, top)


# Listed past the largest k asked for, so that a tie across a row's cut rarely runs past topk's list too (such a row
# is scanned whole): of 64 rows of bf16-rounded logits (V 32k and 128k), 44-50% tie the 21st value to the 20th, 0-2%
# the 24th, none the 28th; topk of 28 takes 4-5% longer than of 21 (one thread).
_TIE_SLACK = 8


def _top_alternatives(logprobs: torch.Tensor, ks: list[int]) -> list[list[tuple[int, float]]]:
    """Each row's ``ks[i]`` most likely ``(token, logprob)`` of ``logprobs`` (``[n, V]``), best first, equal
    logprobs by ascending id (greedy's pick of them first). topk alone orders equal values, and picks which of them
    reach its cut, by k and by the rows beside: bf16 logits tie often, and a request's alternatives changed with the
    k other requests in its batch asked for (or, for an echoed prompt, with its own prompt_logprobs)."""
    if not ks:  # a one-token prompt: no token scored
        return []
    vocab = logprobs.shape[-1]
    ks = [min(k, vocab) for k in ks]
    listed = min(max(ks) + _TIE_SLACK, vocab)
    values, ids = logprobs.topk(listed, dim=-1)
    by_id = ids.argsort(-1)
    ids, values = ids.gather(-1, by_id), values.gather(-1, by_id)
    values, by_value = values.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, by_value)
    if listed < vocab:
        _lowest_ids_of_cut_ties(logprobs, values, ids, ks)
    rows_ids, rows_values = ids.tolist(), values.tolist()
    return [list(zip(row_ids[:k], row_values[:k])) for row_ids, row_values, k in zip(rows_ids, rows_values, ks)]


def _lowest_ids_of_cut_ties(logprobs: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, ks: list[int]):
    """Where the last of a row's ``listed`` ``values`` (topk's, ranked, ``[n, listed]``) ties the row's ``ks[i]``-th,
    topk may have left out tokens of that tie with lower ids than those it listed: rewrite ``ids`` in place so
    that the row's k-th value is held by the lowest ids of the tie. The tokens likelier than the k-th are all
    listed, so only the first ``k - likelier`` ids of the tie are looked for, over all such rows at once (a row
    whose tie is a -inf tail, a grammar's mask, has most of the vocabulary in it: one scan, no sort)."""
    wanted_all = torch.tensor(ks, device=values.device)[:, None]
    kth_all = values.gather(-1, (wanted_all - 1).clamp(min=0))
    # == not >=: a NaN row (a NaN logit poisons the whole log_softmax) keeps topk's list.
    tied = ((values[:, -1:] == kth_all) & (wanted_all > 0)).squeeze(-1).nonzero().squeeze(-1)
    if not len(tied):  # split would still give one (empty) block
        return
    # In blocks of rows: an echoed prompt's rows may all tie (a flat model), and each block holds [rows, V] scratch.
    for rows in tied.split(64):
        kth, wanted = kth_all.index_select(0, rows), wanted_all.index_select(0, rows)
        likelier = (values.index_select(0, rows) > kth).sum(-1, keepdim=True)
        need = int((wanted - likelier).max())
        # The count of the tie up to each id: the j-th id of the tie is the first where it reaches j.
        seen = (logprobs.index_select(0, rows) == kth).cumsum(-1, dtype=torch.int32)
        nth = torch.arange(1, need + 1, dtype=torch.int32, device=seen.device).expand(len(rows), -1).contiguous()
        lowest = torch.searchsorted(seen, nth)
        column = torch.arange(ids.shape[-1], device=ids.device)
        fill = (column >= likelier) & (column < wanted)
        ids[rows] = torch.where(fill, lowest.gather(-1, (column - likelier).clamp(0, need - 1)), ids[rows])


# A truncating row keeps a prefix of its tokens by descending probability. Its most probable ones come from topk, a
# fraction of a full sort's time at a real vocabulary (64 rows of 32k tokens on one CPU thread: ~50 ms against ~430
# ms for a sort; 11 rows: 1 ms for 64 candidates, 4 for 1024, 33 for a sort): first 64, then, for the rows whose
# rules keep more (a wide top_p nucleus), 1024; only a row that keeps more still is sorted whole. A level is taken
# where the vocabulary holds at least CANDIDATES_SHARE times its candidates (below, a sort costs about as much).
TRUNCATION_CANDIDATES = (64, 1024)
CANDIDATES_SHARE = 8


def _sample_truncated(probs: torch.Tensor, cut: list[int], params: list[SamplingParams], draws: torch.Tensor,
                      picks: torch.Tensor) -> list[int]:
    """Write the picks of the truncating rows ``cut`` of ``probs`` (``params`` theirs): over their candidates where
    their kept tokens are all among them, else over their whole vocabulary sorted. Returns the other rows, to draw
    over the whole vocabulary as it is."""
    vocab = probs.shape[-1]
    pending = list(zip(cut, params))
    for candidates in TRUNCATION_CANDIDATES:
        if candidates * CANDIDATES_SHARE > vocab:
            break
        able = [(j, p) for j, p in pending if _may_settle(p, candidates, vocab)]
        if not able:
            continue
        sub = torch.tensor([j for j, _ in able], dtype=torch.long)
        # one more than the candidates: whether the rules drop it decides whether the row's kept tokens are all in
        top_probs, top_ids = probs.index_select(0, sub).topk(candidates + 1, -1)
        keep, settled = _kept(top_probs, [p for _, p in able], vocab)
        fast = settled.nonzero().squeeze(-1)
        if len(fast):
            kept = (top_probs[:, :-1] * keep[:, :-1]).index_select(0, fast)
            # Drawn in token-id order, as the rows drawn over the whole vocabulary are: in probability order two
            # nearly equal tokens swap places with a batch's float noise, and a seeded draw far from any cut took
            # the other token alone than batched (vLLM draws over the masked vocabulary in its order too).
            ids, by_id = top_ids[:, :-1].index_select(0, fast).sort(-1)
            ranks = inverse_cdf(kept.gather(-1, by_id), draws.index_select(0, sub[fast]))
            picks[sub[fast]] = ids.gather(-1, ranks[:, None]).squeeze(-1)
            done = {j for (j, _), row_done in zip(able, settled.tolist()) if row_done}
            pending = [(j, p) for j, p in pending if j not in done]
    if pending:
        # Sorted in a batch of their own: the inverse CDF maps a draw to a different token in sorted order, so a
        # row is sorted for its own rules only, never because another row is.
        rows = torch.tensor([j for j, _ in pending], dtype=torch.long)
        sorted_probs, order = probs.index_select(0, rows).sort(-1, descending=True)
        keep, _ = _kept(sorted_probs, [p for _, p in pending], vocab)
        kept = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs * keep)  # in token-id order (above)
        picks[rows] = inverse_cdf(kept, draws.index_select(0, rows))
    truncated = set(cut)
    return [j for j in range(len(probs)) if j not in truncated]


def _top_k(params: SamplingParams, vocab: int) -> int:
    # Clamped: a top_k past the vocabulary means no truncation, and past int64 it would not fit.
    return min(params.top_k, vocab) if params.top_k > 0 else vocab


def _may_settle(params: SamplingParams, candidates: int, vocab: int) -> bool:
    """Whether a row's rules can show on its ``candidates`` most probable tokens that they keep no more: top_k within
    them, a min_p, or top_p alone (a top_k beyond them renormalises top_p's measure over tokens they do not hold)."""
    top_k = _top_k(params, vocab)
    return top_k <= candidates or params.min_p > 0 or top_k == vocab


def _kept(sorted_probs: torch.Tensor, params: list[SamplingParams], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens top_k, min_p and top_p keep of each row's ``L`` most probable (``sorted_probs``, ``[n, L]``,
    descending; ``L`` may be the vocabulary), and whether they drop the ``L``-th (so every one after it: the row's
    kept tokens are all among the ``L - 1`` before it; always true when ``L`` is the vocabulary)."""
    length = sorted_probs.shape[-1]
    top_k = torch.tensor([_top_k(p, vocab) for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    # min_p is relative to the top token, which every rule keeps: it can go first, as vLLM (V1) runs it.
    min_p = torch.tensor([p.min_p for p in params])
    # top_k keeps every token as likely as the k-th, as vLLM's (its cut is `< the k-th value`): bf16 logits tie
    # often, and exactly k would keep one of equals by where topk or sort happened to put it. Equal logits give
    # equal float32 probabilities, so the tie shows here. A top_k beyond L keeps all L. Tokens of probability 0
    # (masked, or underflowed at a low temperature) are never drawn: counted as tied with a k-th of 0, they kept
    # every row with fewer likely tokens than k from settling on its candidates (a full sort at every step).
    kth = sorted_probs.gather(1, (top_k.clamp(max=length) - 1)[:, None])
    kept_by_k_and_min_p = ((sorted_probs >= kth) & (sorted_probs > 0)
                           & (sorted_probs >= min_p[:, None] * sorted_probs[:, :1]))
    # top_p measures what top_k and min_p kept, renormalised (vLLM's order; transformers' for top_k); rows without
    # either keep their probabilities bit for bit. Keep a token while the mass strictly before it is below top_p
    # (the top token always stays). The renormalising total is a cumulative sum's last: a row's own sum, which a
    # sum over a long row split between threads is not (a row alone and in a batch would round it apart).
    kept = sorted_probs * kept_by_k_and_min_p
    renormalise = (top_k < vocab) | (min_p > 0)
    kept = torch.where(renormalise[:, None], kept / kept.cumsum(-1)[:, -1:], sorted_probs)
    keep = kept_by_k_and_min_p & ((kept.cumsum(-1) - kept) < top_p[:, None])
    keep[:, 0] = True
    if length == vocab:
        return keep, torch.ones(len(params), dtype=torch.bool)
    # The last token dropped, by the same float arithmetic as over the whole vocabulary; where top_p measured
    # renormalised, only once top_k or min_p dropped it (else the renormalising total misses the tokens after it).
    return keep, ~keep[:, -1] & (~renormalise | ~kept_by_k_and_min_p[:, -1])


def inverse_cdf(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Each row's index at its uniform draw (``[n]`` float64) of its (unnormalised) probabilities' CDF."""
    cdf = probs.double().cumsum(-1)
    picks = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).squeeze(-1)
    # (a draw rounding to the total lands past the end: the first token where the CDF reaches its total, of non-zero
    # probability, as every pick of a zero-width entry's neighbours is otherwise; contiguous: a column slice is not,
    # and torch warns of the copy it makes of one, on the first sampled request of every server)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous()).squeeze(-1)
    return torch.minimum(picks, last)


def grammar_masks_of(rows: list[RowSampler]) -> torch.Tensor | None:
    """``[rows with a grammar, V]`` bool, in row order: the tokens each grammar allows next (None: no grammar).
    They depend on the tokens sampled so far only, so a caller may compute them while the forward runs."""
    from retnet.serve.structured import allowed_tokens

    matchers = [row.grammar for row in rows if row.grammar is not None]
    return allowed_tokens(matchers) if matchers else None


def _follow_grammars(logits: torch.Tensor, raw: torch.Tensor, indices: list[int], rows: list[RowSampler],
                     allowed: torch.Tensor) -> None:
    """Rows ``indices`` masked, in place, to the tokens their grammar allows next (``allowed``, a row each).
    Last of the masks: the grammar is the one rule the text must keep, so a row that the others
    (allowed_token_ids, bad words, min_tokens' stop tokens) would leave with no token keeps the grammar's,
    scored by the model's logits and the bias."""
    index = torch.tensor(indices, dtype=torch.long)
    # A matcher that allows nothing has ended (its choice stops at this token, see Engine._advance): masking
    # all would leave no distribution to draw the step from.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    masked = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
    dead = ~masked.isfinite().any(-1)
    if dead.any():
        fallback = raw.index_select(0, index)
        for j in dead.nonzero().flatten().tolist():
            row = rows[indices[j]]
            if row.bias_ids is not None:
                fallback[j, row.bias_ids] += row.bias_values
        masked[dead] = fallback[dead].masked_fill(~allowed[dead], float("-inf"))
    logits[index] = masked


def _add_biases(logits: torch.Tensor, indices: list[int], rows: list[RowSampler]) -> None:
    """Rows ``indices``' ``logit_bias`` added to their logits, in place, in one write (a row names each id once, so
    each logit gets its one addition, as ``logits[i, ids] += values`` row by row gives)."""
    which = torch.repeat_interleave(torch.tensor(indices, dtype=torch.long),
                                    torch.tensor([len(rows[i].bias_ids) for i in indices], dtype=torch.long))
    ids = torch.cat([rows[i].bias_ids for i in indices])
    logits.index_put_((which, ids), torch.cat([rows[i].bias_values for i in indices]), accumulate=True)


def _penalise(logits: torch.Tensor, indices: list[int], rows: list[RowSampler]) -> None:
    """Rows ``indices``' penalties applied in place, batched: repetition (prompt + output; CTRL's divide/multiply
    rule, on the rows asking for it), then presence and frequency (output only; OpenAI's rule). Element by element
    the same float32 operations as one row at a time (a row's penalty values are float32 either way), so a row's
    logits do not depend on the rows penalised with it."""
    params = [rows[i].params for i in indices]
    repeat = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeat:
        index = torch.tensor([indices[j] for j in repeat], dtype=torch.long)
        x = logits.index_select(0, index)
        penalty = torch.tensor([params[j].repetition_penalty for j in repeat], dtype=torch.float32)[:, None]
        seen = torch.stack([rows[indices[j]].seen for j in repeat])
        # Only the seen tokens change: the clamp must not touch another logit (a -inf mask stays -inf).
        penalised = torch.where(x > 0, x / penalty, x * penalty).clamp(-PENALISED_LOGIT_LIMIT, PENALISED_LOGIT_LIMIT)
        logits[index] = torch.where(seen, penalised, x)
    additive = [j for j, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    if additive:
        index = torch.tensor([indices[j] for j in additive], dtype=torch.long)
        counts = torch.stack([rows[indices[j]].counts for j in additive])
        frequency = torch.tensor([params[j].frequency_penalty for j in additive], dtype=torch.float32)[:, None]
        presence = torch.tensor([params[j].presence_penalty for j in additive], dtype=torch.float32)[:, None]
        logits[index] = logits.index_select(0, index) - (frequency * counts + presence * (counts > 0).float())


def _ban(logits: torch.Tensor, bans: list[tuple[int, torch.Tensor]]):
    """Set ``logits[row, ids] = -inf`` for each ``(row, ids)`` in one write; returns the indices and the
    values they held."""
    which = torch.repeat_interleave(torch.tensor([i for i, _ in bans]), torch.tensor([len(b) for _, b in bans]))
    ids = torch.cat([b for _, b in bans])
    saved = logits[which, ids]
    logits.index_put_((which, ids), torch.tensor(float("-inf")))
    return which, ids, saved


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int],
                    k: int) -> list[tuple[float, int, list[tuple[int, float]]]]:
    """The prompt's scores: for each ``next_ids[t]``, its logprob under ``logits[t]`` (``[T, V]``), its rank
    there (1-based: 1 + the tokens strictly more likely, vLLM's but for ties, which share the best rank
    here and the worst in vLLM V1) and the top-k ``(token, logprob)``, best first."""
    lp = logits.float().log_softmax(-1)
    ids = torch.tensor(next_ids, dtype=torch.long)
    chosen_lp = lp.gather(-1, ids[:, None])
    ranks = (lp > chosen_lp).sum(-1).add(1).tolist()
    chosen = chosen_lp.squeeze(-1).tolist()
    tops = _top_alternatives(lp, [k] * len(chosen)) if k > 0 else [[] for _ in chosen]
    return list(zip(chosen, ranks, tops))


__all__ = ["RowSampler", "SamplingParams", "StepSample", "grammar_masks_of", "prompt_logprobs", "sample_step"]
