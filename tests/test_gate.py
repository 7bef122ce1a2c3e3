"""Stage gate's I/O edges: the CI check and deploy/. The decision is in tests/test_decision.py, the
registry in tests/test_gate_registry.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.artifacts import (
    DEPLOY_INFO_FILE,
    MODEL_FILE,
    DeployedModel,
    RunRecord,
    SplitPredictions,
    read_predictions,
    write_predictions,
)
from pipeline.decision import STAYS, CalibrationNote, ChampionCheck, Decision
from pipeline.errors import PipelineError
from pipeline.gate import check, deploy_model, read_calibration
from tests.conftest import REPO_ROOT
from tests.test_decision import decision_of

# --- the evaluate stage's calibration figures ----------------------------------------------------

def test_the_calibration_of_each_model_comes_from_evaluates_report(tmp_path: Path) -> None:
    report = tmp_path / "evaluate_report.json"
    assert read_calibration(report) == {}      # no report yet: nothing to say, nothing to hold against
    measured = {"temperature": 1.5, "test": {"ece": 0.04, "brier": 0.06, "bins": []},
                "pictures": {"gradcam": "metrics/plots/gradcam_custom.png"}}
    report.write_text(json.dumps({"class_names": ["cat", "dog"], "custom": {"test": {}, "calibration": measured},
                                  "resnet50": {"test": {}}}))   # resnet50: a report from before calibration
    (custom,) = read_calibration(report).items()
    assert custom == ("custom", CalibrationNote(0.04, 0.06, 1.5, "metrics/plots/gradcam_custom.png"))
    # A damaged report (a figure written as null, by hand or by a broken run) is one line, not a traceback.
    measured["test"]["ece"] = None
    report.write_text(json.dumps({"class_names": ["cat", "dog"], "custom": {"calibration": measured}}))
    with pytest.raises(PipelineError, match=r"evaluate_report.json: custom's calibration cannot be read .*: "
                                            r"rerun the evaluate stage \(dvc repro -f evaluate\)$"):
        read_calibration(report)


def test_predictions_without_the_test_split_are_refused_in_one_line(tmp_path: Path) -> None:
    answers = SplitPredictions(("cat/1.png",), ("cat",), ("cat",))
    path = tmp_path / "custom.csv"
    write_predictions(path, {"train": answers, "validation": answers})
    with pytest.raises(PipelineError, match=r"custom.csv has no answers for the test split: rerun the evaluate "
                                            r"stage \(dvc repro -f evaluate\)$"):
        read_predictions(path)
    write_predictions(path, {"train": answers, "test": answers})   # no validation split: the gate copes
    assert set(read_predictions(path)) == {"train", "test"}


# --- check (the CI exit code) --------------------------------------------------------------------

def _write_decision(path: Path, decision: Decision) -> Path:
    path.write_text(json.dumps(decision.to_json()))
    return path


def _deployed(deploy_dir: Path, model: str) -> Path:
    """``deploy_dir`` holding a model file and a model.json that names ``model``."""
    deploy_dir.mkdir(parents=True, exist_ok=True)
    (deploy_dir / MODEL_FILE).write_bytes(b"model")
    DeployedModel(["a", "b", "c"], 32, 3, model, "run-1").write(deploy_dir / DEPLOY_INFO_FILE)
    return deploy_dir


def test_check_returns_0_when_deploy_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gate_file = _write_decision(tmp_path / "gate.json", decision_of(custom=(0.95, 0.9)))
    assert check(gate_file, _deployed(tmp_path / "deploy", "custom")) == 0
    assert "deploy allowed: custom" in capsys.readouterr().out


def test_check_returns_2_when_deploy_does_not_hold_the_promoted_model(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A fresh clone: the committed decision promoted custom, but this workspace deployed nothing (or
    another model): no decision of this workspace's to pass on."""
    gate_file = _write_decision(tmp_path / "gate.json", decision_of(custom=(0.95, 0.9)))
    assert check(gate_file, tmp_path / "deploy") == 2
    err = capsys.readouterr().err
    assert "allows deploying custom, but" in err and "does not hold that model" in err and "dvc repro" in err
    assert check(gate_file, _deployed(tmp_path / "deploy", "resnet50")) == 2
    assert check(gate_file, _deployed(tmp_path / "deploy", "custom")) == 0
    (tmp_path / "deploy" / MODEL_FILE).unlink()     # model.json without its model
    assert check(gate_file, tmp_path / "deploy") == 2


def test_check_returns_2_on_a_damaged_decision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gate_file = tmp_path / "gate.json"
    for text in ('<<<<<<< HEAD\n{"deploy": true}\n=======\n', "[]"):   # a merge conflict; not an object
        gate_file.write_text(text)
        assert check(gate_file, tmp_path / "deploy") == 2
        assert "is not a gate decision" in capsys.readouterr().err


def test_check_returns_2_when_deploy_holds_an_older_run_of_the_promoted_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pulled decision that promoted a newer custom, beside a deploy/ of last week's custom."""
    promoted = dataclasses.replace(decision_of(custom=(0.95, 0.9)), run_id="run-2")
    gate_file = _write_decision(tmp_path / "gate.json", promoted)
    assert json.loads(gate_file.read_text())["run_id"] == "run-2"
    assert check(gate_file, _deployed(tmp_path / "deploy", "custom")) == 2      # deploy/ holds run-1
    assert "or an older model left in it" in capsys.readouterr().err
    assert check(_write_decision(gate_file, dataclasses.replace(promoted, run_id="run-1")), tmp_path / "deploy") == 0
    earlier = {key: value for key, value in promoted.to_json().items() if key != "run_id"}   # before run_id was kept
    gate_file.write_text(json.dumps(earlier))
    assert check(gate_file, tmp_path / "deploy") == 0


def test_check_of_a_compare_only_decision_needs_nothing_deployed(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    decision = {**decision_of(custom=(0.95, 0.9)).to_json(), "promoted": False}   # gate.promote: false
    (tmp_path / "gate.json").write_text(json.dumps(decision))
    assert check(tmp_path / "gate.json", tmp_path / "deploy") == 0
    assert "deploy allowed: custom (compare only" in capsys.readouterr().out


def test_check_returns_1_when_deploy_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gate_file = _write_decision(tmp_path / "gate.json", decision_of(custom=(0.5, 0.5), resnet50=(0.99, 0.1)))
    assert check(gate_file) == 1
    err = capsys.readouterr().err
    assert "deploy NOT allowed" in err and "custom underfit" in err and "resnet50 overfit" in err


def test_check_says_why_when_the_champion_stays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stays = ChampionCheck(STAYS, "3", reasons=["challenger custom 0.900 vs champion v3 0.950: champion v3 stays"])
    assert check(_write_decision(tmp_path / "gate.json", decision_of(champion=stays, custom=(0.95, 0.9)))) == 1
    err = capsys.readouterr().err
    assert "custom deploy" in err and "champion: challenger custom 0.900 vs champion v3 0.950" in err


def test_check_returns_2_when_gate_file_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "metrics" / "gate.json"
    assert check(missing) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize(("deploy", "code"), [(True, 0), (False, 1), (None, 2)])
def test_check_command_line_exit_codes(tmp_path: Path, deploy: bool | None, code: int) -> None:
    gate_file = tmp_path / "gate.json"
    if deploy is not None:
        _write_decision(gate_file, decision_of(custom=(0.95, 0.9) if deploy else (0.1, 0.1)))
    completed = subprocess.run([sys.executable, "-m", "pipeline.gate", "--check", "--out", str(gate_file),
                                "--deploy", str(_deployed(tmp_path / "deploy", "custom"))],
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

    deploy_model(model_dir / MODEL_FILE, DeployedModel.from_run("custom", record, 10_000), deploy_dir)

    assert (deploy_dir / MODEL_FILE).read_bytes() == payload
    info = json.loads((deploy_dir / DEPLOY_INFO_FILE).read_text())
    assert info == {"model": "custom", "class_names": ["cat", "dog"], "image_size": 32, "channels": 1,
                    "mlflow_run_id": "abc123", "max_image_pixels": 10_000}
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

    deploy_model(model_dir / MODEL_FILE, DeployedModel.from_run("custom", record, 10_000), deploy_dir)

    assert (deploy_dir / MODEL_FILE).read_bytes() == b"new model"
    assert json.loads((deploy_dir / DEPLOY_INFO_FILE).read_text())["model"] == "custom"


def test_deploy_model_without_a_model_file_fails(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        deploy_model(tmp_path / "empty" / MODEL_FILE,
                     DeployedModel.from_run("custom", RunRecord("x", "runs:/x/model", [], 32, 1), 10_000), tmp_path / "deploy")
    assert not (tmp_path / "deploy" / MODEL_FILE).exists()
