"""The whole pipeline through the real ``dvc repro``, in a temporary copy of the repository.

Tiny params (10 digits per class, one epoch, ResNet50 from scratch at 32x32) keep it to a
minute or two. The session's one reproduced project (``reproduced_project``) is checked as a first
run leaves it; a private copy of it then walks on: a second run changes nothing, and a stricter
gate reruns only the gate and deploys nothing. (A worse retrained model, which must leave the
champion where it was, is the recovery run of ``tests/test_faults.py``: one training repro for both.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.project import STAGES, free_port, read_params, run, stages_run, write_params
from tests.conftest import ReproducedProject
from tests.gate_verdicts import check_verdicts

pytestmark = pytest.mark.slow


@pytest.fixture
def project(reproduced_project: ReproducedProject) -> Path:
    return reproduced_project.root


def test_dvc_repro_end_to_end(reproduced_project: ReproducedProject) -> None:
    project = reproduced_project.root
    assert stages_run(reproduced_project.output) == list(STAGES)

    gate = json.loads((project / "metrics/gate.json").read_text())
    assert set(gate["candidates"]) == {"custom", "resnet50"}
    # Each verdict follows from the model's answers and params.yaml's thresholds (the tiny project's are
    # 0: both pass, and with no champion yet the better one deploys); --check exits as gate.json says.
    check_verdicts(project, gate)
    assert gate["deploy"] is True and gate["model"] in ("custom", "resnet50")
    for candidate in gate["candidates"].values():
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

    # MLflow: one run per model, with the evaluation metrics and the gate's verdict, under one parent run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classification")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's runs table
    everything = client.search_runs([experiment.experiment_id])
    runs = [r for r in everything if "dvc.stage" in r.data.tags]
    assert sorted(r.data.tags["dvc.stage"] for r in runs) == ["train_custom", "train_resnet50"]
    check_parent_run(client, everything, gate)
    check_shared_param_names(runs)
    check_dataset_inputs(runs, project)
    for r in runs:
        assert {"train_accuracy", "validation_accuracy", "test_accuracy", "test_balanced_accuracy", "test_macro_f1",
                "gate_test_accuracy_low", "loss", "val_loss"} <= set(r.data.metrics)
        assert r.data.tags["gate.verdict"] == gate["candidates"][r.data.tags["dvc.stage"].removeprefix("train_")][
            "verdict"]
        assert len(r.data.tags["git.commit"]) == 40
        assert r.data.params["train_size"]
    champion = client.get_model_version_by_alias("image-classifier", "champion")
    assert str(champion.version) == "1"

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
        assert json.loads((project / f"models/{stage.removeprefix('train_')}/run.json").read_text())[
            "parent_run_id"] == logged.data.tags["mlflow.parentRunId"]
        assert logged.data.params["precision.policy"] == summary["precision"]
        assert logged.data.params["machine.cpu"] == summary["machine"]["cpu"]
        # The tiny project pins jit_compile to false; the vector extensions in use are named.
        assert summary["jit_compile"] is False and logged.data.params["jit_compile.in_effect"] == "False"
        assert summary["machine"]["isa_in_use"] in ("other", "avx2", "avx512", "avx512_bf16", "amx")
        assert logged.data.params["machine.isa_in_use"] == summary["machine"]["isa_in_use"]
        assert logged.data.params["machine.onednn"] == str(summary["machine"]["onednn"])

    check_calibration_and_gradcam(project, runs, gate)


def check_calibration_and_gradcam(project: Path, runs: list, gate: dict) -> None:
    """Each model's ECE and Brier score in evaluate.json and its run; its Grad-CAM picture and reliability
    diagram as DVC plots and MLflow figures; the temperature the tiny project's ResNet50 was given (and
    not the custom CNN) carried from training to evaluate, with the test figures without it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    scores = json.loads((project / "metrics/evaluate.json").read_text())
    for r in runs:
        name = r.data.tags["dvc.stage"].removeprefix("train_")
        test = scores[name]["test"]
        assert 0.0 <= test["ece"] <= 1.0 and 0.0 <= test["brier"] <= 1.0
        assert r.data.metrics["test_ece"] == pytest.approx(test["ece"])
        assert {"plots/gradcam_test.png", "plots/reliability_test.png"} <= {
            a.path for a in client.list_artifacts(r.info.run_id, "plots")}
        for picture in (f"gradcam_{name}", f"reliability_{name}"):
            assert (project / f"metrics/plots/{picture}.png").read_bytes().startswith(b"\x89PNG")
        temperature = json.loads((project / f"models/{name}/run.json").read_text())["temperature"]
        assert json.loads((project / f"metrics/train_{name}.json").read_text())["temperature"] == temperature
        assert scores[name]["temperature"] == temperature == r.data.metrics["temperature"]
        # The gate read them (its summary says them, one line per model).
        assert gate["candidates"][name]["calibration"] == {"ece": test["ece"], "brier": test["brier"],
                                                           "temperature": temperature,
                                                           "gradcam": f"metrics/plots/gradcam_{name}.png"}
    assert scores["custom"]["temperature"] == 1.0 and "test_without_temperature" not in scores["custom"]
    assert scores["resnet50"]["temperature"] != 1.0
    assert 0.0 <= scores["resnet50"]["test_without_temperature"]["ece"] <= 1.0


# The hyperparameters both models have, under one name in both runs (MLflow's compare view lines them up).
SHARED_PARAMS = {"model", "epochs", "batch_size", "learning_rate", "lr_schedule", "optimizer", "momentum", "loss",
                 "label_smoothing", "class_weight", "patience", "start_from_epoch", "dense_units", "dropout",
                 "precision", "jit_compile", "weight_decay", "ema", "image_size", "channels", "seed", "deterministic",
                 "distribution", "split.ratios", "augment.rotation", "augment.flip_average", "train_size",
                 "iterations_per_epoch", "classes", "precision.policy"}
OWN_PARAMS = {"train_custom": {"blocks", "batch_norm", "residual", "separable", "pooling"},
              "train_resnet50": {"weights", "fine_tune_layers", "fine_tune_epochs", "fine_tune_learning_rate"}}


def check_parent_run(client, runs: list, gate: dict) -> None:
    """One parent run for the repro: both training runs its children, the gate's decision on it, closed."""
    (parent,) = [r for r in runs if "pipeline.key" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["dvc.stage"] for r in children) == ["train_custom", "train_resnet50"]
    assert parent.info.run_name.startswith("repro@") and parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["gate.deploy"] == "true" and tags["gate.model"] == gate["model"]
    assert tags["gate.verdict.custom"] == gate["candidates"]["custom"]["verdict"]
    assert tags["gate.verdict.resnet50"] == gate["candidates"]["resnet50"]["verdict"]
    assert {tags["run.custom"], tags["run.resnet50"]} == {r.info.run_id for r in children}
    assert parent.data.metrics["custom.test_accuracy"] == gate["candidates"]["custom"]["test_score"]
    import mlflow

    logged = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/metrics/gate.json")
    assert logged == gate


def check_shared_param_names(runs: list) -> None:
    params = {r.data.tags["dvc.stage"]: set(r.data.params) for r in runs}
    custom, resnet50 = params["train_custom"], params["train_resnet50"]
    assert SHARED_PARAMS <= custom and SHARED_PARAMS <= resnet50
    assert custom - resnet50 == OWN_PARAMS["train_custom"]
    assert resnet50 - custom == OWN_PARAMS["train_resnet50"]
    assert not [key for key in custom | resnet50 if key.startswith(("train_custom.", "train_resnet50.", "base."))]
    assert {r.data.params["model"] for r in runs} == {"custom", "resnet50"}


def check_dataset_inputs(runs: list, project: Path) -> None:
    """Each training run lists the three splits as MLflow datasets: source, digest, schema, class counts."""
    import pandas as pd

    split = pd.read_csv(project / "data/split.csv", dtype=str)
    for r in runs:
        inputs = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i for i in r.inputs.dataset_inputs}
        assert set(inputs) == {"train", "validation", "test"}
        digests = set()
        for context, logged in inputs.items():
            tags = {t.key: t.value for t in logged.tags}
            rows = split[split["split"] == context]
            assert logged.dataset.name == "sklearn:digits"
            assert json.loads(logged.dataset.source)["uri"] == "data/ingest/images"
            assert "label" in logged.dataset.schema and json.loads(logged.dataset.profile)["num_rows"] == len(rows)
            assert tags["manifest.sha256"] == r.data.tags["data.manifest_sha256"]
            assert tags["split.ratios"] == "[0.8, 0.1, 0.1]" and tags["images"] == str(len(rows))
            counts = rows["label"].value_counts()
            assert {key.removeprefix("class."): int(v) for key, v in tags.items() if key.startswith("class.")} == \
                {label: int(counts.get(label, 0)) for label in sorted(split["label"].unique())}
            digests.add(logged.dataset.digest)
        assert len(digests) == 3


def test_a_second_run_changes_nothing_and_a_stricter_gate_reruns_only_it(
        reproduced_project_copy: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = reproduced_project_copy
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    reproduced_first_gate = (project / "metrics/gate.json").read_text()
    # Nothing to train again: only the gate decides again (the registry is outside DVC), finds this
    # same model as the champion, rewrites nothing and tells CI there is nothing new to deploy.
    deployed_first = {path.name: path.stat().st_mtime_ns for path in (project / "deploy").iterdir()}
    second = run(project, "dvc", "repro")
    assert stages_run(second.stdout) == ["gate"]
    gate = json.loads((project / "metrics/gate.json").read_text())
    assert gate["champion"]["outcome"] == "same model" and gate["deploy"] is False
    assert {path.name: path.stat().st_mtime_ns for path in (project / "deploy").iterdir()} == deployed_first
    assert run(project, sys.executable, "-m", "pipeline.gate", "--check", check=False).returncode == 1

    # A stricter gate reruns only the gate: no training, nothing new deployed, registry untouched, and
    # deploy/ still holds the champion, byte for byte. Its thresholds come from the first run's scores,
    # so each model lands on a known side: the best train score clears min_train_score exactly (a bound
    # is met at equality), the others are underfit, and the test scores of those that clear it miss
    # min_test_score by half an image at least (overfit).
    first_gate = json.loads(reproduced_first_gate)
    first = first_gate["candidates"]
    min_train = max(candidate["train_score"] for candidate in first.values())
    strongest = [model for model, candidate in first.items() if candidate["train_score"] == min_train]
    test_images = len(pd.read_csv(project / f"data/predictions/{strongest[0]}.csv").query("split == 'test'"))
    min_test = max(first[model]["test_score"] for model in strongest) + 0.5 / test_images
    deployed = {name: (project / "deploy" / name).read_bytes() for name in ("model.keras", "model.json")}
    params = read_params(project)
    params["gate"].update(min_train_score=min_train, min_test_score=min_test)
    write_params(project, params)
    third = run(project, "dvc", "repro")
    assert stages_run(third.stdout) == ["gate"]
    gate = json.loads((project / "metrics/gate.json").read_text())
    check_verdicts(project, gate)
    assert gate["thresholds"]["min_train_score"] == min_train
    assert {model: candidate["verdict"] for model, candidate in gate["candidates"].items()} == {
        model: "overfit" if model in strongest else "underfit" for model in first}
    assert gate["deploy"] is False and gate["model"] is None
    assert gate["champion"]["outcome"] == "stays" and gate["champion"]["version"] == "1"
    assert {name: (project / "deploy" / name).read_bytes() for name in deployed} == deployed
    assert str(client.get_model_version_by_alias("image-classifier", "champion").version) == "1"
    assert len(client.search_model_versions("name='image-classifier'")) == 1
    # The gate alone records its new decision on the parent of the models it judged: no new parent.
    experiment = client.get_experiment_by_name("image-classification")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.key` != ''")
    assert parent.data.tags["gate.deploy"] == "false" and parent.data.tags["gate.model"] == "none"
    assert parent.data.tags["gate.verdict.custom"] == gate["candidates"]["custom"]["verdict"]
    assert parent.data.tags["gate.verdict.resnet50"] == gate["candidates"]["resnet50"]["verdict"]
    refused = run(project, sys.executable, "-m", "pipeline.gate", "--check", check=False)
    assert refused.returncode == 1 and "NOT allowed" in refused.stderr
    assert "champion v1 stays" in refused.stderr


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
