"""The setup that is written down rather than run by clorch: the README's test command and CI, cluster.yaml's
head node (PostgreSQL, the MLflow server behind basic auth, the files holding its secrets)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The one-line commands of the README's Quickstart, in order."""
    text = (REPO / "README.md").read_text()
    quickstart = text[text.index("## Quickstart"):text.index("\n## ", text.index("## Quickstart") + 1)]
    return [block.split("```", 1)[0].strip() for block in quickstart.split("```bash\n")[1:]]


def test_ci_runs_exactly_the_readmes_test_command():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)  # two commands, one line each
    run = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert run[-1] == commands[1]
    # it installs what the tests need first: PostgreSQL only when missing, psycopg2 with the dev extra
    assert commands[1].startswith("(dpkg -s postgresql >/dev/null 2>&1 || (apt-get update && ")
    assert 'pip install -e ".[dev]"' in commands[1]
