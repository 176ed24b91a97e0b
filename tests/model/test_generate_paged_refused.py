"""generate() across transformers' generation features: what a recurrent state cannot serve is refused by name."""

import pytest
import torch
from transformers import GenerationConfig

from tests.model.conftest import make_model


@pytest.fixture(scope="module")
def model():
    return make_model(initializer_range=0.3)


def test_transformers_continuous_batching_is_refused_by_name(model):
    # transformers switched generate(cache_implementation="paged") to its continuous batching, whose worker thread
    # failed every request on the forward's refusal of its paged cache: a logged traceback, and the prompts handed
    # back without a new token
    prompts = torch.randint(2, 101, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"continuous batching.*cache_implementation='paged'"):
        model.generate(prompts, max_new_tokens=3, cache_implementation="paged")
    with pytest.raises(ValueError, match="continuous batching"):
        model.generate_batch(prompts.tolist(), generation_config=GenerationConfig(max_new_tokens=3))
    # any other cache_implementation is still ignored, with the recurrent cache's tokens
    plain = model.generate(prompts, max_new_tokens=3, pad_token_id=0)
    assert torch.equal(model.generate(prompts, max_new_tokens=3, pad_token_id=0, cache_implementation="static"), plain)
