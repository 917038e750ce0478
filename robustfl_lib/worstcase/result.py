"""What the benchmark measured: the per-run rows, the per-cell choice and estimate, CSV files,
the markdown table and the heatmap."""

from __future__ import annotations

import csv
import itertools
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..evidence import Estimate, summarize
from .config import WORST_CASE_CONVENTIONS, WorstCaseConfig

__all__ = ["WorstCaseResult", "ROW_COLUMNS", "SUMMARY_COLUMNS"]

#: Columns of the per-run CSV (one row per cell x setting x attack x seed).
ROW_COLUMNS = ("heterogeneity", "fraction", "num_byzantine", "rule", "setting", "attack", "seed",
               "val_accuracy", "test_accuracy", "n_val", "n_test", "status")
#: Columns of the summary CSV (one row per cell).
SUMMARY_COLUMNS = ("heterogeneity", "fraction", "rule", "status", "setting", "val_worst_case", "val_worst_attack",
                   "worst_attack", "test_worst_case", "low", "high", "k", "n_test")


def _worst(acc: np.ndarray, convention: str, attacks: list[str]) -> tuple[np.ndarray, str]:
    """Per-seed values of the worst case over attacks (rows of ``acc``) and the attack behind it."""
    if convention == "mean":
        i = int(np.argmin(acc.mean(axis=1)))  # the first of equal means
        return acc[i], attacks[i]
    idx = acc.argmin(axis=0)
    name, count = Counter(attacks[i] for i in idx).most_common(1)[0]
    return acc.min(axis=0), f"{name} ({count}/{acc.shape[1]})"


def _summarize(rows: Sequence[Mapping[str, Any]], convention: str) -> list[dict[str, Any]]:
    cells: dict[tuple[str, float, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["heterogeneity"], float(r["fraction"]), r["rule"]), []).append(r)
    # Heterogeneity, then fraction, then rule, each in the order the rows first show it.
    order = [list(dict.fromkeys(key[i] for key in cells)) for i in range(3)]
    summary = []
    for (het, p, rule), group in sorted(cells.items(), key=lambda kv: [order[i].index(kv[0][i]) for i in range(3)]):
        entry: dict[str, Any] = {"heterogeneity": het, "fraction": p, "rule": rule, "estimate": None}
        ran = [r for r in group if not str(r["status"]).startswith("n/a")]
        if not ran:
            summary.append({**entry, "status": group[0]["status"]})
            continue
        settings = list(dict.fromkeys(r["setting"] for r in ran))
        attacks = list(dict.fromkeys(r["attack"] for r in ran))
        seeds = list(dict.fromkeys(int(r["seed"]) for r in ran))
        val = np.full((len(settings), len(attacks), len(seeds)), np.nan)
        test = val.copy()
        for r in ran:
            at = settings.index(r["setting"]), attacks.index(r["attack"]), seeds.index(int(r["seed"]))
            val[at], test[at] = float(r["val_accuracy"]), float(r["test_accuracy"])
        if np.isnan(val).any() or np.isnan(test).any():
            raise ValueError(f"cell {rule!r}, {het}, fraction {p}: every setting needs every attack at every seed")
        scores = [float(_worst(val[j], convention, attacks)[0].mean()) for j in range(len(settings))]
        j = int(np.argmax(scores))  # the first of equal scores
        values, worst_attack = _worst(test[j], convention, attacks)
        n_test = min(int(r["n_test"]) for r in ran)
        estimate = summarize(values, n_test=n_test, what=f"{rule}, {het}, fraction {p:g}: worst-case test accuracy")
        summary.append({**entry, "status": "ok", "setting": settings[j], "val_worst_case": scores[j],
                        "val_worst_attack": _worst(val[j], convention, attacks)[1], "worst_attack": worst_attack,
                        "estimate": estimate, "n_test": n_test, "setting_scores": dict(zip(settings, scores))})
    return summary


_INT_COLUMNS = ("num_byzantine", "seed", "n_val", "n_test")
_FLOAT_COLUMNS = ("fraction", "val_accuracy", "test_accuracy")


class WorstCaseResult:
    """What :func:`worst_case_benchmark` measured.

    ``rows``: one dict per cell x setting x attack x seed (:data:`ROW_COLUMNS`; a setting whose
    rule cannot run at that fraction has one row with ``status`` ``"n/a: <why>"``).
    ``summary``: one dict per cell (heterogeneity x fraction x rule) with the chosen
    ``setting``, its ``val_worst_case`` score, ``worst_attack`` on test and the ``estimate``
    (:class:`~robustfl_lib.Estimate` of the worst-case test accuracy), computed from ``rows``
    under ``worst_case`` (``"mean"`` or ``"per_seed"``), so a result read back with
    :meth:`from_csv` has the same summary.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], worst_case: str = "mean",
                 config: WorstCaseConfig | None = None):
        if worst_case not in WORST_CASE_CONVENTIONS:
            raise ValueError(f"worst_case must be one of {WORST_CASE_CONVENTIONS}, got {worst_case!r}")
        missing = sorted({c for r in rows for c in ROW_COLUMNS if c not in r})
        if not rows or missing:
            raise ValueError(f"rows must be a non-empty list of dicts with {list(ROW_COLUMNS)}; missing {missing}")
        self.rows = [dict(r) for r in rows]
        self.worst_case, self.config = worst_case, config
        self.summary = _summarize(self.rows, worst_case)

    def to_csv(self, path: str | os.PathLike, summary_path: str | os.PathLike | None = None) -> Path:
        """Write ``rows`` to ``path`` and ``summary`` to ``summary_path`` (default
        ``<path stem>_summary.csv``); returns the summary's path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=ROW_COLUMNS)
            writer.writeheader()
            writer.writerows({c: ("" if r[c] is None else r[c]) for c in ROW_COLUMNS} for r in self.rows)
        out = Path(summary_path) if summary_path is not None else path.with_name(path.stem + "_summary.csv")
        with open(out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            for s in self.summary:
                e = s["estimate"]
                extra = {} if e is None else {"test_worst_case": e.value, "low": e.low, "high": e.high, "k": e.k}
                writer.writerow({c: s.get(c, "") for c in SUMMARY_COLUMNS if c not in ("estimate",)} | extra)
        return out

    @classmethod
    def from_csv(cls, path: str | os.PathLike, worst_case: str = "mean") -> WorstCaseResult:
        """The result whose ``rows`` :meth:`to_csv` wrote to ``path``."""
        with open(path, newline="") as fh:
            rows = []
            for r in csv.DictReader(fh):
                for c in _INT_COLUMNS + _FLOAT_COLUMNS:
                    r[c] = None if r.get(c, "") == "" else (int(r[c]) if c in _INT_COLUMNS else float(r[c]))
                rows.append({c: (None if r.get(c) == "" else r.get(c)) for c in ROW_COLUMNS})
        return cls(rows, worst_case=worst_case)

    def _axes(self) -> tuple[list[str], list[float], list[str]]:
        s = self.summary
        return (list(dict.fromkeys(x["heterogeneity"] for x in s)), list(dict.fromkeys(x["fraction"] for x in s)),
                list(dict.fromkeys(x["rule"] for x in s)))

    def table(self, digits: int = 3) -> str:
        """A markdown table, one line per cell: chosen setting, worst attack, worst-case test
        accuracy with its 95% interval, and the validation worst case it was chosen by."""
        lines = ["| heterogeneity | fraction | rule | chosen setting | worst attack | worst-case test accuracy "
                 "[95% CI] | worst-case validation |", "|---|---|---|---|---|---|---|"]
        for s in self.summary:
            e: Estimate | None = s["estimate"]
            if e is None:
                cells = ["-", "-", f"n/a ({s['status'][5:]})", "-"]
            else:
                cells = [s["setting"], s["worst_attack"], f"{e.value:.{digits}f} [{e.low:.{digits}f}, "
                         f"{e.high:.{digits}f}]", f"{s['val_worst_case']:.{digits}f} ({s['val_worst_attack']})"]
            lines.append(f"| {s['heterogeneity']} | {s['fraction']:g} | {s['rule']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def heatmap(self, ax: Any = None):
        """One panel per heterogeneity level: rules (rows) x fractions (columns), coloured by the
        worst-case test accuracy (cividis, 0 to 1) and annotated with it and its interval; n/a
        cells grey. ``ax``: one Axes per level (or one Axes for one level); returns the figure."""
        import matplotlib.pyplot as plt

        hets, fracs, rules = self._axes()
        if ax is None:
            width = 0.09 * max(map(len, rules)) + len(hets) * (0.4 + 1.3 * len(fracs)) + 1.2
            fig, axes = plt.subplots(1, len(hets), figsize=(width, 1.2 + 0.55 * len(rules)), sharey=True,
                                     squeeze=False, constrained_layout=True)
            axes = list(axes[0])
        else:
            axes = list(np.atleast_1d(ax))
            if len(axes) != len(hets):
                raise ValueError(f"heatmap needs one Axes per heterogeneity level ({len(hets)}), got {len(axes)}")
            fig = axes[0].figure
        cmap = plt.get_cmap("cividis").with_extremes(bad="lightgray")
        by = {(s["heterogeneity"], s["fraction"], s["rule"]): s["estimate"] for s in self.summary}
        for a, het in zip(axes, hets):
            grid = np.full((len(rules), len(fracs)), np.nan)
            for (i, r), (j, p) in itertools.product(enumerate(rules), enumerate(fracs)):
                e = by.get((het, p, r))
                text = "n/a" if e is None else f"{e.value:.2f}\n[{e.low:.2f}, {e.high:.2f}]"
                if e is not None:
                    grid[i, j] = e.value
                a.text(j, i, text, ha="center", va="center", fontsize=7,
                       color="white" if e is not None and e.value < 0.5 else "black")
            im = a.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
            a.set_xticks(range(len(fracs)), [f"{p:g}" for p in fracs])
            a.set_yticks(range(len(rules)), rules)
            a.tick_params(axis="y", labelleft=a is axes[0])
            a.set_xlabel("Byzantine fraction")
            a.set_title(het)
        fig.colorbar(im, ax=axes, label="worst-case test accuracy")
        return fig

    def __repr__(self) -> str:
        return f"WorstCaseResult({len(self.rows)} rows, {len(self.summary)} cells, worst_case={self.worst_case!r})"
