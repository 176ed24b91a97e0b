"""A beam search whose engine dies between two of its steps fails as one whose step the dying engine held: 503
``engine_failure``, its choices counted failed, not a shutdown's ``unavailable`` and cancelled."""

import asyncio

import pytest

from retnet.serve.sequence import EngineFailure, EngineUnavailable

pytestmark = pytest.mark.anyio

PROMPT = "def add(a, b):"


def sample(engine, name: str, labels: dict | None = None) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_an_engine_dead_between_two_steps_fails_the_search(open_app):
    async with open_app() as client:
        engine, serving = client.app.state.engine, client.app.state.serving
        submit = engine.submit
        steps = []

        def dies_after_the_first_step(*args, **kwargs):
            # The model's thread dies while the search ranks its first step's beams: the next step is refused, as
            # by an engine that fails (engine.failure set, then every submit refused with engine.dead).
            steps.append(args)
            if len(steps) > 1:
                engine.failure = "RuntimeError: CUDA error: an illegal memory access was encountered"
                raise EngineUnavailable(engine.unavailable())
            return submit(*args, **kwargs)

        from retnet.serve.protocol import CompletionRequest

        request = CompletionRequest(prompt=PROMPT, n=2, max_tokens=5, use_beam_search=True)
        params = serving.checks.params(request, request.max_tokens, None)
        names = ["retnet_sequences_failed_total", "retnet_sequences_cancelled_total"]
        before = [sample(engine, name) for name in names]
        rejected = sample(engine, "retnet_requests_rejected_total", {"reason": "unavailable"})
        engine.submit = dies_after_the_first_step
        try:
            handle = serving._beam_search([engine.tokenizer.encode(PROMPT)], params, request)
            answer = await asyncio.wait_for(handle.queue.get(), 30)
        finally:
            engine.submit, engine.failure = submit, None  # the app's own shutdown, as of a live engine
        assert len(steps) == 2
        assert isinstance(answer, EngineFailure), answer
        # it was 503 "unavailable: engine failed: ...", its 2 choices counted cancelled, as by a shutdown
        assert (answer.status, answer.code) == (503, "engine_failure"), answer
        assert answer.message.startswith("engine failed: RuntimeError: CUDA error"), answer
        assert [sample(engine, name) - was for name, was in zip(names, before)] == [2, 0]
        assert sample(engine, "retnet_requests_rejected_total", {"reason": "unavailable"}) == rejected
