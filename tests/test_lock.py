"""uv.lock pins every package with hashes and is current against pyproject.toml's declared dependencies."""

from __future__ import annotations

import ast
import os
import re
import sys
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from bench.common import REPO_ROOT


def uv_executable() -> str:
    """The uv that ``make`` set up with (it exports ``UV``), else one on PATH or in .tools/."""
    for candidate in (os.environ.get("UV"), shutil.which("uv"), str(REPO_ROOT / ".tools/uv/bin/uv")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("no uv found (make installs one into .tools/ when PATH has none)")


def check_lock(project: Path) -> subprocess.CompletedProcess:
    """``uv lock --check`` offline: compares the lock with pyproject.toml without asking the registry."""
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    return subprocess.run([uv_executable(), "lock", "--check", "--offline", "--directory", str(project)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_lock_is_current_against_pyproject():
    result = check_lock(REPO_ROOT)
    assert result.returncode == 0, (
        f"uv.lock is stale against pyproject.toml: run `make lock` and commit uv.lock\n{result.stderr}")


def test_a_changed_dependency_makes_the_lock_stale(tmp_path: Path):
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy2(REPO_ROOT / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    assert '"pyyaml>=6.0",' in text
    pyproject.write_text(text.replace('"pyyaml>=6.0",', '"pyyaml>=6.0", "six>=1.16",'))
    assert check_lock(tmp_path).returncode != 0


def test_every_locked_package_is_pinned_with_hashes():
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    from_registry = [package for package in lock["package"] if "registry" in package["source"]]
    assert len(from_registry) > 100  # TensorFlow, MLflow and DVC bring well over a hundred
    for package in from_registry:
        files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
        assert package.get("version") and files, f"{package['name']} is not pinned to files"
        for file in files:
            assert file.get("hash", "").startswith("sha256:"), f"{package['name']}: {file.get('url')} has no hash"


def imported_top_level_modules(folder: Path) -> set[str]:
    """The top-level module of every ``import``/``from ... import`` in a folder's Python files."""
    modules = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@pytest.mark.parametrize("folder, groups", [("pipeline", ()), ("tests", ("test",)), ("bench", ("test", "bench"))])
def test_every_imported_package_is_declared(folder: str, groups: tuple[str, ...]):
    """A third-party import in pipeline/ is a declared dependency, not one that another package happens
    to pull in; tests/ and bench/ may also use their own groups."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    declared = {requirement_name(r) for r in pyproject["project"]["dependencies"]}
    declared |= {requirement_name(r) for group in groups for r in pyproject["dependency-groups"][group]}
    distributions = metadata.packages_distributions()
    undeclared = {}
    for module in imported_top_level_modules(REPO_ROOT / folder) - set(sys.stdlib_module_names):
        names = {name.lower().replace("_", "-") for name in distributions.get(module, [])}
        if names and not names & declared:
            undeclared[module] = sorted(names)
    assert not undeclared, f"{folder}/ imports packages pyproject.toml does not declare: {undeclared}"
