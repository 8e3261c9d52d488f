"""A sweep's leaderboard: its trials ranked by a metric, with their swept values, state and stages, and plots.

Everything is read from the experiment folder (Tune's experiment state and each trial's reported results), so
a report works while the sweep runs, after it ended or failed, and with neither Ray nor MLflow running.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.sweep import check_sweep, state_dir
from workloads.config import ConfigError

SUMMARY_METRICS = ("average_accuracy", "average_incremental_accuracy", "forgetting", "bwt")
CSV_FILE = "leaderboard.csv"


@dataclass
class TrialSummary:
    """One trial as the report sees it."""

    trial: str
    state: str  # done | stopped (early, e.g. by ASHA) | error | running | pending | paused
    stages: int  # stages completed
    total_stages: int | None  # None until the trial has reported once
    metrics: dict  # the last report's scalar metrics
    params: dict  # swept dotted key -> value
    seen: list[float] = field(default_factory=list)  # accuracy on seen classes after each stage
    matrix: list[list[float]] = field(default_factory=list)  # R[i][j] for the stages completed


def load_trials(name: str, storage: Path) -> tuple[list[TrialSummary], list[str]]:
    """The sweep's trials and its swept keys (in the experiment file's order)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(check_sweep(name, Path(storage))))
    keys: list[str] = []
    frames = analysis.trial_dataframes
    trials = []
    for t in analysis.trials:
        last = t.last_result or {}
        matrix = json.loads(last["accuracy_matrix"]) if "accuracy_matrix" in last else []
        stages = int(last["stage"]) + 1 if "stage" in last else 0
        total = len(matrix[0]) if matrix else None
        state = {"TERMINATED": "done" if total and stages == total else "stopped"}.get(t.status, t.status.lower())
        df = frames.get(t.trial_id)
        seen = []
        if df is not None and "accuracy_on_seen_classes" in df:
            # A resumed trial may report a stage again: keep its latest report.
            df = df.dropna(subset=["stage"]).drop_duplicates("stage", keep="last").sort_values("stage")
            seen = [float(v) for v in df["accuracy_on_seen_classes"]]
        params = (t.config or {}).get("sweep") or {}
        keys += [k for k in params if k not in keys]
        trials.append(TrialSummary(t.trial_id, state, stages, total,
                                   {k: v for k, v in last.items() if _is_number(v)}, params, seen, matrix))
    return trials, keys


def write_report(name: str, storage: Path, out_dir: Path | None = None, metric: str = "average_accuracy",
                 mode: str = "max") -> str:
    """`clorch report NAME [--storage S] [--out DIR]` calls this: a markdown leaderboard; CSV and plots to out_dir."""
    if mode not in ("max", "min"):
        raise ConfigError(f"--mode: max or min, got {mode!r}")
    trials, keys = load_trials(name, storage)
    reported = [t for t in trials if t.metrics]
    if reported and not any(metric in t.metrics for t in reported):
        known = sorted({k for t in reported for k in t.metrics if k in SUMMARY_METRICS or "accuracy" in k})
        raise ConfigError(f"--metric: no trial of {name} reports {metric!r}; reported: {', '.join(known)}")
    sign = -1 if mode == "max" else 1

    def order(t: TrialSummary) -> tuple:
        value = t.metrics.get(metric)
        missing = value is None or math.isnan(value)
        # Finished trials first: a metric over fewer stages (stopped, errored, running) is not comparable.
        return missing, t.state != "done", 0.0 if missing else sign * value

    trials.sort(key=order)
    out_dir = Path(out_dir) if out_dir is not None else state_dir(Path(storage), name) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [metric] + [m for m in SUMMARY_METRICS if m != metric]

    with open(out_dir / CSV_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "trial", "state", "stages_completed", "stages_total", *columns, *keys, "plot"])
        for rank, t in enumerate(trials, 1):
            plot = _plot(t, keys, out_dir / f"{t.trial}.png")
            writer.writerow([rank, t.trial, t.state, t.stages, t.total_stages or "",
                             *(t.metrics.get(c, "") for c in columns), *(t.params.get(k, "") for k in keys),
                             plot.name if plot else ""])

    head = ["#", "trial", "state", "stages", *columns, *keys]
    lines = [f"## Sweep `{name}`: {len(trials)} trial(s) by {metric} ({mode})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, t in enumerate(trials, 1):
        stages = f"{t.stages}/{t.total_stages}" if t.total_stages else "0"
        cells = [str(rank), t.trial, t.state, stages, *(_cell(t.metrics.get(c)) for c in columns),
                 *(_cell(t.params.get(k)) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    if any(t.state != "done" for t in trials):
        lines += ["", "Trials that did not finish every stage are ranked after those that did."]
    lines += ["", f"CSV and one plot per trial (`<trial>.png`) in {out_dir}"]
    return "\n".join(lines) + "\n"


def _plot(t: TrialSummary, keys: list[str], path: Path) -> Path | None:
    """Accuracy on seen classes per stage, and each stage's accuracy over the stages after it; None if no data."""
    if not t.seen and not t.matrix:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot state, no global backend switch in the caller's process.
    fig = Figure(figsize=(9, 3.4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, sharey=True)
    left.plot(range(1, len(t.seen) + 1), t.seen, marker="o")
    left.set(xlabel="after stage", ylabel="accuracy", title="accuracy on seen classes", ylim=(0, 1.02))
    for j in range(len(t.matrix)):
        xs = list(range(j + 1, len(t.matrix) + 1))
        right.plot(xs, [t.matrix[i][j] for i in range(j, len(t.matrix))], marker="o", label=f"stage {j + 1}")
    right.set(xlabel="after stage", title="accuracy on each stage's classes")
    if t.matrix:
        right.legend(fontsize="small")
    for ax in (left, right):
        ax.set_xticks(range(1, max(len(t.seen), len(t.matrix)) + 1))
        ax.grid(alpha=0.3)
    swept = ", ".join(f"{k}={_cell(t.params.get(k))}" for k in keys if k in t.params)
    fig.suptitle(f"trial {t.trial} ({t.state})" + (f": {swept}" if swept else ""), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value).replace("|", "\\|")
