r"""Backdoors: a trigger planted through poisoned updates, and the defenses that look for it.

* :class:`PixelTrigger` stamps a small square of bright pixels in a corner; a
  backdoored model maps any stamped input to the attacker's ``target`` class while
  staying accurate on clean inputs.
* :func:`poison` is the backdoor client's data poisoning; the client then *boosts*
  its update by a factor :math:`\gamma` (model replacement, Bagdasaryan et al. 2020)
  so that it survives averaging with the honest updates.
* :func:`attack_success_rate` is the fraction of triggered test inputs *of other
  classes* classified as the target; :func:`detection_scores` gives a detector's
  precision and recall against the known malicious clients.
* Detectors return one boolean per update, ``True`` = flagged malicious:
  :class:`NormZScore` (robust z-score of update norms), :class:`CosineSimilarity`
  (FoolsGold-style, Fung et al. 2020: sybils that push the same direction are too
  similar), :class:`Clustering` (FLAME-style, Nguyen et al. 2022: HDBSCAN on cosine
  distances, keep the majority cluster). :class:`Detect` turns a detector into an
  aggregator (aggregate only the unflagged updates); :class:`NormClipNoise` is the
  norm-clipping + Gaussian-noise defense of Sun et al. (2019).

Taught in chapter ``11_exercise_backdoor_detection``.

One module per part; every public name is importable from here and from ``robustfl_lib``:

* :mod:`.triggers`: :class:`PixelTrigger`, :func:`poison`, :class:`BackdoorPoisoning`;
* :mod:`.metrics`: :func:`attack_success_rate`, :func:`detection_scores`, :func:`detection_over_rounds`;
* :mod:`.detectors`: :class:`Detector`, :class:`NormZScore`, :class:`CosineSimilarity`,
  :class:`Clustering`, :class:`Detect`;
* :mod:`.defenses`: :class:`NormClipNoise`;
* :mod:`.attacks`: :func:`stealthy_norm`, :class:`ConstrainAndScale` (chapter ``12_exercise_adaptive_attacks``).
"""

from .attacks import ConstrainAndScale, stealthy_norm
from .defenses import NormClipNoise
from .detectors import Clustering, CosineSimilarity, Detect, Detector, NormZScore
from .metrics import attack_success_rate, detection_over_rounds, detection_scores
from .triggers import BackdoorPoisoning, PixelTrigger, poison

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
]
