"""retnet-run-batch's url refusal on a classifier, a reward model and a language model: it lists the routes that serve
the model (it listed a classifier's generation routes, which only answer 400 model_not_generative there)."""

import json

import pytest

from retnet.serve.app import create_app
from retnet.serve.run_batch import parse_lines, served_urls
from tests.serve.conftest import make_settings
from tests.serve.test_classify import save_classifier


def line(url: str) -> str:
    return json.dumps({"custom_id": url, "method": "POST", "url": url, "body": {}})


@pytest.mark.parametrize(("labels", "listed"), [
    (3, "/v1/classify"),
    (1, "/v1/classify, /v1/rerank, /v1/score"),
    (None, "/v1/chat/completions, /v1/completions, /v1/messages, /v1/messages/count_tokens, /v1/responses"),
])
def test_a_refused_url_lists_the_routes_that_serve_the_model(model_dir, tmp_path, labels, listed):
    path = model_dir if labels is None else save_classifier(tmp_path, model_dir, labels)
    urls = served_urls(create_app(make_settings(path)))
    nope, generation, classify = parse_lines([line("/v1/nope"), line("/v1/completions"), line("/classify")], urls)
    assert nope.error.code == "unsupported_url" and nope.error.param == "url"
    assert nope.error.message == f"line 1: url '/v1/nope' is not served; expected one of {listed}"
    # A route of another kind of model is still sent: the app's own 400 says what the model is and what to use
    # (its classifier's names /classify, the other name of /v1/classify, which a line may name too).
    assert generation.error is None and classify.error is None
