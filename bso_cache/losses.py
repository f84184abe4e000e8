"""BSO losses: pure functions of (B,) tensors (specification: shared BSO.md).

    m = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    u = log R = -(beta * m + C * (s_w - s_l))           C outside beta
    u = clamp(u, lower, upper)                          no gradient past a bound
    loss_pair = l_h(u)      (per pair; the caller reduces)

Closed forms of l_h as functions of u (additive constants dropped):

    logistic  softplus(u)                                            dl/du = sigmoid(u)
    kliep     e^u + u                                                dl/du = e^u + 1
    lsif      e^(2u) - 2 e^(-u)           (h = (R - 1)^2)            dl/du = 2 e^(2u) + 2 e^(-u)
    ba        e^((1+l)u) - ((1+l)/l) e^(-l u)                        dl/du = (1+l)(e^((1+l)u) + e^(-l u))
    sba       [e^((1+l)u)/(1+l) - e^(-l u)/l] / s                    dl/du = [e^((1+l)u) + e^(-l u)] / s

For `ba` and `sba` the e^(-l u)/l term is written as expm1(-l u)/l (which differs by the constant
1/l), so that lambda -> 0 is continuous: expm1(-l u)/l -> -u, giving `ba` -> e^u + u (kliep) and
`sba` -> (e^u + u)/s. lambda = 0 is evaluated as that limit, never as a division by zero.

Everything is evaluated in float64 from the clamped u and cast back to the input dtype, and
`check_overflow` refuses parameters whose exponents could overflow the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .config import DEFAULT_CLAMP, TrainConfig as _D
from .errors import ConfigError
from .schemas import UNLABELLED

Tensor = torch.Tensor

GENERATORS = ("logistic", "kliep", "lsif", "ba", "sba")
# The authors' configuration file names phi_mu: h(R) = (R^(2-mu) - (2-mu) R + 1 - mu)/((1-mu)(2-mu)),
# which is `sba` with lambda = 1 - mu and s = 1 up to terms linear in R.
ALIASES = ("phi",)


def _expm1_over(lam: float, x: Tensor) -> Tensor:
    """expm1(lam * x) / lam, continuous at lam = 0 (where it is x)."""
    if lam == 0.0:
        return x
    return torch.expm1(lam * x) / lam


def _logistic(u: Tensor, lam: float, scale: float) -> Tensor:
    return torch.nn.functional.softplus(u)


def _kliep(u: Tensor, lam: float, scale: float) -> Tensor:
    return torch.exp(u) + u


def _lsif(u: Tensor, lam: float, scale: float) -> Tensor:
    return torch.exp(2.0 * u) - 2.0 * torch.exp(-u)


def _ba(u: Tensor, lam: float, scale: float) -> Tensor:
    # e^((1+l)u) - ((1+l)/l) e^(-l u)  ==  e^((1+l)u) - (1+l) expm1(-l u)/l  - (1+l)/l
    # and expm1(-l u)/l == -_expm1_over(-l, u)
    return torch.exp((1.0 + lam) * u) + (1.0 + lam) * _expm1_over(-lam, u)


def _sba(u: Tensor, lam: float, scale: float) -> Tensor:
    # [e^((1+l)u)/(1+l) - e^(-l u)/l] / s  ==  [e^((1+l)u)/(1+l) - expm1(-l u)/l] / s  - 1/(l s)
    return (torch.exp((1.0 + lam) * u) / (1.0 + lam) + _expm1_over(-lam, u)) / scale


_LOSS_OF_U: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "logistic": _logistic,
    "kliep": _kliep,
    "lsif": _lsif,
    "ba": _ba,
    "sba": _sba,
}


def _exponent_bound(generator: str, lam: float, lower: float, upper: float) -> float:
    """The largest exponent any term of l_h (or its gradient) reaches for u in [lower, upper]."""
    reach = max(abs(lower), abs(upper))
    if generator == "logistic":
        return 0.0  # softplus never overflows
    if generator == "kliep":
        return max(upper, 0.0)
    if generator == "lsif":
        return max(2.0 * upper, -lower, 0.0)
    # ba / sba: e^((1+l)u) and e^(-l u)
    return max((1.0 + lam) * upper, abs(lam) * reach, 0.0)


def check_overflow(generator: str, lam: float, lower: float, upper: float,
                   dtype: torch.dtype = torch.float32) -> None:
    """Refuse parameters whose loss (or gradient) could overflow `dtype` inside the clamp bounds."""
    limit = math.log(torch.finfo(dtype).max) - 2.0  # head-room for the batch sum and the factor (1+l)
    bound = _exponent_bound(generator, lam, lower, upper)
    if bound > limit:
        raise ConfigError(
            f"generator '{generator}' with lambda={lam} and clamp [{lower}, {upper}] reaches "
            f"e^{bound:.1f}, beyond what {str(dtype).replace('torch.', '')} holds (e^{limit:.1f}); "
            f"lower --clamp-upper to at most {limit / max(1.0 + lam, 1e-9):.0f} or use a smaller --lam"
        )


@dataclass(frozen=True)
class LossSpec:
    """A validated loss configuration. Build it with `make_loss_spec` so that typos fail early.
    The defaults are TrainConfig's (the BSO authors' recipe)."""

    generator: str = _D.generator
    beta: float = _D.beta
    safety_penalty: float = _D.safety_penalty
    clamp_lower: float = -DEFAULT_CLAMP
    clamp_upper: float = DEFAULT_CLAMP
    lam: float = _D.lam
    scale: float = _D.scale
    label_smoothing: float = _D.label_smoothing


def default_upper_clamp(safety_penalty: float, lam: float, base: float = DEFAULT_CLAMP) -> float:
    """The authors' rule: with C above the bound, raise it to min(C + 10, floor(85 / (1 + lambda)))."""
    if safety_penalty <= base:
        return base
    return float(min(safety_penalty + 10.0, math.floor(85.0 / (1.0 + lam))))


def resolve_generator(generator: str, lam: float, scale: float, mu: float | None = None) -> tuple[str, float, float]:
    """Map a user's generator name (and `phi`'s mu) to (generator, lambda, scale); fail on unknown names."""
    if generator == "phi":
        if mu is None:
            raise ConfigError("generator 'phi' needs --mu (the authors use mu = 1.5)")
        return "sba", 1.0 - mu, 1.0
    if generator not in _LOSS_OF_U:
        raise ConfigError(
            f"unknown generator '{generator}'; valid names: {', '.join(GENERATORS + ALIASES)}"
        )
    return generator, lam, scale


def make_loss_spec(generator: str = _D.generator, *, beta: float = _D.beta, safety_penalty: float = _D.safety_penalty,
                   clamp: float | None = _D.clamp, clamp_lower: float | None = _D.clamp_lower,
                   clamp_upper: float | None = _D.clamp_upper, lam: float = _D.lam, scale: float = _D.scale,
                   mu: float | None = _D.mu, label_smoothing: float = _D.label_smoothing,
                   dtype: torch.dtype = torch.float32) -> LossSpec:
    """Validate every loss parameter and resolve the clamp bounds.

    `clamp` sets both bounds symmetrically; `clamp_lower` / `clamp_upper` override one side. With
    none given the bounds are [-30, default_upper_clamp(C, lambda)].
    """
    generator, lam, scale = resolve_generator(generator, lam, scale, mu)
    if not beta > 0:
        raise ConfigError(f"--beta must be > 0, got {beta}")
    if safety_penalty < 0:
        raise ConfigError(f"--safety-penalty (C) must be >= 0, got {safety_penalty}")
    if generator in ("ba", "sba") and not lam > -1:
        raise ConfigError(f"--lam must be > -1 for '{generator}', got {lam}")
    if generator == "sba" and not scale > 0:
        raise ConfigError(f"--scale must be > 0, got {scale}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing}")
    base = DEFAULT_CLAMP if clamp is None else float(clamp)
    if base <= 0:
        raise ConfigError(f"--clamp must be > 0, got {clamp}")
    lower = -base if clamp_lower is None else float(clamp_lower)
    upper = (default_upper_clamp(safety_penalty, lam, base) if clamp is None else base) \
        if clamp_upper is None else float(clamp_upper)
    if not lower < 0 < upper:
        raise ConfigError(f"clamp bounds must satisfy lower < 0 < upper, got [{lower}, {upper}]")
    check_overflow(generator, lam, lower, upper, dtype)  # the smoothed term's u_swap stays in the bounds too
    return LossSpec(generator, float(beta), float(safety_penalty), lower, upper, float(lam),
                    float(scale), float(label_smoothing))


def _as_label(x: Tensor | None, like: Tensor) -> Tensor:
    """Safety labels as float64 with NaN for unknown (None = all unknown)."""
    if x is None:
        return torch.full_like(like, float("nan"), dtype=torch.float64)
    return x.to(device=like.device, dtype=torch.float64)


def log_ratio(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_unsafe: Tensor | None, rejected_unsafe: Tensor | None,
              *, beta: float, safety_penalty: float) -> tuple[Tensor, Tensor]:
    """(margin m, unclamped u) in float64. Unknown safety (NaN / None) contributes no safety term."""
    m = (policy_chosen_logps.double() - ref_chosen_logps.double()) - (
        policy_rejected_logps.double() - ref_rejected_logps.double()
    )
    s_diff = _as_label(chosen_unsafe, m) - _as_label(rejected_unsafe, m)
    s_diff = torch.nan_to_num(s_diff, nan=0.0)
    u = -(beta * m + safety_penalty * s_diff)
    return m, u


def loss_of_u(u: Tensor, generator: str, lam: float = _D.lam, scale: float = _D.scale) -> Tensor:
    """l_h(u) for an already clamped u (float64 recommended)."""
    try:
        fn = _LOSS_OF_U[generator]
    except KeyError:
        raise ConfigError(
            f"unknown generator '{generator}'; valid names: {', '.join(GENERATORS + ALIASES)}"
        ) from None
    return fn(u, lam, scale)


def bso_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_unsafe: Tensor | None, rejected_unsafe: Tensor | None, *,
             generator: str, beta: float, safety_penalty: float,
             clamp: float | tuple[float, float] = DEFAULT_CLAMP, lam: float = _D.lam, scale: float = _D.scale,
             label_smoothing: float = 0.0) -> Tensor:
    """Per-pair BSO losses, shape (B,), in the dtype of `policy_chosen_logps` (the public entry point).

    Safety labels are 1 = unsafe, 0 = safe, NaN (or None for the whole batch) = unknown.
    `clamp` is a symmetric bound kappa or a (lower, upper) pair. The parameters are validated
    (including overflow for the input dtype) on every call; a training loop validates once with
    `make_loss_spec` and calls `spec_loss`.
    """
    lower, upper = (-float(clamp), float(clamp)) if not isinstance(clamp, tuple) else map(float, clamp)
    generator, lam, scale = resolve_generator(generator, lam, scale)
    spec = make_loss_spec(generator, beta=beta, safety_penalty=safety_penalty, clamp_lower=lower,
                          clamp_upper=upper, lam=lam, scale=scale, label_smoothing=label_smoothing,
                          dtype=policy_chosen_logps.dtype)
    return spec_loss(spec, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                     chosen_unsafe, rejected_unsafe).to(policy_chosen_logps.dtype)


def spec_loss(spec: LossSpec, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_unsafe: Tensor | None, rejected_unsafe: Tensor | None) -> Tensor:
    """Per-pair losses (B,) in float64 for an already validated `LossSpec`: nothing is re-checked.

        u = clamp(u_raw, lower, upper);  loss = l_h(u)
        with label smoothing e (BSO.md): (1 - e) l_h(u) + e l_h(u_swap), u_swap = clamp(-u_raw, lower, upper),
        the swapped pair's own clamped log-ratio (equal to -u only when the bounds are symmetric).
    """
    _, u_raw = log_ratio(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                         ref_rejected_logps, chosen_unsafe, rejected_unsafe,
                         beta=spec.beta, safety_penalty=spec.safety_penalty)
    fn = _LOSS_OF_U[spec.generator]
    losses = fn(torch.clamp(u_raw, spec.clamp_lower, spec.clamp_upper), spec.lam, spec.scale)
    if spec.label_smoothing:
        swapped = fn(torch.clamp(-u_raw, spec.clamp_lower, spec.clamp_upper), spec.lam, spec.scale)
        losses = (1.0 - spec.label_smoothing) * losses + spec.label_smoothing * swapped
    return losses


@torch.no_grad()
def pair_diagnostics(spec: LossSpec, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                     ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                     chosen_unsafe: Tensor | None, rejected_unsafe: Tensor | None) -> dict[str, Tensor]:
    """Detached per-pair diagnostics, each (B,): rewards, margin, u, clamped, pair type.

    rewards r = beta (log pi - log pi_ref); `pair_type` indexes schemas.PAIR_TYPES.
    """
    m, u = log_ratio(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                     ref_rejected_logps, chosen_unsafe, rejected_unsafe,
                     beta=spec.beta, safety_penalty=spec.safety_penalty)
    sw = _as_label(chosen_unsafe, m)
    sl = _as_label(rejected_unsafe, m)
    labelled = ~(torch.isnan(sw) | torch.isnan(sl))
    pair_type = torch.full_like(m, UNLABELLED, dtype=torch.long)
    pair_type[labelled] = (sw[labelled] * 2 + sl[labelled]).long()
    chosen_rewards = spec.beta * (policy_chosen_logps.double() - ref_chosen_logps.double())
    rejected_rewards = spec.beta * (policy_rejected_logps.double() - ref_rejected_logps.double())
    # the safe response of a pair that differs in safety: chosen if s_w = 0, s_l = 1
    differs = labelled & (sw != sl)
    safe_wins = torch.where(sw == 0, chosen_rewards > rejected_rewards, rejected_rewards > chosen_rewards)
    return {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margin": m,
        "u": u,
        "clamped": (u < spec.clamp_lower) | (u > spec.clamp_upper),
        "pair_type": pair_type,
        "safety_differs": differs,
        "safe_wins": safe_wins & differs,
    }
