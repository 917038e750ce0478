"""The worst-case benchmark (robustfl_lib.worstcase): selection on validation, the minimum over
attacks, the estimate, CSV round trip, config errors, lock-step grouping, and the CLI."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

import robustfl_lib as rfl
from robustfl_lib.cli import main
from robustfl_lib.federated import GRID_VARIABLE, config_dict
from robustfl_lib.worstcase import ROW_COLUMNS, WorstCaseResult, load_worst_case_config, worst_case_benchmark
from robustfl_lib.worstcase import run as wc_run
from robustfl_lib.worstcase.config import _plan

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dataset="digits", num_clients=10, rounds=2, local_epochs=1, seeds=2, base_seed=3,
            fractions=[0.2], heterogeneity=["iid"])


def tiny(**changes):
    return {**TINY, "rules": ["median", "trimmed_mean"], "attacks": ["sign_flip", "ipm"], **changes}


def rows_for(acc_val, acc_test, settings=("a", "b"), attacks=("x", "y"), seeds=(1, 2), n_test=360):
    """Crafted rows of one cell: acc_val[setting][attack] is the list of per-seed values."""
    rows = []
    for s in settings:
        for a in attacks:
            for k, seed in enumerate(seeds):
                rows.append(dict(heterogeneity="iid", fraction=0.2, num_byzantine=2, rule="r", setting=s, attack=a,
                                 seed=seed, val_accuracy=acc_val[s][a][k], test_accuracy=acc_test[s][a][k],
                                 n_val=288, n_test=n_test, status="ok"))
    return rows


# -- the summary, from crafted rows


VAL = {"a": {"x": [0.70, 0.60], "y": [0.50, 0.80]}, "b": {"x": [0.62, 0.64], "y": [0.66, 0.60]}}
TEST = {"a": {"x": [0.30, 0.40], "y": [0.45, 0.20]}, "b": {"x": [0.90, 0.88], "y": [0.86, 0.91]}}


def test_worst_case_is_the_min_over_attacks_of_the_seed_mean():
    (cell,) = WorstCaseResult(rows_for(VAL, TEST), worst_case="mean").summary
    # validation: a's attack means are 0.65, 0.65 -> 0.65; b's 0.63, 0.63 -> 0.63: a wins
    score = {s: min(np.mean(VAL[s][a]) for a in "xy") for s in "ab"}
    assert cell["setting"] == "a" and cell["val_worst_case"] == pytest.approx(score["a"])
    assert cell["setting_scores"] == pytest.approx(score)
    # test at a: means 0.35 (x) and 0.325 (y): y is worst
    assert cell["worst_attack"] == "y"
    assert cell["estimate"].values == pytest.approx(tuple(TEST["a"]["y"]))


def test_per_seed_convention_takes_the_min_per_seed():
    (cell,) = WorstCaseResult(rows_for(VAL, TEST), worst_case="per_seed").summary
    score = {s: np.mean([min(VAL[s][a][k] for a in "xy") for k in range(2)]) for s in "ab"}
    assert score["b"] > score["a"]  # per seed: a's 0.5, 0.6 -> 0.55; b's 0.62, 0.60 -> 0.61
    assert cell["setting"] == "b" and cell["val_worst_case"] == pytest.approx(score["b"])
    per_seed = [min(TEST["b"][a][k] for a in "xy") for k in range(2)]  # 0.86 (y), 0.88 (x)
    assert cell["estimate"].values == pytest.approx(tuple(per_seed))
    assert cell["worst_attack"] in ("x (1/2)", "y (1/2)")


def test_selection_is_by_validation_not_test():
    (cell,) = WorstCaseResult(rows_for(VAL, TEST)).summary
    test_best = max("ab", key=lambda s: min(np.mean(TEST[s][a]) for a in "xy"))
    assert test_best == "b" and cell["setting"] == "a"  # test would pick b; validation picks a


def test_estimate_equals_summarize_of_the_chosen_values():
    (cell,) = WorstCaseResult(rows_for(VAL, TEST, n_test=123)).summary
    expected = rfl.summarize(TEST["a"]["y"], n_test=123)
    e = cell["estimate"]
    assert (e.value, e.low, e.high, e.k) == (expected.value, expected.low, expected.high, expected.k)


def test_ties_go_to_the_first_setting_and_attack():
    same = {"a": {"x": [0.5, 0.5], "y": [0.5, 0.5]}, "b": {"x": [0.5, 0.5], "y": [0.5, 0.5]}}
    (cell,) = WorstCaseResult(rows_for(same, same)).summary
    assert cell["setting"] == "a" and cell["worst_attack"] == "x"


def test_incomplete_rows_are_refused():
    rows = rows_for(VAL, TEST)[:-1]
    with pytest.raises(ValueError, match="every setting needs every attack at every seed"):
        WorstCaseResult(rows)
    with pytest.raises(ValueError, match="worst_case"):
        WorstCaseResult(rows_for(VAL, TEST), worst_case="median")


def test_csv_round_trip(tmp_path):
    rows = rows_for(VAL, TEST)
    rows.append({**dict.fromkeys(ROW_COLUMNS), "heterogeneity": "iid", "fraction": 0.2, "num_byzantine": 2,
                 "rule": "krum", "setting": "default", "status": "n/a: Krum needs n > 2f + 2"})
    result = WorstCaseResult(rows)
    summary_path = result.to_csv(tmp_path / "wc.csv")
    assert summary_path == tmp_path / "wc_summary.csv" and summary_path.read_text().count("\n") == 3
    back = WorstCaseResult.from_csv(tmp_path / "wc.csv")
    assert back.rows == result.rows
    assert [s["estimate"] for s in back.summary] == [s["estimate"] for s in result.summary]
    assert back.summary[1]["status"].startswith("n/a") and back.summary[1]["estimate"] is None
    assert back.table() == result.table() and "n/a (Krum needs n > 2f + 2)" in back.table()


def test_heatmap_annotates_every_cell():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = WorstCaseResult(rows_for(VAL, TEST)).heatmap()
    (e,) = [c["estimate"] for c in WorstCaseResult(rows_for(VAL, TEST)).summary]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == [f"{e.value:.2f}\n[{e.low:.2f}, {e.high:.2f}]"] and fig.axes[0].images[0].cmap.name == "cividis"
    plt.close(fig)


# -- config validation


@pytest.mark.parametrize("change, message", [
    ({"rules": ["medain"]}, r"rules\[0\] \(medain\): unknown aggregator 'medain'"),
    ({"rules": ["foo+median"]}, "unknown pre-aggregator"),
    ({"attacks": ["sign_flip", "sign_flipp"]}, r"attacks\[1\]: unknown attack 'sign_flipp'"),
    ({"fractions": [1.5]}, r"fractions: .* in \[0, 1\), got 1.5"),
    ({"fractions": [0.05]}, "makes no client Byzantine"),
    ({"fractions": ["0.2"]}, "fractions"),
    ({"heterogeneity": ["noniid"]}, "'iid' or a Dirichlet alpha > 0"),
    ({"seeds": 1}, "k >= 2"),
    ({"worst_case": "avg"}, "worst_case"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"roundz": 3}, r"unknown key\(s\) \['roundz'\]"),
    ({"partition": "iid"}, "set by the benchmark"),
    ({"rounds": 0}, "rounds must be >= 1"),
    ({"rules": [{"name": "median", "grid": {"rounds": [2, 3]}}]}, "grid.rounds cannot be tuned per rule"),
    ({"rules": [{"name": "median", "grid": {"nnm": {"k": [1]}}}]}, "names no pre-aggregation step"),
    ({"rules": [{"name": "median", "grid": {"tua": [1.0]}}]}, "rule 'median', setting 'tua=1.0'"),
    ({"rules": ["median", "median"]}, "labels must be distinct"),
    ({"attacks": [{"name": "alie", "kwargs": {"z": "big"}}]}, "attack 'alie'"),
    ({"full": {"rulez": []}}, r"full: unknown key"),
])
def test_config_errors_are_clear(change, message):
    with pytest.raises(ValueError, match=message):
        load_worst_case_config(tiny(**change))


def test_the_shipped_configs_load_and_full_applies_its_table():
    demo = load_worst_case_config(REPO / "benchmarks" / "worstcase_demo.toml", base_seed=11)
    full = load_worst_case_config(REPO / "benchmarks" / "worstcase_demo.toml", full=True, base_seed=11)
    assert demo.fl["rounds"] < full.fl["rounds"] and len(full.fractions) > len(demo.fractions)
    assert demo.seeds == tuple(rfl.derive_seeds(11, 5)) and len(demo.seeds) >= rfl.MIN_SEEDS
    assert "optimal_alie" in [a.name for a in demo.attacks]  # the optimising attacks are in the worst case


# -- the plan: attacks against the rule, step parameters, n/a, grouping


def test_an_attack_that_needs_the_rule_gets_the_cell_rule():
    cfg = load_worst_case_config(tiny(rules=[{"name": "bucketing+trimmed_mean", "grid": {"bucketing": {"s": [2]}}}],
                                      attacks=["optimal_alie", "alie"]))
    (entry,) = _plan(cfg)
    rule = entry["runs"]["alie"].aggregator  # a step's own parameter: the pipeline is built here
    assert isinstance(rule, rfl.Pipeline) and rule.steps[0].s == 2 and rule.steps[1].f == 2
    attack = entry["runs"]["optimal_alie"].byzantine_attack
    assert isinstance(attack, rfl.OptimalALIE) and config_dict(dataclasses.replace(
        entry["runs"]["alie"], aggregator=attack.aggregator)) == config_dict(entry["runs"]["alie"])
    assert entry["runs"]["alie"].byzantine_attack == "alie"  # a plain name stays a name


def test_aggregator_rule_asks_for_the_cell_rule_and_a_probe_refuses_what_cannot_forge():
    fk = {"name": "fang_krum", "label": "fk", "kwargs": {"aggregator": "rule"}}
    (entry,) = _plan(load_worst_case_config(tiny(rules=["nnm+krum"], attacks=[fk])))
    attack = entry["runs"]["fk"].byzantine_attack
    assert isinstance(attack.aggregator, rfl.Pipeline) and attack.f == 2
    with pytest.raises(ValueError, match="attack 'fk'.*cannot forge.*reports which rows it selected"):
        load_worst_case_config(tiny(rules=["trimmed_mean"], attacks=[fk]))  # the rule reports no selection


def test_a_rule_that_cannot_run_is_na(monkeypatch):
    monkeypatch.setattr(wc_run, "_run_group", lambda configs, seeds, fit, report:
                        {name: [(0.5, 0.5, "ok")] * len(seeds) for name in configs})
    result = worst_case_benchmark(tiny(num_clients=5, fractions=[0.4], rules=["krum", "median"]), progress=False)
    krum, median = result.summary
    assert krum["estimate"] is None and "n/a" in krum["status"] and "2f + 2" in krum["status"]
    assert median["status"] == "ok" and median["estimate"].value == 0.5


def test_runs_are_grouped_into_lock_step_grids(monkeypatch):
    calls = []

    def fake(configs, seeds, fit, report):
        calls.append(dict(configs))
        return {name: [(0.5, 0.5, "ok")] * len(seeds) for name in configs}

    monkeypatch.setattr(wc_run, "_run_group", fake)
    config = tiny(fractions=[0.1, 0.2], rules=[{"name": "centered_clipping", "grid": {"lr": [0.1, 0.2],
                                                                                        "iterations": [1, 3]}}])
    worst_case_benchmark(config, progress=False)
    assert len(calls) == 2  # one grid per learning rate: fractions, iterations and attacks share it
    for group in calls:
        assert len(group) == 2 * 2 * 2
        first = config_dict(next(iter(group.values())))
        for c in group.values():
            assert {k: v for k, v in config_dict(c).items() if k not in GRID_VARIABLE} == \
                {k: v for k, v in first.items() if k not in GRID_VARIABLE}


def test_selection_by_validation_through_the_runner(monkeypatch):
    """The whole benchmark, with the run function returning crafted accuracies: validation and
    test disagree on the best setting, and the validation-best one is chosen."""
    iterations = {1: "a", 3: "b"}

    def fake(configs, seeds, fit, report):
        assert all(len(fit[s].y_test) != len(report[s].y_test) for s in seeds)  # validation vs test split
        out = {}
        for (i, attack), c in configs.items():
            s = iterations[c.aggregator_kwargs["iterations"]]
            a = {"sign_flip": "x", "ipm": "y"}[attack]
            out[(i, attack)] = [(VAL[s][a][k], TEST[s][a][k], "ok") for k in range(len(seeds))]
        return out

    monkeypatch.setattr(wc_run, "_run_group", fake)
    result = worst_case_benchmark(tiny(rules=[{"name": "centered_clipping", "grid": {"iterations": [1, 3]}}]),
                                  progress=False)
    (cell,) = result.summary
    assert cell["setting"] == "iterations=1" and cell["worst_attack"] == "ipm"
    assert cell["estimate"].values == pytest.approx(tuple(TEST["a"]["y"]))
    assert len(result.rows) == 2 * 2 * 2 and {r["n_test"] for r in result.rows} == {360}


# -- real runs


def test_validation_split_holds_out_a_stratified_part(digits):
    fit, report = rfl.validation_split(digits, 0.2, seed=5)
    n = len(digits.y_train)
    assert len(fit.y_test) == math.ceil(0.2 * n) and len(fit.y_train) + len(fit.y_test) == n
    assert fit.x_train is report.x_train and report.x_test is digits.x_test
    counts = np.bincount(fit.y_train, minlength=10) + np.bincount(fit.y_test, minlength=10)
    assert (counts == np.bincount(digits.y_train, minlength=10)).all()
    share = np.bincount(fit.y_test, minlength=10) / np.bincount(digits.y_train, minlength=10)
    assert np.allclose(share, 0.2, atol=0.03)
    with pytest.raises(ValueError, match="fraction"):
        rfl.validation_split(digits, 0.0, seed=5)


def test_cli_end_to_end(tmp_path, capsys, one_thread):
    config = tmp_path / "tiny.toml"
    config.write_text('dataset = "digits"\nnum_clients = 10\nrounds = 2\nlocal_epochs = 1\nseeds = 2\n'
                      'fractions = [0.2]\nheterogeneity = ["iid"]\nrules = ["mean", "median"]\n'
                      'attacks = ["sign_flip", "nonfinite"]\n')
    out = tmp_path / "out" / "wc.csv"
    assert main(["worst-case", "--config", str(config), "--out", str(out), "--seed", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| iid | 0.2 | median |" in printed and "wall time" in printed
    result = WorstCaseResult.from_csv(out)
    assert len(result.rows) == 2 * 2 * 2 and {r["seed"] for r in result.rows} == set(rfl.derive_seeds(4, 2))
    refused = [r for r in result.rows if r["rule"] == "mean" and r["attack"] == "nonfinite"]
    assert all(r["status"] == "refused" and r["test_accuracy"] == 0.0 for r in refused)  # a failed run scores 0
    mean = next(s for s in result.summary if s["rule"] == "mean")
    assert mean["worst_attack"] == "nonfinite" and mean["estimate"].value == 0.0
    ok = [r for r in result.rows if r["status"] == "ok"]
    assert ok and all(0 < r["val_accuracy"] <= 1 and 0 < r["test_accuracy"] <= 1 for r in ok)
    assert all(math.isclose(r["test_accuracy"] * 360, round(r["test_accuracy"] * 360)) for r in ok)
    assert (tmp_path / "out" / "wc_summary.csv").exists()


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('rules = ["median"]\nattacks = ["nope"]\n')
    (tmp_path / "broken.toml").write_text("rules = [")
    for path, message in ((config, "attacks[0]: unknown attack 'nope'"), (tmp_path / "missing.toml", "not found"),
                          (tmp_path / "broken.toml", "not valid TOML")):
        assert main(["worst-case", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("robustfl: error: ") and err.count("\n") == 1 and message in err


def test_same_seed_same_numbers(one_thread):
    config = tiny(rounds=1, rules=["median"], attacks=["alie", "sign_flip"])
    first, second = (worst_case_benchmark(config, progress=False) for _ in range(2))
    assert first.rows == second.rows
    other = worst_case_benchmark({**config, "base_seed": 4}, progress=False)
    assert [r["seed"] for r in other.rows] != [r["seed"] for r in first.rows]


def test_without_a_toml_reader_the_error_says_what_to_install(monkeypatch, tmp_path):
    from robustfl_lib.worstcase import config as wc_config

    monkeypatch.setattr(wc_config, "tomllib", None)
    (tmp_path / "c.toml").write_text('rules = ["median"]\n')
    with pytest.raises(RuntimeError, match="Python >= 3.11 .* tomli"):
        load_worst_case_config(tmp_path / "c.toml")
    assert load_worst_case_config(tiny()).rules[0].name == "median"  # a dict needs no reader
