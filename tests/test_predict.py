"""``python -m pipeline.predict``: a line per image, a line per unreadable file, honest exit status."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.predict import expand_paths
from tests.stage_runner import run_stage


def test_folders_are_walked_in_sorted_order_without_hidden_entries(tmp_path: Path) -> None:
    for name in ["b/2.png", "b/1.png", "b/.hidden.png", "b/.cache/x.png", "b/sub/3.png", "a.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = expand_paths([str(tmp_path / "b"), str(tmp_path / "a.png")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["b/1.png", "b/2.png", "b/sub/3.png", "a.png"]
    with pytest.raises(PipelineError, match="nowhere.png: no such file or folder"):
        expand_paths([str(tmp_path / "nowhere.png")])


@pytest.mark.slow  # two real CLI runs, each loading TensorFlow
def test_predicts_good_images_and_reports_bad_ones(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                      keras.layers.Dense(2, activation="softmax")]).save(deploy / "model.keras")
    (deploy / "model.json").write_text(json.dumps({"class_names": ["cat", "dog"], "image_size": 8, "channels": 1}))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (30, 20), "red").save(photos / "a.jpg")
    Image.new("L", (8, 8), 200).save(photos / "b.png")
    (photos / "notes.txt").write_text("not an image")

    done = run_stage(tmp_path, "predict", "photos")
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert [(Path(path).name, label in ("cat", "dog"), 0.5 <= float(p) <= 1.0) for path, label, p in lines] == \
        [("a.jpg", True, True), ("b.png", True, True)]
    assert "photos/notes.txt\terror: not an image" in done.stderr
    assert "1 of 3 files could not be read as images" in done.stderr
    assert done.returncode == 2
    assert "Traceback" not in done.stderr

    assert run_stage(tmp_path, "predict", "photos/b.png").returncode == 0


def test_no_deployed_model_says_how_to_get_one(tmp_path: Path) -> None:
    done = run_stage(tmp_path, "predict", ".")
    assert done.returncode == 2
    assert "deploy/model.keras is missing: run the pipeline first (make repro)" in done.stderr
    assert "Traceback" not in done.stderr
