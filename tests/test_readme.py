"""The README's commands are the ones CI and users run."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                  if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci_command) == 1
    assert ci_command[0] in (ROOT / "README.md").read_text().splitlines()


def test_every_cli_command_in_the_readme_exists():
    from g2sd_cache.cli.main import COMMANDS
    readme = (ROOT / "README.md").read_text()
    used = {line.split("g2sd-cache ", 1)[1].split()[0] for line in readme.splitlines()
            if "g2sd-cache " in line and line.lstrip().startswith(("g2sd-cache ", "torchrun", ".venv/bin/g2sd-cache"))}
    assert used and used <= set(COMMANDS), used - set(COMMANDS)
