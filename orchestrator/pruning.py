"""Stopping unpromising trials after a stage, with Optuna's pruners, and what Optuna's search learns of them.

Ray Tune's OptunaSearch passes a sampler to Optuna but runs no Optuna pruner: in Tune, stopping a trial early is
a scheduler's job. `StagePruner` is that scheduler. It keeps an in-memory Optuna study of its own, one Optuna
trial per Tune trial: after every stage it reports the trial's selection metric with step = stage (from 0), and
stops the trial when the pruner says so; a finished trial is told complete with its last stage's value. It
works with every search (grid, random, optuna): it only decides when to stop.

Tune tells its searcher a stopped trial's last result as if it were the trial's final one, and in a
class-incremental stream an early stage's accuracy (fewer classes seen) is not comparable with a finished
trial's. `StageAwareOptunaSearch` tells Optuna such a trial was pruned instead.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from orchestrator.optuna_options import make_pruner, quiet_optuna

log = logging.getLogger(__name__)
RESULT_FILE = "result.json"  # Tune's log of every result of a trial, one JSON object a line, in the trial folder


def stopped_early(result: dict | None) -> bool:
    """Whether a trial's last result is from a stage before its stream's last one."""
    if not result or result.get("stage") is None or not result.get("num_stages"):
        return False
    return int(result["stage"]) + 1 < int(result["num_stages"])


class StagePruner(FIFOScheduler):
    """A Tune scheduler that runs an Optuna pruner over stages: each trial's selection metric after every stage
    goes to the pruner (step = stage), and a trial it prunes is stopped (`stopped` in every table)."""

    def __init__(self, pruner: dict, metric: str, mode: str):
        super().__init__()
        self.pruner = dict(pruner)  # parsed tune.optuna.pruner: {name, options...}
        self._metric, self.mode = metric, mode
        self._forget()

    def _forget(self) -> None:
        self._study = None
        self._asked: dict[str, object] = {}  # Tune trial id -> its Optuna trial, while it runs
        self._reported: dict[str, set[int]] = {}  # Tune trial id -> stages reported
        self._told: set[str] = set()  # Tune trial ids whose Optuna trial is over

    def __getstate__(self) -> dict:
        # Tune pickles its scheduler into tuner.pkl once, before the sweep starts, and never saves it again: a
        # restored sweep starts from nothing and rebuilds the study from its trials' result logs (on_trial_add)
        state = self.__dict__.copy()
        for key in ("_study", "_asked", "_reported", "_told"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._forget()

    @property
    def study(self):
        if self._study is None:
            import optuna

            with quiet_optuna():
                self._study = optuna.create_study(
                    study_name="clorch-pruner", direction="maximize" if self.mode == "max" else "minimize",
                    pruner=make_pruner(self.pruner),
                    sampler=optuna.samplers.RandomSampler(seed=0))  # never samples: Tune's search does
        return self._study

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # built with the sweep's selection metric, the one TuneConfig passes too

    def on_trial_add(self, tune_controller, trial) -> None:
        if trial.has_reported_at_least_once and trial.trial_id not in self._reported:  # restored: its past
            self._replay(trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        trial_id, stage, value = trial.trial_id, result.get("stage"), result.get(self._metric)
        if stage is None or not _finite(value) or trial_id in self._told:
            return TrialScheduler.CONTINUE
        stage = int(stage)
        if stage in self._reported.get(trial_id, set()):  # a stage replayed after a resume: reported once
            return TrialScheduler.CONTINUE
        optuna_trial = self._report(trial_id, stage, float(value))
        if not stopped_early(result):  # its last stage: nothing is left to save
            return TrialScheduler.CONTINUE
        with quiet_optuna():
            prune = optuna_trial.should_prune()
        if not prune:
            return TrialScheduler.CONTINUE
        self._tell(trial_id, pruned=True)
        log.info("trial %s pruned after stage %d of %s: %s %.4f (%s pruner)", trial_id, stage + 1,
                 result.get("num_stages"), self._metric, value, self.pruner["name"])
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id in self._asked and trial.trial_id not in self._told:
            value = (result or {}).get(self._metric)
            finished = bool(result) and not stopped_early(result) and _finite(value)
            self._tell(trial.trial_id, pruned=not finished, value=value if finished else None)

    def on_trial_error(self, tune_controller, trial) -> None:
        pass  # its Optuna trial stays open: a retry (max_failures) or a resume continues it

    def _report(self, trial_id: str, stage: int, value: float):
        if trial_id not in self._asked:
            with quiet_optuna():
                self._asked[trial_id] = self.study.ask()
        optuna_trial = self._asked[trial_id]
        optuna_trial.report(value, step=stage)
        self._reported.setdefault(trial_id, set()).add(stage)
        return optuna_trial

    def _tell(self, trial_id: str, pruned: bool, value: float | None = None) -> None:
        from optuna.trial import TrialState

        with quiet_optuna():
            if pruned:
                self.study.tell(self._asked[trial_id], state=TrialState.PRUNED)
            else:
                self.study.tell(self._asked[trial_id], float(value))
        self._told.add(trial_id)

    def _replay(self, trial) -> None:
        """Rebuild a restored trial's part of the study from its result log: a finished trial complete, one
        stopped early pruned, and one that will continue open with the stages it reported."""
        values = stage_values(trial, self._metric)
        if not values:
            return
        if trial.status != "TERMINATED":
            for stage, value in sorted(values.items()):
                self._report(trial.trial_id, stage, value)
            return
        import optuna
        from optuna.trial import TrialState

        last = max(values)
        finished = not stopped_early({**trial.last_result, "stage": last})
        with quiet_optuna():
            self.study.add_trial(optuna.trial.create_trial(
                state=TrialState.COMPLETE if finished else TrialState.PRUNED,
                value=values[last] if finished else None, intermediate_values=values))
        self._reported[trial.trial_id] = set(values)
        self._told.add(trial.trial_id)


def stage_values(trial, metric: str) -> dict[int, float]:
    """`metric` after each stage a Tune trial reported, from its result log (a stage reported twice, after a
    resume, keeps its latest value); the last result alone where the log cannot be read."""
    values: dict[int, float] = {}
    try:
        with trial.storage.storage_filesystem.open_input_stream(str(Path(trial.path) / RESULT_FILE)) as f:
            lines = f.readall().decode().splitlines()
    except (OSError, ValueError):
        lines = [json.dumps(trial.last_result or {}, default=str)]
    for line in lines:
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed driver
        if isinstance(result, dict) and result.get("stage") is not None and _finite(result.get(metric)):
            values[int(result["stage"])] = float(result[metric])
    return values


class StageAwareOptunaSearch(OptunaSearch):
    """Ray Tune's OptunaSearch that tells Optuna a trial stopped before its last stage was pruned (not complete
    with an early stage's value), and keeps the list of metrics clorch gives it for a multi-objective study."""

    def set_search_properties(self, metric, mode, config: dict, **spec) -> bool:
        # TuneConfig takes one metric: it must not replace the metric list given here
        return super().set_search_properties(None, None, config, **spec)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or not stopped_early(result) or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        from optuna.trial import TrialState

        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        except Exception as e:  # noqa: BLE001 (as OptunaSearch itself: a tell that fails is a warning)
            log.warning("Optuna could not record trial %s as pruned: %s", trial_id, e)
        self._completed_trials.add(trial_id)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
