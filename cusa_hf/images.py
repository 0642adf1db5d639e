"""Opening one dataset image value (a ``PIL.Image``, a ``datasets.Image`` dict or a file path) as RGB, with errors
that name the file and the row."""

from __future__ import annotations

import os
from typing import Any

from PIL import Image, UnidentifiedImageError


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
        return value.convert("RGB")
    source: Any = value
    label = where or "image"
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            import io

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
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(f"{label}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise BadImageError(f"{label}: cannot decode image ({error})") from None


def resolve_image_path(path: str, image_root: str | os.PathLike | None) -> str:
    """``path`` itself when absolute (or without ``image_root``), else joined to ``image_root``."""
    if image_root is None or os.path.isabs(path):
        return path
    return os.path.join(os.fspath(image_root), path)
