"""Opening one dataset image value (a ``PIL.Image``, a ``datasets.Image`` dict or a file path) as the 8-bit RGB
picture it shows (upright, by its EXIF orientation), with errors that name the file and the row."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: The EXIF tag that says how a stored picture is turned (1: upright).
EXIF_ORIENTATION = 0x0112
#: Modes with an alpha channel, composited on white (a transparent background shows as white, as in a viewer).
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class BadImageError(ValueError):
    """An image that cannot be opened or decoded; the message names the file (or row) and the reason."""


def load_image(value: Any, image_root: str | os.PathLike | None = None, where: str = "") -> Image.Image:
    """Open one dataset image value as an RGB ``PIL.Image``.

    Args:
        value: a ``PIL.Image``, a ``datasets.Image`` decoded dict (``{"path", "bytes"}``) or a file path, absolute or
            relative to ``image_root``.
        image_root: folder that relative paths are resolved against.
        where: a description of the row (e.g. ``"row 17"``) used in error messages.

    Raises:
        BadImageError: the file is missing, truncated or not an image; the message names the file and the row.
    """
    if isinstance(value, Image.Image):
        return to_rgb(value, where or "image")
    source: Any = value
    label = where or "image"
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            source = io.BytesIO(value["bytes"])
            label = f"{where} ({value.get('path') or 'in-memory bytes'})".strip()
        elif value.get("path"):
            source = value["path"]
        else:
            raise BadImageError(f"{label}: image value has neither 'bytes' nor 'path': {value!r}")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if image_root is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(image_root), path)
        source = path
        label = f"{where} ({path})".strip() if where else path
        if os.path.exists(path) and not os.path.isfile(path):
            # A FIFO or device would block the reader forever; a folder is a wrong path.
            raise BadImageError(f"{label}: not a regular file, so not an image")
    try:
        with Image.open(source) as image:
            return to_rgb(image, label)
    except FileNotFoundError:
        raise BadImageError(f"{label}: image file not found") from None
    except Image.DecompressionBombError as error:
        raise BadImageError(
            f"{label}: too large to decode safely ({error}); if the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"{label}: cannot decode image ({error})") from None


def to_rgb(image: Image.Image, label: str = "image") -> Image.Image:
    """``image`` as the 8-bit RGB picture it shows.

    16-bit greyscale (``I;16*``, and ``I`` holding 16-bit levels, as older Pillow reads 16-bit PNGs) is scaled from
    0-65535, 32-bit floating point (``F``) from 0-1; transparency (an alpha channel, or a palette or colour-key
    ``transparency``) is composited on white; every other mode converts as Pillow converts it. Pillow's own
    conversion would clip the 16- and 32-bit levels to 255 (a mid-grey 16-bit image would come out white) and drop
    the alpha channel (a transparent background would show whatever colour its pixels hold).

    An EXIF orientation (a phone photo stored sideways with a tag saying how to turn it) is applied first
    (``ImageOps.exif_transpose``), so the picture is upright as every viewer shows it: training, teachers,
    evaluation and search all open images here.

    Raises:
        BadImageError: an ``I`` or ``F`` image whose levels fit no such range (its scale is unknown), naming ``label``.
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        levels = np.asarray(image)
        scale = 1.0 if mode == "F" else 65535.0
        low, high = (levels.min(), levels.max()) if levels.size else (0, 0)
        if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= scale):
            kind = "floating-point" if mode == "F" else "integer"
            raise BadImageError(
                f"{label}: a 32-bit {kind} image with values in [{low}, {high}], outside the range cusa-hf reads "
                f"such images in (0 to {scale:g}), so its brightness scale is unknown; save it as an 8- or 16-bit image"
            )
        grey = np.rint(levels.astype(np.float64) * (255.0 / scale)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resolve_image_path(path: str, image_root: str | os.PathLike | None) -> str:
    """``path`` itself when absolute (or without ``image_root``), else joined to ``image_root``."""
    if image_root is None or os.path.isabs(path):
        return path
    return os.path.join(os.fspath(image_root), path)
