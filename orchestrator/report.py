"""A sweep's report: configurations ranked with seeds aggregated, every trial, and per-trial plots.

Everything is read from the experiment folder (Tune's experiment state and each trial's reported results), so
a report works while the sweep runs, after it ended or failed, and with neither Ray nor MLflow running.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from orchestrator import leaderboard as lb
from orchestrator.leaderboard import TrialSummary
from orchestrator.sweep import live_trial_summaries, read_analysis, sweep_parts
from workloads.config import ConfigError

SUMMARY_METRICS = ("average_accuracy", "average_incremental_accuracy", "forgetting", "bwt")
CSV_FILE = "leaderboard.csv"  # configurations, seeds aggregated
TRIALS_FILE = "trials.csv"  # every trial
HTML_FILE = "report.html"  # all of it on one self-contained page


def load_trials(name: str, storage: Path) -> tuple[list[TrialSummary], list[str]]:
    """The sweep's trials, of every part (`clorch sweep --extend`), and its swept keys (in the experiment file's
    order)."""
    analyses = [read_analysis(folder) for folder in sweep_parts(Path(storage), name)]
    keys: list[str] = []
    frames = {trial: df for analysis in analyses for trial, df in analysis.trial_dataframes.items()}
    tune_trials = [t for analysis in analyses for t in analysis.trials]
    trials = live_trial_summaries(tune_trials)
    for t, summary in zip(tune_trials, trials):
        last = t.last_result or {}
        summary.matrix = json.loads(last["test/accuracy_matrix"]) if "test/accuracy_matrix" in last else []
        summary.axis = last.get("protocol.axis") or "stage"
        df = frames.get(t.trial_id)
        if df is not None and "test/accuracy_on_seen_classes" in df:
            # A resumed trial may report a stage again: keep its latest report.
            df = df.dropna(subset=["stage"]).drop_duplicates("stage", keep="last").sort_values("stage")
            summary.seen = [float(v) for v in df["test/accuracy_on_seen_classes"]]
        keys += [k for k in summary.params if k not in keys]
    return trials, keys


def write_report(name: str, storage: Path, out_dir: Path | None = None,
                 metric: str | list[str] = lb.DEFAULT_METRIC, mode: str | list[str] | None = None) -> str:
    """`clorch report NAME` calls this: a markdown leaderboard of configurations (seeds aggregated) and of
    trials, with the Pareto set when `metric` lists several; CSVs and plots to out_dir. `mode` defaults to each
    metric's own direction."""
    metrics = lb.selection_metrics(metric)
    several = len(metrics) > 1
    if several and isinstance(mode, str):
        raise ConfigError(f"--mode: the sweep selects on {len(metrics)} metrics ({', '.join(metrics)}), each in its "
                          "own direction; accepted: --metric with --mode, or no --mode")
    if any(m not in ("max", "min") for m in ([] if mode is None else lb.selection_modes(metric, mode))):
        raise ConfigError(f"--mode: max or min, got {mode!r}")
    trials, keys = load_trials(name, storage)
    reported = [t for t in trials if t.metrics]
    for m in metrics:
        if reported and not any(m in t.metrics for t in reported):
            known = sorted({k for t in reported for k in t.metrics if lb.direction(k)})
            raise ConfigError(f"--metric: no trial of {name} reports {m!r}; reported: {', '.join(known)}")
    mode = lb.selection_modes(metric, mode) if several else mode or lb.direction(metric) or "max"
    groups, unranked = lb.rank(trials, metric, mode)
    trials = lb.ranked_trials(trials, metric, mode)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_keys = [k for k in keys if k not in lb.SEED_KEYS]
    scores = lb.score_metrics(metric)
    rows = lb.group_rows(groups, metric, config_keys)

    with open(out_dir / CSV_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", "n", *(f"{m} {s}" for m in scores for s in ("mean", "std")),
                                               *config_keys, "future_inputs", "trials",
                                               *(["pareto"] if several else [])])
        writer.writeheader()
        writer.writerows(rows)
    columns = [*scores, *(f"test/{m}" for m in SUMMARY_METRICS if f"test/{m}" not in scores)]
    plots = []  # (trial, its plot) for the HTML page
    with open(out_dir / TRIALS_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "trial", "state", "stages_completed", "stages_total", *columns, *keys,
                         "future_inputs", "plot"])
        for i, t in enumerate(trials, 1):
            plot = _plot(t, keys, out_dir / f"{t.trial}.png")
            if plot:
                plots.append((t, plot))
            writer.writerow([i if t.state == "done" else "", t.trial, t.state, t.stages, t.total_stages or "",
                             *(t.metrics.get(c, "") for c in columns), *(t.params.get(k, "") for k in keys),
                             t.future_inputs, plot.name if plot else ""])

    by = lb.with_directions(metric, mode)
    lines = [f"## Sweep `{name}`: {len(groups)} configuration(s) of {len(trials)} trial(s) by "
             f"{'the Pareto set of ' if several else ''}{by}", "", lb.selection_note(metric) + ".", ""]
    if any(t.metrics.get("protocol.validation") == 0 for t in reported):
        lines += ["Some trials ran with data.validation: 0: they have no validation set, only test scores.", ""]
    if any(t.future_inputs for t in trials):
        lines += ["**Future inputs**: trials marked `yes` learned from every stage's unlabelled inputs before "
                  "stage 1 (learner.key_init_data: stream); their scores are transductive.", ""]
    head = ["#", "n", *scores, *config_keys, "future_inputs"]

    def config_line(r: dict, pareto: bool) -> str:
        cells = [str(r["rank"]), str(r["n"]), *(lb.mean_std(r[f"{m} mean"], r[f"{m} std"]) for m in scores),
                 *(_cell(r.get(k)) for k in config_keys), "yes" if r["future_inputs"] else "no",
                 *(["yes" if r["pareto"] else "no"] if pareto else [])]
        return "| " + " | ".join(cells) + " |"

    config_columns = head + (["pareto"] if several else [])
    lines += ["Configurations (finished trials only; mean ± std over seeds, std with n - 1):", "",
              "| " + " | ".join(config_columns) + " |", "|" + "---|" * len(config_columns),
              *(config_line(r, several) for r in rows)]
    if several:
        front = [r for r in rows if r["pareto"]]
        lines += ["", f"Pareto set over {by}: {len(front)} of {len(rows)} configuration(s), each one that no other "
                  "configuration matches or beats on every metric while beating it on one (means over seeds):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *(config_line(r, False) for r in front)]
    head = ["#", "trial", "state", "stages", *columns, *keys, "future_inputs"]
    lines += ["", "Trials:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(trials, 1):
        stages = f"{t.stages}/{t.total_stages}" if t.total_stages else "0"
        cells = [str(i) if t.state == "done" else "-", t.trial, t.state, stages,
                 *(_cell(t.metrics.get(c)) for c in columns), *(_cell(t.params.get(k)) for k in keys),
                 "yes" if t.future_inputs else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    if unranked:
        lines += ["", f"{len(unranked)} trial(s) did not finish every stage: they are listed, not ranked."]
    figures = comparison_figures(groups, trials[0].axis if trials else "stage", out_dir)
    lines += ["", f"{CSV_FILE} (configurations), {TRIALS_FILE}, the comparison figures "
              f"({', '.join(f.name for f in figures) or 'none: no finished trial'}), one plot per trial "
              f"(`<trial>.png`) and all of it on one page ({HTML_FILE}) in {out_dir}"]
    markdown = "\n".join(lines) + "\n"
    _write_html(out_dir / HTML_FILE, name, markdown, figures, plots)
    return markdown


def default_out_dir(name: str) -> Path:
    """Where `clorch report NAME` writes without --out: a visible folder under the working directory."""
    return Path("clorch_report") / name


def comparison_figures(groups: list, axis: str, out_dir: Path) -> list[Path]:
    """Every configuration in one picture, seeds aggregated: test accuracy on seen classes after each stage
    (mean line, band of ± one std over seeds), and final test accuracy against forgetting (one point each, std
    as error bars). Returns the files written (none without a finished trial)."""
    groups = [g for g in groups if any(t.seen for t in g.trials)]
    if not groups:
        return []
    import statistics

    fig = agg_figure(figsize=(10, 4.8))
    ax = fig.subplots()
    for g in groups:
        length = min(len(t.seen) for t in g.trials if t.seen)
        curves = [t.seen[:length] for t in g.trials if t.seen]
        mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
        xs = range(1, length + 1)
        (line,) = ax.plot(xs, mean, marker="o", label=f"{g.label} (n={len(curves)})")
        if len(curves) > 1:
            std = [statistics.stdev(c[i] for c in curves) for i in range(length)]
            ax.fill_between(xs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel=f"after {axis}", ylabel="test accuracy on seen classes", ylim=(0, 1.02),
           title=f"Accuracy on seen classes after each {axis} (mean ± std over seeds)")
    ax.set_xticks(range(1, max(len(t.seen) for g in groups for t in g.trials) + 1))
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    seen_path = out_dir / "seen_by_stage.png"
    fig.savefig(seen_path, dpi=100, bbox_inches="tight")

    fig = agg_figure(figsize=(10, 4.8))
    ax = fig.subplots()
    for g in groups:
        (acc, acc_std), (fgt, fgt_std) = g.stats("test/average_accuracy"), g.stats("test/forgetting")
        ax.errorbar([fgt], [acc], xerr=[0 if fgt_std != fgt_std else fgt_std],
                    yerr=[0 if acc_std != acc_std else acc_std], marker="o", capsize=3, linestyle="none",
                    label=f"{g.label} (n={g.n})")
    ax.set(xlabel="test forgetting (lower is better)", ylabel="final test average accuracy",
           title="Final accuracy against forgetting, one point per configuration")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    trade_path = out_dir / "accuracy_vs_forgetting.png"
    fig.savefig(trade_path, dpi=100, bbox_inches="tight")
    return [seen_path, trade_path]


def _legend_outside(ax) -> None:
    """The legend right of the axes, so that it never covers a curve."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)


def agg_figure(**kwargs):
    """A matplotlib Figure on the Agg canvas: no pyplot state, no global backend switch in the caller's process
    (the report's figures and the MLflow heatmaps and histograms alike)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _write_html(path: Path, name: str, markdown: str, figures: list[Path], plots: list) -> None:
    """One self-contained page: the leaderboard tables, the comparison figures and every trial's plot, the
    images inlined (base64), so that it can be mailed or opened anywhere."""
    import base64
    import html

    def image(p: Path, alt: str) -> str:
        data = base64.b64encode(p.read_bytes()).decode()
        return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'

    body = [f"<h1>clorch sweep {html.escape(name)}</h1>", _markdown_tables_to_html(markdown),
            "<h2>Comparison</h2>", *(image(f, f.stem) for f in figures), "<h2>Trials</h2>",
            *(f"<h3>{html.escape(t.label or t.trial)} <small>({html.escape(t.trial)}, {t.state})</small></h3>"
              + image(p, t.trial) for t, p in plots)]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%}small{color:#666}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>clorch report {html.escape(name)}"
                    f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _markdown_tables_to_html(markdown: str) -> str:
    """The report's markdown (headings, paragraphs, pipe tables) as HTML; nothing else is needed here."""
    import html
    import re

    out, table = [], []

    def cells(line: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]

    def flush() -> None:
        if table:
            head, rows = cells(table[0]), [cells(r) for r in table[2:]]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "".join(out)


def _plot(t: TrialSummary, keys: list[str], path: Path) -> Path | None:
    """Accuracy on seen classes per stage, and each stage's accuracy over the stages after it; None if no data."""
    if not t.seen and not t.matrix:
        return None
    import textwrap

    fig = agg_figure(figsize=(11, 3.8))
    left, right = fig.subplots(1, 2, sharey=True)
    left.plot(range(1, len(t.seen) + 1), t.seen, marker="o")
    axis = t.axis  # on a domain stream every stage is a domain, every class in each
    left.set(xlabel=f"after {axis}", ylabel="test accuracy", title="on seen classes", ylim=(0, 1.02))
    for j in range(len(t.matrix)):
        xs = list(range(j + 1, len(t.matrix) + 1))
        right.plot(xs, [t.matrix[i][j] for i in range(j, len(t.matrix))], marker="o", label=f"{axis} {j + 1}")
    right.set(xlabel=f"after {axis}", title=f"on each {axis}'s " + ("classes" if axis == "stage" else "test set"))
    if t.matrix:
        _legend_outside(right)
    for ax in (left, right):
        ax.set_xticks(range(1, max(len(t.seen), len(t.matrix)) + 1))
        ax.grid(alpha=0.3)
    title = f"{t.label or 'trial ' + t.trial} ({t.trial}, {t.state})"
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize="medium")
    fig.savefig(path, dpi=90, bbox_inches="tight")  # the tight box keeps the title and the legend whole
    return path


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value).replace("|", "\\|")
