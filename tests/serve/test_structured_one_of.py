"""``oneOf`` in structured output's schemas (retnet/serve/structured.py): pydantic writes a discriminated union
(``Field(discriminator=...)``) as a ``oneOf`` with OpenAPI's ``discriminator`` beside it. llguidance refused a
oneOf whose branches it could not prove disjoint (a 400), as for a tag with a default, which pydantic leaves out of
``required``. The tag is now required, as pydantic reads it, making the union exact; any other oneOf is read as
anyOf, as vLLM's xgrammar reads it. Every text is checked with pydantic itself, on the micro random model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from retnet.serve.protocol import APIError
from retnet.serve.structured import requested_grammar, tool_call_grammar

from .test_extras import CHAT

pytestmark = pytest.mark.anyio


class Cat(BaseModel):
    kind: Literal["cat"] = "cat"  # a tag with a default: optional in pydantic's schema
    lives: int = Field(ge=0, le=9)


class Dog(BaseModel):
    kind: Literal["dog"] = "dog"
    good: bool


class Pet(BaseModel):
    pet: Cat | Dog = Field(discriminator="kind")


class Pets(BaseModel):
    pets: list[Annotated[Cat | Dog, Field(discriminator="kind")]] = Field(min_length=1, max_length=3)


# The same closed (additionalProperties false), as a text that ends needs: an open object lets the random model
# write keys of its own until max_tokens. llguidance took these unions before (closed, their branches are disjoint
# by their required fields), but the tag was optional: a text without it, which pydantic refuses.
CLOSED = ConfigDict(extra="forbid")


class ClosedCat(Cat):
    model_config = CLOSED


class ClosedDog(Dog):
    model_config = CLOSED


class ClosedPet(BaseModel):
    model_config = CLOSED
    pet: ClosedCat | ClosedDog = Field(discriminator="kind")


class ClosedPets(BaseModel):
    model_config = CLOSED
    pets: list[Annotated[ClosedCat | ClosedDog, Field(discriminator="kind")]] = Field(min_length=1, max_length=3)


PET = Pet.model_json_schema()
PETS = Pets.model_json_schema()
# Branches that overlap (5 to 9 are in both): a oneOf only anyOf can approximate.
NUMBER = {"type": "object", "properties": {"n": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                           {"type": "integer", "minimum": 5, "maximum": 20}]}},
          "required": ["n"], "additionalProperties": False}
SAMPLED = {"temperature": 1.0, "max_tokens": 200, "n": 3}


def as_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}}


def tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


def test_pydantic_writes_a_discriminated_union_as_a_oneof_with_an_optional_tag():
    """What users send: the premise of the tests below, checked against the installed pydantic."""
    union = PET["properties"]["pet"]
    assert union["discriminator"]["propertyName"] == "kind" and len(union["oneOf"]) == 2 and "anyOf" not in union
    assert "kind" not in PET["$defs"]["Cat"]["required"]


@pytest.mark.parametrize("schema", [PET, PETS, NUMBER], ids=["pet", "pets", "overlapping"])
def test_a_oneof_compiles_wherever_a_schema_is_taken(compiler, schema):
    compiler.compile(*requested_grammar({"response_format": as_format(schema)}))
    compiler.compile(*requested_grammar({"guided_json": json.dumps(schema)}))
    compiler.compile(*tool_call_grammar([("f", schema), ("g", NUMBER)], None))
    compiler.compile(*tool_call_grammar([("f", schema)], "f"))


def test_x_guidance_can_ask_for_the_strict_reading(compiler):
    """coerce_one_of false: an overlapping oneOf is a 400 naming the field, as before; a discriminated union is
    exact without the approximation (its tag required) and still compiles."""
    strict = {"x-guidance": {"coerce_one_of": False}}
    with pytest.raises(APIError) as error:
        compiler.compile(*requested_grammar({"guided_json": {**NUMBER, **strict}}))
    assert error.value.status == 400 and error.value.param == "guided_json" and "oneOf" in str(error.value)
    compiler.compile(*requested_grammar({"guided_json": {**PET, **strict}}))
    compiler.compile(*requested_grammar({"guided_json": {**PETS, **strict}}))


@pytest.mark.parametrize(("model", "seed"), [(ClosedPet, 1), (ClosedPet, 2), (ClosedPets, 3)])
async def test_a_discriminated_union_response_format_gives_text_pydantic_reads(client, model, seed):
    body = {**CHAT, **SAMPLED, "seed": seed, "response_format": as_format(model.model_json_schema())}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        text = choice["message"]["content"]
        assert choice["finish_reason"] == "stop", text
        model.model_validate_json(text)  # a missing tag fails here: "Unable to extract tag"
        assert '"kind":' in text


async def test_tools_whose_parameters_hold_a_oneof_give_calls_that_fit(client):
    tools = [tool("adopt", ClosedPet.model_json_schema()), tool("count", NUMBER)]
    for tool_choice in ("required", {"type": "function", "function": {"name": "adopt"}}):
        body = {**CHAT, **SAMPLED, "seed": 5, "tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": False}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["message"].get("tool_calls"), choice
            calls = choice["message"]["tool_calls"]
            for call in calls:
                arguments = call["function"]["arguments"]
                if call["function"]["name"] == "adopt":
                    ClosedPet.model_validate_json(arguments)
                else:
                    assert call["function"]["name"] == "count"
                    value = json.loads(arguments)
                    assert set(value) == {"n"} and type(value["n"]) is int and 0 <= value["n"] <= 20


async def test_the_responses_api_text_format_takes_a_discriminated_union(client):
    fmt = {"type": "json_schema", "name": "pet", "schema": ClosedPet.model_json_schema()}
    r = await client.post("/v1/responses", json={"input": "Answer:", "text": {"format": fmt},
                                                 "max_output_tokens": 200, "temperature": 1.0, "seed": 4})
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    ClosedPet.model_validate_json(r.json()["output"][0]["content"][0]["text"])


def test_the_readme_says_how_a_oneof_is_read():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("**Structured output**"):readme.index("**Tool calls**")]
    assert "`oneOf`" in section and "`anyOf`" in section and "discriminator" in section
    assert '{"coerce_one_of": false}' in section
