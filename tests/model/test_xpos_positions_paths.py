"""xPos with given position_ids, against a float64 reference of retention written from the paper's definitions.

o_n = Σ_{m ≤ n} (Q_n Θ_n)(K_m Θ̄_m)ᵀ γ^(n−m) V_m, with the rotation Θ and xPos's ζ^(p/base) (on q) and ζ^(−p/base) (on
k) taken at each token's position p, and the decay γ^(n−m) at the distance n − m in tokens of the sequence (the
README's recurrence S_t = γ·S_{t−1} + k_tᵀ v_t steps once per token, whatever the positions say). A padded row's
sequence is its real tokens. Positions that restart inside a row (two documents numbered 0.., 0..) thus mean:

- given with an attention_mask (or a cache): one sequence whose positions restart, the state carried across, as
  transformers' models take them (they look for packed sequences only without a mask and a cache);
- given alone (B=1): packed documents, each from a zero state (README: DataCollatorWithFlattening).

A padded batch runs each row packed in one xPos frame; a row without padding runs unpacked, in frames of
xpos_span positions whose state moves between them. Both must give the reference's outputs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.model.test_model_known_paths import xpos_model

MODES = ["parallel", "chunkwise", "recurrent"]
WIDTH, HALF, PAD_FROM = 100, 50, 80


def rotate(t, angle, scale=None):
    """t ``[n, H, K]``: half-split pairs (j, j + K/2) rotated by ``angle`` ``[n, K/2]``, then times ``scale``
    ``[n, K/2]`` (xPos's ζ_j^(±p/base)) on both halves."""
    half = t.shape[-1] // 2
    first, second = t[..., :half], t[..., half:]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], -1)
    return rotated if scale is None else rotated * torch.cat([scale] * 2, -1)[:, None]


@torch.no_grad()
def reference_retention(module, x, positions, real, documents=None):
    """float64 RetNetMultiScaleRetention output ``[B, T, d]`` for its input ``x`` ``[B, T, d]`` at ``positions``
    ``[B, T]``; ``real`` ``[B, T]`` bool: a row's sequence is its real tokens (padding columns are left zero).
    ``documents`` ``[B, T]``: tokens of different ids see nothing of each other."""
    config = module.config
    heads, key_dim, value_dim = module.num_heads, module.head_dim, module.value_head_dim
    weight = {name: getattr(module, name).weight.double() for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    pairs = torch.arange(key_dim // 2, dtype=torch.float64)
    inv_freq = config.rope_theta ** (-2 * pairs / key_dim)  # θ_j
    zeta = (2 * pairs + 0.4 * key_dim) / (1.4 * key_dim)  # xPos ζ_j (Sun et al., 2022)
    gamma = 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))  # the paper's decays
    out = torch.zeros(x.shape[0], x.shape[1], config.hidden_size, dtype=torch.float64)
    for row in range(x.shape[0]):
        cols = real[row].nonzero().squeeze(-1)
        xs = x[row, cols].double()
        p = positions[row, cols].double()[:, None]  # [n, 1]
        q = (xs @ weight["q_proj"].T).view(-1, heads, key_dim)
        k = (xs @ weight["k_proj"].T).view(-1, heads, key_dim)
        v = (xs @ weight["v_proj"].T).view(-1, heads, value_dim)
        xpos = zeta ** (p / config.xpos_scale_base) if config.use_xpos else None
        q, k = rotate(q, p * inv_freq, xpos), rotate(k, p * inv_freq, None if xpos is None else 1 / xpos)
        n = torch.arange(len(cols), dtype=torch.float64)
        distance = n[:, None] - n[None, :]  # in tokens of the sequence, not in positions
        seen = distance >= 0
        if documents is not None:
            doc = documents[row, cols]
            seen &= doc[:, None] == doc[None, :]
        decay = torch.where(seen, gamma[:, None, None] ** distance.clamp(min=0), 0.0)  # [H, n, m]
        scores = torch.einsum("nhk,mhk->hnm", q, k) * key_dim ** -0.5 * decay
        o = torch.einsum("hnm,mhv->nhv", scores, v)
        norm = F.rms_norm if config.norm_type == "rmsnorm" else F.layer_norm
        o = norm(o, (value_dim,), eps=config.rms_norm_eps).flatten(-2) * module.head_norm.weight.double()
        o = F.silu(xs @ module.g_proj.weight.double().T) * o
        out[row, cols] = o @ weight["o_proj"].T
    return out


def run_layers(model, **inputs):
    """(logits, [(input, output) of each layer's retention module])."""
    seen = []
    hooks = [layer.retention.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out[0])))
             for layer in model.model.layers]
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, seen


def assert_layers_match(seen, positions, real, documents=None):
    for module, x, out in seen:
        expected = reference_retention(module, x, positions, real, documents)
        got = out.double() * real[..., None]
        assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), float((got - expected).abs().max())


def restarting_batch(restart=True, start=0):
    ids = torch.randint(2, 101, (2, WIDTH), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, PAD_FROM:] = 0
    if restart:  # two 50-token documents per row
        positions = torch.cat([torch.arange(HALF), torch.arange(HALF)])[None].repeat(2, 1) + start
    else:
        positions = torch.arange(WIDTH)[None].repeat(2, 1) + start
    positions[1, PAD_FROM:] = 0  # as generate gives padding
    return ids, mask, positions


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("restart", [True, False], ids=["restarting", "monotone"])
def test_padded_batch_and_row_alone_match_float64_reference(mode, restart):
    """The padded batch (packed, one frame per row) and row 0 alone with its mask (unpacked, xPos frames of 16
    positions, the state moved between them, backwards at a restart) both give the reference at every layer."""
    model = xpos_model()
    ids, mask, positions = restarting_batch(restart)
    real = mask.bool()
    batch_logits, seen = run_layers(model, input_ids=ids, attention_mask=mask, position_ids=positions,
                                    retention_mode=mode)
    assert_layers_match(seen, positions, real)
    alone_logits, seen = run_layers(model, input_ids=ids[:1], attention_mask=mask[:1], position_ids=positions[:1],
                                    retention_mode=mode)
    assert_layers_match(seen, positions[:1], real[:1])
    torch.testing.assert_close(batch_logits[0], alone_logits[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_xpos", [True, False], ids=["xpos", "rotary"])
def test_restarting_positions_without_mask_run_as_documents(mode, use_xpos):
    """Without a mask or a cache, restarting positions mark packed documents (each from a zero state): the
    reference with the documents kept apart, the same as cu_seqlens, and not the one-sequence reading a mask gives
    (the ~0.5 difference in logits between the two is that of the inputs' meaning, not of an xPos path: it is
    there without xPos too)."""
    model = xpos_model(use_xpos=use_xpos)
    ids, _, positions = restarting_batch()
    ids, positions = ids[:1], positions[:1]
    real = torch.ones_like(ids, dtype=torch.bool)
    documents = (torch.arange(WIDTH) >= HALF).long()[None]
    logits, seen = run_layers(model, input_ids=ids, position_ids=positions, retention_mode=mode)
    assert_layers_match(seen, positions, real, documents)
    packed = model(ids, cu_seqlens=torch.tensor([0, HALF, WIDTH]), use_cache=False, retention_mode=mode).logits
    torch.testing.assert_close(logits, packed, atol=1e-5, rtol=1e-5)
    masked = model(ids, attention_mask=torch.ones_like(ids), position_ids=positions, use_cache=False,
                   retention_mode=mode).logits
    assert float((masked - logits)[0, HALF:].abs().max()) > 1e-2  # the second document sees the first
    torch.testing.assert_close(masked[0, :HALF], logits[0, :HALF], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_positions_starting_anywhere_and_jumping_match_reference(mode):
    """Positions that start far from 0 and jump forward inside a row (a gap of 30) with a mask: the rotation and
    xPos scale follow the positions, the decay the tokens; the batch's packed frame starts at row 1's first real
    position."""
    model = xpos_model()
    ids, mask, _ = restarting_batch()
    positions = torch.cat([torch.arange(HALF), torch.arange(HALF) + HALF + 30])[None].repeat(2, 1) + 40
    positions[1, PAD_FROM:] = 0
    real = mask.bool()
    _, seen = run_layers(model, input_ids=ids, attention_mask=mask, position_ids=positions, retention_mode=mode)
    assert_layers_match(seen, positions, real)
    _, seen = run_layers(model, input_ids=ids[:1], attention_mask=mask[:1], position_ids=positions[:1],
                         retention_mode=mode)
    assert_layers_match(seen, positions[:1], real[:1])


@torch.no_grad()
def test_reference_is_the_paper_recurrence():
    """The reference's parallel form equals the recurrence S_n = γ S_{n−1} + k_nᵀ v_n (xPos off: a plain check of
    its decay and scale, independent of the model's kernels)."""
    model = xpos_model(use_xpos=False)
    module = model.model.layers[0].retention
    x = torch.randn(1, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12)[None] + 3
    expected = reference_retention(module, x, positions, torch.ones(1, 12, dtype=torch.bool))
    heads, key_dim = module.num_heads, module.head_dim
    xs = x[0].double()
    p = positions[0].double()[:, None]
    inv_freq = model.config.rope_theta ** (-2 * torch.arange(key_dim // 2, dtype=torch.float64) / key_dim)
    q = rotate((xs @ module.q_proj.weight.double().T).view(12, heads, key_dim), p * inv_freq) * key_dim ** -0.5
    k = rotate((xs @ module.k_proj.weight.double().T).view(12, heads, key_dim), p * inv_freq)
    v = (xs @ module.v_proj.weight.double().T).view(12, heads, -1)
    gamma = torch.tensor([math.exp(d) for d in model.config.log_decays()], dtype=torch.float64)
    state = torch.zeros(heads, key_dim, v.shape[-1], dtype=torch.float64)
    outputs = []
    for n in range(12):
        state = gamma[:, None, None] * state + k[n][:, :, None] * v[n][:, None, :]
        outputs.append(torch.einsum("hk,hkv->hv", q[n], state))
    o = F.layer_norm(torch.stack(outputs), (v.shape[-1],), eps=model.config.rms_norm_eps).flatten(-2)
    o = F.silu(xs @ module.g_proj.weight.double().T) * o * module.head_norm.weight.double()
    torch.testing.assert_close(o @ module.o_proj.weight.double().T, expected[0])
