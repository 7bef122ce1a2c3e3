"""``python -m pipeline.predict PATH...``: label and probability for images or folders of images.

Uses the deployed model in ``deploy/`` by default and the same decode rules as training. Files
that are not usable images are reported on stderr, one line each, after which the others are
still predicted; the exit status is then 2, as for any other user error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline import cli
from pipeline.artifacts import DEPLOY_INFO_FILE, MODEL_FILE, DeployedModel
from pipeline.errors import PipelineError
from pipeline.files import printable
from pipeline.images import ImageRejected, load_pixels
from pipeline.serving import classify, decoder_pool

log = logging.getLogger("pipeline.predict")


def expand_paths(paths: Iterable[str]) -> list[Path]:
    """Files as given; folders walked recursively in sorted order, hidden entries skipped.

    Raises ``PipelineError`` when there is no file at all: an empty answer would look like success.
    """
    paths = list(paths)
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        elif path.exists():
            files.append(path)
        else:
            raise PipelineError(f"{printable(raw)}: no such file or folder")
    if not files:
        raise PipelineError(f"no files to predict in {', '.join(map(printable, paths))} "
                            "(hidden files and folders are skipped)")
    return files


def main(args: argparse.Namespace) -> None:
    model_dir = Path(args.model_dir)
    if not (model_dir / MODEL_FILE).exists():
        raise PipelineError(f"{model_dir / MODEL_FILE} is missing: run the pipeline first (make repro); "
                            "the gate deploys a model only when one passes both thresholds")
    files = expand_paths(args.paths)
    import keras  # TensorFlow takes seconds to load: only once there is something to predict

    info = DeployedModel.read(model_dir / DEPLOY_INFO_FILE)
    model = keras.models.load_model(model_dir / MODEL_FILE, safe_mode=True)

    def decoded(path: Path) -> np.ndarray | ImageRejected:
        try:
            return load_pixels(path, info.image_size, info.channels, info.max_image_pixels)
        except ImageRejected as rejected:
            return rejected

    good, pixels, failed = [], [], 0
    for path, result in zip(files, decoder_pool().map(decoded, files)):   # on every core, in order
        if isinstance(result, ImageRejected):
            print(f"{printable(path)}\terror: {result.reason}", file=sys.stderr)
            failed += 1
        else:
            pixels.append(result)
            good.append(path)
    batch = np.stack(pixels) if pixels else np.zeros((0, info.image_size, info.image_size, info.channels))
    for path, prediction in zip(good, classify(model, batch, info)):
        print(f"{printable(path)}\t{prediction.label}\t{prediction.probability:.4f}")
    if failed:
        raise PipelineError(f"{failed} of {len(files)} files could not be read as images")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="image files or folders")
    parser.add_argument("--model-dir", default="deploy", help="folder with model.keras and model.json")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    cli.main_entry("predict", main, parser)
