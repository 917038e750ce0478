"""Round time of the FL simulation: vectorized (all clients in one batched computation)
against the sequential client-by-client loop, at 10, 50 and 200 clients, with standard and
PGD adversarial local training. Medians of several rounds; the speed-up is the ratio measured
in the same run.

    python benchmarks/federated.py                      # digits MLP on the CPU
    python benchmarks/federated.py --device cuda        # the same on a GPU
    python benchmarks/federated.py --clients 10 50 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import robustfl_lib as rfl
from robustfl_lib.federated import _Simulation, _train_clients


def round_seconds(config: rfl.FLConfig, data: rfl.Dataset, repeats: int) -> float:
    """Median wall time of the local training of one round (all participants)."""
    sim = _Simulation(config, data, rfl.get_device(config.device))
    times = []
    for rnd in range(1, repeats + 1):
        xs, ys, gens = sim.plan(rnd)
        if config.device and config.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        trained = _train_clients(sim.model, xs, ys, gens, config, rnd, None)
        if config.device and config.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        sim.finish(rnd, trained)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--repeats", type=int, default=3, help="rounds timed per setting (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--adv-steps", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = rfl.load_dataset("digits", seed=0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {rfl.get_device(args.device)}")
    print(f"{'clients':>7} {'local training':>15} {'sequential s':>13} {'vectorized s':>13} {'speed-up':>9}")
    for n in args.clients:
        for training in ("standard", "adversarial"):
            cfg = dict(num_clients=n, rounds=args.repeats, local_epochs=2, lr=0.2, batch_size=16, partition="iid",
                       local_training=training, adv_eps=0.1, adv_steps=args.adv_steps, device=args.device,
                       eval_every=10**6, progress=False)
            seq = round_seconds(rfl.FLConfig(vectorized=False, **cfg), data, args.repeats)
            vec = round_seconds(rfl.FLConfig(vectorized=True, **cfg), data, args.repeats)
            print(f"{n:>7} {training:>15} {seq:13.3f} {vec:13.3f} {seq / vec:8.1f}x", flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
