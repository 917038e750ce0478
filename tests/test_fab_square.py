"""FAB (Croce & Hein 2020b) and Square (Andriushchenko et al. 2020): exactness where the answer is
known in closed form, no gradients for Square, the attack contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attack_contract import batch, check_contract, digits_model, in_ball, robust_count
from robustfl_lib import APGD, FAB, Square, hyperplane_projection, square_fraction
from robustfl_lib.attacks.square import _eta, _pseudo_gaussian, _Windows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "attack",
    [
        FAB(0.2, steps=10, n_target_classes=2),
        FAB(0.2, targeted=False, steps=10, restarts=2),
        FAB(1.0, norm="l2", steps=10, n_target_classes=2, restarts=2, seed=4),
        FAB(0.2, steps=10, early_stop=False),
        Square(0.1, queries=50),
        Square(0.1, queries=50, loss="ce", p_init=0.3, seed=5),
    ],
    ids=["fab-t", "fab-restarts", "fab-l2", "fab-no-early-stop", "square", "square-ce"],
)
def test_contract(attack):
    check_contract(attack)


# ----------------------------------------------------------------------------- FAB's projection


def _random_problem(seed: int, n: int = 6, d: int = 9):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[:, 0] = 0.0  # a coordinate that cannot help
    point = torch.rand(n, d, generator=g, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    return w, c, 1 - point, point


@pytest.mark.parametrize("seed", range(4))
def test_linf_projection_is_the_linear_programs_optimum(seed):
    linprog = pytest.importorskip("scipy.optimize").linprog
    w, c, up, down = _random_problem(seed)
    delta = hyperplane_projection(w, c, up, down, "linf")
    for i in range(len(w)):
        d = w.shape[1]
        # variables (delta_1..d, t): minimize t with -t <= delta_j <= t, the box, w . delta = c
        cost = [0.0] * d + [1.0]
        a_ub = [[(1.0 if k == j else 0.0) for k in range(d)] + [-1.0] for j in range(d)]
        a_ub += [[(-1.0 if k == j else 0.0) for k in range(d)] + [-1.0] for j in range(d)]
        bounds = [(-float(down[i, j]), float(up[i, j])) for j in range(d)] + [(0, None)]
        lp = linprog(cost, A_ub=a_ub, b_ub=[0.0] * (2 * d), A_eq=[w[i].tolist() + [0.0]], b_eq=[float(c[i])], bounds=bounds)
        if lp.status == 0:
            assert float(delta[i].abs().max()) == pytest.approx(lp.fun, abs=1e-9)
            assert float(w[i] @ delta[i]) == pytest.approx(float(c[i]), abs=1e-9)
        else:  # infeasible: the whole room in the right direction
            assert lp.status == 2
            assert float((w[i] * c[i].sign()) @ delta[i]) < abs(float(c[i]))
        assert bool((delta[i] <= up[i] + 1e-12).all() and (delta[i] >= -down[i] - 1e-12).all())


@pytest.mark.parametrize("seed", range(4))
def test_l2_projection_solves_the_kkt_conditions(seed):
    w, c, up, down = _random_problem(seed)
    delta = hyperplane_projection(w, c, up, down, "l2")
    for i in range(len(w)):
        # Independent: the KKT form delta_j = clip(lam * w_j, -down_j, up_j), with w . delta(lam)
        # nondecreasing in lam over the real line; bisection for w . delta(lam) = c.
        reach = lambda lam: float(w[i] @ torch.clamp(lam * w[i], -down[i], up[i]))
        lo, hi = -1e6, 1e6
        if not reach(lo) <= float(c[i]) <= reach(hi):
            continue  # the box does not reach the hyperplane
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if reach(mid) < float(c[i]) else (lo, mid)
        expected = torch.clamp(hi * w[i], -down[i], up[i])
        assert torch.allclose(delta[i], expected, atol=1e-9)
        assert float(w[i] @ delta[i]) == pytest.approx(float(c[i]), abs=1e-9)


# ----------------------------------------------------------------------------- FAB on a linear model


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_fab_finds_the_distance_to_the_closest_hyperplane(norm, targeted):
    torch.manual_seed(0)
    model = nn.Linear(10, 4).double()
    x = (0.45 + 0.1 * torch.rand(8, 10, dtype=torch.float64))
    with torch.no_grad():
        y = model(x).argmax(1)
        z = model(x)
        w = model.weight
        rows = torch.arange(8)
        gaps = (z[rows, y][:, None] - z)  # f_y - f_j >= 0
        dual = (w[None] - w[y][:, None]).abs().sum(2) if norm == "linf" else (w[None] - w[y][:, None]).norm(dim=2)
        dist = (gaps / dual).scatter(1, y[:, None], float("inf")).amin(1)
    # The box does not bind: no coordinate of the minimal step moves more than its norm, < 0.4.
    assert float(dist.max()) < 0.4
    fab = FAB(10.0, norm=norm, targeted=targeted, n_target_classes=3, steps=100, early_stop=False)
    x_adv = fab(model, x, y)
    delta = (x_adv - x).flatten(1)
    found = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    with torch.no_grad():
        assert bool((model(x_adv).argmax(1) != y).all())
    # On a linear model the linearization is exact and every step is along the minimal step
    # delta*: the iterate is x + r delta*, and FAB's update is a recursion in r alone.
    r, best = 0.0, float("inf")
    for _ in range(fab.steps):
        alpha = min((1 - r) / ((1 - r) + 1), fab.alpha_max)
        r = (1 - alpha) * (r + fab.eta * (1 - r)) + alpha * fab.eta
        if r > 1:
            best, r = min(best, r), fab.beta * r
    assert 1 < best < 1.01
    assert bool((found >= dist * (1 - 1e-9)).all())  # nothing beats the minimal distance
    if targeted:  # a run towards another target may cross a third class's boundary a little earlier
        assert bool((found <= best * dist * (1 + 1e-9)).all()), found / dist
    else:
        assert torch.allclose(found / dist, torch.full_like(dist, best), rtol=1e-9), found / dist


def test_fab_returns_x_where_nothing_is_within_eps():
    torch.manual_seed(0)
    model = nn.Linear(10, 4)
    x = 0.45 + 0.1 * torch.rand(8, 10)
    y = model(x).argmax(1)
    assert torch.equal(FAB(1e-4, targeted=False)(model, x, y), x)


def test_fab_t_agrees_with_apgd_on_a_trained_model():
    model, data = digits_model()
    x, y = data.x_test[:150], data.y_test[:150]
    fab = robust_count(model, FAB(0.1, steps=50, n_target_classes=3)(model, x, y), y)
    apgd = robust_count(model, APGD(0.1, steps=50)(model, x, y), y)
    clean = robust_count(model, x, y)
    assert fab <= apgd + 0.03 * len(x) and fab < clean - 0.2 * len(x), (clean, apgd, fab)


def test_fab_t_targets_batched_together_change_no_run():
    # target_batch=1 runs FAB-T's targets one after another; by default they are one batch of
    # (points x targets) rows. A run's iterates do not depend on the best point found so far, so the
    # same points are found within eps; without early stopping every run goes to the end and the
    # closest point over all runs (ties: the first target) is the same one.
    model, data = digits_model()
    x, y = data.x_test[:100], data.y_test[:100]
    masks, outs = [], {}
    for early in (True, False):
        for b in (1, 2, None):
            out = FAB(0.03, steps=12, n_target_classes=3, early_stop=early, target_batch=b)(model, x, y)
            outs[early, b] = out
            assert in_ball(out, x, 0.03, "linf")
            with torch.no_grad():
                masks.append(model(out).argmax(1) == y)
    assert 10 < int(masks[0].sum()) < 90, int(masks[0].sum())
    assert all(torch.equal(m, masks[0]) for m in masks)
    assert torch.equal(outs[False, 1], outs[False, None]) and torch.equal(outs[False, 1], outs[False, 2])
    # Without early stopping the result is the minimal perturbation found: it must not change either.
    big = [FAB(1.0, steps=12, n_target_classes=3, early_stop=False, target_batch=b)(model, x, y) for b in (1, None)]
    assert torch.equal(big[0], big[1])


# ----------------------------------------------------------------------------- Square


class NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("backward was called")


class Watched(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.grad_enabled: list[bool] = []

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.inner(NoBackward.apply(x))


def test_square_takes_no_gradient():
    model, data = digits_model()
    watched = Watched(model)
    x, y = data.x_test[:60], data.y_test[:60]
    x_adv = Square(0.1, queries=200)(watched, x, y)
    assert watched.grad_enabled and not any(watched.grad_enabled)
    assert robust_count(model, x_adv, y) < robust_count(model, x, y)
    with pytest.raises(AssertionError, match="backward"):
        APGD(0.1, steps=2)(watched, x, y)


def test_square_is_strong_on_a_trained_model():
    model, data = digits_model()
    x, y = data.x_test[:200], data.y_test[:200]
    square = robust_count(model, Square(0.1, queries=1000)(model, x, y), y)
    apgd = robust_count(model, APGD(0.1, steps=50)(model, x, y), y)
    assert square <= apgd + 0.05 * len(x), (square, apgd)


def test_square_on_images_and_rows():
    for shape in [(3, 6, 6), (6, 6), (17,)]:
        x, y = batch(shape)
        d = torch.tensor(shape).prod().item()
        model = nn.Sequential(nn.Flatten(), nn.Linear(d, 5))
        x_adv = Square(0.05, queries=30)(model, x, y)
        assert in_ball(x_adv, x, 0.05, "linf") and x_adv.shape == x.shape


def test_square_fraction_schedule():
    assert square_fraction(0, 5000, 0.8) == 0.8
    assert square_fraction(5, 5000, 0.8) == 0.8  # 10 of 10,000
    assert square_fraction(6, 5000, 0.8) == 0.4
    assert square_fraction(4999, 5000, 0.8) == 0.8 / 512
    assert square_fraction(100, 1000, 0.5) == 0.5 / 16  # 1000 of 10,000: the fifth period


@pytest.mark.parametrize(
    "make",
    [
        lambda: FAB(-1.0),
        lambda: FAB(0.1, norm="l1"),
        lambda: FAB(0.1, steps=0),
        lambda: FAB(0.1, alpha_max=2.0),
        lambda: FAB(0.1, eta=0.5),
        lambda: FAB(0.1, beta=0.0),
        lambda: FAB(0.1, n_target_classes=0),
        lambda: FAB(0.1, target_batch=0),
        lambda: Square(0.1, norm="l1"),
        lambda: Square(0.1, queries=0),
        lambda: Square(0.1, p_init=0.0),
        lambda: Square(0.1, loss="dlr"),
        lambda: hyperplane_projection(torch.ones(1, 2), torch.ones(1), torch.ones(1, 2), torch.ones(1, 2), "l1"),
    ],
)
def test_bad_settings(make):
    with pytest.raises(ValueError):
        make()


def test_bad_types():
    with pytest.raises(TypeError):
        FAB(0.1, targeted="yes")
    with pytest.raises(TypeError):
        Square(0.1, seed=1.5)


# ----------------------------------------------------------------------------- Square, l2


def _eta_by_rectangles(a: int, b: int) -> torch.Tensor:
    """The paper's construction written out: add 1 / (k + 1)^2 on the rectangle of half-size k around
    the centre, for k = 0 .. max(a // 2, b // 2), then normalize."""
    out = torch.zeros(a, b, dtype=torch.float64)
    for k in range(max(a // 2, b // 2) + 1):
        out[max(a // 2 - k, 0): a // 2 + k + 1, max(b // 2 - k, 0): b // 2 + k + 1] += 1.0 / (k + 1) ** 2
    return out / out.norm()


@pytest.mark.parametrize("a, b", [(1, 1), (2, 5), (3, 7), (4, 4), (6, 3)])
def test_l2_bumps_are_the_nested_rectangles(a, b):
    assert torch.allclose(_eta(a, b), _eta_by_rectangles(a, b), rtol=1e-12, atol=0)
    g = _pseudo_gaussian(a, b)
    long_side = g if a >= b else g.t()
    half = long_side.shape[0] // 2
    assert g.norm().item() == pytest.approx(1.0, rel=1e-12)
    assert bool((long_side[:half] > 0).all()) and bool((long_side[half:] < 0).all())


def _l2_proposal_by_hand(best, x, eps, sh, sw, u, bounds=(0.0, 1.0)):
    """One l2 Square proposal per example with explicit window slices, in float64 (the paper's update:
    window 1 gets a fresh bump plus its old direction, rescaled to carry the mass of both windows;
    window 2 is emptied; the whole perturbation goes back to norm eps)."""
    n, c, h, w = best.shape
    out = torch.empty_like(best)
    for i in range(n):
        t1, l1 = int(u[i, 0] * (h - sh + 1)), int(u[i, 1] * (w - sw + 1))
        t2, l2 = int(u[i, 2] * (h - sh + 1)), int(u[i, 3] * (w - sw + 1))
        bump = _pseudo_gaussian(sh, sw)
        if sh == sw and u[i, 4] < 0.5:
            bump = bump.t()
        delta = best[i] - x[i]
        union = torch.zeros(h, w, dtype=torch.bool)
        union[t1:t1 + sh, l1:l1 + sw] = True
        union[t2:t2 + sh, l2:l2 + sw] = True
        total = float((delta ** 2).sum())
        new = delta.clone()
        for ch in range(c):
            win = delta[ch, t1:t1 + sh, l1:l1 + sw]
            sign = -1.0 if u[i, 5 + ch] < 0.5 else 1.0
            fresh = sign * bump + win / max(float(win.norm()), 1e-12)
            mass = max(eps ** 2 - total, 0.0) / c + float((delta[ch][union] ** 2).sum())
            new[ch][union] = 0.0
            new[ch, t1:t1 + sh, l1:l1 + sw] = fresh / float(fresh.norm()) * mass ** 0.5
        out[i] = (x[i] + eps * new / float(new.norm())).clamp(*bounds)
    return out


def test_l2_proposal_is_the_papers_update():
    g = torch.Generator().manual_seed(1)
    n, c, h, w, eps = 7, 2, 9, 8, 1.5
    x = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    start = (x + 0.3 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64)).clamp(0, 1)
    square = Square(eps, norm="l2")
    for sh, sw in [(3, 3), (5, 5), (3, 8)]:
        windows = _Windows(h, w, sh, sw, x)
        got = square._l2_candidate(start, x, n, c, sh, sw, windows, torch.Generator().manual_seed(5))
        u = torch.rand((n, 5 + c), generator=torch.Generator().manual_seed(5), dtype=x.dtype)
        assert torch.allclose(got, _l2_proposal_by_hand(start, x, eps, sh, sw, u), rtol=0, atol=1e-12), (sh, sw)


def test_square_l2_stays_on_the_sphere_and_breaks_points():
    # Away from the box's faces nothing is clipped: every iterate has norm exactly eps.
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    x = 0.4 + 0.2 * torch.rand(30, 3, 4, 4, generator=g)
    y = torch.randint(0, 5, (30,), generator=g)
    x_adv = Square(0.05, norm="l2", queries=40)(model, x, y)
    norms = (x_adv.double() - x.double()).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 0.05), rtol=1e-5), norms
    check_contract(Square(0.6, norm="l2", queries=25))
    for shape in [(6, 6), (17,)]:
        xs, ys = batch(shape)
        flat = nn.Sequential(nn.Flatten(), nn.Linear(torch.tensor(shape).prod().item(), 5))
        assert in_ball(Square(0.4, norm="l2", queries=20)(flat, xs, ys), xs, 0.4, "l2")
    # On the digits MLP it breaks points, more with a larger budget, no gradient taken.
    model, data = digits_model()
    watched = Watched(model)
    x, y = data.x_test[:100], data.y_test[:100]
    clean = robust_count(model, x, y)
    counts = [robust_count(model, Square(e, norm="l2", queries=300)(watched, x, y), y) for e in (0.5, 1.5)]
    assert not any(watched.grad_enabled)
    assert counts[1] < counts[0] < clean and counts[1] < 0.5 * clean, (clean, counts)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_square_windows_without_the_table_are_the_same_search(monkeypatch, norm, eps):
    """Past a size cap the table of every window is not built and each query forms its windows from
    the row and column tables: the same draws must give the same search, bit for bit."""
    import robustfl_lib.attacks.square as square

    model, data = digits_model()
    colour = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 5))
    for net, (x, y) in ((model, (data.x_test[:60], data.y_test[:60])), (colour, batch((3, 6, 6), n=40))):
        attack = Square(eps, norm=norm, queries=300, seed=3)
        monkeypatch.setattr(square, "_WINDOW_TABLE_ELEMENTS", 2**24)
        with_table = attack(net, x, y)
        monkeypatch.setattr(square, "_WINDOW_TABLE_ELEMENTS", 0)
        without = attack(net, x, y)
        assert torch.equal(with_table, without)
        assert robust_count(net, with_table, y) < robust_count(net, x, y)
