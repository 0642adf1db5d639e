"""Image-text retrieval data: loading images, and the evaluation view the metrics need."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
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
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(f"{label}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise BadImageError(f"{label}: cannot decode image ({error})") from None


@dataclass
class RetrievalEvalView:
    """Everything retrieval metrics need about an evaluation split, built once.

    Attributes:
        images: one image value (path, ``PIL.Image`` or ``datasets.Image`` dict) per unique image, in order of first
            appearance in the split.
        image_ids: the image id of each entry of ``images``.
        captions: every caption of the split, in row order.
        text_to_image: `(n_texts,)` long tensor; ``text_to_image[t]`` is the index in ``images`` of caption t's image.
        image_to_texts: for each image, the indices in ``captions`` of its captions.
        image_root: folder that relative image paths are resolved against.
    """

    images: list[Any]
    image_ids: list[Any]
    captions: list[str]
    text_to_image: torch.Tensor
    image_to_texts: list[list[int]]
    image_root: str | None = None

    @classmethod
    def from_rows(
        cls,
        images: Sequence[Any],
        captions: Sequence[str],
        image_ids: Sequence[Any],
        image_root: str | None = None,
    ) -> "RetrievalEvalView":
        """Build the view from one-row-per-caption columns (images repeat across their captions)."""
        if not (len(images) == len(captions) == len(image_ids)):
            raise ValueError(
                f"columns differ in length: {len(images)} images, {len(captions)} captions, {len(image_ids)} image ids"
            )
        if len(captions) == 0:
            raise ValueError("the evaluation split is empty: it has no captions")
        index_of: dict[Any, int] = {}
        unique_images: list[Any] = []
        text_to_image: list[int] = []
        for image, image_id in zip(images, image_ids):
            if image_id not in index_of:
                index_of[image_id] = len(unique_images)
                unique_images.append(image)
            text_to_image.append(index_of[image_id])
        image_to_texts: list[list[int]] = [[] for _ in unique_images]
        for text_index, image_index in enumerate(text_to_image):
            image_to_texts[image_index].append(text_index)
        return cls(
            images=unique_images,
            image_ids=list(index_of),
            captions=list(captions),
            text_to_image=torch.tensor(text_to_image, dtype=torch.long),
            image_to_texts=image_to_texts,
            image_root=image_root,
        )

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_texts(self) -> int:
        return len(self.captions)
