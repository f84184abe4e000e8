"""BSO losses: pure functions of (B,) tensors (docs/LOSSES.md).

    m = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    u = log R = -(beta * m + C * (s_w - s_l))           C outside beta
    u = clamp(u, lower, upper)                          no gradient past a bound
    loss_pair = l_h(u)      (per pair; the caller reduces)

Each generator's closed form l_h(u) (additive constants dropped) stands in `GENERATORS` beside
the largest exponent it reaches, so that a new generator is one entry. `logistic` cannot
overflow and is not clamped unless the user gives bounds: DPO and SafeDPO are then exactly
their published losses for every pair. A pair within `bound_slack` of a bound (the cache's
float noise: with C = kappa a safe-winner pair starts exactly on the upper bound) is treated as
on it, as torch's clamp treats a pair exactly on it online: value at the bound, gradient kept.

For `ba` and `sba` the e^(-l u)/l term is written as expm1(-l u)/l (which differs by the constant
1/l), so that lambda -> 0 is continuous: expm1(-l u)/l -> -u, giving `ba` -> e^u + u (kliep) and
`sba` -> (e^u + u)/s. lambda = 0 is evaluated as that limit, never as a division by zero. The
sba loss therefore equals docs/LOSSES.md's table plus 1/(lambda s); constants change no gradient.

Everything is evaluated in float64 from the clamped u, and `check_overflow` refuses parameters
whose exponents could overflow the input dtype. `bso_loss` (the public entry point) and the
trainer both go through `make_loss_spec`: one function, one set of defaults (`LOSS_DEFAULTS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from bso_cache.errors import ConfigError
from bso_cache.schemas import UNLABELLED

if TYPE_CHECKING:  # torch is imported where it is used, so that the CLI and configs start fast
    import torch
    from torch import Tensor

DEFAULT_CLAMP = 30.0   # kappa: u in [-30, 30] for the exponential generators (upper raised for C > 30)
# A pair whose u is past a bound by at most this (in units of u) is treated as on the bound. The
# margin of a float32 cache carries ~1e-5 nats of noise at step 0 (u: beta times that); 0.01 nats
# of margin at beta = 0.1 is 1e-3 in u.
BOUND_SLACK = 1e-3


@dataclass(frozen=True)
class LossDefaults:
    """The BSO authors' recipe (docs/LOSSES.md); TrainConfig and `bso_loss` both read these."""

    generator: str = "sba"
    beta: float = 0.1
    safety_penalty: float = 30.0
    lam: float = 0.2
    scale: float = 4.0
    mu: float | None = None
    label_smoothing: float = 0.0


LOSS_DEFAULTS = LossDefaults()


def _expm1_over(lam: float, x: Tensor) -> Tensor:
    """expm1(lam * x) / lam, continuous at lam = 0 (where it is x)."""
    import torch
    if lam == 0.0:
        return x
    return torch.expm1(lam * x) / lam


def _logistic(u: Tensor, lam: float, scale: float) -> Tensor:
    import torch
    # log(1 + e^u) = -log sigmoid(-u), exact for every u (torch's softplus is linear above 20)
    return -torch.nn.functional.logsigmoid(-u)


def _kliep(u: Tensor, lam: float, scale: float) -> Tensor:
    import torch
    return torch.exp(u) + u


def _lsif(u: Tensor, lam: float, scale: float) -> Tensor:
    import torch
    return torch.exp(2.0 * u) - 2.0 * torch.exp(-u)


def _ba(u: Tensor, lam: float, scale: float) -> Tensor:
    import torch
    # e^((1+l)u) - ((1+l)/l) e^(-l u)  ==  e^((1+l)u) - (1+l) expm1(-l u)/l  - (1+l)/l
    # and expm1(-l u)/l == -_expm1_over(-l, u)
    return torch.exp((1.0 + lam) * u) + (1.0 + lam) * _expm1_over(-lam, u)


def _sba(u: Tensor, lam: float, scale: float) -> Tensor:
    import torch
    # [e^((1+l)u)/(1+l) - e^(-l u)/l] / s  ==  [e^((1+l)u)/(1+l) - expm1(-l u)/l] / s  - 1/(l s)
    return (torch.exp((1.0 + lam) * u) / (1.0 + lam) + _expm1_over(-lam, u)) / scale


def _basu_exponent(lam: float, lower: float, upper: float) -> float:
    return max((1.0 + lam) * upper, abs(lam) * max(abs(lower), abs(upper)), 0.0)  # e^((1+l)u), e^(-l u)


@dataclass(frozen=True)
class Generator:
    """A convex generator h: l_h(u, lambda, s), and the largest exponent any term of l_h or of its
    gradient reaches for u in [lower, upper] (None for a generator that cannot overflow, which is
    then left unclamped unless the user asks for bounds)."""

    loss: Callable[[Tensor, float, float], Tensor]
    exponent: Callable[[float, float, float], float] | None


GENERATORS: dict[str, Generator] = {
    "logistic": Generator(_logistic, None),                                      # softplus(u)
    "kliep": Generator(_kliep, lambda lam, lo, hi: max(hi, 0.0)),                # e^u + u
    "lsif": Generator(_lsif, lambda lam, lo, hi: max(2.0 * hi, -lo, 0.0)),       # e^(2u) - 2 e^(-u)
    "ba": Generator(_ba, _basu_exponent),
    "sba": Generator(_sba, _basu_exponent),
}
# The authors' configuration file names phi_mu: h(R) = (R^(2-mu) - (2-mu) R + 1 - mu)/((1-mu)(2-mu)),
# which is `sba` with lambda = 1 - mu and s = 1 up to terms linear in R.
ALIASES = ("phi",)


def check_overflow(generator: str, lam: float, lower: float | None, upper: float | None,
                   dtype: torch.dtype | None = None) -> None:
    """Refuse parameters whose loss (or gradient) could overflow `dtype` inside the clamp bounds."""
    import torch
    exponent = GENERATORS[generator].exponent
    if exponent is None:
        return
    dtype = torch.float32 if dtype is None else dtype
    limit = math.log(torch.finfo(dtype).max) - 2.0  # head-room for the batch sum and the factor (1+l)
    bound = exponent(lam, lower, upper)
    if bound > limit:
        # the largest upper bound that passes this same check (the lower bound held)
        fits = [hi for hi in range(int(upper), 0, -1) if exponent(lam, lower, float(hi)) <= limit]
        fix = (f"lower --clamp-upper to at most {fits[0]}" if fits
               else f"bring --clamp-lower closer to 0 (now {lower})")
        if generator in ("ba", "sba"):
            fix += " or use a smaller --lam"
        uses_lam = f" with lambda={lam}" if generator in ("ba", "sba") else ""  # kliep and lsif have none
        raise ConfigError(
            f"generator '{generator}'{uses_lam} and clamp [{lower}, {upper}] reaches "
            f"e^{bound:.1f}, beyond what {str(dtype).replace('torch.', '')} holds (e^{limit:.1f}); {fix}"
        )


@dataclass(frozen=True)
class LossSpec:
    """A validated loss configuration. Build it with `make_loss_spec` so that typos fail early.
    A bound of None means none (logistic without user bounds)."""

    generator: str = LOSS_DEFAULTS.generator
    beta: float = LOSS_DEFAULTS.beta
    safety_penalty: float = LOSS_DEFAULTS.safety_penalty
    clamp_lower: float | None = -DEFAULT_CLAMP
    clamp_upper: float | None = DEFAULT_CLAMP
    lam: float = LOSS_DEFAULTS.lam
    scale: float = LOSS_DEFAULTS.scale
    label_smoothing: float = LOSS_DEFAULTS.label_smoothing
    bound_slack: float = BOUND_SLACK


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
    if generator not in GENERATORS:
        raise ConfigError(
            f"unknown generator '{generator}'; valid names: {', '.join((*GENERATORS, *ALIASES))}"
        )
    return generator, lam, scale


def _bounds(generator: str, safety_penalty: float, lam: float, clamp: float | None, clamp_lower: float | None,
            clamp_upper: float | None) -> tuple[float | None, float | None]:
    """The clamp bounds: those the user gave; otherwise [-30, default_upper_clamp(C, lambda)] for the
    exponential generators and none for logistic (which cannot overflow)."""
    if clamp is not None and not clamp > 0:
        raise ConfigError(f"--clamp must be > 0, got {clamp}")
    unclamped = GENERATORS[generator].exponent is None
    if clamp is not None:
        lower, upper = -float(clamp), float(clamp)
    elif unclamped:
        lower = upper = None
    else:
        lower, upper = -DEFAULT_CLAMP, default_upper_clamp(safety_penalty, lam)
    lower = lower if clamp_lower is None else float(clamp_lower)
    upper = upper if clamp_upper is None else float(clamp_upper)
    if (lower is not None and not lower < 0) or (upper is not None and not upper > 0):
        raise ConfigError(f"clamp bounds must satisfy lower < 0 < upper, got [{lower}, {upper}]")
    return lower, upper


def make_loss_spec(generator: str = LOSS_DEFAULTS.generator, *, beta: float = LOSS_DEFAULTS.beta,
                   safety_penalty: float = LOSS_DEFAULTS.safety_penalty, clamp: float | None = None,
                   clamp_lower: float | None = None, clamp_upper: float | None = None,
                   lam: float = LOSS_DEFAULTS.lam, scale: float = LOSS_DEFAULTS.scale,
                   mu: float | None = LOSS_DEFAULTS.mu, label_smoothing: float = LOSS_DEFAULTS.label_smoothing,
                   bound_slack: float = BOUND_SLACK, dtype: torch.dtype | None = None) -> LossSpec:
    """Validate every loss parameter and resolve the clamp bounds (the trainer's and `bso_loss`'s path).

    `clamp` sets both bounds symmetrically; `clamp_lower` / `clamp_upper` override one side. With
    none given the bounds are [-30, default_upper_clamp(C, lambda)], and none at all for logistic.
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
    if not bound_slack >= 0:
        raise ConfigError(f"bound_slack must be >= 0, got {bound_slack}")
    lower, upper = _bounds(generator, safety_penalty, lam, clamp, clamp_lower, clamp_upper)
    check_overflow(generator, lam, lower, upper, dtype)  # the smoothed term's u_swap stays in the bounds too
    return LossSpec(generator, float(beta), float(safety_penalty), lower, upper, float(lam),
                    float(scale), float(label_smoothing), float(bound_slack))


def _as_label(x: Tensor | None, like: Tensor) -> Tensor:
    """Safety labels as float64 with NaN for unknown (None = all unknown)."""
    import torch
    if x is None:
        return torch.full_like(like, float("nan"), dtype=torch.float64)
    return x.to(device=like.device, dtype=torch.float64)


def log_ratio(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_unsafe: Tensor | None, rejected_unsafe: Tensor | None,
              *, beta: float, safety_penalty: float) -> tuple[Tensor, Tensor]:
    """(margin m, unclamped u) in float64. Unknown safety (NaN / None) contributes no safety term."""
    import torch
    m = (policy_chosen_logps.double() - ref_chosen_logps.double()) - (
        policy_rejected_logps.double() - ref_rejected_logps.double()
    )
    s_diff = _as_label(chosen_unsafe, m) - _as_label(rejected_unsafe, m)
    s_diff = torch.nan_to_num(s_diff, nan=0.0)
    u = -(beta * m + safety_penalty * s_diff)
    return m, u


def clamp_u(u: Tensor, lower: float | None, upper: float | None, slack: float = BOUND_SLACK) -> Tensor:
    """clamp(u, lower, upper) with no gradient past a bound, except within `slack` of it: such a
    pair takes the bound's value and keeps its gradient, as one exactly on the bound does."""
    import torch
    if lower is None and upper is None:
        return u
    clamped = torch.clamp(u, lower, upper)
    near = torch.zeros_like(u, dtype=torch.bool)
    if upper is not None:
        near |= (u > upper) & (u <= upper + slack)
    if lower is not None:
        near |= (u < lower) & (u >= lower - slack)
    return torch.where(near, clamped + (u - u.detach()), clamped)


@dataclass(frozen=True)
class LossTerms:
    """Per-pair losses (B,) in float64 with the margin m and the unclamped u they came from."""

    losses: Tensor
    margin: Tensor
    u: Tensor


def loss_terms(spec: LossSpec, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
               chosen_unsafe: Tensor | None, rejected_unsafe: Tensor | None) -> LossTerms:
    """The losses of an already validated `LossSpec` (nothing is re-checked), in float64:

        u = clamp(u_raw, lower, upper);  loss = l_h(u)
        with label smoothing e (docs/LOSSES.md): (1 - e) l_h(u) + e l_h(u_swap), u_swap = clamp(-u_raw, lower, upper),
        the swapped pair's own clamped log-ratio (equal to -u only when the bounds are symmetric).
    """
    m, u_raw = log_ratio(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                         ref_rejected_logps, chosen_unsafe, rejected_unsafe,
                         beta=spec.beta, safety_penalty=spec.safety_penalty)
    fn = GENERATORS[spec.generator].loss
    lo, hi, slack = spec.clamp_lower, spec.clamp_upper, spec.bound_slack
    losses = fn(clamp_u(u_raw, lo, hi, slack), spec.lam, spec.scale)
    if spec.label_smoothing:
        swapped = fn(clamp_u(-u_raw, lo, hi, slack), spec.lam, spec.scale)
        losses = (1.0 - spec.label_smoothing) * losses + spec.label_smoothing * swapped
    return LossTerms(losses, m.detach(), u_raw.detach())


def spec_loss(spec: LossSpec, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_unsafe: Tensor | None, rejected_unsafe: Tensor | None) -> Tensor:
    """Per-pair losses (B,) in float64 for an already validated `LossSpec` (see `loss_terms`)."""
    return loss_terms(spec, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_unsafe, rejected_unsafe).losses


def bso_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             chosen_unsafe: Tensor | None = None, rejected_unsafe: Tensor | None = None, *,
             generator: str = LOSS_DEFAULTS.generator, beta: float = LOSS_DEFAULTS.beta,
             safety_penalty: float = LOSS_DEFAULTS.safety_penalty,
             clamp: float | tuple[float, float] | None = None, clamp_lower: float | None = None,
             clamp_upper: float | None = None, lam: float = LOSS_DEFAULTS.lam, scale: float = LOSS_DEFAULTS.scale,
             mu: float | None = LOSS_DEFAULTS.mu, label_smoothing: float = LOSS_DEFAULTS.label_smoothing) -> Tensor:
    """Per-pair BSO losses, shape (B,), in the dtype of `policy_chosen_logps`: the public entry point,
    with the trainer's defaults and numbers (both go through `make_loss_spec`).

    Safety labels are 1 = unsafe, 0 = safe, NaN (or None for the whole batch) = unknown.
    `clamp` is a symmetric bound kappa (or a (lower, upper) pair); `clamp_lower` / `clamp_upper`
    override one side; none given: [-30, 30] with the upper bound raised for C > 30, and no clamp
    for logistic. The parameters are validated (overflow for the input dtype included) on every
    call; a training loop validates once with `make_loss_spec` and calls `spec_loss`.
    """
    if isinstance(clamp, tuple):
        (clamp_lower, clamp_upper), clamp = clamp, None
    spec = make_loss_spec(generator, beta=beta, safety_penalty=safety_penalty, clamp=clamp, clamp_lower=clamp_lower,
                          clamp_upper=clamp_upper, lam=lam, scale=scale, mu=mu, label_smoothing=label_smoothing,
                          dtype=policy_chosen_logps.dtype)
    return spec_loss(spec, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                     chosen_unsafe, rejected_unsafe).to(policy_chosen_logps.dtype)


def _past(u: Tensor, lower: float | None, upper: float | None, slack: float) -> Tensor:
    """Pairs past a bound by more than the slack (no gradient)."""
    import torch
    out = torch.zeros_like(u, dtype=torch.bool)
    if upper is not None:
        out |= u > upper + slack
    if lower is not None:
        out |= u < lower - slack
    return out


def pair_diagnostics(spec: LossSpec, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                     ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                     chosen_unsafe: Tensor | None, rejected_unsafe: Tensor | None,
                     terms: LossTerms | None = None) -> dict[str, Tensor]:
    """Detached per-pair diagnostics, each (B,): rewards, margin, u, clamped, and `pair_outcomes`
    (pair type, correct, safety_differs, safe_wins).

    rewards r = beta (log pi - log pi_ref). `terms`, the
    loss's own `LossTerms`, spares recomputing m and u.
    """
    policy_chosen_logps, policy_rejected_logps = policy_chosen_logps.detach(), policy_rejected_logps.detach()
    if terms is None:
        m, u = log_ratio(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                         ref_rejected_logps, chosen_unsafe, rejected_unsafe,
                         beta=spec.beta, safety_penalty=spec.safety_penalty)
    else:
        m, u = terms.margin, terms.u
    chosen_rewards = spec.beta * (policy_chosen_logps.double() - ref_chosen_logps.double())
    rejected_rewards = spec.beta * (policy_rejected_logps.double() - ref_rejected_logps.double())
    return {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margin": m,
        "u": u,
        "clamped": _past(u, spec.clamp_lower, spec.clamp_upper, spec.bound_slack),
        **pair_outcomes(m, chosen_unsafe, rejected_unsafe),
    }


def pair_outcomes(margin: Tensor, chosen_unsafe: Tensor | None, rejected_unsafe: Tensor | None) -> dict[str, Tensor]:
    """What every report counts per pair (B,), defined here once for the training metrics and
    `bso-cache eval` alike, from the margin m = (log pi - log pi_ref)(chosen) - (...)(rejected):

    - pair_type: index of schemas.PAIR_TYPES, 2 s_w + s_l, UNLABELLED when either label is unknown;
    - correct: m > 0, chosen's implicit reward is higher (a tie counts as wrong);
    - safety_differs: both labels known and different;
    - safe_wins: of those, the safe response's implicit reward is higher.
    """
    import torch
    sw = _as_label(chosen_unsafe, margin)
    sl = _as_label(rejected_unsafe, margin)
    labelled = ~(torch.isnan(sw) | torch.isnan(sl))
    pair_type = torch.full_like(margin, UNLABELLED, dtype=torch.long)
    pair_type[labelled] = (sw[labelled] * 2 + sl[labelled]).long()
    differs = labelled & (sw != sl)
    safe_wins = torch.where(sw == 0, margin > 0, margin < 0)  # the safe one is chosen when s_w = 0
    return {"pair_type": pair_type, "correct": margin > 0, "safety_differs": differs,
            "safe_wins": safe_wins & differs}
