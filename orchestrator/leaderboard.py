"""A sweep's trials as a reviewer reads them: ranked on the selection metric, seeds aggregated.

One room for what every output of a sweep shares (the end-of-sweep table, `clorch report`, the parent MLflow
run): which trials count, how trials that differ only in their seed form one configuration, how
configurations are ranked, and what the selection metric says about the protocol.

- Only finished trials are ranked. A trial stopped early, errored or still running has a metric over fewer
  stages, which is not comparable; such trials are listed apart, unranked.
- A configuration is a set of swept values with the seed keys (`SEED_KEYS`) left out; its score on a metric
  is the mean over its finished trials, with the sample standard deviation (n - 1 in the denominator; "-"
  for n = 1).
- Selection is on a validation metric unless a test metric was asked for by name; outputs then say so.
- Several selection metrics (`tune.metric: [a, b]`) select a Pareto set (`pareto_set`) instead of one best
  configuration; the tables are ordered by the first metric, which also names the `best` one.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from workloads.config import ConfigError
from workloads.metrics import DIRECTIONS, SPLITS, direction, split_of

# Swept keys that make repeats of one configuration rather than different configurations.
SEED_KEYS = ("seed", "data.class_order_seed")
DEFAULT_METRIC = "val/average_accuracy"


@dataclass
class TrialSummary:
    """One trial as the leaderboard sees it."""

    trial: str
    state: str  # done | stopped (early, e.g. by ASHA) | error | running | pending | paused | incomplete
    stages: int  # stages completed
    total_stages: int | None  # None until the trial has reported once
    metrics: dict  # the last report's scalar metrics
    params: dict  # swept dotted key -> value
    seen: list[float] = field(default_factory=list)  # test accuracy on seen classes after each stage
    matrix: list[list[float]] = field(default_factory=list)  # test R[i][j] for the stages completed
    axis: str = "stage"  # what R's rows and columns are: `stage`, or `domain` on a domain or user stream
    label: str = ""  # what it sweeps, in words (orchestrator.sweep.trial_label): `dkvb K=256 seed=1`
    config_label: str = ""  # the same without its seeds: its configuration's name

    @property
    def future_inputs(self) -> bool:
        return bool(self.metrics.get("protocol.future_inputs"))


@dataclass
class Group:
    """The finished trials of one configuration (swept values without the seed keys)."""

    params: dict
    trials: list[TrialSummary]
    pareto: bool | None = None  # on the Pareto set of several selection metrics; None with one metric

    @property
    def n(self) -> int:
        return len(self.trials)

    @property
    def label(self) -> str:
        return self.trials[0].config_label or ", ".join(f"{k}={v}" for k, v in self.params.items()) or "base"

    def stats(self, metric: str) -> tuple[float, float]:
        """(mean, sample std) of `metric` over the group's trials; nan where undefined."""
        values = [t.metrics[metric] for t in self.trials if _finite(t.metrics.get(metric))]
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan

    @property
    def future_inputs(self) -> bool:
        return any(t.future_inputs for t in self.trials)


def selection_metrics(metric: str | list[str]) -> list[str]:
    """The selection metrics as a list: `tune.metric` names one, or several for a Pareto selection."""
    return [metric] if isinstance(metric, str) else list(metric)


def selection_modes(metric: str | list[str], mode: str | list[str] | None) -> list[str]:
    """One mode per selection metric: the given ones, else each metric's own direction."""
    metrics = selection_metrics(metric)
    if mode is None:
        return [direction(m) or "max" for m in metrics]
    return [mode] * len(metrics) if isinstance(mode, str) else list(mode)


def with_directions(metric: str | list[str], mode: str | list[str] | None) -> str:
    """'val/average_accuracy (max), val/forgetting (min)': the selection metrics, each with its direction."""
    return ", ".join(f"{m} ({d})" for m, d in zip(selection_metrics(metric), selection_modes(metric, mode)))


def check_metric(metric: str, has_validation: bool = True) -> str:
    """The direction of a selection metric; a ConfigError naming what is accepted for anything else."""
    accepted = ", ".join(f"{s}/{m}" for s in SPLITS for m in DIRECTIONS)
    if split_of(metric) is None:
        hint = (f"; name the split: val/{metric} (selects on validation data) or test/{metric} (on test data)"
                if metric in DIRECTIONS else "")
        raise ConfigError(f"tune.metric: {metric!r} is not a metric clorch reports{hint}; accepted: {accepted}")
    if direction(metric) is None:
        raise ConfigError(f"tune.metric: {metric!r} is not a metric clorch reports; accepted: {accepted}")
    if split_of(metric) == "val" and not has_validation:
        raise ConfigError(f"tune.metric: {metric} needs a validation set, but data.validation is 0; give data."
                          f"validation a fraction, or select on test data by naming tune.metric: "
                          f"test/{metric.partition('/')[2]}")
    return direction(metric)


def selection_note(metric: str | list[str]) -> str:
    """One line on what the ranking was selected on (one metric, or the Pareto set of several), for every
    output."""
    metrics = selection_metrics(metric)
    named = ", ".join(metrics)
    if len(metrics) > 1:
        named += f": the Pareto set, ordered by {metrics[0]}"
    on_test = [m for m in metrics if split_of(m) == "test"]
    if on_test:
        asked = "" if len(on_test) == len(metrics) else f"; {', '.join(on_test)} on test"
        return (f"selected on TEST data ({named}{asked}, asked for by name): a model chosen on test scores "
                "overstates them; report validation-selected results in a paper")
    return f"selected on validation data ({named}); test scores are reported, never used to choose"


def selection_tags(metric: str | list[str]) -> dict[str, str]:
    """The protocol tags of a sweep's parent run: its selection metric(s), on which split, and the note."""
    metrics = selection_metrics(metric)
    splits = {split_of(m) for m in metrics}
    selection = ("validation" if splits == {"val"} else "test (asked for by name)" if splits == {"test"}
                 else "validation and test (test asked for by name)")
    return {"protocol.selection_metric": ", ".join(metrics), "protocol.selection": selection,
            "protocol.selection_note": selection_note(metric)}


def rank(trials: list[TrialSummary], metric: str | list[str],
         mode: str | list[str] | None) -> tuple[list[Group], list[TrialSummary]]:
    """Configurations of finished trials, best mean of the (first) metric first, each marked on or off the
    Pareto set when there are several metrics; and the trials that are not ranked (unfinished)."""
    metrics, modes = selection_metrics(metric), selection_modes(metric, mode)
    metric, mode = metrics[0], modes[0]
    groups: dict[str, Group] = {}
    for t in trials:
        if t.state != "done":
            continue
        params = {k: v for k, v in t.params.items() if k not in SEED_KEYS}
        key = json.dumps(params, sort_keys=True, default=str)
        groups.setdefault(key, Group(params, [])).trials.append(t)
    sign = -1 if mode == "max" else 1

    def order(g: Group) -> tuple:
        mean = g.stats(metric)[0]
        return (math.isnan(mean), 0.0 if math.isnan(mean) else sign * mean)

    ranked = sorted(groups.values(), key=order)
    if len(metrics) > 1:
        front = pareto_set(ranked, metrics, modes)
        for g in ranked:
            g.pareto = any(g is f for f in front)
    return ranked, [t for t in trials if t.state != "done"]


def pareto_set(groups: list[Group], metrics: list[str], modes: list[str]) -> list[Group]:
    """The configurations on the Pareto set of `metrics`, in their given order.

    A configuration is on the Pareto set when no other configuration is at least as good on every metric and
    strictly better on one, each metric compared by its mean over seeds in its own direction (`modes`).
    Configurations with equal means on every metric do not dominate each other: ties are all on the set. A
    configuration without a mean on some metric (nan) is neither on the set nor dominates another.
    """
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    points = [[s * g.stats(m)[0] for m, s in zip(metrics, signs)] for g in groups]  # larger is better

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    comparable = [i for i, p in enumerate(points) if not any(math.isnan(v) for v in p)]
    return [groups[i] for i in comparable
            if not any(dominates(points[j], points[i]) for j in comparable if j != i)]


def ranked_trials(trials: list[TrialSummary], metric: str | list[str],
                  mode: str | list[str] | None) -> list[TrialSummary]:
    """Finished trials best first by their own (first) metric, then the others (unranked) in their given
    order."""
    metric, mode = selection_metrics(metric)[0], selection_modes(metric, mode)[0]
    sign = -1 if mode == "max" else 1
    done = [t for t in trials if t.state == "done"]
    done.sort(key=lambda t: (not _finite(t.metrics.get(metric)),
                             sign * t.metrics[metric] if _finite(t.metrics.get(metric)) else 0.0))
    return done + [t for t in trials if t.state != "done"]


def score_metrics(metric: str | list[str]) -> list[str]:
    """The columns a leaderboard shows for its selection metric(s): each on validation and on test."""
    columns: list[str] = []
    for m in selection_metrics(metric):
        base = m.partition("/")[2]
        columns += [c for c in (f"{split}/{base}" for split in SPLITS) if c not in columns]
    return columns


def group_rows(groups: list[Group], metric: str | list[str], keys: list[str]) -> list[dict[str, Any]]:
    """Plain rows (rank, n, mean and std per score metric, swept values, future inputs, and with several
    metrics whether it is on the Pareto set) for tables and CSV."""
    rows = []
    for i, g in enumerate(groups, 1):
        row: dict[str, Any] = {"rank": i, "n": g.n}
        for m in score_metrics(metric):
            row[f"{m} mean"], row[f"{m} std"] = g.stats(m)
        row.update({k: g.params.get(k) for k in keys if k not in SEED_KEYS})
        row["future_inputs"] = g.future_inputs
        if g.pareto is not None:
            row["pareto"] = g.pareto
        row["trials"] = " ".join(t.trial for t in g.trials)
        rows.append(row)
    return rows


def mean_std(mean: float, std: float) -> str:
    """'0.9123 ± 0.0040', '0.9123' when std is undefined (n = 1), '-' when there is no mean."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, so long swept values keep the table aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
