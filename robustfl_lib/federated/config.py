"""The settings of one federated run (:class:`FLConfig`) and their description by value
(:func:`config_dict`, which logs, CSV files and checkpoints use)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..aggregators import Aggregator
from ..attacks import PGD
from ..byzantine import ByzantineAttack, DataPoisoning
from ..certified.bounds import BOUND_METHODS
from ..certified.training import LinearRamp
from ..checkpoint import describe
from ..training import TRADES, FastFGSM

__all__ = ["FLConfig", "config_dict"]

#: The names ``FLConfig.local_training`` accepts.
LOCAL_TRAININGS = ("standard", "adversarial", "fast_fgsm", "trades", "certified")

# Counting clients from a fraction: 0.2 * 10 must be 2 even though it is 2.0000000000000004.
_EPS = 1e-9


@dataclass
class FLConfig:
    """Settings of one federated run (all have defaults that run on digits in seconds).

    Model: ``model`` names a builder of :func:`robustfl_lib.models.build_model` (``"mlp"``,
    ``"cnn"``, ``"cifar_cnn"``, ``"resnet8"``, ``"resnet20"``, ``"resnet18"``), sized from the
    dataset; ``model_kwargs`` are its keywords (``{"bn_momentum": None}``). A BatchNorm model's
    running statistics are aggregated by the run's rule and its integer counters kept aside
    (:mod:`robustfl_lib.params`); it trains client by client even with ``vectorized=True``.

    Byzantine clients: ``byzantine_fraction`` of the ``num_clients`` clients
    (rounded down) are Byzantine, the same ones all run (fixed by ``seed``);
    ``byzantine_attack`` is a name from :data:`robustfl_lib.byzantine.ATTACKS`
    (with ``attack_kwargs``) or an attack object. The aggregator tolerates
    ``aggregator_f`` Byzantine clients; ``None`` derives it from the fraction:
    ``floor(byzantine_fraction * clients per round)``.

    Local work: ``local_steps=None`` trains ``local_epochs`` epochs (FedAvg, McMahan et
    al. 2017); ``local_steps=k`` takes exactly ``k`` SGD steps, each on a minibatch of
    ``batch_size`` samples (the client's data reshuffled whenever a pass over it ends).
    ``local_steps=1`` with ``client_momentum > 0`` is the distributed-SGD setting of
    Karimireddy, He & Jaggi 2021 ("Learning from History for Byzantine Robust
    Optimization", ICML) and of ByzFL: each round every honest worker takes one
    stochastic gradient and sends its momentum.

    Worker momentum: with ``client_momentum`` :math:`\beta > 0` each honest client sends
    :math:`m_i^t = \beta m_i^{t-1} + (1 - \beta) g_i^t` instead of its update
    :math:`g_i^t` (:class:`~robustfl_lib.federated.WorkerMomentum`, whose docstring gives
    the convention and the initial :math:`m_i^0`, set by ``client_momentum_init``);
    ``client_momentum=0`` is off and bitwise today's engine. Chapter
    ``15_heterogeneity_and_its_fixes`` pairs it with stateful centred clipping.

    Attack schedule: ``attack_rounds=(first, last)`` makes the Byzantine clients attack in
    rounds ``first..last`` only (rounds count from 1); in the other rounds they train honestly
    on their clean data, as any client does, and the round's record lists no Byzantine
    participant. Backdoor durability (Zhang et al. 2022, rounds until attack success falls
    after the attackers stop: :func:`robustfl_lib.backdoor.backdoor_durability`) needs
    attackers that stop. ``None`` (default): they attack every round.

    Server data: ``server_root_size=m`` holds ``m`` training samples out of the clients'
    data for the server, drawn uniformly without replacement from the whole training set
    with the run's seed (as Cao et al. 2021 sample FLTrust's root dataset from the training
    data); the clients' partition is then drawn over the remaining samples. A rule that
    asks for the server's update (``needs_server_update = True``,
    :class:`~robustfl_lib.aggregators.FLTrust`) gets it every round: the server trains the
    global model on its root data with the clients' local training settings. ``0``
    (default): no server data, the partition of the whole training set as before.

    Robust local training (``local_training``): ``"adversarial"`` is PGD inside every minibatch
    with the clean/adversarial mix ``adv_mix`` (chapter ``02_adversarial_training``);
    ``"fast_fgsm"`` the same with :class:`~robustfl_lib.training.FastFGSM` as the attack (Wong et
    al. 2020: step ``adv_alpha``, default 1.25 eps; their recipe is ``adv_mix=1``); ``"trades"``
    the :class:`~robustfl_lib.training.TRADES` loss (``adv_eps``, ``adv_steps``, ``adv_alpha``,
    ``trades_beta``); ``"certified"`` the certified loss of :mod:`robustfl_lib.certified` at budget
    ``adv_eps`` with bound ``cert_method`` ("ibp" or "crown-ibp", mixed with weight ``cert_beta``,
    None: 0 for IBP, 1 for CROWN-IBP) and final ``cert_kappa``, ramped by round as Gowal et al.
    2018 ramp by step: eps 0 and kappa 1 for ``cert_warmup_rounds`` rounds, then linear to
    ``adv_eps`` and ``cert_kappa`` over ``cert_ramp_rounds`` rounds (both 0: the final values from
    round 1). The three new ones are linf only. All run vectorized across clients as
    ``"adversarial"`` does.
    """

    dataset: str = "digits"
    model: str = "mlp"
    partition: str = "iid"  #: "iid", "dirichlet" or "shards"
    alpha: float = 0.5  #: Dirichlet concentration (smaller = more label skew)
    num_clients: int = 10
    clients_per_round: int | None = None  #: None: every client, every round
    rounds: int = 20
    local_epochs: int = 2  #: local epochs per round (when local_steps is None)
    local_steps: int | None = None  #: None: local_epochs epochs; k: exactly k SGD steps of batch_size samples
    lr: float = 0.2
    batch_size: int = 16
    client_momentum: float = 0.0  #: worker momentum beta in [0, 1) (0: clients send their updates)
    client_momentum_init: str = "zero"  #: "zero": m_i^0 = 0 (ByzFL); "first": m_i^1 = g_i^1
    aggregator: str | Aggregator = "mean"
    aggregator_f: int | None = None  #: None: derived from byzantine_fraction
    aggregator_kwargs: dict[str, Any] = field(default_factory=dict)
    byzantine_fraction: float = 0.0
    byzantine_attack: str | ByzantineAttack | DataPoisoning | None = None
    attack_kwargs: dict[str, Any] = field(default_factory=dict)
    local_training: str = "standard"  #: "standard", "adversarial" (PGD), "fast_fgsm", "trades" or "certified"
    adv_eps: float = 0.1  #: local adversarial training: PGD budget
    adv_steps: int = 5  #: ... PGD steps
    adv_alpha: float | None = None  #: ... PGD step size (None: 2.5 * eps / steps)
    adv_norm: str = "linf"  #: ... "linf" or "l2"
    adv_mix: float = 0.5  #: ... weight of the adversarial loss (0.5: Tutorial 157's 50/50; 1.0: Madry et al.)
    adv_random_start: bool = True
    trades_beta: float = 6.0  #: local_training="trades": weight of the KL term (Zhang et al. 2019)
    cert_method: str = "ibp"  #: local_training="certified": "ibp" or "crown-ibp"
    cert_kappa: float = 0.5  #: ... final weight of the natural loss (Gowal et al.: 0.5)
    cert_beta: float | None = None  #: ... weight of the CROWN-IBP bound (None: 0 for ibp, 1 for crown-ibp)
    cert_warmup_rounds: int = 0  #: ... rounds at eps 0, kappa 1 before the ramp
    cert_ramp_rounds: int = 0  #: ... rounds of the linear eps / kappa ramp (0: final values at once)
    eval_eps: float | None = None  #: robust accuracy under PGD at this budget on the test split (None: skip)
    eval_steps: int = 10  #: ... PGD steps of that evaluation
    eval_every: int = 1  #: evaluate every k rounds (and always after the last)
    dropout: float = 0.0  #: probability that a participant does not answer in a round
    vectorized: bool = True  #: train a round's clients in one batched computation (models with buffers, e.g.
    #: BatchNorm: client by client)
    checkpoint_every: int = 1  #: with a checkpoint_dir, save every k rounds (and after the last)
    seed: int = 0
    device: str | None = None
    progress: bool = True
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    attack_rounds: tuple[int, int] | None = None  #: (first, last) rounds in which Byzantine clients attack (None: all)
    server_root_size: int = 0  #: training samples held out for the server (FLTrust's root data; 0: none)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  #: keywords of build_model (e.g. {"bn_momentum": None})

    def attacks_in_round(self, rnd: int) -> bool:
        """Whether the Byzantine clients attack in round ``rnd`` (``attack_rounds``; always when it is None)."""
        if self.attack_rounds is None:
            return True
        first, last = self.attack_rounds
        return first <= rnd <= last

    @property
    def participants_per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    @property
    def num_byzantine(self) -> int:
        """How many of the clients are Byzantine: ``floor(byzantine_fraction * num_clients)``."""
        return int(math.floor(self.byzantine_fraction * self.num_clients + _EPS))

    @property
    def resolved_aggregator_f(self) -> int:
        """``aggregator_f``, or ``floor(byzantine_fraction * participants_per_round)``."""
        if self.aggregator_f is not None:
            return self.aggregator_f
        return int(math.floor(self.byzantine_fraction * self.participants_per_round + _EPS))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
            raise ValueError(f"model_kwargs must be a dict of keyword arguments of build_model, got {self.model_kwargs!r}")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"clients_per_round must be in [1, num_clients={self.num_clients}], got {self.clients_per_round}"
            )
        for name in ("rounds", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_steps is not None and (isinstance(self.local_steps, bool) or not isinstance(self.local_steps, int)
                                             or self.local_steps < 1):
            raise ValueError(f"local_steps must be None (local_epochs epochs) or an integer >= 1, got {self.local_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        beta = self.client_momentum
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"client_momentum must be a number in [0, 1) (0: off), got {beta!r}")
        if self.client_momentum_init not in ("zero", "first"):
            raise ValueError(f"client_momentum_init must be 'zero' or 'first', got {self.client_momentum_init!r}")
        if not 0 <= self.byzantine_fraction < 1:
            raise ValueError(f"byzantine_fraction must be in [0, 1), got {self.byzantine_fraction}")
        if self.num_byzantine > 0 and self.byzantine_attack is None:
            raise ValueError(
                f"byzantine_fraction={self.byzantine_fraction} makes {self.num_byzantine} client(s) Byzantine "
                "but byzantine_attack is None; name an attack (e.g. 'sign_flip')"
            )
        if self.aggregator_f is not None and (isinstance(self.aggregator_f, bool) or self.aggregator_f < 0):
            raise ValueError(f"aggregator_f must be an integer >= 0 or None, got {self.aggregator_f!r}")
        if self.local_training not in LOCAL_TRAININGS:
            raise ValueError(f"local_training must be one of {LOCAL_TRAININGS}, got {self.local_training!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.adv_mix <= 1:
            raise ValueError(f"adv_mix must be in [0, 1], got {self.adv_mix}")
        for name in ("eval_every", "checkpoint_every", "adv_steps", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attack_rounds is not None:
            ar = self.attack_rounds
            if (not isinstance(ar, (tuple, list)) or len(ar) != 2
                    or any(isinstance(r, bool) or not isinstance(r, int) for r in ar) or not 1 <= ar[0] <= ar[1]):
                raise ValueError(f"attack_rounds must be None or (first, last) with integers 1 <= first <= last, "
                                 f"got {ar!r}")
        root = self.server_root_size
        if isinstance(root, bool) or not isinstance(root, int) or root < 0:
            raise ValueError(f"server_root_size must be an integer >= 0 (0: no server data), got {root!r}")
        if self.local_training in ("fast_fgsm", "trades", "certified") and self.adv_norm != "linf":
            raise ValueError(f"local_training={self.local_training!r} is linf only, got adv_norm={self.adv_norm!r}")
        if self.local_training in ("adversarial", "fast_fgsm"):
            self.local_attack()  # raises ValueError for a bad eps, steps or norm
        if self.local_training == "trades":
            b = self.trades_beta
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
                raise ValueError(f"trades_beta must be a finite number >= 0, got {b!r}")
            self.local_trades()
        if self.local_training == "certified":
            self._validate_certified()
        if self.eval_eps is not None:
            self.eval_attack()

    def local_attack(self, generator: torch.Generator | None = None) -> PGD:
        """The attack of local adversarial training: PGD, or FastFGSM for ``local_training="fast_fgsm"``."""
        if self.local_training == "fast_fgsm":
            return FastFGSM(eps=self.adv_eps, alpha=self.adv_alpha, generator=generator)
        return PGD(eps=self.adv_eps, alpha=self.adv_alpha, steps=self.adv_steps, norm=self.adv_norm,
                   random_start=self.adv_random_start, generator=generator)

    def local_trades(self, generator: torch.Generator | None = None) -> TRADES:
        """The TRADES loss of ``local_training="trades"``."""
        return TRADES(eps=self.adv_eps, beta=self.trades_beta, steps=self.adv_steps, alpha=self.adv_alpha,
                      generator=generator)

    def certified_values(self, rnd: int) -> tuple[float, float, float]:
        """``(eps, kappa, beta)`` of the certified loss in round ``rnd`` (counted from 1)."""
        t = rnd - 1
        eps = LinearRamp(0.0, float(self.adv_eps), self.cert_warmup_rounds, self.cert_ramp_rounds)(t)
        kappa = LinearRamp(1.0, float(self.cert_kappa), self.cert_warmup_rounds, self.cert_ramp_rounds)(t)
        beta = (0.0 if self.cert_method == "ibp" else 1.0) if self.cert_beta is None else float(self.cert_beta)
        return eps, kappa, beta

    def _validate_certified(self) -> None:
        if self.cert_method not in BOUND_METHODS:
            raise ValueError(f"cert_method must be one of {BOUND_METHODS}, got {self.cert_method!r}")
        eps = self.adv_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"adv_eps must be a finite number >= 0, got {eps!r}")
        for name in ("cert_kappa", "cert_beta"):
            v = getattr(self, name)
            if v is None and name == "cert_beta":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        if self.cert_method == "ibp" and self.cert_beta not in (None, 0, 0.0):
            raise ValueError("cert_method='ibp' uses the IBP bound only; set cert_method='crown-ibp' to mix bounds")
        for name in ("cert_warmup_rounds", "cert_ramp_rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")

    def eval_attack(self) -> PGD:
        """The PGD attack that measures robust accuracy (same seed every round, so rounds compare)."""
        return PGD(eps=self.eval_eps, steps=self.eval_steps, norm=self.adv_norm, seed=self.seed)


def config_dict(config: FLConfig) -> dict[str, Any]:
    """``config`` as a JSON-friendly dict, for logs, CSV files and checkpoints.

    Names and numbers stay as they are; aggregator, attack and other objects are
    described by value (:func:`robustfl_lib.checkpoint.describe`: class name and
    public attributes, a generator by its device and initial seed), so two configs
    with equal settings give equal dicts, in any process."""
    return {f.name: describe(getattr(config, f.name)) for f in fields(config)}


def _comparable(config: FLConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint (all but rounds, progress, device,
    checkpoint_every), by value: nested descriptions as their (canonical, sorted) repr, which is
    also what checkpoints of plain configs held before objects were described."""
    d = config_dict(config)
    for key in ("rounds", "progress", "device", "checkpoint_every"):
        d.pop(key)
    return {k: (repr(v) if isinstance(v, (list, dict)) else v) for k, v in d.items()}


