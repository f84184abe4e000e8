"""The BSO losses against shared BSO.md: closed forms, gradients, identities, numerics."""

from __future__ import annotations

import math

import pytest
import torch

from bso_cache.config import BASELINES, TrainConfig
from bso_cache.errors import ConfigError
from bso_cache.losses import spec_loss, bso_loss, default_upper_clamp, make_loss_spec, pair_diagnostics

F64 = torch.float64


def closed_form(gen: str, u: float, lam: float = 0.2, s: float = 4.0) -> float:
    """l_h(u) of BSO.md's table, written independently (math, not torch), constants included."""
    if gen == "logistic":
        return math.log1p(math.exp(u))
    if gen == "kliep":
        return math.exp(u) + u
    if gen == "lsif":
        return math.exp(2 * u) - 2 * math.exp(-u)
    if gen == "ba":
        if lam == 0:
            return math.exp(u) + u
        return math.exp((1 + lam) * u) - ((1 + lam) / lam) * math.exp(-lam * u)
    if gen == "sba":
        if lam == 0:
            return (math.exp(u) + u) / s
        return (math.exp((1 + lam) * u) / (1 + lam) - math.exp(-lam * u) / lam) / s
    raise ValueError(gen)


def closed_grad(gen: str, u: float, lam: float = 0.2, s: float = 4.0) -> float:
    """d l / d u of BSO.md's table."""
    if gen == "logistic":
        return 1 / (1 + math.exp(-u))
    if gen == "kliep":
        return math.exp(u) + 1
    if gen == "lsif":
        return 2 * math.exp(2 * u) + 2 * math.exp(-u)
    if gen == "ba":
        return (1 + lam) * (math.exp((1 + lam) * u) + math.exp(-lam * u))
    return (math.exp((1 + lam) * u) + math.exp(-lam * u)) / s


def pair_inputs(m_values, s_w, s_l):
    """Log-probs whose margin m equals m_values (tens of nats apart), and labels."""
    m = torch.tensor(m_values, dtype=F64)
    pc = torch.linspace(-80, -20, len(m_values), dtype=F64)
    rc = pc - 3.0
    rr = torch.full_like(m, -50.0)
    pr = rr + (pc - rc) - m  # so that (pc - rc) - (pr - rr) = m
    return pc, pr, rc, rr, torch.tensor(s_w, dtype=F64), torch.tensor(s_l, dtype=F64)


GENS = ["logistic", "kliep", "lsif", "ba", "sba"]
LAMS = [-0.5, -0.3, 0.0, 0.2, 0.3, 0.5]


@pytest.mark.parametrize("gen", GENS)
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("C", [0.0, 5.0, 30.0])
def test_closed_forms_values_and_gradients(gen, lam, C):
    beta = 0.1
    m_values = [-40.0, -12.0, -3.0, 0.0, 0.7, 5.0, 25.0, 60.0]
    s_w = [0, 1, 0, 1, 0, 0, 1, 0]
    s_l = [1, 0, 0, 1, 1, 0, 0, 0]
    pc, pr, rc, rr, sw, sl = pair_inputs(m_values, s_w, s_l)
    pc.requires_grad_(True)
    kappa = 30.0
    losses = bso_loss(pc, pr, rc, rr, sw, sl, generator=gen, beta=beta, safety_penalty=C,
                      clamp=kappa, lam=lam, scale=4.0)
    assert losses.dtype == F64 and losses.shape == (8,)
    us = [min(max(-(beta * m + C * (a - b)), -kappa), kappa) for m, a, b in zip(m_values, s_w, s_l)]
    expected = torch.tensor([closed_form(gen, u, lam) for u in us], dtype=F64)
    offsets = losses.detach() - expected
    # equal up to one additive constant per generator (BSO.md drops constants)
    assert torch.allclose(offsets, offsets[0].expand_as(offsets), rtol=0, atol=1e-9 * (1 + expected.abs().max()))
    losses.sum().backward()
    # d loss / d log pi(y_w) = l'(u) * du/dm * dm/dpc = l'(u) * (-beta), zero past the clamp
    for i, (m, a, b) in enumerate(zip(m_values, s_w, s_l)):
        raw = -(beta * m + C * (a - b))
        want = 0.0 if abs(raw) > kappa else -beta * closed_grad(gen, raw, lam)
        got = pc.grad[i].item()
        assert got == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_gradcheck_float64():
    for gen in GENS:
        for lam in (-0.3, 0.0, 0.2):
            pc = torch.randn(5, dtype=F64, requires_grad=True)
            pr = torch.randn(5, dtype=F64, requires_grad=True)
            rc, rr = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
            sw = torch.tensor([0.0, 1.0, float("nan"), 0.0, 1.0], dtype=F64)
            sl = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0], dtype=F64)

            def f(a, b):
                return bso_loss(a, b, rc, rr, sw, sl, generator=gen, beta=0.5, safety_penalty=0.5,
                                clamp=30.0, lam=lam, label_smoothing=0.1)

            assert torch.autograd.gradcheck(f, (pc, pr), eps=1e-6, atol=1e-6)


def test_dpo_identity():
    """logistic with C = 0 is DPO's -log sigmoid(beta m) (TRL's `sigmoid` loss)."""
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, dtype=F64) * 20 for _ in range(4))
    beta = 0.1
    losses = bso_loss(pc, pr, rc, rr, None, None, generator="logistic", beta=beta, safety_penalty=0.0)
    m = (pc - rc) - (pr - rr)
    dpo = -torch.nn.functional.logsigmoid(beta * m)
    assert torch.allclose(losses, dpo, rtol=0, atol=1e-9)


def safedpo_transform(rows):
    """SafeDPO's T(D), written independently: keep if y_w safe; swap if y_w unsafe and y_l safe; drop both unsafe."""
    out = []
    for pc, pr, rc, rr, sw, sl in rows:
        if sw == 0:
            out.append((pc, pr, rc, rr, sw, sl))
        elif sl == 0:
            out.append((pr, pc, rr, rc, sl, sw))
    return out


def test_safedpo_identity():
    """logistic with C = Delta on SafeDPO-transformed pairs is -log sigmoid(beta m - (s_l - s_w) Delta)."""
    import random

    from bso_cache.data.pairs import plan_pairs

    rng = random.Random(0)
    rows = [(rng.uniform(-90, -10), rng.uniform(-90, -10), rng.uniform(-90, -10), rng.uniform(-90, -10),
             rng.randint(0, 1), rng.randint(0, 1)) for _ in range(200)]
    beta, delta = 0.1, 10.0
    t = safedpo_transform(rows)
    pc, pr, rc, rr, sw, sl = (torch.tensor(c, dtype=F64) for c in zip(*t))
    ours = bso_loss(pc, pr, rc, rr, sw, sl, generator="logistic", beta=beta, safety_penalty=delta)
    m = (pc - rc) - (pr - rr)
    safedpo = -torch.nn.functional.logsigmoid(beta * m - (sl - sw) * delta)
    assert torch.allclose(ours, safedpo, rtol=0, atol=1e-9)
    # and the trainer's pair handling performs the same transform
    import numpy as np

    cols = list(zip(*rows))
    keep, swap, counts = plan_pairs(np.full(len(rows), np.nan), np.array(cols[4], float),
                                    np.array(cols[5], float), "safedpo", "better")
    assert counts.kept == len(t)
    mine = [(r[1], r[0], r[3], r[2], r[5], r[4]) if s else r for r, k, s in zip(rows, keep, swap) if k]
    assert mine == t


def test_clamp_zero_gradient_past_bound_and_finite_extremes():
    pc = torch.tensor([-1000.0, 1000.0, 0.0], dtype=torch.float32, requires_grad=True)
    pr = torch.zeros(3)
    rc = torch.zeros(3)
    rr = torch.zeros(3)
    for gen in GENS:
        pc.grad = None
        losses = bso_loss(pc, pr, rc, rr, torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]),
                          generator=gen, beta=0.1, safety_penalty=30.0)
        assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
        losses.sum().backward()
        if gen == "logistic":  # not clamped (it cannot overflow): DPO's / SafeDPO's own gradient
            assert pc.grad[0].item() == pytest.approx(-0.1) and -1e-20 < pc.grad[1].item() < 0
        else:
            assert pc.grad[0] == 0 and pc.grad[1] == 0  # |u| far past 30
        assert pc.grad[2] != 0


def test_safe_winner_starts_at_u_equals_C_and_gets_gradient_with_default_bounds():
    """C = 30 with sba: u = +30 at step 0 for safe-winner/unsafe-loser pairs; finite, no overflow."""
    spec = make_loss_spec("sba", safety_penalty=30.0)
    assert (spec.clamp_lower, spec.clamp_upper) == (-30.0, 30.0)
    spec50 = make_loss_spec("sba", safety_penalty=50.0, lam=0.2)
    assert spec50.clamp_upper == min(60.0, math.floor(85 / 1.2)) == 60.0
    spec80 = make_loss_spec("sba", safety_penalty=80.0, lam=0.2)
    assert spec80.clamp_upper == 70.0
    assert default_upper_clamp(10.0, 0.2) == 30.0
    # the gradient itself: a safe-winner/unsafe-loser pair at step 0 (m = 0, so u = +C) is inside the
    # automatically raised bound for C = 50 and learns; with the bound left at 30 it would get none
    for s_spec, expect_grad in ((spec50, True), (make_loss_spec("sba", safety_penalty=50.0, clamp=30.0), False)):
        pc = torch.zeros(1, dtype=F64, requires_grad=True)
        losses = spec_loss(s_spec, pc, torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64),
                           torch.zeros(1, dtype=F64), torch.tensor([0.0], dtype=F64), torch.tensor([1.0], dtype=F64))
        assert torch.isfinite(losses).all()
        losses.sum().backward()
        assert (pc.grad.abs() > 0).all() == expect_grad
        if expect_grad:  # dl/dm = -beta dl/du: pushes log pi(safe winner) up
            assert pc.grad[0] < 0


def test_unlabelled_pairs_have_no_safety_term():
    pc, pr, rc, rr = (torch.randn(4, dtype=F64) for _ in range(4))
    nan = float("nan")
    with_nan = bso_loss(pc, pr, rc, rr, torch.tensor([nan, 1.0, nan, 0.0], dtype=F64),
                        torch.tensor([1.0, nan, nan, 1.0], dtype=F64), generator="sba", beta=0.1,
                        safety_penalty=30.0)
    plain = bso_loss(pc, pr, rc, rr, None, None, generator="sba", beta=0.1, safety_penalty=30.0)
    assert torch.allclose(with_nan[:3], plain[:3])
    assert not torch.allclose(with_nan[3], plain[3])


def test_lambda_zero_is_the_limit():
    u = torch.linspace(-5, 5, 11, dtype=F64)
    pc = -u / 0.1  # with rc=pr=rr=0, m = pc, u = -beta m
    z = torch.zeros_like(u)
    at0 = bso_loss(pc, z, z, z, None, None, generator="sba", beta=0.1, safety_penalty=0.0, lam=0.0)
    near = bso_loss(pc, z, z, z, None, None, generator="sba", beta=0.1, safety_penalty=0.0, lam=1e-7)
    assert torch.allclose(at0, near, atol=1e-5)
    kliep = bso_loss(pc, z, z, z, None, None, generator="kliep", beta=0.1, safety_penalty=0.0)
    ba0 = bso_loss(pc, z, z, z, None, None, generator="ba", beta=0.1, safety_penalty=0.0, lam=0.0)
    assert torch.allclose(kliep, ba0)
    assert torch.allclose(at0, (torch.exp(u) + u) / 4.0)


def test_label_smoothing_and_phi_alias():
    pc, pr, rc, rr = (torch.randn(6, dtype=F64) for _ in range(4))
    base = dict(generator="logistic", beta=0.1, safety_penalty=0.0)
    a = bso_loss(pc, pr, rc, rr, None, None, **base)
    b = bso_loss(rc, rr, pc, pr, None, None, **base)  # u -> -u
    ls = bso_loss(pc, pr, rc, rr, None, None, label_smoothing=0.2, **base)
    assert torch.allclose(ls, 0.8 * a + 0.2 * b)
    spec = make_loss_spec("phi", mu=1.5)
    assert (spec.generator, spec.lam, spec.scale) == ("sba", -0.5, 1.0)


def test_bad_parameters_fail_early_with_the_valid_names():
    with pytest.raises(ConfigError, match="valid names: logistic, kliep, lsif, ba, sba"):
        make_loss_spec("sbaa")
    with pytest.raises(ConfigError, match="beyond what float32 holds"):
        make_loss_spec("lsif", clamp=60.0)
    with pytest.raises(ConfigError, match="beta"):
        make_loss_spec("sba", beta=0.0)
    with pytest.raises(ConfigError, match="lam"):
        make_loss_spec("sba", lam=-1.0)
    with pytest.raises(ConfigError, match="phi"):
        make_loss_spec("phi")


def test_step0_logistic_is_log2_and_diagnostics():
    z = torch.full((4,), -30.0, dtype=F64)
    sw = torch.tensor([0.0, 0.0, 1.0, float("nan")], dtype=F64)
    sl = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=F64)
    spec = make_loss_spec("logistic", safety_penalty=5.0)
    losses = bso_loss(z, z, z, z, sw, sl, generator="logistic", beta=0.1, safety_penalty=5.0)
    assert losses[0].item() == pytest.approx(math.log(2), abs=1e-12)
    assert losses[1].item() == pytest.approx(math.log1p(math.exp(5.0)))  # u = -C (0 - 1) = +5
    d = pair_diagnostics(spec, z, z, z, z, sw, sl)
    assert d["u"].tolist() == [0.0, 5.0, -5.0, 0.0]
    assert d["pair_type"].tolist() == [0, 1, 2, 4]
    assert d["safety_differs"].tolist() == [False, True, True, False]


@pytest.mark.parametrize("bounds", [None, (-10.0, 30.0)])
def test_label_smoothing_uses_the_swapped_pairs_own_clamped_ratio_with_asymmetric_bounds(bounds):
    """BSO.md: (1 - e) l(clamp(u_raw, lo, hi)) + e l(clamp(-u_raw, lo, hi)). With C = 50 the upper
    bound is raised to 60 while the lower stays -30; (-10, 30) are explicit asymmetric bounds.
    u_raw lies on both sides of each bound, where u_swap differs from -u."""
    lam, s, e = 0.2, 4.0, 0.1
    if bounds is None:
        spec = make_loss_spec("sba", safety_penalty=50.0, label_smoothing=e)
        assert (spec.clamp_lower, spec.clamp_upper) == (-30.0, 60.0)
        u_raw = [-70.0, -45.0, -20.0, 20.0, 45.0, 70.0]
    else:
        spec = make_loss_spec("sba", clamp_lower=bounds[0], clamp_upper=bounds[1], label_smoothing=e)
        u_raw = [-40.0, -20.0, -5.0, 5.0, 20.0, 40.0]
    lo, hi = spec.clamp_lower, spec.clamp_upper

    def sba(u):  # the closed form of BSO.md, up to its additive constant (-1/(l s), as losses.py drops it)
        return (math.exp((1 + lam) * u) / (1 + lam) - (math.exp(-lam * u) - 1) / lam) / s

    def clamp(x):
        return min(max(x, lo), hi)

    # u_raw = -(beta m + C (s_w - s_l)); without safety labels m = -u_raw / beta
    pc = torch.tensor([-u / spec.beta for u in u_raw], dtype=F64)
    z = torch.zeros(len(u_raw), dtype=F64)
    got = spec_loss(spec, pc, z, z, z, None, None).tolist()
    for u, g in zip(u_raw, got):
        assert g == pytest.approx((1 - e) * sba(clamp(u)) + e * sba(clamp(-u)), rel=1e-12), u


def _independent_logistic(x: float) -> float:
    """log(1 + e^x) in Python floats, exact for every x (no torch)."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


@pytest.mark.parametrize("named", ["dpo", "safedpo"])
def test_named_baselines_equal_their_published_losses_for_every_pair(named):
    """DPO: -log sigmoid(beta m); SafeDPO: -log sigmoid(beta m - (s_l - s_w) Delta) (BSO.md), written
    independently in Python floats, within 1e-12 for every pair, |u| far past 30 included, and the
    gradient sigmoid(u) (times -beta) there too: no clamp applies to logistic unless one is asked for."""
    rng = torch.Generator().manual_seed(1)
    n = 400
    pc = (torch.rand(n, generator=rng, dtype=F64) * 600 - 700).requires_grad_(True)
    pr, rc, rr = (torch.rand(n, generator=rng, dtype=F64) * 600 - 700 for _ in range(3))
    sw, sl = (torch.randint(0, 2, (n,), generator=rng).to(F64) for _ in range(2))
    keep = ~((sw == 1) & (sl == 1)) if named == "safedpo" else torch.ones(n, dtype=torch.bool)
    delta = 30.0 if named == "safedpo" else 0.0
    beta = 0.1
    spec = TrainConfig(cache="-", out="-", **{**BASELINES["safedpo" if named == "safedpo" else "dpo-helpful"],
                                             "safety_penalty": delta}).loss_spec()
    assert (spec.clamp_lower, spec.clamp_upper) == (None, None)
    losses = spec_loss(spec, pc, pr, rc, rr, sw, sl)
    losses[keep].sum().backward()
    past = 0
    for i in torch.nonzero(keep).flatten().tolist():
        m = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        u = -(beta * m + delta * (sw[i].item() - sl[i].item()))
        past += abs(u) > 30
        assert losses[i].item() == pytest.approx(_independent_logistic(u), rel=1e-12, abs=1e-12)
        assert pc.grad[i].item() == pytest.approx(-beta / (1 + math.exp(-u)), rel=1e-12, abs=1e-300)
    assert past > 100  # the sample reaches far past the old bound of 30


@pytest.mark.parametrize("gen", GENS)
@pytest.mark.parametrize("C", [0.0, 10.0, 30.0, 50.0])
@pytest.mark.parametrize("bounds", [{}, {"clamp": 20.0}, {"clamp_lower": -25.0, "clamp_upper": 40.0}])
def test_public_bso_loss_equals_the_trainers_loss(gen, C, bounds):
    """`bso_loss` with its defaults gives what `train` computes (TrainConfig -> loss_spec -> spec_loss)
    for every generator, C and pair type, with and without explicit bounds: the C = 50 sba pair at
    step 0 (u = 50 under a raised upper bound of 60) included."""
    sw = torch.tensor([0, 0, 1, 1, float("nan"), 0, 0, 1], dtype=F64)
    sl = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0], dtype=F64)
    pc = torch.tensor([-40.0, -50.0, -30.0, -60.0, -20.0, -80.0, -55.0, -10.0], dtype=F64)
    pr = torch.tensor([-42.0, -50.0, -90.0, -61.0, -25.0, -20.0, -55.0, -400.0], dtype=F64)
    rc = torch.tensor([-41.0, -50.0, -35.0, -60.5, -19.0, -60.0, -55.0, -12.0], dtype=F64)
    rr = torch.tensor([-50.0] * 6 + [-55.0, -50.0], dtype=F64)
    try:
        cfg = TrainConfig(cache="-", out="-", generator=gen, safety_penalty=C, **bounds)
    except ConfigError as e:  # lsif past e^86 (upper bound 40, or 60 raised for C = 50): refused alike
        assert gen == "lsif" and "beyond what float32 holds" in str(e)
        with pytest.raises(ConfigError, match="beyond what float32 holds"):
            bso_loss(pc.float(), pr.float(), rc, rr, sw, sl, generator=gen, safety_penalty=C, **bounds)
        return
    trainer = spec_loss(cfg.loss_spec(), pc, pr, rc, rr, sw, sl)
    public = bso_loss(pc, pr, rc, rr, sw, sl, generator=gen, safety_penalty=C, **bounds)
    assert torch.equal(trainer, public)
    if gen == "sba" and C == 50.0 and not bounds:  # a safe-winner pair at step 0: u = +50 inside the raised bound
        assert public[6].item() == pytest.approx(closed_form("sba", 50.0) + 1 / (0.2 * 4.0), rel=1e-12)
        assert public[6].item() == pytest.approx(2.379e25, rel=1e-3)


def test_lsif_overflow_is_refused_alike_with_a_bound_that_itself_passes():
    with pytest.raises(ConfigError, match="lower --clamp-upper to at most 43") as e:
        bso_loss(*(torch.zeros(1, dtype=torch.float32) for _ in range(4)), generator="lsif", clamp_upper=60.0)
    assert "--lam" not in str(e.value) and "lambda" not in str(e.value)  # lsif has no lambda
    with pytest.raises(ConfigError, match="at most 43"):
        TrainConfig(cache="-", out="-", generator="lsif", clamp_upper=60.0)
    make_loss_spec("lsif", clamp_upper=43.0)  # the suggested bound is accepted


@pytest.mark.parametrize("gen", ["sba", "kliep", "ba"])
def test_pairs_within_the_caches_noise_of_a_bound_learn_as_online(gen):
    """Default recipe (C = 30 = the upper bound), policy = reference: online, m = 0 and every
    safe-winner pair sits exactly on the bound, where torch's clamp keeps the gradient. From a
    cache the margin carries ~1e-5 nats of float noise: every such pair must still get it, and with
    the value of the bound. A pair past the bound by more than the slack still gets none."""
    n = 16
    noise = torch.linspace(-1e-5, 1e-5, n, dtype=F64)  # the cache's noise in the margin
    pc = torch.full((n,), -50.0, dtype=F64, requires_grad=True)
    rc = (pc.detach() + noise).clone()
    pr = rr = torch.full((n,), -60.0, dtype=F64)
    sw, sl = torch.zeros(n, dtype=F64), torch.ones(n, dtype=F64)
    spec = TrainConfig(cache="-", out="-", generator=gen).loss_spec()
    assert spec.clamp_upper == 30.0
    losses = spec_loss(spec, pc, pr, rc, rr, sw, sl)
    losses.sum().backward()
    assert (pc.grad < 0).all(), pc.grad  # every safe winner pushed up
    on_bound = spec_loss(spec, rc.clone(), pr, rc, rr, sw, sl)  # exactly on the bound
    past = noise > 0  # m = -noise < 0: u = 30 - beta m just past the bound, valued at the bound
    assert past.sum() == n // 2 and torch.equal(losses.detach()[past], on_bound[past])
    d = pair_diagnostics(spec, pc, pr, rc, rr, sw, sl)
    assert not d["clamped"].any()
    x = (pc.detach() - 1.0).requires_grad_(True)  # u = 30.1: past the bound by more than the slack
    spec_loss(spec, x, pr, rc, rr, sw, sl).sum().backward()
    assert (x.grad == 0).all()


def test_pair_outcomes_define_accuracy_and_pair_type_once():
    """The one definition the training metrics and `bso-cache eval` share: ties are wrong, an
    unknown label makes a pair unlabelled and never a safety pair, the safe response may be either."""
    from bso_cache.losses import pair_outcomes
    from bso_cache.schemas import PAIR_TYPES

    nan = float("nan")
    margin = torch.tensor([1.0, 0.0, -2.0, 3.0, -1.0, 0.5], dtype=F64)
    cu = torch.tensor([0.0, 0.0, 1.0, 1.0, nan, 0.0], dtype=F64)
    ru = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], dtype=F64)
    o = pair_outcomes(margin, cu, ru)
    assert [PAIR_TYPES[i] for i in o["pair_type"].tolist()] == [
        "safe/unsafe", "safe/unsafe", "unsafe/safe", "unsafe/unsafe", "unlabelled", "safe/safe"]
    assert o["correct"].tolist() == [True, False, False, True, False, True]
    assert o["safety_differs"].tolist() == [True, True, True, False, False, False]
    assert o["safe_wins"].tolist() == [True, False, True, False, False, False]
    none = pair_outcomes(margin, None, None)
    assert set(none["pair_type"].tolist()) == {PAIR_TYPES.index("unlabelled")} and not none["safety_differs"].any()
