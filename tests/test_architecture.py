"""The import graph, checked by import-linter's contracts in pyproject.toml: llm_core never imports Dagster
or the pipelines, its folders import only the ones below them (data, registry, training, evaluation,
experiments), and no modules import each other in a cycle, function-level imports included."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from llm_core.config import PROJECT_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the packages of `root`, not the installed checkout
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_import_contracts_hold():
    done = lint_imports(PROJECT_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_a_cycle_through_a_function_level_import_breaks_them(tmp_path):
    for package in ("llm_core", "pipelines"):
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "llm_core" / "config.py").open("a") as config:  # config -> plan -> config
        config.write("\n\ndef planned(cfg):\n    from llm_core.experiments import plan\n\n"
                     "    return plan.count(plan.setup_from_config(cfg))\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1 and "Contracts: 1 kept, 2 broken." in done.stdout, done.stdout[-3000:]
    assert "llm_core.config is not allowed to import llm_core.experiments" in done.stdout
    assert "No cycles are allowed in llm_core." in done.stdout
