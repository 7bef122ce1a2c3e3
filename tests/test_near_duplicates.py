"""Near duplicates: the perceptual hash (imagehash's phash), the pair search, and the groups."""

from __future__ import annotations

import itertools

import imagehash
import numpy as np
import pytest
from PIL import Image

from pipeline.near_duplicates import (
    HASH_SIDE,
    _all_pairs,
    choose_bands,
    fingerprint,
    group_rows,
    hamming,
    hamming_pairs,
    hash_values,
    phash,
    thumbnail,
)


def _photo(seed: int, size: tuple[int, int] = (200, 150)) -> Image.Image:
    """Smooth random blobs: an image with structure at several scales, like a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _brute_force(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    return {(i, j) for i, j in itertools.combinations(range(len(hashes)), 2)
            if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= max_distance}


def _with_neighbours(count: int, seed: int) -> np.ndarray:
    """Random hashes, a third of them copies of another with 1-12 bits flipped (so pairs exist at every distance)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=count, dtype=np.uint64)
    for index in range(0, count, 3):
        source = int(rng.integers(0, count))
        bits = rng.choice(64, size=int(rng.integers(1, 13)), replace=False)
        hashes[index] = hashes[source] ^ np.uint64(sum(1 << int(bit) for bit in bits))
    hashes[5] = hashes[7]   # identical values too
    return hashes


# --- the hash --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_phash_is_imagehashs_phash(seed: int) -> None:
    small = thumbnail(_photo(seed))
    assert small.size == (HASH_SIDE, HASH_SIDE) and small.mode == "L"
    assert phash(np.asarray(small, dtype=np.float64)) == str(imagehash.phash(small))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_fingerprint_takes_every_mode_ingest_accepts(mode: str) -> None:
    image = _photo(3).convert(mode) if mode != "I;16" else Image.fromarray(
        (np.asarray(_photo(3).convert("L"), dtype=np.uint16) * 257))
    marks = fingerprint(image)
    assert len(marks.phash) == 16 and int(marks.phash, 16) >= 0
    assert marks.spread > 4


def test_fingerprint_of_a_blank_frame_has_no_spread() -> None:
    assert fingerprint(Image.new("RGB", (300, 200), (90, 90, 90))).spread == 0


def test_an_image_under_32_pixels_gets_no_perceptual_hash() -> None:
    assert fingerprint(_photo(1, size=(31, 200))).phash == ""
    assert fingerprint(_photo(1, size=(32, 32))).phash != ""


def test_hash_values_and_hamming() -> None:
    values = hash_values(["0000000000000000", "ffffffffffffffff", "000000000000000f"])
    assert values.dtype == np.uint64
    assert hamming(values[0], values[1]) == 64
    assert hamming(values[0], values[2]) == 4
    assert hamming(values[:, None], values[None, :]).tolist() == [[0, 64, 4], [64, 0, 60], [4, 60, 0]]


# --- the pair search ----------------------------------------------------------------------------

@pytest.mark.parametrize("max_distance", [0, 1, 3, 6, 8, 10, 16])
def test_hamming_pairs_finds_exactly_the_close_pairs(max_distance: int) -> None:
    hashes = _with_neighbours(300, seed=max_distance)
    pairs = hamming_pairs(hashes, max_distance)
    assert {tuple(pair) for pair in pairs.tolist()} == _brute_force(hashes, max_distance)
    assert pairs.tolist() == sorted(pairs.tolist())
    assert (pairs[:, 0] < pairs[:, 1]).all()


@pytest.mark.parametrize("bands", [3, 4, 5, 9])
@pytest.mark.parametrize("max_distance", [2, 8, 10])
def test_the_multi_index_agrees_with_all_pairs_for_any_band_count(bands: int, max_distance: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import near_duplicates

    hashes = _with_neighbours(400, seed=bands * 100 + max_distance)
    monkeypatch.setattr(near_duplicates, "choose_bands", lambda count, distance: bands)
    found = hamming_pairs(hashes, max_distance)
    expected = _all_pairs(hashes, max_distance)
    assert found.tolist() == sorted(map(list, {tuple(pair) for pair in expected.tolist()}))


def test_choose_bands_indexes_large_sets_and_checks_small_ones_whole() -> None:
    assert choose_bands(300, 8) is None                # a few hundred: all pairs is cheapest
    assert choose_bands(1_000_000, 8) == 3             # three bands of 21-22 bits, lookup tables of 4 Mi
    assert choose_bands(1_000_000, 0) == 3


def test_hamming_pairs_edge_cases() -> None:
    assert hamming_pairs(np.array([], dtype=np.uint64), 8).shape == (0, 2)
    assert hamming_pairs(np.array([5], dtype=np.uint64), 8).shape == (0, 2)
    assert hamming_pairs(np.array([0, 2**64 - 1], dtype=np.uint64), 32).shape == (0, 2)
    assert hamming_pairs(np.array([0, 2**64 - 1], dtype=np.uint64), 64).tolist() == [[0, 1]]


# --- groups ---------------------------------------------------------------------------------------

def test_groups_join_exact_and_near_copies_transitively() -> None:
    sha = ["a", "b", "c", "d", "a", "e"]
    # b is 3 bits from a; c is 3 bits from b (6 from a); d and e are far from everything.
    phashes = ["0000000000000000", "0000000000000007", "000000000000003f", "ffffffff00000000", "0000000000000000",
               "00000000ffffffff"]
    assert group_rows(sha, phashes, 3).tolist() == [0, 0, 0, 3, 0, 5]
    assert group_rows(sha, phashes, 2).tolist() == [0, 1, 2, 3, 0, 5]
    # 0 turns the near search off: exact copies only.
    assert group_rows(sha, phashes, 0).tolist() == [0, 1, 2, 3, 0, 5]


def test_rows_without_a_perceptual_hash_are_grouped_by_bytes_only() -> None:
    assert group_rows(["a", "b", "a"], ["", "", ""], 8).tolist() == [0, 1, 0]
    assert group_rows(["a", "b", "c"], ["", "0000000000000000", "0000000000000001"], 8).tolist() == [0, 1, 1]


def test_many_identical_hashes_are_one_group_without_all_pairs() -> None:
    count = 20_000
    sha = [f"s{i}" for i in range(count)]
    first = group_rows(sha, ["00000000000000ff"] * count, 8)
    assert (first == 0).all()


def test_group_of_each_row_is_its_groups_first_row() -> None:
    rng = np.random.default_rng(0)
    hashes = _with_neighbours(200, seed=4)
    sha = [f"s{int(rng.integers(0, 150))}" for _ in range(200)]
    first = group_rows(sha, [f"{int(value):016x}" for value in hashes], 6)
    for index, head in enumerate(first.tolist()):
        assert head <= index and first[head] == head
    # Every close pair and every exact pair shares a group.
    for i, j in _brute_force(hashes, 6):
        assert first[i] == first[j]
    for i, j in itertools.combinations(range(200), 2):
        if sha[i] == sha[j]:
            assert first[i] == first[j]
