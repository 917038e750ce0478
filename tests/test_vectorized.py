"""Vectorized client training equals the sequential loop; checkpoints are weights_only and atomic."""

from __future__ import annotations

import copy

import pytest
import torch

from robustfl_lib import MLP, SmallCNN, flatten_state, make_generator, partition, train, unflatten_state
from robustfl_lib.checkpoint import load_checkpoint, save_checkpoint
from robustfl_lib.vectorized import StackedModel, train_stacked


def _clients(digits, k, scheme="dirichlet"):
    parts = partition(digits.y_train, k, scheme, alpha=0.5, seed=0)
    return [digits.x_train[p] for p in parts], [digits.y_train[p] for p in parts]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_stacked_equals_sequential(digits, arch):
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10) if arch == "mlp" else SmallCNN((1, 8, 8), 10, channels=(4, 8))
    xs, ys = _clients(digits, 7)
    assert len({len(x) for x in xs}) > 1  # unequal client sizes exercise the padding
    kw = dict(epochs=2, lr=0.2, batch_size=16, weight_decay=1e-3)
    got = train_stacked(model, xs, ys, generators=[make_generator(k) for k in range(7)], **kw)
    want = []
    for k in range(7):
        local = copy.deepcopy(model)
        train(local, xs[k], ys[k], generator=make_generator(k), **kw)
        want.append(flatten_state(local.state_dict()))
    assert got.shape == (7, flatten_state(model.state_dict()).numel())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-5)
    # The input model is untouched.
    assert not torch.equal(got[0], flatten_state(model.state_dict()))


def test_stacked_with_separate_starting_points(digits):
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10)
    xs, ys = _clients(digits, 3)
    base = flatten_state(model.state_dict())
    starts = torch.stack([base, base + 0.01, base - 0.02])
    got = train_stacked(model, xs, ys, epochs=1, lr=0.1, batch_size=8, starts=starts,
                        generators=[make_generator(k) for k in range(3)])
    for k in range(3):
        local = copy.deepcopy(model)
        local.load_state_dict(unflatten_state(starts[k], model.state_dict()))
        train(local, xs[k], ys[k], epochs=1, lr=0.1, batch_size=8, generator=make_generator(k))
        torch.testing.assert_close(got[k], flatten_state(local.state_dict()), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="starts must have shape"):
        train_stacked(model, xs, ys, starts=starts[:2])


def test_stacked_model_is_a_flat_classifier(digits):
    model = MLP((1, 8, 8), 10)
    params = {n: torch.stack([p.detach(), p.detach() * 2]) for n, p in model.named_parameters()}
    stacked = StackedModel(model, params)
    x = digits.x_train[:6]
    out = stacked(x)
    assert out.shape == (6, 10)
    torch.testing.assert_close(out[:3], model(x[:3]))
    with pytest.raises(ValueError, match="cannot be split"):
        stacked(digits.x_train[:5])


def test_stacked_refuses_batchnorm_and_bad_input(digits):
    xs, ys = _clients(digits, 3)
    with pytest.raises(ValueError, match="BatchNorm"):
        train_stacked(SmallCNN((1, 8, 8), 10, batchnorm=True), xs, ys)
    with pytest.raises(ValueError, match="must match"):
        train_stacked(MLP((1, 8, 8), 10), [xs[0]], [ys[0][:-1]])
    with pytest.raises(ValueError, match="lr > 0"):
        train_stacked(MLP((1, 8, 8), 10), xs, ys, lr=0)


def test_non_finite_loss_names_the_client(digits):
    xs, ys = _clients(digits, 3)
    xs[1] = xs[1].clone()
    xs[1][0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"client\(s\) \[1\]"):
        train_stacked(MLP((1, 8, 8), 10), xs, ys)


def test_checkpoint_round_trip_weights_only(tmp_path):
    payload = {"round": 3, "state": {"w": torch.arange(4.0)}, "history": [{"acc": 0.5, "ids": [1, 2]}], "x": None}
    path = save_checkpoint(tmp_path / "ck" / "last.pt", payload)
    back = load_checkpoint(path)
    assert back["round"] == 3 and torch.equal(back["state"]["w"], torch.arange(4.0)) and back["history"] == payload["history"]
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    with pytest.raises(TypeError, match="plain values"):
        save_checkpoint(tmp_path / "bad.pt", {"obj": object()})
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
