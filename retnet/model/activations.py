"""Activation functions for the RetNet FFN, and a registry that builds them by name.

The FFN (``RetNetMLP``) calls ``get_activation(config.hidden_act, **config.hidden_act_kwargs)`` once per
layer; ``RetNetConfig`` calls :func:`validate_activation` at load time so that a bad name or parameter is
refused with a message that names it and its value.

Registered names
----------------
``identity``
    f(x) = x. Makes the FFN an affine map.
``relu``
    f(x) = max(x, 0) (Nair & Hinton, 2010).
``leaky_relu`` (``negative_slope=0.01``)
    f(x) = max(x, s·x) (Maas et al., 2013).
``gelu``
    f(x) = x·Φ(x) with Φ the standard normal CDF, computed with erf (Hendrycks & Gimpel, 2016,
    "Gaussian Error Linear Units", arXiv:1606.08415).
``gelu_tanh``
    GELU's tanh approximation 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) (same paper).
``silu`` (alias ``swish``)
    f(x) = x·sigmoid(x) (Elfwing et al., 2018; Ramachandran et al., 2017, "Searching for Activation
    Functions", arXiv:1710.05941).
``sau`` (``alpha=0.15, sigma=1.0, trainable_alpha=True, trainable_sigma=False``)
    Smooth Activation Unit (Biswas et al., 2021, "SAU: Smooth activation function using convolution with
    approximate identities", arXiv:2109.13210): the Leaky ReLU ``f_α(x) = αx + (1−α)·relu(x)`` (equal
    to max(x, αx) for α ≤ 1) convolved with the Gaussian N(0, σ²). In closed form, because
    relu ∗ N(0, σ²) (x) = ∫ relu(x−y) N(y; 0, σ²) dy = x·Φ(x/σ) + σ·φ(x/σ)::

        SAU(x) = αx + (1−α)·[x·Φ(x/σ) + σ·φ(x/σ)]

    with Φ / φ the standard normal CDF / pdf. Derivatives: ∂/∂x = α + (1−α)·Φ(x/σ),
    ∂/∂α = x − [x·Φ(x/σ) + σ·φ(x/σ)], ∂/∂σ = (1−α)·φ(x/σ). α is trainable by default (paper init 0.15);
    σ is fixed by default and, when trainable, is stored as log σ so that it stays positive.
``smelu`` (``beta=2.0``)
    Smooth ReLU (Shamir, Lin & Coviello, 2020, "Smooth Activations and Reproducibility in Deep
    Networks", arXiv:2010.09931): 0 for x ≤ −β, (x+β)²/(4β) for |x| < β, x for x ≥ β.
``gsmelu`` (``alpha=2.0, beta=2.0, g_minus=0.0, g_plus=1.0, t=0.0``)
    Generalized SmeLU (same paper): slope g₋ left of −α, slope g₊ right of β, and between them the
    quadratic whose value and slope are continuous at both ends::

        f(x) = g₋·x + t                               x ≤ −α
        f(x) = a·x² + b·x + c                          −α < x < β
        f(x) = f(β) + g₊·(x − β)                       x ≥ β
        a = (g₊ − g₋) / (2(α+β)),   b = (α·g₊ + β·g₋) / (α+β),   c = t + a·α²
        f(β) = g₋·β + t + (g₊ − g₋)(α+β)/2

    so ``t`` is the intercept of the left piece (f(−α) = −g₋·α + t) and shifts the whole curve
    vertically. A right piece through the origin (f(x) = g₊·x for x ≥ β) is t = (g₊ − g₋)(β − α)/2;
    alpha = beta, g₋ = 0, g₊ = 1, t = 0 is SmeLU(beta). α may be negative as long as α + β > 0.

    ``trainable=True`` (default False) makes the five of them ``nn.Parameter`` objects (float32, or the dtype a
    model is built in), learned as the paper's generalized form allows and initialised to the given values; the
    default keeps them Python floats (no parameters, no state-dict entries). Training could drive the width
    w = α + β to 0 or below, where ``a`` divides by zero and the quadratic piece turns inside out. So the forward
    pass uses the width max(w, w_min) with w_min = 1e-3·w₀ (w₀ the initial α + β, so the floor never binds at
    init and scales with the chosen breakpoints), widening α and β by the same (w_min − w)/2 so that the
    midpoint (β − α)/2 stays where training put it. Above the floor this changes no value or gradient; below it
    the function is the gSmeLU of width w_min — C¹ and finite — and the width's own gradient is 0 (the gradient
    of what is computed), while the midpoint, slopes and t keep training. The stored α and β are not
    modified: the floor acts in ``forward`` only. g₋, g₊ and t are unconstrained.

Numerics: SAU, SmeLU and gSmeLU upcast fp16/bf16 (and fp32) inputs to float32 — float64 stays float64 —
compute there, and cast the result back, with their parameters (SAU's, a trainable gSmeLU's) upcast too (a
model cast to bf16 keeps working). SAU never forms 1/σ² at all: it computes z = x/σ once in float32 after clamping x to
±40σ, where Φ and φ are exactly 1/0 in float32 and float64, so the clamp changes no value but keeps huge
inputs from producing inf·0 = nan in the backward pass. σ is floored at √(smallest normal) of the compute
dtype (1.1e-19 in float32), so a vanishing σ gives the Leaky ReLU rather than nan. Likewise SmeLU's β is
floored at the compute dtype's smallest normal (1.2e-38 in float32), and gSmeLU's width α + β there too (the
fixed form's at |g₊ − g₋| / the dtype's largest value if that is higher, so that ``a`` stays finite), widened
about its midpoint: a β or width accepted as > 0 but subnormal, or zero once rounded, then gives finite values
and gradients (those of the kinked limit) instead of nan. The built-in
ReLU/GELU/SiLU use torch's kernels, which already compute half-precision inputs in float32.

Cost: ``nonlinear_evals_per_element``
-------------------------------------
Each activation class has an integer ``nonlinear_evals_per_element``: the number of non-polynomial
evaluations one element costs, counted as

* one per transcendental function: exp, erf/erfc, tanh, sigmoid (a sigmoid is one exp);
* one per region selection: a compare-and-select such as max(x, 0) — a piecewise function counts one,
  however many pieces it has;
* adds, multiplies, squares and multiplications by constants are free, and clamps that only guard the
  numerics (SAU's ±40σ overflow guard) are not counted, nor is work done once per call on the scalar
  parameters rather than per element (a trainable gSmeLU's width floor).

So identity 0; relu, leaky_relu, smelu, gsmelu 1 (one selection, trainable or not); gelu 1 (erf); gelu_tanh 1 (tanh);
silu 1 (sigmoid); sau 2 (erf + exp). :func:`nonlinear_evals_per_token` multiplies it by the FFN width.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "GELU",
    "SAU",
    "Activation",
    "GELUTanh",
    "GeneralizedSmeLU",
    "Identity",
    "LeakyReLU",
    "ReLU",
    "SiLU",
    "SmeLU",
    "generalized_smelu",
    "get_activation",
    "nonlinear_evals_per_token",
    "sau",
    "smelu",
    "validate_activation",
]

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# |x/σ| beyond which Φ(x/σ) is exactly 0 or 1 and φ(x/σ) exactly 0, in float32 and float64 alike
# (φ(40) = e^−800/√(2π) underflows float64), so clamping x/σ there changes no value.
_SAU_Z_LIMIT = 40.0
# A trainable gSmeLU's width α + β is floored at this fraction of its initial value (module docstring).
_GSMELU_MIN_WIDTH_FRACTION = 1e-3
_GSMELU_PARAMETERS = ("alpha", "beta", "g_minus", "g_plus", "t")
_FLOAT32_MAX = torch.finfo(torch.float32).max


# -- parameter checks ------------------------------------------------------------------------------------


def _real(activation: str, param: str, value: Any) -> float:
    if not isinstance(value, bool) and isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range (10**400 from a config.json or TOML file)
            number = math.inf
        # Within float32's range too: the activations compute in float32 (for every dtype but float64), where a
        # larger value (beta=1e39) raised a RuntimeError at the first forward ("cannot be converted to type float
        # without overflow") or made every output nan, after the config had accepted it.
        if math.isfinite(number) and abs(number) <= _FLOAT32_MAX:
            return number
    raise ValueError(f"activation {activation!r}: {param} must be a finite real number within float32's range "
                     f"(|{param}| <= {_FLOAT32_MAX:.4g}, where the activation computes); got {param}={value!r}")


def _positive(activation: str, param: str, value: Any) -> float:
    value = _real(activation, param, value)
    if not value > 0:
        raise ValueError(f"activation {activation!r}: {param} must be > 0; got {param}={value!r}")
    return value


def _flag(activation: str, param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"activation {activation!r}: {param} must be true or false; got {param}={value!r}")
    return value


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for fp16/bf16/fp32 inputs, float64 for float64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


# -- functional forms ------------------------------------------------------------------------------------


def _sau_impl(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SAU in the dtype of its (already upcast) arguments."""
    # A σ that is subnormal or underflows to 0 (a float like 1e-50, a trained log σ far below −87) makes
    # x/σ 0/0 and the backward's z/σ (up to 40/σ) overflow against a zero gradient (inf·0 = nan). At σ ≥ √tiny
    # it stays far from overflow; SAU moves by at most 0.4·Δσ, so a value changes by < 5e-20 in float32.
    sigma = sigma.clamp_min(torch.finfo(sigma.dtype).tiny ** 0.5)
    bound = _SAU_Z_LIMIT * sigma
    z = torch.clamp(x, min=-bound, max=bound) / sigma
    cdf = 0.5 * torch.special.erfc(-_SQRT_HALF * z)  # Φ(z); erfc keeps the left tail's relative accuracy
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)  # φ(z)
    smooth_relu = x * cdf + sigma * pdf  # (relu ∗ N(0, σ²))(x)
    # αx + (1−α)·g written as g + α(x − g): exactly x where g = x, exactly αx where g = 0.
    return smooth_relu + alpha * (x - smooth_relu)


def sau(x: torch.Tensor, alpha: float | torch.Tensor = 0.15, sigma: float | torch.Tensor = 1.0) -> torch.Tensor:
    """SAU(x) = αx + (1−α)·[x·Φ(x/σ) + σ·φ(x/σ)], computed in float32 (float64 for float64 ``x``).

    ``alpha`` / ``sigma`` are floats or scalar tensors (differentiable); ``sigma`` must be > 0.
    """
    if not isinstance(sigma, torch.Tensor):
        _positive("sau", "sigma", sigma)
    dtype = _compute_dtype(x)
    alpha = alpha.to(dtype) if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, dtype=dtype, device=x.device)
    sigma = sigma.to(dtype) if isinstance(sigma, torch.Tensor) else torch.tensor(sigma, dtype=dtype, device=x.device)
    return _sau_impl(x.to(dtype), alpha, sigma).to(x.dtype)


def generalized_smelu(x: torch.Tensor, alpha: float = 2.0, beta: float = 2.0, g_minus: float = 0.0,
                      g_plus: float = 1.0, t: float = 0.0) -> torch.Tensor:
    """Generalized SmeLU (see the module docstring); computed in float32 (float64 for float64 ``x``)."""
    if not alpha + beta > 0:
        raise ValueError(f"activation 'gsmelu': alpha + beta must be > 0; got alpha={alpha!r}, beta={beta!r}")
    dtype = _compute_dtype(x)
    xf = x.to(dtype)
    # An accepted but tiny width (α + β = 1e-40, say) makes ``a`` overflow the compute dtype, and a·0 at the
    # left piece is nan there. Floored where ``a`` stays finite, widening α and β equally as the trainable form's
    # floor does: the value moves by at most |g₊ − g₋|·(floor − width)/2, below the dtype's smallest normal.
    floor = max(torch.finfo(dtype).tiny, abs(g_plus - g_minus) / torch.finfo(dtype).max)
    if alpha + beta < floor:
        shift = 0.5 * (floor - (alpha + beta))
        alpha, beta = alpha + shift, beta + shift
    width = alpha + beta
    value_at_beta = g_minus * beta + t + 0.5 * (g_plus - g_minus) * width
    # Left of −α the clamp pins u at −α and the quadratic term vanishes, leaving g₋·x + t; in between it is
    # g₋·x + t + a(x+α)² with a = (g₊−g₋)/(2w), i.e. a·x² + b·x + c expanded around −α (no cancellation near −α).
    # Written (g₊−g₋)/2 · w · s² with s = (u+α)/w in [0, 1]: (u+α)² overflows float32 once the width passes
    # ~1.8e19, and 1/(2w) flushes to 0 near 1e38, where f and its gradients are finite.
    u = torch.clamp(xf, min=-alpha, max=beta)
    position = (u + alpha) / width
    middle = g_minus * xf + t + 0.5 * (g_plus - g_minus) * width * position * position
    right = value_at_beta + g_plus * (xf - beta)
    return torch.where(xf > beta, right, middle).to(x.dtype)


def _gsmelu_trainable_impl(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, g_minus: torch.Tensor,
                           g_plus: torch.Tensor, t: torch.Tensor, min_width: float) -> torch.Tensor:
    """Generalized SmeLU with tensor parameters and the width floor, in the dtype of its (upcast) arguments."""
    width = alpha + beta
    floored = width.clamp_min(min_width)
    # Exactly 0 above the floor, so values and gradients there are those of the fixed-parameter form.
    shift = 0.5 * (floored - width)
    alpha, beta = alpha + shift, beta + shift
    # Divide by the floored width itself, not by the shifted α + β: with |α| ≫ w_min the shift can round
    # away in α + β, which would bring back the division by ~0 the floor exists to prevent.
    value_at_beta = g_minus * beta + t + 0.5 * (g_plus - g_minus) * floored
    # Same expressions as generalized_smelu. At x = β exactly, clamp gives u's gradient to x, not to β:
    # that is the one-sided derivative that makes ∂f/∂β continuous there (the right piece's −(g₊−g₋)/2).
    u = torch.clamp(x, min=-alpha, max=beta)
    position = (u + alpha) / floored  # (no a(u+α)²: see generalized_smelu)
    middle = g_minus * x + t + 0.5 * (g_plus - g_minus) * floored * position * position
    right = value_at_beta + g_plus * (x - beta)
    return torch.where(x > beta, right, middle)


def smelu(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """SmeLU: 0 for x ≤ −β, (x+β)²/(4β) for |x| < β, x for x ≥ β; computed in float32 (float64 for float64)."""
    beta = _positive("smelu", "beta", beta)
    dtype = _compute_dtype(x)
    # A β accepted as > 0 but below the compute dtype's smallest normal (1e-40 in float32) makes 1/(4β)
    # overflow, and one that rounds to 0 there (1e-50) makes the left piece 0/0 = nan: floored at it, where
    # SmeLU moves by at most β/4 (< 3e-39 in float32) and stays finite with finite gradients.
    beta = max(beta, torch.finfo(dtype).tiny)
    xf = x.to(dtype)
    # (x+β)²/(4β) as β·s² with s = (x/β + 1)/2 in [0, 1]: (x+β)² overflows float32 from β ≈ 1.8e19, and 4β
    # from β ≈ 8.5e37, where SmeLU (≤ β) and its gradient s are finite. 0 left of −β.
    position = 0.5 * (torch.clamp(xf, min=-beta, max=beta) / beta + 1.0)
    quadratic = beta * position * position
    return torch.where(xf >= beta, xf, quadratic).to(x.dtype)


# -- modules ---------------------------------------------------------------------------------------------


def _former_scalars_as_one_element(state_dict: dict, prefix: str, keys: tuple[str, ...]) -> None:
    """Reshape to ``[1]``, in ``state_dict``, the parameters ``keys`` that checkpoints written before they became
    one-element tensors (for FSDP2) hold 0-dim: SAU's and a trainable gSmeLU's. Training resumes load them through
    this; transformers 5's ``from_pretrained`` does not call ``_load_from_state_dict``: modeling_retnet registers a
    checkpoint conversion that reshapes them there."""
    for key in keys:
        value = state_dict.get(prefix + key)
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            state_dict[prefix + key] = value.reshape(1)


class Activation(nn.Module):
    """Base class of the registered activations: elementwise, shape-preserving."""

    name: ClassVar[str] = ""
    nonlinear_evals_per_element: ClassVar[int] = 0


class Identity(Activation):
    """f(x) = x."""

    name = "identity"
    nonlinear_evals_per_element = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ReLU(Activation):
    """f(x) = max(x, 0)."""

    name = "relu"
    nonlinear_evals_per_element = 1  # one compare-select

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class LeakyReLU(Activation):
    """f(x) = x for x ≥ 0, negative_slope·x below."""

    name = "leaky_relu"
    nonlinear_evals_per_element = 1  # one compare-select

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = _real(self.name, "negative_slope", negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class GELU(Activation):
    """f(x) = x·Φ(x), Φ through erf."""

    name = "gelu"
    nonlinear_evals_per_element = 1  # erf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


class GELUTanh(Activation):
    """GELU's tanh approximation."""

    name = "gelu_tanh"
    nonlinear_evals_per_element = 1  # tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class SiLU(Activation):
    """f(x) = x·sigmoid(x) (Swish with β = 1)."""

    name = "silu"
    nonlinear_evals_per_element = 1  # sigmoid (one exp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class SAU(Activation):
    """Smooth Activation Unit: Leaky ReLU(α) convolved with N(0, σ²), in closed form (module docstring).

    Parameters (state-dict names): ``alpha`` — an ``nn.Parameter`` when ``trainable_alpha`` (the default),
    else a buffer; ``log_sigma`` — log σ, an ``nn.Parameter`` when ``trainable_sigma``, else a buffer. Both
    are tensors of one element (shape ``[1]``: FSDP2's ``fully_shard`` shards no 0-dim parameter) in the default
    dtype (float32, or the dtype a model is built in, as its other weights), and are upcast to float32 in
    ``forward`` if they are in a lower precision. A state dict of the 0-dim form (written before) loads.
    """

    name = "sau"
    nonlinear_evals_per_element = 2  # erf (Φ) + exp (φ)

    def __init__(self, alpha: float = 0.15, sigma: float = 1.0, trainable_alpha: bool = True,
                 trainable_sigma: bool = False):
        super().__init__()
        self.init_alpha = _real(self.name, "alpha", alpha)
        self.init_sigma = _positive(self.name, "sigma", sigma)
        self.trainable_alpha = _flag(self.name, "trainable_alpha", trainable_alpha)
        self.trainable_sigma = _flag(self.name, "trainable_sigma", trainable_sigma)
        # In the default dtype, as nn.Linear's weights: a model built in bf16 (from_pretrained(dtype=...)) is then
        # bf16 throughout, as model.to(torch.bfloat16) makes it, which FSDP2 needs (one dtype per shard group).
        alpha_t = torch.tensor([self.init_alpha], dtype=torch.get_default_dtype())
        log_sigma_t = torch.tensor([math.log(self.init_sigma)], dtype=torch.get_default_dtype())
        if self.trainable_alpha:
            self.alpha = nn.Parameter(alpha_t)
        else:
            self.register_buffer("alpha", alpha_t)
        if self.trainable_sigma:
            self.log_sigma = nn.Parameter(log_sigma_t)
        else:
            self.register_buffer("log_sigma", log_sigma_t)

    @property
    def sigma(self) -> torch.Tensor:
        """σ = exp(log σ), in float32."""
        return self.log_sigma.float().exp()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to the constructor's α and σ (for a model initialised on the meta device)."""
        self.alpha.fill_(self.init_alpha)
        self.log_sigma.fill_(math.log(self.init_sigma))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _former_scalars_as_one_element(state_dict, prefix, ("alpha", "log_sigma"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        alpha = self.alpha.to(dtype).reshape(())  # an input keeps its shape, a 0-dim one too
        sigma = self.log_sigma.to(dtype).exp().reshape(())
        return _sau_impl(x.to(dtype), alpha, sigma).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"alpha={self.init_alpha} (init), sigma={self.init_sigma} (init), "
                f"trainable_alpha={self.trainable_alpha}, trainable_sigma={self.trainable_sigma}")


class SmeLU(Activation):
    """Smooth ReLU: 0 for x ≤ −β, (x+β)²/(4β) for |x| < β, x for x ≥ β."""

    name = "smelu"
    nonlinear_evals_per_element = 1  # one region selection

    def __init__(self, beta: float = 2.0):
        super().__init__()
        self.beta = _positive(self.name, "beta", beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smelu(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class GeneralizedSmeLU(Activation):
    """Generalized SmeLU: slopes g_minus / g_plus outside [−alpha, beta], a C¹ quadratic inside.

    With ``trainable=True`` the five parameters are ``nn.Parameter`` objects in the default dtype (float32, or the
    dtype a model is built in; state-dict names ``alpha``, ``beta``, ``g_minus``, ``g_plus``, ``t``), upcast to
    float32 in ``forward`` if they are in a lower precision, and the width α + β is floored at ``min_width`` in
    ``forward`` (module docstring). Without it they are plain floats, as the fixed form has always been.
    """

    name = "gsmelu"
    nonlinear_evals_per_element = 1  # one region selection; the width floor is per call, not per element

    def __init__(self, alpha: float = 2.0, beta: float = 2.0, g_minus: float = 0.0, g_plus: float = 1.0,
                 t: float = 0.0, trainable: bool = False):
        super().__init__()
        alpha = _real(self.name, "alpha", alpha)
        beta = _real(self.name, "beta", beta)
        if not alpha + beta > 0:
            raise ValueError(f"activation {self.name!r}: alpha + beta must be > 0; got alpha={alpha!r}, "
                             f"beta={beta!r}")
        # (a width past float32's range put every input on the left piece: the quadratic's position rounded to 0)
        if alpha + beta > _FLOAT32_MAX:
            raise ValueError(f"activation {self.name!r}: alpha + beta must be within float32's range (<= "
                             f"{_FLOAT32_MAX:.4g}, where the activation computes); got alpha={alpha!r}, beta={beta!r}")
        self.init_values = {"alpha": alpha, "beta": beta, "g_minus": _real(self.name, "g_minus", g_minus),
                            "g_plus": _real(self.name, "g_plus", g_plus), "t": _real(self.name, "t", t)}
        self.trainable = _flag(self.name, "trainable", trainable)
        self.min_width = _GSMELU_MIN_WIDTH_FRACTION * (alpha + beta)
        for key, value in self.init_values.items():
            # Plain floats when fixed: the forward and the state dict stay exactly what they were before the
            # trainable form existed. Trainable: one element, 1-D, since FSDP2's fully_shard refuses 0-dim parameters,
            # in the default dtype (see SAU).
            setattr(self, key, nn.Parameter(torch.tensor([value], dtype=torch.get_default_dtype()))
                    if self.trainable else value)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to the constructor's values (for a model initialised on the meta device); fixed: nothing."""
        if self.trainable:
            for key, value in self.init_values.items():
                getattr(self, key).fill_(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.trainable:  # (fixed, there is nothing in the state dict)
            _former_scalars_as_one_element(state_dict, prefix, _GSMELU_PARAMETERS)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.trainable:
            return generalized_smelu(x, self.alpha, self.beta, self.g_minus, self.g_plus, self.t)
        dtype = _compute_dtype(x)
        params = [getattr(self, key).to(dtype).reshape(()) for key in _GSMELU_PARAMETERS]  # an input keeps its shape
        # (a w₀ itself near the dtype's smallest normal would put the floor where ``a`` overflows: nan)
        min_width = max(self.min_width, torch.finfo(dtype).tiny)
        return _gsmelu_trainable_impl(x.to(dtype), *params, min_width).to(x.dtype)

    def extra_repr(self) -> str:
        values = ", ".join(f"{key}={value}" for key, value in self.init_values.items())
        if not self.trainable:
            return values
        return f"{values} (init), trainable=True, min_width={self.min_width:g}"


# -- registry --------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, type[Activation]] = {
    "identity": Identity,
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "gelu": GELU,
    "gelu_tanh": GELUTanh,
    "silu": SiLU,
    "swish": SiLU,
    "sau": SAU,
    "smelu": SmeLU,
    "gsmelu": GeneralizedSmeLU,
}


def _lookup(name: Any) -> type[Activation]:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def get_activation(name: str, **kwargs: Any) -> Activation:
    """A fresh activation module: ``get_activation("smelu", beta=2.0)``.

    Raises ValueError for an unknown name (listing the known ones) and for an unknown or invalid parameter
    (naming it and its value).
    """
    cls = _lookup(name)
    # A class without its own __init__ shows nn.Module's (*args, **kwargs), which are not parameters.
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.kind not in variadic]
    for key, value in kwargs.items():
        if key not in accepted:
            raise ValueError(f"activation {name!r} has no parameter {key!r} (got {key}={value!r}); "
                             f"its parameters: {accepted}")
    return cls(**kwargs)


def validate_activation(name: str, kwargs: dict[str, Any] | None = None) -> None:
    """Raise the ValueError :func:`get_activation` would raise, without keeping a module."""
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"activation {name!r}: parameters must be a dict; got {kwargs!r}")
    _lookup(name)  # an unknown name first, whatever its parameters
    for key, value in kwargs.items():
        if not isinstance(key, str):  # ** would raise a bare TypeError
            raise ValueError(f"activation {name!r} has no parameter {key!r} (got {key!r}: {value!r}); parameter "
                             "names are strings")
    get_activation(name, **kwargs)


def nonlinear_evals_per_token(module_or_name: str | Activation | type[Activation], width: int) -> int:
    """``nonlinear_evals_per_element`` × ``width``: the activation's cost for one token of an FFN that wide."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"width must be a non-negative integer; got width={width!r}")
    source = _lookup(module_or_name) if isinstance(module_or_name, str) else module_or_name
    per_element = getattr(source, "nonlinear_evals_per_element", None)
    if not isinstance(per_element, int):
        raise ValueError(f"{module_or_name!r} is not a registered activation (no nonlinear_evals_per_element)")
    return per_element * width
