#!/usr/bin/env python3
"""PGD throughput: the library's attack against a straightforward reference implementation.

The reference is the loop most tutorials write (and the seed tutorial's): each step makes the
input a leaf with ``requires_grad_()``, calls ``loss.backward()`` (which also fills every
parameter's ``.grad``), zeroes the model's gradients and projects with ``min``/``max``/``clamp``.
The library's :class:`robustfl_lib.PGD` freezes the parameters for the duration of the attack
(autograd then computes no weight gradients and keeps no activations for them), takes
``torch.autograd.grad`` with respect to the input only, and updates and projects in place with
one precomputed ``[max(x - eps, 0), min(x + eps, 1)]`` clamp. On a CPU it also runs a CNN with
channels-last copies of its convolution weights (``channels_last=None``, the default), for
oneDNN's faster convolution and max-pooling kernels in that layout; the column "plain layout"
(``channels_last=False``) shows what the first three changes alone give.

All run the same model in eval mode, on the same data, from the same start
(``random_start=False``). Before timing, the script checks that the plain-layout library
returns the reference's adversarial examples, and that the default one differs from them in
fewer than 1% of the pixels (the layouts round differently, so a gradient coordinate near zero
can change sign). Each timing is the median of ``--repeats`` runs after a warm-up.

    python benchmarks/attacks.py                 # digits MLP and MNIST-shaped CNN, PGD-10
    python benchmarks/attacks.py --threads 1 --repeats 9 --device cuda

With ``--train`` it also times one epoch of PGD adversarial training of the CNN on
MNIST-shaped data (real MNIST from ../shared/data/mnist when present), useful on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import robustfl_lib as rfl  # noqa: E402


def reference_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """The textbook loop: requires_grad_ + backward each step, projection by min/max/clamp."""
    model.eval()
    x_adv = x.clone()
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_()
        loss = F.cross_entropy(model(x_adv), y)
        model.zero_grad()
        loss.backward()
        x_adv = x_adv.detach() + alpha * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter


def median_seconds(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median time of each of ``fns``, timed interleaved (A, B, B, A, A, B, ...) after one warm-up
    call each, so a change in the machine's load hits every contender alike. ``CLOCK`` is wall
    time, or with ``--clock cpu`` this process's CPU time (robust to other processes on a shared
    machine when running on one thread)."""
    for fn in fns:
        fn()  # warm-up: allocator, kernels, lazy initialisation
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            _sync(device)
            start = CLOCK()
            fns[i]()
            _sync(device)
            times[i].append(CLOCK() - start)
    return [statistics.median(t) for t in times]


def cases(device: torch.device, cnn_batches: list[int]) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor, float]]:
    torch.manual_seed(0)
    digits = rfl.load_dataset("digits", seed=0)
    x_d = torch.cat([digits.x_train, digits.x_test]).to(device)
    y_d = torch.cat([digits.y_train, digits.y_test]).to(device)
    mlp = rfl.MLP(digits.input_shape, 10).to(device)
    out = [(f"digits MLP {tuple(x_d.shape)}", mlp, x_d, y_d, 0.1)]
    cnn = rfl.SmallCNN((1, 28, 28), 10).to(device)
    for n in cnn_batches:
        # Random MNIST-shaped inputs suffice for timing: the cost does not depend on the pixels.
        x_m = torch.rand(n, 1, 28, 28, device=device)
        y_m = torch.randint(0, 10, (n,), device=device)
        out.append((f"MNIST-shaped CNN {tuple(x_m.shape)}", cnn, x_m, y_m, 0.3))
    return out


def bench_attacks(device: torch.device, steps: int, repeats: int, cnn_batches: list[int]) -> list[dict]:
    rows = []
    for name, model, x, y, eps in cases(device, cnn_batches):
        alpha = 2.5 * eps / steps
        lib = rfl.PGD(eps, alpha=alpha, steps=steps, random_start=False)
        plain = rfl.PGD(eps, alpha=alpha, steps=steps, random_start=False, channels_last=False)
        ref_out = reference_pgd(model, x, y, eps, alpha, steps)
        agree = (ref_out - plain(model, x, y)).abs().max().item()
        if agree > 1e-5:
            raise AssertionError(f"{name}: library (plain layout) and reference PGD disagree by {agree}")
        differ = (ref_out != lib(model, x, y)).float().mean().item()
        if differ > 0.01:
            raise AssertionError(f"{name}: library and reference PGD differ in {differ:.1%} of the pixels")
        t_ref, t_plain, t_lib = median_seconds(
            [lambda: reference_pgd(model, x, y, eps, alpha, steps), lambda: plain(model, x, y), lambda: lib(model, x, y)],
            repeats, device,
        )
        rows.append(dict(case=name, steps=steps, ref=len(x) / t_ref, plain=len(x) / t_plain, lib=len(x) / t_lib,
                         ratio=t_ref / t_lib, differ=differ))
    return rows


def bench_training(device: torch.device, repeats: int, batch_size: int, n: int) -> dict:
    mnist_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    if (mnist_dir / "t10k-images-idx3-ubyte.gz").exists():
        data = rfl.load_dataset("mnist", root=mnist_dir, files="t10k", test_fraction=0.2)
        x, y, source = data.x_train[:n], data.y_train[:n], f"MNIST t10k, {min(n, len(data.x_train)):,} train images"
    else:
        x, y, source = torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,)), f"random MNIST-shaped, {n:,} images"
    model = rfl.SmallCNN((1, 28, 28), 10).to(device)
    attack = rfl.PGD(0.3, alpha=0.01, steps=40)
    x, y = x.to(device), y.to(device)

    def epoch() -> None:
        rfl.adversarial_train(model, x, y, attack, epochs=1, mix=1.0, lr=0.05, batch_size=batch_size)

    (t,) = median_seconds([epoch], repeats, device)
    return dict(source=source, seconds=t, examples_per_s=len(x) / t)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (for a shared CPU, with --threads 1)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cnn-batch", type=int, nargs="+", default=[128, 512], help="CNN batch sizes")
    parser.add_argument("--train", action="store_true", help="also time PGD-40 adversarial training on MNIST")
    parser.add_argument("--train-n", type=int, default=8000, help="training images for --train")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = rfl.get_device(args.device)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
          f"PGD-{args.steps}, median of {args.repeats} runs, {args.clock} clock\n")
    print("| case | reference (ex/s) | robustfl_lib, plain layout (ex/s) | robustfl_lib (ex/s) | speed-up | pixels that differ |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in bench_attacks(device, args.steps, args.repeats, args.cnn_batch):
        print(f"| {r['case']} | {r['ref']:,.0f} | {r['plain']:,.0f} | {r['lib']:,.0f} | {r['ratio']:.2f}x "
              f"| {r['differ']:.2%} |")
    if args.train:
        r = bench_training(device, max(1, args.repeats // 3), batch_size=128, n=args.train_n)
        print(f"\nPGD-40 adversarial training of SmallCNN ({r['source']}), batch 128, one epoch: "
              f"{r['seconds']:.1f} s, {r['examples_per_s']:,.0f} examples/s")


if __name__ == "__main__":
    main()
