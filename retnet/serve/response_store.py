"""Stored Responses (``store: true``): what ``previous_response_id`` continues and ``GET /v1/responses/{id}``
returns, kept in memory in a bounded LRU (``--responses-store-entries``; 0 stores nothing).

Each entry holds the Response object as it was answered, the request's own input items (``input_items``) and the
whole conversation it ran, as Responses items: the conversation it continued, its input, its output. The
``instructions`` are not part of it (OpenAI's rule: a continuation's instructions are its own). Entries share the
item dicts of the conversation they continue, and none is changed once stored, so a long chain costs a list of
references per response, not copies.

The items of the stored responses (their input and output items) are found by id too, for an ``item_reference``
input item: an item goes with the response that holds it (evicted or deleted).

Only the event loop reads and writes the store (every route is a coroutine), so it takes no lock.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from retnet.serve.protocol import APIError


@dataclass(slots=True)
class StoredResponse:
    response: dict[str, Any]  # the Response object answered (the final one, for a stream)
    input_items: list[dict[str, Any]]  # this request's input, as items with ids
    conversation: list[dict[str, Any]]  # the conversation continued + input + output, for previous_response_id
    size: int = 0  # bytes counted against the store's bound: the response's and the conversation's JSON


class ResponseStore:
    """An LRU of :class:`StoredResponse` by response id, at most ``entries`` of them and ``max_bytes`` in all.

    An entry's size counts the whole conversation it continues, though entries share those items: an
    overestimate for long chains, so the bound holds whatever the sharing."""

    def __init__(self, entries: int, max_bytes: int = 256 << 20):
        self.entries, self.max_bytes = entries, max_bytes
        self._stored: OrderedDict[str, StoredResponse] = OrderedDict()
        # item id -> {id of a response holding it: the item}, oldest first: a reference reads the newest holder's,
        # and a dropped response takes only its own (an item it referenced stays found in the response it came from)
        self._items: dict[str, dict[str, dict[str, Any]]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._stored)

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]],
            history: list[dict[str, Any]]) -> None:
        """Keep ``response`` (deep-copied, with ``input_items``) after ``history``, the conversation it
        continued; the least recently used entry goes when the store is full."""
        if self.entries <= 0:
            return
        response = copy.deepcopy(response)
        input_items = copy.deepcopy(input_items)
        conversation = [*history, *input_items, *response["output"]]
        size = sum(len(json.dumps(part, ensure_ascii=False).encode()) for part in (response, conversation))
        if response["id"] in self._stored:  # an id sent again (vLLM's request_id): the older answer is not it
            self._drop(response["id"])
        if size > self.max_bytes:  # alone over the bound: kept out, and nothing else evicted for it
            return
        entry = StoredResponse(response, input_items, conversation, size)
        self._stored[response["id"]] = entry
        self.bytes += size
        for item in self._own_items(entry):
            self._items.setdefault(item["id"], {})[response["id"]] = item
        while len(self._stored) > self.entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._stored)))

    def get(self, response_id: str, param: str = "response_id") -> StoredResponse:
        """The stored response (now the most recently used), or 404 naming ``param``."""
        entry = self._stored.get(response_id)
        if entry is None:
            raise not_found(response_id, param)
        self._stored.move_to_end(response_id)
        return entry

    def item(self, item_id: str) -> dict[str, Any] | None:
        """The stored input or output item with this id (shared: not to be changed), or None."""
        holders = self._items.get(item_id)
        return next(reversed(holders.values())) if holders else None

    def delete(self, response_id: str) -> None:
        if response_id not in self._stored:
            raise not_found(response_id, "response_id")
        self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        entry = self._stored.pop(response_id)
        self.bytes -= entry.size
        for item in self._own_items(entry):
            holders = self._items.get(item["id"], {})
            holders.pop(response_id, None)
            if not holders:
                self._items.pop(item["id"], None)

    @staticmethod
    def _own_items(entry: StoredResponse) -> list[dict[str, Any]]:
        return [item for item in (*entry.input_items, *entry.response["output"]) if isinstance(item.get("id"), str)]


def not_found(response_id: str, param: str) -> APIError:
    # OpenAI's wording and code for an unknown id; a continuation's names the field that sent it.
    if param == "previous_response_id":
        return APIError(404, f"previous_response_id: Previous response with id {response_id!r} not found (never "
                        f"stored, sent with store: false, deleted, or evicted: the server keeps the last "
                        f"--responses-store-entries, within --responses-store-bytes)", param, "previous_response_not_found")
    return APIError(404, f"Response with id {response_id!r} not found", param, "not_found")


__all__ = ["ResponseStore", "StoredResponse"]
