"""What makes a number reviewable: no stage's inputs before its stage, selection on validation, seeds aggregated."""
import numpy as np
import pytest
import torch

from conftest import markdown_tables
from workloads.config import parse_run_config
from workloads.runner import run_stream


def write_far_stages(path, per_class: int = 40):
    """A 2-D npz stream: classes 0 and 1 near the origin (stage 1), classes 2 and 3 near (100, 100) (stage 2)."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [1.0, 0.0], [100.0, 100.0], [101.0, 100.0]])

    def split(n: int):
        y = np.repeat(np.arange(4), n)
        return (centres[y] + 0.1 * rng.standard_normal((len(y), 2))).astype(np.float32), y

    x_train, y_train = split(per_class)
    x_test, y_test = split(per_class // 2)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def far_config(root: str, key_init_data: str = "first_stage"):
    return parse_run_config({
        "data": {"source": "npz", "root": root, "classes_per_stage": 2},
        "learner": {"name": "dkvb", "num_codebooks": 4, "num_keys": 8, "key_dim": 2, "key_init": "kmeans",
                    "key_init_data": key_init_data},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.3}})


@pytest.mark.parametrize("mode", ["first_stage", "stream"])
def test_default_keys_see_no_input_of_a_later_stage_and_stream_mode_does(tmp_path, mode):
    root = write_far_stages(tmp_path / "far.npz")
    states = []
    result = run_stream(far_config(root, mode), on_stage_end=lambda i, m, s: states.append(s))
    model = states[0]["learner"]["model"]
    keys, proj = model["bottleneck.keys"], model["bottleneck.proj"]  # (C, K, d_k), (D, C * d_k)
    with np.load(root) as f:
        x, y = torch.from_numpy(f["x_train"]), torch.from_numpy(f["y_train"])
    z = (x @ proj).view(len(x), 4, 2)  # every training input, projected into each codebook's key space
    first = z[y < 2]
    low, high = first.amin(0) - 1e-4, first.amax(0) + 1e-4  # (C, d_k): the box of stage 1's projected inputs
    inside = ((keys >= low.unsqueeze(1)) & (keys <= high.unsqueeze(1))).all(-1)  # (C, K)
    if mode == "first_stage":
        # k-means keys are means of inputs (or inputs themselves): all of them inside stage 1's box, so no input
        # of stage 2, a hundred units away, took part in key learning
        assert inside.all()
        assert result.protocol["future_inputs"] is False and result.protocol["setup_inputs"] == "first_stage"
    else:
        assert not inside.all()  # transductive: keys were placed on stage 2's inputs before stage 1
        assert result.protocol["future_inputs"] is True


def test_a_key_source_that_is_the_streams_own_data_set_counts_as_future_inputs():
    config = parse_run_config({"data": {"source": "digits"}, "learner": {
        "name": "dkvb", "num_codebooks": 4, "num_keys": 8, "key_dim": 2, "key_init": "random",
        "key_init_data": {"source": "digits", "num_samples": 100}}, "train": {"epochs": 1}})
    assert run_stream(config).protocol["future_inputs"] is True


def write_inverted_test(path):
    """Two 2-D classes whose test labels are the opposite of their training (and validation) labels: a model
    that learned the task is right on validation and wrong on test, so selecting on test picks the worst one."""
    rng = np.random.default_rng(0)

    def split(n: int):
        y = np.repeat(np.arange(2), n)
        return (np.where(y[:, None] == 0, -1.0, 1.0) * [1.0, 0.0] + 0.3 * rng.standard_normal((len(y), 2))
                ).astype(np.float32), y

    x_train, y_train = split(60)
    x_test, y_test = split(30)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=1 - y_test)
    return str(path)


INVERTED = """
base:
  data: {{source: npz, root: {root}, classes_per_stage: 2}}
  learner: {{name: linear}}
  train: {{epochs: 5, batch_size: 16}}
sweep:
  train.lr: {{grid: [1.0e-5, 0.5]}}
  seed: {{grid: [0, 1, 2]}}
"""


def sweep_inverted(tmp_path, template: str, name: str):
    """Run `template` (formatted with the inverted-test npz) as sweep `name` through the CLI: (storage, uri)."""
    from orchestrator.cli import main

    path = tmp_path / f"{name}.yaml"
    path.write_text(template.format(root=write_inverted_test(tmp_path / "inverted.npz")))
    storage, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(path), "--name", name, "--storage", str(storage), "--tracking-uri", uri]) == 0
    return storage, uri


@pytest.mark.slow
def test_tune_the_report_and_the_parent_run_pick_the_validation_winner_with_seeds_aggregated(ray_local, tmp_path,
                                                                                               capsys):
    import json
    import statistics

    from mlflow.tracking import MlflowClient

    from orchestrator.report import write_report
    from orchestrator.sweep import restore_tuner

    storage, uri = sweep_inverted(tmp_path, INVERTED, "inv")
    out = capsys.readouterr().out

    markdown = write_report("inv", storage, tmp_path / "report")
    (ghead, groups), (head, trials) = markdown_tables(markdown)
    by_lr = {lr: [r for r in trials if float(r[head.index("train.lr")]) == lr] for lr in (1e-5, 0.5)}
    mean = {lr: statistics.fmean(float(r[head.index("val/average_accuracy")]) for r in rows)
            for lr, rows in by_lr.items()}
    test_mean = {lr: statistics.fmean(float(r[head.index("test/average_accuracy")]) for r in rows)
                 for lr, rows in by_lr.items()}
    # the constructed case: lr 0.5 learns the task (best on validation), lr 1e-5 barely moves (best on test)
    assert len(by_lr[0.5]) == len(by_lr[1e-5]) == 3
    assert mean[0.5] > mean[1e-5] and test_mean[1e-5] > test_mean[0.5]

    # 2 configurations x 3 seeds: 2 rows of n = 3 with the mean and std of their three trials
    assert len(groups) == 2 and [g[ghead.index("n")] for g in groups] == ["3", "3"]
    best = groups[0]
    assert float(best[ghead.index("train.lr")]) == 0.5
    values = [float(r[head.index("val/average_accuracy")]) for r in by_lr[0.5]]
    assert best[ghead.index("val/average_accuracy")] == \
        f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"

    # Tune's best trial is the validation winner too
    best_result = restore_tuner("inv", storage).get_results().get_best_result()
    assert best_result.config["sweep"]["train.lr"] == 0.5

    # and so is the end-of-sweep table: its first configuration row is lr 0.5
    configs = out[out.index("configurations, mean ± std over seeds"):].splitlines()
    assert "selected on validation data" in configs[0] and configs[2].split()[:2] == ["1", "3"]
    assert configs[2].split()[-1] == "0.5"  # the lr column, after the two mean ± std cells

    # the parent run carries the aggregated leaderboard and the winner's means
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("inv")
    (parent,) = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["protocol.selection"] == "validation" and "train.lr=0.5" in parent.data.tags["best.config"]
    assert parent.data.metrics["best/val/average_accuracy_mean"] == pytest.approx(statistics.fmean(values))
    assert parent.data.metrics["best/n"] == 3
    table = json.loads(open(client.download_artifacts(parent.info.run_id, "leaderboard.json")).read())
    assert len(table["data"]) == 2


MIXED = """
base:
  data: {{source: npz, root: {root}, classes_per_stage: 2}}
  learner: {{name: linear}}
  train: {{epochs: 5, batch_size: 16, lr: 0.5}}
sweep:
  learner:
    grid:
      - {{name: linear}}
      - {{name: dkvb, num_codebooks: 4, num_keys: 8, key_dim: 2, key_init_data: stream}}
tune:
  metric: test/average_accuracy
"""


@pytest.mark.slow
def test_selection_on_test_and_future_inputs_are_said_in_the_table_the_report_and_mlflow(ray_local, tmp_path,
                                                                                       capsys):
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    storage, uri = sweep_inverted(tmp_path, MIXED, "mixed")
    out = capsys.readouterr().out
    assert "selected on TEST data (test/average_accuracy, asked for by name)" in out

    assert main(["report", "mixed", "--storage", str(storage), "--out", str(tmp_path / "report")]) == 0  # ranks on the sweep's own metric
    markdown = capsys.readouterr().out
    assert "selected on TEST data" in markdown and "**Future inputs**" in markdown
    _, (head, trials) = markdown_tables(markdown)
    flags = {r[head.index("learner")].split("(")[0]: r[head.index("future_inputs")] for r in trials}
    assert flags == {"linear": "no", "dkvb": "yes"}

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("mixed").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["protocol.selection"] == "test (asked for by name)"
    assert parent.data.tags["protocol.future_inputs"] == "true"
    tags = sorted(r.data.tags["protocol.future_inputs"] for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert tags == ["false", "true"]


def test_a_stage_accuracy_is_reported_from_the_stage_that_first_trains_it():
    from orchestrator.trial import scalar_metrics

    m = {"loss": 0.5, "protocol": {"validation": 0.1, "future_inputs": False},
         "val/stage_accuracies": [0.9, 0.0, 0.0], "test/stage_accuracies": [0.8, 0.0, 0.0]}
    out = scalar_metrics(0, m)
    # stages 1 and 2 are not trained after stage 0: their zeros would draw a jump from 0 in every chart
    assert {k for k in out if "accuracy_stage_" in k} == {"val/accuracy_stage_1", "test/accuracy_stage_1"}
    assert out["protocol.future_inputs"] == 0 and out["protocol.validation"] == 0.1


def test_selection_metrics_name_their_split_and_need_a_validation_set_when_on_val(tmp_path):
    from orchestrator.config import load_experiment
    from orchestrator.sweep import parse_tune
    from workloads.config import ConfigError

    path = tmp_path / "e.yaml"
    path.write_text("base: {data: {validation: 0}}\nsweep:\n  seed: {grid: [0, 1]}\n")
    experiment = load_experiment(path)
    with pytest.raises(ConfigError, match="val/average_accuracy needs a validation set, but data.validation is 0.*"
                                          "tune.metric: test/average_accuracy"):
        parse_tune({}, experiment)
    assert parse_tune({"metric": "test/average_accuracy"}, experiment).mode == "max"  # asked for by name
    assert parse_tune({"metric": "val/forgetting"}).mode == "min"  # the metric's own direction
    with pytest.raises(ConfigError, match="'average_accuracy' is not a metric clorch reports; name the split: "
                                          "val/average_accuracy"):
        parse_tune({"metric": "average_accuracy"})
    path.write_text("base: {}\nsweep:\n  data.validation: {grid: [0, 0.1]}\n")
    with pytest.raises(ConfigError, match="needs a validation set"):
        parse_tune({}, load_experiment(path))


def test_unfinished_trials_are_listed_but_never_ranked_among_finished_ones():
    from orchestrator.leaderboard import TrialSummary, rank, ranked_trials

    def trial(name, state, value, seed):
        return TrialSummary(name, state, 5 if state == "done" else 2, 5, {"val/average_accuracy": value},
                            {"train.lr": 0.1, "seed": seed})

    trials = [trial("a", "done", 0.7, 0), trial("b", "error", 0.99, 1), trial("c", "done", 0.8, 1)]
    assert [t.trial for t in ranked_trials(trials, "val/average_accuracy", "max")] == ["c", "a", "b"]
    (group,), unranked = rank(trials, "val/average_accuracy", "max")
    assert group.n == 2 and group.stats("val/average_accuracy") == pytest.approx((0.75, 0.0707107), abs=1e-6)
    assert [t.trial for t in unranked] == ["b"]
