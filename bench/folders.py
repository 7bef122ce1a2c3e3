"""Photo folders of other shapes, built from a two-class photo folder, for trying the photo presets.

- ``unbalanced``: the same classes with one of them cut to ``keep`` of its photos (0.6: 40 % fewer),
  chosen at random with a seed: the folder for ``class_weight: balanced`` and ``balanced_accuracy``.
- ``fewer``: every class cut to ``keep`` of its photos, chosen at random with a seed, each smaller
  share a part of every larger one: the points of a learning curve (how the accuracy grows with
  the number of photos).
- ``five-classes``: five classes from two, each photo used once, the three new ones told apart by
  a property anyone can see: ``<a>`` and ``<b>`` as they are, ``<a>_grey`` and ``<b>_grey`` in
  greyscale, and ``upside_down`` (photos of both turned half a turn). Telling ``<a>`` from ``<b>``
  stays the hard part, as in the two-class folder.

The source folder is only read; the new folder is written where asked (keep it out of the
repository: the photos are not ours to copy). Run, for example::

    python -m bench.folders unbalanced --source ../shared/data/catsdogs-small/train --out /tmp/unbalanced
    python -m bench.folders five-classes --source ../shared/data/catsdogs-small/train --out /tmp/five
    python -m bench.folders fewer --keep 0.5 --source ../shared/data/catsdogs-small/train --out /tmp/half
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

FIVE_CLASS_SHARE = 0.4   # of each source class: as it is, and the same again in greyscale; the rest upside down


def class_photos(source: Path) -> dict[str, list[Path]]:
    """The photos of each class subfolder of ``source``, sorted by name; two classes at least."""
    classes = {folder.name: sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
               for folder in sorted(Path(source).iterdir()) if folder.is_dir() and not folder.name.startswith(".")}
    classes = {label: photos for label, photos in classes.items() if photos}
    if len(classes) < 2:
        raise SystemExit(f"{source}: expected at least two class subfolders with photos")
    return classes


def unbalanced(source: Path, out: Path, keep: float = 0.6, smaller: str | None = None, seed: int = 0) -> dict[str, int]:
    """Copy ``source`` to ``out`` with class ``smaller`` (default: the first) cut to ``keep`` of its photos."""
    classes = class_photos(source)
    smaller = smaller or next(iter(classes))
    if smaller not in classes:
        raise SystemExit(f"{source}: no class '{smaller}' (classes: {', '.join(classes)})")
    chosen = {label: sorted(random.Random(seed).sample(photos, round(len(photos) * keep))) if label == smaller
              else photos for label, photos in classes.items()}
    return _copy(chosen, out)


def fewer(source: Path, out: Path, keep: float = 0.5, seed: int = 0) -> dict[str, int]:
    """Copy ``keep`` of each class of ``source`` to ``out``: the first photos of the class in an order
    shuffled with ``seed``, so with one seed a smaller share is a part of every larger one."""
    chosen = {}
    for label, photos in class_photos(source).items():
        order = list(photos)
        random.Random(seed).shuffle(order)
        chosen[label] = sorted(order[:round(len(photos) * keep)])
    return _copy(chosen, out)


def _copy(chosen: dict[str, list[Path]], out: Path) -> dict[str, int]:
    """Copy each class's chosen photos, byte for byte, into its subfolder of ``out``; the counts."""
    for label, photos in chosen.items():
        (out / label).mkdir(parents=True, exist_ok=True)
        for photo in photos:
            shutil.copyfile(photo, out / label / photo.name)
    return {label: len(photos) for label, photos in chosen.items()}


def five_classes(source: Path, out: Path, seed: int = 0) -> dict[str, int]:
    """Write five classes made from the first two of ``source`` to ``out`` (see the module's docstring)."""
    first, second = list(class_photos(source).items())[:2]
    counts: dict[str, int] = {}
    for label, photos in (first, second):
        photos = list(photos)
        random.Random(seed).shuffle(photos)
        share = int(len(photos) * FIVE_CLASS_SHARE)
        groups = {label: (photos[:share], None), f"{label}_grey": (photos[share:2 * share], _greyscale),
                  "upside_down": (photos[2 * share:], _upside_down)}
        for new_label, (chosen, change) in groups.items():
            folder = out / new_label
            folder.mkdir(parents=True, exist_ok=True)
            for photo in chosen:
                target = folder / f"{label}_{photo.stem}.png" if change else folder / photo.name
                if change is None:
                    shutil.copyfile(photo, target)
                else:
                    with Image.open(photo) as image:
                        change(image.convert("RGB")).save(target)
            counts[new_label] = counts.get(new_label, 0) + len(chosen)
    return counts


def _greyscale(image: Image.Image) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


def _upside_down(image: Image.Image) -> Image.Image:
    return image.rotate(180)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.folders", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["unbalanced", "fewer", "five-classes"])
    parser.add_argument("--source", type=Path, required=True, help="a folder with one subfolder per class")
    parser.add_argument("--out", type=Path, required=True, help="the new folder (must not exist yet)")
    parser.add_argument("--keep", type=float, help="share kept: of the smaller class for unbalanced (default 0.6), "
                                                   "of every class for fewer (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists already; name a new folder")
    if args.keep is not None and not 0 < args.keep <= 1:
        parser.error(f"--keep {args.keep}: a share of the photos, above 0 and at most 1")
    if args.kind == "unbalanced":
        counts = unbalanced(args.source, args.out, 0.6 if args.keep is None else args.keep, seed=args.seed)
    elif args.kind == "fewer":
        counts = fewer(args.source, args.out, 0.5 if args.keep is None else args.keep, seed=args.seed)
    else:
        counts = five_classes(args.source, args.out, args.seed)
    print(", ".join(f"{label}: {count}" for label, count in counts.items()), f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
