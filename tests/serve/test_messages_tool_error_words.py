"""The Messages API's 400s for a tool or tool_choice field that is not a string, and for a block in the other role's
message, say what the field belongs to in words a client reads (they said "a None block", "a custom block", "a tool
block" and "an user message")."""

from __future__ import annotations

import pytest

from retnet.serve.messages import MessagesRequest, to_chat_body
from retnet.serve.protocol import APIError

ASK = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object"}


def refusal(**fields) -> APIError:
    request = MessagesRequest.model_validate({"model": "micro", "max_tokens": 4, "messages": ASK, **fields})
    with pytest.raises(APIError) as refused:
        to_chat_body(request, None)
    return refused.value


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"tools": [{"input_schema": SCHEMA}], "tool_choice": {"type": "any"}},
     "tools[0].name", "tools[0].name: a tool needs a string 'name'; got null"),
    ({"tools": [{"type": "custom", "name": 5, "input_schema": SCHEMA}], "tool_choice": {"type": "any"}},
     "tools[0].name", "tools[0].name: a tool needs a string 'name'; got 5"),
    ({"tools": [{"name": "f", "description": 5, "input_schema": SCHEMA}], "tool_choice": {"type": "any"}},
     "tools[0].description", "tools[0].description: a tool needs a string 'description'; got 5"),
    ({"tools": [{"name": "f", "input_schema": SCHEMA}], "tool_choice": {"type": "tool"}},
     "tool_choice.name", "tool_choice.name: a tool_choice of type 'tool' needs a string 'name'; got null"),
])
def test_a_tool_field_that_is_not_a_string_is_named_as_a_tools(fields, param, message):
    error = refusal(**fields)
    assert (error.status, error.param, error.message) == (400, param, message)


def test_a_block_of_the_other_role_names_that_role_with_its_article():
    error = refusal(messages=[*ASK, {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}])
    assert error.message == ("messages[1].content[0].type: 'tool_result' blocks are only in a user message; an "
                             "assistant message takes text and tool_use blocks")
    error = refusal(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}])
    assert error.message == ("messages[0].content[0].type: 'tool_use' blocks are only in an assistant message; a "
                             "user message takes text and tool_result blocks")
