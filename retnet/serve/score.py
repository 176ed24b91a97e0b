"""vLLM's score and rerank APIs on the pooling engine: ``POST /score`` (``/v1/score``) scores text pairs, and
``POST /rerank`` (``/v1/rerank``, ``/v2/rerank``: Jina's and Cohere's shape) orders documents by their score
against one query. Either is served by a classifier or reward model with one label, or an embedding model
(``--convert embed``):

- a classifier's or reward model's score of a pair is its score of the pair rendered as the reward trainer
  renders one (the first text the user's turn, the second the assistant's:
  :func:`~retnet.tokenization.render_pair`, encoded as ``/classify``'s ``messages`` are), after vLLM's
  activation (a sigmoid for one label) unless ``use_activation`` is false: the raw reward. A classifier of more
  labels gives no one score a pair, and is refused (vLLM refuses it too);
- an embedding model's is the cosine similarity of the two texts' embeddings (vLLM's bi-encoder scoring), each
  distinct text embedded once however many pairs hold it.

Every input of a request goes to the :class:`~retnet.serve.pooling.PoolingEngine` in one submission, so that they
pack into the same forwards. The checks and the tokenization are the pooling handlers'
(:class:`~retnet.serve.classify.ClassifyServing`): the same limits, errors and truncation.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from retnet.serve.classify import (
    ACTIVATION_FIELDS,
    ClassifyServing,
    EmbeddingUsage,
    EmbedServing,
    InputFields,
    ListResponse,
    _asked_activation,
    pair_token_ids,
)
from retnet.serve.protocol import APIError, Usage, random_id
from retnet.serve.serving import _size
from retnet.tokenization import render_pair

SCORE_ROUTES = ("/score", "/v1/score")
RERANK_ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank")
# vLLM's names of a score request's two sides (its ScoreRequest union): one pair a request.
PAIR_FIELDS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))

ScoreInputs = str | list[str]
# How a request fits a pair over --max-prompt-tokens, as the other pooling routes say it.
_CUTS = "truncate_prompt_tokens cuts each pair: to its last tokens, or the first with truncation_side right"


# ----------------------------------------------------------------------------------------------------------
# Requests and responses (vLLM's ScoreRequest / RerankRequest and their responses)
# ----------------------------------------------------------------------------------------------------------
class ScoreFields(InputFields):
    """What ``/score``'s and ``/rerank``'s bodies share: the tokenization fields of the other pooling routes
    (``truncate_prompt_tokens``, ``truncation_side``, ``add_special_tokens``, ``padding``) and the activation,
    ``use_activation`` or vLLM's older names of it. Their ``input`` is no field of theirs: given, it is refused by
    name rather than ignored."""

    model_config = ConfigDict(extra="ignore")

    # None: true (vLLM's default for scores); false: a reward model's raw reward. An embedding model's cosine
    # similarity does not depend on it (the normalization is its activation).
    use_activation: bool | None = None
    normalize: bool | None = None
    softmax: bool | None = None
    activation: bool | None = None


class ScoreRequest(ScoreFields):
    """``/score``'s body: ``text_1`` and ``text_2`` (or vLLM's ``queries`` and ``documents``, ``queries`` and
    ``items``, ``data_1`` and ``data_2``), each a text or a list: one against N, or N against N pairwise."""

    text_1: ScoreInputs | None = None
    text_2: ScoreInputs | None = None
    queries: ScoreInputs | None = None
    documents: ScoreInputs | None = None
    items: ScoreInputs | None = None
    data_1: ScoreInputs | None = None
    data_2: ScoreInputs | None = None

    def sides(self) -> tuple[tuple[str, list[str]], tuple[str, list[str]]]:
        """((first field, its texts), (second field, its texts)): the request's two sides, checked to be one of
        vLLM's pairs of fields, 1:N or N:N, neither empty. Errors name the field."""
        given = {name for pair in PAIR_FIELDS for name in pair if getattr(self, name) is not None}
        firsts = [name for name in dict.fromkeys(first for first, _ in PAIR_FIELDS) if name in given]
        seconds = [second for _, second in PAIR_FIELDS if second in given]
        forms = "text_1 and text_2 (or queries and documents, queries and items, data_1 and data_2)"
        for names in (firsts, seconds):
            if len(names) > 1:
                raise APIError(400, f"{names[0]} and {names[1]} both given: a score request names its two sides once, "
                               f"as {forms}", names[1], "invalid_value")
        if not firsts and not seconds:
            raise APIError(400, f"the request needs {forms}", "text_1", "missing")
        if not seconds:
            second = next(s for f, s in PAIR_FIELDS if f == firsts[0])
            raise APIError(400, f"{firsts[0]} is given without {second}: send both", second, "missing")
        first = next(f for f, s in PAIR_FIELDS if s == seconds[0])
        if not firsts:
            raise APIError(400, f"{seconds[0]} is given without {first}: send both", first, "missing")
        if firsts[0] != first:
            raise APIError(400, f"{seconds[0]} goes with {first}, not {firsts[0]}: send {forms}", seconds[0],
                           "invalid_value")
        second = seconds[0]
        left, right = (_as_list(getattr(self, name)) for name in (first, second))
        for name, texts in ((first, left), (second, right)):
            if not texts:
                raise APIError(400, f"{name} must not be empty", name, "empty_input")
        if len(left) > 1 and len(left) != len(right):
            raise APIError(400, f"{first} has {len(left)} texts and {second} {len(right)}: send one {first} for any "
                           f"number of {second} (1:N), or as many of each (N:N, scored pairwise)", first,
                           "invalid_value")
        return (first, left), (second, right)


class RerankRequest(ScoreFields):
    """``/rerank``'s body (vLLM's, after Jina's and Cohere's): ``query``, ``documents``, ``top_n`` (0 or left out:
    all) and ``return_documents`` (default true, as vLLM always returns them and Jina by default)."""

    query: str
    documents: ScoreInputs
    top_n: StrictInt = Field(0, ge=0)
    return_documents: bool = True


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(ListResponse):
    id: str = Field(default_factory=lambda: random_id("score"))
    data: list[ScoreData]
    usage: Usage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument | None = None  # left out of the JSON unless return_documents
    relevance_score: float


class RerankResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("rerank"))
    model: str
    usage: EmbeddingUsage  # vLLM's RerankUsage: the same two counts
    results: list[RerankResult]

    def body(self) -> dict:
        return self.model_dump(exclude_none=True)


# ----------------------------------------------------------------------------------------------------------
# The handler
# ----------------------------------------------------------------------------------------------------------
class ScoreServing:
    """``/score`` and ``/rerank`` over the server's pooling handler: a classifier's (:class:`ClassifyServing`,
    whose checks, tokenizer and engine it uses) or an embedding model's (:class:`EmbedServing`)."""

    def __init__(self, pooling: ClassifyServing):
        self.pooling = pooling
        self.embeds = isinstance(pooling, EmbedServing)

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        """vLLM's ``/score``: one score a pair, in the pairs' order."""
        model = self._check(request)
        (first, left), (second, right) = request.sides()
        scores, tokens = await self._scores(request, first, left, second, right)
        return ScoreResponse(model=model, data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
                             usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        """vLLM's ``/rerank``: the documents by score against the query, highest first (ties in the documents'
        order), the first ``top_n`` of them when it is set."""
        model = self._check(request)
        documents = _as_list(request.documents)
        if not documents:
            raise APIError(400, "documents must not be empty", "documents", "empty_input")
        scores, tokens = await self._scores(request, "query", [request.query], "documents", documents)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document=RerankDocument(text=documents[i]) if request.return_documents else None)
                   for i in order[: request.top_n or None]]
        return RerankResponse(model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
                              results=results)

    def _check(self, request: ScoreFields) -> str:
        """The name the response carries, after the checks every score request gets (the model, and fields a
        score request does not read or this server cannot honour)."""
        pooling = self.pooling
        model = pooling._check_model(request.model)
        if request.input is not None:
            raise APIError(400, "input is not read here: /score takes text_1 and text_2, /rerank query and "
                           "documents", "input", "unsupported_parameter")
        pooler = pooling.engine.pooler
        if not self.embeds and pooler.width != 1:
            raise APIError(400, f"the model {pooling.model_name!r} is a classifier of {pooler.width} labels "
                           f"({', '.join(pooler.labels)}), which gives no one score a pair: /score and /rerank are "
                           "served for a reward model or a classifier of one label, or an embedding model (--convert "
                           "embed); use /classify for the labels", None, "model_not_scorer")
        pooling._check_tokenization(request)
        pooling.checked_priority(request)
        return model

    async def _scores(self, request: ScoreFields, first: str, left: list[str], second: str,
                      right: list[str]) -> tuple[list[float], int]:
        """The score of each pair (``left[0]`` against each of ``right`` when ``left`` holds one text, else
        pairwise), and the prompt tokens run. ``first`` and ``second``: the fields the texts came from."""
        activation = _asked_activation(request, ACTIVATION_FIELDS)
        pooling = self.pooling
        limit = pooling.settings.max_pooling_inputs
        # The pairs are bounded for an embedding model too, though its texts are embedded once each: the response
        # (and the scores computed for it) has a row a pair, however few texts they repeat.
        if len(right) > limit:
            raise APIError(400, f"at most {limit} pairs per request (--max-pooling-inputs); got {len(right)}", second,
                           "too_many_inputs")
        pairs = left * len(right) if len(left) == 1 else left
        if self.embeds:
            texts = list(dict.fromkeys([*left, *right]))
            if len(texts) > limit:
                raise APIError(400, f"at most {limit} distinct texts to embed per request (--max-pooling-inputs); "
                               f"got {len(texts)}", second, "too_many_inputs")
            ids = await pooling._tokenizing(_size([*left, *right]), self._text_ids, request, texts, first, left,
                                            second, right)
            rows, usage = await pooling._rows(ids, request.priority)
            scores = _cosines(rows, texts, pairs, right)
        else:
            # Each pair renders its first text again: the work grows with the texts as paired, not as sent.
            ids = await pooling._tokenizing(_size([*pairs, *right]), self._pair_ids, request, first, left, second,
                                            right)
            # Each distinct pair runs once, its copies sharing its row: copies packed into forwards of different
            # lengths differed in their last bits (a GEMM rounds by the row's length), so a document sent twice got
            # two scores and rerank's ties left the documents' order. The usage counts the tokens run, as above.
            distinct = {tuple(pair): place for place, pair in enumerate(dict.fromkeys(map(tuple, ids)))}
            rows, usage = await pooling._rows([list(pair) for pair in distinct], request.priority)
            rows = rows[[distinct[tuple(pair)] for pair in ids]]
            scores = (rows if activation is False else pooling.engine.pooler.activate(rows))[:, 0]
        return scores.tolist(), usage.prompt_tokens

    def _pair_ids(self, request: ScoreFields, first: str, left: list[str], second: str,
                  right: list[str]) -> list[list[int]]:
        """Each pair's token ids as ``/classify`` scores ``messages: [user: left[i], assistant: right[i]]`` (the
        reward trainer's rendering), checked and cut as the request says; ``left``: one text for all of ``right``,
        or one a pair. Each distinct first text's prompt is encoded and checked alone before its pairs are rendered.
        Takes the tokenizer's lock for each encoding, not across the pairs, and not to render."""
        pooling, add_special = self.pooling, bool(request.add_special_tokens)
        tokenizer, most = pooling.tokenizer, pooling.settings.max_prompt_tokens
        uncut = request.truncate_prompt_tokens is None
        paired = len(left) > 1
        by_prompt: dict[str, list[int]] = {}
        for index, text in enumerate(left if paired else left * len(right)):
            by_prompt.setdefault(text, []).append(index)
        # Jinja renders text without entering the Rust tokenizer, so only encoding holds the lock: rendering a
        # long first text again for each pair (the template decides how a turn follows it) takes seconds, in
        # which other requests encode theirs.
        # (each turn's text in the form the template reads: --chat-template-content-format)
        render = functools.partial(pooling._render, template=pooling.chat_template)
        cut = pooling._cutter(request)
        ids: list[list[int]] = [[] for _ in right]
        for prompt, indexes in by_prompt.items():
            user = [{"role": "user", "content": prompt}]
            where = f"{first}[{indexes[0]}]" if paired else first
            (head,) = _rendered(first, user, [], render)
            with pooling.tokenizer_lock:
                (alone,) = pair_token_ids(tokenizer, head, [""], add_special)
            # Over the limit before any second text: refused before rendering it again once a pair.
            if uncut and len(alone) > most:
                raise APIError(400, f"{where} has {len(alone)} tokens as a pair's user turn (with EOS), before any "
                               f"{second}; this server accepts at most {most} a pair ({_CUTS})", first,
                               "context_length_exceeded")
            _, *completions = _rendered(first, user,
                                        [[{"role": "assistant", "content": right[i]}] for i in indexes], render)
            with pooling.tokenizer_lock:
                encoded = pair_token_ids(tokenizer, head, completions, add_special)
            for index, pair in zip(indexes, encoded, strict=True):
                if uncut and len(pair) > most:
                    # Named as the pair: its first text fits alone (checked above), the two together do not.
                    named = f"{first}[{index}]" if paired else first
                    raise APIError(400, f"{named} + {second}[{index}] has {len(pair)} tokens as a pair; this server "
                                   f"accepts at most {most} ({_CUTS})", second, "context_length_exceeded")
                ids[index] = cut(pair, second, index=index)
        return ids

    def _text_ids(self, request: ScoreFields, texts: list[str], first: str, left: list[str], second: str,
                  right: list[str]) -> list[list[int]]:
        """Each distinct text's token ids as ``/v1/embeddings`` embeds it (``add_special_tokens`` default true),
        checked and cut as the request says; an error names the field and place the text was first found at.
        Takes the tokenizer's lock."""
        pooling, add_special = self.pooling, request.add_special_tokens is not False
        found: dict[str, tuple[str, int | None]] = {}
        for name, side in ((first, left), (second, right)):
            # A first text shared by every pair (1:N; rerank's query always) is named alone, "query", not "query[0]",
            # as a reward model's pairs name it (_pair_ids); the second side's texts by their place, as its scores.
            indexed = name == second or len(left) > 1
            for index, text in enumerate(side):
                found.setdefault(text, (name, index if indexed else None))
        cut = pooling._cutter(request)
        return [cut(pooling._encode(text, add_special), found[text][0], index=found[text][1]) for text in texts]


def _as_list(texts: ScoreInputs) -> list[str]:
    return [texts] if isinstance(texts, str) else texts


def _rendered(first: str, *args) -> tuple[str, ...]:
    """``render_pair(*args)``; a template that rejects the conversation is the request's 400, naming ``first``."""
    try:
        return render_pair(*args)
    except Exception as exc:
        raise APIError(400, f"{first}: the chat template cannot render a pair: {exc}", first) from exc


def _cosines(rows: torch.Tensor, texts: list[str], left: list[str], right: list[str]) -> torch.Tensor:
    """The cosine similarity of each pair ``(left[i], right[i])``, ``rows`` being the embeddings of the distinct
    ``texts``: vLLM's score, torch's ``cosine_similarity`` (each vector divided by its norm, at least eps 1e-8;
    equal to it within 1e-6). The products come from a matrix of the distinct first texts by the distinct second
    ones, so that pairs that repeat texts cost no [pairs, hidden] copies of their rows."""
    place = {text: row for row, text in enumerate(texts)}
    rows = rows.float()
    unit = rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(1e-8)
    firsts, seconds = ({text: i for i, text in enumerate(dict.fromkeys(side))} for side in (left, right))
    grid = unit[[place[t] for t in firsts]] @ unit[[place[t] for t in seconds]].T
    return grid[[firsts[t] for t in left], [seconds[t] for t in right]]


__all__ = ["RERANK_ROUTES", "SCORE_ROUTES", "RerankRequest", "RerankResponse", "ScoreRequest", "ScoreResponse",
           "ScoreServing"]
