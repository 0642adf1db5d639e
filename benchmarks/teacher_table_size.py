#!/usr/bin/env python
"""Size on disk and write time of teacher features at COCO scale: one image vector per caption row (the layout of
``cusa-teacher-features/1``) against one per image in a per-image table plus an int32 index per row (``/2``).

Synthetic vectors with the shapes of COCO Karpathy train (113,287 images, 566,747 captions; image teacher 1280-d,
text teacher 768-d), written by the feature cache's own writers (``cusa_hf.teachers.feature_cache``) from the unique
vectors, as ``add_teacher_features`` does after encoding: the "bookkeeping" of extraction (gathering each row's
vector or index, building and writing the Arrow files), no teacher forward pass.

    python benchmarks/teacher_table_size.py                   # COCO scale, float32 and float16 (about 7 GB of memory and disk)
    python benchmarks/teacher_table_size.py --scale 0.01      # a quick check
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
from accelerate import PartialState

from cusa_hf.teachers.feature_cache import _write_feature_table, _write_image_table
from cusa_hf.teachers.image_tables import index_column
from cusa_hf.schema import PROVENANCE_COLUMN, TEACHER_IMAGE_COLUMN, TEACHER_TEXT_COLUMN

COCO_IMAGES, COCO_CAPTIONS = 113_287, 566_747


def measure(num_images: int, num_captions: int, dtype: str, folder: Path) -> dict[str, float]:
    """Write both layouts of one feature set and return their sizes (MB) and write times (s)."""
    rng = np.random.default_rng(0)
    image_table = rng.standard_normal((num_images, 1280), dtype=np.float32).astype(dtype)
    text_rows = rng.standard_normal((num_captions, 768), dtype=np.float32).astype(dtype)
    row_to_image = np.sort(np.arange(num_captions) % num_images).astype(np.int32)  # about 5 captions per image, grouped
    image_ids = list(range(num_images))
    ids_dataset = datasets.Dataset.from_dict({"image_id": [0]})
    state = PartialState(cpu=True)
    provenance = {"format": "benchmark", "teachers": {}}
    report = {}

    start = time.perf_counter()
    per_row = {TEACHER_IMAGE_COLUMN: image_table[row_to_image], TEACHER_TEXT_COLUMN: text_rows}
    _write_feature_table(per_row, {}, provenance, PROVENANCE_COLUMN, folder / "per_row.arrow", None, state)
    report["per_row_s"] = time.perf_counter() - start
    report["per_row_mb"] = (folder / "per_row.arrow").stat().st_size / 1e6
    del per_row

    start = time.perf_counter()
    _write_image_table(TEACHER_IMAGE_COLUMN, image_table, "image_id", image_ids, ids_dataset, folder / "images.arrow", None, state)
    rows = {index_column(TEACHER_IMAGE_COLUMN): row_to_image, TEACHER_TEXT_COLUMN: text_rows}
    _write_feature_table(rows, {}, provenance, PROVENANCE_COLUMN, folder / "rows.arrow", None, state)
    report["per_image_s"] = time.perf_counter() - start
    report["per_image_table_mb"] = (folder / "images.arrow").stat().st_size / 1e6
    report["per_image_rows_mb"] = (folder / "rows.arrow").stat().st_size / 1e6
    report["per_image_mb"] = report["per_image_table_mb"] + report["per_image_rows_mb"]
    report["image_part_per_row_mb"] = num_captions * 1280 * np.dtype(dtype).itemsize / 1e6
    for path in folder.glob("*.arrow"):
        path.unlink()
    return {key: round(float(value), 2) for key, value in report.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of COCO's images and captions (default 1)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"], help="storage dtypes to measure")
    args = parser.parse_args(argv)
    num_images, num_captions = max(2, int(COCO_IMAGES * args.scale)), max(2, int(COCO_CAPTIONS * args.scale))
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in args.dtypes:
            results[dtype] = measure(num_images, num_captions, dtype, Path(scratch))
            print(dtype, json.dumps(results[dtype]), flush=True)
    return results


if __name__ == "__main__":
    main()
