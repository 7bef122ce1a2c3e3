"""Which images a model learned from, and how many of today's test images are among them.

A training run records the SHA-256 of the content of its train and validation images (sorted, one
per line, the artifact :data:`SEEN_IMAGES_ARTIFACT`); content hashes survive renames and moves. The
gate reads that record back for the champion: a champion that learned from some of today's test
images would be scored on what it has seen, so it cannot be compared fairly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SEEN_IMAGES_ARTIFACT = "lineage/seen_images.txt"
SEEN_SPLITS = ("train", "validation")


def seen_images_text(hashes: Iterable[str]) -> str:
    """The artifact's text: each distinct hash once, sorted, one per line."""
    return "".join(f"{digest}\n" for digest in sorted(set(hashes)))


def read_seen_images(text: str) -> set[str]:
    """The hashes in the artifact's text (blank lines and surrounding spaces ignored)."""
    return {line.strip() for line in text.splitlines() if line.strip()}


def hashes_of(paths: Iterable[str], sha256_by_path: Mapping[str, str]) -> list[str]:
    """The content hash of each image (today's test images), in order.

    Raises KeyError naming a path the manifest does not know (predictions and manifest disagree).
    """
    return [sha256_by_path[path] for path in paths]


def overlap(seen: set[str], test_hashes: list[str]) -> int:
    """How many of the test images (counted one by one, copies included) are among the seen ones."""
    return sum(1 for digest in test_hashes if digest in seen)
