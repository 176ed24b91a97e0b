"""The model on the Triton kernels (compiled on a GPU, interpreted on CPU) against the PyTorch references."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(model, ids, monkeypatch, backend):
    monkeypatch.setenv("RETNET_KERNELS", backend)
    model.zero_grad()
    out = model(ids, labels=ids, retention_mode="chunkwise")
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        prefill = model(ids[:, :-3], use_cache=True)
        steps = [model(ids[:, t : t + 1], cache=prefill.cache, use_cache=True).logits for t in range(ids.shape[1] - 3,
                                                                                                     ids.shape[1])]
    return out.logits.detach(), out.loss.detach(), grads, torch.cat(steps, dim=1)


@pytest.mark.parametrize("chunk_size", (16, 32))
def test_model_on_triton_kernels_matches_the_reference(model_factory, monkeypatch, chunk_size):
    pytest.importorskip("triton")
    model = model_factory(chunk_size=chunk_size).to(DEVICE)
    ids = torch.randint(2, 101, (2, 37), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    reference = _run(model, ids, monkeypatch, "torch")
    fast = _run(model, ids, monkeypatch, "triton")
    torch.testing.assert_close(fast[0], reference[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1], reference[1], rtol=1e-5, atol=1e-5)
    for name, grad in reference[2].items():
        torch.testing.assert_close(fast[2][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(fast[3], reference[3], rtol=1e-4, atol=1e-4)
