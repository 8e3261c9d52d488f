"""Search that fits CL sweeps: Optuna's sampler and pruner from the experiment file, and selection over several
metrics with its Pareto set, on a real local Ray and a real MLflow store."""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest

from conftest import markdown_tables
from orchestrator import leaderboard as lb
from orchestrator.cli import main
from orchestrator.config import load_experiment
from orchestrator.leaderboard import TrialSummary
from orchestrator.sweep import parse_tune, plan
from test_sweep import runs_of, sweep_args

ACC, FORGET = "val/average_accuracy", "val/forgetting"


def _trial(name: str, config: str, acc: float, forgetting: float, seed: int = 0) -> TrialSummary:
    return TrialSummary(name, "done", 5, 5, {ACC: acc, FORGET: forgetting}, {"config": config, "seed": seed})


def test_the_pareto_set_keeps_configurations_no_other_matches_or_beats_everywhere_ties_included():
    """Means over seeds, each metric in its own direction (accuracy up, forgetting down)."""
    trials = [
        _trial("a0", "a", 0.80, 0.3), _trial("a1", "a", 1.00, 0.3, seed=1),  # mean (0.90, 0.3); a0 alone loses to g
        _trial("e", "e", 0.90, 0.3),  # ties a on both metrics: neither beats the other
        _trial("b", "b", 0.80, 0.1), _trial("c", "c", 0.80, 0.1),  # a tie again, both on the set
        _trial("d", "d", 0.70, 0.2),  # worse than b on both
        _trial("g", "g", 0.85, 0.3),  # as good as a on forgetting, worse on accuracy
        _trial("f", "f", 0.95, math.nan),  # no forgetting score: neither on the set nor beating anyone
    ]
    groups, _ = lb.rank(trials, [ACC, FORGET], ["max", "min"])
    assert [g.params["config"] for g in groups] == ["f", "a", "e", "g", "b", "c", "d"]  # by the first metric
    front = lb.pareto_set(groups, [ACC, FORGET], ["max", "min"])
    assert [g.params["config"] for g in front] == ["a", "e", "b", "c"]
    assert [g.params["config"] for g in groups if g.pareto] == ["a", "e", "b", "c"]
    assert {g.params["config"]: g.n for g in front}["a"] == 2
    # one metric: no Pareto set at all; both maximised: the highest accuracy with the most forgetting wins too
    assert all(g.pareto is None for g in lb.rank(trials, ACC, "max")[0])
    assert [g.params["config"] for g in lb.pareto_set(groups, [ACC, FORGET], ["max", "max"])] == ["a", "e"]


def test_several_metrics_take_each_its_own_direction_and_the_notes_say_what_selected(tmp_path):
    options = parse_tune({"metric": [ACC, "test/forgetting"]})
    assert options.metric == [ACC, "test/forgetting"] and options.mode == ["max", "min"]
    assert parse_tune({"metric": [ACC, FORGET], "mode": ["max", "max"]}).mode == ["max", "max"]
    assert parse_tune({"metric": [FORGET]}).metric == FORGET  # a list of one is one metric
    assert lb.selection_note([ACC, FORGET]).startswith(
        "selected on validation data (val/average_accuracy, val/forgetting: the Pareto set, ordered by "
        "val/average_accuracy)")
    assert lb.selection_note([ACC, "test/forgetting"]).startswith("selected on TEST data")
    assert lb.selection_tags([ACC, "test/forgetting"])["protocol.selection"] == \
        "validation and test (test asked for by name)"
    assert lb.score_metrics([ACC, FORGET]) == [ACC, "test/average_accuracy", FORGET, "test/forgetting"]


def test_the_optuna_block_takes_names_or_mappings_and_seeds_the_sampler_from_the_base_seed(tmp_path):
    from ray import tune

    from orchestrator.sweep import _search

    path = tmp_path / "e.yaml"
    path.write_text("base: {seed: 11}\nsweep:\n  train.lr: {loguniform: [0.001, 1.0]}\n")
    experiment = load_experiment(path)
    options = parse_tune({"search": "optuna", "num_samples": 4,
                          "optuna": {"sampler": {"name": "tpe", "n_startup_trials": 2}, "pruner": "median"}},
                         experiment)
    assert options.optuna.seed == 11 and options.optuna.sampler == {"name": "tpe", "n_startup_trials": 2}
    assert options.optuna.pruner == {"name": "median"}
    assert plan(experiment, options, 2, 0)[0] == ("4 trial(s) (optuna search: tpe sampler, seed 11, num_samples 4), "
                                                  "fifo scheduler, median pruner, selected on val/average_accuracy "
                                                  "(max)")
    assert parse_tune({"optuna": {"pruner": "none"}}).optuna.pruner is None

    def draws(optuna_block: dict) -> list[float]:
        searcher = _search(parse_tune({"search": "optuna", "optuna": optuna_block}, experiment))
        searcher.set_search_properties(ACC, "max", {"sweep": {"train.lr": tune.loguniform(0.001, 1.0)}})
        return [searcher.suggest(str(i))["sweep"]["train.lr"] for i in range(3)]

    # the same file draws the same trials: the default seed is the base config's, not the clock's
    assert draws({}) == draws({"seed": 11}) != draws({"seed": 12})
    assert draws({"sampler": "random"}) == draws({"sampler": "random"})


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "qmc", "nsga2"])
def test_every_sampler_pickles_with_its_search_and_draws_on_where_it_left_off(tmp_path, sampler):
    """Tune pickles the search, sampler included, into the Tuner's state and each searcher checkpoint (Optuna
    5.1's NSGA-II holds a threading.Lock, which pickle refuses unless clorch registers it)."""
    import pickle

    import ray.cloudpickle
    from ray import tune

    from orchestrator.optuna_options import SAMPLERS
    from orchestrator.sweep import _search

    several = SAMPLERS[sampler].objectives == "several"
    path = tmp_path / "e.yaml"
    path.write_text("base: {seed: 3}\nsweep:\n  train.lr: {loguniform: [0.001, 1.0]}\n")
    block = {"search": "optuna", "optuna": {"sampler": sampler},
             "metric": [ACC, FORGET] if several else ACC, "mode": ["max", "min"] if several else "max"}
    searcher = _search(parse_tune(block, load_experiment(path)))
    searcher.set_search_properties(None, None, {"sweep": {"train.lr": tune.loguniform(0.001, 1.0)}})
    for i in range(5):  # past the samplers' start-up trials, so the next draw reads the study
        lr = searcher.suggest(str(i))["sweep"]["train.lr"]
        searcher.on_trial_complete(str(i), {ACC: lr, FORGET: lr * lr})
    copies = [loads(dumps(searcher)) for dumps, loads in ((pickle.dumps, pickle.loads),
                                                          (ray.cloudpickle.dumps, ray.cloudpickle.loads))]
    # the copies hold the whole state: the study and the sampler's generator, so they draw what it draws
    draws = [s.suggest("next")["sweep"]["train.lr"] for s in [*copies, searcher]]
    assert draws[0] == draws[1] == draws[2], draws


PRUNED = """
base:
  data: {source: digits, classes_per_stage: 2}
  learner: {name: linear}
  train: {epochs: 2, batch_size: 32}
sweep:
  train.lr: {choice: [0.3, 0.00001]}
tune:
  search: optuna
  num_samples: 5
  optuna:
    sampler: tpe
    seed: 2
    pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}
"""


@pytest.mark.slow
def test_a_median_pruner_stops_a_hopeless_trial_after_a_stage_and_the_best_one_finishes(ray_local, tmp_path,
                                                                                         capsys, caplog):
    """lr 1e-5 barely moves a linear probe: the median pruner stops it once two trials have finished, from the
    second stage on (n_warmup_steps 1); the lr 0.3 trials all run their five stages."""
    from orchestrator.pruning import StageAwareOptunaSearch, StagePruner
    from orchestrator.sweep import read_analysis

    path = tmp_path / "pruned.yaml"
    path.write_text(PRUNED)
    uri, args = sweep_args(tmp_path)
    with caplog.at_level(logging.INFO, logger="orchestrator.pruning"):
        assert main(["sweep", str(path), "--name", "p", *args]) == 0
    out = capsys.readouterr().out
    trials_table = out[out.index("#  trial"):out.index("configurations,")]
    rows = [line.split() for line in trials_table.strip().splitlines()[1:]]
    state = {r[1]: (r[2], r[3], float(r[6])) for r in rows}  # trial -> (state, stages, lr)
    # tpe with seed 2 draws lr 0.3, 0.3, 0.3, 1e-5, 0.3: the 1e-5 trial starts once two trials have finished
    assert sorted(lr for _, _, lr in state.values()) == [1e-5, 0.3, 0.3, 0.3, 0.3]
    stopped = [t for t, (s, _, _) in state.items() if s == "STOPPED"]
    assert len(stopped) == 1 and state[stopped[0]][1:] == ("2/5", 1e-5)
    assert all(s == "DONE" and stages == "5/5" for s, stages, lr in state.values() if lr == 0.3)
    assert rows[0][0] == "1" and float(rows[0][6]) == 0.3  # the best trial finished
    (said,) = [r.getMessage() for r in caplog.records if "pruned after" in r.getMessage()]
    assert said.startswith(f"trial {stopped[0]} pruned after stage 2 of 5: val/average_accuracy 0.0")

    # MLflow: the stopped trial's run has its two stages, and the sweep ends FINISHED (nothing left to run)
    client, (parent,), children = runs_of(uri, "p")
    assert parent.info.status == "FINISHED" and len(children) == 5
    (run,) = [c for c in children if c.data.tags["clorch.trial_id"] == stopped[0]]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, ACC)) == [1, 2]

    # a restored sweep's pruner starts from the trials' result logs: finished trials complete, the stopped one
    # pruned with the stages it reported
    pruner = StagePruner({"name": "median"}, ACC, "max")
    for trial in read_analysis(tmp_path / "runs" / "p").trials:
        pruner.on_trial_add(None, trial)
    told = {t.state.name: [] for t in pruner.study.trials}
    for t in pruner.study.trials:
        told[t.state.name].append(sorted(t.intermediate_values))
    assert told == {"COMPLETE": [[0, 1, 2, 3, 4]] * 4, "PRUNED": [[0, 1]]}

    # and Optuna's sampler learnt the stopped trial as pruned, not as complete with its stage-2 accuracy (which
    # covers 4 classes, where a finished trial's covers 10)
    searcher = StageAwareOptunaSearch()
    searcher.restore(str(next((tmp_path / "runs" / "p").glob("searcher-state-*.pkl"))))
    assert sorted(t.state.name for t in searcher._ot_study.trials) == ["COMPLETE"] * 4 + ["PRUNED"]


PARETO = """
base:
  data: {source: digits, classes_per_stage: 2}
  learner: {name: linear}
  train: {epochs: 2, batch_size: 32}
sweep:
  train.lr: {choice: [0.3, 0.01, 0.00001]}
tune:
  search: optuna
  metric: [val/average_accuracy, val/forgetting]
  num_samples: 4
  optuna: {sampler: nsga2, seed: 1}
"""


def _config_table(out: str) -> tuple[list[str], list[list[str]]]:
    """The configurations table of `clorch sweep` / `status` output: header and rows of cells."""
    lines = out[out.index("configurations, mean"):].splitlines()[1:]
    header = lines[0].split()
    rows = []
    for line in lines[1:]:
        if not line[:1].isdigit():
            break
        rows.append([c for c in line.replace(" ± ", "±").split()])
    return header, rows


@pytest.mark.slow
def test_two_metrics_select_a_pareto_set_in_the_table_the_report_and_on_the_parent_run(ray_local, tmp_path,
                                                                                        capsys):
    """A linear probe trades accuracy for forgetting with its learning rate: lr 0.01 beats 0.3 on both (more
    accuracy, less forgetting), and 1e-5 forgets nothing. NSGA-II (seed 1) draws lr 0.01, 0.3, 1e-5, 1e-5."""
    path = tmp_path / "pareto.yaml"
    path.write_text(PARETO)
    uri, args = sweep_args(tmp_path)
    assert main(["sweep", str(path), "--name", "two", *args]) == 0
    out = capsys.readouterr().out
    assert "the Pareto set, ordered by val/average_accuracy" in out
    header, rows = _config_table(out)
    assert header[-1] == "pareto" and FORGET in header
    marked = {float(r[header.index("train.lr")]): r[-1] == "yes" for r in rows}
    assert marked == {0.01: True, 0.3: False, 1e-5: True}
    assert [r[header.index("n")] for r in rows if float(r[header.index("train.lr")]) == 1e-5] == ["2"]
    means = {float(r[header.index("train.lr")]): (float(r[header.index(ACC)].split("±")[0]),
                                                 float(r[header.index(FORGET)].split("±")[0])) for r in rows}
    for lr, on in marked.items():  # the marks follow the definition, on the printed means
        beaten = any(a >= means[lr][0] and f <= means[lr][1] and (a, f) != means[lr] for a, f in means.values())
        assert on is not beaten, (lr, means)
    assert "Pareto set over val/average_accuracy (max), val/forgetting (min): configuration(s) #" in out

    assert main(["status", "two", *args]) == 0  # the same table, from the sweep's saved state
    assert _config_table(capsys.readouterr().out) == (header, rows)

    assert main(["report", "two", "--storage", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    markdown = capsys.readouterr().out
    (head, configs), (fhead, front), _ = markdown_tables(markdown)
    assert "by the Pareto set of val/average_accuracy (max), val/forgetting (min)" in markdown
    assert sorted(float(r[fhead.index("train.lr")]) for r in front) == [1e-5, 0.01]
    assert [r[head.index("pareto")] for r in configs].count("yes") == 2
    with open(tmp_path / "report" / "leaderboard.csv") as f:
        assert sorted((float(r["train.lr"]), r["pareto"]) for r in csv.DictReader(f)) == \
            [(1e-5, "True"), (0.01, "True"), (0.3, "False")]

    client, (parent,), children = runs_of(uri, "two")
    assert len(children) == 4 and parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["protocol.selection_metric"] == "val/average_accuracy, val/forgetting"
    assert tags["protocol.selection"] == "validation"
    assert tags["pareto.metrics"] == "val/average_accuracy (max), val/forgetting (min)"
    assert sorted(tags["pareto.configs"].split("; ")) == ["train.lr=0.01", "train.lr=1e-05"]
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto.json")).read_text())
    lrs = [row[table["columns"].index("train.lr")] for row in table["data"]]
    assert sorted(map(float, lrs)) == [1e-5, 0.01]
    assert parent.data.metrics["best/val/forgetting_mean"] == pytest.approx(means[0.01][1], abs=1e-4)
