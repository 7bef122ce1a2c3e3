"""Near duplicates: the perceptual hash (imagehash's phash), the pair search, and the groups."""

from __future__ import annotations

import functools
import itertools
import os
import shutil
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from pipeline.near_duplicates import (
    HASH_SIDE,
    SSIM_SIDE,
    _DCT_LOW,
    _all_pairs,
    choose_bands,
    fingerprint,
    group_rows,
    hamming,
    hamming_pairs,
    hash_values,
    near_pairs,
    phash,
    similarity,
    stack_thumbnails,
    thumbnail,
)


@functools.cache
def _real_crops() -> tuple[Image.Image, ...]:
    """bench.near_duplicates.sample_photo_crops, made once (loading scikit-learn's photos takes seconds)."""
    from bench.near_duplicates import sample_photo_crops

    return tuple(sample_photo_crops())


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


# Under 128 pixels on a side, the thumbnail is imagehash's own resize (Lanczos to 32x32).
SMALL_SIZES = [(32, 32), (45, 33), (33, 90), (64, 64), (127, 100), (100, 400)]


@pytest.mark.parametrize("size", SMALL_SIZES)
@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "RGBA", "LA"])
def test_a_small_images_hash_is_imagehashs_phash_of_the_image(size: tuple[int, int], mode: str) -> None:
    # End to end, resize included; RGBA and LA converted from opaque images (transparency is below).
    image = _photo(size[0] * 1000 + size[1], size).convert(mode)
    assert fingerprint(image).phash == str(imagehash.phash(image))


def test_transparency_and_16_bit_are_flattened_before_imagehashs_phash() -> None:
    # ingest's rules (pipeline.images.to_gray): transparent pixels over white, 16 bits scaled to 8.
    image = _photo(21, (90, 60)).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    over_white = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    assert fingerprint(image).phash == str(imagehash.phash(over_white))
    gray = np.asarray(_photo(22, (70, 110)).convert("L"), dtype=np.uint16)
    eight_bit = Image.fromarray(gray.astype(np.uint8))
    assert fingerprint(Image.fromarray(gray * 257)).phash == str(imagehash.phash(eight_bit))


# From 128 pixels on a side the thumbnail is a cheaper resize (sampled, then averaged), so the hash may
# move a little from imagehash's on the whole image: measured, 0-2 bits on these blobs and 0-6 on the
# real photo crops; bounded here below the project's near_duplicate_distance (10).
LARGE_IMAGE_BITS = 8


def _bits_from_imagehash(image: Image.Image) -> int:
    return int(hamming(int(fingerprint(image).phash, 16), int(str(imagehash.phash(image)), 16)))


@pytest.mark.parametrize("size", [(128, 128), (200, 150), (150, 640), (400, 320), (1000, 129)])
def test_a_large_images_hash_is_within_a_few_bits_of_imagehashs_phash(size: tuple[int, int]) -> None:
    bits = [_bits_from_imagehash(_photo(seed, size)) for seed in range(10)]
    assert max(bits) <= LARGE_IMAGE_BITS, bits


def test_a_real_photos_hash_is_within_a_few_bits_of_imagehashs_phash() -> None:
    bits = [_bits_from_imagehash(crop) for crop in _real_crops()]
    assert max(bits) <= LARGE_IMAGE_BITS and sum(bits) / len(bits) <= 2, bits


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


# --- the confirmation: SSIM of 16x16 thumbnails --------------------------------------------------

def test_similarity_is_skimages_structural_similarity() -> None:
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    left = rng.integers(0, 256, size=(40, SSIM_SIDE, SSIM_SIDE), dtype=np.uint8)
    noise = rng.integers(-80, 81, size=left.shape)
    right = np.clip(left.astype(int) + noise * rng.random((40, 1, 1)), 0, 255).astype(np.uint8)
    right[0] = left[0]                                          # identical: 1
    right[1] = 255 - left[1]                                    # inverted: negative
    crops = [np.frombuffer(fingerprint(crop).pixels, dtype=np.uint8).reshape(SSIM_SIDE, SSIM_SIDE)
             for crop in _real_crops()[:6]]
    left = np.concatenate([left, np.stack(crops[:3])])
    right = np.concatenate([right, np.stack(crops[3:])])
    expected = [structural_similarity(a, b, win_size=3, data_range=255) for a, b in zip(left, right)]
    assert similarity(left, right) == pytest.approx(expected, abs=1e-12)
    assert similarity(left[:1], right[:1])[0] == pytest.approx(1.0) and similarity(left[1:2], right[1:2])[0] < 0
    assert similarity(left[:0], right[:0]).shape == (0,)


def test_fingerprint_keeps_the_16x16_thumbnail_of_the_hash() -> None:
    image = _photo(5)
    marks = fingerprint(image)
    expected = thumbnail(image).reduce(HASH_SIDE // SSIM_SIDE)
    assert marks.pixels == expected.tobytes() and len(marks.pixels) == SSIM_SIDE * SSIM_SIDE
    assert stack_thumbnails([marks.pixels, marks.pixels]).shape == (2, SSIM_SIDE, SSIM_SIDE)
    assert fingerprint(_photo(5, size=(31, 200))).pixels == b""      # no hash, no thumbnail


def _rows(hashes: list[int], thumbnails: list[np.ndarray]) -> tuple[list[str], list[bytes]]:
    return [f"{value:016x}" for value in hashes], [np.asarray(t, dtype=np.uint8).tobytes() for t in thumbnails]


def _blob(seed: int) -> np.ndarray:
    return np.asarray(_photo(seed, (SSIM_SIDE, SSIM_SIDE)).convert("L"))


def test_near_pairs_links_close_hashes_only_when_the_thumbnails_agree() -> None:
    a = _blob(1)
    # rows 0-1: a picture and its slightly brighter copy, hashes 3 bits apart; rows 2-3: two different
    # pictures whose hashes are 4 bits apart (a look-alike to the hash); row 4: far from everything.
    phashes, pixels = _rows([0x0, 0x7, 0xFFFF0000, 0xFFFF000F, 0xFFFFFFFF00000000],
                            [a, np.clip(a.astype(int) + 12, 0, 255), _blob(2), _blob(3), _blob(4)])
    near = near_pairs(phashes, pixels, 8, 0.6)
    assert near.pairs.tolist() == [[0, 1], [2, 3]]                   # the candidates: close hashes
    assert near.bits.tolist() == [3, 4]
    assert near.confirmed.tolist() == [True, False]                  # only the copy is confirmed
    assert near.similarity[0] > 0.9 > 0.6 > near.similarity[1]
    assert near_pairs(phashes, pixels, 8, 0.0).confirmed.tolist() == [True, near.similarity[1] >= 0]
    assert len(near_pairs(phashes, pixels, 0, 0.6).pairs) == 0       # distance 0: no search at all


def test_near_pairs_compare_identical_rows_with_their_first_and_skip_unhashed_rows() -> None:
    a = _blob(1)
    phashes, pixels = _rows([0x5, 0x5, 0x5, 0x5], [a, a, _blob(9), a])
    phashes.append("")
    pixels.append(b"")
    near = near_pairs(phashes, pixels, 4, 0.6)
    assert near.pairs.tolist() == [[0, 1], [0, 2], [0, 3]]         # a star, not every pair
    assert near.confirmed.tolist() == [True, False, True]


def test_near_pairs_confirm_a_copy_behind_a_look_alike_with_the_same_hash() -> None:
    # Rows 0-2 share one hash: a look-alike first, then a picture and its copy. Rows 3-5 likewise,
    # the copy one bit away. Each pair of close hashes is measured, not only the first row's.
    a, b = _blob(1), _blob(2)
    copy_a, copy_b = np.clip(a.astype(int) + 8, 0, 255), np.clip(b.astype(int) - 8, 0, 255)
    phashes, pixels = _rows([0x5, 0x5, 0x5, 0xF0, 0xF0, 0xF1], [_blob(7), a, copy_a, _blob(8), b, copy_b])
    near = near_pairs(phashes, pixels, 4, 0.6)
    assert near.pairs.tolist() == [[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]]
    assert near.confirmed.tolist() == [False, False, True, False, False, True]
    assert group_rows([f"s{i}" for i in range(6)], near.pairs[near.confirmed]).tolist() == [0, 1, 1, 3, 4, 4]


def _one_hash_three_pictures() -> list[Image.Image]:
    """A look-alike, a picture and the picture's brighter copy, 128x128, all three with one perceptual hash.

    The picture is made from the 64 frequencies the hash reads, each far from their median (a
    stable hash); the look-alike adds noise with no part in them, so the hashes are the same but the
    thumbnails differ (SSIM about 0.4; the copy's about 0.999).
    """
    low = np.kron(_DCT_LOW, _DCT_LOW)       # the hash's 64 frequencies, as rows over the 32x32 pixels
    picture = 128 + np.linalg.pinv(low) @ np.random.default_rng(7).permutation([400.0] * 32 + [-400.0] * 32)
    basis, _ = np.linalg.qr(low.T)
    noise = np.random.default_rng(0).normal(0, 1, HASH_SIDE * HASH_SIDE)
    noise -= basis @ (basis.T @ noise)
    look_alike = picture + 25 * noise / noise.std()
    return [Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8).reshape(HASH_SIDE, HASH_SIDE))
            .resize((128, 128), Image.Resampling.NEAREST) for pixels in (look_alike, picture, picture + 5)]


def test_ingest_finds_a_copy_under_two_labels_behind_a_look_alike_with_the_same_hash(tmp_path: Path) -> None:
    from pipeline.ingest import ingest_folder

    look_alike, picture, copy = _one_hash_three_pictures()
    assert len({fingerprint(image).phash for image in (look_alike, picture, copy)}) == 1
    for path, image in (("cats/a.png", look_alike), ("cats/b.png", picture), ("dogs/c.png", copy)):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        image.save(tmp_path / path)
    for index in range(3):      # unrelated photos, so each class has more than one picture
        for offset, label in enumerate(("cats", "dogs")):
            _photo(100 + 10 * offset + index).save(tmp_path / label / f"f{index}.png")
    result = ingest_folder(tmp_path, 10_000_000, workers=1, image_size=64, **_near_settings())
    rejected = dict(zip(result.rejected["path"], result.rejected["reason"]))
    # The copy is one picture under two labels; the look-alike, whose hash is the same, stays.
    assert sorted(rejected) == ["cats/b.png", "dogs/c.png"]
    assert "near copy of dogs/c.png (dogs): hashes 0 bits apart, SSIM 1.00" in rejected["cats/b.png"]
    assert "cats/a.png" in set(result.manifest["path"])


# --- groups ---------------------------------------------------------------------------------------

def test_groups_join_exact_copies_and_linked_pairs_transitively() -> None:
    sha = ["a", "b", "c", "d", "a", "e"]
    assert group_rows(sha, np.array([[0, 1], [1, 2]])).tolist() == [0, 0, 0, 3, 0, 5]
    assert group_rows(sha, np.array([[1, 2]])).tolist() == [0, 1, 1, 3, 0, 5]
    assert group_rows(sha, np.empty((0, 2), dtype=np.int64)).tolist() == [0, 1, 2, 3, 0, 5]


def test_no_chain_through_a_look_alike_the_thumbnails_refuse() -> None:
    # 0-1 a copy (confirmed), 1-2 hashes as close but another picture: 2 must not join 0 and 1.
    a = _blob(1)
    phashes, pixels = _rows([0x0, 0x3, 0xF], [a, np.clip(a.astype(int) - 10, 0, 255), _blob(6)])
    near = near_pairs(phashes, pixels, 4, 0.6)
    assert near.pairs.tolist() == [[0, 1], [0, 2], [1, 2]] and near.confirmed.tolist() == [True, False, False]
    assert group_rows(["x", "y", "z"], near.pairs[near.confirmed]).tolist() == [0, 0, 2]
    # Without the confirmation the three would be one group.
    assert group_rows(["x", "y", "z"], near.pairs).tolist() == [0, 0, 0]


def test_many_identical_hashes_are_one_group_without_all_pairs() -> None:
    count = 5_000
    a = _blob(3)
    phashes, _ = _rows([0xFF] * count, [])
    near = near_pairs(phashes, [a.tobytes()] * count, 8, 0.6)
    assert len(near.pairs) == count - 1 and near.confirmed.all()
    assert (group_rows([f"s{i}" for i in range(count)], near.pairs) == 0).all()


def test_group_of_each_row_is_its_groups_first_row() -> None:
    rng = np.random.default_rng(0)
    links = rng.integers(0, 200, size=(60, 2))
    sha = [f"s{int(rng.integers(0, 150))}" for _ in range(200)]
    first = group_rows(sha, links)
    for index, head in enumerate(first.tolist()):
        assert head <= index and first[head] == head
    for i, j in links.tolist():
        assert first[i] == first[j]
    for i, j in itertools.combinations(range(200), 2):
        if sha[i] == sha[j]:
            assert first[i] == first[j]


# --- proof on real photos: ingest and split, at the project's default distance --------------------

def _near_settings() -> dict:
    """The project's near-copy settings (params.yaml), as ingest_folder's keyword arguments."""
    from pipeline.params import load_params
    from tests.conftest import REPO_ROOT

    ingest = load_params(REPO_ROOT / "params.yaml").ingest
    return {"near_duplicate_distance": ingest.near_duplicate_distance,
            "near_duplicate_similarity": ingest.near_duplicate_similarity}


def _photo_folder_with_copies(root: Path, photos: dict[str, list[Image.Image]], across: dict[tuple[str, int], str],
                              ) -> dict[str, list[str]]:
    """Write each photo and its four near copies (bench.near_duplicates.NEAR_COPIES) under its class;
    ``across[(label, index)] = other`` puts that photo's copies under ``other`` instead. Returns the
    paths of each photo's family (original first)."""
    from bench.near_duplicates import NEAR_COPIES

    families = {}
    for label, images in photos.items():
        for index, image in enumerate(images):
            original = f"{label}/{label}{index:02d}.jpg"
            (root / label).mkdir(parents=True, exist_ok=True)
            image.convert("RGB").save(root / original, quality=95)
            family = [original]
            copy_label = across.get((label, index), label)
            for kind, make in NEAR_COPIES.items():
                name = f"{copy_label}/{label}{index:02d}_{kind.split()[0]}.jpg"
                (root / copy_label).mkdir(parents=True, exist_ok=True)
                make(image).save(root / name, quality=95)
                family.append(name)
            families[original] = family
    return families


def _check_families(root: Path, families: dict[str, list[str]], across: dict[tuple[str, int], str]) -> dict:
    """Ingest and split the folder; check the issue's four claims; return the split's leak check."""
    from pipeline.ingest import ingest_folder, summarise
    from pipeline.split import leak_check, split_dataset

    result = ingest_folder(root, 10_000_000, workers=1, image_size=64, **_near_settings())
    manifest = result.manifest.set_index("path")
    rejected = dict(zip(result.rejected["path"], result.rejected["reason"]))
    crossed = {f"{label}/{label}{index:02d}.jpg" for label, index in across}
    for original, family in families.items():
        if original in crossed:
            # Copies under another label: the whole family is left out, each with its reason.
            assert set(family) <= set(rejected), (original, sorted(rejected))
            assert all("one picture under several labels" in rejected[path] for path in family)
            assert not set(family) & set(manifest.index)
        else:
            # Every copy grouped with its original.
            assert set(family) <= set(manifest.index), (original, sorted(rejected))
            assert manifest.loc[family, "group"].nunique() == 1, manifest.loc[family, ["group", "phash"]]
    # Distinct photos are not grouped: one group per family kept.
    kept = [original for original in families if original not in crossed]
    assert manifest["group"].nunique() == len(kept)
    conflicts = {row.path for row in result.quality if row.check == "label_conflict"}
    assert conflicts == {path for original in crossed for path in families[original]}
    assert summarise(result)["near_duplicate_groups"] == len(kept)

    split = split_dataset(result.manifest, (0.6, 0.2, 0.2), seed=0)
    assert (split.groupby("group")["split"].nunique() == 1).all()      # no group straddles two splits
    leaks = leak_check(split, (0.6, 0.2, 0.2), seed=0)
    assert leaks["straddling_groups"] == 0 and leaks["near_duplicate_groups"] == len(kept)
    return leaks


def test_real_photos_near_copies_never_straddle_and_conflicts_are_left_out(tmp_path: Path) -> None:
    """scikit-learn's two photographs, cut into distinct crops: always available offline.

    Crops 2 and 3 are left out: they are plain sky, nearly one colour, and brightening saturates
    them to white (the hash then moves 28-34 bits: bench/near_duplicates.py lists every crop).
    A horizontal flip is not made a copy: a mirrored photo is a different picture to the hash (and
    a legitimate augmentation), and grouping it would need a second hash per image.
    """
    crops = [crop for index, crop in enumerate(_real_crops()) if index not in (2, 3)]
    photos = {"china_or_flower_a": crops[0:11], "china_or_flower_b": crops[11:22]}
    across = {("china_or_flower_a", 1): "china_or_flower_b", ("china_or_flower_b", 4): "china_or_flower_a"}
    families = _photo_folder_with_copies(tmp_path / "photos", photos, across)
    leaks = _check_families(tmp_path / "photos", families, across)
    # A split by bytes alone would have put some of these copies on both sides.
    assert leaks["leaks_prevented"] >= 1


def _catsdogs() -> Path | None:
    from tests.conftest import REPO_ROOT

    named = os.environ.get("BENCH_PHOTOS")
    folder = Path(named) if named else REPO_ROOT.parent / "shared" / "data" / "catsdogs-small"
    if (folder / "train").is_dir():
        folder = folder / "train"
    return folder if folder.is_dir() and any(folder.iterdir()) else None


STAND_IN_SIZES = [(200, 150), (150, 220), (320, 240), (100, 140), (256, 256), (180, 120)]
STAND_IN_NEAR_GROUPS = 4   # per class: a photo with an exact and a near copy, another with a near copy


def _stand_in_photos(root: Path) -> Path:
    """catsdogs-small's layout, generated: ``train/cat`` and ``train/dog``, twelve photo-like pictures
    each in several sizes (JPEG, and PNG in RGB, L and palette modes), then per class an exact copy and
    a JPEG q50 re-save of the first and a 90 % resize of the second, named to sort after the twelve."""
    from bench.near_duplicates import jpeg_50, resized_90

    folder = root / "train"
    for class_index, label in enumerate(("cat", "dog")):
        (folder / label).mkdir(parents=True)
        photos = []
        for index in range(12):
            photo = _photo(1000 + 100 * class_index + index, STAND_IN_SIZES[index % len(STAND_IN_SIZES)])
            if index % 4 == 3:
                photo.convert(("RGB", "L", "P")[index // 4]).save(folder / label / f"{label}.{index:02d}.png")
            else:
                photo.save(folder / label / f"{label}.{index:02d}.jpg", quality=90)
            photos.append(photo)
        shutil.copyfile(folder / label / f"{label}.00.jpg", folder / label / f"{label}.90.jpg")
        jpeg_50(photos[0]).save(folder / label / f"{label}.91.jpg", quality=95)
        resized_90(photos[1]).save(folder / label / f"{label}.92.jpg", quality=95)
    return folder


_NO_CATSDOGS = pytest.mark.skipif(_catsdogs() is None, reason="no photo folder: set BENCH_PHOTOS or place "
                                  "catsdogs-small at ../shared/data/catsdogs-small (its photos are never in the "
                                  "repository); the generated stand-in runs instead")


@pytest.fixture(params=["stand-in", pytest.param("catsdogs", marks=_NO_CATSDOGS)])
def photo_folder(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, int | None]:
    """A class-per-folder photo set and its number of near-copy groups, where known: the generated
    stand-in always, catsdogs-small where it is on this machine."""
    if request.param == "catsdogs":
        return _catsdogs(), None
    return _stand_in_photos(tmp_path / "stand-in"), STAND_IN_NEAR_GROUPS


def test_catsdogs_near_copies_never_straddle_and_conflicts_are_left_out(photo_folder: tuple[Path, int | None],
                                                                       tmp_path: Path) -> None:
    folder, _ = photo_folder
    photos = {}
    for label in sorted(p.name for p in folder.iterdir() if p.is_dir())[:2]:
        files = sorted((folder / label).iterdir())[:12]
        photos[label] = [Image.open(path).convert("RGB") for path in files]
    labels = list(photos)
    across = {(labels[0], 3): labels[1], (labels[1], 7): labels[0]}
    families = _photo_folder_with_copies(tmp_path / "photos", photos, across)
    _check_families(tmp_path / "photos", families, across)


def test_catsdogs_whole_folder_split_has_no_straddling_group(photo_folder: tuple[Path, int | None]) -> None:
    from pipeline.ingest import ingest_folder, summarise
    from pipeline.split import leak_check, split_dataset

    folder, planted = photo_folder
    result = ingest_folder(folder, 10_000_000, workers=2, image_size=64, **_near_settings())
    split = split_dataset(result.manifest, (0.8, 0.1, 0.1), seed=42)
    leaks = leak_check(split, (0.8, 0.1, 0.1), seed=42)
    assert leaks["straddling_groups"] == 0
    assert leaks["near_duplicate_groups"] == summarise(result)["near_duplicate_groups"]
    if planted is not None:
        # The stand-in's copies, and nothing else, are grouped: each with the photo it was made from.
        assert leaks["near_duplicate_groups"] == planted and summarise(result)["exact_duplicate_groups"] == 0
        groups = result.manifest.set_index("path")["group"]
        for label in ("cat", "dog"):
            assert groups[f"{label}/{label}.00.jpg"] == groups[f"{label}/{label}.90.jpg"] == \
                groups[f"{label}/{label}.91.jpg"]
            assert groups[f"{label}/{label}.01.jpg"] == groups[f"{label}/{label}.92.jpg"]
        assert groups.nunique() == len(groups) - 3 * 2


@_NO_CATSDOGS
def test_five_class_folder_links_no_look_alike_and_groups_the_copies(tmp_path: Path) -> None:
    """The issue's bar, on catsdogs-small/train at the project's settings: pairs of different pictures
    whose hashes are 8-12 bits apart (found among the photos, mirrored and upside down; planted in
    one class and across two) are never linked nor left out, and at least 97 % of the true copies
    (30 photos, each copied the 16 ways of bench.near_duplicates.COPY_KINDS) are grouped with
    their photo."""
    from bench.near_duplicates import COPY_KINDS, LOOK_ALIKE_VARIANTS, look_alikes
    from pipeline.ingest import ingest_folder
    from pipeline.images import decode_file

    files = sorted(path for path in _catsdogs().rglob("*") if path.is_file())
    photos = [decode_file(path).image.convert("RGB") for path in files]
    pairs, used = [], set()
    for photo, variant, other, other_variant, bits in look_alikes(photos, 12):
        if bits >= 8 and not {photo, other} & used:
            used |= {photo, other}
            pairs.append(((photo, variant), (other, other_variant)))
    assert len(pairs) >= 20, len(pairs)
    classes = [f"class{index}" for index in range(5)]
    root = tmp_path / "five"
    for label in classes:
        (root / label).mkdir(parents=True)
    planted = []
    for number, sides in enumerate(pairs):
        # Even pairs in one class (a wrong link would merge strangers), odd ones across two (it would drop both).
        names = []
        for side, (photo, variant) in enumerate(sides):
            label = classes[(number + side * (number % 2)) % 5]
            names.append(f"{label}/look{number:03d}_{side}.png")       # PNG: the pixels, hence the hash, as found
            LOOK_ALIKE_VARIANTS[variant](photos[photo]).save(root / names[-1])
        planted.append(tuple(names))
    families = {}
    for number, photo in enumerate(index for index in range(0, len(photos), 7) if index not in used):
        if number == 30:
            break
        label = classes[number % 5]
        original = f"{label}/photo{number:02d}.jpg"
        photos[photo].save(root / original, quality=95)
        families[original] = []
        for kind_number, make in enumerate(COPY_KINDS.values()):
            name = f"{label}/photo{number:02d}_copy{kind_number:02d}.jpg"
            make(photos[photo]).save(root / name, quality=95)
            families[original].append(name)

    settings = _near_settings()
    result = ingest_folder(root, 10_000_000, workers=1, image_size=64, **settings)

    assert result.rejected.empty, result.rejected.to_dict("records")
    phash = result.manifest.set_index("path")["phash"]
    bits = [int(hamming(int(phash[a], 16), int(phash[b], 16))) for a, b in planted]
    assert min(bits) >= 8 and max(bits) <= 12 and sum(b <= settings["near_duplicate_distance"] for b in bits) >= 3
    groups = result.manifest.set_index("path")["group"]
    assert [(a, b) for a, b in planted if groups[a] == groups[b]] == []
    grouped = [groups[copy] == groups[original] for original, copies in families.items() for copy in copies]
    assert sum(grouped) / len(grouped) >= 0.97, sum(grouped) / len(grouped)
    # At 12 bits every planted pair is a candidate of the hash search: the confirmation refuses them all.
    wider = ingest_folder(root, 10_000_000, workers=1, image_size=64, **{**settings, "near_duplicate_distance": 12})
    groups = wider.manifest.set_index("path")["group"]
    assert wider.rejected.empty and wider.health["near_duplicate_candidates"] >= len(planted)
    assert [(a, b) for a, b in planted if groups[a] == groups[b]] == []
