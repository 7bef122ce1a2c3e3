"""The parent run of one pipeline execution, against a real MLflow store (SQLite in a temporary folder):
which parent a training stage joins, when a new one starts, and what the gate records on it."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
from mlflow.tracking import MlflowClient

from pipeline import parent_run, tracking
from pipeline.artifacts import RunRecord
from pipeline.errors import PipelineError

DECISION = {"deploy": True, "model": "custom", "metric": "accuracy",
            "thresholds": {"min_train_score": 0.9, "min_test_score": 0.85, "max_regression": 0.0},
            "candidates": {"custom": {"train_score": 0.99, "test_score": 0.95, "verdict": "deploy", "reasons": []},
                           "resnet50": {"train_score": 0.5, "test_score": 0.4, "verdict": "underfit",
                                        "reasons": ["too low"]}},
            "champion": {"outcome": "none", "version": None, "reasons": []}}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite store in a project folder, selected as the stages select it; the experiment's id."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "split.csv").write_text("path,label,split\na.png,a,train\n")
    experiment_id = tracking.connect("image-classification")
    yield experiment_id
    mlflow.set_tracking_uri(None)


def train(experiment_id: str, stage: str, split: Path = Path("split.csv")) -> RunRecord:
    """What a training stage does with the parent: join or start it, then run under it."""
    parent_id = parent_run.join_or_start(experiment_id, parent_run.execution_key(split), stage)
    with tracking.start_run(stage, {"dvc.stage": stage}, parent_run_id=parent_id) as run:
        pass
    return RunRecord(run.info.run_id, f"runs:/{run.info.run_id}/model", ["a"], 32, 1, parent_id)


def test_a_new_experiment_is_a_model_training_experiment(store: str) -> None:
    experiment = MlflowClient().get_experiment(store)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_older_experiment_without_a_kind_is_tagged_but_a_chosen_kind_is_kept(store: str) -> None:
    client = MlflowClient()
    client.delete_experiment_tag(store, "mlflow.experimentKind")
    tracking.connect("image-classification")
    assert client.get_experiment(store).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(store, "mlflow.experimentKind", "finetuning")
    tracking.connect("image-classification")
    assert client.get_experiment(store).tags["mlflow.experimentKind"] == "finetuning"


def test_a_resumed_training_run_keeps_its_status_and_end_time(store: str) -> None:
    """Evaluate and the gate add to the training runs: a failure there, or one more gate, must not turn a
    finished training into a failed one or stretch its duration."""
    record = train(store, "train_custom")
    client = MlflowClient()
    finished = client.get_run(record.run_id).info
    assert finished.status == "FINISHED"
    with pytest.raises(RuntimeError), tracking.resume_run(record.run_id):
        mlflow.log_metric("test_accuracy", 0.5)
        raise RuntimeError("evaluate failed half-way")
    with tracking.resume_run(record.run_id):
        mlflow.set_tag("gate.verdict", "deploy")
    after = client.get_run(record.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", finished.end_time)
    assert after.data.metrics["test_accuracy"] == 0.5 and after.data.tags["gate.verdict"] == "deploy"


def test_a_deleted_experiment_is_one_line_that_says_how_to_restore_it(store: str) -> None:
    """Deleted in the UI, it still answers by name, and MLflow then refuses to use it."""
    MlflowClient().delete_experiment(store)
    with pytest.raises(PipelineError, match=rf"^MLflow experiment 'image-classification' in sqlite:///.* was deleted: "
                                            rf"restore it \(mlflow experiments restore --experiment-id {store}\) or "
                                            r"set base.experiment_name to another name$"):
        tracking.connect("image-classification")
    MlflowClient().restore_experiment(store)
    assert tracking.connect("image-classification") == store


def test_a_store_that_refuses_the_parent_run_is_one_line(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only user on a team server: the parent run is the first write, so its refusal is the one seen.
    (A SQLite store written as root cannot refuse: the refusal is MLflow's own exception, raised there.)"""
    def refuse(*args, **kwargs):
        raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)

    monkeypatch.setattr(MlflowClient, "create_run", refuse)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    with pytest.raises(PipelineError, match=r"refused user reader \(PERMISSION_DENIED\): training needs EDIT"):
        parent_run.join_or_start(store, parent_run.execution_key(Path("split.csv")), "train_custom")
    monkeypatch.setattr(MlflowClient, "create_run", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(PipelineError, match=r"^MLflow could not start or join the parent run in sqlite:///.* "
                                            r"\(division by zero\)$"):
        parent_run.join_or_start(store, parent_run.execution_key(Path("split.csv")), "train_custom")


def test_both_training_stages_of_one_repro_share_a_parent_and_the_gate_closes_it(store: str) -> None:
    client = MlflowClient()
    custom, resnet50 = train(store, "train_custom"), train(store, "train_resnet50")
    assert custom.parent_run_id == resnet50.parent_run_id
    parent = client.get_run(custom.parent_run_id)
    assert parent.info.status == "RUNNING" and parent.info.run_name.startswith("repro@")
    assert client.get_run(custom.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id

    recorded = parent_run.record_decision(DECISION, {"custom": custom, "resnet50": resnet50})
    parent = client.get_run(recorded)
    assert recorded == custom.parent_run_id and parent.info.status == "FINISHED"
    assert parent.data.tags["gate.deploy"] == "true" and parent.data.tags["gate.model"] == "custom"
    assert parent.data.tags["gate.verdict.resnet50"] == "underfit"
    assert parent.data.tags["run.custom"] == custom.run_id
    assert parent.data.metrics["custom.test_accuracy"] == 0.95
    assert mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/metrics/gate.json") == DECISION

    # The next repro that trains (one model only, say) starts a new parent; the gate, rerun alone
    # afterwards, records on the newest parent of the two models it judges.
    again = train(store, "train_custom")
    assert again.parent_run_id != custom.parent_run_id
    assert parent_run.record_decision(DECISION, {"custom": again, "resnet50": resnet50}) == again.parent_run_id
    assert parent_run.record_decision(DECISION, {"custom": again, "resnet50": resnet50}) == again.parent_run_id


def test_a_stage_rerun_before_the_gate_starts_a_new_parent_and_closes_the_old(store: str) -> None:
    client = MlflowClient()
    first = train(store, "train_custom")
    second = train(store, "train_custom")   # dvc repro -f train_custom: a new execution
    assert second.parent_run_id != first.parent_run_id
    # The old execution decided nothing: it is closed as stopped, naming the one that replaced it.
    old = client.get_run(first.parent_run_id)
    assert old.info.status == "KILLED" and old.data.tags[parent_run.SUPERSEDED_TAG] == second.parent_run_id
    assert train(store, "train_resnet50").parent_run_id == second.parent_run_id


def test_a_failed_stage_rerun_joins_the_execution_it_failed_in(store: str) -> None:
    custom = train(store, "train_custom")
    parent_id = parent_run.join_or_start(store, parent_run.execution_key(Path("split.csv")), "train_resnet50")
    with pytest.raises(RuntimeError):
        with tracking.start_run("train_resnet50", {"dvc.stage": "train_resnet50"}, parent_run_id=parent_id):
            raise RuntimeError("out of memory")
    assert train(store, "train_resnet50").parent_run_id == custom.parent_run_id


def test_dvc_experiments_get_a_parent_each_named_after_them(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    parents = []
    for name in ("bushy-tern", "lusty-oryx"):
        monkeypatch.setenv("DVC_EXP_NAME", name)
        custom, resnet50 = train(store, "train_custom"), train(store, "train_resnet50")
        assert custom.parent_run_id == resnet50.parent_run_id
        parents.append(client.get_run(custom.parent_run_id))
    assert [p.info.run_name for p in parents] == ["bushy-tern", "lusty-oryx"]
    assert parents[0].info.run_id != parents[1].info.run_id


def test_a_dvc_experiment_that_only_reran_the_gate_records_its_decision_on_its_own_run(
        store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull request's compare-only experiment (gate.promote: false) that retrained nothing must not
    rewrite the decision of the execution that trained the models."""
    client = MlflowClient()
    monkeypatch.setenv("DVC_EXP_NAME", "trained-here")
    models = {"custom": train(store, "train_custom"), "resnet50": train(store, "train_resnet50")}
    trained_in = models["custom"].parent_run_id
    assert parent_run.record_decision(DECISION, models) == trained_in
    monkeypatch.setenv("DVC_EXP_NAME", "gate-only")
    own = parent_run.record_decision({**DECISION, "promoted": False}, models)
    assert own != trained_in
    assert client.get_run(trained_in).data.tags["gate.promoted"] == "true"
    run = client.get_run(own)
    assert (run.info.run_name, run.info.status) == ("gate-only", "FINISHED")
    assert run.data.tags["gate.promoted"] == "false" and run.data.tags["gate.models_trained_in"] == "trained-here"


def test_a_deleted_parent_leaves_the_decision_on_the_training_runs(store: str, caplog) -> None:
    models = {"custom": train(store, "train_custom"), "resnet50": train(store, "train_resnet50")}
    MlflowClient().delete_run(models["custom"].parent_run_id)
    with caplog.at_level(logging.WARNING, logger="pipeline.parent_run"):
        assert parent_run.record_decision(DECISION, models) is None
    assert "or the parent was deleted" in caplog.text


def test_the_execution_key_follows_the_experiment_and_the_split(tmp_path: Path) -> None:
    split = tmp_path / "split.csv"
    split.write_text("path,label,split\na.png,a,train\n")
    plain = parent_run.execution_key(split, {})
    assert parent_run.execution_key(split, {}) == plain
    assert parent_run.execution_key(split, {"DVC_EXP_NAME": "bushy-tern"}) != plain
    split.write_text("path,label,split\na.png,a,test\n")
    assert parent_run.execution_key(split, {}) != plain


def test_the_decision_becomes_tags_and_metrics() -> None:
    tags, metrics = parent_run.decision_record({**DECISION, "deploy": False, "model": None}, {"custom": "r1"})
    assert tags == {"gate.deploy": "false", "gate.promoted": "false", "gate.model": "none", "gate.metric": "accuracy",
                    "gate.champion": "none", "gate.verdict.custom": "deploy", "gate.verdict.resnet50": "underfit",
                    "run.custom": "r1"}
    compare_only, _ = parent_run.decision_record({**DECISION, "deploy": True, "promoted": False}, {})
    assert compare_only["gate.deploy"] == "true" and compare_only["gate.promoted"] == "false"
    assert metrics == {"custom.train_accuracy": 0.99, "custom.test_accuracy": 0.95,
                       "resnet50.train_accuracy": 0.5, "resnet50.test_accuracy": 0.4}


def test_models_trained_before_parent_runs_leave_the_decision_on_the_training_runs(
        store: str, caplog: pytest.LogCaptureFixture) -> None:
    client = MlflowClient()
    old_custom = RunRecord("r1", "runs:/r1/model", ["a"], 32, 1)
    with caplog.at_level(logging.WARNING, logger="pipeline.parent_run"):
        assert parent_run.record_decision(DECISION, {"custom": old_custom}) is None
    assert "the training runs have no MLflow parent run" in caplog.text
    assert client.search_runs([store]) == []    # no parent made up to hold the decision

    # One model from before parent runs beside one with a parent: the decision goes on that parent.
    resnet50 = train(store, "train_resnet50")
    recorded = parent_run.record_decision(DECISION, {"custom": old_custom, "resnet50": resnet50})
    assert recorded == resnet50.parent_run_id
    parent = client.get_run(recorded)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["run.custom"] == "r1" and parent.data.tags["run.resnet50"] == resnet50.run_id
    assert parent.data.tags["gate.deploy"] == "true" and parent.data.metrics["resnet50.test_accuracy"] == 0.4


def test_a_class_name_longer_than_a_tag_key_allows_is_logged(store: str) -> None:
    """A class folder's name goes into the dataset input's tags as class.<label>: a long one must not
    stop the training stage at MLflow's limit on tag keys."""
    import pandas as pd

    from pipeline.manifest import SplitImages

    long_a, long_b = "a" * 300, "a" * 299 + "b"
    frame = pd.DataFrame({"path": [f"{label}/{i}.png" for label in (long_a, long_b) for i in range(3)],
                          "label": [long_a] * 3 + [long_b] * 3, "split": ["train", "validation", "test"] * 2})
    inputs = tracking.dataset_inputs(SplitImages(Path("photos"), frame), "photos", "f" * 64, (0.8, 0.1, 0.1))
    with tracking.start_run("train_custom", {"dvc.stage": "train_custom"}) as run:
        tracking.log_dataset_inputs(inputs)
    (train,) = [item for item in MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
                if any(tag.key == "mlflow.data.context" and tag.value == "train" for tag in item.tags)]
    classes = {tag.key: tag.value for tag in train.tags if tag.key.startswith("class.")}
    assert len(classes) == 2 and set(classes.values()) == {"1"}
    assert all(len(key) <= 250 for key in classes)
