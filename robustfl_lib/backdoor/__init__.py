r"""Backdoors: a trigger planted through poisoned updates, and the defenses that look for it.

* :class:`PixelTrigger` stamps a small square of bright pixels in a corner; a
  backdoored model maps any stamped input to the attacker's ``target`` class while
  staying accurate on clean inputs.
* :func:`poison` is the backdoor client's data poisoning; the client then *boosts*
  its update by a factor :math:`\gamma` (model replacement, Bagdasaryan et al. 2020)
  so that it survives averaging with the honest updates (:class:`BackdoorPoisoning`).
  :class:`DBA` (Xie et al. 2020) splits the trigger among colluding clients, each
  planting one :class:`TriggerPart`; :class:`Neurotoxin` (Zhang et al. 2022) confines the
  backdoor to the coordinates honest training changes least, so that it lasts.
* :func:`attack_success_rate` is the fraction of triggered test inputs *of other
  classes* classified as the target; :func:`detection_scores` gives a detector's
  precision and recall against the known malicious clients; :func:`backdoor_durability`
  counts the rounds a backdoor survives after its planters stop.
* Detectors return one boolean per update, ``True`` = flagged malicious:
  :class:`NormZScore` (robust z-score of update norms), :class:`CosineSimilarity`
  (a simplified FoolsGold-style filter: sybils that push the same direction are too
  similar, in one round), :class:`Clustering` (FLAME's first stage alone: HDBSCAN on cosine
  distances, keep the majority cluster). :class:`Detect` turns a detector into an
  aggregator (aggregate only the unflagged updates); :class:`NormClipNoise` is the
  norm-clipping + Gaussian-noise defense of Sun et al. (2019).
* The published defenses, as aggregators: :class:`FLAME` (Nguyen et al. 2022: clustering,
  clipping at the median norm, noise :math:`\lambda S_t`; config name ``"flame"``) and
  :class:`FoolsGold` (Fung et al. 2020: update histories, pardoning, logit learning rates;
  ``"foolsgold"``).

Taught in chapter ``11_exercise_backdoor_detection``.

One module per part; every public name is importable from here and from ``robustfl_lib``:

* :mod:`.triggers`: :class:`PixelTrigger`, :func:`poison`, :class:`BackdoorPoisoning`,
  :class:`TriggerPart`, :class:`DBA`;
* :mod:`.metrics`: :func:`attack_success_rate`, :func:`detection_scores`, :func:`detection_over_rounds`,
  :func:`backdoor_durability`;
* :mod:`.detectors`: :class:`Detector`, :class:`NormZScore`, :class:`CosineSimilarity`,
  :class:`Clustering`, :class:`Detect`;
* :mod:`.defenses`: :class:`NormClipNoise`, :class:`FLAME`, :class:`FoolsGold`;
* :mod:`.attacks`: :func:`stealthy_norm`, :class:`ConstrainAndScale` (chapter ``12_exercise_adaptive_attacks``),
  :class:`Neurotoxin`.

What the FL loop does not pass yet (client ids to aggregators and to data poisoning, the
global model, an attack schedule) and how each object copes without it is said in its docstring.
"""

from ..aggregators import AGGREGATORS
from .attacks import ConstrainAndScale, Neurotoxin, stealthy_norm
from .defenses import FLAME, FoolsGold, NormClipNoise
from .detectors import Clustering, CosineSimilarity, Detect, Detector, NormZScore
from .metrics import attack_success_rate, backdoor_durability, detection_over_rounds, detection_scores
from .triggers import DBA, BackdoorPoisoning, PixelTrigger, TriggerPart, poison

__all__ = [
    "PixelTrigger",
    "poison",
    "BackdoorPoisoning",
    "ConstrainAndScale",
    "stealthy_norm",
    "attack_success_rate",
    "detection_scores",
    "detection_over_rounds",
    "Detector",
    "NormZScore",
    "CosineSimilarity",
    "Clustering",
    "Detect",
    "NormClipNoise",
    "FLAME",
    "FoolsGold",
    "TriggerPart",
    "DBA",
    "Neurotoxin",
    "backdoor_durability",
]

# The published defenses are aggregators: FLConfig(aggregator="flame") / get_aggregator("foolsgold").
AGGREGATORS.update({"flame": FLAME, "foolsgold": FoolsGold})
