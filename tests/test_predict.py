"""``python -m pipeline.predict``: a line per image, a line per unreadable file, honest exit status."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import keras
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.predict import expand_paths, main
from tests.stage_runner import run_stage


def test_folders_are_walked_in_sorted_order_without_hidden_entries(tmp_path: Path) -> None:
    for name in ["b/2.png", "b/1.png", "b/.hidden.png", "b/.cache/x.png", "b/sub/3.png", "a.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = expand_paths([str(tmp_path / "b"), str(tmp_path / "a.png")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["b/1.png", "b/2.png", "b/sub/3.png", "a.png"]
    with pytest.raises(PipelineError, match="nowhere.png: no such file or folder"):
        expand_paths([str(tmp_path / "nowhere.png")])


def test_nothing_to_predict_is_an_error_not_a_silent_success(tmp_path: Path) -> None:
    (tmp_path / "empty" / ".cache").mkdir(parents=True)
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(PipelineError) as raised:
        expand_paths([str(tmp_path / "empty")])
    assert str(raised.value) == f"no files to predict in {tmp_path / 'empty'} (hidden files and folders are skipped)"


def test_an_empty_folder_on_the_command_line_exits_2_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "model.keras").write_bytes(b"")   # never loaded: the folder is checked first
    (tmp_path / "empty").mkdir()
    done = run_stage(tmp_path, "predict", "empty")
    assert done.returncode == 2
    assert "no files to predict in empty (hidden files and folders are skipped)" in done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr


def _deploy(folder: Path) -> Path:
    """A tiny deployed model: 8x8 grayscale in, two classes out."""
    folder.mkdir()
    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                      keras.layers.Dense(2, activation="softmax")]).save(folder / "model.keras")
    (folder / "model.json").write_text(json.dumps({"class_names": ["cat", "dog"], "image_size": 8, "channels": 1}))
    return folder


def test_a_name_that_is_not_utf8_is_printed_escaped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """capsys's streams are strict UTF-8, as stdout is under PYTHONIOENCODING=utf-8."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("L", (8, 8), 200).save(photos / os.fsdecode(b"caf\xe9.png"), format="PNG")
    (photos / os.fsdecode(b"not\xff.jpg")).write_text("not an image")

    with pytest.raises(PipelineError, match="1 of 2 files could not be read as images"):
        main(argparse.Namespace(paths=[str(photos)], model_dir=str(_deploy(tmp_path / "deploy"))))
    out, err = capsys.readouterr()
    assert out.startswith(f"{photos}/caf\\xe9.png\t")
    assert f"{photos}/not\\xff.jpg\terror: not an image" in err


def test_the_deployed_pixel_limit_holds_for_prediction(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The limit is ingest.max_image_pixels as the gate deployed it, not Pillow's default: images the
    model was allowed to train on are allowed to it, and a lowered limit refuses what it refused."""
    deploy = _deploy(tmp_path / "deploy")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("L", (20, 10), 200).save(photos / "wide.png")      # 200 pixels
    args = argparse.Namespace(paths=[str(photos)], model_dir=str(deploy))
    main(args)                                                   # a model.json from before the limit was kept
    assert capsys.readouterr().out.startswith(f"{photos}/wide.png\t")
    info = json.loads((deploy / "model.json").read_text())
    (deploy / "model.json").write_text(json.dumps({**info, "max_image_pixels": 199}))
    with pytest.raises(PipelineError, match="1 of 1 files could not be read as images"):
        main(args)
    assert "wide.png\terror: too large: 20x10 pixels is over the limit of 199" in capsys.readouterr().err
    (deploy / "model.json").write_text(json.dumps({**info, "max_image_pixels": 200}))
    main(args)


@pytest.mark.slow  # two real CLI runs, each loading TensorFlow
def test_predicts_good_images_and_reports_bad_ones(tmp_path: Path) -> None:
    _deploy(tmp_path / "deploy")
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
