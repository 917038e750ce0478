"""IBP and CROWN-IBP bounds: soundness on samples and corners, exactness where it holds, the
documented counterexample, bad layers and inputs, devices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from robustfl_lib import MLP, SmallCNN, crown_ibp_bounds, ibp_bounds, margin_bounds

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def mlp(seed: int, sizes=(3, 8, 6, 4)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def tiny_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2, stride=1), nn.Dropout(0.3),
        nn.Flatten(), nn.Identity(), nn.Linear(5, 3),
    )
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 2.0)
    net[1].weight.data.uniform_(0.5, 1.5)
    net[1].bias.data.uniform_(-0.1, 0.1)
    return net.eval()


def box_samples(x: torch.Tensor, eps: float, n: int, corners: bool, seed: int = 0) -> torch.Tensor:
    """(n [+ 2^d], N, ...) points of the box: uniform samples, and all its corners when asked."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    pts = [lo + (hi - lo) * torch.rand(n, *x.shape, generator=g, dtype=x.dtype)]
    if corners:
        d = x[0].numel()
        bits = torch.tensor(list(itertools.product((0.0, 1.0), repeat=d)), dtype=x.dtype).view(-1, 1, *x.shape[1:])
        pts.append(lo + (hi - lo) * bits)
    return torch.cat(pts)


def outputs(net: nn.Module, pts: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(pts.reshape(-1, *pts.shape[2:])).reshape(pts.shape[0], pts.shape[1], -1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [0.0, 0.03, 0.3])
def test_mlp_bounds_contain_samples_and_corners(seed, eps):
    net = mlp(seed, sizes=(4, 10, 7, 5)) if seed % 2 else mlp(seed)
    d = net[0].in_features
    x = torch.rand(6, d, generator=torch.Generator().manual_seed(seed))
    z = outputs(net, box_samples(x, eps, 3000, corners=True, seed=seed))
    y = torch.arange(6) % z.shape[-1]
    true_margin = z.gather(2, y.view(1, -1, 1).expand(z.shape[0], -1, 1)) - z
    for lo, hi in (ibp_bounds(net, x, eps), crown_ibp_bounds(net, x, eps)):
        assert (z - hi).max() <= 1e-6 and (lo - z).max() <= 1e-6
    for method in ("ibp", "crown-ibp"):
        m = margin_bounds(net, x, y, eps, method)
        assert (m - true_margin.min(0).values).max() <= 1e-6
        assert torch.equal(m.gather(1, y[:, None]), torch.zeros(6, 1))


@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_cnn_bounds_contain_samples(eps):
    """Conv (padding, stride), eval BatchNorm, max- and average-pooling, eval Dropout, Identity."""
    net = tiny_cnn(1)
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    z = outputs(net, box_samples(x, eps, 2000, corners=False))
    y = torch.tensor([0, 1, 2, 0])
    true_margin = z.gather(2, y.view(1, -1, 1).expand(z.shape[0], -1, 1)) - z
    for lo, hi in (ibp_bounds(net, x, eps), crown_ibp_bounds(net, x, eps)):
        assert (z - hi).max() <= 1e-6 and (lo - z).max() <= 1e-6
        assert (hi - lo).min() > 0  # not a degenerate (dead) network: the check has something to check
    for method in ("ibp", "crown-ibp"):
        assert (margin_bounds(net, x, y, eps, method) - true_margin.min(0).values).max() <= 1e-6


def test_library_models_are_bounded():
    """The book's MLP and SmallCNN (max-pooling, no BatchNorm) are sound too."""
    nets = ((MLP((1, 4, 4), 3, hidden=(8,)), (1, 4, 4)), (SmallCNN((1, 8, 8), 3, channels=(3, 4)), (1, 8, 8)))
    for net, shape in nets:
        torch.manual_seed(0)
        x = torch.rand(3, *shape)
        z = outputs(net, box_samples(x, 0.05, 1000, corners=False))
        for lo, hi in (ibp_bounds(net, x, 0.05), crown_ibp_bounds(net, x, 0.05)):
            assert (z - hi).max() <= 1e-6 and (lo - z).max() <= 1e-6


def test_single_linear_layer_is_exact_for_both():
    """For one affine map over a box the bound is the closed form W+ lo + W- hi + b, attained at a corner."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3)).double()
    x = torch.rand(4, 5, dtype=torch.float64)
    eps = 0.2
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    w, b = net[0].weight, net[0].bias
    exact_lo = lo @ w.clamp(min=0).T + hi @ w.clamp(max=0).T + b
    exact_hi = hi @ w.clamp(min=0).T + lo @ w.clamp(max=0).T + b
    corners = outputs(net, box_samples(x, eps, 0, corners=True))
    assert torch.allclose(corners.min(0).values, exact_lo, atol=1e-12)
    for got_lo, got_hi in (ibp_bounds(net, x, eps), crown_ibp_bounds(net, x, eps)):
        assert torch.allclose(got_lo, exact_lo, atol=1e-12) and torch.allclose(got_hi, exact_hi, atol=1e-12)


def test_deep_linear_network_crown_exact_ibp_looser():
    """Without ReLUs the network is affine: CROWN is exact, IBP (layer by layer) is not."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)).double()
    x = torch.rand(5, 4, dtype=torch.float64)
    eps = 0.1
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    w = net[1].weight @ net[0].weight
    b = net[1].weight @ net[0].bias + net[1].bias
    exact_lo = lo @ w.clamp(min=0).T + hi @ w.clamp(max=0).T + b
    exact_hi = hi @ w.clamp(min=0).T + lo @ w.clamp(max=0).T + b
    c_lo, c_hi = crown_ibp_bounds(net, x, eps)
    i_lo, i_hi = ibp_bounds(net, x, eps)
    assert torch.allclose(c_lo, exact_lo, atol=1e-12) and torch.allclose(c_hi, exact_hi, atol=1e-12)
    assert (i_lo <= exact_lo + 1e-12).all() and (i_hi >= exact_hi - 1e-12).all()
    assert ((i_hi - i_lo) - (exact_hi - exact_lo)).max() > 1e-3


def _exact_extremes_2d(w1, b1, w2, b2, lo, hi):
    """Exact min and max over a 2-D box of x -> W2 relu(W1 x + b1) + b2 (float64): a piecewise
    affine function takes its extremes at vertices of its pieces, which lie among the box's
    corners, the hidden units' lines crossing the box's edges and the lines' pairwise crossings."""
    cands = [np.array([a, c]) for a in (lo[0], hi[0]) for c in (lo[1], hi[1])]
    for w, b in zip(w1, b1):
        for axis in (0, 1):
            for v in (lo[axis], hi[axis]):
                other = 1 - axis
                if abs(w[other]) > 1e-15:
                    p = np.empty(2)
                    p[axis], p[other] = v, -(b + w[axis] * v) / w[other]
                    cands.append(p)
    for (wa, ba), (wb, bb) in itertools.combinations(zip(w1, b1), 2):
        mat = np.stack([wa, wb])
        if abs(np.linalg.det(mat)) > 1e-12:
            cands.append(np.linalg.solve(mat, -np.array([ba, bb])))
    pts = np.array([p for p in cands if np.all(p >= lo - 1e-12) and np.all(p <= hi + 1e-12)]).clip(lo, hi)
    vals = np.maximum(pts @ w1.T + b1, 0) @ w2.T + b2
    return vals.min(0), vals.max(0)


@pytest.mark.parametrize("seed", range(6))
def test_tiny_relu_network_against_exact_brute_force(seed):
    """2-3-2 ReLU network: both bounds contain the exact range (vertex enumeration), which a fine
    grid confirms from inside; IBP of the hidden layer alone (Linear -> ReLU) is exact."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = torch.rand(1, 2, dtype=torch.float64)
    eps = 0.25
    lo, hi = ((x - eps).clamp(0, 1)[0].numpy(), (x + eps).clamp(0, 1)[0].numpy())
    w1, b1, w2, b2 = (t.detach().numpy() for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    ex_lo, ex_hi = _exact_extremes_2d(w1, b1, w2, b2, lo, hi)
    g = np.stack(np.meshgrid(np.linspace(lo[0], hi[0], 201), np.linspace(lo[1], hi[1], 201)), -1).reshape(-1, 2)
    grid = np.maximum(g @ w1.T + b1, 0) @ w2.T + b2
    assert np.all(grid.min(0) >= ex_lo - 1e-12) and np.all(grid.max(0) <= ex_hi + 1e-12)
    assert np.all(grid.min(0) - ex_lo < 0.05)  # the enumeration is not just some lower number
    for got_lo, got_hi in (ibp_bounds(net, x, eps), crown_ibp_bounds(net, x, eps)):
        got_lo, got_hi = got_lo[0].detach().numpy(), got_hi[0].detach().numpy()
        assert np.all(got_lo <= ex_lo + 1e-12) and np.all(got_hi >= ex_hi - 1e-12)
    h_lo, h_hi = ibp_bounds(net[:2], x, eps)
    gh = np.maximum(g @ w1.T + b1, 0)
    h_ex_lo = np.maximum(np.minimum(lo * w1, hi * w1).sum(1) + b1, 0)
    h_ex_hi = np.maximum(np.maximum(lo * w1, hi * w1).sum(1) + b1, 0)
    assert np.allclose(h_lo[0].detach().numpy(), h_ex_lo, atol=1e-12)
    assert np.allclose(h_hi[0].detach().numpy(), h_ex_hi, atol=1e-12)
    assert np.allclose(gh.min(0), h_ex_lo, atol=1e-12) and np.allclose(gh.max(0), h_ex_hi, atol=1e-12)


def test_crown_at_least_as_tight_when_every_relu_is_stable():
    """If no ReLU is unstable under the IBP bounds the network is affine on the box, CROWN is exact
    there, hence never looser than IBP on any coordinate."""
    net = mlp(3, sizes=(6, 12, 10, 4)).double()
    x = torch.rand(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    def stable(eps: float) -> bool:  # every hidden pre-activation keeps its sign over the box
        return all(((lo > 0) | (hi < 0)).all() for lo, hi in (ibp_bounds(net[:k], x, eps) for k in (1, 3)))

    eps = next(e for e in (10.0 ** -k for k in range(3, 12)) if stable(e))
    i_lo, i_hi = ibp_bounds(net, x, eps)
    c_lo, c_hi = crown_ibp_bounds(net, x, eps)
    assert (c_lo >= i_lo - 1e-12).all() and (c_hi <= i_hi + 1e-12).all()
    assert ((c_lo - i_lo).max() > 0) and ((i_hi - c_hi).max() > 0)  # strictly tighter somewhere


def test_crown_ibp_can_be_looser_than_ibp():
    """The documented counterexample: relu(3x - 1) on x in [0, 1]; the pre-activation is in
    [-1, 2], u > -l, so the adaptive lower line is relu(z) >= z, whose minimum is -1, while IBP
    says relu(z) >= 0."""
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        net[0].weight.fill_(3.0), net[0].bias.fill_(-1.0), net[2].weight.fill_(1.0), net[2].bias.fill_(0.0)
    x = torch.tensor([[0.5]])
    assert ibp_bounds(net, x, 0.5)[0].item() == 0.0
    assert crown_ibp_bounds(net, x, 0.5)[0].item() == pytest.approx(-1.0, abs=1e-6)
    # and the upper line u(z - l)/(u - l) gives 2 at z = 2: both upper bounds are the exact 2
    assert crown_ibp_bounds(net, x, 0.5)[1].item() == pytest.approx(2.0, abs=1e-6)


def test_crown_ibp_margins_tighter_on_average_on_this_random_mlp():
    """A measurement on one seeded, untrained network at a small eps (not a theorem, see above)."""
    net = mlp(0, sizes=(16, 32, 32, 10))
    x = torch.rand(64, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(64) % 10
    ibp, crown = margin_bounds(net, x, y, 0.02, "ibp"), margin_bounds(net, x, y, 0.02, "crown-ibp")
    assert crown.mean() > ibp.mean()


def test_margin_elision_at_least_as_tight_as_logit_difference():
    """IBP's margin with the last layer elided is never below l_y - u_j from the logit bounds."""
    net = mlp(2, sizes=(5, 9, 4))
    x = torch.rand(10, 5, generator=torch.Generator().manual_seed(2))
    y = torch.arange(10) % 4
    lo, hi = ibp_bounds(net, x, 0.1)
    naive = lo.gather(1, y[:, None]) - hi
    m = margin_bounds(net, x, y, 0.1, "ibp")
    off = torch.ones_like(m, dtype=torch.bool).scatter(1, y[:, None], False)
    assert (m[off] >= naive[off] - 1e-6).all() and (m[off] - naive[off]).max() > 1e-3


def test_margins_of_a_network_not_ending_in_linear():
    """Without a last Linear layer to elide, IBP's margin is l_y - u_j from the logit bounds (0 at y)."""
    net = nn.Sequential(*mlp(4, sizes=(3, 8, 4)), nn.ReLU(), nn.Identity())
    x = torch.rand(6, 3, generator=torch.Generator().manual_seed(4))
    y = torch.arange(6) % 4
    lo, hi = ibp_bounds(net, x, 0.1)
    m = margin_bounds(net, x, y, 0.1, "ibp")
    want = (lo.gather(1, y[:, None]) - hi).scatter(1, y[:, None], 0.0)
    assert torch.allclose(m, want, atol=1e-7)
    z = outputs(net, box_samples(x, 0.1, 2000, corners=True))
    true_margin = z.gather(2, y.view(1, -1, 1).expand(z.shape[0], -1, 1)) - z
    for method in ("ibp", "crown-ibp"):
        assert (margin_bounds(net, x, y, 0.1, method) - true_margin.min(0).values).max() <= 1e-6


def test_eps_zero_gives_the_logits():
    net = tiny_cnn(0)
    x = torch.rand(3, 1, 6, 6)
    with torch.no_grad():
        z = net(x)
    for lo, hi in (ibp_bounds(net, x, 0.0), crown_ibp_bounds(net, x, 0.0)):
        assert torch.allclose(lo, z, atol=1e-5) and torch.allclose(hi, z, atol=1e-5)


def test_params_override_and_gradients():
    """``params`` bounds the model with other weights (as functional_call runs it); the bounds are
    differentiable in the weights (what certified training needs)."""
    net, other = mlp(0), mlp(1)
    x = torch.rand(4, 3)
    params = dict(other.named_parameters())
    for fn in (ibp_bounds, crown_ibp_bounds):
        a, b = fn(net, x, 0.1, params=params), fn(other, x, 0.1)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        lo, hi = fn(net, x, 0.1)
        (hi - lo).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in net.parameters() if p.ndim == 2)
        net.zero_grad()


class Custom(nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize("layer,name", [(nn.Tanh(), "Tanh"), (Custom(), "Custom"), (nn.Conv1d(1, 1, 1), "Conv1d")])
def test_unsupported_layers_raise_naming_the_layer(layer, name):
    net = nn.Sequential(nn.Linear(3, 3), layer, nn.Linear(3, 2))
    for fn in (ibp_bounds, crown_ibp_bounds):
        with pytest.raises(TypeError, match=rf"layer 1 \({name}\)"):
            fn(net, torch.rand(2, 3), 0.1)


def test_train_mode_batchnorm_and_dropout_raise():
    net = tiny_cnn(0).train()
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm2d\) is in train mode"):
        ibp_bounds(net, torch.rand(2, 1, 6, 6), 0.1)
    drop = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="Dropout"):
        crown_ibp_bounds(drop, torch.rand(2, 3), 0.1)
    drop.eval()
    crown_ibp_bounds(drop, torch.rand(2, 3), 0.1)


def test_bad_inputs_raise():
    net = mlp(0)
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="eps"):
        ibp_bounds(net, x, -0.1)
    with pytest.raises(ValueError, match="eps"):
        ibp_bounds(net, x, float("nan"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        crown_ibp_bounds(net, x + 1.5, 0.1)
    with pytest.raises(ValueError, match="method"):
        margin_bounds(net, x, torch.tensor([0, 1]), 0.1, "lp")
    with pytest.raises(ValueError, match="labels"):
        margin_bounds(net, x, torch.tensor([0, 4]), 0.1)
    with pytest.raises(TypeError, match="floating"):
        ibp_bounds(net, torch.ones(2, 3, dtype=torch.long), 0.1)
    odd = type("Odd", (nn.Sequential,), {"forward": lambda self, t: t})  # a Sequential that skips its layers
    with pytest.raises(TypeError, match="own forward"):
        ibp_bounds(odd(nn.Linear(3, 2)), x, 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_bounds_follow_the_device(device):
    net = tiny_cnn(2).to(device)
    x = torch.rand(3, 1, 6, 6).to(device)
    y = torch.tensor([0, 1, 2], device=device)
    for fn in (ibp_bounds, crown_ibp_bounds):
        lo, hi = fn(net, x, 0.05)
        assert lo.device.type == device and hi.device.type == device
        ref = fn(net.cpu(), x.cpu(), 0.05)
        net.to(device)
        assert torch.allclose(lo.cpu(), ref[0], atol=1e-5) and torch.allclose(hi.cpu(), ref[1], atol=1e-5)
    assert margin_bounds(net, x, y, 0.05, "crown-ibp").device.type == device


def test_input_box_contains_the_real_ball():
    """Each end is rounded outward: in exact (rational) arithmetic lo <= max(x - eps, 0) and
    hi >= min(x + eps, 1), and by at most two ulps."""
    from fractions import Fraction

    from robustfl_lib.certified import input_box

    x = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    for eps in (0.1, 0.3, 1 / 3, 0.05):
        lo, hi = input_box(x, eps)
        e = Fraction(eps)
        for xi, li, hi_ in zip(x.tolist(), lo.tolist(), hi.tolist()):
            assert Fraction(li) <= max(Fraction(xi) - e, 0) and Fraction(hi_) >= min(Fraction(xi) + e, 1)
        inside = (x + eps < 1)
        ulp = torch.nextafter(hi, torch.full_like(hi, 2.0)) - hi
        assert inside.any() and ((hi - (x + eps)).abs() <= 2 * ulp)[inside].all()
