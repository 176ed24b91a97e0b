"""A Responses ``request_id`` holding "/" (vLLM takes any string; the response's id is it): the stored response is
fetched, listed and deleted by its id, which the router answered 404 "Not Found" before the handler saw it."""

import pytest

pytestmark = pytest.mark.anyio


async def test_a_response_whose_id_holds_a_slash_is_fetched_listed_and_deleted(open_app):
    async with open_app() as client:
        rid = "batch/7/input_items/x"  # "/" anywhere, "input_items" too, but not at its end
        created = await client.post("/v1/responses", json={"request_id": rid, "input": "Hello", "max_output_tokens": 2,
                                                           "temperature": 0})
        assert created.status_code == 200 and created.json()["id"] == rid
        got = await client.get(f"/v1/responses/{rid}")
        assert got.status_code == 200 and got.json() == created.json()
        listed = await client.get(f"/v1/responses/{rid}/input_items")
        assert listed.status_code == 200 and [i["role"] for i in listed.json()["data"]] == ["user"]
        deleted = await client.delete(f"/v1/responses/{rid}")
        assert deleted.status_code == 200 and deleted.json() == {"id": rid, "object": "response", "deleted": True}
        gone = await client.get(f"/v1/responses/{rid}")
        assert gone.status_code == 404 and repr(rid) in gone.json()["error"]["message"]
        # input_items keeps its own route: not read as the id "abc/input_items"
        missing = await client.get("/v1/responses/abc/input_items")
        assert missing.status_code == 404 and "'abc'" in missing.json()["error"]["message"]
        metrics = (await client.get("/metrics")).text
    assert 'retnet_requests_total{route="/v1/responses/{response_id}",status="200"} 2.0' in metrics
    assert 'retnet_requests_total{route="/v1/responses/{response_id}/input_items",status="200"} 1.0' in metrics
    assert 'retnet_requests_total{route="/v1/responses/{response_id}/input_items",status="404"} 1.0' in metrics
