"""The decode step's shortcuts give the bits the general code gives: the input rules' fast test, the kept decay
factors, the rotation by one roll, the one-token recurrent step and the layers' dropout skip."""

from __future__ import annotations

import pytest
import torch

from retnet.kernels import checks, naive
from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.model.modeling_retnet import RetNetPositionEncoding, RetNetPositionPiece, _rotate_half


def _inputs(batch=2, length=1, heads=3, key_dim=8, value_dim=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, length, heads, key_dim, generator=generator, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, length, heads, value_dim, generator=generator, dtype=dtype)
    state = torch.randn(batch, heads, key_dim, value_dim, generator=generator)
    log_decay = checks.log_decay_tensor([-0.5 / (h + 1) for h in range(heads)])
    return q, k, v, log_decay, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_rule_test_accepts_only_what_the_rules_accept(dtype):
    q, k, v, log_decay, state = _inputs(dtype=dtype)
    assert checks._plainly_valid(q, k, v, log_decay, state)
    checks._check_layout("op", q, k, v, log_decay, state, None)  # (raises if the rules refuse)
    # Each broken rule sends the call to the rules (which refuse it by name).
    broken = [(q, k[..., :4], v, log_decay, state), (q, k, v[:1], log_decay, state), (q, k, v, log_decay[:2], state),
              (q, k.double(), v, log_decay, state), (q, k, v, log_decay, state[:1]),
              (q, k, v, torch.zeros(3, dtype=torch.long), state), (q, k, v, log_decay, state.long()),
              (q, k, v, log_decay, state.to("meta")), (q, k, v.to_sparse(), log_decay, state),
              (q.int(), k.int(), v.int(), log_decay, state), (q[0], k[0], v[0], log_decay, state)]
    for args in broken:
        assert not checks._plainly_valid(*args)
        with pytest.raises(ValueError):
            checks._check_layout("op", *args, None)


def test_kept_decay_factors_follow_an_inplace_write():
    q, k, v, log_decay, state = _inputs()
    first, _ = naive.recurrent_retention(q, k, v, log_decay, initial_state=state)
    with torch.no_grad():
        log_decay.mul_(3.0)  # a new γ: the factors kept from the first call no longer hold
    second, _ = naive.recurrent_retention(q, k, v, log_decay, initial_state=state)
    fresh, _ = naive.recurrent_retention(q, k, v, log_decay.clone(), initial_state=state)
    assert not torch.equal(first, second)
    assert torch.equal(second, fresh)


def test_one_token_steps_match_the_general_loop_bit_for_bit():
    q, k, v, log_decay, state = _inputs(length=3)
    whole, whole_state = naive.recurrent_retention(q, k, v, log_decay, initial_state=state, output_final_state=True)
    outputs, step_state = [], state
    for t in range(3):
        o, step_state = naive.recurrent_retention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], log_decay,
                                                  initial_state=step_state, output_final_state=True)
        outputs.append(o)
    assert torch.equal(torch.cat(outputs, 1), whole)
    assert torch.equal(step_state, whole_state)


@pytest.mark.parametrize("xpos", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_by_roll_matches_rotate_half(xpos, dtype):
    q, k, *_ = _inputs(length=5, key_dim=8, dtype=dtype, seed=1)
    angles = torch.rand(2, 5, 1, 4, dtype=torch.float64) * 50
    cos, sin = (torch.cat([f(angles)] * 2, -1).float() for f in (torch.cos, torch.sin))
    scale = torch.rand(2, 5, 1, 8) + 0.5 if xpos else None
    piece = RetNetPositionPiece(slice(0, 5), cos, sin, scale, None)
    q_rot, k_rot = RetNetPositionEncoding.apply(piece, q, k)
    qf, kf = q.float(), k.float()
    want_q, want_k = qf * cos + _rotate_half(qf) * sin, kf * cos + _rotate_half(kf) * sin
    if xpos:
        want_q, want_k = want_q * scale, want_k / scale
    assert torch.equal(q_rot, want_q.to(dtype)) and torch.equal(k_rot, want_k.to(dtype))


@pytest.mark.parametrize("seed", range(3))
def test_decoding_in_eval_matches_dropout_that_drops_nothing(seed):
    """Eval skips the layers' dropout calls: the same logits and states as a train-mode forward with p = 0,
    which calls them (GLU or not, xPos or not, left padding)."""
    torch.manual_seed(seed)
    config = RetNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          ffn_glu=seed % 2 == 0, use_xpos=seed > 0, norm_type=("layernorm", "rmsnorm")[seed % 2],
                          dropout=0.0)
    model = RetNetForCausalLM(config)
    ids = torch.randint(0, 50, (3, 4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    runs = []
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True)
            cache, logits = out.cache if getattr(out, "cache", None) is not None else out.past_key_values, [out.logits]
            for _ in range(3):
                logits.append(model(logits[-1][:, -1:].argmax(-1), cache=cache, use_cache=True).logits)
        runs.append((logits, list(cache.states)))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1], strict=True):
        assert torch.equal(a, b)
