"""Attacks on a model's inputs: adversarial examples. Taught in chapters ``01_adversarial_examples``
and ``02_adversarial_training``.

Every attack is an object configured once and called as ``attack(model, x, y) -> x_adv`` under the
contract of :mod:`.base` (eps-ball and bounds kept, model mode and parameter flags restored, any
device and input shape). The modules:

* :mod:`.base`: :class:`InputAttack`, :func:`attack_mode`, the losses (CE, CW margin, DLR),
  :func:`linf_bounds` and the checks;
* :mod:`.gradient`: :class:`FGSM` (Goodfellow et al. 2015), :class:`PGD` (Madry et al. 2018);
* :mod:`.apgd`: :class:`APGD` (Croce & Hein 2020), APGD-CE, APGD-DLR and APGD-T;
* :mod:`.fab`: :class:`FAB` (Croce & Hein 2020b), minimal perturbations, FAB-T;
* :mod:`.square`: :class:`Square` (Andriushchenko et al. 2020), score-based, no gradients;
* :mod:`.autoattack`: :class:`AutoAttack` (standard: APGD-CE, APGD-T, FAB-T, Square; fast: APGD-CE, APGD-T);
* :mod:`.masking`: :func:`masking_report`, named flags for gradient masking;
* :mod:`.ensemble`: :class:`WorstCaseEnsemble`, a teaching ensemble (not AutoAttack).
"""

from . import apgd, autoattack, base, ensemble, fab, gradient, masking, square
from .apgd import *  # noqa: F401,F403
from .autoattack import *  # noqa: F401,F403
from .base import *  # noqa: F401,F403
from .base import (  # noqa: F401  (private helpers that were importable from robustfl_lib.attacks)
    Forward,
    _channels_last_forward,
    _check_bounds,
    _check_channels_last,
    _check_eps,
    _check_norm,
    _input_grad,
    _keep_worst,
    _l2_norms,
    _per_example,
    _two_sum_error,
    _use_channels_last,
)
from .ensemble import *  # noqa: F401,F403
from .fab import *  # noqa: F401,F403
from .gradient import *  # noqa: F401,F403
from .masking import *  # noqa: F401,F403
from .square import *  # noqa: F401,F403

__all__ = [*base.__all__, *gradient.__all__, *apgd.__all__, *fab.__all__, *square.__all__, *autoattack.__all__,
           *masking.__all__, *ensemble.__all__]
