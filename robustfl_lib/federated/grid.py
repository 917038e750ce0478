"""Many federated runs in lock step (:func:`run_grid`), their clients' local training batched together."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from ..checkpoint import global_rng_state
from ..data import Dataset, load_dataset
from ..params import flatten_state
from ..runtime import get_device
from .clients import _stackable, _train_clients
from .config import FLConfig, config_dict
from .simulation import FLResult, Metric, _Simulation

__all__ = ["run_grid", "GRID_VARIABLE"]


#: Settings that may differ between the runs of :func:`run_grid`; all others must agree.
GRID_VARIABLE = ("aggregator", "aggregator_f", "aggregator_kwargs", "byzantine_fraction", "byzantine_attack",
                 "attack_kwargs", "eval_eps", "eval_steps", "progress", "seed", "client_momentum",
                 "client_momentum_init")


def _grid_data(configs: list[FLConfig], data: Dataset | Mapping[int, Dataset] | None) -> list[Dataset]:
    """Each config's dataset: ``data`` itself, ``data[seed]``, or ``load_dataset(dataset, seed=seed)``
    loaded once per distinct seed."""
    if data is None:
        base = configs[0]
        cache = {seed: load_dataset(base.dataset, seed=seed, **base.dataset_kwargs)
                 for seed in dict.fromkeys(c.seed for c in configs)}
        return [cache[c.seed] for c in configs]
    if isinstance(data, Mapping):
        missing = sorted({c.seed for c in configs} - set(data))
        if missing:
            raise ValueError(f"data has datasets for seeds {sorted(data)} but not for the configs' seed(s) {missing}")
        return [data[c.seed] for c in configs]
    return [data] * len(configs)


def run_grid(
    configs: list[FLConfig], data: Dataset | Mapping[int, Dataset] | None = None, progress: bool = True,
    metrics: Mapping[str, Metric] | None = None,
) -> list[FLResult]:
    """Run several federated simulations in lock step: a grid of rules, attacks and seeds.

    Every round, the local training of *all* runs' clients is one batched
    computation (:func:`robustfl_lib.vectorized.train_stacked` with each run's
    global weights as its clients' starting points), which makes a grid of
    aggregators x attacks x Byzantine fractions (chapter
    ``09_robust_federated_learning``), or one configuration over k seeds (the
    evidence of :mod:`robustfl_lib.evidence`), cost little more than one run.

    The configs may differ only in :data:`GRID_VARIABLE`, which includes ``seed``:
    runs with different seeds have their own data split, partition, model
    initialisation, Byzantine clients and client streams. ``data`` is one
    :class:`~robustfl_lib.data.Dataset` shared by all runs, a dict ``{seed: Dataset}``,
    or ``None``: each distinct seed loads ``load_dataset(dataset, seed=seed)`` once.
    ``vectorized`` must be on, and the model must have no buffers. ``metrics`` are measured on
    every run's global model as in :func:`~robustfl_lib.federated.run_federated`. A rule that
    asks for the server's update (FLTrust, with ``server_root_size > 0``) gets it: the server's
    local training is one more row of its run's block in the batched computation.

    Each run owns copies of its aggregator and attack objects and its own global
    RNG streams, swapped in while its rounds are planned and finished, and draws its
    PGD random starts (adversarial local training) from its own stream; so each
    result equals ``run_federated(config)`` up to the floating-point rounding of
    the batched computation, whether or not the configs share objects.
    """
    if not configs:
        raise ValueError("run_grid needs at least one config")
    ref = config_dict(configs[0])
    for i, c in enumerate(configs[1:], 1):
        diff = sorted(k for k, v in config_dict(c).items() if k not in GRID_VARIABLE and v != ref[k])
        if diff:
            raise ValueError(f"config {i} differs from config 0 in {diff}; run_grid runs may differ only in {GRID_VARIABLE}")
    base = configs[0]
    if not base.vectorized:
        raise ValueError("run_grid trains all runs in one batched computation: set vectorized=True")
    device = get_device(base.device)
    datasets = _grid_data(configs, data)
    shapes = {(tuple(d.input_shape), d.num_classes) for d in datasets}
    if len(shapes) > 1:
        raise ValueError(f"run_grid trains every run's clients through one model architecture, but the datasets "
                         f"have different (input shape, classes): {sorted(shapes)}")
    sims = []
    for c, d in zip(configs, datasets):
        sims.append(_Simulation(c, d, device, metrics))
        sims[-1]._global_rng = global_rng_state()  # as a run of its own would start its rounds
    if not _stackable(sims[0].model):
        raise ValueError("run_grid needs a model without buffers (no BatchNorm); use run_federated")
    for rnd in tqdm(range(1, base.rounds + 1), desc="FL grid rounds", unit="round", disable=not progress):
        plans = []
        for sim in sims:
            with sim.own_global_rng():
                plans.append(sim.plan(rnd))
        xs = [x for p in plans for x in p[0]]
        if xs:
            ys = [y for p in plans for y in p[1]]
            gens = [g for p in plans for g in p[2]]
            starts = torch.cat([flatten_state(sim.model.state_dict()).expand(len(p[0]), -1)
                                for sim, p in zip(sims, plans)])
            blocks = [(len(p[0]), sim.config.seed) for sim, p in zip(sims, plans)]
            trained = _train_clients(sims[0].model, xs, ys, gens, base, rnd, None, starts=starts, blocks=blocks)
            chunks = trained.split([len(p[0]) for p in plans])
        else:
            chunks = [None] * len(sims)
        for sim, chunk in zip(sims, chunks):
            with sim.own_global_rng():
                sim.finish(rnd, chunk if chunk is not None and len(chunk) else None)
    return [sim.result() for sim in sims]


