"""Byzantine clients: attacks on the updates the server receives, and label flipping.

An update attack is an object configured once and called by an *omniscient*
attacker who sees this round's honest updates (deltas: local minus global
weights):

    ``attack(honest, num_byzantine, generator=None, weights=None, byzantine_weights=None) -> (num_byzantine, d)``

``honest`` is ``(n_h, d)``; the output has the same dtype and device. Attacks
that are random draw from ``generator`` (a ``torch.Generator``), so the same
seed gives the same updates. ``weights`` / ``byzantine_weights`` are the
aggregation weights the server gives the honest rows (in ``honest``'s row
order) and the Byzantine ones: :func:`~robustfl_lib.run_federated` passes the
clients' sample counts, by which :class:`~robustfl_lib.Mean` (FedAvg) weights.
Only the attacks that reason about what the server averages use them
(:class:`ModelReplacement`, and :class:`AdaptiveScaling`, :class:`OptimalALIE`, :class:`OptimalIPM`,
which try candidates against the server's rule); the others are defined,
as in their papers, on the plain (unweighted) mean and spread of the honest
updates. :class:`Mimic` and :class:`TimeCoupled` keep state across rounds (``reset``, ``get_state``,
``set_state``). Label flipping is different: it is data poisoning,
applied to a Byzantine client's training labels before honest local training
(:class:`LabelFlip`). :func:`get_attack` builds any of them by its config name.
Taught in chapter ``03_byzantine_threats``; each defence's chapter (``04`` to
``08``) runs every attack against it.

One module per family; every public name is importable from here and from ``robustfl_lib``:

* :mod:`.base`: :class:`ByzantineAttack` (the protocol, the weight checks, state), the registries
  :data:`ATTACKS` and :data:`ADAPTIVE_ATTACKS`, :func:`get_attack`;
* :mod:`.simple`: :class:`SignFlip`, :class:`Scaling`, :class:`GaussianNoise`, :class:`NonFinite`,
  :class:`ModelReplacement`;
* :mod:`.statistical`: :class:`ALIE` (and :func:`alie_z`), :class:`IPM`, :class:`Mimic`;
* :mod:`.optimising`: :class:`ScaleSearch`, the line search of an attack's scale against the rule in
  use, and its parametrisations :class:`AdaptiveScaling`, :class:`OptimalALIE`, :class:`OptimalIPM`;
* :mod:`.agr_agnostic`: :class:`MinMax`, :class:`MinSum` (optimised without knowing the rule);
* :mod:`.rule_specific`: :class:`FangTrimmedMean` (trimmed mean and median), :class:`FangKrum`;
* :mod:`.temporal`: :class:`TimeCoupled` (a small bias fixed over rounds, stateful);
* :mod:`.poisoning`: :class:`DataPoisoning`, :class:`LabelFlip`.

The attacks that adapt (to the rule, or over rounds) are taught in chapter
``12_exercise_adaptive_attacks``; their config names are in :data:`ADAPTIVE_ATTACKS`.
"""

from .agr_agnostic import MinMax, MinSum
from .base import ADAPTIVE_ATTACKS, ATTACKS, ByzantineAttack, get_attack
from .optimising import AdaptiveScaling, OptimalALIE, OptimalIPM, ScaleSearch
from .poisoning import DataPoisoning, LabelFlip
from .rule_specific import FangKrum, FangTrimmedMean
from .simple import GaussianNoise, ModelReplacement, NonFinite, Scaling, SignFlip
from .statistical import ALIE, IPM, Mimic, alie_z
from .temporal import TimeCoupled

__all__ = [
    "ByzantineAttack",
    "SignFlip",
    "Scaling",
    "GaussianNoise",
    "ModelReplacement",
    "ALIE",
    "IPM",
    "Mimic",
    "NonFinite",
    "AdaptiveScaling",
    "DataPoisoning",
    "LabelFlip",
    "ATTACKS",
    "get_attack",
    "alie_z",
    # issue 14: attacks that adapt to the rule or over rounds
    "ScaleSearch",
    "OptimalALIE",
    "OptimalIPM",
    "MinMax",
    "MinSum",
    "FangTrimmedMean",
    "FangKrum",
    "TimeCoupled",
    "ADAPTIVE_ATTACKS",
]

ATTACKS.update({
    "sign_flip": SignFlip,
    "scaling": Scaling,
    "gaussian": GaussianNoise,
    "model_replacement": ModelReplacement,
    "alie": ALIE,
    "ipm": IPM,
    "mimic": Mimic,
    "nonfinite": NonFinite,
    "label_flip": LabelFlip,
})

ADAPTIVE_ATTACKS.update({
    "adaptive_scaling": AdaptiveScaling,  # needs aggregator= (and f= with a name)
    "optimal_alie": OptimalALIE,  # likewise
    "optimal_ipm": OptimalIPM,  # likewise
    "min_max": MinMax,
    "min_sum": MinSum,
    "fang_trimmed_mean": FangTrimmedMean,
    "fang_median": FangTrimmedMean,  # the paper's attack on the median is the same
    "fang_krum": FangKrum,
    "time_coupled": TimeCoupled,
})
