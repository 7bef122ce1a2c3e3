"""The gate against a real MLflow registry (SQLite): first run, a worse challenger refused, a better
one promoted, the same model again, an incompatible champion, a damaged one, and no registry.

The models are real Keras models whose answers are fixed by construction: each class of the
fixture images is one dominant colour, and a model maps "strongest colour channel" to a class, so
a chosen mapping is right on exactly the images of the classes it maps to themselves.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bench.project import free_port
from pipeline import gate, tracking
from pipeline.artifacts import MODEL_FILE, RunRecord, write_predictions
from pipeline.evaluate import answers, evaluate_model
from pipeline.errors import PipelineError
from pipeline.manifest import SplitImages, read_split
from tests.conftest import make_image_folder
from tests.stage_runner import prepare_split, run_stage, stage_env

pytestmark = pytest.mark.slow

NAME = "image-classifier"
PERFECT, TWO_RIGHT, ONE_RIGHT = (0, 1, 2), (0, 1, 1), (0, 2, 1)   # channel -> class


def channel_model(size: int, mapping: tuple[int, ...]) -> keras.Model:
    """A model that answers class ``mapping[c]`` for an image whose strongest channel is ``c``."""
    dense = keras.layers.Dense(3, activation="softmax")
    model = keras.Sequential([keras.Input((size, size, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.GlobalAveragePooling2D(), dense])
    weights = np.zeros((3, 3), dtype=np.float32)
    for channel, label in enumerate(mapping):
        weights[channel, label] = 20.0
    dense.set_weights([weights, np.zeros(3, dtype=np.float32)])
    return model


class GateProject:
    """A working folder with images, a split, a store, and two trained-model folders to fill."""

    def __init__(self, root: Path, raw_params: dict, size: int = 32) -> None:
        self.root, self.size = root, size
        images = make_image_folder(root / "images", {"a": 12, "b": 12, "c": 12}, size=size)
        params = raw_params
        params["base"].update(image_size=size, channels=3)
        params["gate"].update(min_train_score=0.0, min_test_score=0.0)
        prepare_split(root, images, params)
        self.data = read_split(root / "data/ingest", root / "data/split.csv")
        tracking.connect(params["base"]["experiment_name"])
        self.experiment_id = tracking.mlflow.get_experiment_by_name(params["base"]["experiment_name"]).experiment_id

    def train(self, **mappings: tuple[int, ...]) -> None:
        """'Train' each model as the given mapping: a new MLflow run, the model, run.json, predictions."""
        for name, mapping in mappings.items():
            model = channel_model(self.size, mapping)
            run_id = MlflowClient(tracking.tracking_uri()).create_run(self.experiment_id).info.run_id
            folder = self.root / "models" / name
            folder.mkdir(parents=True, exist_ok=True)
            model.save(folder / MODEL_FILE)
            RunRecord(run_id, f"runs:/{run_id}/model", self.data.class_names, self.size, 3).write(folder)
            scores, _ = evaluate_model(model, self.data, self.size, 3, batch_size=64)
            write_predictions(self.root / "data/predictions" / f"{name}.csv", answers(self.data, scores))

    def gate(self) -> dict:
        arguments = argparse.Namespace(params="params.yaml", predictions="data/predictions", ingest="data/ingest",
                                       report="metrics/evaluate_report.json",
                                       models="models", deploy="deploy", out="metrics/gate.json")
        gate.main(arguments)
        return json.loads((self.root / "metrics/gate.json").read_text())

    def record_seen(self, name: str, frame) -> None:
        """Record on model ``name``'s run the images it learned from, as training does, from ``frame``."""
        with tracking.resume_run(RunRecord.read(self.root / "models" / name).run_id):
            tracking.log_seen_images(SplitImages(self.data.root, frame))

    def champion(self):
        return MlflowClient(tracking.tracking_uri()).get_model_version_by_alias(NAME, "champion")

    def versions(self) -> int:
        return len(MlflowClient(tracking.tracking_uri()).search_model_versions(f"name='{NAME}'"))

    def stamps(self) -> dict[str, int]:
        """Each file of deploy/ with its modification time in nanoseconds."""
        return {path.name: path.stat().st_mtime_ns for path in (self.root / "deploy").iterdir()}

    def deployed(self) -> bytes:
        return (self.root / "deploy" / MODEL_FILE).read_bytes() + (self.root / "deploy/model.json").read_bytes()


@pytest.fixture
def project(tmp_path: Path, raw_params: dict, monkeypatch: pytest.MonkeyPatch) -> GateProject:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return GateProject(tmp_path, raw_params)


def test_the_champion_moves_only_forward(project: GateProject, raw_params: dict) -> None:
    # First run: no champion, so no comparison; the better of the two is promoted.
    project.train(custom=TWO_RIGHT, resnet50=ONE_RIGHT)
    first = project.gate()
    assert first["deploy"] is True and first["model"] == "custom"
    assert first["champion"]["outcome"] == "none" and "in the registry yet" in first["champion"]["reasons"][0]
    assert first["comparisons"]["custom_vs_resnet50"]["difference"] > 0
    assert str(project.champion().version) == "1"
    deployed_first = project.deployed()

    # A worse second run passes the thresholds but loses to the champion on the same test images.
    project.train(custom=ONE_RIGHT, resnet50=ONE_RIGHT)
    second = project.gate()
    assert second["deploy"] is False and second["model"] is None
    assert second["candidates"]["custom"]["verdict"] == "deploy"
    champion = second["champion"]
    assert champion["outcome"] == "stays" and champion["version"] == "1" and champion["model"] == "custom"
    assert champion["score"] == pytest.approx(first["candidates"]["custom"]["test_score"])
    assert champion["difference"] < 0 and 0 <= champion["p_value"] <= 1
    assert str(project.champion().version) == "1" and project.versions() == 1
    assert project.deployed() == deployed_first
    assert "champion v1 stays" in champion["reasons"][0]

    # A better third run replaces it: a new version, the alias moved, deploy/ updated, the reason kept;
    # deploy/ carries the pixel limit predict and serving will decode under (the params' of this run).
    project.train(custom=PERFECT)
    raw_params["ingest"]["max_image_pixels"] = 123_456
    (project.root / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    third = project.gate()
    assert json.loads((project.root / "deploy/model.json").read_text())["max_image_pixels"] == 123_456
    assert third["deploy"] is True and third["model"] == "custom"
    assert third["champion"]["outcome"] == "replaced" and third["champion"]["difference"] > 0
    promoted = project.champion()
    assert str(promoted.version) == "2" and project.versions() == 2
    assert promoted.tags["gate.replaced_version"] == "1" and promoted.tags["model"] == "custom"
    assert promoted.tags["gate.champion"] == "replaced"
    assert "replaces champion v1" in promoted.description
    assert json.loads((project.root / "deploy/model.json").read_text())["mlflow_run_id"] == \
        promoted.tags["source.run_id"]
    run = MlflowClient(tracking.tracking_uri()).get_run(promoted.tags["source.run_id"])
    assert run.data.tags["gate.champion"] == "replaced" and run.data.tags["gate.champion_version"] == "1"
    assert "gate_vs_champion_p_value" in run.data.metrics

    # The gate again with nothing new: the champion is this very model; no new version, deploy/ not
    # rewritten, and the CI check says nothing new may be deployed.
    deployed_third, stamps = project.deployed(), project.stamps()
    again = project.gate()
    assert again["deploy"] is False and again["champion"]["outcome"] == "same model"
    assert project.versions() == 2 and str(project.champion().version) == "2"
    assert project.deployed() == deployed_third and project.stamps() == stamps
    assert gate.check(project.root / "metrics/gate.json") == 1


def test_compare_only_decides_but_registers_and_deploys_nothing(project: GateProject,
                                                               capsys: pytest.CaptureFixture) -> None:
    """``gate.promote: false`` (a pull request's CI): the same decision and comparison as a promoting
    gate, but no new version, no alias moved, deploy/ untouched; the CI check still passes."""
    project.train(custom=TWO_RIGHT, resnet50=ONE_RIGHT)
    project.gate()
    deployed, stamps = project.deployed(), project.stamps()
    params_file = project.root / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["gate"]["promote"] = False
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))

    project.train(custom=PERFECT)
    compared = project.gate()
    assert compared["deploy"] is True and compared["promoted"] is False and compared["model"] == "custom"
    assert compared["champion"]["outcome"] == "replaced" and compared["champion"]["difference"] > 0
    assert compared["champion"]["reasons"][0].endswith("would replace (compare only) champion v1")
    assert project.versions() == 1 and str(project.champion().version) == "1"
    assert project.deployed() == deployed and project.stamps() == stamps
    run = MlflowClient(tracking.tracking_uri()).get_run(RunRecord.read(project.root / "models/custom").run_id)
    assert run.data.tags["gate.verdict"] == "deploy" and run.data.tags["gate.deployed"] == "false"
    capsys.readouterr()
    assert gate.check(project.root / "metrics/gate.json") == 0
    assert "compare only" in capsys.readouterr().out
    # A deploy/ that disagrees with the alias (here: gone) is left as it is too: repairing it is promoting.
    shutil.rmtree(project.root / "deploy")
    assert project.gate()["promoted"] is False
    assert list((project.root / "deploy").iterdir()) == []

    params["gate"]["promote"] = True     # the same models, now promoted
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    promoted = project.gate()
    assert promoted["promoted"] is True and project.versions() == 2 and str(project.champion().version) == "2"
    assert project.deployed() != deployed


def test_a_registry_that_refuses_the_promotion_or_the_record_fails_the_gate_in_one_line(
        project: GateProject, monkeypatch: pytest.MonkeyPatch) -> None:
    """A team server may refuse a write (permissions) or go away after answering the reads: the stage
    fails with one line, the alias and deploy/ as they were. A SQLite store cannot refuse a write made
    as root, so the refusal is MLflow's own exception, raised where the registry would raise it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    project.train(custom=TWO_RIGHT, resnet50=ONE_RIGHT)
    project.gate()
    deployed = project.deployed()
    project.train(custom=PERFECT)

    def refuse(*args, **kwargs):
        raise MlflowException("Permission denied for registered model image-classifier\n(server log follows)",
                              error_code=PERMISSION_DENIED)

    with monkeypatch.context() as patch:
        patch.setattr(tracking, "move_champion_alias", refuse)
        with pytest.raises(PipelineError) as refused:
            project.gate()
    assert str(refused.value) == ("the registry did not take the promotion of custom to image-classifier@champion "
                                  "(Permission denied for registered model image-classifier): the alias and deploy/ "
                                  "are left as they were")
    assert str(project.champion().version) == "1" and project.deployed() == deployed
    assert not list(project.root.glob(".deploy*"))

    with monkeypatch.context() as patch:
        patch.setattr(gate, "_record_in_mlflow", refuse)
        with pytest.raises(PipelineError, match=r"^custom is deployed, but the decision could not be recorded in "
                                                r"the MLflow runs \(Permission denied .*\); metrics/gate.json holds "
                                                r"it. Rerun the gate to record it: dvc repro gate$"):
            project.gate()
    assert json.loads((project.root / "metrics/gate.json").read_text())["promoted"] is True
    assert project.deployed() != deployed


def test_an_incompatible_champion_is_not_compared(project: GateProject, raw_params: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    project.train(custom=PERFECT, resnet50=ONE_RIGHT)
    project.gate()
    # The same store, new data: 40x40 images. The 32x32 champion cannot be scored on them.
    monkeypatch.chdir(tmp_path / "bigger") if (tmp_path / "bigger").mkdir() is None else None
    bigger = GateProject(tmp_path / "bigger", raw_params, size=40)
    bigger.train(custom=ONE_RIGHT, resnet50=ONE_RIGHT)
    decision = bigger.gate()
    assert decision["champion"]["outcome"] == "not comparable"
    assert "takes 32x32 images with 3 channel(s), this data is 40x40" in decision["champion"]["reasons"][0]
    # Not opted in: the champion stays, nothing is deployed.
    assert decision["deploy"] is False and str(bigger.champion().version) == "1"
    # deploy/ follows the alias: this new folder had none, so it got champion v1 from the registry.
    assert gate.deployed_run_id(bigger.root / "deploy") == bigger.champion().tags["source.run_id"]
    # Opted in (gate.replace_incomparable): the challenger replaces it, and the reason says so.
    raw_params["gate"]["replace_incomparable"] = True
    (bigger.root / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    decision = bigger.gate()
    assert "gate.replace_incomparable is true" in decision["champion"]["reasons"][0]
    assert decision["deploy"] is True and str(bigger.champion().version) == "2"


def test_a_registry_out_of_reach_or_a_champion_without_its_files(project: GateProject,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    project.train(custom=PERFECT, resnet50=ONE_RIGHT)
    project.gate()
    deployed = project.deployed()
    store = tracking.tracking_uri()

    # No registry to ask: nothing is deployed and deploy/ stays as it was.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    decision = project.gate()
    assert decision["deploy"] is False and decision["champion"]["outcome"] == "unknown"
    assert "the registry cannot be reached" in decision["champion"]["reasons"][0]
    assert project.deployed() == deployed

    # The registry answers but the perfect champion's files are gone: it cannot be scored, so a worse
    # challenger must not slip through. The gate fails closed: nothing deployed, the alias unmoved.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    shutil.rmtree(project.root / "mlartifacts")
    project.train(custom=TWO_RIGHT)
    decision = project.gate()
    assert decision["champion"]["outcome"] == "unknown" and decision["champion"]["version"] == "1"
    (reason,) = decision["champion"]["reasons"]
    assert "champion v1 cannot be scored: its files cannot be loaded" in reason and "nothing is deployed" in reason
    assert decision["deploy"] is False
    assert str(project.champion().version) == "1" and project.versions() == 1
    assert project.deployed() == deployed


GATE_ARGUMENTS = ("--predictions", "data/predictions", "--ingest", "data/ingest", "--models", "models",
                  "--deploy", "deploy", "--out", "metrics/gate.json")


def test_a_deploy_folder_without_its_model_file_gets_the_champion_back(project: GateProject) -> None:
    """A partial checkout left deploy/model.json without the model: the gate puts the champion back,
    says so, and registers nothing new."""
    project.train(custom=TWO_RIGHT, resnet50=ONE_RIGHT)
    first = project.gate()
    assert first["run_id"] == RunRecord.read(project.root / "models/custom").run_id
    deployed = project.deployed()
    (project.root / "deploy" / MODEL_FILE).unlink()
    again = project.gate()
    assert again["champion"]["outcome"] == "restored" and again["deploy"] is True and again["model"] == "custom"
    assert project.deployed() == deployed and project.versions() == 1
    assert gate.check(project.root / "metrics/gate.json", project.root / "deploy") == 0
    once_more = project.gate()       # now whole: nothing to put back, nothing new
    assert once_more["champion"]["outcome"] == "same model" and once_more["deploy"] is False


@pytest.mark.parametrize("step", ["after-register", "after-alias", "between-renames", "after-deploy"])
def test_a_gate_killed_during_a_promotion_leaves_alias_and_deploy_agreeing(project: GateProject, step: str) -> None:
    project.train(custom=TWO_RIGHT, resnet50=ONE_RIGHT)
    project.gate()
    env = stage_env(MLFLOW_TRACKING_URI=tracking.tracking_uri())

    def agree() -> bool:
        champion = project.champion()
        return gate.deployed_run_id(project.root / "deploy") == champion.tags["source.run_id"]

    deployed_before = (project.root / "deploy" / MODEL_FILE).read_bytes()
    project.train(custom=PERFECT)     # a better challenger, promoted by a gate that is killed half-way
    killed = run_stage(project.root, "gate", *GATE_ARGUMENTS, env={**env, gate.FAULT_VARIABLE: step})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if step not in ("after-alias", "between-renames"):   # after the alias moved, the next run repairs deploy/
        assert agree()
    if step == "between-renames":
        # deploy/ is gone, its files set aside: a next run that cannot reach the registry puts them back
        # (the old champion, as before the promotion) instead of sweeping them away with the leftovers.
        assert not (project.root / "deploy").exists()
        unreachable = run_stage(project.root, "gate", *GATE_ARGUMENTS,
                                env={**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
        assert unreachable.returncode == 0, unreachable.stderr[-2000:]
        assert "put back from .deploy.old-" in unreachable.stderr
        assert (project.root / "deploy" / MODEL_FILE).read_bytes() == deployed_before
    rerun = run_stage(project.root, "gate", *GATE_ARGUMENTS, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert agree()
    new_run = RunRecord.read(project.root / "models/custom").run_id
    assert project.champion().tags["source.run_id"] == new_run
    # The rerun's decision says what it did: promoted afresh where the alias had not moved, deployed
    # by putting the champion back where this run did so (CI ships it), nothing new where the killed
    # run had finished deploy/.
    outcome = {"after-register": "replaced", "after-alias": "restored", "between-renames": "restored",
               "after-deploy": "same model"}[step]
    decided = json.loads((project.root / "metrics/gate.json").read_text())
    assert decided["champion"]["outcome"] == outcome
    assert decided["deploy"] is (outcome != "same model")
    assert gate.check(project.root / "metrics/gate.json", project.root / "deploy") == (outcome == "same model")
    trained = (project.root / "models/custom" / MODEL_FILE).read_bytes()
    assert (project.root / "deploy" / MODEL_FILE).read_bytes() == trained
    assert sorted(path.name for path in project.root.iterdir() if path.name.startswith(".deploy")) == []


def test_the_gate_counts_the_models_judged_on_one_test_split_and_warns_past_the_limit(
        project: GateProject, raw_params: dict) -> None:
    project.train(custom=TWO_RIGHT, resnet50=ONE_RIGHT)
    first = project.gate()["test_reuse"]
    assert first["models_judged"] == 2 and first["limit"] == 20 and first["exceeded"] is False
    # Deciding again on the same two models is no new look at the test set: the count stays.
    assert project.gate()["test_reuse"]["models_judged"] == 2
    # A newly trained custom CNN is a third model judged on the same images, past a limit of 2.
    raw_params["gate"]["max_test_reuse"] = 2
    (project.root / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    project.train(custom=PERFECT)
    third = project.gate()["test_reuse"]
    assert third == {"split": first["split"], "models_judged": 3, "limit": 2, "exceeded": True}
    tagged = MlflowClient(tracking.tracking_uri()).search_runs([project.experiment_id],
                                                               f"tags.`gate.test_split` = '{first['split']}'")
    assert len(tagged) == 3


def test_a_champion_that_learned_from_todays_test_images_is_not_compared(project: GateProject, raw_params: dict,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The champion was trained on another split: three of today's test images were among its training images.
    project.train(custom=TWO_RIGHT, resnet50=ONE_RIGHT)
    other_split = project.data.frame.copy()
    today_test = other_split.index[other_split["split"] == "test"]
    other_split.loc[today_test[:3], "split"] = "train"
    project.record_seen("custom", other_split)
    assert project.gate()["deploy"] is True and str(project.champion().version) == "1"

    # A better challenger: without the lineage check it would replace the champion (see the test above).
    project.train(custom=PERFECT)
    decision = project.gate()
    assert decision["champion"]["outcome"] == "not comparable"
    (reason,) = decision["champion"]["reasons"]
    assert reason.startswith(f"champion v1 cannot be compared with custom: it learned from 3 of today's "
                             f"{len(today_test)} test images (another split or changed data): its score on them "
                             "is biased; champion v1 stays")
    assert decision["deploy"] is False and str(project.champion().version) == "1" and project.versions() == 1

    # The store fails while the record is read: the champion is unknown and nothing is deployed.
    def refused(*_args, **_kwargs):
        raise ConnectionError("Connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(tracking.MlflowClient, "list_artifacts", refused)
        decision = project.gate()
    assert decision["champion"]["outcome"] == "unknown" and decision["deploy"] is False
    assert "cannot be scored: the images run" in decision["champion"]["reasons"][0]

    # Opted in (gate.replace_incomparable), the challenger replaces it.
    raw_params["gate"]["replace_incomparable"] = True
    (project.root / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    assert project.gate()["deploy"] is True and str(project.champion().version) == "2"


def test_a_champion_with_a_clean_or_an_unknown_lineage_is_compared(project: GateProject) -> None:
    # Learned from today's train and validation images only: compared as usual, no note.
    project.train(custom=TWO_RIGHT, resnet50=ONE_RIGHT)
    project.record_seen("custom", project.data.frame)
    project.gate()
    project.train(custom=PERFECT)
    replaced = project.gate()
    assert replaced["champion"]["outcome"] == "replaced" and replaced["deploy"] is True
    assert not any("lineage" in reason for reason in replaced["champion"]["reasons"])

    # Champion v2's run recorded nothing (trained before lineage was recorded): compared, with a note.
    project.train(custom=ONE_RIGHT)
    stays = project.gate()
    assert stays["champion"]["outcome"] == "stays" and stays["champion"]["score"] == pytest.approx(1.0)
    assert stays["champion"]["reasons"][-1] == \
        "champion v2: lineage unknown (trained before lineage was recorded)"
    assert tracking.seen_images(project.champion().tags["source.run_id"]) is None
    with pytest.raises(PipelineError, match="cannot be read"):
        tracking.seen_images("no-such-run")


def test_after_the_summary_one_line_says_where_to_look_next(project: GateProject,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    project.train(custom=TWO_RIGHT, resnet50=ONE_RIGHT)
    with caplog.at_level("INFO", logger="pipeline.gate"):
        project.gate()
    last = [record.getMessage() for record in caplog.records if record.name == "pipeline.gate"][-1]
    assert last.startswith("next: make ui") and "metrics/gate.json" in last
