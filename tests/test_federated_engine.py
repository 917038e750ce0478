"""The FL engine: vectorized == sequential, reproducibility, dropout, robust evaluation, resume, CLI."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch

from robustfl_lib import FLConfig, run_federated
from robustfl_lib.checkpoint import describe, load_checkpoint
from robustfl_lib.cli import main as cli_main

BASE = dict(rounds=3, num_clients=6, partition="dirichlet", alpha=0.5, lr=0.2, local_epochs=1, batch_size=16,
            progress=False)


def _params(result):
    return torch.cat([p.detach().flatten() for p in result.model.parameters()])


# L2 PGD for the adversarial case: its normalized-gradient step is continuous, so the two paths' rounding
# differences stay small. (Linf PGD steps by sign(grad); a rounding difference in a near-zero gradient entry
# flips a sign and moves that pixel by 2 * alpha, so linf runs agree statistically, not to float tolerance.)
@pytest.mark.parametrize("local_training", ["standard", "adversarial"])
def test_vectorized_equals_sequential(digits, local_training):
    cfg = dict(BASE, local_training=local_training, adv_eps=0.5, adv_norm="l2", adv_steps=3, adv_random_start=False,
               aggregator="median", byzantine_fraction=0.2, byzantine_attack="sign_flip")
    vec = run_federated(FLConfig(vectorized=True, **cfg), data=digits)
    seq = run_federated(FLConfig(vectorized=False, **cfg), data=digits)
    torch.testing.assert_close(_params(vec), _params(seq), rtol=1e-4, atol=1e-5)
    for a, b in zip(vec.history, seq.history):
        assert a["participants"] == b["participants"] and a["byzantine"] == b["byzantine"]
        assert abs(a["clean_accuracy"] - b["clean_accuracy"]) <= 1 / len(digits.y_test) + 1e-12


def test_same_seed_identical_history_with_everything_on(digits):
    cfg = dict(BASE, clients_per_round=5, dropout=0.2, aggregator="trimmed_mean", byzantine_fraction=0.2,
               byzantine_attack="gaussian", local_training="adversarial", adv_steps=2, eval_eps=0.1, eval_steps=3)
    a = run_federated(FLConfig(**cfg), data=digits)
    b = run_federated(FLConfig(**cfg), data=digits)
    assert a.history == b.history and torch.equal(_params(a), _params(b))
    assert all(h["robust_accuracy"] is not None and h["robust_accuracy"] <= h["clean_accuracy"] for h in a.history)


def test_dropout_recorded_and_all_dropped_round_keeps_model(digits):
    r = run_federated(FLConfig(**dict(BASE, rounds=4, dropout=0.5)), data=digits)
    for h in r.history:
        assert sorted(h["participants"] + h["dropped_out"]) == list(range(6))
    assert any(h["dropped_out"] for h in r.history)
    # With dropout close to 1 some rounds lose everybody; the model must simply not move.
    r = run_federated(FLConfig(**dict(BASE, rounds=3, num_clients=2, dropout=0.95)), data=digits)
    empty = [h for h in r.history if not h["participants"]]
    assert empty and all(h["update_norm"] == 0.0 and "no participant" in h["aggregation"]["skipped"] for h in empty)
    # Too few answers for the aggregator's f: the round is skipped, with the reason recorded.
    r = run_federated(FLConfig(**dict(BASE, rounds=4, dropout=0.6, aggregator="krum", byzantine_fraction=0.2,
                                      byzantine_attack="sign_flip")), data=digits)
    skipped = [h for h in r.history if "skipped" in h["aggregation"]]
    assert skipped and all("n > 2f + 2" in h["aggregation"]["skipped"] and h["update_norm"] == 0 for h in skipped)


def test_eval_every(digits):
    r = run_federated(FLConfig(**dict(BASE, rounds=5, eval_every=2)), data=digits)
    assert [h["clean_accuracy"] is not None for h in r.history] == [False, True, False, True, True]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("aggregator", ["centered_clipping", "median"])
def test_resume_is_bitwise(digits, tmp_path, aggregator):
    kw = {"init": "previous"} if aggregator == "centered_clipping" else {}
    cfg = dict(BASE, rounds=5, aggregator=aggregator, aggregator_kwargs=kw, byzantine_fraction=0.2,
               byzantine_attack="alie", dropout=0.2, clients_per_round=5, checkpoint_every=2)
    full = run_federated(FLConfig(**cfg), data=digits)

    def stop_after_3(record):
        if record["round"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_federated(FLConfig(**cfg), data=digits, callback=stop_after_3, checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only=True inside
    assert state["round"] == 2  # saved every 2 rounds; round 3 was lost with the crash
    resumed = run_federated(FLConfig(**cfg), data=digits, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == full.history
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)
    # A longer run resumes from the finished one.
    longer = run_federated(FLConfig(**dict(cfg, rounds=6)), data=digits, checkpoint_dir=tmp_path, resume=True)
    assert longer.history[:5] == full.history and len(longer.history) == 6


def test_resume_refuses_other_settings_and_missing_checkpoint(digits, tmp_path):
    run_federated(FLConfig(**BASE), data=digits, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"other settings: \['lr'\]"):
        run_federated(FLConfig(**dict(BASE, lr=0.3)), data=digits, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_federated(FLConfig(**BASE), data=digits, checkpoint_dir=tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        run_federated(FLConfig(**BASE), data=digits, resume=True)


def test_config_errors(digits):
    for bad, match in [(dict(local_training="fancy"), "local_training"), (dict(dropout=1.0), "dropout"),
                       (dict(adv_mix=2.0), "adv_mix"), (dict(local_training="adversarial", adv_norm="l3"), "norm"),
                       (dict(eval_eps=-0.1), "eps"), (dict(eval_every=0), "eval_every")]:
        with pytest.raises(ValueError, match=match):
            run_federated(FLConfig(**dict(BASE, **bad)), data=digits)


def test_cli_run_and_grid(tmp_path, capsys):
    assert cli_main(["run", "--rounds", "2", "--num-clients", "4", "--eval-eps", "0.1", "--eval-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "round    2" in out and "robust accuracy" in out
    path = tmp_path / "grid.csv"
    assert cli_main(["grid", "--rounds", "2", "--num-clients", "5", "--aggregator", "mean,median",
                     "--byzantine-fraction", "0,0.2", "--byzantine-attack", "sign_flip", "--out", str(path)]) == 0
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 4 and {r["aggregator"] for r in rows} == {"mean", "median"}
    assert all(0 <= float(r["final_clean_accuracy"]) <= 1 for r in rows)


def test_cli_bad_options_exit_2_without_traceback(capsys):
    assert cli_main(["run", "--rounds", "0"]) == 2
    assert cli_main(["run", "--aggregator", "nope"]) == 2
    assert cli_main(["run", "--lr", "fast"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "rounds must be >= 1" in err and "unknown aggregator" in err
    with pytest.raises(SystemExit) as exc:
        cli_main(["run", "--no-such-option", "1"])
    assert exc.value.code == 2


def test_run_grid_equals_separate_runs(digits):
    from robustfl_lib import run_grid

    base = dict(BASE, rounds=3, num_clients=8, eval_eps=0.1, eval_steps=2)
    configs = [FLConfig(**dict(base, aggregator=a, byzantine_fraction=f, byzantine_attack=atk))
               for a, f, atk in [("mean", 0.0, None), ("median", 0.25, "alie"), ("krum", 0.25, "label_flip"),
                                 ("centered_clipping", 0.25, "ipm")]]
    grid = run_grid(configs, data=digits, progress=False)
    for cfg, got in zip(configs, grid):
        want = run_federated(cfg, data=digits)
        torch.testing.assert_close(_params(got), _params(want), rtol=1e-4, atol=1e-5)
        for a, b in zip(got.history, want.history):
            assert a["byzantine"] == b["byzantine"] and a["aggregation"].get("selected") == b["aggregation"].get("selected")
            assert abs(a["clean_accuracy"] - b["clean_accuracy"]) <= 1 / len(digits.y_test) + 1e-12
    with pytest.raises(ValueError, match=r"differs from config 0 in \['lr'\]"):
        run_grid([configs[0], FLConfig(**dict(base, lr=0.5))], data=digits)
    with pytest.raises(ValueError, match="vectorized=True"):
        run_grid([FLConfig(**dict(base, vectorized=False))], data=digits)


def _norms(result):
    return [h["update_norm"] for h in result.history]


def test_run_grid_runs_do_not_share_objects(digits):
    """Configs made with dataclasses.replace share one stateful aggregator object; every run must
    still behave as if it held its own (the audit's 6 clients, 3 rounds), and the caller's objects
    must come back untouched."""
    import dataclasses

    from robustfl_lib import CenteredClipping, run_grid
    from robustfl_lib.backdoor import NormClipNoise

    base = dict(BASE, byzantine_fraction=0.34, byzantine_attack="ipm")
    # A fixed small tau makes the carried-over centre matter (with every update inside tau the result is the mean).
    makers = [lambda: CenteredClipping(tau=0.05, init="previous"),
              lambda: NormClipNoise(sigma=0.01, generator=torch.Generator().manual_seed(5))]
    for make in makers:
        shared = make()
        before = copy.deepcopy(shared)
        a = FLConfig(aggregator=shared, **base)
        configs = [a, dataclasses.replace(a, byzantine_attack="sign_flip")]
        fresh = [dataclasses.replace(c, aggregator=make()) for c in configs]
        got, want = run_grid(configs, data=digits, progress=False), run_grid(fresh, data=digits, progress=False)
        for g, w in zip(got, want):
            assert g.history == w.history and torch.equal(_params(g), _params(w))
        for cfg, g in zip(configs, got):
            alone = run_federated(dataclasses.replace(cfg, aggregator=make()), data=digits)
            np.testing.assert_allclose(_norms(g), _norms(alone), rtol=1e-4)
            torch.testing.assert_close(_params(g), _params(alone), rtol=1e-4, atol=1e-5)
        # The runs never changed the caller's object.
        assert describe(shared) == describe(before)
        if isinstance(shared, CenteredClipping):
            assert shared._previous is None
        else:
            assert torch.equal(shared.generator.get_state(), before.generator.get_state())
    # A single run leaves the caller's generator where it was too, so the same config runs twice alike.
    g = torch.Generator().manual_seed(5)
    cfg = FLConfig(aggregator=NormClipNoise(sigma=0.01, generator=g), **BASE)
    state = g.get_state()
    first, second = run_federated(cfg, data=digits), run_federated(cfg, data=digits)
    assert torch.equal(g.get_state(), state) and first.history == second.history
    assert first.aggregator is not cfg.aggregator and first.aggregator.generator is not g


@pytest.mark.parametrize("local_training", ["standard", "adversarial"])
def test_run_grid_over_seeds_equals_separate_runs(local_training):
    """One config over three seeds in lock step: each run has its own data split, partition, model
    init, Byzantine clients and client streams (and its own PGD random starts), as run_federated."""
    import dataclasses

    from robustfl_lib import load_dataset, run_grid

    cfg = FLConfig(**dict(BASE, aggregator="median", byzantine_fraction=0.34, byzantine_attack="alie",
                          dropout=0.2, local_training=local_training, adv_eps=0.5, adv_norm="l2", adv_steps=2))
    configs = [dataclasses.replace(cfg, seed=s) for s in (0, 1, 2)]
    grid = run_grid(configs, progress=False)  # data=None: each seed loads its own split
    byzantine = set()
    for c, got in zip(configs, grid):
        want = run_federated(c)
        byzantine.add(tuple(got.byzantine))
        torch.testing.assert_close(_params(got), _params(want), rtol=1e-4, atol=1e-5)
        assert got.byzantine == want.byzantine
        n_test = len(load_dataset("digits", seed=c.seed).y_test)
        for a, b in zip(got.history, want.history):
            assert (a["participants"], a["dropped_out"], a["byzantine"]) == (b["participants"], b["dropped_out"], b["byzantine"])
            assert abs(a["clean_accuracy"] - b["clean_accuracy"]) <= 1 / n_test + 1e-12
    assert len(byzantine) > 1  # the seeds really drew different attackers
    if local_training == "standard":
        data = {s: load_dataset("digits", seed=s) for s in (0, 1, 2)}
        again = run_grid(configs, data=data, progress=False)
        assert all(a.history == b.history for a, b in zip(again, grid))
        with pytest.raises(ValueError, match=r"not for the configs' seed\(s\) \[2\]"):
            run_grid(configs, data={0: data[0], 1: data[1]}, progress=False)
        with pytest.raises(ValueError, match=r"differs from config 0 in \['lr'\]"):
            run_grid([configs[0], dataclasses.replace(configs[1], lr=0.5)], progress=False)
