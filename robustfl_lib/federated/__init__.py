"""The federated-learning simulation.

One round of FedAvg-style training (McMahan et al. 2017):

1. the server samples participating clients and sends the global weights ``w``
   (:func:`select_participants`);
2. each client trains locally and returns its update ``u_i = w_i - w``, a delta
   (:func:`compute_client_updates`): ``local_epochs`` epochs, or exactly ``local_steps``
   SGD steps (``local_steps=1``: distributed SGD); with worker momentum
   (``client_momentum``) it sends its momentum ``m_i`` instead (:class:`WorkerMomentum`);
3. Byzantine participants replace their update by an attack computed from the
   honest participants' updates (:func:`apply_byzantine_attack`), unless the
   attack is data poisoning (label flipping), which already acted in step 2;
4. the server sets ``w <- w + A(u_1, ..., u_n)`` for an aggregator ``A``
   (:mod:`robustfl_lib.aggregators`) and records what ``A`` kept (:func:`aggregate_round`);
5. the global model is evaluated on held-out test data: clean accuracy, and
   robust accuracy under PGD when ``eval_eps`` is set.

The vector a client sends holds every float entry of the model's state: BatchNorm's running
statistics go through the aggregator with the weights, its integer ``num_batches_tracked`` stays
with the global model (:mod:`robustfl_lib.params`, "BatchNorm in federated learning").

Clients train with plain SGD (``local_training="standard"``) or adversarially
(``"adversarial"``: PGD inside every minibatch, :func:`robustfl_lib.training.adversarial_train`).
With ``vectorized=True`` all participating clients of a round train in one batched
computation (:mod:`robustfl_lib.vectorized`), equal to the client-by-client loop up
to rounding. Participants may drop out (``dropout``). Every randomness is drawn from
streams seeded by ``seed``, and a run can be checkpointed every ``checkpoint_every``
rounds and resumed, in any process, to exactly the model and history of an
uninterrupted run: the checkpoint holds every random stream the run draws from and
the state of the objects it holds (:mod:`robustfl_lib.checkpoint`), and recognises
the configuration by value, not by ``repr``.

A run owns deep copies of its config's aggregator and attack objects, so runs made
from one object never share state, and :func:`run_grid` runs many configurations
(rules, attacks, Byzantine fractions, and seeds) in lock step, their clients' local
training batched into one computation.

The aggregator, the attack and the client update step are pluggable (a custom
:class:`ClientUpdate` may ask for the ``client_id`` it trains). Taught in chapter
``00_introduction`` (FedAvg), ``03_byzantine_threats`` (Byzantine clients),
``08_stronger_aggregators`` (worker momentum with centered clipping) and
``09_robust_federated_learning`` (the whole pipeline).

Modules: :mod:`~robustfl_lib.federated.config` (:class:`FLConfig`, :func:`config_dict`),
:mod:`~robustfl_lib.federated.clients` (local training, client updates),
:mod:`~robustfl_lib.federated.momentum` (:class:`WorkerMomentum`),
:mod:`~robustfl_lib.federated.server` (participants, Byzantine forging, aggregation),
:mod:`~robustfl_lib.federated.simulation` (:func:`run_federated`, checkpoints, the server's root data),
:mod:`~robustfl_lib.federated.grid` (:func:`run_grid`) and :mod:`~robustfl_lib.federated.hooks` (which
optional keywords an aggregator, poisoning or client update accepts: ``client_ids``, ``global_model``,
``reference``, ``client_id``, ``previous_step``; each reaches only an object that takes it).
"""

from .clients import *  # noqa: F401,F403
from .config import *  # noqa: F401,F403
from .grid import *  # noqa: F401,F403
from .momentum import *  # noqa: F401,F403
from .server import *  # noqa: F401,F403
from .simulation import *  # noqa: F401,F403
# Internal names that other modules, benchmarks and tests import from robustfl_lib.federated.
from .clients import _adversarial_sample_loss, _stackable, _train_clients  # noqa: F401
from .simulation import _Simulation  # noqa: F401

__all__ = [
    "FLConfig",
    "FLResult",
    "ClientUpdate",
    "ClientUpdateWithId",
    "WorkerMomentum",
    "sgd_client_update",
    "adversarial_client_update",
    "trades_client_update",
    "certified_client_update",
    "run_federated",
    "root_indices",
    "byzantine_clients",
    "select_participants",
    "compute_client_updates",
    "apply_byzantine_attack",
    "aggregate_round",
    "config_dict",
    "run_grid",
    "GRID_VARIABLE",
]
