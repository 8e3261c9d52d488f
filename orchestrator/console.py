"""What a sweep prints while it runs, in clorch's words: one line per finished stage of each trial, one per trial
that fails. Tune's own progress output is off (`verbose=0`); `clorch status NAME` prints the same lines for a
sweep running in another shell. The one module outside the CLI that prints: it stands in for Tune's console
reporter, which prints to the driver's stdout too, and its lines must not depend on how logging is set up."""
from __future__ import annotations

import math

from ray import tune

from orchestrator.sweep import trial_label


def stage_line(trial_id: str, config: dict | None, result: dict, metric: str) -> str:
    """`[clorch] 0254c_00000 dkvb K=128 seed=0: stage 3/5, val/average_accuracy 0.8481, test 0.8554, 2.1s`."""
    axis = result.get("protocol.axis") or "stage"
    total = result.get("num_stages")
    where = f"{axis} {int(result['stage']) + 1}" + (f"/{total}" if total else "")
    words = [where]
    value = result.get(metric)
    if isinstance(value, (int, float)) and not math.isnan(value):
        words.append(f"{metric} {value:.4f}")
    test = result.get("test/" + metric.partition("/")[2]) if metric.startswith("val/") else None
    if isinstance(test, (int, float)) and not math.isnan(test):
        words.append(f"test {test:.4f}")
    if isinstance(result.get("seconds"), (int, float)):
        words.append(f"{result['seconds']:.1f}s")
    return f"[clorch] {trial_id} {trial_label(config or {})}: " + ", ".join(words)


class StageLines(tune.Callback):
    """Prints `stage_line` as each trial reports a stage, and a line for each trial that fails."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        print(stage_line(trial.trial_id, trial.config, result, self.metric), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        done = (trial.last_result or {}).get("stage")
        after = f"after stage {int(done) + 1}" if done is not None else "before its first stage"
        where = getattr(trial, "error_file", None) or "its error.txt"
        print(f"[clorch] {trial.trial_id} {trial_label(trial.config)}: FAILED {after} (see {where})", flush=True)
