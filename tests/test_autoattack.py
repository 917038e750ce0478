"""AutoAttack (Croce & Hein 2020): the order of its versions, its bookkeeping, the attack contract."""

from __future__ import annotations

import pytest
import torch

from attack_contract import check_contract, digits_model, robust_count
from robustfl_lib import APGD, PGD, AutoAttack

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "attack",
    [
        AutoAttack(0.1, version="fast", steps=5, n_target_classes=2),
        AutoAttack(0.1, steps=5, queries=30, n_target_classes=2),
        AutoAttack(0.8, norm="l2", steps=5, n_target_classes=2),
    ],
    ids=["fast", "standard", "standard-l2"],
)
def test_contract(attack):
    check_contract(attack)


def test_standard_fast_and_apgd_ce_in_order_with_their_bookkeeping():
    model, data = digits_model()
    x, y = data.x_test[:150], data.y_test[:150]
    apgd_ce = robust_count(model, APGD(0.1, steps=30)(model, x, y), y)
    pgd = robust_count(model, PGD(0.1, steps=30, seed=0)(model, x, y), y)
    fast = AutoAttack(0.1, version="fast", steps=30, n_target_classes=3)
    standard = AutoAttack(0.1, steps=30, queries=300, n_target_classes=3)
    n_fast = robust_count(model, fast(model, x, y), y)
    n_standard = robust_count(model, standard(model, x, y), y)
    assert n_standard <= n_fast <= apgd_ce <= robust_count(model, x, y)
    assert n_fast <= pgd
    for attack, count, names in ((fast, n_fast, ["apgd-ce", "apgd-t"]),
                                 (standard, n_standard, ["apgd-ce", "apgd-t", "fab-t", "square"])):
        info = attack.last_info
        assert list(info["components"]) == names
        assert info["robust"] == count and info["points"] == len(x)
        assert info["clean"] - sum(c["broken"] for c in info["components"].values()) == count
        assert info["components"]["apgd-ce"]["robust_after"] == apgd_ce  # the first component is APGD-CE itself
    # the standard version's first two components are the fast version
    assert standard.last_info["components"]["apgd-t"]["robust_after"] == n_fast


def test_l2_standard_runs_all_four_in_their_l2_versions():
    model, data = digits_model()
    x, y = data.x_test[:60], data.y_test[:60]
    attack = AutoAttack(0.5, norm="l2", steps=5, queries=100, n_target_classes=2)
    parts = dict(attack.components())
    assert list(parts) == ["apgd-ce", "apgd-t", "fab-t", "square"] and all(p.norm == "l2" for p in parts.values())
    x_adv = attack(model, x, y)
    info = attack.last_info
    assert list(info["components"]) == ["apgd-ce", "apgd-t", "fab-t", "square"] and "note" not in info
    assert info["robust"] == robust_count(model, x_adv, y)
    assert bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.5 * (1 + 1e-5)).all())


def test_components_and_seed():
    names = [name for name, _ in AutoAttack(0.1).components()]
    assert names == ["apgd-ce", "apgd-t", "fab-t", "square"]
    parts = dict(AutoAttack(0.1, seed=3).components())
    assert parts["apgd-ce"].steps == 100 and parts["apgd-t"].n_target_classes == 9
    assert parts["square"].queries == 5000 and all(p.seed == 3 for p in parts.values())
    assert [n for n, _ in AutoAttack(0.1, version="fast").components()] == ["apgd-ce", "apgd-t"]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(eps=-1.0), ValueError),
        (dict(eps=0.1, version="plus"), ValueError),
        (dict(eps=0.1, norm="l1"), ValueError),
        (dict(eps=0.1, steps=0), ValueError),
        (dict(eps=0.1, queries=0), ValueError),
        (dict(eps=0.1, seed=None), TypeError),
        (dict(eps=0.1, seed=0.5), TypeError),
    ],
)
def test_bad_settings(kwargs, error):
    with pytest.raises(error):
        AutoAttack(**kwargs)
