"""What a reproduced project's ``metrics/gate.json`` must say, worked out from its own inputs: each
model's scores are the accuracy of its answers in ``data/predictions/``, each verdict follows from
those scores and the thresholds in ``params.yaml``, and ``python -m pipeline.gate --check`` exits
as ``deploy`` says. The end-to-end and tracking-server tests share it, so a gate that says
``deploy`` whatever the scores cannot pass them."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.project import read_params, run

THRESHOLDS = ("min_train_score", "min_test_score", "max_regression")


def expected_verdict(candidate: dict, thresholds: dict) -> str:
    """The gate's rule at ``confidence: null``: train below ``min_train_score`` is underfit, else test
    below ``min_test_score`` is overfit, else deploy (a bound is met at equality)."""
    if candidate["train_score"] < thresholds["min_train_score"]:
        return "underfit"
    if candidate["test_score"] < thresholds["min_test_score"]:
        return "overfit"
    return "deploy"


def split_accuracy(project: Path, model: str, split: str) -> float:
    """The share of one split's images that ``model`` answered right, from its predictions file."""
    rows = pd.read_csv(project / f"data/predictions/{model}.csv", dtype=str, keep_default_na=False)
    answers = rows[rows["split"] == split]
    assert len(answers), f"no {split} rows in data/predictions/{model}.csv"
    return float((answers["actual"] == answers["predicted"]).mean())


def check_verdicts(project: Path, gate: dict) -> None:
    """The decision in ``gate`` follows from the project's params and its models' recorded answers."""
    params = read_params(project)["gate"]
    assert gate["metric"] == "accuracy" and gate["confidence"] is None, "the rule below is for plain accuracy"
    assert gate["thresholds"] == {key: params[key] for key in THRESHOLDS}
    for model, candidate in gate["candidates"].items():
        for split in ("train", "validation", "test"):
            answered = split_accuracy(project, model, split)
            assert candidate[f"{split}_score"] == pytest.approx(answered), \
                f"{model}: gate.json's {split}_score {candidate[f'{split}_score']} is not its answers' {answered}"
        assert candidate["verdict"] == expected_verdict(candidate, gate["thresholds"]), (model, candidate)
    passing = [model for model, candidate in gate["candidates"].items() if candidate["verdict"] == "deploy"]
    if not passing:
        assert gate["deploy"] is False and gate["model"] is None
    if gate["deploy"]:
        # Chosen on validation, judged on test: the passing model with the best validation score.
        assert gate["model"] in passing
        assert gate["candidates"][gate["model"]]["validation_score"] == max(
            gate["candidates"][m]["validation_score"] for m in passing)
    checked = run(project, sys.executable, "-m", "pipeline.gate", "--check", check=False)
    assert checked.returncode == (0 if gate["deploy"] else 1), (checked.stdout, checked.stderr)
