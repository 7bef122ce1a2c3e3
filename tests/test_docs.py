"""The README and the pages under docs/: the site builds strictly, the generated pages are what their
commands write, and every link, file path, make target, module, params key and error message they
name exists."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
import unicodedata
from fnmatch import fnmatch
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.common import REPO_ROOT, is_development_results
from docs import bench_tables, crossval_table, generated, params_reference
from pipeline.params import Params

README = REPO_ROOT / "README.md"
PAGES = sorted((REPO_ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *PAGES]
README_MAX_LINES = 200

# What a user's run makes that is neither in git nor a DVC output: the MLflow store, the plots page,
# the site, the folder of your own photos and the file `dvc add` writes for it, DVC's own config.
MADE_AT_RUN_TIME = ("mlflow.db", "mlartifacts", "dvc_plots/index.html", ".dvc/tmp/plots-offline.html", "site",
                    "data/sources/photos", "data/sources/photos.dvc", ".dvc/config", ".dvc/config.local",
                    ".dvc/cache", ".venv", ".tools", "bench/results-quick.json", "bench/results-tiny.json")
# The first part of a path the pages may name: a top-level entry of the repository.
TOP_LEVEL = {"pipeline", "tests", "docs", "bench", "presets", "metrics", "data", "models", "deploy", ".github",
             ".dvc", "dvc_plots", "site", "mlartifacts", "dvc.yaml", "dvc.lock", "params.yaml", "pyproject.toml",
             "uv.lock", "Makefile", "mkdocs.yml", "README.md", "mlflow.db", ".ci", ".venv", ".tools"}
SECTIONS = {field.name for field in dataclasses.fields(Params)}
FILE_SUFFIXES = ("json", "csv", "py", "yaml", "yml", "lock", "md", "png", "txt", "keras", "toml", "html", "db")


def text_outside_code_blocks(text: str) -> str:
    """A markdown text without its fenced code blocks (whose lines are commands and output)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def inline_code(text: str) -> list[str]:
    """Every `inline code` span outside fenced code blocks."""
    return re.findall(r"`([^`\n]+)`", text_outside_code_blocks(text))


def code_and_commands(text: str) -> str:
    """The fenced code blocks and the inline code of a text: where commands are written."""
    blocks = re.findall(r"^```.*?^```", text, flags=re.MULTILINE | re.DOTALL)
    return "\n".join(blocks + inline_code(text))


@cache
def tracked_and_made_paths() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The repository's files (git's list plus untracked ones not ignored) and the paths a run makes:
    dvc.yaml's outputs, metrics and plots, and the run-time paths above."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    files = [path for path in listed if (REPO_ROOT / path).exists()]
    made = list(MADE_AT_RUN_TIME)
    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    for stage in dvc["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                made.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return tuple(files), tuple(made)


def path_is_known(pattern: str, files: tuple[str, ...], made: tuple[str, ...]) -> bool:
    """Whether ``pattern`` (a path, ``<...>`` and ``*`` as wildcards, a trailing / for a folder) names a
    file or folder of the repository, or one under a path a run makes."""
    parts = re.sub(r"<[^>]+>", "*", pattern).rstrip("/").split("/")
    for candidate in files:
        names = candidate.split("/")
        if len(parts) <= len(names) and all(fnmatch(name, part) for name, part in zip(names, parts)):
            return True
    for candidate in made:
        names = candidate.split("/")
        if all(fnmatch(name, part) for name, part in zip(names, parts)):
            return True
    return False


def named_paths(text: str) -> set[str]:
    """Inline code that is a relative path starting at the repository's top level."""
    found = set()
    for span in inline_code(text):
        span = span.strip()
        if " " in span or span.startswith(("/", "~", ".."), ) or "://" in span:
            continue
        first = span.split("/")[0]
        if first in TOP_LEVEL and ("/" in span or first == span):
            found.add(span)
    return found


def slugify(heading: str) -> str:
    """A heading's anchor as Python-Markdown's toc extension makes it (MkDocs' default)."""
    text = unicodedata.normalize("NFKD", re.sub(r"`", "", heading)).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def heading_anchors(path: Path) -> set[str]:
    """The anchors of a markdown file: its headings (as MkDocs slugs them), ``{#id}`` and ``<a id>``."""
    text = path.read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([^"]+)"', text)) | set(re.findall(r"\{#([\w.-]+)\}", text))
    for line in text_outside_code_blocks(text).splitlines():
        heading = re.match(r"^#+\s+(.*?)\s*(\{#[\w.-]+\})?$", line)
        if heading:
            anchors.add(slugify(heading.group(1)))
    return anchors


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (REPO_ROOT / "Makefile").read_text(), flags=re.MULTILINE))


@cache
def code_strings() -> set[str]:
    """Every string literal (and f-string's literal part) in pipeline/: the MLflow tag and metric names
    the pages may name beside params keys (``gate.deploy`` is a tag, ``gate.metric`` a key)."""
    strings = set()
    for path in (REPO_ROOT / "pipeline").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return strings


def params_keys(renamed: bool = False) -> set[str]:
    """Every ``section.key`` of params.yaml; with ``renamed``, also the old names the params check
    answers with the new one."""
    hints = typing.get_type_hints(Params)
    keys = {f"{section}.{field.name}" for section in SECTIONS for field in dataclasses.fields(hints[section])}
    if renamed:
        keys |= {f"{section}.{old}" for section in SECTIONS for old in getattr(hints[section], "RENAMED", {})}
    return keys


# --- the site -----------------------------------------------------------------------------------

def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: every page in the nav, every link and anchor between pages resolves."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "params.html").is_file()
    assert not list((tmp_path / "site").rglob("*.py")), "the generators are not pages"


def test_the_recipe_tables_are_what_their_command_writes() -> None:
    page = crossval_table.PAGE.read_text(encoding="utf-8")
    for results in (REPO_ROOT / "bench").glob("crossval-*.json"):     # every cross-validation has its table
        if results == crossval_table.CURVE:
            assert crossval_table.CURVE_BEGIN in page
            continue
        folder = results.stem.removeprefix("crossval-")
        assert folder in crossval_table.FOLDERS and crossval_table.begin(folder) in page, results.name
        repeat_of = crossval_table.FOLDERS[folder].repeat_of    # a second deal of the folds: pooled with the first
        assert repeat_of is None or crossval_table.repetitions_begin(repeat_of) in page, results.name
    assert crossval_table.rewrite(page) == page, "docs/choosing-a-recipe.md is stale: run python -m docs.crossval_table"


def test_the_learning_curve_gain_per_doubling_is_the_slope_over_the_shares_means() -> None:
    """Four shares whose mean flip-averaged score rises by 5 points per doubling of the training
    photos, give or take a point: the slope and its interval come from the four means, so more
    folds around the same means do not narrow it (folds of one share are not independent)."""
    def recipe(photos: int, off: float, folds: int) -> dict:
        base = 0.60 + 0.05 * np.log2(photos / 100) + off
        spread = [-0.02, 0.02] * (folds // 2)
        return {"folds": [{"test_score": 0.0, "test_score_flip": base + noise, "sizes": {"train": photos}}
                          for noise in spread]}

    shares = [(100, 0.01), (200, -0.01), (400, 0.0), (800, 0.005)]
    rate = crossval_table.doubling_rate([(str(n), recipe(n, off, 4)) for n, off in shares])
    assert rate["slope"] == pytest.approx(0.0495) and rate["shares"] == 4
    assert rate["low"] < 0.05 < rate["high"]
    more_folds = crossval_table.doubling_rate([(str(n), recipe(n, off, 40)) for n, off in shares])
    assert (more_folds["low"], more_folds["high"]) == pytest.approx((rate["low"], rate["high"]))


def test_networks_vote_image_by_image_and_the_majority_answers() -> None:
    """Three networks: on the first fold each is wrong on a different photo, and voting outvotes every
    mistake; on the second, one network alone is right on a photo, and the majority's mistake stands."""
    def recipe(first: list[int], second: list[int]) -> dict:
        return {"folds": [{"test_right_flip": first}, {"test_right_flip": second}]}

    recipes = {"a": recipe([0, 1, 1, 1], [1, 0, 0]), "b": recipe([1, 0, 1, 1], [1, 0, 0]),
               "c": recipe([1, 1, 0, 1], [1, 1, 0])}
    (together,) = crossval_table.votes(recipes, 3)
    assert together == {"mean": pytest.approx((1.0 + 1 / 3) / 2), "worst": pytest.approx(1 / 3)}
    alone = crossval_table.votes(recipes, 1)
    assert [group["mean"] for group in alone] == pytest.approx([(0.75 + 1 / 3) / 2] * 2 + [(0.75 + 2 / 3) / 2])


def test_a_stopped_cross_validation_is_listed_fold_by_fold_beside_its_reference_not_in_the_table() -> None:
    def fold(number: int, test: float, flip: float, train: float) -> dict:
        return {"fold": number, "test_score": test, "test_score_flip": flip, "train_score": train, "fit_s": 500.0}

    machine = {"cpu": "AMD EPYC", "cpu_cores": 2}
    recipes = {
        "preset": {"folds": [fold(k, 0.78 + k / 100, 0.79 + k / 100, 0.95) for k in range(1, 6)], "folds_planned": 5,
                   "machine": machine, "started": "earlier", "source": "photos", "overrides": {}},
        "+ trial": {"folds": [fold(1, 0.701, 0.702, 0.903), fold(2, 0.711, 0.712, 0.913)], "folds_planned": 5,
                    "against": "preset", "machine": machine, "started": "later", "source": "photos",
                    "overrides": {"train_custom.epochs": 90}},
    }
    (line,) = [line for line in crossval_table.stopped_lines(recipes, "cv.json") if line.startswith("- ")]
    assert line.startswith("- **+ trial**, stopped after 2 of 5 folds, started later on AMD EPYC, 2 cores:")
    assert "--set train_custom.epochs=90 --folds 5 --name '+ trial' --out cv.json --against preset" in line
    assert ("fold 1: 0.701 (0.702 with flip averaging), train 0.903, 500 s, where *preset* reached 0.790 (0.800); "
            "fold 2: 0.711 (0.712 with flip averaging), train 0.913, 500 s, where *preset* reached 0.800 (0.810)"
            ) in line
    assert "fold 3" not in line
    assert crossval_table.stopped_lines({"preset": recipes["preset"]}, "cv.json") == []


def test_a_results_file_with_only_a_stopped_run_lists_it_and_an_empty_one_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crossval_table, "ROOT", tmp_path)
    monkeypatch.setitem(crossval_table.FOLDERS, "trial", crossval_table.Folder("photos", ("photos",), "r", None))
    (tmp_path / "bench").mkdir()
    fold = {"fold": 1, "test_score": 0.7, "test_score_flip": 0.71, "train_score": 0.9, "fit_s": 100.0}
    stopped = {"folds": [fold], "folds_planned": 5, "machine": {"cpu": "AMD EPYC", "cpu_cores": 2},
               "started": "now", "source": "photos", "overrides": {}}
    (tmp_path / "bench" / "crossval-trial.json").write_text(json.dumps({"recipes": {"r": stopped}}))
    block = crossval_table.render("trial")
    assert "- **r**, stopped after 1 of 5 folds" in block and "\n| r |" not in block
    (tmp_path / "bench" / "crossval-trial.json").write_text(json.dumps({"recipes": {}}))
    with pytest.raises(ValueError, match="bench/crossval-trial.json holds no recipe"):
        crossval_table.render("trial")


def test_a_block_that_lost_its_end_marker_is_refused_not_swallowing_the_next() -> None:
    end = "<!-- end: generated -->"
    page = ("intro\n<!-- begin: generated A -->\nold A\n\nprose about B\n<!-- begin: generated B -->\nold B\n"
            f"{end}\noutro\n")
    with pytest.raises(ValueError, match="lost its end marker"):
        generated.replaced(page, "new A", "<!-- begin: generated A -->", end)
    whole = page.replace("old A\n", f"old A\n{end}\n")
    assert generated.replaced(whole, "new A", "<!-- begin: generated A -->", end) == whole.replace(
        f"<!-- begin: generated A -->\nold A\n{end}", "new A")


def test_the_params_reference_is_what_its_command_writes() -> None:
    assert (REPO_ROOT / "docs" / "params.md").read_text(encoding="utf-8") == params_reference.render(), (
        "docs/params.md is stale: run python -m docs.params_reference")


def test_the_params_reference_lists_every_key_with_its_comment() -> None:
    page = (REPO_ROOT / "docs" / "params.md").read_text(encoding="utf-8")
    comments = params_reference.yaml_comments((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key in params_keys():
        assert f'<a id="{key}"></a>`{key}`' in page, key
        assert comments.get(key), f"{key} has no comment in params.yaml"


def test_the_performance_tables_are_what_their_command_writes() -> None:
    page = (REPO_ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert generated.replaced(page, bench_tables.render(), bench_tables.BEGIN, bench_tables.END) == page, (
        "docs/performance.md is stale: run python -m docs.bench_tables")


def test_every_results_file_says_its_machine_date_and_command() -> None:
    block = bench_tables.render()
    files = [path.name for path in (REPO_ROOT / "bench").glob("results*.json")
             if not is_development_results(path.name)]
    assert files
    for name in files:
        section = block.split(f"### `bench/{name}`")[1].split("\n### ")[0]
        assert "**command:** `python -m bench" in section and "**started:** 20" in section
        assert "**machine:** " in section and " cores; " in section, name


def test_a_reconstructed_command_names_sizes_rows_photos_and_file() -> None:
    results = {"mode": "quick", "rows": {"recipe": {"title": "t", "notes": ["photos: ../shared/data/x/train (9)"]}}}
    assert bench_tables.command_of(results, "results-x.json") == (
        "python -m bench --quick --rows recipe --photos ../shared/data/x/train --out bench/results-x.json")
    assert bench_tables.command_of({**results, "command": "python -m bench --rows recipe"}, "x") == (
        "python -m bench --rows recipe")


# --- the README ---------------------------------------------------------------------------------

def test_the_readme_is_read_in_five_minutes() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_no_dated_lab_notes_or_issue_numbers(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    # The generated tables date each run, as they should.
    text = re.sub(r"<!-- begin: generated.*?<!-- end: generated -->", "", text, flags=re.S)
    assert not re.search(r"\bissues? #?\d+", text, flags=re.IGNORECASE), "a reader cannot see our issues"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a date in prose: put measurements in bench/results*.json"


# --- what the pages name ------------------------------------------------------------------------

@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_link_resolves(document: Path) -> None:
    """Relative links point at files that exist, and an anchor at a heading or id of that file (MkDocs
    checks the pages; this also covers the README, which GitHub renders)."""
    text = text_outside_code_blocks(document.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        assert linked.exists(), f"{document.name}: {target} does not exist"
        if anchor:
            assert anchor in heading_anchors(linked), f"{document.name}: {target}: no such anchor"


def test_the_layout_names_every_module_of_pipeline_and_docs() -> None:
    """docs/pipeline.md's layout, which the README points to for the shared modules, leaves none out."""
    page = (REPO_ROOT / "docs" / "pipeline.md").read_text(encoding="utf-8")
    layout = re.search(r"^```\ndvc\.yaml .*?^```", page, flags=re.MULTILINE | re.DOTALL).group(0)
    modules = [path for folder in ("pipeline", "docs") for path in sorted((REPO_ROOT / folder).glob("*.py"))
               if path.name != "__init__.py"]
    missing = [path.relative_to(REPO_ROOT).as_posix() for path in modules
               if not re.search(rf"(?<![\w.]){re.escape(path.name)}\b", layout)]
    assert not missing, f"docs/pipeline.md's layout leaves out: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_file_path_named_exists(document: Path) -> None:
    files, made = tracked_and_made_paths()
    missing = [path for path in named_paths(document.read_text(encoding="utf-8"))
               if not path_is_known(path, files, made)]
    assert not missing, f"{document.name} names paths that neither exist nor are made by a run: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_make_target_named_exists(document: Path) -> None:
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", code_and_commands(document.read_text(encoding="utf-8"))))
    assert named <= makefile_targets(), f"{document.name}: no such make target: {sorted(named - makefile_targets())}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_module_run_with_python_m_exists(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    for module, placeholder in re.findall(r"python -m ((?:pipeline|docs|bench)(?:\.\w+)*)(\.<)?", text):
        if placeholder:           # python -m pipeline.<stage>
            continue
        path = REPO_ROOT / module.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), f"{document.name}: {module}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_params_key_named_exists(document: Path) -> None:
    """``section.key`` in inline code is a key of params.yaml, or a tag or metric name the code writes."""
    keys, strings = params_keys(renamed=True), code_strings()
    unknown = []
    for span in inline_code(document.read_text(encoding="utf-8")):
        match = re.match(rf"^({'|'.join(SECTIONS)})\.(\w+)", span)
        if not match or match.group(2) in FILE_SUFFIXES or span.startswith(f"{match.group(0)}."):
            continue
        name = match.group(0)
        if name not in keys and not any(s == name or s.startswith(name + ".") for s in strings):
            unknown.append(name)
    assert not unknown, f"{document.name} names keys params.yaml does not have: {unknown}"


def raised_messages() -> list[tuple[str, str]]:
    """(where, the longest literal part) of every message a stage can raise for the user: PipelineError
    and its kinds in pipeline/, and the HTTP 400 messages of serving."""
    found = []
    kinds = {"PipelineError", "ParamsError", "PresetError"}
    for path in sorted((REPO_ROOT / "pipeline").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                continue
            name = getattr(node.exc.func, "id", None) or getattr(node.exc.func, "attr", None)
            if name not in kinds and not (name == "ValueError" and path.name == "serving.py"):
                continue
            message = node.exc.args[0]
            if isinstance(message, ast.BoolOp):                  # `specific or general`: the general one
                message = message.values[-1]
            parts = ([message.value] if isinstance(message, ast.Constant) else
                     [v.value for v in message.values if isinstance(v, ast.Constant)]
                     if isinstance(message, ast.JoinedStr) else [])
            parts = [" ".join(part.split()).strip(" :;,.()'") for part in parts]
            parts = [part for part in parts if len(part) >= 12]
            if parts:
                found.append((f"{path.name}:{node.lineno}", max(parts, key=len)))
    return found


def test_every_error_message_is_in_troubleshooting() -> None:
    page = " ".join((REPO_ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8").split())
    messages = raised_messages()
    assert len(messages) > 40
    missing = [f"{where}: {text}" for where, text in messages if text not in page]
    assert not missing, "docs/troubleshooting.md lacks these messages:\n" + "\n".join(missing)
