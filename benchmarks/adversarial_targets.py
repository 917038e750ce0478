#!/usr/bin/env python3
"""The adversarial-training targets of the project, measured.

digits (linf eps = 0.1, MLP, evaluated with PGD-50 and 3 restarts on the test split):
    PGD adversarial training reaches clean >= 97% and robust >= 85%; standard training
    stays below 50% robust. Both use :data:`robustfl_lib.DIGITS_RECIPE` (one recipe, the
    attack is the only difference), over ``--seeds`` model seeds.

mnist (the 10,000 official test images of ../shared/data/mnist split 8,000 / 2,000, SmallCNN):
    adversarial training at eps = 0.3 with an eps warm-up does not collapse; reports clean
    accuracy and PGD-100 robust accuracy at eps = 0.1 and eps = 0.3. ``--collapse`` also
    runs the plain PGD-40 training from scratch at eps = 0.3 (no warm-up) for comparison.
    The ensemble column is :class:`robustfl_lib.WorstCaseEnsemble` (PGD-100 x2 on CE, PGD-100 on DLR, FGSM).

    python benchmarks/adversarial_targets.py digits
    python benchmarks/adversarial_targets.py mnist --threads 1 --epochs 12 --warmup 4 --collapse 4
    python benchmarks/adversarial_targets.py all

Runs on CUDA unchanged (``--device cuda``); the numbers in README.md say which device gave them.
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


def digits_targets(seeds: int, device: torch.device) -> bool:
    r = rfl.DIGITS_RECIPE
    data = rfl.load_dataset("digits", seed=0)
    evaluation = rfl.PGD(0.1, steps=50, restarts=3, seed=0)
    print(f"digits, recipe {r}\nevaluation: {evaluation}\n")
    print("| seed | training | clean | robust (PGD-50 x3, eps 0.1) | ensemble robust | train time |")
    print("|---|---|---:|---:|---:|---:|")
    ok = True
    for seed in range(seeds):
        for kind in ("standard", "PGD adversarial"):
            torch.manual_seed(seed)
            model = rfl.MLP(data.input_shape, 10, hidden=r["hidden"]).to(device)
            opt = dict(epochs=r["epochs"], lr=r["lr"], batch_size=r["batch_size"], lr_schedule=r["lr_schedule"],
                       generator=rfl.make_generator(seed))
            start = time.perf_counter()
            if kind == "standard":
                rfl.train(model, data.x_train, data.y_train, **opt)
            else:
                attack = rfl.PGD(r["train_eps"], steps=r["train_steps"], generator=rfl.make_generator(1000 + seed))
                rfl.adversarial_train(model, data.x_train, data.y_train, attack, mix=r["mix"], **opt)
            seconds = time.perf_counter() - start
            res = rfl.evaluate(model, data.x_test, data.y_test, evaluation)
            ens = rfl.evaluate(model, data.x_test, data.y_test, rfl.WorstCaseEnsemble.standard(0.1))
            print(f"| {seed} | {kind} | {res['clean_accuracy']:.3f} | {res['robust_accuracy']:.3f} | "
                  f"{ens['robust_accuracy']:.3f} | {seconds:.1f} s |", flush=True)
            if kind == "standard":
                ok &= res["robust_accuracy"] < 0.5
            else:
                ok &= res["clean_accuracy"] >= 0.97 and res["robust_accuracy"] >= 0.85
    print(f"\ndigits targets {'MET' if ok else 'NOT MET'} for every seed")
    return ok


def mnist_targets(epochs: int, warmup: float, train_steps: int, eval_n: int, collapse: int, device: torch.device,
                  channels: tuple[int, int]) -> bool:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        print(f"MNIST files not found in {MNIST_DIR}; skipping")
        return True
    data = rfl.load_dataset("mnist", root=MNIST_DIR, files="t10k", test_fraction=0.2)
    x_test, y_test = data.x_test[:eval_n], data.y_test[:eval_n]
    print(f"\nMNIST {data}, evaluated on {len(x_test)} test images, device {device}")
    name = f"PGD-{train_steps} AT, eps 0.3, warm-up {warmup:g} epochs"
    runs = {name: dict(steps=train_steps, warmup=warmup, epochs=epochs, target=True)}
    if collapse:
        runs["plain PGD-40 AT, eps 0.3, no warm-up"] = dict(steps=40, warmup=0.0, epochs=collapse, target=False)
    ok = True
    print("| training | epochs | clean | PGD-100 eps 0.1 | PGD-100 eps 0.3 | ensemble eps 0.3 | train time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, cfg in runs.items():
        torch.manual_seed(0)
        model = rfl.SmallCNN(data.input_shape, 10, channels=channels).to(device)
        attack = rfl.PGD(0.3, alpha=2.5 * 0.3 / cfg["steps"], steps=cfg["steps"], generator=rfl.make_generator(1))
        start = time.perf_counter()
        losses = rfl.adversarial_train(model, data.x_train, data.y_train, attack, epochs=cfg["epochs"], mix=1.0,
                                       warmup_epochs=cfg["warmup"], lr=0.05, momentum=0.9, batch_size=64,
                                       lr_schedule="cosine", generator=rfl.make_generator(0), progress=True)
        seconds = time.perf_counter() - start
        r01 = rfl.evaluate(model, x_test, y_test, rfl.PGD(0.1, alpha=0.01, steps=100, seed=0), batch_size=500)
        r03 = rfl.evaluate(model, x_test, y_test, rfl.PGD(0.3, alpha=0.01, steps=100, seed=0), batch_size=500)
        ens = rfl.evaluate(model, x_test, y_test, rfl.WorstCaseEnsemble.standard(0.3, steps=100, restarts=2),
                           batch_size=500)
        print(f"| {name} | {cfg['epochs']} | {r01['clean_accuracy']:.3f} | {r01['robust_accuracy']:.3f} | "
              f"{r03['robust_accuracy']:.3f} | {ens['robust_accuracy']:.3f} | {seconds / 60:.1f} min |", flush=True)
        print(f"    training loss per epoch: {[round(v, 3) for v in losses]}", flush=True)
        if cfg["target"]:  # the warm-up run must stay far from chance (0.1)
            ok &= r01["clean_accuracy"] > 0.5 and r03["robust_accuracy"] > 0.2
    print(f"\nMNIST eps=0.3 adversarial training with warm-up {'did not collapse' if ok else 'COLLAPSED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["digits", "mnist", "all"], nargs="?", default="all")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", type=int, default=3, help="digits: model seeds")
    p.add_argument("--epochs", type=int, default=12, help="MNIST adversarial-training epochs")
    p.add_argument("--warmup", type=float, default=4.0, help="MNIST eps warm-up epochs")
    p.add_argument("--train-steps", type=int, default=10, help="MNIST PGD steps during training")
    p.add_argument("--channels", type=int, nargs=2, default=(16, 32), help="SmallCNN channels")
    p.add_argument("--eval-n", type=int, default=2000, help="MNIST test images to evaluate")
    p.add_argument("--collapse", type=int, default=0, metavar="EPOCHS",
                   help="also run plain PGD-40 AT at eps=0.3 from scratch (no warm-up) for EPOCHS epochs")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = rfl.get_device(a.device)
    rfl.set_seed(0)
    ok = True
    if a.part in ("digits", "all"):
        ok &= digits_targets(a.seeds, device)
    if a.part in ("mnist", "all"):
        ok &= mnist_targets(a.epochs, a.warmup, a.train_steps, a.eval_n, a.collapse, device, tuple(a.channels))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
