"""Chapter 9's federation three ways: in this process, in Flower's simulation engine, deployed.

One :class:`~robustfl_lib.FLConfig` (chapter 9's pipeline, shrunk for two cores: digits split
among 5 clients by a Dirichlet label skew, alpha 0.5; 3 rounds of 2 local epochs (chapter 14's
setting); every honest client trains adversarially,
PGD-3 at eps 0.12 mixed 50/50 with the clean loss; one of the five is Byzantine; centered
clipping aggregates; final clean accuracy and robust accuracy under PGD-10 at eps 0.1 on the
360 test digits) runs, for each seed,

* **in-process**: ``rfl.run_federated`` (the default ``vectorized=True``: all clients of a round
  in one batched computation), and, as the reference the Flower paths should match bit for
  bit, the client-by-client path ``vectorized=False`` (seconds; not a third runtime);
* **simulation**: ``run_flower_simulation`` (Ray, one worker per core, one thread each);
* **deployment**: ``LocalFederation`` with TLS (a local CA, a server certificate for
  127.0.0.1) and SuperNode authentication: a SuperLink and one SuperNode per client as
  processes, the app submitted with ``flwr run``; the final model is read from the
  ServerApp's checkpoint. Every process is ended when the block is left, also on failure.

The Byzantine client flips its labels (``label_flip``) by default: a data-poisoning attack is
the same computation in all three runtimes, while ALIE or IPM differ by threat model (in
``run_federated`` the attacker sees every honest update; a deployed device sees only its own
data, chapter 14's ``knowledge="local"``), and the comparison is of runtimes, not of threat
models. ``--attack alie`` runs that instead: Flower then attacks with local knowledge and the
in-process rows with omniscient ALIE, and the table says so.

Expected differences, and why: simulation and deployment run the same ClientApp and ServerApp
code on one thread per client with the same seeds and aggregate in partition order, so their
final models are equal bit for bit (``tests/test_flower_deploy.py`` asserts it for chapter
14's demo); so is the client-by-client in-process path (chapter 14 asserts it for the
simulation engine). The vectorized path rounds a batched matrix product differently in the
last bit, which a few rounds can carry into a few test predictions: its accuracy differences
are printed as paired 95% intervals over the seeds, floored by the 360-digit test set.

    python benchmarks/flower_paths.py                        # 5 seeds from ROBUSTFL_SEED (0)
    python benchmarks/flower_paths.py --seeds 3 --rounds 2   # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import robustfl_lib as rfl
from robustfl_lib.flower import config_to_run_config, run_flower_simulation
from robustfl_lib.flower.deployment import LocalFederation, node_configs, read_result, write_app

PATHS = ("in-process", "in-process sequential", "simulation", "deployment")
# pairs whose final models should be equal bit for bit (module docstring)
BITWISE = (("deployment", "simulation"), ("in-process sequential", "simulation"))


def chapter9_config(seed: int, rounds: int, num_clients: int, attack: str) -> rfl.FLConfig:
    """Chapter 9's adversarially trained pipeline (its ``pipe_base``) at a size two cores can run
    as processes; chapter 14's rule (centered clipping)."""
    return rfl.FLConfig(dataset="digits", num_clients=num_clients, rounds=rounds, local_epochs=2, lr=0.3,
                        batch_size=16, partition="dirichlet", alpha=0.5, local_training="adversarial", adv_eps=0.12,
                        adv_steps=3, adv_mix=0.5, aggregator="centered_clipping", byzantine_fraction=0.2,
                        byzantine_attack=attack, eval_eps=0.1, eval_steps=10, eval_every=rounds, seed=seed,
                        progress=False)


def final(result: rfl.FLResult) -> tuple[float, float]:
    last = result.history[-1]
    return float(last["clean_accuracy"]), float(last["robust_accuracy"])


def same_model(a: rfl.FLResult, b: rfl.FLResult) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def deployed(config: rfl.FLConfig, work: Path, timeout: float) -> tuple[rfl.FLResult, float, float]:
    """``config`` on a TLS + authenticated local federation: (result, setup seconds, run seconds).
    Setup: certificates, SuperLink, keys, registration, SuperNodes online; run: ``flwr run``."""
    run_config = {**config_to_run_config(config), "round-timeout": 300.0, "wait-for-nodes": 120.0,
                  "checkpoint-dir": str(work / "checkpoint")}
    app = write_app(work / "app", run_config)
    start = time.perf_counter()
    with LocalFederation(work / "federation", tls=True, auth=True) as fed:
        fed.start()
        for nc in node_configs(run_config):
            fed.add_node(nc)
        fed.wait_for_nodes(config.num_clients, timeout=120)
        setup = time.perf_counter() - start
        run = fed.run(app, timeout=timeout)
        if not run.ok():
            raise RuntimeError(f"flwr run failed ({run.returncode}):\n{run.output[-3000:]}")
    left = [p.name for p in fed.processes if p.popen.poll() is None]
    if left:
        raise RuntimeError(f"processes still running after the federation closed: {left}")
    result = read_result(work / "checkpoint", run_config)
    if [h["round"] for h in result.history] != list(range(1, config.rounds + 1)):
        raise RuntimeError(f"the deployed run recorded rounds {[h['round'] for h in result.history]}")
    return result, setup, run.seconds


def one_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, dict]:
    config = chapter9_config(seed, args.rounds, args.clients, args.attack)
    data = rfl.load_dataset(config.dataset, seed=seed)  # what every Flower node loads (cached_dataset)
    knowledge = "local"  # the only attacker a deployment has (no server-side collusion)
    out: dict[str, dict] = {}
    for name, cfg in (("in-process", config), ("in-process sequential", dataclasses.replace(config, vectorized=False))):
        start = time.perf_counter()
        result = rfl.run_federated(cfg, data=data)
        out[name] = {"result": result, "seconds": time.perf_counter() - start}
    start = time.perf_counter()
    result = run_flower_simulation(config, data=data, knowledge=knowledge, num_cpus=args.cpus)
    out["simulation"] = {"result": result, "seconds": time.perf_counter() - start}
    result, setup, seconds = deployed(config, work / f"seed-{seed}", args.timeout)
    out["deployment"] = {"result": result, "seconds": seconds, "setup": setup}
    byz = {name: list(map(int, r["result"].byzantine)) for name, r in out.items() if name != "deployment"}
    print(f"seed {seed}: " + ", ".join(f"{n} {r['seconds']:.1f} s" for n, r in out.items())
          + f" (+{setup:.1f} s federation setup); Byzantine clients {byz}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds, derived from ROBUSTFL_SEED (default 5)")
    parser.add_argument("--base-seed", type=int, default=None, help="default: $ROBUSTFL_SEED or 0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=5, help="clients = SuperNodes (one Byzantine at 5)")
    parser.add_argument("--attack", default="label_flip", help="byzantine_attack (default label_flip, see above)")
    parser.add_argument("--cpus", type=int, default=2, help="Ray workers of the simulation engine")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one flwr run may take")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (an interval over seeds; the book asks for 5)")
    torch.set_num_threads(1)  # the thread count of a Ray worker and of a SuperNode (OMP_NUM_THREADS=1)
    base = rfl.base_seed() if args.base_seed is None else args.base_seed
    seeds = rfl.derive_seeds(base, args.seeds)
    cfg = chapter9_config(seeds[0], args.rounds, args.clients, args.attack)
    print(f"robustfl {rfl.__version__}, torch {torch.__version__}, flwr {__import__('flwr').__version__}, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the "
          f"start; base seed {base}, seeds {seeds}")
    print(f"{cfg.num_clients} clients ({cfg.partition} alpha {cfg.alpha}), {cfg.rounds} rounds, "
          f"{cfg.local_training} local training (PGD-{cfg.adv_steps}, eps {cfg.adv_eps}, mix {cfg.adv_mix}), "
          f"{cfg.aggregator}, Byzantine fraction {cfg.byzantine_fraction} ({cfg.byzantine_attack}"
          + ("" if args.attack == "label_flip" else "; in-process omniscient, Flower local knowledge")
          + f"), robust accuracy: PGD-{cfg.eval_steps} at eps {cfg.eval_eps}; one thread per client")
    runs = []
    with tempfile.TemporaryDirectory(prefix="flower_paths_") as tmp:
        for seed in seeds:
            runs.append(one_seed(seed, args, Path(tmp)))
    n_test = len(rfl.load_dataset(cfg.dataset, seed=seeds[0]).y_test)
    acc = {p: [final(r[p]["result"]) for r in runs] for p in PATHS}
    secs = {p: [r[p]["seconds"] for r in runs] for p in PATHS}
    setup = [r["deployment"]["setup"] for r in runs]

    print(f"\n{'path':<22} {'clean accuracy':>30} {'robust accuracy':>30} {'wall s (median)':>16}")
    for p in PATHS:
        clean = rfl.summarize([a[0] for a in acc[p]], n_test=n_test)
        robust = rfl.summarize([a[1] for a in acc[p]], n_test=n_test)
        extra = f"  + {statistics.median(setup):.0f} s setup" if p == "deployment" else ""
        print(f"{p:<22} {clean.value:.3f} [{clean.low:.3f}, {clean.high:.3f}]{'':>9} "
              f"{robust.value:.3f} [{robust.low:.3f}, {robust.high:.3f}]{'':>9} {statistics.median(secs[p]):>10.1f}{extra}")
    print(f"(95% intervals over {len(seeds)} seeds; wall time of the run: in-process and simulation from the call "
          f"to the result, Ray's start included; deployment: flwr run, after the federation is up)")

    print("\ndifferences between paths (a - b), final accuracy, per seed and paired 95% interval:")
    failed = []
    for a, b in (("deployment", "simulation"), ("simulation", "in-process sequential"), ("simulation", "in-process"),
                 ("deployment", "in-process")):
        bitwise = [same_model(r[a]["result"], r[b]["result"]) for r in runs]
        for k, key in enumerate(("clean", "robust")):
            d = rfl.paired_difference([x[k] for x in acc[a]], [x[k] for x in acc[b]], n_test=n_test,
                                      what=f"{a} - {b}, {key}")
            per_seed = " ".join(f"{x[k] - y[k]:+.4f}" for x, y in zip(acc[a], acc[b]))
            print(f"  {d}; per seed {per_seed}")
        print(f"  {a} vs {b}: same final model bit for bit at {sum(bitwise)} of {len(bitwise)} seeds")
        if (a, b) in BITWISE or (b, a) in BITWISE:
            if not all(bitwise):
                failed.append(f"{a} vs {b}: expected bit for bit, differ at seeds "
                              f"{[s for s, ok in zip(seeds, bitwise) if not ok]}")
    ratio = [d / s for d, s in zip(secs["deployment"], secs["simulation"])]
    print(f"\nwall time, deployment run / simulation: median {statistics.median(ratio):.2f} "
          f"(per seed {' '.join(f'{x:.2f}' for x in ratio)}); in-process sequential / vectorized: median "
          f"{statistics.median(s / v for s, v in zip(secs['in-process sequential'], secs['in-process'])):.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (wall times scale with the machine's other load)")
    for line in failed:
        print("UNEXPECTED:", line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
