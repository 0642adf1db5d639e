"""The data schema helpers that loaders, collator, evaluation view and feature caches share."""

import pytest

from cusa_hf.schema import first_row_per_image, is_caption, stable_image_id


def test_is_caption_needs_non_blank_text():
    assert is_caption("a dog")
    for value in ("", "   \n", None, 3, ["a dog"]):
        assert not is_caption(value)


def test_first_row_per_image_groups_in_order_of_first_appearance():
    assert first_row_per_image([7, 3, 7, 5, 3]) == {7: 0, 3: 1, 5: 3}
    assert list(first_row_per_image(["b", "a", "b"])) == ["b", "a"]


def test_first_row_per_image_refuses_one_id_for_two_images():
    assert first_row_per_image([1, 1], ["x.jpg", "x.jpg"]) == {1: 0}
    with pytest.raises(ValueError, match=r"image_id 1 names two different images: 'x.jpg' \(row 0\) and 'y.jpg' \(row 2\)"):
        first_row_per_image([1, 2, 1], ["x.jpg", "z.jpg", "y.jpg"])


def test_stable_image_id_is_the_same_in_every_process_and_keeps_types_apart():
    assert stable_image_id(5) == 5
    assert stable_image_id("5") != 5
    with pytest.raises(ValueError, match="bool"):
        stable_image_id(True)
