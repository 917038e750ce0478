"""CIFAR-sized models (CifarCNN, ResNet-8/20/18) and BatchNorm in the federated loop: the running
statistics after a round are the rule applied to the clients' statistics, the integer counters stay
aside, BatchNorm models fall back from the vectorized path, and a ResNet-8 trains on CPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from robustfl_lib import (CifarCNN, Dataset, FLConfig, ResNet, build_model, flatten_state, get_aggregator,
                          run_federated, run_grid, sgd_client_update, state_slices, train_stacked)
from robustfl_lib.byzantine import ByzantineAttack
from robustfl_lib.federated import _stackable


def synthetic_cifar(n_train=50, n_test=40, seed=0, side=32) -> Dataset:
    """CIFAR-shaped data that a small network learns in a few rounds: per class a smooth colour
    pattern (2x2 upsampled), plus pixel noise, clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.nn.functional.interpolate(torch.rand(10, 3, 2, 2, generator=g), size=(side, side),
                                               mode="bilinear", align_corners=False)

    def draw(n):
        y = torch.arange(n) % 10
        x = (0.2 + 0.6 * patterns[y] + 0.1 * torch.randn(n, 3, side, side, generator=g)).clamp(0, 1)
        return x, y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return Dataset("synthetic_cifar", x_tr, y_tr, x_te, y_te, 10, tuple(str(i) for i in range(10)))


# -- the models

@pytest.mark.parametrize("name", ["cifar_cnn", "resnet8", "resnet20", "resnet18"])
@pytest.mark.parametrize("shape,classes", [((3, 32, 32), 10), ((1, 28, 28), 10), ((3, 8, 8), 3)])
def test_cifar_models_sized_from_shape(name, shape, classes):
    model = build_model(name, shape, classes).eval()
    assert model(torch.rand(2, *shape)).shape == (2, classes)
    assert model.input_shape == shape and model.num_classes == classes


def test_parameter_counts_match_the_published_shapes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # He et al. 2016, table 6: ResNet-20 has 0.27 M parameters; the CIFAR ResNet-18 (3x3 stem, no
    # max-pool, 1x1 projection shortcuts with BatchNorm) has 11,173,962 for 10 classes.
    assert count(build_model("resnet20", (3, 32, 32), 10)) == pytest.approx(0.27e6, rel=0.02)
    assert count(build_model("resnet18", (3, 32, 32), 10)) == 11_173_962
    assert count(build_model("resnet8", (3, 32, 32), 10)) == 78_042
    assert count(CifarCNN((3, 32, 32), 10)) == 814_570


@pytest.mark.parametrize("depth", [8, 14, 20, 18])
def test_resnet_depth_counts_the_main_path(depth):
    model = ResNet((3, 32, 32), 10, depth=depth)
    shortcut = sum(1 for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" in n)
    weighted = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert model.depth == depth and weighted - shortcut == depth
    assert shortcut == len(model.blocks) - 1  # one projection where each later stage starts
    # Spatial size halves at each later stage: the last stage of ResNet-8 works on 8x8 maps.
    feats = model.stages(model.stem(torch.rand(1, 3, 32, 32)))
    assert feats.shape[-2:] == (32 // 2 ** (len(model.blocks) - 1),) * 2


def test_norm_choices_and_their_buffers():
    bn = ResNet((3, 32, 32), 10, norm="batch")
    gn = ResNet((3, 32, 32), 10, norm="group")
    plain = CifarCNN((3, 32, 32), 10, norm="none")
    ints = [k for k, v in bn.state_dict().items() if not v.is_floating_point()]
    assert ints and all(k.endswith("num_batches_tracked") for k in ints)
    assert not _stackable(bn) and _stackable(gn) and _stackable(plain)
    assert len(gn.state_dict()) == len(list(gn.parameters()))
    assert any(isinstance(m, nn.GroupNorm) for m in gn.modules())


def test_model_errors():
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        ResNet((3, 32, 32), 10, depth=10)
    with pytest.raises(ValueError, match="depth must be an integer"):
        ResNet((3, 32, 32), 10, depth=8.0)
    with pytest.raises(ValueError, match="H, W >= 4"):
        ResNet((3, 2, 2), 10)  # three stages halve twice
    with pytest.raises(ValueError, match="H, W >= 8"):
        CifarCNN((3, 4, 4), 10)
    with pytest.raises(ValueError, match="norm must be one of"):
        CifarCNN((3, 32, 32), 10, norm="layer")
    with pytest.raises(ValueError, match="equal length"):
        ResNet((3, 32, 32), 10, blocks=(1, 1), widths=(16,))
    with pytest.raises(ValueError, match="num_classes"):
        ResNet((3, 32, 32), 1)
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        build_model("vgg16", (3, 32, 32), 10)
    assert ResNet((3, 32, 32), 10, blocks=(1, 2), widths=(8, 16)).depth == 8


# -- BatchNorm in the federated loop

def _config(**kw) -> FLConfig:
    base = dict(model="resnet8", num_clients=5, rounds=1, local_epochs=1, lr=0.1, batch_size=4, progress=False,
                seed=0)
    return FLConfig(**{**base, **kw})


def _recording_update():
    """``sgd_client_update`` that also keeps each client's trained state (what it would send)."""
    states = []

    def update(model, x, y, config, generator):
        sgd_client_update(model, x, y, config, generator)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    return update, states


def _bn_keys(state):
    return [k for k in state if k.endswith(("running_mean", "running_var"))]


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean", "krum"])
def test_bn_statistics_after_a_round_are_the_rule_applied_to_the_clients(rule):
    data = synthetic_cifar(side=16)  # 16x16 keeps it fast; the training test below runs at 32x32
    update, states = _recording_update()
    result = run_federated(_config(aggregator=rule, aggregator_f=1), data=data, client_update=update)
    assert len(states) == 5
    init = build_model("resnet8", (3, 16, 16), 10)  # running statistics start at 0 and 1 whatever the seed
    glob = result.model.state_dict()
    keys = _bn_keys(glob)
    assert len(keys) == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    if rule == "krum":
        (chosen,) = result.history[0]["aggregation"]["selected"]
    for k in keys:
        client = torch.stack([s[k] for s in states])  # (clients, channels)
        assert not torch.allclose(client[0], init.state_dict()[k])  # the statistics did move locally
        if rule == "krum":
            expected = client[chosen]
        else:
            expected = get_aggregator(rule, f=1)(client)
        torch.testing.assert_close(glob[k], expected, atol=1e-5, rtol=1e-5)
    if rule == "mean":  # the equal-size IID clients: the plain mean of the running variances
        k = keys[1]
        torch.testing.assert_close(glob[k], torch.stack([s[k] for s in states]).mean(0), atol=1e-5, rtol=1e-5)
    # Integer counters are kept aside: each client counted its own batches of the round,
    # the global model keeps the value it started with.
    batches = math.ceil(10 / 4)  # 50 samples, 5 IID clients, batches of 4
    for k, v in glob.items():
        if not v.is_floating_point():
            assert v.item() == 0 and all(s[k].item() == batches for s in states)


class _NegativeVariance(ByzantineAttack):
    """Sends the honest mean with every BatchNorm running_var entry shifted to -100."""

    def __init__(self, slices):
        self.slices = slices

    def forge(self, honest, num_byzantine, generator):
        forged = honest.mean(0).clone()
        for s in self.slices:
            forged[s] = -100.0
        return forged.expand(num_byzantine, -1).clone()


def test_forged_running_variance_poisons_the_mean_not_the_median():
    data = synthetic_cifar(n_test=20, side=16)
    state = build_model("resnet8", (3, 16, 16), 10).state_dict()
    slices = [s for k, s in state_slices(state).items() if k.endswith("running_var")]
    out = {}
    for rule in ("mean", "median"):
        cfg = _config(aggregator=rule, byzantine_fraction=0.2, byzantine_attack=_NegativeVariance(slices))
        result = run_federated(cfg, data=data)
        var = torch.cat([v for k, v in result.model.state_dict().items() if k.endswith("running_var")])
        out[rule] = (var.min().item(), result.history[0]["clean_accuracy"],
                     torch.isfinite(result.model.eval()(data.x_test)).all().item())
    assert out["mean"][0] < 0 and not out["mean"][2]  # negative variance: NaN logits in eval mode
    assert out["median"][0] >= 0 and out["median"][2]


def test_batchnorm_falls_back_from_the_vectorized_path():
    data = synthetic_cifar(n_train=30, n_test=20, side=16)
    a = run_federated(_config(num_clients=3, vectorized=True), data=data)
    b = run_federated(_config(num_clients=3, vectorized=False), data=data)
    assert a.history == b.history
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    with pytest.raises(ValueError, match="BatchNorm"):
        train_stacked(build_model("resnet8", (3, 16, 16), 10), [data.x_train[:8]], [data.y_train[:8]])
    with pytest.raises(ValueError, match="BatchNorm"):
        run_grid([_config(num_clients=3)], data=data, progress=False)


def test_groupnorm_resnet_runs_vectorized_as_the_loop():
    data = synthetic_cifar(n_train=60, n_test=20, side=16)
    model = ResNet((3, 16, 16), 10, norm="group")
    xs, ys = [data.x_train[:20], data.x_train[20:40]], [data.y_train[:20], data.y_train[20:40]]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    stacked = train_stacked(model, xs, ys, epochs=1, lr=0.05, batch_size=10, generators=gens())
    from robustfl_lib.federated import _train_clients
    loop = _train_clients(model, xs, ys, gens(), _config(vectorized=False, lr=0.05, batch_size=10), 1, None)
    torch.testing.assert_close(stacked, loop, atol=1e-5, rtol=1e-4)
    assert not torch.equal(stacked[0], flatten_state(model.state_dict()))


def test_resnet8_with_batchnorm_trains_in_the_fl_loop():
    # bn_momentum=None: each round's running statistics average the clients' batches of the round
    # (the global counter stays 0), so the eval-mode model does not lag behind its weights.
    data = synthetic_cifar(n_train=60)
    cfg = _config(aggregator="median", rounds=3, num_clients=3, batch_size=5, model_kwargs={"bn_momentum": None})
    result = run_federated(cfg, data=data)
    acc = result.metric("clean_accuracy")
    assert acc[-1] >= 0.4 and acc[-1] > acc[0], acc  # chance is 0.1
    bn = [m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(m.momentum is None and m.num_batches_tracked.item() == 0 for m in bn)


def test_bn_momentum_none_forgets_the_statistics_a_round_starts_from():
    # With the counter at 0 (as every client starts a round), momentum=None makes a client's running
    # statistics the average over its own batches: whatever statistics it received are forgotten.
    # With momentum 0.1 they still weigh 0.9 ** batches.
    data = synthetic_cifar(n_train=20, side=16)
    cfg = _config(num_clients=1, batch_size=5)
    for momentum, forgets in ((None, True), (0.1, False)):
        torch.manual_seed(0)
        a = build_model("resnet8", (3, 16, 16), 10, bn_momentum=momentum)
        b = copy.deepcopy(a)
        for m in b.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
                m.running_var.fill_(7.0)
        for m in (a, b):
            sgd_client_update(m, data.x_train, data.y_train, cfg, torch.Generator().manual_seed(1))
        sa, sb = a.state_dict(), b.state_dict()
        keys = _bn_keys(sa)
        assert all(torch.allclose(sa[k], sb[k]) for k in keys) == forgets, momentum
        assert sa["stem.1.num_batches_tracked"].item() == 4


def test_model_kwargs_are_checked():
    with pytest.raises(ValueError, match="model_kwargs must be a dict"):
        _config(model_kwargs=[("bn_momentum", None)]).validate()
    with pytest.raises(ValueError, match="bn_momentum must be in"):
        ResNet((3, 32, 32), 10, bn_momentum=1.5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        run_federated(_config(model="mlp", model_kwargs={"bn_momentum": None}), data=synthetic_cifar(n_train=10))


def test_batchnorm_run_resumes_exactly(tmp_path):
    # The checkpoint holds the integer counters too; a resumed run ends where an uninterrupted one does.
    data = synthetic_cifar(n_train=30, n_test=20, side=16)
    cfg = _config(num_clients=3, rounds=2, aggregator="median")
    full = run_federated(cfg, data=data)
    run_federated(_config(num_clients=3, rounds=1, aggregator="median"), data=data, checkpoint_dir=tmp_path)
    resumed = run_federated(cfg, data=data, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == full.history
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
