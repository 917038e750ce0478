"""Resume is exact in every configuration, and in a fresh process.

A run interrupted after round 3 (checkpoint after round 2) and resumed in a new
Python process must end with bitwise the history and weights of an uninterrupted
run: every random stream it draws from and the state of every object it holds
are checkpointed, and the checkpoint recognises its configuration by value
(a generator's ``repr`` holds a memory address that a new process does not share).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import robustfl_lib as rfl
from robustfl_lib import FLConfig, run_federated
from robustfl_lib.backdoor import BackdoorPoisoning, Detect, Detector, NormClipNoise, NormZScore, PixelTrigger
from robustfl_lib.byzantine import ByzantineAttack
from robustfl_lib.checkpoint import describe, load_checkpoint
from robustfl_lib.federated import config_dict

TINY = dict(dataset="digits", num_clients=6, rounds=4, local_epochs=1, batch_size=16, partition="dirichlet",
            alpha=0.5, checkpoint_every=2, progress=False)

CASES = ("median", "centered_clipping", "norm_clip_noise", "backdoor", "dropout", "adversarial", "mimic")


def make_config(case: str) -> FLConfig:
    """The same configuration, built afresh, in this process and in the resuming one."""
    if case == "median":
        return FLConfig(**TINY, aggregator="median", byzantine_fraction=0.34, byzantine_attack="alie")
    if case == "centered_clipping":  # the centre carries over between rounds; a small tau makes it matter
        return FLConfig(**TINY, aggregator="centered_clipping", aggregator_kwargs={"init": "previous", "tau": 0.05},
                        byzantine_fraction=0.34, byzantine_attack="ipm")
    if case == "norm_clip_noise":  # a rule holding its own generator
        return FLConfig(**TINY, aggregator=NormClipNoise(sigma=0.01, generator=torch.Generator().manual_seed(3)))
    if case == "backdoor":  # chapter 11: boosted backdoor clients against the norm detector
        return FLConfig(**TINY, byzantine_fraction=0.34, aggregator=Detect(NormZScore(3.0)),
                        byzantine_attack=BackdoorPoisoning(PixelTrigger(target=0), fraction=0.5, boost=3.0, seed=1))
    if case == "dropout":
        return FLConfig(**TINY, dropout=0.3, clients_per_round=5, aggregator="trimmed_mean", byzantine_fraction=0.2,
                        byzantine_attack="gaussian")
    if case == "adversarial":
        return FLConfig(**TINY, local_training="adversarial", adv_steps=2, eval_eps=0.1, eval_steps=2)
    if case == "mimic":  # a stateful attack: its direction estimate spans the checkpoint, its choice comes after
        return FLConfig(**TINY, aggregator="median", byzantine_fraction=0.34, byzantine_attack="mimic",
                        attack_kwargs={"warmup": 3})
    raise ValueError(f"unknown case {case!r}")


class Interrupt(Exception):
    pass


def _stop_after_3(record):
    if record["round"] == 3:
        raise Interrupt


def _interrupted(config, data, where):
    with pytest.raises(Interrupt):
        run_federated(config, data=data, callback=_stop_after_3, checkpoint_dir=where)
    assert load_checkpoint(where / "checkpoint.pt")["round"] == 2  # round 3 was lost with the crash


def _weights(result):
    return {k: v.detach().cpu() for k, v in result.model.state_dict().items()}


def _assert_same_run(got_history, got_weights, want):
    assert got_history == want.history
    want_weights = _weights(want)
    assert list(got_weights) == list(want_weights)
    for k in want_weights:
        assert torch.equal(got_weights[k], want_weights[k]), k


_RESUME = textwrap.dedent("""
    import json, sys, traceback
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from test_resume import make_config
    from robustfl_lib import load_dataset, run_federated
    data = load_dataset("digits", seed=0)
    for case in json.loads(sys.argv[3]):
        where = Path(sys.argv[2]) / case
        try:
            r = run_federated(make_config(case), data=data, checkpoint_dir=where, resume=True)
            torch.save({"history": r.history, "weights": {k: v.cpu() for k, v in r.model.state_dict().items()}},
                       where / "resumed.pt")
        except Exception:
            (where / "error.txt").write_text(traceback.format_exc())
""")


@pytest.fixture(scope="module")
def resumed_in_new_process(tmp_path_factory, digits, one_thread):
    """Per case: the uninterrupted run, and what a fresh process made of the interrupted one."""
    root = tmp_path_factory.mktemp("resume")
    full = {}
    for case in CASES:
        full[case] = run_federated(make_config(case), data=digits)
        _interrupted(make_config(case), digits, root / case)
    # One process resumes every case (the interpreter and torch start once).
    proc = subprocess.run([sys.executable, "-c", _RESUME, str(Path(__file__).parent), str(root), json.dumps(CASES)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return root, full


@pytest.mark.parametrize("case", CASES)
def test_resume_in_a_fresh_process_is_bitwise(resumed_in_new_process, case):
    root, full = resumed_in_new_process
    error = root / case / "error.txt"
    assert not error.exists(), error.read_text() if error.exists() else ""
    got = torch.load(root / case / "resumed.pt", weights_only=True)
    _assert_same_run(got["history"], got["weights"], full[case])
    assert len(full[case].history) == TINY["rounds"]


class _RandomFlags(Detector):
    """A detector that flags at random, from a generator held two objects deep (inside Detect)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def flag(self, updates):
        return torch.rand(updates.shape[0], generator=self.generator) < 0.3


class _Escalating(ByzantineAttack):
    """Sends ``-(1 + rounds so far) * mean``: an attack whose state carries over between rounds
    through the get_state / set_state / reset protocol (as a stateful Mimic does)."""

    def __init__(self):
        self.calls = 0

    def reset(self):
        self.calls = 0

    def get_state(self):
        return {"calls": self.calls}

    def set_state(self, state):
        self.calls = int(state["calls"])

    def forge(self, honest, num_byzantine, generator):
        self.calls += 1
        return (-(1.0 + self.calls) * honest.mean(dim=0)).expand(num_byzantine, -1).clone()


def test_resume_restores_nested_generators_and_attack_state(digits, tmp_path, one_thread):
    def config():
        return FLConfig(**TINY, aggregator=Detect(_RandomFlags(seed=4), then=rfl.Median()), byzantine_fraction=0.34,
                        byzantine_attack=_Escalating())

    full = run_federated(config(), data=digits)
    _interrupted(config(), digits, tmp_path)
    resumed = run_federated(config(), data=digits, checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(resumed.history, _weights(resumed), full)
    assert resumed.attack.calls == full.attack.calls == TINY["rounds"]
    # The random detector did flag someone, so its generator's stream mattered.
    assert any(len(h["aggregation"]["selected"]) < len(h["participants"]) for h in full.history)
    # A run starts from reset objects: an attack object that was used before changes nothing.
    used = config()
    used.byzantine_attack.calls = 7
    assert run_federated(used, data=digits).history == full.history


def test_config_is_described_by_value(digits, tmp_path):
    a, b = make_config("norm_clip_noise"), make_config("norm_clip_noise")
    assert a.aggregator.generator is not b.aggregator.generator
    assert config_dict(a) == config_dict(b)
    text = json.dumps(config_dict(make_config("backdoor")))  # JSON-friendly, for the CLI's CSV and logs
    assert "0x" not in text and '"class": "BackdoorPoisoning"' in text and '"PixelTrigger"' in text
    assert describe(a.aggregator)["generator"] == {"class": "torch.Generator", "device": "cpu", "initial_seed": 3}
    assert describe(torch.arange(3)) == {"class": "Tensor", "dtype": "int64", "shape": [3], "values": [0, 1, 2]}
    # A checkpoint refuses a rule whose generator was seeded otherwise, naming the setting.
    cfg = dict(TINY, rounds=2)
    run_federated(FLConfig(**cfg, aggregator=NormClipNoise(sigma=0.01, generator=torch.Generator().manual_seed(3))),
                  data=digits, checkpoint_dir=tmp_path)
    other = FLConfig(**cfg, aggregator=NormClipNoise(sigma=0.01, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match=r"other settings: \['aggregator'\]"):
        run_federated(other, data=digits, checkpoint_dir=tmp_path, resume=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda_restores_the_device_rng(tmp_path):
    # NormClipNoise without a generator draws its noise from the CUDA device's global RNG, which the resumed
    # run's set_seed puts back at its start unless the checkpoint's state is restored.
    data = rfl.load_dataset("digits", seed=0)

    def config():
        return FLConfig(**TINY, device="cuda", aggregator=NormClipNoise(sigma=0.01))

    full = run_federated(config(), data=data)
    _interrupted(config(), data, tmp_path)
    resumed = run_federated(config(), data=data, checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(resumed.history, _weights(resumed), full)
