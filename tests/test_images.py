"""cusa_hf.images.load_image: every Pillow mode becomes the 8-bit RGB picture it shows (16- and 32-bit levels scaled,
transparency composited on white), from a file, a PIL image or a datasets.Image value; what cannot be shown
faithfully, or is too large to decode safely, is refused naming the file."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from cusa_hf.images import BadImageError, load_image

GREY_30000 = round(30000 / 65535 * 255)  # 117


def uniform(mode: str, value, size=(6, 4)) -> Image.Image:
    return Image.new(mode, size, value)


def pixels(image: Image.Image) -> set[tuple[int, int, int]]:
    assert image.mode == "RGB"
    return set(map(tuple, np.asarray(image).reshape(-1, 3).tolist()))


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("I;16", 30000, (GREY_30000,) * 3),
        ("I;16B", 30000, (GREY_30000,) * 3),
        ("I;16L", 65535, (255, 255, 255)),
        ("I", 30000, (GREY_30000,) * 3),  # how older Pillow versions read 16-bit PNGs
        ("F", 0.5, (128, 128, 128)),
        ("L", 30, (30, 30, 30)),
        ("1", 1, (255, 255, 255)),
        ("P", 0, (0, 0, 0)),
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (200, 0, 0, 0), (255, 255, 255)),  # fully transparent: the white background
        ("RGBA", (200, 0, 0, 255), (200, 0, 0)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),
        ("LA", (0, 128), (127, 127, 127)),
    ],
)
def test_every_mode_becomes_the_rgb_picture_it_shows(mode, value, expected):
    image = uniform(mode, value)
    for observed in (pixels(load_image(image)), pixels(load_image(image.copy()))):
        assert len(observed) == 1
        assert np.allclose(next(iter(observed)), expected, atol=1), (mode, observed, expected)


@pytest.mark.parametrize("bits", [8, 16])
def test_a_16_bit_greyscale_png_file_is_grey_not_white(tmp_path, bits):
    level = 30000 if bits == 16 else GREY_30000
    image = uniform("I;16" if bits == 16 else "L", level)
    path = tmp_path / f"grey{bits}.png"
    image.save(path)
    expected = {(GREY_30000,) * 3}
    assert pixels(load_image(str(path))) == expected
    assert pixels(load_image({"path": None, "bytes": path.read_bytes()})) == expected


def test_palette_and_colour_key_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1  # palette entry 1 (red) is transparent
    path = tmp_path / "palette.png"
    palette.save(path, transparency=1)
    assert pixels(load_image(str(path))) == {(255, 255, 255)}
    keyed = Image.new("RGB", (4, 4), (0, 255, 0))
    keyed.save(tmp_path / "keyed.png", transparency=(0, 255, 0))
    assert pixels(load_image(str(tmp_path / "keyed.png"))) == {(255, 255, 255)}


def test_levels_that_cannot_be_read_faithfully_are_refused_naming_the_file(tmp_path):
    with pytest.raises(BadImageError, match=r"row 3: a 32-bit floating-point image with values in \[7.5, 7.5\]"):
        load_image(uniform("F", 7.5), where="row 3")
    wide = Image.fromarray(np.full((4, 4), 2**20, dtype=np.int32), "I")
    with pytest.raises(BadImageError, match=r"a 32-bit integer image with values in \[1048576, 1048576\]"):
        load_image(wide)


def test_a_decompression_bomb_is_a_bad_image_that_skip_invalid_skips(tmp_path, monkeypatch):
    import datasets

    from cusa_hf.data import drop_undecodable_images

    big = tmp_path / "bomb.png"
    Image.new("L", (300, 300), 0).save(big)
    small = tmp_path / "small.png"
    Image.new("L", (4, 4), 0).save(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(BadImageError, match=r"bomb.png: too large to decode safely \(Image size \(90000 pixels\)"):
            load_image(str(big))
        rows = datasets.Dataset.from_dict({"image": [str(big), str(small)], "caption": ["a", "b"], "image_id": [1, 2]})
        with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) that do not decode.*bomb.png"):
            kept = drop_undecodable_images(rows, show_progress=False)
    assert kept["image_id"] == [2]


def test_image_bytes_in_a_datasets_value_are_read_as_well(tmp_path):
    buffer = io.BytesIO()
    uniform("RGBA", (0, 0, 255, 0)).save(buffer, format="PNG")
    assert pixels(load_image({"path": "x.png", "bytes": buffer.getvalue()})) == {(255, 255, 255)}


def test_a_photo_stored_sideways_with_an_exif_orientation_loads_upright(tmp_path):
    import datasets

    from cusa_hf.evaluation.encoding import encode_images
    from tiny_models import tiny_clip_processor, tiny_cusa_model

    upright = Image.new("RGB", (40, 20), (250, 250, 250))
    upright.paste((200, 20, 20), (0, 0, 20, 20))  # red on the left half
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # the camera's sensor order: 20 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright.save(tmp_path / "upright.jpg", quality=95)

    for value in (str(tmp_path / "phone.jpg"), {"bytes": (tmp_path / "phone.jpg").read_bytes(), "path": None},
                  Image.open(tmp_path / "phone.jpg")):  # fmt: skip
        loaded = load_image(value)
        assert loaded.size == (40, 20)
        assert np.abs(np.asarray(loaded, dtype=float) - np.asarray(upright, dtype=float)).mean() < 8
    # Through the encoders that training, evaluation and search use: as the upright file.
    model, processor = tiny_cusa_model(0).eval(), tiny_clip_processor()
    column = datasets.Dataset.from_dict({"image": [str(tmp_path / "phone.jpg"), str(tmp_path / "upright.jpg")]})
    embeddings = encode_images(model, column["image"], processor.image_processor, 2, "cross", show_progress=False)
    assert float(embeddings[0] @ embeddings[1]) > 0.99
