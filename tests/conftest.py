"""Fixtures: tiny real image folders made on the fly, and params built from the project's own file."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, classes: dict[str, int], size: int = 12, seed: int = 0,
                      formats: tuple[str, ...] = ("png", "jpg")) -> Path:
    """Write ``count`` distinct images per class: each class a different colour, noise on top.

    The classes are easy to tell apart, so a tiny model learns them in an epoch or two.
    """
    rng = np.random.default_rng(seed)
    for class_index, (label, count) in enumerate(sorted(classes.items())):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        base_colour = np.zeros(3)
        base_colour[class_index % 3] = 200
        for i in range(count):
            noise = rng.integers(0, 50, size=(size, size, 3))
            pixels = np.clip(base_colour + noise, 0, 255).astype(np.uint8)
            extension = formats[i % len(formats)]
            path = folder / f"{label}_{i:03d}.{extension}"
            Image.fromarray(pixels).save(path, quality=95) if extension == "jpg" else Image.fromarray(pixels).save(path)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of twelve small images each, PNG and JPEG mixed."""
    return make_image_folder(tmp_path / "images", {"circle": 12, "square": 12, "triangle": 12})


@pytest.fixture
def raw_params() -> dict:
    """The project's params.yaml as a dict, to copy and edit in a test."""
    return copy.deepcopy(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))


def tiny_params(raw: dict, source: str) -> dict:
    """Params for a seconds-long run: small images, one small block, one epoch."""
    raw = copy.deepcopy(raw)
    raw["ingest"]["source"] = source
    raw["train_custom"].update(blocks=[8], dense_units=[16], epochs=1, batch_size=16)
    raw["train_resnet50"].update(epochs=1, batch_size=16, weights=None)
    raw["gate"].update(min_train_accuracy=0.0, min_test_accuracy=0.0)
    return raw
