#!/usr/bin/env python3
"""The library's optimising update attacks beside ByzFL's, by the damage they do.

    python benchmarks/update_attacks.py             # 20 seeds, n_h = 8 honest + f = 2 Byzantine, d = 50
    python benchmarks/update_attacks.py --seeds 5 --honest 16 --byzantine 4 --dim 1000

For each rule and seed, honest updates are drawn as N(1, I_d) rows (the same for both libraries);
each library's optimal ALIE (ours: :class:`robustfl_lib.OptimalALIE`; ByzFL:
``Optimal_ALittleIsEnough``) and optimal IPM (``OptimalIPM`` / ``Optimal_InnerProductManipulation``)
is given the rule and crafts the Byzantine rows, and the damage is the distance of the rule's
aggregate (computed by robustfl_lib's rule for both, so that only the attacks differ) from the
honest mean. The table prints the ratio ours / ByzFL's damage: its median and range over the seeds.
The two searches differ by design (ours: a logarithmic grid of the scale plus refinement, with
ALIE's sign; ByzFL's: step doubling then contraction from 0 over both signs), so a ratio below 1
says where ByzFL's search finds a stronger attack. Before that, the script checks that the plain
attacks with shared conventions (sign flip, IPM) give ByzFL's rows exactly. Needs ``byzfl``
(``pip install byzfl``); without it, it says so and exits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import robustfl_lib as rfl  # noqa: E402
from robustfl_lib.peers import import_byzfl  # noqa: E402


def _rows(vector, f: int, d: int) -> torch.Tensor:
    out = torch.as_tensor(np.asarray(vector), dtype=torch.float64)
    return out.expand(f, d) if out.dim() == 1 else out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--honest", type=int, default=8)
    parser.add_argument("--byzantine", type=int, default=2)
    parser.add_argument("--dim", type=int, default=50)
    args = parser.parse_args(argv)
    byzfl = import_byzfl()
    if byzfl is None:
        print("byzfl is not installed (pip install byzfl): nothing to compare")
        return
    nh, f, d = args.honest, args.byzantine, args.dim
    h0 = torch.randn(nh, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flip = rfl.SignFlip()(h0, f)
    torch.testing.assert_close(flip, _rows(byzfl.SignFlipping()(h0.numpy().copy()), f, d))
    ipm = rfl.IPM(epsilon=2.0)(h0, f)
    torch.testing.assert_close(ipm, _rows(byzfl.InnerProductManipulation(tau=2.0)(h0.numpy().copy()), f, d))
    print("sign flip and IPM (tau = 2): the same rows as ByzFL's")

    rules = {  # our rule, and ByzFL's same rule for its attack's search
        "median": (lambda: rfl.get_aggregator("median", f=f), lambda: byzfl.Median()),
        "trimmed_mean": (lambda: rfl.get_aggregator("trimmed_mean", f=f), lambda: byzfl.TrMean(f=f)),
        "krum": (lambda: rfl.get_aggregator("krum", f=f), lambda: byzfl.Krum(f=f)),
        "geometric_median": (lambda: rfl.get_aggregator("geometric_median", f=f), lambda: byzfl.GeometricMedian()),
        "meamed": (lambda: rfl.get_aggregator("meamed", f=f), lambda: byzfl.Meamed(f=f)),
        "mda": (lambda: rfl.get_aggregator("mda", f=f), lambda: byzfl.MDA(f=f)),
    }
    attacks = {
        "optimal ALIE": (lambda agg: rfl.OptimalALIE(aggregator=agg),
                         lambda agg: byzfl.Optimal_ALittleIsEnough(agg=agg, pre_agg_list=[], f=f)),
        "optimal IPM": (lambda agg: rfl.OptimalIPM(aggregator=agg),
                        lambda agg: byzfl.Optimal_InnerProductManipulation(agg=agg, pre_agg_list=[], f=f)),
    }
    print(f"\nn_h = {nh} honest + f = {f} Byzantine, d = {d}, {args.seeds} seeds; "
          "damage = ||rule(all rows) - honest mean||, ratio ours / ByzFL's\n")
    print("| rule | attack | median ratio | min | max | seeds where ours < 0.95 x ByzFL's |")
    print("|---|---|---|---|---|---|")
    for rule_name, (ours_rule, their_rule) in rules.items():
        for attack_name, (ours_attack, their_attack) in attacks.items():
            ratios = []
            for seed in range(args.seeds):
                g = torch.Generator().manual_seed(seed)
                h = torch.randn(nh, d, generator=g, dtype=torch.float64) + 1.0
                mu = h.mean(0)
                np.random.seed(seed)  # ByzFL's rules draw from NumPy's global RNG where they draw
                damage = []
                for byz in (ours_attack(ours_rule())(h, f), _rows(their_attack(their_rule())(h.numpy().copy()), f, d)):
                    damage.append(float((ours_rule()(torch.cat([h, byz])) - mu).norm()))
                ratios.append(damage[0] / damage[1] if damage[1] > 0 else float("inf"))
            weaker = sum(r < 0.95 for r in ratios)
            print(f"| {rule_name} | {attack_name} | {statistics.median(ratios):.3f} | {min(ratios):.3f} | "
                  f"{max(ratios):.3f} | {weaker} / {len(ratios)} |")


if __name__ == "__main__":
    main()
