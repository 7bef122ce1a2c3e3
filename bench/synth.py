"""Generated benchmark data, cached outside the repository so repeats do not regenerate it.

- :func:`jpeg_folder`: JPEGs in two classes (``cat``, ``dog``), each side 350-500 px like the
  PetImages photos, made from smooth colour fields, a gradient and some grain, about 30 KiB each
  (JPEG quality 85). File ``i`` is the same bytes in every run; a folder of ``n`` files holds hard
  links to the first ``n`` files of one pool, so the 5,000 and the 25,000 folders share their files.
- :func:`digits_folder`: scikit-learn's 1,797 digits as the 8x8 PNGs the ingest stage writes.
"""

from __future__ import annotations

import io
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import cache_dir

JPEG_VERSION = "jpegs-v1"          # bump when the generator changes, so old caches are not reused
CLASSES = ("cat", "dog")
SIDE_RANGE = (350, 500)
GRAIN = 12
QUALITY = 85


def jpeg_bytes(index: int) -> tuple[str, bytes]:
    """The class and the JPEG bytes of generated file ``index`` (deterministic)."""
    from PIL import Image

    rng = np.random.default_rng([20_260_527, index])
    width, height = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, 2))
    label = CLASSES[index % 2]
    cells = int(rng.integers(3, 9))
    low = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    angle = rng.uniform(0, 2 * np.pi)
    gx = np.linspace(-40, 40, width, dtype=np.float32)[None, :] * np.cos(angle)
    gy = np.linspace(-40, 40, height, dtype=np.float32)[:, None] * np.sin(angle)
    tint = np.array([18, 0, -18] if label == "cat" else [-18, 0, 18], dtype=np.int16)
    grain = rng.integers(-GRAIN, GRAIN + 1, (height, width, 3), dtype=np.int16)
    pixels = field + (gx + gy).astype(np.int16)[:, :, None] + tint + grain
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=QUALITY)
    return label, buffer.getvalue()


def _pool_name(index: int) -> str:
    return f"{CLASSES[index % 2]}/img_{index:06d}.jpg"


def _write_range(pool: Path, start: int, stop: int) -> int:
    written = 0
    for index in range(start, stop):
        target = pool / _pool_name(index)
        if target.exists():
            continue
        _, data = jpeg_bytes(index)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, target)
        written += 1
    return written


def jpeg_folder(count: int, workers: int | None = None) -> Path:
    """A folder ``<cache>/jpegs-v1/n<count>/{cat,dog}/`` with ``count`` generated JPEGs."""
    root = cache_dir() / JPEG_VERSION
    view = root / f"n{count}"
    stamp = root / f".n{count}.complete"
    if stamp.exists() and view.is_dir():
        return view
    pool = root / "pool"
    for label in CLASSES:
        (pool / label).mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    step = 250
    ranges = [(start, min(count, start + step)) for start in range(0, count, step)]
    if workers > 1 and count > step:
        with ProcessPoolExecutor(max_workers=workers) as executor:
            list(executor.map(_write_range, [pool] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges]))
    else:
        for start, stop in ranges:
            _write_range(pool, start, stop)
    if view.exists():
        shutil.rmtree(view)
    for label in CLASSES:
        (view / label).mkdir(parents=True)
    for index in range(count):
        name = _pool_name(index)
        try:
            os.link(pool / name, view / name)
        except OSError:
            shutil.copy2(pool / name, view / name)
    stamp.write_text(f"{count}\n")
    return view


def folder_files(root: Path) -> list[Path]:
    """Every file of a class-per-folder tree, sorted (the files ingest will see)."""
    return sorted(p for label in sorted(os.listdir(root)) for p in (root / label).iterdir() if p.is_file())


def digits_folder() -> Path:
    """``<cache>/digits-v1/{0..9}/NNNN.png``: the built-in digits exactly as ingest exports them."""
    root = cache_dir() / "digits-v1"
    stamp = cache_dir() / ".digits-v1.complete"
    if stamp.exists() and root.is_dir():
        return root
    from pipeline.ingest import export_digits

    if root.exists():
        shutil.rmtree(root)
    export_digits(root)
    stamp.write_text("1797\n")
    return root


def labelled_files(root: Path, limit: int | None = None, seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """``(paths, label indices, class names)`` of a class-per-folder tree; ``limit`` takes a seeded,
    stratified-enough sample (a shuffled order, then the first ``limit``)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    pairs = [(str(path), index) for index, label in enumerate(classes) for path in sorted((root / label).iterdir())]
    if limit is not None and limit < len(pairs):
        order = np.random.default_rng(seed).permutation(len(pairs))[:limit]
        pairs = [pairs[i] for i in sorted(order)]
    return [p for p, _ in pairs], [i for _, i in pairs], classes
