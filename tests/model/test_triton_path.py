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


# One chunk length: what the model adds to the kernels (dispatch, layout, gradients through the layers, decode on a
# Triton prefill's cache) does not depend on it. 21 tokens give two chunks of 16, a partial last one (the prefill
# of 18 too); the kernels' 32-token tiles (chunk_size 32, once run here too) are checked against the reference in
# tests/kernels/test_chunk.py (the K=64, V=200 case in every dtype, the strong-decay test) and test_edges.py (T=31).
@pytest.mark.parametrize("chunk_size", (16,))
def test_model_on_triton_kernels_matches_the_reference(model_factory, monkeypatch, chunk_size):
    pytest.importorskip("triton")
    model = model_factory(chunk_size=chunk_size).to(DEVICE)
    ids = torch.randint(2, 101, (2, 21), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    reference = _run(model, ids, monkeypatch, "torch")
    fast = _run(model, ids, monkeypatch, "triton")
    torch.testing.assert_close(fast[0], reference[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1], reference[1], rtol=1e-5, atol=1e-5)
    for name, grad in reference[2].items():
        torch.testing.assert_close(fast[2][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(fast[3], reference[3], rtol=1e-4, atol=1e-4)


def test_bf16_autocast_training_step_on_triton_matches_the_fp32_reference(model_factory, monkeypatch):
    """What training on a GPU runs: bf16 autocast, so the Triton kernels see bf16 q, k, v (and store bf16
    chunk states). Loss within 1% of the fp32 reference's, every gradient at cosine > 0.99 (bf16 autocast on
    the reference path itself: 2e-6 and 0.9999 on CPU; a wrong state or decay is far off both). 100 tokens: two
    64-token chunks, the second partial and starting from the first's stored bf16 state."""
    pytest.importorskip("triton")
    model = model_factory(chunk_size=64).to(DEVICE)
    ids = torch.randint(2, 101, (2, 100), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    monkeypatch.setenv("RETNET_KERNELS", "torch")
    model.zero_grad()
    reference = model(ids, labels=ids, retention_mode="chunkwise").loss
    reference.backward()
    expected = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    monkeypatch.setenv("RETNET_KERNELS", "triton")
    model.zero_grad()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = model(ids, labels=ids, retention_mode="chunkwise").loss
    loss.backward()
    assert abs(loss.item() - reference.item()) <= 1e-2 * abs(reference.item())
    for name, grad in expected.items():
        got = dict(model.named_parameters())[name].grad.float().flatten()
        cosine = torch.nn.functional.cosine_similarity(got, grad.flatten(), dim=0).item()
        assert cosine > 0.99, f"{name}: cosine {cosine:.4f}"
