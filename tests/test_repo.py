"""The project's own files: the README's commands, CI and requirements agree."""

import os
import re

from packaging.requirements import Requirement

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_command = ci.strip().splitlines()[-1]
    assert test_command.startswith("python -m pytest")
    first_screen = readme[: readme.index("## ")]
    assert re.search(r"pip install -r requirements.txt && " + re.escape(test_command) + r"\n", first_screen)
    assert "pip install -r requirements.txt && python dqn_softmoe.py" in first_screen


def test_requirements_accept_the_cpu_torch_ci_installs():
    lines = [l.split("#")[0].strip() for l in open(os.path.join(ROOT, "requirements.txt"))]
    torch = next(Requirement(l) for l in lines if l.startswith("torch"))
    assert torch.specifier.contains("2.13.0")
