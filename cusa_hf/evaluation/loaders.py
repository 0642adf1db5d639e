"""Loaders of the uni-modal evaluation sets: STS sentence pairs and class-labelled images, from local tables
(.csv/.tsv/.jsonl/.json), image folders or Hub datasets."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class StsData:
    """Sentence pairs with gold similarity scores."""

    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)


def _read_local_table(path: str) -> list[dict[str, Any]]:
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as handle:
            if lower.endswith(".json"):
                rows = json.load(handle)
                if not isinstance(rows, list):
                    raise ValueError(f"{path}: a .json table must be a list of row objects")
                return rows
            return [json.loads(line) for line in handle if line.strip()]
    if lower.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as handle:
            # STS files contain quotes inside sentences; TSV is read without quote processing.
            if lower.endswith(".tsv"):
                return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
            return list(csv.DictReader(handle))
    raise ValueError(f"{path}: unsupported file type; use .csv, .tsv, .jsonl or .json")


def _load_rows(path_or_name: str, split: str, columns: Sequence[str]) -> tuple[list[dict[str, Any]], str]:
    """Rows of a local table file or a Hub/`datasets` dataset split, checked for ``columns``."""
    if os.path.isfile(path_or_name):
        rows, source = _read_local_table(path_or_name), path_or_name
        available = set(rows[0]) if rows else set()
    else:
        import datasets

        dataset = datasets.load_dataset(path_or_name, split=split)
        rows, source, available = dataset, f"{path_or_name} [{split}]", set(dataset.column_names)
    if not len(rows):
        raise ValueError(f"{source} has no rows")
    missing = [c for c in columns if c not in available]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; available: {sorted(available)}")
    return rows, source


def load_sts(
    path_or_name: str,
    split: str = "test",
    sentence1_column: str = "sentence1",
    sentence2_column: str = "sentence2",
    score_column: str = "score",
) -> StsData:
    """Load an STS set from a local .csv/.tsv/.jsonl/.json file or a Hub dataset (e.g. ``sentence-transformers/stsb``).

    ``split`` is used for Hub datasets only. Rows without a numeric score raise an error naming the row.
    """
    rows, source = _load_rows(path_or_name, split, (sentence1_column, sentence2_column, score_column))
    data = StsData([], [], [])
    for index, row in enumerate(rows):
        try:
            score = float(row[score_column])
        except (TypeError, ValueError):
            raise ValueError(f"{source} row {index}: {score_column}={row[score_column]!r} is not a number") from None
        if math.isnan(score):
            raise ValueError(f"{source} row {index}: {score_column} is NaN")
        data.sentences1.append(str(row[sentence1_column]))
        data.sentences2.append(str(row[sentence2_column]))
        data.scores.append(score)
    return data


@dataclass
class LabelledImages:
    """Images (paths, PIL images or ``datasets.Image`` values) with class labels, for uni-modal R@1."""

    images: list[Any]
    labels: list[Any]
    image_root: str | None = None

    def __len__(self) -> int:
        return len(self.labels)


def load_labelled_images(
    path_or_name: str,
    split: str = "test",
    image_column: str = "image",
    label_column: str = "label",
    image_root: str | None = None,
) -> LabelledImages:
    """Load a class-labelled image set.

    Accepts a folder with one sub-folder per class (ImageFolder layout, as CUB/``images``), a .csv/.tsv/.jsonl/.json
    table with image path and label columns (paths relative to ``image_root``, default the table's folder), or a Hub
    dataset name with ``split``.
    """
    if os.path.isdir(path_or_name):
        images, labels = [], []
        classes = sorted(e.name for e in os.scandir(path_or_name) if e.is_dir() and not e.name.startswith("."))
        for label in classes:
            folder = os.path.join(path_or_name, label)
            for name in sorted(os.listdir(folder)):
                if not name.startswith("."):  # skips macOS "._" resource files, as the CUB loaders do
                    images.append(os.path.join(folder, name))
                    labels.append(label)
        if not images:
            raise ValueError(f"{path_or_name}: no images in class sub-folders")
        return LabelledImages(images, labels, image_root)
    rows, _ = _load_rows(path_or_name, split, (image_column, label_column))
    if os.path.isfile(path_or_name) and image_root is None:
        image_root = os.path.dirname(os.path.abspath(path_or_name))
    return LabelledImages([row[image_column] for row in rows], [row[label_column] for row in rows], image_root)
