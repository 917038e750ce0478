"""Gowal et al.'s small CNN and Shi et al.'s IBP initialisation: shapes, soundness of both bounds on
the CNN, the initialisation's law, the bound growth it prevents, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustfl_lib import GowalSmallCNN, crown_ibp_bounds, ibp_bounds, ibp_init, margin_bounds
from robustfl_lib.certified.bounds import _ibp, bound_layers, input_box

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gowal_small_cnn_shapes():
    net = GowalSmallCNN((1, 28, 28), 10)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (16, (4, 4), (2, 2), (0, 0)), (32, (4, 4), (1, 1), (0, 0))]
    # 28 -> 13 (stride 2) -> 10: 32 * 10 * 10 features into the 100-unit layer (Gowal et al. 2018, table 1)
    assert [(m.in_features, m.out_features) for m in linears] == [(3200, 100), (100, 10)]
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert GowalSmallCNN((3, 10, 11), 4)(torch.rand(1, 3, 10, 11)).shape == (1, 4)


@pytest.mark.parametrize("init", ["default", "ibp"])
@pytest.mark.parametrize("eps", [0.02, 0.3])
def test_bounds_on_gowal_small_cnn_contain_samples(init, eps):
    torch.manual_seed(1)
    net = GowalSmallCNN((1, 12, 12), 5, channels=(4, 6), hidden=8)
    if init == "ibp":
        ibp_init(net, torch.Generator().manual_seed(1))
    x, y = torch.rand(3, 1, 12, 12), torch.tensor([0, 3, 4])
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    pts = lo + (hi - lo) * torch.rand(400, *x.shape)
    pts = torch.cat([pts, torch.where(torch.rand(400, *x.shape) < 0.5, lo, hi)])  # random corners too
    with torch.no_grad():
        z = net(pts.flatten(0, 1)).view(len(pts), 3, 5)
    for zl, zh in (ibp_bounds(net, x, eps), crown_ibp_bounds(net, x, eps)):
        assert (z - zh).max() <= 1e-5 and (zl - z).max() <= 1e-5
    true_margin = z.gather(2, y.view(1, 3, 1).expand(len(pts), 3, 1)) - z
    for method in ("ibp", "crown-ibp"):
        assert (margin_bounds(net, x, y, eps, method) - true_margin.min(0).values).max() <= 1e-5


def test_ibp_init_law():
    net = nn.Sequential(nn.Conv2d(3, 64, 5), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4 * 4, 300))
    ibp_init(net, torch.Generator().manual_seed(0))
    for m, fan_in in ((net[0], 3 * 25), (net[3], 1024)):
        w = m.weight.detach().flatten()
        sigma = math.sqrt(2 * math.pi) / fan_in
        # sample std within 3% of sigma (n >= 4800 draws: its relative SE is about 1%), mean near 0
        assert abs(w.std().item() / sigma - 1) < 0.03
        assert abs(w.mean().item()) < 4 * sigma / math.sqrt(w.numel())
        assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_ibp_init_is_seeded_and_in_place():
    a, b = GowalSmallCNN((1, 28, 28), 10), GowalSmallCNN((1, 28, 28), 10)
    assert ibp_init(a, torch.Generator().manual_seed(5)) is a
    ibp_init(b, torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    ibp_init(b, torch.Generator().manual_seed(6))
    assert not torch.equal(a[0].weight, b[0].weight)


def _mean_radius_growth(net, eps=0.1):
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25  # box not clipped
    lo, hi = input_box(x, eps)
    with torch.no_grad():
        z_lo, z_hi, _ = _ibp(bound_layers(net), lo, hi, None)
    return float(((z_hi - z_lo) / 2).mean()) / eps


def test_ibp_init_keeps_the_bounds_from_exploding():
    """Shi et al. 2021: with sigma = sqrt(2 pi) / fan-in each affine + ReLU block keeps the mean
    IBP radius; the default init multiplies it by a large factor over four affine layers."""
    torch.manual_seed(0)
    default = GowalSmallCNN((1, 28, 28), 10)
    ibp = ibp_init(GowalSmallCNN((1, 28, 28), 10), torch.Generator().manual_seed(0))
    g_default, g_ibp = _mean_radius_growth(default), _mean_radius_growth(ibp)
    assert 0.5 < g_ibp < 4, g_ibp  # the ReLUs halve, the affine layers double: about 2 at the logits
    assert g_default > 20 * g_ibp, (g_default, g_ibp)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="H, W >= 10"):
        GowalSmallCNN((1, 9, 28), 10)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        GowalSmallCNN((784,), 10)
    with pytest.raises(ValueError, match="num_classes"):
        GowalSmallCNN((1, 28, 28), 1)
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        ibp_init(nn.Sequential(nn.ReLU()))
