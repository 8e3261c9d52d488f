"""Every command the README and the experiment files quote runs, exit status 0 (issue 14).

`quoted_commands()` finds each `clorch ...` and `python bench/...` command in the README's code and in the
search_spaces/*.yaml files. A command with placeholders (FILE, NAME, `[--flag ...]`) is a synopsis: its
subcommand's --help must list every flag it names. Every concrete command must be in `HOW` below, which says
how the suite runs it: verbatim here, verbatim in the test named, or with the one change named and why (a
free port instead of 5000, toy sizes for a bench that takes minutes to an hour at its defaults). A command the
docs gain without an entry here fails the first test, so the list cannot fall behind the docs.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "search_spaces").glob("*.yaml"))]
SUBCOMMANDS = ("run", "sweep", "resume", "status", "report", "ui", "cache")
COMMAND = re.compile(r"(?:\.venv/bin/)?(clorch (?:%s)\b[^`\n]*|python bench/\w+\.py[^`\n]*)" % "|".join(SUBCOMMANDS))
PLACEHOLDER = re.compile(r"\b[A-Z]{2,}\b|\[|\.\.\.")


def quoted_commands() -> dict[str, str]:
    """Each command quoted in the docs (the `.venv/bin/` prefix dropped) -> the first file quoting it."""
    found: dict[str, str] = {}
    for path in DOCS:
        text = path.read_text()
        quotes = re.findall(r"`([^`\n]+)`", text)  # inline code
        if path.suffix == ".md":  # code blocks
            quotes += [line for block in text.split("```")[1::2] for line in block.splitlines()]
        else:  # a comment line that is a command: `#   clorch sweep ...`
            quotes += [line.lstrip("# ") for line in text.splitlines() if line.lstrip().startswith("#")]
        for quote in quotes:
            for match in COMMAND.finditer(quote):
                command = match.group(1).strip().rstrip(".,;:)")
                found.setdefault(command, path.name)
    return found


def synopses() -> list[str]:
    names = {f"clorch {s}" for s in SUBCOMMANDS if s != "ui"}  # a subcommand named in prose; `clorch ui` runs as is
    return [c for c in quoted_commands() if PLACEHOLDER.search(c) or c in names]


# How each concrete command runs in the suite. "here": a test of this file; "test_x.py::name": that test runs
# it (its source must hold the command's arguments); "offline": it needs what this machine cannot reach.
TOY = "toy sizes: at its defaults the bench takes minutes to an hour"
HOW = {
    "clorch run search_spaces/quickstart.yaml": ("here", []),
    "clorch sweep search_spaces/quickstart.yaml": ("test_sweep.py::test_quickstart_sweep_tracks_one_parent_and_a_"
                                                   "child_per_trial", []),
    "clorch report quickstart": ("test_sweep.py::test_quickstart_sweep_tracks_one_parent_and_a_child_per_trial", []),
    "clorch ui": ("here", ["--port", "a free port (5000 may be taken on the test machine)"]),
    "clorch sweep search_spaces/quickstart.yaml --storage /mnt/shared/clorch_runs --tracking-uri "
    "http://127.0.0.1:5000": ("here", ["--dry-run", "against the `clorch ui` server of the same test, storage in a "
                                       "temporary folder: the sweep itself is the quickstart's, run verbatim"]),
    "clorch sweep search_spaces/corrupted_cifar10.yaml --set data.root=~/data --set data.download=true":
        ("offline", ["downloads CIFAR-10; test_docs_commands.py checks its overrides, test_corrupted_cifar.py "
                     "runs the file on a CIFAR-10 archive the test writes"]),
    "python bench/artifact_size.py": ("here", ["--stages 1 --classes 10", TOY]),
    "python bench/bottleneck_step.py": ("here", ["--small --repeats 1 --warmup 0 --package-repeats 1", TOY]),
    "python bench/dytox_task_attention.py": ("here", ["--batch 2 --tokens 1 2 --repeats 1", TOY]),
    "python bench/dytox_step.py": ("here", ["--steps 1 --batch 4", TOY]),
    "python bench/encode_throughput.py": ("here", ["--batches 1 --batch-size 2", TOY]),
    "python bench/feature_cache.py": ("here", ["--n 1 --images 100", TOY]),
    "python bench/key_search.py": ("here", ["--small", TOY]),
    "python bench/paper_protocol.py": ("here", ["--small", TOY]),
    "python bench/sweep_overhead.py": ("here", ["--n 1", TOY]),
}


def concrete() -> list[str]:
    return [c for c in quoted_commands() if c not in synopses()]


def test_every_quoted_command_has_a_way_to_run_and_every_way_is_still_quoted():
    commands = concrete()
    assert "clorch sweep search_spaces/quickstart.yaml" in commands and synopses()  # not vacuous
    assert [c for c in commands if c not in HOW] == []
    assert [c for c in HOW if c not in commands] == []
    for command, (where, _) in HOW.items():
        if "::" in where:  # the named test exists and runs these arguments
            module, name = where.split("::")
            source = inspect.getsource(getattr(__import__(module[:-3]), name))
            argv = ", ".join(f'"{arg}"' for arg in shlex.split(command)[1:])
            assert f"main([{argv}])" in source, (where, command)


@pytest.mark.parametrize("command", synopses())
def test_each_synopsis_names_flags_its_subcommand_accepts(command, capsys):
    sub = command.split()[1]
    with pytest.raises(SystemExit) as exit_:
        main([sub, "--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    for flag in re.findall(r"--[a-z][a-z-]*", command):
        assert flag in usage, (command, flag)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder with the repository's search_spaces/ and bench/ where the docs say they are."""
    for part in ("search_spaces", "bench"):
        (tmp_path / part).symlink_to(ROOT / part)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.mark.slow
def test_clorch_run_of_the_quickstart(workdir):
    out = _run([sys.executable, "-m", "orchestrator.cli", "run", "search_spaces/quickstart.yaml"], workdir).stdout
    assert re.search(r"^test: average accuracy 0\.\d+", out, re.M), out[-2000:]


@pytest.mark.slow
def test_clorch_ui_serves_the_cluster_sweep_command_plans_against_it_and_sigterm_ends_both(workdir):
    from test_cli import _free_port

    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)], cwd=workdir,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "clorch ui did not come up"
                time.sleep(1)
        assert "<html" in page.lower()
        assert (workdir / "mlflow.db").is_file()  # the README's default store, in the working folder
        command = [c for c in HOW if "--tracking-uri http://127.0.0.1:5000" in c][0]
        argv = shlex.split(command.replace("/mnt/shared", str(workdir / "shared")).replace(":5000", f":{port}"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([*argv[1:], "--dry-run"]) == 0
        assert "trial" in out.getvalue()
        assert not (workdir / "shared").exists()  # a dry run writes nothing
        ui.send_signal(signal.SIGTERM)  # as a shell's kill: clorch takes its MLflow server down with it
        assert ui.wait(timeout=60) == 0
        with socket.socket() as probe:  # nothing listens there any more
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if ui.poll() is None:
            ui.kill()


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in HOW if c.startswith("python bench/")], ids=lambda c: c.split("/")[1])
def test_each_bench_runs_at_toy_sizes(command, workdir):
    flags = HOW[command][1][0].split()
    out = _run([sys.executable, *command.split()[1:], *flags], workdir).stdout
    assert re.search(r"\d(\.\d+)?x\b", out), out[-2000:]  # each bench prints its times and their ratios
