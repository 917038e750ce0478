#!/usr/bin/env python3
"""Certified vs PGD adversarial training, measured: verified accuracy (IBP and CROWN-IBP bounds)
and PGD robust accuracy of each model (issue 15, item 3).

For each budget eps the same network (an MLP, or ``--model cnn`` for SmallCNN) is trained three ways
on the same data with the same shuffling:

* ``pgd``: PGD-10 adversarial training at eps (Madry et al. 2018, ``mix=1``, eps warm-up over the
  first half of the epochs);
* ``ibp``: the IBP loss with Gowal et al. 2018's ramps (eps 0 -> eps and kappa 1 -> 0.5 over the
  middle half of the steps, after one epoch at eps 0);
* ``crown-ibp``: the same with CROWN-IBP's bound mixed in, beta 1 -> 0 with the eps ramp (Zhang et
  al. 2020).

Each is evaluated on held-out points: clean accuracy, robust accuracy under PGD-50 with 2 restarts
(an upper bound of the true robust accuracy) and verified accuracy (a lower bound), with either
bound. Verified <= robust <= clean for every model is asserted.

    python benchmarks/certified.py digits                 # eps 0.05 and 0.1, about a minute on a CPU
    python benchmarks/certified.py mnist --epochs 20      # ../shared/data/mnist, 8,000 / 2,000, eps 0.1 and 0.3

Runs on CUDA unchanged (``--device cuda``).

Measured 2026-12-02 on the shared 2-core CPU (one torch thread, seed 0, MLP 256-256), with
``python benchmarks/certified.py digits --threads 1 --epochs 30`` (digits' 360 test points) and
``python benchmarks/certified.py mnist --threads 1 --epochs 20`` (2,000 held-out MNIST points):

| data | eps | training | clean | PGD-50 x2 | verified IBP | verified CROWN-IBP | train s |
|---|---|---|---|---|---|---|---|
| digits | 0.05 | pgd | 0.969 | 0.906 | 0.000 | 0.136 | 15 |
| digits | 0.05 | ibp | 0.947 | 0.858 | 0.622 | 0.825 | 8 |
| digits | 0.05 | crown-ibp | 0.944 | 0.867 | 0.603 | 0.839 | 17 |
| digits | 0.1 | pgd | 0.967 | 0.786 | 0.000 | 0.000 | 14 |
| digits | 0.1 | ibp | 0.914 | 0.678 | 0.436 | 0.581 | 8 |
| digits | 0.1 | crown-ibp | 0.911 | 0.689 | 0.392 | 0.592 | 20 |
| mnist | 0.1 | pgd | 0.947 | 0.752 | 0.000 | 0.000 | 100 |
| mnist | 0.1 | ibp | 0.900 | 0.668 | 0.553 | 0.584 | 75 |
| mnist | 0.1 | crown-ibp | 0.895 | 0.670 | 0.531 | 0.599 | 193 |
| mnist | 0.3 | pgd | 0.770 | 0.210 | 0.000 | 0.000 | 71 |
| mnist | 0.3 | ibp | 0.797 | 0.074 | 0.015 | 0.008 | 48 |
| mnist | 0.3 | crown-ibp | 0.800 | 0.030 | 0.004 | 0.002 | 94 |

At eps 0.1 certified training verifies 55-60% of the MNIST points, the PGD-trained model none
(the issue's 30-point target is met there). At eps 0.3 this MLP and 20-epoch schedule fail both
ways (PGD-AT reaches 21% PGD accuracy, the certified models 1.5% verified at best): the published
MNIST 0.3 results use CNNs, training eps 0.4 and 100-200 epochs, which a 2-core CPU cannot run in
this budget. The 0.3 target is not met here. SmallCNN does better: ``--model cnn --epochs 10
--budgets 0.3 --trainings ibp --eval-n 1000`` gave clean 0.889, PGD 0.485, verified 0.259 (IBP) /
0.239 (CROWN-IBP) in 134 s of training; the PGD-trained CNN's row was not measured (stopped for time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import robustfl_lib as rfl  # noqa: E402

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def build(name: str, shape, classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "cnn":
        return rfl.SmallCNN(shape, classes)
    return rfl.MLP(shape, classes, hidden=(256, 256))


def train_one(kind: str, model, x, y, eps: float, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    steps_per_epoch = -(-len(x) // batch_size)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if kind == "pgd":
        rfl.adversarial_train(model, x, y, rfl.PGD(eps, steps=10, generator=torch.Generator().manual_seed(seed + 1)),
                              epochs=epochs, mix=1.0, warmup_epochs=epochs / 2, lr=lr, batch_size=batch_size,
                              generator=gen, lr_schedule="cosine")
    else:
        warmup, ramp = steps_per_epoch, total // 2
        eps_s, kappa_s = rfl.gowal_schedules(eps, warmup=warmup, ramp=ramp, kappa_end=0.5)
        beta = rfl.LinearRamp(1.0, 0.0, warmup, ramp) if kind == "crown-ibp" else None
        loss = rfl.CertifiedLoss(eps_s, method=kind, kappa=kappa_s, beta=beta)
        rfl.train(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, generator=gen, loss_fn=loss,
                  lr_schedule="cosine")
    return time.perf_counter() - start


def evaluate_one(model, x, y, eps: float) -> dict[str, float]:
    model.eval()
    r = rfl.evaluate(model, x, y, rfl.PGD(eps, steps=50, restarts=2, seed=0), batch_size=500)
    out = {"clean": r["clean_accuracy"], "pgd": r["robust_accuracy"],
           "ibp": rfl.verified_accuracy(model, x, y, eps, "ibp", batch_size=250),
           "crown-ibp": rfl.verified_accuracy(model, x, y, eps, "crown-ibp", batch_size=250)}
    assert max(out["ibp"], out["crown-ibp"]) <= out["pgd"] <= out["clean"], out
    return out


def run(name: str, data, budgets, epochs: int, batch_size: int, lr: float, model_name: str, device, seed: int,
        eval_n: int, trainings=("pgd", "ibp", "crown-ibp")) -> list[tuple]:
    x, y = data.x_train, data.y_train
    xt, yt = data.x_test[:eval_n].to(device), data.y_test[:eval_n].to(device)
    rows = []
    for eps in budgets:
        for kind in trainings:
            model = build(model_name, x.shape[1:], data.num_classes, seed).to(device)
            secs = train_one(kind, model, x, y, eps, epochs, batch_size, lr, seed)
            m = evaluate_one(model, xt, yt, eps)
            rows.append((name, eps, kind, m["clean"], m["pgd"], m["ibp"], m["crown-ibp"], secs))
            print(f"| {name} | {eps} | {kind} | {m['clean']:.3f} | {m['pgd']:.3f} | {m['ibp']:.3f} | "
                  f"{m['crown-ibp']:.3f} | {secs:.0f} |", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["digits", "mnist", "all"], nargs="?", default="all")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: digits 60, mnist 20)")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="eps values (default: digits 0.05 0.1, "
                   "mnist 0.1 0.3)")
    p.add_argument("--trainings", nargs="+", choices=["pgd", "ibp", "crown-ibp"], default=["pgd", "ibp", "crown-ibp"])
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device) if a.device else rfl.get_device()
    print(f"device {device}, model {a.model}, seed {a.seed}, torch threads {torch.get_num_threads()}\n")
    print("| data | eps | training | clean | PGD-50 x2 | verified IBP | verified CROWN-IBP | train s |")
    print("|---|---|---|---|---|---|---|---|")
    if a.part in ("digits", "all"):
        data = rfl.load_dataset("digits", seed=a.seed)
        run("digits", data, a.budgets or (0.05, 0.1), a.epochs or 60, 32, 0.1, a.model, device, a.seed, a.eval_n,
            a.trainings)
    if a.part in ("mnist", "all"):
        if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
            print(f"MNIST files not found in {MNIST_DIR}; skipping")
            return
        data = rfl.load_dataset("mnist", root=MNIST_DIR, files="t10k", test_fraction=0.2)
        run("mnist", data, a.budgets or (0.1, 0.3), a.epochs or 20, 64, 0.1, a.model, device, a.seed, a.eval_n,
            a.trainings)


if __name__ == "__main__":
    main()
