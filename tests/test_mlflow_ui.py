"""The MLflow UI as a researcher sees it, in headless Chromium (Debian's `chromium`, installed by the README's
test command): a 4-trial sweep logged through an `mlflow server`, its child runs listed under the parent by
their swept values, the parent's comparison figures among its artifacts. The screenshots are kept in
tests/artifacts/ (set CLORCH_TEST_ARTIFACTS for another folder)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from browser import Browser
from orchestrator.cli import main

SWEEP = """
base:
  name: ui
  cache_dir: {cache}
  data: {{source: digits, classes_per_stage: 5}}
  learner: {{name: dkvb, num_codebooks: 8, num_keys: 32, key_dim: 4}}
  train: {{epochs: 1}}
sweep:
  learner.num_keys: {{grid: [16, 32]}}
  seed: {{grid: [0, 1]}}
tracking:
  codebooks: false
  log_model: false
"""
EXPANDER = '[data-component-id$="runnamecellrenderer.tsx_46"]'  # the +/- beside a parent run's name
ARTIFACTS = Path(os.environ.get("CLORCH_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


@pytest.mark.slow
def test_the_mlflow_ui_lists_child_runs_by_swept_values_and_the_parents_figures(ray_local, mlflow_server, tmp_path):
    server = mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = tmp_path / "ui.yaml"
    path.write_text(SWEEP.format(cache=tmp_path / "cache"))
    assert main(["sweep", str(path), "--name", "ui", "--storage", str(tmp_path / "runs"),
                 "--tracking-uri", server.uri]) == 0
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("ui").experiment_id
    (parent,) = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    base = server.uri.rstrip("/")
    with Browser() as browser:
        browser.open(f"{base}/#/experiments/{experiment}/runs")
        browser.wait_for(f"document.body.innerText.includes('ui') && document.querySelector('{EXPANDER}')")
        browser.evaluate(f"document.querySelector('{EXPANDER}').click()")  # open the parent's child runs
        browser.wait_for("(document.body.innerText.match(/dkvb K=\\d+ seed=\\d/g) || []).length == 4")
        browser.screenshot(ARTIFACTS / "mlflow_ui_runs.png")
        text = browser.text()
        names = re.findall(r"dkvb K=\d+ seed=\d", text)
        assert sorted(names) == ["dkvb K=16 seed=0", "dkvb K=16 seed=1", "dkvb K=32 seed=0", "dkvb K=32 seed=1"]
        assert text.index("ui\n") < min(text.index(n) for n in names)  # the parent first, its children under it

        browser.open(f"{base}/#/experiments/{experiment}/runs/{parent.info.run_id}/artifacts/comparison/"
                     "seen_by_stage.png")
        browser.wait_for("document.body.innerText.includes('accuracy_vs_forgetting.png')")
        browser.screenshot(ARTIFACTS / "mlflow_ui_parent_artifacts.png")
        text = browser.text()
        assert "seen_by_stage.png" in text and "leaderboard.json" in text
