"""The whole pipeline through the real ``dvc repro``, in a temporary copy of the repository.

Tiny params (10 digits per class, one epoch, ResNet50 from scratch at 32x32) keep it to a
minute or two. The session's one reproduced project (``reproduced_project``) is checked as a first
run leaves it; a private copy of it then walks on: a second run changes nothing, a stricter gate
reruns only the gate and deploys nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.project import STAGES, free_port, read_params, run, stages_run, write_params
from tests.conftest import ReproducedProject

pytestmark = pytest.mark.slow


@pytest.fixture
def project(reproduced_project: ReproducedProject) -> Path:
    return reproduced_project.root


def test_dvc_repro_end_to_end(reproduced_project: ReproducedProject) -> None:
    project = reproduced_project.root
    assert stages_run(reproduced_project.output) == list(STAGES)

    gate = json.loads((project / "metrics/gate.json").read_text())
    assert gate["deploy"] is True and gate["model"] in ("custom", "resnet50") and gate["metric"] == "accuracy"
    assert set(gate["candidates"]) == {"custom", "resnet50"}
    for candidate in gate["candidates"].values():
        assert candidate["verdict"] == "deploy"
        interval = candidate["test_interval"]
        assert interval["method"] == "wilson" and interval["low"] <= candidate["test_score"] <= interval["high"]
    assert set(gate["comparisons"]) == {"custom_vs_resnet50"}
    assert gate["champion"]["outcome"] == "none" and gate["champion"]["version"] is None
    # evaluate wrote every model's answer for every image, the gate's input.
    for model in ("custom", "resnet50"):
        rows = (project / f"data/predictions/{model}.csv").read_text().splitlines()
        assert rows[0] == "split,path,actual,predicted" and len(rows) == 1 + 10 * 10

    # The deployed model is a plain Keras model that takes raw pixels.
    import keras

    info = json.loads((project / "deploy/model.json").read_text())
    model = keras.models.load_model(project / "deploy/model.keras", safe_mode=True)
    pixels = np.zeros((2, info["image_size"], info["image_size"], info["channels"]), dtype=np.float32)
    assert model.predict(pixels, verbose=0).shape == (2, len(info["class_names"]))

    # MLflow: one run per model, with the evaluation metrics and the gate's verdict.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classification")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["dvc.stage"] for r in runs) == ["train_custom", "train_resnet50"]
    for r in runs:
        assert {"train_accuracy", "validation_accuracy", "test_accuracy", "test_balanced_accuracy", "test_macro_f1",
                "gate_test_accuracy_low", "loss", "val_loss"} <= set(r.data.metrics)
        assert r.data.tags["gate.verdict"] == "deploy"
        assert len(r.data.tags["git.commit"]) == 40
        assert r.data.params["train_size"]
    champion = client.get_model_version_by_alias("image-classifier", "champion")
    assert str(champion.version) == "1"
    assert run(project, sys.executable, "-m", "pipeline.gate", "--check").returncode == 0

    # The README's predict command, on built-in digits, from deploy/.
    digits = project / "data/ingest/images"
    predicted = run(project, sys.executable, "-m", "pipeline.predict", str(digits / "3"), "data/ingest/images/7")
    lines = predicted.stdout.strip().splitlines()
    assert len(lines) == len(list((digits / "3").iterdir())) + len(list((digits / "7").iterdir()))
    path, label, probability = lines[0].split("\t")
    assert Path(path).exists() and label in info["class_names"] and 0.0 <= float(probability) <= 1.0

    # What ran is recorded: the precision and placement that "auto" chose, and the machine.
    for stage in ("train_custom", "train_resnet50"):
        summary = json.loads((project / f"metrics/{stage}.json").read_text())
        assert summary["precision"] in ("float32", "mixed_bfloat16", "mixed_float16")
        assert summary["distribution"] == "none" and summary["replicas"] == 1
        assert summary["machine"]["cpu"] and summary["machine"]["cpu_cores"] >= 1
        (logged,) = [r for r in runs if r.data.tags["dvc.stage"] == stage]
        assert logged.data.params["precision.policy"] == summary["precision"]
        assert logged.data.params["machine.cpu"] == summary["machine"]["cpu"]


def test_a_second_run_changes_nothing_and_a_stricter_gate_reruns_only_the_gate(
        reproduced_project_copy: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = reproduced_project_copy
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    second = run(project, "dvc", "repro")
    assert stages_run(second.stdout) == []

    # A stricter gate reruns only the gate: no training, nothing new deployed, registry untouched, and
    # deploy/ still holds the champion, byte for byte.
    deployed = {name: (project / "deploy" / name).read_bytes() for name in ("model.keras", "model.json")}
    params = read_params(project)
    params["gate"].update(min_train_score=1.0, min_test_score=1.0)
    write_params(project, params)
    third = run(project, "dvc", "repro")
    assert stages_run(third.stdout) == ["gate"]
    gate = json.loads((project / "metrics/gate.json").read_text())
    assert gate["deploy"] is False and gate["model"] is None
    assert gate["champion"]["outcome"] == "stays" and gate["champion"]["version"] == "1"
    assert {name: (project / "deploy" / name).read_bytes() for name in deployed} == deployed
    assert str(client.get_model_version_by_alias("image-classifier", "champion").version) == "1"
    assert len(client.search_model_versions("name='image-classifier'")) == 1
    refused = run(project, sys.executable, "-m", "pipeline.gate", "--check", check=False)
    assert refused.returncode == 1 and "NOT allowed" in refused.stderr
    assert "champion v1 stays" in refused.stderr


def test_a_worse_second_run_leaves_the_champion_where_it_was(reproduced_project_copy: Path) -> None:
    """The issue's check: retrain with a worse setting; the new model passes the (zero) thresholds
    but loses to the champion on the same test images, so the alias and deploy/ stay put."""
    from mlflow.tracking import MlflowClient

    project = reproduced_project_copy
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    first = json.loads((project / "metrics/gate.json").read_text())
    deployed = (project / "deploy/model.keras").read_bytes()
    params = read_params(project)
    params["train_custom"]["learning_rate"] = 1e-7        # it barely moves from its random start
    write_params(project, params)
    second = run(project, "dvc", "repro")
    assert stages_run(second.stdout) == ["train_custom", "evaluate", "gate"]
    gate = json.loads((project / "metrics/gate.json").read_text())
    champion = gate["champion"]
    assert champion["outcome"] == "stays", champion
    assert champion["score"] == pytest.approx(first["candidates"][first["model"]]["test_score"])
    assert champion["challenger_score"] < champion["score"]
    assert gate["deploy"] is False and (project / "deploy/model.keras").read_bytes() == deployed
    assert str(client.get_model_version_by_alias("image-classifier", "champion").version) == "1"
    summary = second.stdout + second.stderr
    assert "champion: challenger" in summary and "McNemar p = " in summary
    assert "deployed: no, champion v1 stays (deploy/ unchanged)" in summary


def test_misspelt_param_stops_repro_with_one_line(reproduced_project_copy: Path) -> None:
    # A copy: DVC removes a stage's outputs before running it, so the failed split leaves none.
    project = reproduced_project_copy
    params = read_params(project)
    params["split"]["ratio"] = params["split"].pop("ratios")
    write_params(project, params)
    result = run(project, "dvc", "repro", "split", check=False)
    assert result.returncode != 0
    assert "split.ratio: unknown key (did you mean 'ratios'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_champion_is_logged_from_code_not_as_a_pickle(project: Path) -> None:
    """MLflow rebuilds the serving model from pipeline/serving_model.py; no pickle to trust."""
    logged = [mlmodel for mlmodel in (project / "mlartifacts").rglob("MLmodel")
              if (mlmodel.parent / "serving_model.py").exists()]
    assert logged, "no serving model under mlartifacts/"
    for mlmodel in logged:
        flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
        assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
        assert not list(mlmodel.parent.rglob("*.pkl"))


def test_mlflow_serves_the_champion_over_http(project: Path) -> None:
    """``mlflow models serve`` answers real requests with real image bytes, a batch of 64 and a small
    load without an error; abuse gets a 4xx that says why, and the next good request is answered."""
    from bench.serving import image_request, load_test, post, served_champion
    from tests.hostile import zero_png

    image = sorted((project / "data/ingest/images/3").iterdir())[0].read_bytes()
    with served_champion(project, free_port()) as url:
        status, body = post(url, image_request([image]))
        assert status == 200, body
        (answer,) = body["predictions"]
        assert set(answer) == {"label", "probability", "probabilities"}
        assert answer["label"] in answer["probabilities"]
        assert abs(sum(answer["probabilities"].values()) - 1.0) < 1e-3

        status, body = post(url, json.dumps({"inputs": np.zeros((2, 32, 32, 1)).tolist()}).encode())
        assert status == 200 and len(body["predictions"]) == 2
        status, body = post(url, image_request([image] * 64))
        assert status == 200 and len(body["predictions"]) == 64

        # The bench row's load test, smaller: every request answered, none dropped.
        load = load_test(url, image_request([image]), clients=4, requests=40)
        assert load.errors == 0, load.first_error
        assert len(load.latencies) == 40

        truncated = image[: len(image) // 2] if image[:2] == b"\xff\xd8" else _truncated_jpeg()
        abuse = {
            "not an image": (image_request([b"hello"]), "not an image"),
            "50 MB": (image_request([os.urandom(50 * 2**20 * 3 // 4)]), "over the limit of 20 MB per image"),
            "30,000 x 30,000 bomb": (image_request([zero_png(30_000, 1)]), "too large: 30000x30000 pixels"),
            "truncated JPEG": (image_request([truncated]), "corrupt image"),
            "too many images": (image_request([image] * 300), "300 images in one request is over the limit"),
            "wrong pixel shape": (json.dumps({"inputs": np.zeros((1, 8, 8, 1)).tolist()}).encode(),
                                  "expected images of shape (n, 32, 32, 1)"),
            "wrong column": (json.dumps({"dataframe_records": [{"picture": "aGVsbG8="}]}).encode(),
                             "expected a column named 'image'"),
            "not the documented shape": (json.dumps({"images": ["aGVsbG8="]}).encode(), "dataframe_records"),
            "not JSON": (b"{not json", "JSON"),
        }
        for case, (request_body, message) in abuse.items():
            status, body = post(url, request_body)
            assert 400 <= status < 500, (case, status, str(body)[:300])
            assert message in body.get("message", ""), (case, str(body)[:300])
            # ... and the server still answers the next good request.
            status, body = post(url, image_request([image]))
            assert status == 200 and len(body["predictions"]) == 1, (case, status, str(body)[:300])


def _truncated_jpeg() -> bytes:
    from PIL import Image

    from tests.hostile import encode_image

    whole = encode_image(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                         "JPEG", quality=95)
    return whole[: len(whole) // 2]
