"""The evaluation view of a retrieval split: its unique images, all captions and the maps between them, built once
(decoding nothing) and used by every metric and scorer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..images import load_image
from ..schema import (
    CAPTION_COLUMN,
    IMAGE_COLUMN,
    IMAGE_ID_COLUMN,
    IMAGE_TOWER_COLUMN,
    TEXT_TOWER_COLUMN,
    first_row_per_image,
    is_caption,
    normalize_image_ids,
)
from ..teachers.image_tables import image_feature_tables


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
        image_tower_features: optional `(n_images, image_tower_dim)` cached output of a frozen vision tower, one row
            per entry of ``images`` (``cusa_hf.add_image_tower_features``); evaluation then projects it instead of
            running the tower.
        text_tower_features: optional `(n_texts, text_tower_dim)` cached output of a frozen text tower, one row per
            caption (``cusa_hf.add_text_tower_features``).
    """

    images: list[Any]
    image_ids: list[Any]
    captions: list[str]
    text_to_image: torch.Tensor
    image_to_texts: list[list[int]]
    image_root: str | None = None
    image_tower_features: torch.Tensor | None = None
    text_tower_features: torch.Tensor | None = None

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
        first_row = first_row_per_image(image_ids)
        index_of = {image_id: index for index, image_id in enumerate(first_row)}
        unique_images = [images[row] for row in first_row.values()]
        text_to_image = [index_of[image_id] for image_id in image_ids]
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


def build_eval_view(
    dataset: datasets.Dataset,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
    image_id_column: str = IMAGE_ID_COLUMN,
    image_root: str | os.PathLike | None = None,
    image_tower_column: str | None = IMAGE_TOWER_COLUMN,
    text_tower_column: str | None = TEXT_TOWER_COLUMN,
) -> RetrievalEvalView:
    """The evaluation view (unique images, all captions, caption->image and image->captions maps), built once.

    Accepts one row per caption or one row per image with a caption list. Images are grouped by ``image_id``
    (by the image path when the dataset has no id column). Only the first row's image of each id is read, and
    ``datasets.Image`` values are kept undecoded (``{"path", "bytes"}``), so building the view decodes nothing.
    Cached frozen-tower columns are carried into the view when the dataset has them: one row per caption, or (the
    image tower) rows pointing into a per-image table, which is joined here.

    Raises:
        ValueError: a column is missing, or one image id maps to two different image paths.
    """
    for column in (image_column, caption_column):
        if column not in dataset.column_names:
            raise ValueError(f"the evaluation dataset has no {column!r} column; its columns are {dataset.column_names}")
    is_image_feature = isinstance(dataset.features[image_column], datasets.Image)
    if is_image_feature:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    path_images = None if is_image_feature else dataset[image_column]
    if image_id_column in dataset.column_names:
        row_ids = normalize_image_ids(dataset[image_id_column])
    elif path_images is not None:
        row_ids = list(path_images)
    else:
        raise ValueError(
            f"the evaluation dataset has no {image_id_column!r} column and its images are not paths, so captions "
            "cannot be grouped by image; add an image id column"
        )
    first_row = first_row_per_image(row_ids, path_images, id_column="image id")
    if path_images is not None:
        unique_images = [path_images[row] for row in first_row.values()]
    else:
        unique_images = dataset.select(list(first_row.values()))[image_column]
    image_of_id = dict(zip(first_row, unique_images))
    images, captions, ids = [], [], []
    for row, caption_value in enumerate(dataset[caption_column]):
        row_captions = caption_value if isinstance(caption_value, (list, tuple)) else [caption_value]
        for caption in row_captions:
            if not is_caption(caption):
                raise ValueError(f"evaluation row {row}: empty or non-text caption {caption!r} in {caption_column!r}")
            images.append(image_of_id[row_ids[row]])
            captions.append(caption)
            ids.append(row_ids[row])
    view = RetrievalEvalView.from_rows(
        images, captions, ids, image_root=os.fspath(image_root) if image_root is not None else None
    )
    tables = image_feature_tables(dataset)
    if image_tower_column in tables:
        table = tables[image_tower_column]
        first_rows = dataset.select(list(first_row.values()))[table.index_column]
        view.image_tower_features = torch.from_numpy(table.take(first_rows))
    for column, attribute, rows in (
        (image_tower_column, "image_tower_features", list(first_row.values())),
        (text_tower_column, "text_tower_features", None),
    ):
        if column is not None and column in dataset.column_names:
            if rows is None and len(captions) != len(dataset):
                raise ValueError(f"column {column!r} needs one row per caption; this split has caption lists")
            table = np.asarray(dataset.with_format("numpy", columns=[column])[column], dtype=np.float32)
            setattr(view, attribute, torch.from_numpy(table if rows is None else table[rows]))
    return view


def encode_eval_view_images(
    eval_view: RetrievalEvalView,
    image_processor: Any,
    encode: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 64,
    show_progress: bool = True,
    desc: str = "Images",
) -> torch.Tensor:
    """``encode(pixel_values)`` of the view's unique images, in order, concatenated: each batch loaded and processed on
    the CPU, then moved to ``device`` in ``dtype`` (for scorers that keep per-image sequences, such as the ITM scorers
    of fusion backbones)."""
    encoded = []
    for start in tqdm(range(0, eval_view.num_images, batch_size), desc=desc, disable=not show_progress):
        images = [
            load_image(value, eval_view.image_root, where=f"image {start + offset}")
            for offset, value in enumerate(eval_view.images[start : start + batch_size])
        ]
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        encoded.append(encode(pixel_values.to(device, dtype)))
    return torch.cat(encoded)
