"""Region features for SGRAF: the SCAN precomputed format, a grid-feature extractor, and the training collator.

**Format** (one split, in one folder; the SCAN/SGRAF release layout plus two optional files):

* ``{split}_ims.npy``: float32 `(n_images, num_regions, feature_dim)`, read memory-mapped (COCO train is ~33 GB);
* ``{split}_caps.txt``: one caption per line (UTF-8);
* ``{split}_image_ids.txt`` (optional): one image id per row of ``_ims.npy``;
* ``{split}_text_to_image.txt`` (optional): for each caption line, the row of its image in ``_ims.npy``.

Without ``_text_to_image.txt`` the SCAN rule applies: as many captions as images means caption k belongs to image k;
five times as many means image ``k // 5``; any other ratio is an error (the original silently assumed five).

**Grid features** (:func:`extract_grid_features`): BUTD Faster R-CNN features need detector weights that cannot be
downloaded here, so images are encoded by the offline ImageNet EfficientNet-Lite (timm ``tf_efficientnet_lite{0,1,2}``)
and its last feature map is average-pooled to a 6 x 6 grid: 36 "regions" of 1280 dims, so ``num_regions=36`` as in
the original and ``img_dim=1280`` (released checkpoints, trained on 2048-d BUTD features, do not take them).

**Training inputs** (:class:`SgrafDataCollator`): rows hold the image's row index in a feature array (``image``), the
caption, its image id and optional teacher features; the batch has the keys ``CusaModel.forward`` takes, with
``pixel_values`` = region features `(batch, num_regions, feature_dim)`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...data import load_json_dataset
from ...evaluation.eval_view import RetrievalEvalView
from ...images import load_image
from ...offline_models import efficientnet_lite_timm
from ...schema import TEACHER_IMAGE_COLUMN, TEACHER_TEXT_COLUMN, stable_image_id
from .adapter import SgrafAdapter

SCAN_CAPTIONS_PER_IMAGE = 5


def _split_file(data_dir: str | os.PathLike, split: str, suffix: str) -> Path:
    return Path(data_dir) / f"{split}_{suffix}"


@dataclass
class RegionFeatureSplit:
    """One split of precomputed region features and its captions.

    Attributes:
        features: `(n_images, num_regions, feature_dim)` float32 array (memory-mapped when loaded from disk).
        captions: every caption, in file order.
        text_to_image: `(n_captions,)` long tensor: the feature row of each caption's image.
        image_ids: one id per feature row (the row index when the split has no ``_image_ids.txt``).
    """

    features: np.ndarray
    captions: list[str]
    text_to_image: torch.Tensor
    image_ids: list[Any]

    @classmethod
    def load(cls, data_dir: str | os.PathLike, split: str, mmap: bool = True) -> "RegionFeatureSplit":
        """Read ``{split}_ims.npy`` (memory-mapped unless ``mmap=False``) and ``{split}_caps.txt`` (+ optional files)."""
        features_path = _split_file(data_dir, split, "ims.npy")
        captions_path = _split_file(data_dir, split, "caps.txt")
        for path in (features_path, captions_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; a SCAN-format split needs {split}_ims.npy and {split}_caps.txt")
        features = np.load(features_path, mmap_mode="r" if mmap else None)
        if features.ndim != 3:
            raise ValueError(f"{features_path}: expected (n_images, num_regions, feature_dim), got shape {features.shape}")
        with open(captions_path, "rb") as handle:  # bytes then decode, as the python3.6 original reads them
            captions = [line.strip().decode("utf-8") for line in handle]
        empty = [number + 1 for number, caption in enumerate(captions) if not caption]
        if empty:
            raise ValueError(f"{captions_path}: empty captions on lines {empty[:10]}")
        n_images, n_captions = features.shape[0], len(captions)

        mapping_path = _split_file(data_dir, split, "text_to_image.txt")
        if mapping_path.is_file():
            text_to_image = torch.tensor([int(line) for line in mapping_path.read_text().split()], dtype=torch.long)
            if len(text_to_image) != n_captions:
                raise ValueError(f"{mapping_path}: {len(text_to_image)} entries for {n_captions} captions in {captions_path}")
            if len(text_to_image) and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
                raise ValueError(f"{mapping_path}: image rows must lie in [0, {n_images}) ({features_path})")
        elif n_captions == n_images:
            text_to_image = torch.arange(n_captions)
        elif n_captions == SCAN_CAPTIONS_PER_IMAGE * n_images:
            text_to_image = torch.arange(n_captions) // SCAN_CAPTIONS_PER_IMAGE
        else:
            raise ValueError(
                f"{captions_path} has {n_captions} captions for {n_images} images in {features_path}: the SCAN layout "
                f"needs 1 or {SCAN_CAPTIONS_PER_IMAGE} captions per image; add {mapping_path.name} for other layouts"
            )

        ids_path = _split_file(data_dir, split, "image_ids.txt")
        if ids_path.is_file():
            image_ids = ids_path.read_text(encoding="utf-8").splitlines()
            if len(image_ids) != n_images:
                raise ValueError(f"{ids_path}: {len(image_ids)} ids for {n_images} images in {features_path}")
        else:
            image_ids = list(range(n_images))
        return cls(features=features, captions=captions, text_to_image=text_to_image, image_ids=image_ids)

    def save(self, data_dir: str | os.PathLike, split: str) -> None:
        """Write the split in the format :meth:`load` reads (``_text_to_image.txt`` only when not SCAN-implied)."""
        os.makedirs(data_dir, exist_ok=True)
        np.save(_split_file(data_dir, split, "ims.npy"), np.asarray(self.features, dtype=np.float32))
        _write_text_files(data_dir, split, self.captions, self.text_to_image, self.image_ids, len(self.features))

    def rows(self) -> list[dict[str, Any]]:
        """One training row per caption: ``{"image": feature row, "caption", "image_id"}``."""
        return [
            {"image": int(row), "caption": caption, "image_id": self.image_ids[int(row)]}
            for caption, row in zip(self.captions, self.text_to_image)
        ]

    def eval_view(self) -> RetrievalEvalView:
        """The split as a ``RetrievalEvalView`` whose images are feature rows (in order, so image i = row i)."""
        view = RetrievalEvalView.from_rows(
            [int(row) for row in self.text_to_image], self.captions, [int(row) for row in self.text_to_image]
        )
        if view.images != list(range(len(self.features))):
            raise ValueError("every feature row needs at least one caption, in row order, to be an evaluation split")
        view.image_ids = list(self.image_ids)
        return view


def _write_text_files(data_dir, split, captions, text_to_image, image_ids, n_images) -> None:
    if any("\n" in caption or "\r" in caption for caption in captions):
        raise ValueError("captions must not contain line breaks: the caption file has one caption per line")
    _split_file(data_dir, split, "caps.txt").write_text("".join(f"{c.strip()}\n" for c in captions), encoding="utf-8")
    _split_file(data_dir, split, "image_ids.txt").write_text("".join(f"{i}\n" for i in image_ids), encoding="utf-8")
    mapping = torch.as_tensor(text_to_image)
    scan_implied = (len(captions) == n_images and torch.equal(mapping, torch.arange(n_images))) or (
        len(captions) == SCAN_CAPTIONS_PER_IMAGE * n_images
        and torch.equal(mapping, torch.arange(len(captions)) // SCAN_CAPTIONS_PER_IMAGE)
    )
    mapping_path = _split_file(data_dir, split, "text_to_image.txt")
    if scan_implied:
        mapping_path.unlink(missing_ok=True)
    else:
        mapping_path.write_text("".join(f"{int(row)}\n" for row in mapping))


def grid_features(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """`(batch, channels, h, w)` CNN feature map -> `(batch, grid * grid, channels)` average-pooled grid cells,
    in row-major order."""
    return F.adaptive_avg_pool2d(feature_map, grid).flatten(2).transpose(1, 2)


@torch.inference_mode()
def extract_grid_features(
    json_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str,
    image_root: str | os.PathLike | None = None,
    variant: int = 0,
    grid: int = 6,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> RegionFeatureSplit:
    """Encode the unique images of a JSON image-caption file into a SCAN-format split of grid features.

    Args:
        json_path: records ``{"image", "caption", "image_id"}`` (see ``cusa_hf.data.load_json_dataset``).
        output_dir, split: where ``{split}_ims.npy`` etc. are written.
        image_root: folder relative image paths are resolved against (default: the JSON file's folder).
        variant: EfficientNet-Lite 0, 1 or 2 (offline ImageNet weights, ``cusa_hf.offline_models``).
        grid: the feature map is pooled to ``grid x grid`` regions (6 -> 36, as the original's region count).

    Returns:
        the written split, loaded back memory-mapped. Images are in order of first appearance in the file.
    """
    import timm

    dataset = load_json_dataset(json_path, image_root=image_root)
    view = RetrievalEvalView.from_rows(dataset["image"], dataset["caption"], dataset["image_id"])
    network = efficientnet_lite_timm(variant, with_classifier=False).to(device)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=network))
    os.makedirs(output_dir, exist_ok=True)
    features = np.lib.format.open_memmap(
        _split_file(output_dir, split, "ims.npy"), mode="w+", dtype=np.float32,
        shape=(view.num_images, grid * grid, network.num_features),
    )
    for start in range(0, view.num_images, batch_size):
        paths = view.images[start : start + batch_size]
        pixels = torch.stack(
            [transform(load_image(path, where=f"{json_path} image {start + offset}")) for offset, path in enumerate(paths)]
        )
        cells = grid_features(network.forward_features(pixels.to(device)), grid)
        features[start : start + len(paths)] = cells.float().cpu().numpy()
    features.flush()
    del features
    _write_text_files(output_dir, split, view.captions, view.text_to_image, view.image_ids, view.num_images)
    return RegionFeatureSplit.load(output_dir, split)


class SgrafDataCollator:
    """Rows -> ``CusaModel``/``SgrafModel`` inputs for an SGRAF backbone.

    Args:
        tokenizer: an ``SgrafTokenizer``.
        features: `(n_images, num_regions, feature_dim)` array (e.g. ``RegionFeatureSplit.features``).
        image_column: the column holding each row's image row index into ``features``.
        caption_column, image_id_column, teacher_image_column, teacher_text_column: as ``CusaDataCollator``.

    Returns (per batch): ``pixel_values`` `(batch, num_regions, feature_dim)` float32 region features,
    ``input_ids`` / ``attention_mask`` (right-padded word ids), ``image_ids`` and the teacher features when present.
    """

    def __init__(
        self,
        tokenizer: Any,
        features: np.ndarray,
        image_column: str = "image",
        caption_column: str = "caption",
        image_id_column: str = "image_id",
        teacher_image_column: str = TEACHER_IMAGE_COLUMN,
        teacher_text_column: str = TEACHER_TEXT_COLUMN,
    ):
        self.tokenizer = tokenizer
        self.features = features
        self.image_column = image_column
        self.caption_column = caption_column
        self.image_id_column = image_id_column
        self.teacher_columns = ((teacher_image_column, TEACHER_IMAGE_COLUMN), (teacher_text_column, TEACHER_TEXT_COLUMN))

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("the collator got an empty batch")
        for column in (self.image_column, self.caption_column):
            if column not in rows[0]:
                raise ValueError(f"dataset rows have no {column!r} column (columns: {sorted(rows[0])})")
        indices = [row[self.image_column] for row in rows]
        bad = [index for index in indices if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.features)]
        if bad:
            raise ValueError(
                f"column {self.image_column!r} must hold feature row indices in [0, {len(self.features)}), got {bad[:5]}"
            )
        batch = {"pixel_values": torch.from_numpy(np.stack([np.asarray(self.features[i], dtype=np.float32) for i in indices]))}
        text = SgrafAdapter.tokenize_captions(self.tokenizer, [row[self.caption_column] for row in rows])
        batch["input_ids"], batch["attention_mask"] = text["input_ids"], text["attention_mask"]
        if self.image_id_column in rows[0]:
            batch["image_ids"] = torch.tensor([stable_image_id(row[self.image_id_column]) for row in rows])
        for column, key in self.teacher_columns:
            if column in rows[0]:
                batch[key] = torch.tensor(np.asarray([row[column] for row in rows]), dtype=torch.float32)
        return batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Extract 6 x 6 EfficientNet-Lite grid features in the SCAN format")
    parser.add_argument("--data", required=True, help="JSON image-caption file")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--split", required=True, help="split name: files are {split}_ims.npy, {split}_caps.txt, ...")
    parser.add_argument("--image-root", help="folder that relative image paths are resolved against")
    parser.add_argument("--variant", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--grid", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    split = extract_grid_features(
        args.data, args.output, args.split, args.image_root, args.variant, args.grid, args.batch_size
    )
    print(f"{args.split}: {split.features.shape} region features, {len(split.captions)} captions -> {args.output}")


if __name__ == "__main__":
    main()
