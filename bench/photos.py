"""Row 6, photos: ``dvc repro`` end to end on real cat and dog photos.

``ingest.source`` points at the absolute path of the photo folder (the photos are never copied
into the repository or the project copy); ``base.image_size`` 64, ``channels`` 3,
``train_resnet50.weights: null`` (no network), a few epochs. Reported: per-stage times, the total,
and the test accuracy each model reaches (with the gate's verdict). The reference of the ratio is
the 4-minute budget of row 5. Skipped, with a note, when the folder is absent.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from bench.common import Line, RowResult
from bench.end_to_end import real_params, reproduce, stage_lines, verdict_lines
from pipeline.model_table import MODEL_NAMES

SETTINGS = {
    "full": {"max_per_class": None, "epochs": 5},
    "quick": {"max_per_class": 100, "epochs": 2},
}
IMAGE_SIZE = 64


def photo_folder() -> Path | None:
    """The photo folder the photo rows use: ``--photos`` or ``$BENCH_PHOTOS`` (None when neither is set)."""
    named = os.environ.get("BENCH_PHOTOS")
    return Path(named) if named else None


def run(mode: str) -> RowResult:
    photos = photo_folder()
    row = RowResult("photos", f"dvc repro on real photos ({photos or 'no folder given'})")
    if mode == "tiny":
        row.status = "skipped"
        row.notes.append("skipped: --tiny (a dvc repro on photos takes minutes; run --quick or the full suite)")
        return row
    if photos is None or not photos.is_dir():
        row.status = "skipped"
        row.notes.append(f"skipped: {'no photo folder given' if photos is None else f'{photos} is absent'} "
                         "(python -m bench --photos DIR, or BENCH_PHOTOS=DIR: a folder with one subfolder per class)")
        return row
    settings = SETTINGS[mode]
    params = copy.deepcopy(real_params())
    params["base"].update(image_size=IMAGE_SIZE, channels=3)
    params["ingest"].update(source=str(photos.resolve()), max_per_class=settings["max_per_class"])
    params["train_custom"]["epochs"] = settings["epochs"]
    params["train_resnet50"].update(epochs=settings["epochs"], weights=None, fine_tune_layers=0, fine_tune_epochs=0)
    result = reproduce(params)
    stage_lines(result, row, judged=False, unjudged="(reported)")
    verdict_lines(result, row, judged=False, unjudged="(reported)")
    for name in MODEL_NAMES:
        scores = result["evaluate"][name]
        row.lines.append(Line(f"{name} test accuracy", f"{scores['test']['accuracy']:.3f}",
                              f"train {scores['train']['accuracy']:.3f}, val {scores['validation']['accuracy']:.3f}",
                              None, "-", None, {"accuracy": {s: scores[s]["accuracy"] for s in scores}}))
    per_class = "all" if settings["max_per_class"] is None else f"{settings['max_per_class']} per class"
    row.notes.append(f"photos: {result['ingest']['accepted']} accepted ({per_class}), {IMAGE_SIZE}x{IMAGE_SIZE}x3, "
                     f"{settings['epochs']} epochs per model (early stopping on), ResNet50 from scratch "
                     "(weights null), the real params otherwise; no target beyond reporting")
    row.data = {key: value for key, value in result.items() if key != "params"}
    row.data["params"] = result["params"]
    return row
