"""Torch's thread count: one per CPU the run owns, said at the start of `clorch run`."""
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from workloads.threads import ENV, own_cpus, threads_for

QUICKSTART = str(Path(__file__).parent.parent / "search_spaces" / "quickstart.yaml")


def test_a_reservation_sets_the_count_and_a_fraction_of_a_cpu_still_gets_a_thread(monkeypatch):
    monkeypatch.setenv(ENV, "7")  # a trial follows Ray, whatever the environment says
    assert threads_for(3.0)[0] == 3 and threads_for(0.5)[0] == 1
    assert "Ray reservation: 0.5 CPU" in threads_for(0.5)[1]


def test_clorch_run_uses_its_cpus_unless_told_and_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(ENV, raising=False)
    assert threads_for() == (own_cpus(), f"CPUs this process may use: {own_cpus()}")
    monkeypatch.setenv(ENV, "1")
    assert main(["run", QUICKSTART, "-q", "--set", "train.epochs=1"]) == 0
    assert "torch threads: 1 (CLORCH_THREADS=1)" in capsys.readouterr().out.splitlines()[1]
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_refused_before_the_run_starts(monkeypatch, capsys, value):
    monkeypatch.setenv(ENV, value)
    assert main(["run", QUICKSTART, "-q"]) != 0
    err = capsys.readouterr()
    assert f"{ENV}: '{value}' is not a thread count" in err.err and "stage" not in err.out
