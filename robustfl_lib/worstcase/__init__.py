"""The worst-case benchmark: which rule to use, judged by the strongest attack of a set.

For each rule, heterogeneity level and Byzantine fraction (a *cell*), the benchmark asks
what accuracy the rule guarantees when the attacker picks the attack that hurts it most,
with the rule's hyperparameters tuned for exactly that worst case, on data the report
does not touch. This is the protocol of ByzFL's benchmark (González et al. 2025, "ByzFL:
Research Framework for Robust Federated Learning", arXiv:2505.24802: hyperparameters chosen
by the highest worst-case accuracy over attacks on a validation set), whose optimal ALIE and
IPM attacks are those of Allouah et al. 2023 ("Fixing by mixing: a recipe for optimal
Byzantine ML under heterogeneity", AISTATS); here it runs through this library's engine
with the book's evidence standard (seeds and intervals, chapter ``00_introduction``).

Procedure (:func:`worst_case_benchmark`), for every cell:

1. every seed ``s`` of ``derive_seeds(base_seed, k)`` loads its own split, and a
   stratified ``validation_fraction`` of its training split is held out of every client
   (:func:`validation_split`, the split of chapter ``09_robust_federated_learning``);
2. every hyperparameter *setting* of the rule's grid (learning rate, local epochs, the
   rule's own parameters such as centered clipping's ``tau`` or bucketing's ``s``) runs
   against every attack over all seeds in lock step
   (:func:`robustfl_lib.evidence.run_over_seeds`); each final global model is evaluated on
   the validation split and on the test split;
3. a setting's **worst-case validation accuracy** is the minimum over attacks; the
   setting with the highest one is chosen (ties: the first in grid order);
4. the chosen setting's **worst-case test accuracy** is reported as an estimate with a
   95% interval over the seeds (:func:`robustfl_lib.summarize`, floored by the test set's
   size), with the attack that achieved it.

Where the minimum over attacks is taken (``worst_case``):

* ``"mean"`` (default, ByzFL's convention): on the seed-averaged accuracy,
  ``min_a mean_s acc[a, s]``. The worst attack is one attack; the estimate is that
  attack's per-seed accuracies, so its interval is that of a mean over seeds. Choosing the
  attack on the same test runs makes the number a little pessimistic (the minimum of
  noisy means), which errs on the defender's side.
* ``"per_seed"`` (chapter 9's): per seed, ``mean_s min_a acc[a, s]``: an attacker who
  may adapt the attack to the seed. Never above ``"mean"``; the worst attack reported is
  the one most often worst, with its count.

Differences from ByzFL, on purpose: accuracy is the *final* round's (ByzFL takes the best
round of the averaged curve, which picks a stopping time with the data it reports on);
heterogeneity is Dirichlet label skew (ByzFL's "gamma similarity" is another knob); a run
that fails (the rule refused the updates, or training went non-finite) scores 0 on both
splits, since it leaves no usable model; a cell whose rule cannot run at that fraction
(its requirement on n and f) is ``n/a``, which is not the same as breaking.

Attacks are taken by config name (anything :func:`robustfl_lib.get_attack` accepts, with
its kwargs); an attack that cannot be built without the rule it attacks (optimal ALIE/IPM,
adaptive scaling) is given the cell's rule, as an omniscient attacker knows it
(``aggregator = "rule"`` in its kwargs asks for the same explicitly), with the rule's
``f`` if it takes one.

Modules: :mod:`~robustfl_lib.worstcase.config` (the TOML/dict config, validated, and the plan
of runs), :mod:`~robustfl_lib.worstcase.run` (the validation split and the lock-step runs),
:mod:`~robustfl_lib.worstcase.result` (rows, per-cell choice and estimate, CSV, table, heatmap).

Chapter: ``17_which_rule`` (which rule should I use? the worst-case benchmark). Command line:
``python -m robustfl_lib worst-case --config benchmarks/worstcase_demo.toml --out results.csv``.
"""

from .config import WORST_CASE_CONVENTIONS, WorstCaseConfig, load_worst_case_config
from .result import ROW_COLUMNS, SUMMARY_COLUMNS, WorstCaseResult
from .run import validation_split, worst_case_benchmark

# ROW_COLUMNS and SUMMARY_COLUMNS stay in this namespace only (too generic for robustfl_lib's).
__all__ = ["WorstCaseConfig", "WorstCaseResult", "load_worst_case_config", "validation_split",
           "worst_case_benchmark", "WORST_CASE_CONVENTIONS"]
