"""Repository-level promises: README's commands, CI, the info command."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    return [b.strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) >= 2, "README must give the install and the test command"
    test_command = commands[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()
    assert ci[-1].strip() == test_command
    assert "pytest" in test_command


def test_info_command_runs_anywhere():
    out = subprocess.run([sys.executable, "-m", "dqgemm", "info"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dqgemm:" in out.stdout and "reference" in out.stdout
    assert "extension:" in out.stdout
