"""Turning dataset rows (image, caption, image id, teacher and cached-tower features) into ``CusaModel`` batches.

Rows come with their features in them: a training split whose image features sit in per-image tables is joined as
batches are drawn (``cusa_hf.teachers.training_split``), so the collator knows nothing of how features are stored."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .backbones import BackboneAdapter
from .images import load_image
from .schema import (
    CAPTION_COLUMN,
    IMAGE_COLUMN,
    IMAGE_ID_COLUMN,
    IMAGE_TOWER_COLUMN,
    TEACHER_IMAGE_COLUMN,
    TEACHER_TEXT_COLUMN,
    TEXT_TOWER_COLUMN,
    is_caption,
    stable_image_id,
)
from .training_checks import NonFiniteTrainingError


class CusaDataCollator:
    """Turns dataset rows (image, caption, image id, teacher features) into ``CusaModel`` inputs.

    Args:
        processor: a transformers processor with ``image_processor`` and ``tokenizer`` attributes (``CLIPProcessor``,
            ``VisionTextDualEncoderProcessor``, ...).
        image_column, caption_column, image_id_column: dataset column names. The image column may hold
            ``PIL.Image``/``datasets.Image`` values or file paths (relative ones resolved against ``image_root``).
        teacher_image_column, teacher_text_column: teacher-feature columns; copied into the batch when present.
        image_tower_column: cached output of a frozen vision tower (``cusa_hf.add_image_tower_features``); when
            present it is batched as ``image_tower_features`` and no image is loaded.
        text_tower_column: cached output of a frozen text tower (``cusa_hf.add_text_tower_features``); when present it
            is batched as ``text_tower_features`` and no caption is tokenised.
        max_length: captions are truncated to this many tokens (defaults to the backbone's caption length: the
            tokenizer's limit, 77 for CLIP; 64 for SigLIP).
        backbone_adapter: the adapter class whose ``tokenize_captions`` tokenizes captions as the backbone's processor
            does (SigLIP pads them to 64 tokens); ``CusaTrainer`` sets its model's when this is ``None``, otherwise
            captions are padded to the batch's longest.

    Example:
        >>> split = open_feature_split(train)   # cusa_hf.teachers.training_split: joins per-image features
        >>> batch = split.collate_with(CusaDataCollator(processor))([train[row] for row in range(4)])
        >>> batch["teacher_image_embeds"].shape
        torch.Size([4, 1280])
    """

    def __init__(
        self,
        processor: Any,
        image_column: str = IMAGE_COLUMN,
        caption_column: str = CAPTION_COLUMN,
        image_id_column: str = IMAGE_ID_COLUMN,
        teacher_image_column: str = TEACHER_IMAGE_COLUMN,
        teacher_text_column: str = TEACHER_TEXT_COLUMN,
        image_tower_column: str = IMAGE_TOWER_COLUMN,
        text_tower_column: str = TEXT_TOWER_COLUMN,
        image_root: str | None = None,
        max_length: int | None = None,
        backbone_adapter: type[BackboneAdapter] | None = None,
    ):
        for attribute in ("image_processor", "tokenizer"):
            if getattr(processor, attribute, None) is None:
                raise ValueError(
                    f"the processor {type(processor).__name__} has no {attribute}; pass a processor that bundles an "
                    "image processor and a tokenizer (e.g. CLIPProcessor or VisionTextDualEncoderProcessor)"
                )
        self.processor = processor
        self.image_column = image_column
        self.caption_column = caption_column
        self.image_id_column = image_id_column
        self.teacher_image_column = teacher_image_column
        self.teacher_text_column = teacher_text_column
        self.image_tower_column = image_tower_column
        self.text_tower_column = text_tower_column
        self.image_root = image_root
        self.max_length = max_length
        self.backbone_adapter = backbone_adapter

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("the collator got an empty batch")
        cached_tower = self.image_tower_column in rows[0]
        for column in (self.caption_column,) if cached_tower else (self.image_column, self.caption_column):
            if column not in rows[0]:
                raise ValueError(
                    f"dataset rows have no {column!r} column (columns: {sorted(rows[0])}); set the collator's column "
                    "names or rename the column"
                )
        captions = []
        for position, row in enumerate(rows):
            caption = row[self.caption_column]
            if not is_caption(caption):
                raise ValueError(
                    f"empty or non-text caption {caption!r} at batch position {position} "
                    f"(image {row.get(self.image_column)!r}); clean the data or load it with skip_invalid=True"
                )
            captions.append(caption)
        if cached_tower:
            batch = {"image_tower_features": _stack_column(rows, self.image_tower_column)}
        else:
            images = [
                load_image(row[self.image_column], self.image_root, where=f"batch position {position}")
                for position, row in enumerate(rows)
            ]
            batch = dict(self.processor.image_processor(images=images, return_tensors="pt"))
        if self.text_tower_column in rows[0]:
            batch["text_tower_features"] = _stack_column(rows, self.text_tower_column)
        else:
            tokenization = self.backbone_adapter or BackboneAdapter
            text = tokenization.tokenize_captions(self.processor.tokenizer, captions, self.max_length)
            batch["input_ids"] = text["input_ids"]
            if "attention_mask" in text:
                batch["attention_mask"] = text["attention_mask"]
        if self.image_id_column in rows[0]:
            batch["image_ids"] = torch.tensor(
                [stable_image_id(row[self.image_id_column]) for row in rows], dtype=torch.long
            )
        for column, key in (
            (self.teacher_image_column, TEACHER_IMAGE_COLUMN),
            (self.teacher_text_column, TEACHER_TEXT_COLUMN),
        ):
            if column in rows[0]:
                batch[key] = self._finite_features(rows, column)
        return batch

    def _finite_features(self, rows: Sequence[dict[str, Any]], column: str) -> torch.Tensor:
        """The stacked feature column; :class:`NonFiniteTrainingError` naming the first row with a NaN or infinite
        value. A map-style training set is checked whole before training, a stream's rows only here (a NaN teacher
        feature would make the loss and then every weight NaN)."""
        values = _stack_column(rows, column)
        finite = torch.isfinite(values).all(dim=1)
        if not finite.all():
            position = int((~finite).nonzero()[0])
            row = rows[position]
            raise NonFiniteTrainingError(
                f"{column} of the row at batch position {position} (image_id {row.get(self.image_id_column)!r}, caption "
                f"{row.get(self.caption_column)!r}) holds NaN or infinite values; recompute the features of that row "
                "(cusa_hf.teachers.features.add_teacher_features) or leave it out"
            )
        return values


def _stack_column(rows: Sequence[dict[str, Any]], column: str) -> torch.Tensor:
    """`(len(rows), dim)` float32 tensor of a fixed-length feature column (through numpy: torch.tensor on nested
    Python lists is several times slower)."""
    return torch.from_numpy(np.asarray([row[column] for row in rows], dtype=np.float32))
