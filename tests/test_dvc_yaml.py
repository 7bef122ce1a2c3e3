"""dvc.yaml lists exactly what each stage runs and reads, derived from the code, so a change reruns its stages.

Each stage's command is ``python -m pipeline.<module>``. Its code is that module, ``pipeline/__init__.py``
and every ``pipeline`` module they import, directly or not (any ``import`` statement, including the
ones inside functions; ``if TYPE_CHECKING:`` imports do not run and do not count). Its params are the
stage's own section (whole) and every ``<section>.<key>`` its code reads: ``params.<section>.<key>``,
or ``<name>.<key>`` where ``<name>`` is a function argument annotated with that section's class.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import typing
from functools import cache
from pathlib import Path

import pytest
import yaml

from bench.project import run
from pipeline.model_table import MODELS
from pipeline.params import Params
from tests.conftest import REPO_ROOT

PACKAGE = "pipeline"
# Every stage validates the whole of params.yaml here, so this module reads every key; a key read
# only to be validated changes no output.
VALIDATION = Path("pipeline/params.py")
DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
SECTIONS = {field.name: typing.get_type_hints(Params)[field.name] for field in dataclasses.fields(Params)}
SECTION_OF_CLASS = {cls.__name__: name for name, cls in SECTIONS.items()}
FIELDS = {name: {field.name for field in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}


def stage_module(stage: str) -> str:
    match = re.search(r"python -m (pipeline\.\w+)", STAGES[stage]["cmd"])
    assert match, f"dvc.yaml stage {stage}: the command does not run a pipeline module"
    return match[1]


def module_file(module: str) -> Path:
    parts = module.split(".")
    path = REPO_ROOT.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    return skipped


def imported_modules(path: Path) -> set[str]:
    """The ``pipeline`` modules one file imports, anywhere in it."""
    tree = parse(path)
    skipped = _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            for alias in node.names:  # from pipeline import cli: cli is a module
                if module_file(f"{node.module}.{alias.name}").exists():
                    found.add(f"{node.module}.{alias.name}")
    return found


def import_closure(module: str) -> set[Path]:
    """Every file of the package that ``python -m <module>`` runs."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        pending.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        pending.extend(imported_modules(module_file(name)))
    return {module_file(name).relative_to(REPO_ROOT) for name in seen}


def params_read(files: set[Path]) -> set[str]:
    """``section.key`` for every params key these files read (see the module docstring)."""
    keys: set[str] = set()
    for path in files - {VALIDATION}:
        tree = parse(REPO_ROOT / path)
        annotated: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in [*node.args.args, *node.args.kwonlyargs]:
                    names = set(ast.unparse(arg.annotation).replace(" ", "").split("|")) if arg.annotation else set()
                    for name in names & set(SECTION_OF_CLASS):  # "AugmentParams | None" counts too
                        annotated[arg.arg] = SECTION_OF_CLASS[name]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            inner = node.value
            if isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) and inner.value.id == "params" \
                    and inner.attr in FIELDS and node.attr in FIELDS[inner.attr]:
                keys.add(f"{inner.attr}.{node.attr}")
            elif isinstance(inner, ast.Name) and inner.id in annotated and node.attr in FIELDS[annotated[inner.id]]:
                keys.add(f"{annotated[inner.id]}.{node.attr}")
    return keys


def listed_params(stage: str) -> set[str]:
    return {entry for entry in STAGES[stage].get("params", []) if isinstance(entry, str)}


def covered(key: str, listed: set[str]) -> bool:
    return key in listed or key.split(".")[0] in listed


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_module_a_stage_runs_is_a_dependency_and_nothing_else(stage: str) -> None:
    needed = {path.as_posix() for path in import_closure(stage_module(stage))}
    listed = {dep for dep in STAGES[stage]["deps"] if dep.startswith(f"{PACKAGE}/")}
    assert not needed - listed, f"dvc.yaml stage {stage}: add to deps {sorted(needed - listed)}"
    assert not listed - needed, f"dvc.yaml stage {stage}: its code never runs {sorted(listed - needed)}; remove it"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_params_key_a_stage_reads_is_listed(stage: str) -> None:
    files = import_closure(stage_module(stage))
    read = params_read(files) | ({stage} if stage in SECTIONS else set())
    listed = listed_params(stage)
    missing = sorted(key for key in read if not covered(key, listed))
    assert not missing, f"dvc.yaml stage {stage}: add to params {missing}"
    unread = sorted(key for key in listed if key not in read and not any(k.startswith(f"{key}.") for k in read))
    assert not unread, f"dvc.yaml stage {stage}: its code never reads params {unread}; remove them"


def test_the_analysis_sees_what_the_old_dvc_yaml_missed() -> None:
    """The derivation itself: evaluate decodes images and reads base.seed, as the old dvc.yaml forgot."""
    evaluate = import_closure("pipeline.evaluate")
    assert {Path("pipeline/images.py"), Path("pipeline/dataset.py"), Path("pipeline/__init__.py")} <= evaluate
    assert "base.seed" in params_read(evaluate)
    assert Path("pipeline/serving.py") in import_closure("pipeline.gate")  # imported inside a function
    assert Path("pipeline/training.py") not in evaluate


def test_the_gate_decides_again_on_every_repro() -> None:
    # Its champion is in the MLflow registry, which DVC cannot hash: unchanged deps prove nothing.
    assert STAGES["gate"].get("always_changed") is True


def test_the_model_table_matches_the_training_stages() -> None:
    for spec in MODELS:
        assert spec.stage in STAGES, f"dvc.yaml has no stage {spec.stage} for model {spec.name}"
        assert stage_module(spec.stage) == f"pipeline.{spec.stage}"
        assert f"models/{spec.folder}" in STAGES[spec.stage]["outs"]
        for consumer in ("evaluate", "gate"):
            assert f"models/{spec.folder}" in STAGES[consumer]["deps"], f"{consumer} must depend on {spec.folder}"
        assert spec.params_section in SECTIONS


@pytest.mark.slow
def test_a_change_to_the_decode_rules_makes_every_decoding_stage_stale(reproduced_project_copy: Path) -> None:
    project = reproduced_project_copy
    images = project / "pipeline" / "images.py"
    images.write_text(images.read_text() + "\n# a changed decode rule\n")
    stale = set(json.loads(run(project, "dvc", "status", "--json").stdout))
    decoding = {"ingest", "train_custom", "train_resnet50", "evaluate", "gate"}  # gate: serving decodes requests
    assert decoding <= stale, f"dvc status did not list {sorted(decoding - stale)} after pipeline/images.py changed"
    assert "split" not in stale
