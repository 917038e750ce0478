#!/usr/bin/env python3
"""AutoAttack (ours) against torchattacks' on the same PGD-trained model and points: robust accuracy and time.

A small model is adversarially trained (PGD-7 at the benchmark's eps, 50/50 clean mix, seeded):
an MLP on the digits data (default) or, with ``--mnist``, a SmallCNN on the MNIST 8,000/2,000 split
of ``../shared/data/mnist`` (the official test files). Then, on the first ``--points`` test points:

* AutoAttack standard: ours (:class:`robustfl_lib.AutoAttack`) against torchattacks at the
  reference's budget (``MultiAttack`` of APGD-CE, APGD-T, FAB-T with 100 steps and 9 target
  classes, Square with 5000 queries, as ``fra31/auto-attack``'s standard version), and
  ``torchattacks.AutoAttack(version="standard")`` as shipped (its APGD, APGD-T and FAB default to
  10 steps);
* each component on all points: APGD-CE, APGD-T, FAB-T, Square against torchattacks' APGD, APGDT,
  FAB(multi_targeted=True) and Square with the same budgets.

Robust accuracy is counted with the model's own forward; every adversarial batch is checked to lie
in the linf ball (up to 1e-6: torchattacks rounds ``x + eps`` to nearest) and in [0, 1]. Times are the
median of ``--repeats`` runs on ``--threads`` threads, the attacks interleaved: the process's CPU time
(``time.process_time``; on a shared machine it moves far less with the load than wall time does), and
wall time beside it.
Without torchattacks installed its rows are skipped with a message.

    python benchmarks/autoattack.py                      # digits MLP, eps 0.1, 200 points, 3 repeats
    python benchmarks/autoattack.py --mnist --eps 0.3    # SmallCNN on the MNIST 8,000/2,000 split
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import robustfl_lib as rfl  # noqa: E402

try:
    import torchattacks as ta
except ImportError:  # optional
    ta = None

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def trained_model(mnist: bool, eps: float, epochs: int, device: torch.device):
    torch.manual_seed(0)
    if mnist:
        data = rfl.load_dataset("mnist", root=MNIST_DIR, files="t10k", test_fraction=0.2)
        model = rfl.SmallCNN(data.input_shape, 10)
        name = f"SmallCNN, MNIST 8,000/2,000 split, PGD-7 AT at eps {eps}, {epochs} epochs"
    else:
        data = rfl.load_dataset("digits", seed=0)
        model = rfl.MLP(data.input_shape, 10)
        name = f"MLP 64-128-64-10, digits, PGD-7 AT at eps {eps}, {epochs} epochs"
    attack = rfl.PGD(eps, steps=7, seed=0)
    rfl.adversarial_train(model, data.x_train, data.y_train, attack, epochs=epochs, mix=0.5, lr=0.1,
                          generator=torch.Generator().manual_seed(0))
    return model.to(device).eval(), data, name


def check_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, who: str) -> None:
    x_adv = x_adv.detach()
    over = float((x_adv - x).abs().max()) - eps
    if over > 1e-6 or float(x_adv.min()) < 0 or float(x_adv.max()) > 1:
        raise AssertionError(f"{who}: leaves the eps-ball or [0, 1] (by {over:.2e})")


def robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x_adv).argmax(1) == y).sum())


def contenders(model: nn.Module, eps: float) -> list[tuple[str, str, Callable, Callable | None]]:
    """(row, what, ours, theirs) with ours/theirs mapping (x, y) to x_adv."""
    rows: list[tuple[str, str, Callable, Callable | None]] = []

    def ours(attack):
        return lambda x, y: attack(model, x, y)

    def theirs(make):
        return None if ta is None else (lambda x, y: make()(x, y))

    reference_budget = lambda: ta.MultiAttack([  # noqa: E731
        ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        ta.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0),
        ta.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=10, seed=0),
        ta.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=0),
    ])
    rows.append(("AutoAttack standard", "reference budget", ours(rfl.AutoAttack(eps)), theirs(reference_budget)))
    rows.append(("AutoAttack standard", "torchattacks.AutoAttack as shipped (10 steps)", ours(rfl.AutoAttack(eps)),
                 theirs(lambda: ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0))))
    rows.append(("AutoAttack fast", "APGD-CE + APGD-T", ours(rfl.AutoAttack(eps, version="fast")),
                 theirs(lambda: ta.MultiAttack(reference_budget().attacks[:2]))))
    rows.append(("APGD-CE", "100 steps", ours(rfl.APGD(eps)),
                 theirs(lambda: ta.APGD(model, eps=eps, steps=100, loss="ce", seed=0))))
    rows.append(("APGD-T", "100 steps, 9 targets", ours(rfl.APGD(eps, targeted=True)),
                 theirs(lambda: ta.APGDT(model, eps=eps, steps=100, n_classes=10, seed=0))))
    rows.append(("FAB-T", "100 steps, 9 targets", ours(rfl.FAB(eps)),
                 theirs(lambda: ta.FAB(model, eps=eps, steps=100, multi_targeted=True, n_classes=10, seed=0))))
    rows.append(("Square", "5000 queries", ours(rfl.Square(eps)),
                 theirs(lambda: ta.Square(model, eps=eps, n_queries=5000, seed=0))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 (digits), 3 (MNIST)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mnist", action="store_true", help="SmallCNN on the MNIST 8,000/2,000 split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=None, help="comma-separated row names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.mnist and not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        sys.exit(f"--mnist: no MNIST files in {MNIST_DIR}")
    epochs = args.epochs or (3 if args.mnist else 10)
    start = time.perf_counter()
    model, data, name = trained_model(args.mnist, args.eps, epochs, device)
    x, y = data.x_test[: args.points].to(device), data.y_test[: args.points].to(device)
    print(f"model: {name} (trained in {time.perf_counter() - start:.0f} s); {len(x)} test points, "
          f"clean accuracy {robust(model, x, y) / len(x):.1%}; linf eps {args.eps}; {args.threads} thread(s), "
          f"{device}; median of {args.repeats} runs")
    if ta is None:
        print("torchattacks is not installed: its columns are skipped")
    rows = contenders(model, args.eps)
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        rows = [r for r in rows if r[0] in keep]
    print()
    print("| attack | budget | ours: robust acc | torchattacks: robust acc | ours: CPU s | torchattacks: CPU s "
          "| speed-up (CPU) | ours: wall s | torchattacks: wall s | speed-up (wall) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, what, mine, other in rows:
        fns = [mine] + ([other] if other is not None else [])
        times: list[list[float]] = [[] for _ in fns]
        cpu: list[list[float]] = [[] for _ in fns]
        accs: list[set[int]] = [set() for _ in fns]
        for r in range(args.repeats):
            order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
            for i in order:
                t0, c0 = time.perf_counter(), time.process_time()
                x_adv = fns[i](x, y)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
                check_ball(x_adv, x, args.eps, f"{row} ({'ours' if i == 0 else 'torchattacks'})")
                accs[i].add(robust(model, x_adv, y))
        med = [statistics.median(t) for t in times]
        med_cpu = [statistics.median(t) for t in cpu]
        acc = [", ".join(f"{a / len(x):.1%}" for a in sorted(s)) for s in accs]
        if other is None:
            print(f"| {row} | {what} | {acc[0]} | (not installed) | {med_cpu[0]:.2f} | | | {med[0]:.2f} | | |",
                  flush=True)
        else:
            print(f"| {row} | {what} | {acc[0]} | {acc[1]} | {med_cpu[0]:.2f} | {med_cpu[1]:.2f} | "
                  f"{med_cpu[1] / med_cpu[0]:.2f}x | {med[0]:.2f} | {med[1]:.2f} | {med[1] / med[0]:.2f}x |", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
