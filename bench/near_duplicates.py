"""Row 8, near duplicates: precision and recall of near-copy grouping, how far copies of a photo land
from it, and how the pair search scales.

Precision and recall (what ``ingest.near_duplicate_distance`` and ``near_duplicate_similarity`` are
chosen from): a labelled benchmark built on the spot from a photo folder (``--photos DIR`` /
``$BENCH_PHOTOS``, catsdogs-small): every photo, and of each its true copies
(:data:`COPY_KINDS`: re-encoded JPEG at four qualities, resized, cropped by 2-10 %, brighter,
darker, more and less contrast, rotated by 2 and 3 degrees), and look-alikes: the photos mirrored
and upside down (distinct pictures of their own), so that there are more pairs of different
pictures within a few bits. Every pair of different photos whose hashes are within 14 bits is a
distinct pair. Each setting groups all of them as ingest does (:func:`pipeline.near_duplicates.near_pairs`,
:func:`~pipeline.near_duplicates.group_rows`); measured: precision (the share of linked pairs that
are copies of one photo), recall (the share of copies grouped with their photo) and how many
distinct pairs within 12 bits end up in one group.

Threshold study (what ``ingest.near_duplicate_distance`` is chosen from): every photo of a folder
(``--photos DIR`` / ``$BENCH_PHOTOS``, one subfolder per class) and, always, 24 distinct crops of
scikit-learn's two sample photographs, each copied four ways (JPEG quality 50, resized to 90 %, 5 %
cropped off the edges, brightened by 15 %); measured: the bits between each copy's perceptual hash
and its original's, against the bits from each photo to the nearest other photo of its class, and
of any class (distinct pictures: a threshold at or above those distances makes false matches,
and across classes a false match leaves both photos out).

Scaling: :func:`pipeline.near_duplicates.hamming_pairs` on 10,000, 100,000 and 1,000,000 random
64-bit hashes, 1 % of them planted copies of another a few bits away, against checking all pairs
(measured at the smallest size, extrapolated as n^2 above it). Time, and peak memory of the
search (tracemalloc, which counts NumPy's arrays); beside it, the time the confirmation (SSIM of
16x16 thumbnails) takes on as many pairs as the search found.
"""

from __future__ import annotations

import io
import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from bench.common import Line, RowResult, fmt_bytes

SIZES = {"full": (10_000, 100_000, 1_000_000), "quick": (10_000, 100_000), "tiny": (2_000, 10_000)}
PLANTED_SHARE = 0.01
STUDY_BITS = range(0, 21, 2)   # 64-bit phashes have 32 bits set (median split), so distances are even


def _reload(image: Image.Image, quality: int = 95) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return decoded


def jpeg_50(image: Image.Image) -> Image.Image:
    """Re-saved at JPEG quality 50."""
    return _reload(image, 50)


def resized_90(image: Image.Image) -> Image.Image:
    """Resized to 90 % of each side."""
    size = (round(image.width * 0.9), round(image.height * 0.9))
    return _reload(image.resize(size, Image.Resampling.LANCZOS))


def cropped_5(image: Image.Image) -> Image.Image:
    """5 % of the width and height cut off, half on each side."""
    dx, dy = round(image.width * 0.025), round(image.height * 0.025)
    return _reload(image.crop((dx, dy, image.width - dx, image.height - dy)))


def brightened_15(image: Image.Image) -> Image.Image:
    """15 % brighter."""
    return _reload(ImageEnhance.Brightness(image).enhance(1.15))


NEAR_COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg q50": jpeg_50, "resize 90%": resized_90, "crop 5%": cropped_5, "brightness +15%": brightened_15}


def _resized(image: Image.Image, share: float) -> Image.Image:
    size = (max(1, round(image.width * share)), max(1, round(image.height * share)))
    return _reload(image.resize(size, Image.Resampling.LANCZOS))


def _cropped(image: Image.Image, share: float) -> Image.Image:
    """``share`` of the width and height cut off, half on each side."""
    dx, dy = round(image.width * share / 2), round(image.height * share / 2)
    return _reload(image.crop((dx, dy, image.width - dx, image.height - dy)))


def _rotated(image: Image.Image, degrees: float) -> Image.Image:
    """Turned about its centre, the same size, the corners left black (a straightened photo)."""
    return _reload(image.convert("RGB").rotate(degrees, resample=Image.Resampling.BICUBIC))


# The labelled benchmark's true copies: each makes, from a photo, another file of the same picture.
COPY_KINDS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg q30": lambda image: _reload(image, 30), "jpeg q50": jpeg_50,
    "jpeg q70": lambda image: _reload(image, 70), "jpeg q90": lambda image: _reload(image, 90),
    "resize 50%": lambda image: _resized(image, 0.5), "resize 75%": lambda image: _resized(image, 0.75),
    "resize 150%": lambda image: _resized(image, 1.5),
    "crop 2%": lambda image: _cropped(image, 0.02), "crop 5%": lambda image: _cropped(image, 0.05),
    "crop 10%": lambda image: _cropped(image, 0.10),
    "brightness +20%": lambda image: _reload(ImageEnhance.Brightness(image).enhance(1.2)),
    "brightness -20%": lambda image: _reload(ImageEnhance.Brightness(image).enhance(0.8)),
    "contrast +20%": lambda image: _reload(ImageEnhance.Contrast(image).enhance(1.2)),
    "contrast -20%": lambda image: _reload(ImageEnhance.Contrast(image).enhance(0.8)),
    "rotate +2°": lambda image: _rotated(image, 2), "rotate -3°": lambda image: _rotated(image, -3),
}
# Distinct pictures made from each photo, to find more look-alike pairs of different pictures.
LOOK_ALIKE_VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "as is": lambda image: image, "mirrored": ImageOps.mirror, "upside down": ImageOps.flip}
SETTINGS_BITS = (8, 10, 12, 14)
SETTINGS_SIMILARITY = (None, 0.5, 0.6, 0.7)     # None: no confirmation (every candidate links)
DISTINCT_BITS = 14                              # distinct pairs are counted up to this many bits apart


def sample_photo_crops() -> list[Image.Image]:
    """24 distinct real photos: 150x120 crops of scikit-learn's china.jpg and flower.jpg (640x427),
    a 4x3 grid per photo with no two crops overlapping, enlarged to 400x320 so that they take the
    large-image path of the hash."""
    from sklearn.datasets import load_sample_images

    crops = []
    for array in load_sample_images().images:
        photo = Image.fromarray(array)
        for top in (0, 130, 260):
            for left in (0, 160, 320, 480):
                crops.append(photo.crop((left, top, left + 150, top + 120)).resize((400, 320), Image.Resampling.LANCZOS))
    return crops


def load_photos(folder: Path) -> dict[str, list[tuple[str, Image.Image]]]:
    """Every decodable image of a class-per-folder tree, decoded by the pipeline's own rules."""
    from pipeline.images import ImageRejected, decode_file

    photos: dict[str, list[tuple[str, Image.Image]]] = {}
    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_folder.rglob("*")):
            try:
                photos.setdefault(class_folder.name, []).append((str(path.relative_to(folder)),
                                                                 decode_file(path).image))
            except ImageRejected:
                continue
    return photos


def threshold_study(photos: dict[str, list[tuple[str, Image.Image]]]) -> dict:
    """Bits from each near copy to its original, and from each photo to the nearest other photo of its class."""
    from pipeline.near_duplicates import fingerprint, hamming, hash_values

    copy_bits: dict[str, list[int]] = {name: [] for name in NEAR_COPIES}
    nearest: list[int] = []
    closest: list[tuple[int, str, str]] = []
    everything = hash_values([fingerprint(image).phash for items in photos.values() for _, image in items])
    across = hamming(everything[:, None], everything[None, :]).astype(float)
    np.fill_diagonal(across, np.inf)
    for items in photos.values():
        names = [name for name, _ in items]
        originals = hash_values([fingerprint(image).phash for _, image in items])
        for kind, make in NEAR_COPIES.items():
            copies = hash_values([fingerprint(make(image)).phash for _, image in items])
            copy_bits[kind].extend(int(bits) for bits in hamming(copies, originals))
        distances = hamming(originals[:, None], originals[None, :]).astype(float)
        np.fill_diagonal(distances, np.inf)
        for index, row in enumerate(distances):
            other = int(row.argmin())
            nearest.append(int(row[other]))
            if index < other:
                closest.append((int(row[other]), names[index], names[other]))
    closest.sort()
    return {"photos": len(nearest), "copy_bits": copy_bits, "nearest_distinct_bits": nearest,
            "nearest_any_class_bits": [int(bits) for bits in across.min(axis=1)],
            "closest_distinct_pairs": closest[:10]}


def _within(values: list[int], bits: int) -> float:
    return sum(value <= bits for value in values) / len(values)


def study_lines(name: str, study: dict) -> list[Line]:
    """The study as table lines: per threshold, the share of copies caught and of photos falsely matched."""
    lines = []
    for bits in STUDY_BITS:
        caught = ", ".join(f"{kind} {100 * _within(values, bits):.0f}%" for kind, values in study["copy_bits"].items())
        false = _within(study["nearest_distinct_bits"], bits)
        false_any = _within(study["nearest_any_class_bits"], bits)
        lines.append(Line(f"{name}: within {bits} bits", f"copies caught: {caught}",
                          f"distinct photos matched: {100 * false:.1f}% same class, {100 * false_any:.1f}% any",
                          None, "-", None, {"bits": bits, "false_match_share": false,
                                            "false_match_share_any_class": false_any}))
    return lines


def histograms(study: dict) -> dict:
    """The study with each list of distances as {bits: how many} (results files stay small)."""
    def count(values: list[int]) -> dict[str, int]:
        return {str(bits): values.count(bits) for bits in sorted(set(values))}

    return {"photos": study["photos"], "copy_bits": {kind: count(v) for kind, v in study["copy_bits"].items()},
            **{key: count(study[key]) for key in ("nearest_distinct_bits", "nearest_any_class_bits")},
            "closest_distinct_pairs": study["closest_distinct_pairs"]}


def study_summary(study: dict) -> str:
    """Percentiles, for the README."""
    parts = []
    for kind, values in study["copy_bits"].items():
        parts.append(f"{kind}: median {np.median(values):.0f}, p95 {np.percentile(values, 95):.0f}, max {max(values)}")
    nearest = study["nearest_distinct_bits"]
    parts.append(f"nearest distinct photo of its class: min {min(nearest)}, p1 {np.percentile(nearest, 1):.0f}, "
                 f"p5 {np.percentile(nearest, 5):.0f}, median {np.median(nearest):.0f}")
    parts.append(f"of any class: min {min(study['nearest_any_class_bits'])}")
    return "; ".join(parts)


class Benchmark(NamedTuple):
    """The labelled benchmark: one entry per image (a photo, a copy of it, or a look-alike made from it)."""

    phashes: list[str]
    pixels: list[bytes]
    source: np.ndarray    # the photo each image was made from
    kind: list[str]       # "original", a COPY_KINDS key, or a LOOK_ALIKE_VARIANTS key other than "as is"


def labelled_benchmark(photos: list[Image.Image]) -> Benchmark:
    """Each photo as is, its true copies (:data:`COPY_KINDS`) and its look-alike variants, fingerprinted."""
    from pipeline.near_duplicates import fingerprint

    phashes, pixels, source, kinds = [], [], [], []
    for index, photo in enumerate(photos):
        made = {"original": photo, **{kind: make(photo) for kind, make in COPY_KINDS.items()},
                **{kind: make(photo) for kind, make in LOOK_ALIKE_VARIANTS.items() if kind != "as is"}}
        for kind, image in made.items():
            marks = fingerprint(image)
            phashes.append(marks.phash)
            pixels.append(marks.pixels)
            source.append(index)
            kinds.append(kind)
    return Benchmark(phashes, pixels, np.array(source), kinds)


def look_alikes(photos: list[Image.Image], max_bits: int) -> list[tuple[int, str, int, str, int]]:
    """Pairs of different pictures whose perceptual hashes are at most ``max_bits`` apart, among the
    photos and their :data:`LOOK_ALIKE_VARIANTS`: ``(photo, variant, other photo, its variant, bits)``,
    never two of one photo."""
    from pipeline.near_duplicates import fingerprint, hamming, hamming_pairs, hash_values

    made = [(index, kind, make(photo)) for kind, make in LOOK_ALIKE_VARIANTS.items()
            for index, photo in enumerate(photos)]
    hashes = hash_values([fingerprint(image).phash or "0" for _, _, image in made])
    found = []
    for left, right in hamming_pairs(hashes, max_bits).tolist():
        if made[left][0] != made[right][0]:
            found.append((made[left][0], made[left][1], made[right][0], made[right][1],
                          int(hamming(hashes[left], hashes[right]))))
    return found


def precision_recall(benchmark: Benchmark, settings: list[tuple[int, float | None]]) -> list[dict]:
    """Per ``(bits, similarity)`` setting (similarity None: no confirmation), grouped as ingest
    groups: precision of the linked pairs, recall of the copies (grouped with their photo, overall
    and per kind) and the distinct pairs (different photos, hashes within 12 and within
    :data:`DISTINCT_BITS` bits) that end up in one group."""
    from pipeline.near_duplicates import group_rows, measure_pairs, near_pairs

    widest = max(bits for bits, _ in settings)
    near = near_pairs(benchmark.phashes, benchmark.pixels, widest, 0.0)
    same_photo = benchmark.source[near.pairs[:, 0]] == benchmark.source[near.pairs[:, 1]]
    ids = [str(index) for index in range(len(benchmark.phashes))]      # every image its own bytes
    original = {int(source): index for index, (source, kind) in enumerate(zip(benchmark.source, benchmark.kind))
                if kind == "original"}
    copies = [(index, original[int(source)], kind) for index, (source, kind)
              in enumerate(zip(benchmark.source, benchmark.kind)) if kind in COPY_KINDS]
    # Each copy against its own photo, directly (recall above also counts a copy grouped through another copy).
    pair = np.array([[copy, photo] for copy, photo, _ in copies], dtype=np.int64).reshape(-1, 2)
    pair_bits, pair_similarity = measure_pairs(benchmark.phashes, benchmark.pixels, pair)
    results = []
    for bits, least in settings:
        linked = near.bits <= bits
        direct = pair_bits <= bits
        if least is not None:
            linked &= near.similarity >= least
            direct &= pair_similarity >= least
        group = group_rows(ids, near.pairs[linked])
        grouped = {kind: [] for kind in COPY_KINDS}
        for copy, photo, kind in copies:
            grouped[kind].append(bool(group[copy] == group[photo]))
        distinct = near.pairs[~same_photo]
        together = group[distinct[:, 0]] == group[distinct[:, 1]]
        within_12 = near.bits[~same_photo] <= 12
        true_links = int((linked & same_photo).sum())
        distinct_scores = near.similarity[~same_photo & (near.bits <= bits)]    # every distinct candidate's SSIM
        results.append({
            "bits": bits, "similarity": least, "linked_pairs": int(linked.sum()),
            "precision": true_links / int(linked.sum()) if linked.any() else 1.0,
            "recall": float(np.mean([value for values in grouped.values() for value in values])),
            "recall_per_kind": {kind: float(np.mean(values)) for kind, values in grouped.items()},
            "pair_recall": float(direct.mean()),
            "copies": len(copies), "distinct_linked": int((linked & ~same_photo).sum()),
            "distinct_pairs_12": int(within_12.sum()), "distinct_grouped_12": int((together & within_12).sum()),
            "distinct_pairs": int(len(distinct)), "distinct_grouped": int(together.sum()),
            "distinct_most_similar": float(distinct_scores.max()) if len(distinct_scores) else None})
    return results


def benchmark_lines(name: str, results: list[dict], default: tuple[int, float], judge: bool = True) -> list[Line]:
    """The precision-and-recall table, one line per setting; the default's line is judged (with ``judge``)."""
    lines = []
    for result in results:
        setting = (result["bits"], result["similarity"])
        confirm = "no confirmation" if result["similarity"] is None else f"SSIM >= {result['similarity']:g}"
        judged = judge and setting == default
        ok = result["distinct_grouped_12"] == 0 and result["recall"] >= RECALL_TARGET
        lines.append(Line(
            f"{name} benchmark: within {result['bits']} bits, {confirm}{' (default)' if setting == default else ''}",
            f"precision {100 * result['precision']:.2f}%, recall {100 * result['recall']:.2f}% "
            f"(each copy to its photo directly: {100 * result['pair_recall']:.1f}%)",
            f"distinct pairs grouped: {result['distinct_grouped_12']} of {result['distinct_pairs_12']} within 12 "
            f"bits, {result['distinct_grouped']} of {result['distinct_pairs']} within {DISTINCT_BITS}; " + (
                "no distinct candidate" if result["distinct_most_similar"] is None
                else f"the most alike distinct candidate: SSIM {result['distinct_most_similar']:.2f}"),
            None, f"0 distinct grouped, recall >= {RECALL_TARGET:.0%}" if judged else "-", ok if judged else None,
            result))
    return lines


RECALL_TARGET = 0.97


def planted_hashes(count: int, max_distance: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """``count`` random 64-bit hashes; the last 1 % copy an earlier one with 1..max_distance bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=count, dtype=np.uint64)
    planted = max(1, int(count * PLANTED_SHARE))
    pairs = set()
    for index in range(count - planted, count):
        original = int(rng.integers(0, count - planted))
        bits = rng.choice(64, size=int(rng.integers(1, max_distance + 1)), replace=False)
        hashes[index] = hashes[original] ^ np.uint64(sum(1 << int(bit) for bit in bits))
        pairs.add((original, index))
    return hashes, pairs


def measure_search(hashes: np.ndarray, max_distance: int, all_pairs: bool = False) -> tuple[float, int, np.ndarray]:
    """Seconds, peak traced bytes and the pairs of one search."""
    from pipeline import near_duplicates

    tracemalloc.start()
    started = time.perf_counter()
    if all_pairs:
        pairs = near_duplicates._all_pairs(hashes, max_distance)
    else:
        pairs = near_duplicates.hamming_pairs(hashes, max_distance)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, pairs


def confirm_seconds(count: int, seed: int = 0) -> float:
    """Seconds of :func:`pipeline.near_duplicates.similarity` on ``count`` pairs of random 16x16
    thumbnails: what confirming the search's candidate pairs adds (it runs on those pairs only)."""
    from pipeline.near_duplicates import SSIM_SIDE, similarity

    rng = np.random.default_rng(seed)
    left, right = (rng.integers(0, 256, size=(count, SSIM_SIDE, SSIM_SIDE), dtype=np.uint8) for _ in range(2))
    started = time.perf_counter()
    similarity(left, right)
    return time.perf_counter() - started


def scaling_lines(sizes: tuple[int, ...], max_distance: int) -> list[Line]:
    from pipeline.near_duplicates import choose_bands

    lines = []
    brute_rate = None
    for count in sizes:
        hashes, planted = planted_hashes(count, max_distance)
        seconds, peak, pairs = measure_search(hashes, max_distance)
        found = {tuple(pair) for pair in pairs.tolist()}
        missed = len(planted - found)
        if brute_rate is None:
            brute_seconds, _, brute_pairs = measure_search(hashes, max_distance, all_pairs=True)
            if {tuple(pair) for pair in brute_pairs.tolist()} != found:
                raise RuntimeError(f"hamming_pairs and all pairs disagree at {count} hashes")
            brute_rate = brute_seconds / (count * count)
            reference = f"all pairs {brute_seconds:.2f} s (measured)"
        else:
            reference = f"all pairs ~{brute_rate * count * count:,.0f} s (n^2 from {sizes[0]:,})"
        bands = choose_bands(count, max_distance)
        confirm = confirm_seconds(len(pairs))
        lines.append(Line(
            f"{count:,} hashes, within {max_distance} bits",
            f"{seconds:.2f} s, peak {fmt_bytes(peak)}; confirming its {len(found):,} pairs {confirm:.2f} s", reference,
            None, "all planted pairs found", missed == 0,
            {"hashes": count, "seconds": seconds, "peak_bytes": peak, "pairs": len(found), "planted": len(planted),
             "missed": missed, "bands": bands, "all_pairs_seconds_per_pair": brute_rate,
             "confirm_seconds": confirm}))
    return lines


def run(mode: str) -> RowResult:
    from bench.common import REPO_ROOT
    from bench.photos import photo_folder
    from pipeline.params import load_params

    ingest = load_params(REPO_ROOT / "params.yaml").ingest
    distance = ingest.near_duplicate_distance
    default = (distance, ingest.near_duplicate_similarity)
    settings = [(bits, least) for bits in SETTINGS_BITS for least in SETTINGS_SIMILARITY]
    if default not in settings:
        settings.append(default)
    row = RowResult("near_duplicates", "near duplicates: precision and recall, copies vs distinct photos; "
                                       "pair search scaling")
    photos = photo_folder()
    if photos is not None and photos.is_dir() and mode != "tiny":
        pictures = [image for items in load_photos(photos).values() for _, image in items]
        started = time.perf_counter()
        results = precision_recall(labelled_benchmark(pictures), settings)
        row.lines.extend(benchmark_lines(photos.name, results, default))
        row.data["benchmark"] = {"folder": os.path.relpath(photos, REPO_ROOT), "photos": len(pictures),
                                 "copy_kinds": list(COPY_KINDS), "look_alike_variants": list(LOOK_ALIKE_VARIANTS),
                                 "seconds": time.perf_counter() - started, "results": results}
        row.notes.append(f"precision and recall: {len(pictures)} photos of {os.path.relpath(photos, REPO_ROOT)}, "
                         f"each with {len(COPY_KINDS)} true copies ({', '.join(COPY_KINDS)}) and "
                         f"{len(LOOK_ALIKE_VARIANTS) - 1} look-alike variants (mirrored, upside down); distinct "
                         "pairs: images of different photos with hashes within "
                         f"{DISTINCT_BITS} bits; recall: copies grouped with their photo")
    crop_results = precision_recall(labelled_benchmark(sample_photo_crops()), settings)
    row.lines.extend(benchmark_lines("sklearn crops", crop_results, default, judge=False))
    row.data["benchmark_sklearn_crops"] = crop_results
    row.lines.extend(scaling_lines(SIZES[mode], distance))
    crops = threshold_study({"sample": [(f"crop{i}", image) for i, image in enumerate(sample_photo_crops())]})
    row.lines.extend(study_lines("sklearn crops", crops))
    row.data["sklearn_crops"] = {**histograms(crops), "summary": study_summary(crops)}
    row.notes.append("sklearn crops: " + study_summary(crops))
    if photos is not None and photos.is_dir() and mode != "tiny":
        study = threshold_study(load_photos(photos))
        row.lines.extend(study_lines(photos.name, study))
        row.data["photos"] = {**histograms(study), "folder": os.path.relpath(photos, REPO_ROOT),
                              "summary": study_summary(study)}
        row.notes.append(f"{os.path.relpath(photos, REPO_ROOT)} ({study['photos']} photos): " + study_summary(study))
    else:
        row.notes.append("photo study skipped: no photo folder (--photos DIR or BENCH_PHOTOS) or --tiny")
    row.notes.append(f"scaling: random 64-bit hashes, {PLANTED_SHARE:.0%} planted copies 1..{distance} bits away "
                     "(ingest.near_duplicate_distance); peak = tracemalloc's peak during the search")
    return row
