"""Search that fits CL sweeps: Optuna's sampler and pruner from the experiment file, and selection over several
metrics with its Pareto set, on a real local Ray and a real MLflow store."""
from __future__ import annotations

import math

from orchestrator import leaderboard as lb
from orchestrator.leaderboard import TrialSummary

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
