"""Stage gate: the deck's flowchart (underfit / overfit / deploy), the choice of model, the CI check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.artifacts import DEPLOY_INFO_FILE, MODEL_FILE, RunRecord
from pipeline.gate import (
    DEPLOY,
    OVERFIT,
    UNDERFIT,
    Decision,
    check,
    decide,
    deploy_model,
    judge,
    summary_lines,
)
from pipeline.params import GateParams
from tests.conftest import REPO_ROOT

GATE = GateParams(min_train_accuracy=0.9, min_test_accuracy=0.85, registered_model_name="image-classifier")


def scores(**models: tuple[float, float]) -> dict:
    """evaluate's metrics shape: {name: {"train": {"accuracy"}, "test": {"accuracy"}}}."""
    return {name: {"train": {"accuracy": train}, "test": {"accuracy": test}} for name, (train, test) in models.items()}


# --- judge ---------------------------------------------------------------------------------------

def test_judge_underfit_when_train_below_threshold() -> None:
    verdict = judge(0.5, 0.99, GATE)
    assert verdict.verdict == UNDERFIT == "underfit"
    assert (verdict.train_accuracy, verdict.test_accuracy) == (0.5, 0.99)
    assert len(verdict.reasons) == 1
    assert "train accuracy 0.5000 < min_train_accuracy 0.9" in verdict.reasons[0]


def test_judge_overfit_when_train_passes_and_test_fails() -> None:
    verdict = judge(0.99, 0.6, GATE)
    assert verdict.verdict == OVERFIT == "overfit"
    assert len(verdict.reasons) == 2
    assert "train accuracy 0.9900 >= min_train_accuracy 0.9" in verdict.reasons[0]
    assert "test accuracy 0.6000 < min_test_accuracy 0.85" in verdict.reasons[1]


def test_judge_deploy_when_both_pass() -> None:
    verdict = judge(0.95, 0.9, GATE)
    assert verdict.verdict == DEPLOY == "deploy"
    assert verdict.reasons == ["train accuracy 0.9500 >= min_train_accuracy 0.9",
                               "test accuracy 0.9000 >= min_test_accuracy 0.85"]


def test_judge_thresholds_are_inclusive() -> None:
    assert judge(0.9, 0.85, GATE).verdict == DEPLOY
    assert judge(0.8999, 0.85, GATE).verdict == UNDERFIT
    assert judge(0.9, 0.8499, GATE).verdict == OVERFIT


def test_judge_checks_train_first() -> None:
    # Both below: the flowchart stops at the first question.
    assert judge(0.1, 0.1, GATE).verdict == UNDERFIT


@pytest.mark.parametrize(("train", "test", "expected"), [
    (0.0, 0.0, DEPLOY), (0.2, 1.0, DEPLOY), (1.0, 0.0, DEPLOY),
])
def test_judge_with_zero_thresholds_always_deploys(train: float, test: float, expected: str) -> None:
    gate = GateParams(0.0, 0.0, "m")
    assert judge(train, test, gate).verdict == expected


# --- decide --------------------------------------------------------------------------------------

def test_decide_picks_the_best_test_accuracy_among_passing_models() -> None:
    decision = decide(scores(custom=(0.95, 0.88), resnet50=(0.99, 0.93)), GATE)
    assert decision.deploy is True
    assert decision.model == "resnet50"
    assert {name: v.verdict for name, v in decision.candidates.items()} == {"custom": DEPLOY, "resnet50": DEPLOY}


def test_decide_ignores_a_better_test_score_from_a_failing_model() -> None:
    # resnet50 has the best test accuracy but is underfit; custom passes.
    decision = decide(scores(custom=(0.95, 0.86), resnet50=(0.5, 0.97)), GATE)
    assert decision.model == "custom"
    assert decision.candidates["resnet50"].verdict == UNDERFIT


def test_decide_tie_goes_to_the_first_model() -> None:
    decision = decide(scores(custom=(0.95, 0.9), resnet50=(0.99, 0.9)), GATE)
    assert decision.model == "custom"


def test_decide_deploys_nothing_when_none_pass() -> None:
    decision = decide(scores(custom=(0.5, 0.5), resnet50=(0.99, 0.5)), GATE)
    assert decision.deploy is False
    assert decision.model is None
    assert decision.candidates["custom"].verdict == UNDERFIT
    assert decision.candidates["resnet50"].verdict == OVERFIT
    assert summary_lines(decision)[-1] == "deployed: nothing (no model passed both thresholds)"


def test_decide_with_one_model() -> None:
    decision = decide(scores(custom=(0.95, 0.9)), GATE)
    assert decision.model == "custom" and list(decision.candidates) == ["custom"]
    assert summary_lines(decision)[-1] == "deployed: custom -> deploy/"


def test_decision_to_json_shape() -> None:
    decision = decide(scores(custom=(0.95, 0.88), resnet50=(0.5, 0.4)), GATE)
    data = decision.to_json()
    assert set(data) == {"deploy", "model", "thresholds", "candidates"}
    assert data["deploy"] is True and data["model"] == "custom"
    assert data["thresholds"] == {"min_train_accuracy": 0.9, "min_test_accuracy": 0.85}
    assert set(data["candidates"]) == {"custom", "resnet50"}
    for candidate in data["candidates"].values():
        assert set(candidate) == {"train_accuracy", "test_accuracy", "verdict", "reasons"}
        assert isinstance(candidate["reasons"], list) and all(isinstance(r, str) for r in candidate["reasons"])
    assert data["candidates"]["resnet50"]["verdict"] == "underfit"
    assert data["candidates"]["custom"]["train_accuracy"] == 0.95
    assert data["candidates"]["custom"]["test_accuracy"] == 0.88
    # Round-trips through JSON unchanged.
    assert json.loads(json.dumps(data)) == data


def test_decision_to_json_when_nothing_deploys() -> None:
    data = decide(scores(custom=(0.1, 0.1)), GATE).to_json()
    assert data["deploy"] is False and data["model"] is None
    assert json.loads(json.dumps(data))["model"] is None


# --- check (the CI exit code) --------------------------------------------------------------------

def _write_decision(path: Path, decision: Decision) -> Path:
    path.write_text(json.dumps(decision.to_json()))
    return path


def test_check_returns_0_when_deploy_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gate_file = _write_decision(tmp_path / "gate.json", decide(scores(custom=(0.95, 0.9)), GATE))
    assert check(gate_file) == 0
    assert "deploy allowed: custom" in capsys.readouterr().out


def test_check_returns_1_when_deploy_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gate_file = _write_decision(tmp_path / "gate.json", decide(scores(custom=(0.5, 0.5), resnet50=(0.99, 0.1)), GATE))
    assert check(gate_file) == 1
    err = capsys.readouterr().err
    assert "deploy NOT allowed" in err and "custom underfit" in err and "resnet50 overfit" in err


def test_check_returns_2_when_gate_file_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "metrics" / "gate.json"
    assert check(missing) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize(("deploy", "code"), [(True, 0), (False, 1), (None, 2)])
def test_check_command_line_exit_codes(tmp_path: Path, deploy: bool | None, code: int) -> None:
    gate_file = tmp_path / "gate.json"
    if deploy is not None:
        model = (0.95, 0.9) if deploy else (0.1, 0.1)
        _write_decision(gate_file, decide(scores(custom=model), GATE))
    completed = subprocess.run([sys.executable, "-m", "pipeline.gate", "--check", "--out", str(gate_file)],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == code, completed.stderr
    assert "Traceback" not in completed.stderr


# --- deploy_model --------------------------------------------------------------------------------

def test_deploy_model_copies_the_model_and_writes_model_json(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "custom"
    model_dir.mkdir(parents=True)
    payload = bytes(range(256)) * 40
    (model_dir / MODEL_FILE).write_bytes(payload)
    record = RunRecord("abc123", "runs:/abc123/model", ["cat", "dog"], 32, 1)
    deploy_dir = tmp_path / "deploy"

    deploy_model(model_dir, deploy_dir, "custom", record)

    assert (deploy_dir / MODEL_FILE).read_bytes() == payload
    info = json.loads((deploy_dir / DEPLOY_INFO_FILE).read_text())
    assert info == {"model": "custom", "class_names": ["cat", "dog"], "image_size": 32, "channels": 1,
                    "mlflow_run_id": "abc123"}
    # No temporary file left behind; the source untouched.
    assert sorted(p.name for p in deploy_dir.iterdir()) == [DEPLOY_INFO_FILE, MODEL_FILE]
    assert (model_dir / MODEL_FILE).read_bytes() == payload


def test_deploy_model_replaces_an_earlier_deployment(tmp_path: Path) -> None:
    deploy_dir = tmp_path / "deploy"
    deploy_dir.mkdir()
    (deploy_dir / MODEL_FILE).write_bytes(b"old model")
    (deploy_dir / DEPLOY_INFO_FILE).write_text('{"model": "resnet50"}')
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    (model_dir / MODEL_FILE).write_bytes(b"new model")
    record = RunRecord("r2", "runs:/r2/model", ["a", "b", "c"], 48, 3)

    deploy_model(model_dir, deploy_dir, "custom", record)

    assert (deploy_dir / MODEL_FILE).read_bytes() == b"new model"
    assert json.loads((deploy_dir / DEPLOY_INFO_FILE).read_text())["model"] == "custom"


def test_deploy_model_without_a_model_file_fails(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        deploy_model(tmp_path / "empty", tmp_path / "deploy", "custom",
                     RunRecord("x", "runs:/x/model", [], 32, 1))
    assert not (tmp_path / "deploy" / MODEL_FILE).exists()
