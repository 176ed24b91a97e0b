"""The stored responses' bound: a response answered again under the same id (vLLM's request_id) replaces the older
one, also when it is too large to keep, so that GET and previous_response_id never read the older answer."""

from __future__ import annotations

import pytest

from retnet.serve.protocol import APIError
from retnet.serve.response_store import ResponseStore


def response(rid: str, text: str) -> dict:
    return {"id": rid, "output": [{"type": "message", "id": f"msg_{rid}_{len(text)}", "role": "assistant",
                                   "content": [{"type": "output_text", "text": text, "annotations": []}]}]}


def test_an_id_answered_again_too_large_to_keep_forgets_the_older_answer():
    store = ResponseStore(entries=8, max_bytes=2000)
    store.put(response("r1", "short"), [], [])
    store.put(response("other", "kept"), [], [])
    assert store.get("r1").response["output"][0]["content"][0]["text"] == "short"
    store.put(response("r1", "x" * 5000), [], [])  # alone over the bound: not kept
    with pytest.raises(APIError) as err:
        store.get("r1")
    assert (err.value.status, err.value.code) == (404, "not_found")
    assert store.item("msg_r1_5") is None  # its items went with it
    assert store.get("other").response["output"][0]["content"][0]["text"] == "kept"
    assert len(store) == 1 and store.bytes == store.get("other").size


def test_an_id_answered_again_within_the_bound_is_the_newer_answer():
    store = ResponseStore(entries=8, max_bytes=2000)
    store.put(response("r1", "short"), [], [])
    store.put(response("r1", "longer"), [], [])
    assert store.get("r1").response["output"][0]["content"][0]["text"] == "longer"
    assert len(store) == 1 and store.bytes == store.get("r1").size
