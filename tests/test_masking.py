"""masking_report: each flag fires on a model built to show it, and none on a plain trained MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attack_contract import digits_model
from robustfl_lib import MaskingFlag, masking_report

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["randomness", "probability_outputs", "zero_gradients", "black_box_beats_white_box",
         "accuracy_not_falling", "unbounded_not_zero"]


def _points(n: int = 80):
    model, data = digits_model()
    return model, data.x_test[:n], data.y_test[:n]


class Noisy(nn.Module):
    """Gaussian input noise in every forward pass, eval mode included (a randomized defense)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        return self.inner(x + 0.05 * torch.randn(x.shape, generator=self.gen))


class Softmax(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


class Quantized(nn.Module):
    """Inputs rounded to {0, 1/2, 1} before the model: a step function, zero gradient almost everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 2) / 2)


def test_plain_trained_mlp_raises_no_flag():
    model, x, y = _points()
    report = masking_report(model, x, y, 0.1)
    assert [f.name for f in report.flags] == FLAGS
    assert report.fired == [], str(report)


def test_randomized_model_fires_randomness():
    model, x, y = _points()
    report = masking_report(Noisy(model), x, y, 0.1, steps=10, queries=50)
    assert report["randomness"].fired and report["randomness"].value > 0


def test_softmax_model_fires_probability_outputs():
    model, x, y = _points()
    report = masking_report(Softmax(model), x, y, 0.1, steps=10, queries=50)
    assert report["probability_outputs"].fired and not report["randomness"].fired


def test_step_function_fires_zero_gradients_and_black_box():
    model, x, y = _points()
    report = masking_report(Quantized(model), x, y, 0.2, steps=20, queries=300)
    assert report["zero_gradients"].fired and report["zero_gradients"].value == 1.0
    assert report["black_box_beats_white_box"].fired, str(report)


def test_report_prints_a_table_and_looks_flags_up():
    model, x, y = _points(30)
    report = masking_report(Softmax(model), x, y, 0.1, steps=5, queries=20)
    text = str(report)
    assert all(name in text for name in FLAGS) and "YES" in text
    assert isinstance(report["zero_gradients"], MaskingFlag)
    assert bool(report["probability_outputs"]) is True
    with pytest.raises(KeyError, match="no flag"):
        report["nonsense"]


@pytest.mark.parametrize(
    "kwargs",
    [dict(eps=0.0), dict(eps=-0.1), dict(eps=0.1, norm="l1"), dict(eps=0.1, steps=0), dict(eps=0.1, tolerance=1.5),
     dict(eps=0.1, gradient_share=0.0)],
)
def test_bad_settings(kwargs):
    model, x, y = _points(10)
    with pytest.raises(ValueError):
        masking_report(model, x, y, **kwargs)
    with pytest.raises(ValueError):
        masking_report(model, x[:0], y[:0], 0.1)
