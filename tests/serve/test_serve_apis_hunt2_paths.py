"""The server's other APIs, second hunt: a Responses setting object that sets nothing, the embedding model's score
and rerank errors naming a first text shared by every pair, and a Messages answer ended on EOS whose text ends with
a stop sequence that min_tokens passed over."""

from __future__ import annotations

import pytest

from retnet.serve.protocol import APIError
from retnet.serve.responses import ResponsesRequest, to_chat_request
from tests.serve.conftest import serve_app


def test_a_responses_setting_object_that_sets_nothing_is_taken_as_null():
    """``reasoning: {}`` (or its fields all null, as a client's settings object with nothing set is sent) and
    ``stream_options: {}`` change nothing, the README's rule for the refused fields ("unless null or the value
    that changes nothing"), but were refused as a reasoning configuration (400 unsupported_parameter). One that
    sets something is still refused."""
    for field, value in [("reasoning", {}), ("reasoning", {"effort": None, "summary": None}), ("stream_options", {})]:
        chat, _ = to_chat_request(ResponsesRequest.model_validate({"input": "hi", field: value}))
        assert chat.messages[0].content == "hi"
    with pytest.raises(APIError) as refused:
        to_chat_request(ResponsesRequest.model_validate({"input": "hi", "stream_options": {"include_usage": True}}))
    assert (refused.value.status, refused.value.param, refused.value.code) == (400, "stream_options",
                                                                              "unsupported_parameter")


@pytest.mark.anyio
async def test_an_embedding_models_empty_text_is_named_as_its_side_was_sent(model_dir):
    """An embedding model's /rerank with an empty query said "query[0] has no tokens" (the query is one string,
    it has no [0]), and /score's ``text_1: ""`` "text_1[0]": a first text shared by every pair is named alone, as a
    reward model's pair errors name it; the N:N first side and the second side keep their index."""
    async with serve_app(model_dir, convert="embed") as client:
        cases = [("/rerank", {"query": "", "documents": ["a"]}, "query has no tokens"),
                 ("/score", {"text_1": "", "text_2": ["a"]}, "text_1 has no tokens"),
                 ("/score", {"text_1": ["a", ""], "text_2": ["b", "c"]}, "text_1[1] has no tokens"),
                 ("/rerank", {"query": "a", "documents": ["b", ""]}, "documents[1] has no tokens")]
        for path, body, told in cases:
            response = await client.post(path, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "empty_input" and error["message"].startswith(told), (body, error)
