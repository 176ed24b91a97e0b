"""The FFN activations: values against independent computations, gradients, low precision, the registry."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.integrate import quad
from torch.autograd import gradcheck
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from retnet.model import RetNetConfig
from retnet.model.activations import (
    ACTIVATIONS,
    SAU,
    Activation,
    GeneralizedSmeLU,
    SmeLU,
    generalized_smelu,
    get_activation,
    nonlinear_evals_per_token,
    sau,
    smelu,
    validate_activation,
)

X_POINTS = [-1000.0, -50.0, -8.0, -3.0, -1.0, -0.3, 0.0, 0.2, 1.0, 2.5, 7.0, 50.0, 1000.0]


# -- independent references ------------------------------------------------------------------------------


def sau_by_quadrature(x: float, alpha: float, sigma: float) -> float:
    """∫ LeakyReLU_α(x − y) N(y; 0, σ²) dy by adaptive quadrature (the definition, not the closed form)."""
    leaky = lambda u: u if u >= 0 else alpha * u
    gauss = lambda y: math.exp(-0.5 * (y / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    lo, hi = -12 * sigma, 12 * sigma  # the Gaussian mass outside is ~1e-33
    points = [x] if lo < x < hi else None  # the kink of the integrand
    value, _ = quad(lambda y: leaky(x - y) * gauss(y), lo, hi, points=points, epsabs=1e-13, epsrel=1e-13,
                    limit=200)
    return value


def smelu_numpy(x: np.ndarray, beta: float) -> np.ndarray:
    return np.where(x <= -beta, 0.0, np.where(x >= beta, x, (x + beta) ** 2 / (4 * beta)))


def gsmelu_numpy(x: np.ndarray, alpha: float, beta: float, g_minus: float, g_plus: float, t: float) -> np.ndarray:
    """Piecewise evaluation with the coefficients solved from the continuity conditions, not from formulas.

    Unknowns a, b, c (quadratic a x² + b x + c) and d (right piece g₊ x + d); left piece g₋ x + t.
    """
    system = np.array([
        [-2 * alpha, 1.0, 0.0, 0.0],        # slope at −α is g₋
        [2 * beta, 1.0, 0.0, 0.0],          # slope at β is g₊
        [alpha**2, -alpha, 1.0, 0.0],       # value at −α is −g₋α + t
        [beta**2, beta, 1.0, -1.0],         # value at β is g₊β + d
    ])
    rhs = np.array([g_minus, g_plus, -g_minus * alpha + t, g_plus * beta])
    a, b, c, d = np.linalg.solve(system, rhs)
    return np.where(x <= -alpha, g_minus * x + t, np.where(x >= beta, g_plus * x + d, a * x**2 + b * x + c))


GSMELU_SETTINGS = [
    dict(alpha=2.0, beta=2.0, g_minus=0.0, g_plus=1.0, t=0.0),
    dict(alpha=1.0, beta=3.0, g_minus=0.1, g_plus=1.2, t=0.5),
    dict(alpha=-0.5, beta=1.5, g_minus=-0.2, g_plus=2.0, t=-1.0),  # quadratic region [0.5, 1.5]
    dict(alpha=0.5, beta=0.5, g_minus=1.0, g_plus=0.0, t=0.0),  # concave: slope 1 then 0
]


# -- SAU -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.15, 0.5])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_sau_closed_form_matches_quadrature_of_the_convolution(alpha, sigma):
    x = torch.tensor(X_POINTS, dtype=torch.float64)
    expected = torch.tensor([sau_by_quadrature(v, alpha, sigma) for v in X_POINTS], dtype=torch.float64)
    torch.testing.assert_close(sau(x, alpha, sigma), expected, rtol=1e-9, atol=1e-9)
    # The module stores α and log σ in float32: equal up to that rounding.
    module = SAU(alpha=alpha, sigma=sigma)
    torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha, sigma", [(0.0, 1.0), (0.15, 0.5), (0.5, 3.0)])
def test_sau_gradient_matches_derivative_of_quadrature(alpha, sigma):
    points = [-8.0, -3.0, -1.0, -0.3, 0.0, 0.2, 1.0, 2.5, 7.0]
    x = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sau(x, alpha, sigma).sum(), x)
    h = 1e-4
    numeric = [(sau_by_quadrature(v + h, alpha, sigma) - sau_by_quadrature(v - h, alpha, sigma)) / (2 * h)
               for v in points]
    torch.testing.assert_close(grad, torch.tensor(numeric, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # and the closed-form derivative α + (1−α)Φ(x/σ)
    phi_cdf = 0.5 * torch.special.erfc(-x.detach() / (sigma * math.sqrt(2)))
    torch.testing.assert_close(grad, alpha + (1 - alpha) * phi_cdf, rtol=1e-12, atol=1e-12)


def test_sau_limits_are_leaky_relu():
    x = torch.tensor([-500.0, -40.0, 40.0, 500.0], dtype=torch.float64)
    torch.testing.assert_close(sau(x, 0.15, 1.0), torch.where(x > 0, x, 0.15 * x), rtol=0, atol=0)
    # σ → 0: the convolution tends to the Leaky ReLU itself
    y = torch.linspace(-3, 3, 61, dtype=torch.float64)
    torch.testing.assert_close(sau(y, 0.15, 1e-4), F.leaky_relu(y, 0.15), rtol=0, atol=1e-4)


def test_sau_gradcheck_functional_wrt_x_alpha_sigma():
    x = torch.tensor([-6.0, -2.3, -0.7, -0.1, 0.05, 0.4, 1.3, 3.1, 9.0], dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.15, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert gradcheck(sau, (x, alpha, sigma), eps=1e-6, atol=1e-7)
    # ∂/∂σ = (1−α)φ(x/σ) and ∂/∂α = x − (relu ∗ N)(x)
    out = sau(x, alpha, sigma)
    d_alpha, d_sigma = torch.autograd.grad(out.sum(), (alpha, sigma))
    z = x.detach() / 0.8
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    smooth = x.detach() * 0.5 * torch.special.erfc(-z / math.sqrt(2)) + 0.8 * pdf
    torch.testing.assert_close(d_sigma, (0.85 * pdf).sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_alpha, (x.detach() - smooth).sum(), rtol=1e-12, atol=1e-12)


def test_sau_module_gradcheck_with_trainable_sigma():
    module = SAU(alpha=0.3, sigma=0.7, trainable_alpha=True, trainable_sigma=True)
    assert {name for name, _ in module.named_parameters()} == {"alpha", "log_sigma"}
    x = torch.tensor([-4.0, -1.1, -0.2, 0.3, 0.9, 2.2, 5.0], dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor(math.log(0.7), dtype=torch.float64, requires_grad=True)
    call = lambda x, a, ls: functional_call(module, {"alpha": a, "log_sigma": ls}, (x,))
    assert gradcheck(call, (x, alpha, log_sigma), eps=1e-6, atol=1e-7)
    # the module really trains σ: its gradient reaches log_sigma, and σ stays positive after big steps
    module.float()
    module(torch.randn(64)).sum().backward()
    assert module.log_sigma.grad is not None and module.alpha.grad is not None
    with torch.no_grad():
        module.log_sigma -= 50.0
    assert module.sigma.item() > 0
    assert torch.isfinite(module(torch.linspace(-5, 5, 11))).all()
    module.reset_parameters()
    assert module.sigma.item() == pytest.approx(0.7, rel=1e-6)
    assert module.alpha.item() == pytest.approx(0.3, rel=1e-6)


def test_sau_trainability_flags():
    default = SAU()
    assert [name for name, _ in default.named_parameters()] == ["alpha"]
    assert default.alpha.item() == pytest.approx(0.15)
    frozen = SAU(trainable_alpha=False)
    assert list(frozen.parameters()) == []
    assert set(frozen.state_dict()) == {"alpha", "log_sigma"}  # saved with the model either way


# -- SmeLU / generalized SmeLU ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.25, 1.0, 2.0, 5.0])
def test_smelu_matches_piecewise_numpy(beta):
    values = np.concatenate([np.linspace(-3 * beta, 3 * beta, 601), [-beta, beta, -1e4, 1e4]])
    out = SmeLU(beta)(torch.tensor(values, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(out, smelu_numpy(values, beta), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("setting", GSMELU_SETTINGS)
def test_gsmelu_matches_piecewise_numpy(setting):
    lo, hi = -abs(setting["alpha"]) - 3, setting["beta"] + 3
    values = np.concatenate([np.linspace(lo, hi, 601), [-setting["alpha"], setting["beta"], -1e4, 1e4]])
    out = GeneralizedSmeLU(**setting)(torch.tensor(values, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(out, gsmelu_numpy(values, **setting), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 2.0, 3.7])
def test_gsmelu_reduces_to_smelu(beta):
    x = torch.linspace(-3 * beta, 3 * beta, 301, dtype=torch.float64, requires_grad=True)
    general = GeneralizedSmeLU(alpha=beta, beta=beta, g_minus=0.0, g_plus=1.0, t=0.0)
    a = general(x)
    b = SmeLU(beta)(x)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-14, atol=1e-14)


def test_gsmelu_t_is_the_left_intercept_and_the_documented_origin_normalisation_holds():
    alpha, beta, g_minus, g_plus = 1.0, 3.0, 0.1, 1.2
    x = torch.tensor([-7.0, -alpha, beta, 9.0], dtype=torch.float64)
    shifted = generalized_smelu(x, alpha, beta, g_minus, g_plus, t=0.75) - generalized_smelu(x, alpha, beta, g_minus, g_plus)
    torch.testing.assert_close(shifted, torch.full_like(x, 0.75), rtol=0, atol=1e-12)  # a vertical shift
    assert generalized_smelu(x, alpha, beta, g_minus, g_plus, t=0.75)[0].item() == pytest.approx(-7 * g_minus + 0.75)
    # t = (g₊ − g₋)(β − α)/2 puts the right piece through the origin: f(x) = g₊·x for x ≥ β
    t = (g_plus - g_minus) * (beta - alpha) / 2
    right = torch.tensor([beta, 4.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(generalized_smelu(right, alpha, beta, g_minus, g_plus, t), g_plus * right)


def test_smelu_gsmelu_gradcheck_away_from_kinks():
    x = torch.tensor([-5.0, -2.5, -1.9, -0.6, 0.0, 0.7, 1.95, 2.1, 6.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda v: smelu(v, 2.0), (x,), eps=1e-6, atol=1e-7)
    for setting in GSMELU_SETTINGS:
        kinks = torch.tensor([-setting["alpha"], setting["beta"]], dtype=torch.float64)
        y = torch.linspace(-6, 6, 37, dtype=torch.float64)
        y = y[(y[:, None] - kinks).abs().min(dim=1).values > 1e-3].requires_grad_()
        assert gradcheck(lambda v, s=setting: generalized_smelu(v, **s), (y,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("setting", [*GSMELU_SETTINGS, "smelu"])
def test_gradient_is_continuous_at_the_kinks(setting):
    if setting == "smelu":
        fn, kinks = (lambda v: smelu(v, 1.5)), [(-1.5, 0.0), (1.5, 1.0)]
    else:
        fn = lambda v, s=setting: generalized_smelu(v, **s)
        kinks = [(-setting["alpha"], setting["g_minus"]), (setting["beta"], setting["g_plus"])]
    h = 1e-6
    for kink, slope in kinks:
        k = torch.tensor(kink, dtype=torch.float64)
        left = (fn(k) - fn(k - h)) / h
        right = (fn(k + h) - fn(k)) / h
        assert left.item() == pytest.approx(slope, abs=1e-5)
        assert right.item() == pytest.approx(slope, abs=1e-5)
        # autograd just left of, at, and just right of the kink agrees with the slope
        pts = torch.tensor([kink - h, kink, kink + h], dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(pts).sum(), pts)
        torch.testing.assert_close(grad, torch.full_like(grad, slope), rtol=0, atol=1e-5)


# -- built-ins -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, reference",
    [
        ("identity", {}, lambda x: x),
        ("relu", {}, F.relu),
        ("leaky_relu", {"negative_slope": 0.2}, lambda x: F.leaky_relu(x, 0.2)),
        ("gelu", {}, F.gelu),
        ("gelu_tanh", {}, lambda x: F.gelu(x, approximate="tanh")),
        ("silu", {}, F.silu),
        ("swish", {}, F.silu),
    ],
)
def test_builtins_match_torch_functional(name, kwargs, reference):
    x = torch.randn(4, 33, dtype=torch.float64) * 4
    torch.testing.assert_close(get_activation(name, **kwargs)(x), reference(x), rtol=0, atol=0)


# -- low precision ---------------------------------------------------------------------------------------

LOW_PRECISION_X = torch.tensor([
    -60000.0, -30000.0, -1000.0, -100.0, -10.0, -3.0, -1.0, -0.5, -1e-3, -1e-4, 0.0, 1e-4, 1e-3, 0.5, 1.0,
    3.0, 10.0, 100.0, 1000.0, 30000.0, 60000.0,
])

# The finiteness promise (README, "Activations") holds only for slopes of at most 1 in magnitude: a steeper
# one makes the true value at ±60000 exceed fp16's 65504 (see test_steep_gsmelu_overflows_fp16_only).
LOW_PRECISION_CASES = [(name, {}) for name in ACTIVATIONS] + [
    ("sau", {"sigma": 1e-3}),
    ("sau", {"sigma": 3.0, "alpha": 0.5}),
    ("smelu", {"beta": 100.0}),  # (x+β)²/(4β) reaches 40000 inside: would overflow fp16 if squared there
    ("gsmelu", {"alpha": 1.0, "beta": 3.0, "g_minus": 0.1, "g_plus": 1.0, "t": 0.5}),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, kwargs", LOW_PRECISION_CASES)
def test_low_precision_is_finite_and_matches_fp32(name, kwargs, dtype):
    slope_keys = {"sau": ("alpha",), "gsmelu": ("g_minus", "g_plus")}.get(name, ())  # gSmeLU's alpha is a breakpoint
    assert all(abs(kwargs.get(key, 0.0)) <= 1 for key in slope_keys), "the finiteness promise is for slopes <= 1"
    act = get_activation(name, **kwargs)
    x = torch.cat([LOW_PRECISION_X, torch.randn(200, generator=torch.Generator().manual_seed(0)) * 5])
    x_low = x.to(dtype).requires_grad_()
    out = act(x_low)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.float().sum(), x_low)
    assert torch.isfinite(grad).all()
    reference = act(x_low.detach().float())  # the same (rounded) inputs, in fp32
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), reference, rtol=eps, atol=1e-5)


def test_steep_gsmelu_overflows_fp16_only():
    # g_plus = 2: the true value at 60000 is ~120000, beyond fp16's 65504 but well inside bf16's range.
    act = get_activation("gsmelu", g_plus=2.0)
    x = torch.tensor([-60000.0, 0.0, 30000.0, 60000.0])
    assert torch.isinf(act(x.half())[-1])
    assert torch.isfinite(act(x.half())[:-1]).all()
    torch.testing.assert_close(act(x.bfloat16()).float(), act(x.bfloat16().float()), rtol=2 ** -8, atol=0)


def test_sau_tiny_sigma_in_bf16_with_a_bf16_module():
    act = SAU(alpha=0.15, sigma=1e-3, trainable_sigma=True).to(torch.bfloat16)
    x = torch.cat([LOW_PRECISION_X, torch.tensor([1e30, -1e30, 3e38, -3e38])]).to(torch.bfloat16)
    x.requires_grad_()
    out = act(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(act.alpha.grad) and torch.isfinite(act.log_sigma.grad)


# -- registry --------------------------------------------------------------------------------------------


def test_every_registered_name_builds_a_fresh_module():
    assert set(ACTIVATIONS) == {"identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "swish", "sau",
                                "smelu", "gsmelu"}
    x = torch.randn(2, 3, 5)
    for name in ACTIVATIONS:
        first, second = get_activation(name), get_activation(name)
        assert isinstance(first, Activation) and isinstance(first, ACTIVATIONS[name])
        assert first is not second
        assert first(x).shape == x.shape
        validate_activation(name, {})
        validate_activation(name, None)
    assert get_activation("sau").alpha is not get_activation("sau").alpha
    assert get_activation("smelu", beta=1.5).beta == 1.5


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="not_an_activation") as error:
        get_activation("not_an_activation")
    assert "smelu" in str(error.value) and "gelu_tanh" in str(error.value)
    with pytest.raises(ValueError, match="GELU"):
        validate_activation("GELU", {})


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("sau", {"sigma": 0}, "sigma=0"),
        ("sau", {"sigma": -1.0}, "sigma=-1.0"),
        ("sau", {"alpha": float("nan")}, "alpha=nan"),
        ("sau", {"trainable_alpha": "yes"}, "trainable_alpha='yes'"),
        ("sau", {"gamma": 1.0}, "gamma=1.0"),
        ("smelu", {"beta": -1}, "beta=-1"),
        ("smelu", {"beta": 0.0}, "beta=0.0"),
        ("smelu", {"beta": "2"}, "beta='2'"),
        ("gsmelu", {"alpha": 1.0, "beta": -1.0}, "alpha=1.0, beta=-1.0"),
        ("gsmelu", {"alpha": -3.0, "beta": 1.0}, "alpha=-3.0, beta=1.0"),
        ("gsmelu", {"g_plus": math.inf}, "g_plus=inf"),
        ("gsmelu", {"trainable": "yes"}, "trainable='yes'"),
        ("leaky_relu", {"negative_slope": True}, "negative_slope=True"),
        ("relu", {"beta": 1}, "beta=1"),
    ],
)
def test_bad_parameters_name_the_field_and_value(name, kwargs, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        get_activation(name, **kwargs)
    with pytest.raises(ValueError, match=re.escape(expected)):
        validate_activation(name, kwargs)


def test_validate_refuses_non_dict_parameters_and_functional_refuses_bad_sigma():
    with pytest.raises(ValueError, match="dict"):
        validate_activation("sau", [0.2])
    with pytest.raises(ValueError, match=re.escape("sigma=0.0")):
        sau(torch.zeros(3), 0.15, 0.0)
    with pytest.raises(ValueError, match=re.escape("beta=-2.0")):
        smelu(torch.zeros(3), -2.0)


# -- cost accounting -------------------------------------------------------------------------------------

EXPECTED_EVALS = {"identity": 0, "relu": 1, "leaky_relu": 1, "gelu": 1, "gelu_tanh": 1, "silu": 1, "swish": 1,
                  "sau": 2, "smelu": 1, "gsmelu": 1}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_nonlinear_evals(name):
    cls = ACTIVATIONS[name]
    assert isinstance(cls.nonlinear_evals_per_element, int)
    assert cls.nonlinear_evals_per_element == EXPECTED_EVALS[name]
    module = get_activation(name)
    for source in (name, cls, module):
        assert nonlinear_evals_per_token(source, 1408) == EXPECTED_EVALS[name] * 1408
        assert nonlinear_evals_per_token(source, 0) == 0


def test_nonlinear_evals_per_token_refuses_bad_inputs():
    with pytest.raises(ValueError, match="width=-1"):
        nonlinear_evals_per_token("relu", -1)
    with pytest.raises(ValueError, match=re.escape("width=2.5")):
        nonlinear_evals_per_token("relu", 2.5)
    with pytest.raises(ValueError, match="softmax"):
        nonlinear_evals_per_token("softmax", 8)
    with pytest.raises(ValueError, match="nonlinear_evals_per_element"):
        nonlinear_evals_per_token(torch.nn.Tanh(), 8)


# -- review regressions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sigma", [1e-30, 1e-39, 1e-50, 1e-320])
def test_sau_with_vanishing_sigma_is_leaky_relu_with_finite_gradients(sigma, dtype):
    # 1e-39 is subnormal in float32, 1e-50 underflows it to 0 (0/0 in x/σ), 1e-320 is subnormal in float64:
    # in each the backward's z/σ would overflow and meet a zero gradient (inf·0 = nan).
    x = torch.tensor([-60000.0, -3.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 3.0, 60000.0], dtype=dtype)
    expected = F.leaky_relu(x.double(), 0.15)
    xf = x.clone().requires_grad_()
    out = sau(xf, 0.15, sigma)
    out.double().sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=torch.finfo(dtype).eps, atol=1e-18)
    assert torch.isfinite(xf.grad).all()
    module = SAU(alpha=0.15, sigma=sigma, trainable_sigma=True)
    xm = x.clone().requires_grad_()
    out = module(xm)
    out.double().sum().backward()
    expected = F.leaky_relu(x.double(), module.alpha.item())  # α as the module stores it, in float32
    torch.testing.assert_close(out.double(), expected, rtol=torch.finfo(dtype).eps, atol=1e-18)
    assert torch.isfinite(xm.grad).all()
    assert torch.isfinite(module.alpha.grad) and torch.isfinite(module.log_sigma.grad)


def test_sau_trained_log_sigma_far_below_float32_range_stays_finite():
    module = SAU(sigma=0.7, trainable_sigma=True)
    with torch.no_grad():
        module.log_sigma.fill_(-200.0)  # σ = e^−200 underflows float32
    x = torch.linspace(-5, 5, 11, requires_grad=True)
    out = module(x)
    out.sum().backward()
    torch.testing.assert_close(out, F.leaky_relu(x.detach(), 0.15), rtol=0, atol=1e-7)
    assert torch.isfinite(x.grad).all() and torch.isfinite(module.log_sigma.grad)


@pytest.mark.parametrize("name", ["identity", "relu", "gelu", "gelu_tanh", "silu", "swish"])
def test_parameterless_activations_refuse_any_parameter_by_name(name):
    # Their classes take no parameters: nn.Module's (*args, **kwargs) must not count as "args"/"kwargs" ones.
    for key in ("kwargs", "args", "negative_slope"):
        with pytest.raises(ValueError, match=re.escape(f"{key}=1")) as error:
            validate_activation(name, {key: 1})
        assert "its parameters: []" in str(error.value)


def test_non_string_parameter_names_are_refused_by_name():
    with pytest.raises(ValueError, match=re.escape("parameter 1 ")):
        validate_activation("sau", {1: 0.2})


# -- trainable generalized SmeLU -------------------------------------------------------------------------

GSMELU_PARAMETERS = ("alpha", "beta", "g_minus", "g_plus", "t")


def _gsmelu_inputs(setting: dict, dtype: torch.dtype) -> torch.Tensor:
    breakpoints = [-setting["alpha"], setting["beta"]]
    noise = torch.randn(300, generator=torch.Generator().manual_seed(1)) * 6
    return torch.cat([torch.tensor([-1000.0, -20.0, *breakpoints, 0.0, 20.0, 1000.0]), noise]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("setting", GSMELU_SETTINGS)
def test_trainable_gsmelu_equals_the_fixed_one_at_init(setting, dtype):
    fixed, trainable = GeneralizedSmeLU(**setting), GeneralizedSmeLU(**setting, trainable=True)
    x = _gsmelu_inputs(setting, dtype)
    outs, grads = [], []
    for module in (fixed, trainable):
        xi = x.clone().requires_grad_()
        out = module(xi)
        (grad,) = torch.autograd.grad(out.double().sum(), xi)
        assert out.dtype == dtype and grad.dtype == dtype
        outs.append(out)
        grads.append(grad)
    if setting == GSMELU_SETTINGS[0] or dtype in (torch.float16, torch.bfloat16):
        # Exactly representable parameters (and, in half precision, the rounding of the output) leave no room
        # for float32 storage to show: the same expressions give the same bits.
        rtol = atol = 0.0
    else:
        # The trainable form holds the parameters in float32 (1.2 becomes 1.2000000477): equal up to that.
        rtol, atol = 1e-6, 1e-6
    torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(grads[1], grads[0], rtol=rtol, atol=atol)


def _as_float64_call(module: GeneralizedSmeLU):
    """The module as a function of (x, alpha, beta, g_minus, g_plus, t) with float64 parameters."""
    return lambda x, *params: functional_call(module, dict(zip(GSMELU_PARAMETERS, params)), (x,))


def _float64_parameters(values: dict) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(values[key], dtype=torch.float64, requires_grad=True) for key in GSMELU_PARAMETERS)


@pytest.mark.parametrize("setting", GSMELU_SETTINGS)
def test_trainable_gsmelu_parameter_gradients_match_finite_differences(setting):
    call = _as_float64_call(GeneralizedSmeLU(**setting, trainable=True))
    kinks = torch.tensor([-setting["alpha"], setting["beta"]], dtype=torch.float64)
    x = torch.linspace(-6, 6, 41, dtype=torch.float64)
    x = x[(x[:, None] - kinks).abs().min(dim=1).values > 1e-3].requires_grad_()
    assert gradcheck(call, (x, *_float64_parameters(setting)), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("setting", GSMELU_SETTINGS)
def test_trainable_gsmelu_parameter_gradients_at_the_breakpoints(setting):
    # f is C¹ in the parameters too, but autograd must pick the right side of the clamp at x = β exactly:
    # crediting u = clamp(x, −α, β) to β there would be off by g₊ − g₋ in ∂f/∂β.
    call = _as_float64_call(GeneralizedSmeLU(**setting, trainable=True))
    params = _float64_parameters(setting)
    for point in (-setting["alpha"], setting["beta"]):
        x = torch.tensor([point], dtype=torch.float64)
        grads = torch.autograd.grad(call(x, *params).sum(), params)
        h = 1e-6
        for i, key in enumerate(GSMELU_PARAMETERS):
            up = [p.detach() + (h if j == i else 0.0) for j, p in enumerate(params)]
            down = [p.detach() - (h if j == i else 0.0) for j, p in enumerate(params)]
            numeric = (call(x, *up) - call(x, *down)).item() / (2 * h)
            assert grads[i].item() == pytest.approx(numeric, abs=1e-5), (point, key)


def test_trainable_gsmelu_below_the_width_floor_is_the_floored_function_and_its_true_gradient():
    module = GeneralizedSmeLU(alpha=1.0, beta=3.0, g_minus=0.1, g_plus=1.2, t=0.5, trainable=True)
    assert module.min_width == pytest.approx(4e-3)
    alpha, beta = 0.6, -1.4  # width −0.8: floored to 4e-3 around the midpoint (β − α)/2 = −1.0
    values = {"alpha": alpha, "beta": beta, "g_minus": 0.1, "g_plus": 1.2, "t": 0.5}
    shift = (4e-3 - (alpha + beta)) / 2
    x = torch.linspace(-4, 4, 801, dtype=torch.float64)
    expected = generalized_smelu(x, alpha + shift, beta + shift, 0.1, 1.2, 0.5)
    call = _as_float64_call(module)
    params = _float64_parameters(values)
    torch.testing.assert_close(call(x, *params), expected, rtol=1e-12, atol=1e-12)
    # the gradient of what is computed: gradcheck passes, the width gets none, the midpoint still trains
    y = x[::37].clone().requires_grad_()
    assert gradcheck(call, (y, *params), eps=1e-6, atol=1e-7)
    d_alpha, d_beta = torch.autograd.grad(call(y, *params).sum(), params[:2])
    assert d_alpha.item() + d_beta.item() == pytest.approx(0.0, abs=1e-12)
    assert abs(d_alpha.item()) > 1e-3


def test_trainable_gsmelu_trains_and_stays_finite_when_pushed_past_zero_width():
    module = GeneralizedSmeLU(alpha=1.0, beta=3.0, g_minus=0.1, g_plus=1.2, t=0.5, trainable=True)
    assert [name for name, _ in module.named_parameters()] == list(GSMELU_PARAMETERS)
    assert all(p.dtype == torch.float32 and p.shape == (1,) for p in module.parameters())
    before = {key: p.item() for key, p in module.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.randn(256, generator=torch.Generator().manual_seed(2)) * 3
    target = torch.tanh(x)  # far from any gSmeLU: every parameter gets a gradient
    F.mse_loss(module(x), target).backward()
    assert all(p.grad is not None and p.grad.item() != 0 for p in module.parameters())
    optimizer.step()
    for key, p in module.named_parameters():
        assert p.item() != before[key], key
    # pushed to zero and negative width: finite values and gradients, in every input precision
    wide = torch.cat([LOW_PRECISION_X, torch.linspace(-3, 3, 61)])
    for alpha, beta in [(0.0, 0.0), (1.0, -1.0), (-2.0, 0.5), (3e4, -3e4 - 5.0)]:
        with torch.no_grad():
            module.alpha.fill_(alpha)
            module.beta.fill_(beta)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            xi = wide.to(dtype).detach().requires_grad_()
            module.zero_grad()
            out = module(xi)
            out.double().sum().backward()
            assert torch.isfinite(out).all(), (alpha, beta, dtype)
            assert torch.isfinite(xi.grad).all(), (alpha, beta, dtype)
            assert all(torch.isfinite(p.grad) for p in module.parameters()), (alpha, beta, dtype)
        # the floor acts in forward only: the stored parameters are what the optimizer left
        assert (module.alpha.item(), module.beta.item()) == (alpha, beta)
    # and training continues from there without leaving finite numbers
    for _ in range(20):
        optimizer.zero_grad()
        F.mse_loss(module(x), target).backward()
        optimizer.step()
    assert all(torch.isfinite(p) for p in module.parameters())
    assert torch.isfinite(module(wide)).all()


def test_trainable_gsmelu_at_the_floor_is_c1():
    module = GeneralizedSmeLU(trainable=True)  # floor 4e-3
    with torch.no_grad():
        module.alpha.fill_(-1.0)
        module.beta.fill_(0.5)  # midpoint (β − α)/2 = 0.75, so the quadratic region is [0.748, 0.752]
    h = 1e-7
    for kink, slope in [(0.748, 0.0), (0.752, 1.0)]:
        k = torch.tensor(kink, dtype=torch.float64)
        assert ((module(k) - module(k - h)) / h).item() == pytest.approx(slope, abs=1e-4)
        assert ((module(k + h) - module(k)) / h).item() == pytest.approx(slope, abs=1e-4)


def test_trainable_gsmelu_in_a_bf16_module_and_reset_after_meta_init():
    setting = dict(alpha=1.0, beta=3.0, g_minus=0.125, g_plus=1.0, t=0.5)  # all exact in bf16
    module = GeneralizedSmeLU(**setting, trainable=True).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    x = torch.cat([LOW_PRECISION_X, torch.linspace(-4, 4, 41)]).to(torch.bfloat16).requires_grad_()
    out = module(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad) for p in module.parameters())
    # the cast rounded no parameter, so the values are the float32 module's
    torch.testing.assert_close(out, GeneralizedSmeLU(**setting, trainable=True)(x.detach()), rtol=0, atol=0)
    with torch.device("meta"):
        meta = GeneralizedSmeLU(**setting, trainable=True)
    meta = meta.to_empty(device="cpu")
    with torch.no_grad():
        for p in meta.parameters():
            p.fill_(float("nan"))
    meta.reset_parameters()
    assert {key: p.item() for key, p in meta.named_parameters()} == setting
    GeneralizedSmeLU(**setting).reset_parameters()  # fixed: nothing to reset, and no error


def test_fixed_gsmelu_has_no_parameters_or_state():
    module = GeneralizedSmeLU(alpha=1.0, beta=3.0)
    assert module.trainable is False
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    assert module.state_dict() == {}
    assert isinstance(module.alpha, float) and module.alpha == 1.0
    assert get_activation("gsmelu").trainable is False


def test_trainable_gsmelu_keeps_its_cost():
    module = get_activation("gsmelu", trainable=True)
    assert module.nonlinear_evals_per_element == 1
    assert nonlinear_evals_per_token(module, 1408) == nonlinear_evals_per_token("gsmelu", 1408) == 1408


@pytest.mark.parametrize("value", ["yes", 1, 0, None, 1.0])
def test_gsmelu_trainable_flag_must_be_a_bool(value):
    expected = f"trainable={value!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        get_activation("gsmelu", trainable=value)
    with pytest.raises(ValueError, match=re.escape(expected)):
        validate_activation("gsmelu", {"trainable": value})
    with pytest.raises(ValueError, match=re.escape(expected)):
        RetNetConfig(hidden_act="gsmelu", hidden_act_kwargs={"trainable": value})


GSMELU_MODEL_KWARGS = {"alpha": 1.0, "beta": 3.0, "g_minus": 0.1, "g_plus": 1.0, "t": 0.5}


def test_model_with_trainable_gsmelu_round_trips_through_save_and_load(tmp_path, model_factory):
    model = model_factory(hidden_act="gsmelu", hidden_act_kwargs={**GSMELU_MODEL_KWARGS, "trainable": True})
    names = {name for name, _ in model.named_parameters()}
    layers = range(model.config.num_hidden_layers)
    expected = {f"model.layers.{i}.mlp.act_fn.{key}" for i in layers for key in GSMELU_PARAMETERS}
    assert expected <= names
    ids = torch.randint(2, 101, (2, 11), generator=torch.Generator().manual_seed(3))
    model.train()
    model(ids, labels=ids).loss.backward()
    act = model.model.layers[1].mlp.act_fn
    assert all(getattr(act, key).grad is not None for key in GSMELU_PARAMETERS)
    with torch.no_grad():  # trained values, distinct per layer, so the round trip has something to keep
        for key, value in zip(GSMELU_PARAMETERS, (0.7, 2.2, 0.05, 1.1, 0.3)):
            getattr(act, key).fill_(value)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.hidden_act_kwargs["trainable"] is True
    loaded_params = dict(loaded.named_parameters())
    assert expected <= set(loaded_params)
    for name, p in model.named_parameters():
        assert torch.equal(loaded_params[name], p), name
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_trainable_gsmelu_missing_from_a_checkpoint_starts_at_its_init_values(tmp_path, model_factory):
    # A checkpoint of the fixed form loaded as trainable: from_pretrained builds on the meta device, so
    # _init_weights must set the new parameters (else they hold uninitialised memory).
    model = model_factory(hidden_act="gsmelu", hidden_act_kwargs=GSMELU_MODEL_KWARGS)
    assert not any(".act_fn." in name for name in model.state_dict())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, hidden_act_kwargs={**GSMELU_MODEL_KWARGS, "trainable": True}).eval()
    act_params = {name.rsplit(".", 1)[-1]: p.item() for name, p in loaded.named_parameters() if ".act_fn." in name}
    assert act_params and act_params == pytest.approx(GSMELU_MODEL_KWARGS)
    ids = torch.randint(2, 101, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


def test_sau_loads_a_state_dict_of_its_former_0_dim_parameters():
    """Checkpoints written before α and log σ became [1] (for FSDP2) hold them 0-dim: they still load."""
    module = SAU(trainable_sigma=True)
    module.load_state_dict({"alpha": torch.tensor(0.3), "log_sigma": torch.tensor(-0.5)})
    assert module.alpha.shape == (1,) and module.alpha.item() == pytest.approx(0.3)
    assert module.log_sigma.item() == pytest.approx(-0.5)
    x = torch.linspace(-3, 3, 7)
    assert sau(x, 0.3, math.exp(-0.5)).shape == module(x).shape == x.shape
    assert module(torch.tensor(0.5)).shape == ()  # a 0-dim input stays 0-dim


@pytest.mark.parametrize(("act", "kwargs", "names"), [
    ("gsmelu", {**GSMELU_MODEL_KWARGS, "trainable": True}, GSMELU_PARAMETERS),
    ("sau", {"trainable_sigma": True}, ("alpha", "log_sigma")),
], ids=["gsmelu", "sau"])
def test_a_model_with_trainable_activation_parameters_can_be_sharded_by_fsdp2(model_factory, act, kwargs, names):
    """train.parallelism = "fsdp" shards every layer with fully_shard, which refuses 0-dim parameters."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    model = model_factory(hidden_act=act, hidden_act_kwargs=kwargs)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        ids = torch.randint(2, 101, (2, 11), generator=torch.Generator().manual_seed(3))
        model(ids, labels=ids).loss.backward()
        module = model.model.layers[0].mlp.act_fn
        assert all(getattr(module, key).grad is not None for key in names)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [1e-40, 1e-50, 1e-320])
def test_smelu_and_gsmelu_with_a_vanishing_width_are_finite(width, dtype):
    # Accepted (> 0), but 1e-40 is subnormal in float32 (1/(4β) overflows), 1e-50 rounds to 0 there (0/0 left
    # of −β), 1e-320 is subnormal in float64: each gave nan values or inf/nan gradients. The limit is ReLU.
    x = torch.tensor([-60000.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 60000.0], dtype=dtype)
    fixed = [lambda v: smelu(v, width), SmeLU(width), GeneralizedSmeLU(alpha=width, beta=0.0),
             GeneralizedSmeLU(alpha=width / 2, beta=width / 2, g_minus=-4.0, g_plus=12.0)]
    trainable = GeneralizedSmeLU(alpha=width / 2, beta=width / 2, trainable=True)
    for index, fn in enumerate([*fixed, trainable]):
        # (slopes as steep as 12 take ±60000 past fp16's range: see test_steep_gsmelu_overflows_fp16_only)
        xi = (x[1:-1] if index == 3 else x).clone().requires_grad_()
        out = fn(xi)
        (grad,) = torch.autograd.grad(out.double().sum(), xi)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), (index, out, grad)
        if index != 3:  # (slopes 0 and 1 below and above: ReLU)
            torch.testing.assert_close(out.double(), F.relu(x.double()), rtol=torch.finfo(dtype).eps, atol=1e-18)
    assert all(torch.isfinite(p.grad if p.grad is not None else torch.zeros(())) for p in trainable.parameters())
