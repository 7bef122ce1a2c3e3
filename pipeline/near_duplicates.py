"""Near-duplicate photos: a perceptual hash per image, the pairs of hashes a few bits apart, a second
measure that confirms each pair, and groups.

A byte hash (SHA-256) finds exact copies only. The same photo re-saved at another JPEG quality,
resized, slightly cropped, rotated or brightened has other bytes but nearly the same perceptual
hash (``imagehash.phash``: the signs of the 8x8 lowest frequencies of a 32x32 grayscale DCT, 64
bits). Hashes at most ``max_distance`` bits apart make a candidate pair; distinct pictures land
that close too (a daisy and a dandelion, 10 bits apart), and more often the larger the folder, so a
candidate links two images only if a second, independent measure agrees: the structural
similarity (SSIM) of their 16x16 grayscale thumbnails. Exact copies and confirmed pairs form
groups, transitively, and ``split`` keeps each group in one split.

Everything here is pure: decoded images and arrays in, values out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.images import to_gray

HASH_BITS = 64
HASH_SIDE = 32              # phash works on a 32x32 grayscale image (hash_size 8 x highfreq_factor 4)
SAMPLE_SIDE = 128           # a large image is sampled at 128x128 points before it is averaged down
PATTERN_OVERHEAD = 5_000    # a flip pattern's fixed cost, in units of one lookup
BAND_BITS_MAX = 22          # a band's lookup table has 2**bits entries: 4 Mi at most (16 MiB of int32)
SSIM_SIDE = 16              # candidates are confirmed on a 16x16 thumbnail: 256 bytes kept per image
SSIM_WINDOW = 3             # SSIM's sliding window, in thumbnail pixels (a 6x6 patch of the 32x32 one)
SSIM_CHUNK = 1024           # pairs compared at once: 2 MiB of float64 per array, small enough for the cache


class Fingerprint(NamedTuple):
    """What ingest keeps from the decoded image besides its bytes' hash."""

    phash: str       # 16 hex digits (64 bits), imagehash's text form; empty for an image too small to hash
    spread: float    # standard deviation of the 32x32 grayscale thumbnail, 0-255: near 0 for a blank frame
    pixels: bytes    # the 16x16 grayscale thumbnail a candidate pair is confirmed on; empty without a phash


def fingerprint(image: Image.Image) -> Fingerprint:
    """The perceptual hash, the grayscale spread and the confirmation thumbnail of a decoded image.

    An image under 32 pixels on a side gets no perceptual hash (``phash`` empty): the hash would
    see its few pixels directly, and distinct pictures collide. On scikit-learn's 8x8 digits,
    875 of 1,797 different drawings fell into near-duplicate groups at 8 bits, 8 of them across
    labels. Such images are matched by their bytes only.
    """
    small = thumbnail(image)
    pixels = np.asarray(small, dtype=np.float64)
    flat = pixels.ravel()
    mean = flat.mean()
    spread = math.sqrt(max(0.0, float(np.dot(flat, flat)) / flat.size - mean * mean))
    if min(image.width, image.height) < HASH_SIDE:
        return Fingerprint("", round(spread, 2), b"")
    return Fingerprint(phash(pixels), round(spread, 2), small.reduce(HASH_SIDE // SSIM_SIDE).tobytes())


def thumbnail(image: Image.Image) -> Image.Image:
    """The 32x32 grayscale image the hash is computed from.

    Cheap on purpose: ingest decodes every image once and the hash must cost little beside that
    decode. Any pass over all pixels of a large photo (a grayscale conversion, a box reduction)
    costs a fifth to a third of the decode, so a large image is first sampled at 128x128 points
    (nearest neighbour: only those pixels are read), then averaged in 4x4 blocks; a small one is
    resized directly. On real photos, copies (re-encoded, resized, cropped, brightened) land as
    close to their original this way as with a full Lanczos resize (bench/near_duplicates.py).
    """
    if image.width >= SAMPLE_SIDE and image.height >= SAMPLE_SIDE:
        sampled = image.resize((SAMPLE_SIDE, SAMPLE_SIDE), Image.Resampling.NEAREST)
        if sampled.mode in ("RGB", "L"):      # averaging first, on fewer pixels, is cheaper
            return to_gray(sampled.reduce(SAMPLE_SIDE // HASH_SIDE))
        return to_gray(sampled).reduce(SAMPLE_SIDE // HASH_SIDE)
    return to_gray(image).resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS)


def phash(pixels: np.ndarray) -> str:
    """``imagehash.phash`` of a 32x32 grayscale image, as its 16 hex digits.

    The same computation (the signs of the 8x8 lowest frequencies of an unnormalised DCT-II against
    their median), written as two small matrix products: imagehash's own takes four times as long,
    mostly in SciPy's call overhead, and its import costs each ingest worker half a second.
    tests/test_near_duplicates.py checks that both give the same hash.
    """
    low = (_DCT_LOW @ pixels @ _DCT_LOW.T).ravel()
    middle = np.partition(low, (31, 32))
    return np.packbits(low > (middle[31] + middle[32]) / 2).tobytes().hex()


# Rows 0-7 of the 32-point DCT-II matrix as scipy.fftpack.dct computes it (no normalisation).
_DCT_LOW = 2 * np.cos(np.pi * np.outer(np.arange(8), 2 * np.arange(HASH_SIDE) + 1) / (2 * HASH_SIDE))


def hash_values(phashes: Sequence[str]) -> np.ndarray:
    """Hex hashes as a uint64 array."""
    return np.array([int(text, 16) for text in phashes], dtype=np.uint64)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bits that differ between uint64 hashes (element-wise)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def hamming_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair ``i < j`` with ``hamming(hashes[i], hashes[j]) <= max_distance``, as a sorted ``(k, 2)`` array.

    Not all pairs: a multi-index (Norouzi et al., "Fast search in Hamming space with multi-index
    hashing", 2012). The 64 bits are cut into ``m`` bands; two hashes within ``d`` bits agree within
    about ``d / m`` bits on at least one band (pigeonhole; :func:`_band_radii`). For each band and
    each way of flipping that many of its bits, a lookup table of the band's values gives the candidates, which are
    then checked on all 64 bits. ``m`` is chosen by an estimate of the work; for a few thousand
    hashes, or a distance so large that nearly everything is a candidate, plain blocks of all
    pairs are cheaper and used instead. Both give the same pairs (tested).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if len(hashes) < 2 or max_distance < 0:
        return np.empty((0, 2), dtype=np.int64)
    bands = choose_bands(len(hashes), max_distance)
    if bands is None:
        pairs = _all_pairs(hashes, max_distance)
    else:
        pairs = _multi_index_pairs(hashes, max_distance, bands)
    if len(pairs) == 0:
        return np.empty((0, 2), dtype=np.int64)
    keys = np.unique(pairs[:, 0] * len(hashes) + pairs[:, 1])
    return np.stack([keys // len(hashes), keys % len(hashes)], axis=1)


def choose_bands(count: int, max_distance: int) -> int | None:
    """The number of bands for :func:`hamming_pairs`, or None when all pairs are cheaper.

    Estimated work per band: one table lookup per hash for each flip pattern, plus one 64-bit check
    per candidate (``count**2 / 2**bits`` expected per pattern for evenly spread hashes), plus a
    fixed cost per pattern (a dozen NumPy calls).
    """
    best, best_cost = None, count * count / 2 / 4       # numpy checks all pairs ~4x cheaper than lookups
    for bands in range(math.ceil(HASH_BITS / BAND_BITS_MAX), max(max_distance + 1, 3) + 1):
        cost = 0.0
        for (_, width), radius in zip(_band_edges(bands), _band_radii(bands, max_distance)):
            patterns = sum(math.comb(width, k) for k in range(radius + 1))
            cost += patterns * (PATTERN_OVERHEAD + count + count * count / 2 ** width)
        if cost < best_cost:
            best, best_cost = bands, cost
    return best


def _all_pairs(hashes: np.ndarray, max_distance: int, block: int = 2048) -> np.ndarray:
    found = []
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block]
        distances = hamming(rows[:, None], hashes[None, start:])
        left, right = np.nonzero(distances <= max_distance)
        keep = right > left
        found.append(np.stack([left[keep] + start, right[keep] + start], axis=1))
    return np.concatenate(found).astype(np.int64)


def _band_edges(bands: int) -> list[tuple[int, int]]:
    """(shift, width) of each band, the widths as even as 64 bits allow."""
    widths = [HASH_BITS // bands + (1 if index < HASH_BITS % bands else 0) for index in range(bands)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    return [(int(shift), width) for shift, width in zip(shifts, widths)]


def _band_radii(bands: int, max_distance: int) -> list[int]:
    """How many bits to flip in each band (-1: the band need not be searched).

    With ``d = q * bands + a``, two hashes within ``d`` bits agree within ``q`` bits on one of the
    first ``a + 1`` bands, or within ``q - 1`` on one of the others: otherwise they would differ in
    at least ``(a + 1)(q + 1) + (bands - a - 1) q = d + 1`` bits (Norouzi et al., proposition 2).
    """
    whole, extra = divmod(max_distance, bands)
    return [whole if index <= extra else whole - 1 for index in range(bands)]


def _multi_index_pairs(hashes: np.ndarray, max_distance: int, bands: int) -> np.ndarray:
    count = len(hashes)
    index_type = np.int32 if count < 2**31 else np.int64
    found = []
    for (shift, width), radius in zip(_band_edges(bands), _band_radii(bands, max_distance)):
        values = ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
        order = np.argsort(values, kind="stable").astype(index_type)
        sizes = np.bincount(values, minlength=1 << width).astype(index_type)
        starts = (np.cumsum(sizes, dtype=np.int64) - sizes).astype(index_type)
        # Queries in band order: a flipped value lands near the last one's, so the table reads stay in cache.
        queries = values[order]
        for flipped in range(radius + 1):
            for bits in itertools.combinations(range(width), flipped):
                mask = sum(1 << bit for bit in bits)
                targets = queries ^ mask
                per_query = sizes[targets]
                hit = np.flatnonzero(per_query)        # most lookups find nothing: work on the rest
                if len(hit) == 0:
                    continue
                counts = per_query[hit].astype(np.int64)
                total = int(counts.sum())
                left = np.repeat(order[hit].astype(np.int64), counts)
                offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
                right = order[np.repeat(starts[targets[hit]].astype(np.int64), counts) + offsets].astype(np.int64)
                keep = left < right
                left, right = left[keep], right[keep]
                close = hamming(hashes[left], hashes[right]) <= max_distance
                found.append(np.stack([left[close], right[close]], axis=1))
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)


class NearPairs(NamedTuple):
    """Candidate pairs of rows (perceptual hashes close) and what the confirmation measured on each."""

    pairs: np.ndarray        # (k, 2) row indices, i < j, sorted
    bits: np.ndarray         # (k,) bits between the two perceptual hashes
    similarity: np.ndarray   # (k,) SSIM of the two 16x16 thumbnails, -1..1
    confirmed: np.ndarray    # (k,) bool: similarity >= min_similarity; only these link two rows


def near_pairs(phashes: Sequence[str], pixels: Sequence[bytes], max_distance: int,
               min_similarity: float) -> NearPairs:
    """The candidate pairs of near copies among rows, each confirmed or not by a second measure.

    A pair is a candidate when its perceptual hashes are at most ``max_distance`` bits apart
    (:func:`hamming_pairs`; ``max_distance`` 0: no search, no pairs), and confirmed when the SSIM of
    the rows' 16x16 thumbnails (:func:`similarity`) is at least ``min_similarity``. A row with an
    empty ``phash`` takes part in neither. Every pair of rows whose hashes are that close is measured,
    rows that share one hash value included (a look-alike can have the very hash of a picture and
    its copy), with one shortcut: rows with the same hash and the same thumbnail (exact copies,
    mostly) are one picture to both measures, so each is compared with the first of them only (a
    thousand copies of one frame cost a thousand comparisons, not half a million) and that first row
    stands for them in every other pair. The confirmed pairs join the same groups as all pairs would.
    """
    hashed = np.array([index for index, text in enumerate(phashes) if text], dtype=np.int64)
    if max_distance <= 0 or len(hashed) < 2:
        empty = np.empty(0, dtype=np.int64)
        return NearPairs(np.empty((0, 2), dtype=np.int64), empty, empty.astype(np.float64), empty.astype(bool))
    first_of: dict[tuple[str, bytes], int] = {}
    same = np.array([first_of.setdefault((phashes[index], pixels[index]), index) for index in hashed],
                    dtype=np.int64)
    distinct = np.unique(same)
    candidates = np.concatenate([np.stack([same, hashed], axis=1)[same != hashed],
                                 _close_rows(hash_values([phashes[index] for index in distinct]), distinct,
                                             max_distance)])
    candidates = np.sort(candidates, axis=1)
    candidates = candidates[np.lexsort((candidates[:, 1], candidates[:, 0]))]
    bits, scores = measure_pairs(phashes, pixels, candidates)
    return NearPairs(candidates, bits, scores, scores >= min_similarity)


def _close_rows(values: np.ndarray, rows: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair of ``rows`` whose hash ``values`` are at most ``max_distance`` bits apart, equal values included.

    The search runs on the distinct values; each pair of values it finds, and each value several
    rows share, is then expanded to every pair of their rows. Distinct pictures that share a 64-bit
    hash are few, so this costs about what the search alone costs.
    """
    unique, inverse, sizes = np.unique(values, return_inverse=True, return_counts=True)
    by_value = rows[np.argsort(inverse, kind="stable")]
    starts = np.cumsum(sizes) - sizes
    shared = np.flatnonzero(sizes > 1)
    value_pairs = np.concatenate([hamming_pairs(unique, max_distance), np.stack([shared, shared], axis=1)])
    lefts, rights = value_pairs[:, 0], value_pairs[:, 1]
    counts = sizes[lefts] * sizes[rights]
    owner = np.repeat(np.arange(len(value_pairs)), counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    left = by_value[starts[lefts[owner]] + offset // sizes[rights[owner]]]
    right = by_value[starts[rights[owner]] + offset % sizes[rights[owner]]]
    # A value paired with itself yields each pair of its rows twice, and each row with itself.
    keep = (lefts[owner] != rights[owner]) | (left < right)
    return np.stack([left[keep], right[keep]], axis=1)


def measure_pairs(phashes: Sequence[str], pixels: Sequence[bytes], pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both measures for each pair of rows (``(k, 2)`` indices): the bits between their perceptual
    hashes and the SSIM of their thumbnails; a row without a hash counts as 64 bits and -1 from
    every other."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    hashed = np.array([bool(text) for text in phashes], dtype=bool)
    both = hashed[pairs[:, 0]] & hashed[pairs[:, 1]]
    bits = np.full(len(pairs), HASH_BITS, dtype=np.int64)
    scores = np.full(len(pairs), -1.0)
    measured = pairs[both]
    bits[both] = hamming(hash_values([phashes[i] for i in measured[:, 0]]),
                         hash_values([phashes[j] for j in measured[:, 1]]))
    scores[both] = similarity(stack_thumbnails([pixels[i] for i in measured[:, 0]]),
                              stack_thumbnails([pixels[j] for j in measured[:, 1]]))
    return bits, scores


def stack_thumbnails(thumbnails: Sequence[bytes]) -> np.ndarray:
    """Fingerprints' 16x16 thumbnails (``Fingerprint.pixels``) as one ``(k, 16, 16)`` uint8 array."""
    if not thumbnails:
        return np.empty((0, SSIM_SIDE, SSIM_SIDE), dtype=np.uint8)
    return np.frombuffer(b"".join(thumbnails), dtype=np.uint8).reshape(-1, SSIM_SIDE, SSIM_SIDE)


def similarity(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The structural similarity (SSIM, Wang et al. 2004) of each pair of grayscale thumbnails.

    ``left`` and ``right`` are ``(k, side, side)`` arrays of 0-255 values; returns ``k`` values in
    -1..1 (1: the same pixels). The mean of the SSIM map over every full 3x3 window, with the
    constants K1 0.01 and K2 0.03 and sample variances: what
    ``skimage.metrics.structural_similarity(a, b, win_size=3, data_range=255)`` returns for one
    pair (tests/test_near_duplicates.py checks it), computed for all pairs at once, in chunks
    (scikit-image itself is only the tests' reference: its per-call overhead is four times this
    per pair, and its import most of a second).

    Why SSIM on 16x16 thumbnails: it compares local means, contrasts and correlations, which the
    perceptual hash's median-split DCT signs do not. On catsdogs-small (bench row 8), the most
    alike pair of different photos among the candidates within 10 bits scored 0.41, and 99.5 % of
    true copies stay grouped at 0.6 (docs/near-copies.md).
    """
    left = np.asarray(left, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    scores = [_ssim(left[start:start + SSIM_CHUNK], right[start:start + SSIM_CHUNK])
              for start in range(0, len(left), SSIM_CHUNK)]
    return np.concatenate(scores) if scores else np.empty(0, dtype=np.float64)


def _ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    count = SSIM_WINDOW * SSIM_WINDOW
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mean_x, mean_y = _window_mean(x), _window_mean(y)
    unbias = count / (count - 1)
    var_x = unbias * (_window_mean(x * x) - mean_x * mean_x)
    var_y = unbias * (_window_mean(y * y) - mean_y * mean_y)
    cov = unbias * (_window_mean(x * y) - mean_x * mean_y)
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)
                / ((mean_x * mean_x + mean_y * mean_y + c1) * (var_x + var_y + c2)))
    return ssim_map.mean(axis=(1, 2))


def _window_mean(values: np.ndarray) -> np.ndarray:
    """The mean of every full SSIM_WINDOW x SSIM_WINDOW window of each image (separable shifted sums)."""
    width = SSIM_WINDOW
    rows = sum(values[:, shift:values.shape[1] - width + 1 + shift] for shift in range(width))
    box = sum(rows[:, :, shift:values.shape[2] - width + 1 + shift] for shift in range(width))
    return box / (width * width)


def group_rows(sha256: Sequence[str], links: np.ndarray) -> np.ndarray:
    """The group of each row, as the index of the group's first row (rows in path order: the
    group's first path).

    Rows with the same SHA-256 are joined, and the rows of each pair in ``links`` (``(k, 2)``
    row indices: the confirmed near pairs), transitively: two rows share a group only through a
    chain of exact copies and confirmed pairs.
    """
    count = len(sha256)
    first_of_sha: dict[str, int] = {}
    exact = np.array([first_of_sha.setdefault(sha, index) for index, sha in enumerate(sha256)], dtype=np.int64)
    edges = [np.stack([np.arange(count, dtype=np.int64), exact], axis=1),
             np.asarray(links, dtype=np.int64).reshape(-1, 2)]
    return _components(count, np.concatenate(edges))


def _components(count: int, edges: np.ndarray) -> np.ndarray:
    """The smallest row index of each row's connected component (min-label propagation with pointer
    jumping, vectorised; deterministic)."""
    labels = np.arange(count, dtype=np.int64)
    if len(edges) == 0:
        return labels
    left, right = edges[:, 0], edges[:, 1]
    while True:
        smaller = np.minimum(labels[left], labels[right])
        updated = labels.copy()
        np.minimum.at(updated, left, smaller)
        np.minimum.at(updated, right, smaller)
        updated = updated[updated]
        while not np.array_equal(updated, updated[updated]):
            updated = updated[updated]
        if np.array_equal(updated, labels):
            return labels
        labels = updated
