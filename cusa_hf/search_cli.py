"""Console script ``cusa-search``: index a collection with a trained CUSA model, then query it.

Examples::

    cusa-search build --model outputs/cusa-default/cusa --data $CUSA_COCO_MINI/test.json --out coco-index
    cusa-search query coco-index "a dog catching a frisbee" -k 5 --save-grid dogs.png
    cusa-search query coco-index --image my_photo.jpg -k 5            # image -> captions (cross head)
    cusa-search query coco-index --image my_photo.jpg --target images  # image -> images

``--data`` is a retrieval JSON file or a folder that :func:`cusa_hf.data.load_retrieval_dataset` reads (images and
captions are both indexed), or a plain folder of image files (images only).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from .data import load_retrieval_dataset
from .images import BadImageError, load_image
from .search import HEADS, TARGETS, RetrievalIndex

#: Files that make a folder a dataset (imagefolder metadata or ``save_to_disk``) rather than a plain image folder.
DATASET_FOLDER_MARKERS = ("metadata.jsonl", "metadata.csv", "dataset_info.json")
THUMBNAIL = 160
LABEL_HEIGHT = 18


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cusa-search", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="embed a collection and write an index folder")
    build.add_argument("--model", required=True, help="checkpoint folder or Hub name of a CusaModel")
    build.add_argument("--processor", default=None, help="processor folder or name (default: --model)")
    build.add_argument("--revision", default=None, help="Hub revision of --model and --processor")
    build.add_argument(
        "--data",
        required=True,
        help="retrieval JSON file or dataset folder (images and captions are indexed), or a folder of image files",
    )
    build.add_argument("--out", required=True, help="folder to write the index to")
    build.add_argument("--split", default="test", help="split to read from a dataset folder or Hub dataset")
    build.add_argument("--image-root", default=None, help="folder that relative image paths in --data resolve against")
    build.add_argument("--head", choices=HEADS, default="cross",
                       help="cross: retrieval embeddings; uni: the USA heads, for image->image and text->text search")
    build.add_argument("--no-captions", action="store_true", help="index only the images of --data")
    build.add_argument("--batch-size", type=int, default=64, help="images per encoding batch")
    build.add_argument("--text-batch-size", type=int, default=256, help="captions per encoding batch")
    build.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    build.add_argument("--index-factory", default=None,
                       help="FAISS index_factory string for large collections, e.g. 'IVF1024,Flat' or 'HNSW32' "
                            "(default: exact inner-product search)")  # fmt: skip
    build.add_argument("--search-parameters", default=None,
                       help="FAISS search settings for --index-factory, e.g. 'nprobe=32' or 'efSearch=128'")
    build.add_argument("--overwrite", action="store_true", help="replace an index already in --out")

    query = commands.add_parser("query", help="search an index with captions or images")
    query.add_argument("index", help="index folder written by 'cusa-search build'")
    query.add_argument("texts", nargs="*", help="caption queries")
    query.add_argument("--image", action="append", default=[], help="image query (a file); may be repeated")
    query.add_argument("-k", type=int, default=5, help="results per query")
    query.add_argument("--target", choices=TARGETS, default=None,
                       help="collection to search (default: the other modality for a cross-head index, the same one "
                            "for a uni-head index)")  # fmt: skip
    query.add_argument("--device", default=None, help="torch device for encoding the queries (default: cpu)")
    query.add_argument("--save-grid", default=None,
                       help="write the queries and their results as a picture: .png, or .html with embedded thumbnails")
    query.add_argument("--output-json", default=None, help="write the results as JSON")
    return parser


def _is_image_folder(path: Path) -> bool:
    return path.is_dir() and not any((path / marker).exists() for marker in DATASET_FOLDER_MARKERS)


def _check_out_outside_data(out: Path, data: Path, image_root: str | None) -> None:
    """Refuse an index folder that is the data's folder (a JSON file's, a dataset folder, the image root) or lies
    inside a plain folder of images being indexed: the index's files would go among the user's data."""
    folders = [("--data", data if data.is_dir() else data.parent)]
    if image_root:
        folders.append(("--image-root", Path(image_root)))
    for flag, folder in folders:
        images_folder = flag == "--data" and _is_image_folder(data)
        if out.resolve() == folder.resolve() or (images_folder and folder.resolve() in out.resolve().parents):
            raise SystemExit(
                f"cusa-search build: --out {os.fspath(out)} is, or lies inside, the {flag} folder {os.fspath(folder)}: "
                "the index would be written among your data. Choose an --out outside it"
            )


def build(args: argparse.Namespace) -> RetrievalIndex:
    from transformers import AutoModel, AutoProcessor

    _check_out_outside_data(Path(args.out), Path(args.data), args.image_root)
    model = AutoModel.from_pretrained(args.model, revision=args.revision)
    if args.device is not None:
        model = model.to(args.device)
    processor = AutoProcessor.from_pretrained(args.processor or args.model, revision=args.revision)
    data = Path(args.data)
    if _is_image_folder(data):
        images, texts = os.fspath(data), None
    else:
        dataset = load_retrieval_dataset(args.data, split=args.split, image_root=args.image_root)
        images, texts = dataset, None if args.no_captions else dataset
    index = RetrievalIndex.build(
        model, processor, images=images, texts=texts, head=args.head, batch_size=args.batch_size,
        text_batch_size=args.text_batch_size, device=args.device, index_factory=args.index_factory,
        search_parameters=args.search_parameters,
    )  # fmt: skip
    index.save(args.out, overwrite=args.overwrite)
    print(f"wrote {index} to {args.out}")
    return index


def query(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``[{"query", "kind", "target", "hits"}, ...]`` for the caption queries, then the image queries."""
    if not args.texts and not args.image:
        raise SystemExit("cusa-search query: give caption queries, --image files, or both")
    index = RetrievalIndex.load(args.index, device=args.device)
    answers = []
    for kind, queries in (("text", args.texts), ("image", args.image)):
        if not queries:
            continue
        target = args.target or index.default_target("texts" if kind == "text" else "images")
        results = index.search(**{"texts" if kind == "text" else "images": queries}, target=target, k=args.k)
        answers += [{"query": q, "kind": kind, "target": target, "hits": hits} for q, hits in zip(queries, results)]
    for answer in answers:
        print(f"{answer['kind']} query {answer['query']!r} -> {answer['target']}:")
        for rank, hit in enumerate(answer["hits"], 1):
            what = hit["caption"] if answer["target"] == "texts" else (hit["path"] or hit["image_id"])
            print(f"  {rank:>3}  {hit['score']:.4f}  {what}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(answers, indent=2, default=str) + "\n", encoding="utf-8")
    if args.save_grid:
        save_grid(answers, args.save_grid)
    return answers


# ----------------------------------------------------------------------------------------------------------- picture
def _thumbnail(path: str | None) -> Image.Image:
    """A ``THUMBNAIL``-square picture of an image file, or a grey square naming what could not be shown."""
    canvas = Image.new("RGB", (THUMBNAIL, THUMBNAIL), (235, 235, 235))
    if path is None:
        ImageDraw.Draw(canvas).text((6, 6), "(in-memory image)", fill="black")
        return canvas
    try:
        image = load_image(path)  # as the index saw it (16-bit levels scaled, transparency on white)
    except BadImageError:
        ImageDraw.Draw(canvas).text((6, 6), "\n".join(textwrap.wrap(f"cannot open {path}", 24)), fill="black")
        return canvas
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    canvas.paste(image, ((THUMBNAIL - image.width) // 2, (THUMBNAIL - image.height) // 2))
    return canvas


def _text_card(text: str, background: tuple[int, int, int]) -> Image.Image:
    card = Image.new("RGB", (THUMBNAIL, THUMBNAIL), background)
    lines = textwrap.wrap(text, 26)[:11]
    ImageDraw.Draw(card).multiline_text((6, 6), "\n".join(lines), fill="black", spacing=2)
    return card


def _cells(answer: dict[str, Any]) -> list[tuple[Image.Image, str, str | None]]:
    """``(picture, label, caption or None)`` for the query, then for each hit."""
    if answer["kind"] == "text":
        cells = [(_text_card(answer["query"], (255, 244, 200)), "query", answer["query"])]
    else:
        cells = [(_thumbnail(answer["query"]), "query", None)]
    for rank, hit in enumerate(answer["hits"], 1):
        label = f"#{rank}  {hit['score']:.3f}"
        if answer["target"] == "texts":
            cells.append((_text_card(hit["caption"], (245, 245, 245)), label, hit["caption"]))
        else:
            cells.append((_thumbnail(hit["path"]), label, None))
    return cells


def save_grid(answers: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """One row per query: the query (caption card or image), then its hits with rank and score.

    ``.png`` gives one picture; ``.html`` a page with the thumbnails embedded as base64 PNG.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (".png", ".html"):
        raise ValueError(f"--save-grid {os.fspath(path)!r}: the file must end in .png or .html")
    rows = [_cells(answer) for answer in answers]
    if suffix == ".png":
        cell_width, cell_height = THUMBNAIL + 8, THUMBNAIL + LABEL_HEIGHT + 8
        columns = max(len(row) for row in rows)
        grid = Image.new("RGB", (columns * cell_width, len(rows) * cell_height), "white")
        draw = ImageDraw.Draw(grid)
        for row_index, row in enumerate(rows):
            for column, (picture, label, _) in enumerate(row):
                left, top = column * cell_width + 4, row_index * cell_height + 4
                grid.paste(picture, (left, top))
                draw.text((left, top + THUMBNAIL + 3), label, fill="black")
        grid.save(path)
        return
    body = []
    for answer, row in zip(answers, rows):
        cells = []
        for picture, label, caption in row:
            if caption is not None:
                content = f"<div class=caption>{html.escape(caption)}</div>"
            else:
                buffer = io.BytesIO()
                picture.save(buffer, format="PNG")
                content = f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode("ascii")}">'
            cells.append(f"<td>{content}<div>{html.escape(label)}</div></td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    page = (
        "<!doctype html><meta charset=utf-8><title>cusa-search results</title>"
        "<style>td{vertical-align:top;width:170px;font:13px sans-serif}.caption{height:160px;overflow:auto}</style>"
        "<p>Each row: the query, then its results best first with their cosine similarity.</p>"
        f"<table>{''.join(body)}</table>"
    )
    Path(path).write_text(page, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``cusa-search``; ``cusa-search build --help`` and ``cusa-search query --help`` explain every
    option."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "build":
            build(args)
        else:
            query(args)
    except (ValueError, OSError) as error:  # bad input, named by the library: one line, not a traceback
        raise SystemExit(f"cusa-search {args.command}: {error}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
