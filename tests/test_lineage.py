"""The images a model learned from, read back and compared with today's test images (pure functions)."""

from __future__ import annotations

import pytest

from pipeline.lineage import hashes_of, overlap, read_seen_images, seen_images_text


def test_the_record_is_each_hash_once_sorted_one_a_line_and_reads_back() -> None:
    text = seen_images_text(["cc", "aa", "bb", "aa"])
    assert text == "aa\nbb\ncc\n"
    assert read_seen_images(text) == {"aa", "bb", "cc"}
    assert read_seen_images("aa\n\n  bb  \r\n") == {"aa", "bb"}
    assert read_seen_images(seen_images_text([])) == set()


def test_overlap_counts_each_test_image_whose_content_was_seen() -> None:
    seen = {"aa", "bb", "cc"}
    assert overlap(seen, ["aa", "dd", "cc", "ee"]) == 2
    assert overlap(seen, ["aa", "aa"]) == 2          # two test files with the same content: both biased
    assert overlap(seen, ["dd", "ee"]) == 0
    assert overlap(set(), ["aa"]) == 0


def test_test_images_are_hashed_by_their_manifest_path_and_an_unknown_path_is_named() -> None:
    by_path = {"a/1.png": "aa", "b/renamed.png": "bb"}
    assert hashes_of(["b/renamed.png", "a/1.png"], by_path) == ["bb", "aa"]
    with pytest.raises(KeyError, match="c/3.png"):
        hashes_of(["c/3.png"], by_path)
