"""What the shipped experiment files tell a reader to type: every `--set key=value` run quoted in a file's
description or comments is accepted by that file (validated as `clorch run` / `sweep` would, before any work)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_experiment

FILES = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml"))
SETS = re.compile(r"(?:--set \S+=[^\s)]+(?: --set \S+=[^\s)]+)*)")


def quoted_overrides(path: Path) -> list[list[str]]:
    """Each run of consecutive `--set k=v` in the file's text, as override lists; placeholders (`...`) left out."""
    runs = []
    for match in SETS.finditer(path.read_text()):
        sets = re.findall(r"--set (\S+=[^\s)]+)", match.group(0))
        if not any(s.endswith("=...") for s in sets):
            runs.append(sets)
    return runs


def test_the_files_quote_some_overrides():
    assert any(quoted_overrides(f) for f in FILES)  # the check below is not vacuous


@pytest.mark.parametrize("path", [f for f in FILES if quoted_overrides(f)], ids=lambda p: p.name)
def test_every_quoted_override_is_accepted_by_its_file(path):
    for overrides in quoted_overrides(path):
        experiment = load_experiment(path, overrides)  # raises ConfigError on a key, value or mix it refuses
        for text in overrides:  # and each took effect
            key, _, value = text.partition("=")
            node = experiment.base
            for part in key.split("."):
                node = getattr(node, part)
            assert node == yaml.safe_load(value), (path.name, key, node)
