"""The README's promises: its python blocks run as written, and CI runs its test command."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_exactly_two_setup_commands():
    quick = README.split("\n## ", 2)[1]                      # the first section
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", quick, flags=re.S)
    lines = [l for block in commands for l in block.strip().splitlines()]
    assert len(lines) == 2, lines
    assert all(l.startswith("pip install -r requirements.txt && ") for l in lines)
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert lines[1] in ci, "`.ci/run` must call the README's test command verbatim"


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
