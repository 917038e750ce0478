"""Per-client test splits and local fine-tuning after FL (chapter 13)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from robustfl_lib import PGD, FLConfig, MLP, evaluate, flatten_state, load_vector_, make_generator, run_federated, train
from robustfl_lib.data import label_counts, partition, partition_like
from robustfl_lib.personalization import evaluate_clients, fine_tune_clients, personalize


def test_partition_like_covers_and_matches_label_mix(digits):
    parts = partition(digits.y_train, 6, "dirichlet", alpha=0.3, seed=1)
    test_parts = partition_like(digits.y_test, digits.y_train, parts, seed=0)
    every = torch.cat(test_parts)
    assert len(every) == len(digits.y_test) and len(torch.unique(every)) == len(every)  # a partition
    train_c = label_counts(digits.y_train, parts, 10).astype(float)
    test_c = label_counts(digits.y_test, test_parts, 10)
    # Client i gets class k's test samples in proportion to its class-k training samples (up to rounding).
    expected = test_c.sum(0) * train_c / train_c.sum(0)
    assert np.abs(test_c - expected).max() <= 1.0
    assert ((train_c == 0) <= (test_c == 0)).all()  # no class a client never trained on
    again = partition_like(digits.y_test, digits.y_train, parts, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again, test_parts))


def test_partition_like_spreads_unseen_classes_and_checks_input():
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    ref = torch.tensor([0, 0, 1, 1])
    parts = partition_like(y, ref, [torch.tensor([0, 1]), torch.tensor([2, 3])])
    assert sorted(torch.cat(parts).tolist()) == list(range(8))
    assert set(parts[0].tolist()) >= {0, 1} and set(parts[1].tolist()) >= {2, 3}
    assert [int((y[p] == 2).sum()) for p in parts] == [2, 2]  # class 2 never seen: shared evenly
    with pytest.raises(ValueError):
        partition_like(y, ref, [])
    with pytest.raises(ValueError):
        partition_like(torch.tensor([-1, 0]), ref, [torch.tensor([0])])


def _small_clients(digits, k=3, n=40):
    xs = [digits.x_train[i * n : (i + 1) * n] for i in range(k)]
    ys = [digits.y_train[i * n : (i + 1) * n] for i in range(k)]
    return xs, ys


def test_fine_tune_clients_equals_training_each_client(digits):
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10)
    before = flatten_state(model.state_dict()).clone()
    xs, ys = _small_clients(digits)
    cfg = FLConfig(lr=0.1, batch_size=16)
    w = fine_tune_clients(model, xs, ys, cfg, epochs=2, seed=4)
    assert torch.equal(flatten_state(model.state_dict()), before)  # the global model is untouched
    for k in range(3):
        local = copy.deepcopy(model)
        train(local, xs[k], ys[k], epochs=2, lr=0.1, batch_size=16, generator=make_generator(4 * 10_007 + k))
        torch.testing.assert_close(w[k], flatten_state(local.state_dict()), rtol=1e-4, atol=1e-5)
    adv = fine_tune_clients(model, xs, ys, cfg, local_training="adversarial", epochs=1, seed=4)
    assert adv.shape == w.shape and not torch.allclose(adv, fine_tune_clients(model, xs, ys, cfg, epochs=1, seed=4))
    torch.testing.assert_close(adv, fine_tune_clients(model, xs, ys, cfg, local_training="adversarial", epochs=1,
                                                      seed=4))
    with pytest.raises(ValueError, match="local_training"):
        fine_tune_clients(model, xs, ys, cfg, local_training="robust")
    with pytest.raises(ValueError, match="epochs"):
        fine_tune_clients(model, xs, ys, cfg, epochs=0)


def test_evaluate_clients_equals_evaluating_each_client(digits):
    torch.manual_seed(1)
    model = MLP((1, 8, 8), 10)
    train(model, digits.x_train, digits.y_train, epochs=3, lr=0.2, generator=make_generator(0))
    xs = [digits.x_test[:50], digits.x_test[50:70], digits.x_test[70:171]]  # unequal sizes: padding is masked
    ys = [digits.y_test[:50], digits.y_test[50:70], digits.y_test[70:171]]
    attack = PGD(eps=0.1, steps=5, random_start=False)
    w = torch.stack([flatten_state(model.state_dict()) + 0.01 * k for k in range(3)])
    out = evaluate_clients(model, xs, ys, weights=w, attack=attack)
    for k in range(3):
        local = copy.deepcopy(model)
        load_vector_(local, w[k])
        ref = evaluate(local, xs[k], ys[k], attack=attack)
        assert out["clean_accuracy"][k] == pytest.approx(ref["clean_accuracy"])
        assert out["robust_accuracy"][k] == pytest.approx(ref["robust_accuracy"], abs=1.5 / len(xs[k]))
    same = evaluate_clients(model, xs, ys)
    assert same["robust_accuracy"] is None
    np.testing.assert_allclose(same["clean_accuracy"], [evaluate(model, x, y)["clean_accuracy"] for x, y in zip(xs, ys)])
    with pytest.raises(ValueError, match="shape"):
        evaluate_clients(model, xs, ys, weights=w[:, :10])
    with pytest.raises(ValueError):
        evaluate_clients(model, xs, ys[:2])


def test_personalize_honest_clients_of_a_run(digits):
    cfg = FLConfig(num_clients=5, rounds=2, local_epochs=1, partition="dirichlet", alpha=0.5, aggregator="median",
                   byzantine_fraction=0.2, byzantine_attack="sign_flip", progress=False, seed=2)
    res = run_federated(cfg, data=digits)
    out = personalize(res, digits, epochs=3, lr=0.05, attack=PGD(eps=0.1, steps=3, seed=0))
    honest = [c for c in range(5) if c not in res.byzantine]
    assert out["clients"].tolist() == honest and out["weights"].shape[0] == 4
    for key in ("clean_before", "clean_after", "robust_before", "robust_after"):
        assert out[key].shape == (4,) and ((0 <= out[key]) & (out[key] <= 1)).all()
    assert (out["robust_before"] <= out["clean_before"]).all() and (out["robust_after"] <= out["clean_after"]).all()
    # Fine-tuning on a client's own label mix helps it on its own test data.
    assert out["clean_after"].mean() > out["clean_before"].mean()
    with pytest.raises(ValueError, match="clients"):
        personalize(res, digits, clients=[7])
