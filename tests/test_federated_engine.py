"""The FL engine: vectorized == sequential, reproducibility, dropout, robust evaluation, resume, CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from robustfl_lib import FLConfig, run_federated
from robustfl_lib.checkpoint import load_checkpoint
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
