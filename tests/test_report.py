"""The CI report: the gate's decision, the metrics diff, the confusion matrices and the pictures as one
markdown page, built from the files the pipeline wrote."""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import pytest

from bench.project import run
from pipeline.report import build_report, decision_section, metrics_diff_section, read_pictures

GATE = {"deploy": False, "model": None, "metric": "accuracy",
        "thresholds": {"min_train_score": 0.9, "min_test_score": 0.85, "max_regression": 0.0},
        "candidates": {"custom": {"train_score": 0.95, "test_score": 0.8, "verdict": "overfit",
                                  "test_interval": {"low": 0.71, "high": 0.87, "confidence": 0.95, "method": "wilson"},
                                  "reasons": ["train ok", "test accuracy 0.8000 < min_test_score 0.85"]}},
        "champion": {"outcome": "none", "version": None, "reasons": ["no image-classifier@champion yet"]}}
SCORES = {"custom": {"train": {"accuracy": 0.95}, "validation": {"accuracy": 0.81}, "test": {"accuracy": 0.8}}}
REPORT = {"class_names": ["cat", "dog"], "custom": {"test": {"confusion_matrix": [[3, 1], [0, 4]]}}}
DIFF = "| Path | Metric | main | workspace | Change |\n|---|---|---|---|---|\n| metrics/evaluate.json | x | 1 | 2 | 1 |\n"


def test_the_page_leads_with_the_decision_then_the_diff_the_matrices_and_the_pictures() -> None:
    page = build_report(GATE, SCORES, REPORT, "main", DIFF, None, {"metrics/plots/confusion_custom.png": b"\x89PNG"})
    assert page.index("## Gate") < page.index("## Metrics against `main`") < page.index("## Confusion") \
        < page.index("## Pictures")
    assert "**Nothing deployed**" in page and "| custom | 0.9500 | 0.8100 | 0.8000 [0.710, 0.870] | overfit |" in page
    assert "test accuracy 0.8000 &lt; min_test_score 0.85" in page and "Champion: no image-classifier@champion yet" in page
    assert "| metrics/evaluate.json | x | 1 | 2 | 1 |" in page
    assert "| **cat** | 3 | 1 |" in page and "| **dog** | 0 | 4 |" in page
    assert 'src="data:image/png;base64,' + base64.b64encode(b"\x89PNG").decode() + '"' in page


def test_class_names_from_folders_cannot_break_the_tables_or_inject_html() -> None:
    """Folder names are the user's: a pipe, a line break or a tag must stay text in its cell."""
    report = {"class_names": ["a|b", "c\nd", "<b>x</b>"],
              "custom": {"test": {"confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}}}
    page = build_report(GATE, SCORES, report, "main", DIFF, None, {})
    table = page[page.index("## Confusion"):]
    header = next(line for line in table.splitlines() if line.startswith("| |"))
    assert header == "| | a\\|b | c d | &lt;b&gt;x&lt;/b&gt; |"
    assert "| **&lt;b&gt;x&lt;/b&gt;** | 0 | 0 | 1 |" in table and "<b>x" not in page


def test_a_missing_base_or_an_empty_diff_is_said_in_words() -> None:
    assert "No metric differs from `main`." in metrics_diff_section("main", "| Path | Metric |\n|---|---|\n")
    assert "Not compared: no such revision" in metrics_diff_section("main", None, "no such revision")
    page = build_report({**GATE, "deploy": True, "model": "custom"}, {}, None, "main", "", None, {})
    assert "**Deployed: `custom`**" in page and "| custom | 0.9500 | - | 0.8000 [0.710, 0.870] |" in page
    stays = build_report({**GATE, "champion": {"outcome": "stays", "version": "3", "reasons": []}}, {}, None, "main",
                         "", None, {})
    assert "**Nothing deployed**: champion v3 stays" in stays
    same = build_report({**GATE, "champion": {"outcome": "same model", "version": "3", "reasons": []}}, {}, None,
                        "main", "", None, {})
    assert "**Nothing new deployed**: champion v3 is this same model" in same
    unknown = build_report({**GATE, "champion": {"outcome": "unknown", "version": "3",
                                                 "reasons": ["its files cannot be loaded"]}}, {}, None, "main", "",
                           None, {})
    assert "the champion check said unknown (its files cannot be loaded)" in unknown
    assert "## Pictures" not in page and "## Confusion" not in page


def test_a_compare_only_gate_says_nothing_was_deployed_and_what_would_have_been() -> None:
    passing = {**GATE["candidates"]["custom"], "verdict": "deploy", "test_score": 0.9}
    would = {**GATE, "deploy": True, "promoted": False, "model": "custom", "candidates": {"custom": passing}}
    assert "**Nothing deployed, compare only** (`gate.promote: false`): `custom` would be promoted" in \
        "\n".join(decision_section(would, SCORES))
    assert "**Deployed: `custom`**" in "\n".join(decision_section({**would, "promoted": True}, SCORES))


def test_pictures_are_read_in_report_order_and_missing_ones_left_out(tmp_path: Path) -> None:
    for name in ("confusion_custom", "train_custom_curves"):
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    assert [Path(key).stem for key in read_pictures(tmp_path)] == ["train_custom_curves", "confusion_custom"]


@pytest.mark.slow
def test_the_report_of_a_reproduced_project(reproduced_project_copy: Path, tmp_path: Path) -> None:
    project = reproduced_project_copy
    summary = tmp_path / "summary.md"
    summary.write_text("earlier steps' summary\n")
    run(project, sys.executable, "-m", "pipeline.report", "--base", "HEAD", "--out", str(summary))
    page = summary.read_text()
    assert page.startswith("earlier steps' summary\n# Pipeline report")   # appended, as GitHub expects
    assert "**Deployed: `" in page and "No metric differs from `HEAD`." in page
    assert page.count("| **0** |") == 2   # the digits' confusion matrices, one per model
    pictures = re.findall(r'alt="(metrics/plots/[\w.]+\.png)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pictures) == 10 and all(base64.b64decode(data).startswith(b"\x89PNG") for _, data in pictures)
    assert len(page.encode()) < 1024 * 1024   # GitHub's limit for one step's summary
