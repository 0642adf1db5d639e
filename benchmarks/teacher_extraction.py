"""Teacher-feature extraction speed on coco_mini, and teacher forward passes saved by encoding unique inputs once.

    python benchmarks/teacher_extraction.py                      # coco_mini train split (600 images, 3000 captions)
    python benchmarks/teacher_extraction.py --quick              # 40 rows, seconds (the test suite runs this)
    python benchmarks/teacher_extraction.py --text-teacher offline:all-mpnet-base-v2   # the paper's text teacher

Runs ``add_teacher_features`` twice: cold (features computed; nothing cached) and warm (same data and teachers: the
cached feature table is read). Images/s counts unique images over the whole image step (decode, resize, forward);
captions/s likewise for unique captions. The per-row comparison counts the forward passes a loop that encodes every
row's image and caption (what the authors' online text teacher does) would need at the same batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from cusa_hf.data import load_json_dataset
from cusa_hf.teachers.features import add_teacher_features
from cusa_hf.teachers.registry import load_image_teacher, load_text_teacher

REPO_ROOT = Path(__file__).resolve().parents[1]


def counting(encoder):
    """The encoder with its ``encode`` wrapped to count forward passes and inputs."""
    counts = {"passes": 0, "inputs": 0}

    def encode(inputs):
        counts["passes"] += 1
        counts["inputs"] += len(inputs)
        return encoder.encode(inputs)

    return dataclasses.replace(encoder, encode=encode), counts


def run(args: argparse.Namespace) -> dict:
    folder = Path(args.coco_mini or os.environ.get("CUSA_COCO_MINI", REPO_ROOT.parent / "shared" / "data" / "coco_mini"))
    if not (folder / f"{args.split}.json").is_file():
        raise SystemExit(f"coco_mini not found at {folder}; pass --coco-mini or set $CUSA_COCO_MINI")
    rows = load_json_dataset(folder / f"{args.split}.json")
    if args.quick:
        rows = rows.select(range(40)).flatten_indices()
    torch.set_num_threads(args.threads)
    image_teacher, image_counts = counting(load_image_teacher(args.image_teacher, device=args.device))
    text_teacher, text_counts = counting(load_text_teacher(args.text_teacher, device=args.device))
    options = dict(batch_size=args.batch_size, device=args.device, show_progress=not args.quick)
    with tempfile.TemporaryDirectory() as cache_dir:
        timings = {}
        for phase in ("cold", "warm"):
            start = time.perf_counter()
            with_images = add_teacher_features(rows, image_teacher=image_teacher, cache_dir=cache_dir, **options)
            middle = time.perf_counter()
            result = add_teacher_features(with_images, text_teacher=text_teacher, cache_dir=cache_dir, **options)
            timings[phase] = (middle - start, time.perf_counter() - middle)
            if phase == "cold":
                cold_counts = dict(image=dict(image_counts), text=dict(text_counts))
    num_images = len(set(rows["image_id"]))
    num_captions = len(set(rows["caption"]))
    per_row_passes = math.ceil(len(rows) / args.batch_size)
    return {
        "rows": len(rows),
        "unique_images": num_images,
        "unique_captions": num_captions,
        "image_teacher": args.image_teacher,
        "text_teacher": args.text_teacher,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "images_per_s": num_images / timings["cold"][0],
        "captions_per_s": num_captions / timings["cold"][1],
        "cold_s": sum(timings["cold"]),
        "warm_s": sum(timings["warm"]),
        "image_forward_passes": cold_counts["image"]["passes"],
        "text_forward_passes": cold_counts["text"]["passes"],
        "image_inputs_encoded": cold_counts["image"]["inputs"],
        "text_inputs_encoded": cold_counts["text"]["inputs"],
        "warm_forward_passes": image_counts["passes"] + text_counts["passes"] - sum(
            counts["passes"] for counts in cold_counts.values()
        ),
        "per_row_image_forward_passes": per_row_passes,
        "per_row_text_forward_passes": per_row_passes,
        "columns": result.column_names,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, device {args.device}",
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-mini", help="coco_mini folder (default: ../shared/data/coco_mini or $CUSA_COCO_MINI)")
    parser.add_argument("--split", default="train", choices=["train", "test"], help="coco_mini split (default: train)")
    parser.add_argument("--image-teacher", default="offline:efficientnet-lite0", help="image teacher (default: %(default)s)")
    parser.add_argument("--text-teacher", default="offline:all-MiniLM-L6-v2", help="text teacher (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (default: 32)")
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--quick", action="store_true", help="first 40 rows only, no progress bars: a smoke run")
    report = run(parser.parse_args(argv))
    print(
        f"| {report['rows']} rows, {report['unique_images']} images, {report['unique_captions']} captions | "
        f"{report['images_per_s']:.1f} images/s | {report['captions_per_s']:.1f} captions/s | "
        f"cold {report['cold_s']:.1f} s, warm (cache hit) {report['warm_s']:.2f} s | forward passes: image "
        f"{report['image_forward_passes']} vs {report['per_row_image_forward_passes']} per row, text "
        f"{report['text_forward_passes']} vs {report['per_row_text_forward_passes']} per row |"
    )
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
