"""Evaluate a saved or Hub CUSA checkpoint: image-text retrieval R@K / RSUM, optionally STS and image R@1.

    python examples/evaluate_cusa.py --model outputs/cusa --data $CUSA_COCO_MINI/test.json \
        --output-json results.json --save-grid top5.png

Prints a table (with the protocol it used), writes the numbers as JSON, and with ``--save-grid`` (``.png`` or
``.html``) draws the top-5 retrieved images of a few sample captions, the correct image framed in green.
``--model`` may be a folder or a Hub name; a plain CLIP/dual-encoder checkpoint is evaluated as a baseline with
``--head none``. ``--sts`` (csv/tsv/jsonl or a Hub name) adds STS Spearman on the uni-modal text head, and
``--labelled-images`` (class folders, a table, or a Hub name) adds leave-one-out image retrieval R@1 on the uni-modal
image head.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import random
import sys
from typing import Any

import torch
from PIL import Image, ImageDraw

from cusa_hf.data import load_retrieval_dataset
from cusa_hf.modeling_cusa import check_model_folder
from cusa_hf.schema import InvalidRecordError
from cusa_hf.evaluation.eval_view import build_eval_view
from cusa_hf.images import load_image
from cusa_hf.evaluation.encoding import encode_images, encode_texts
from cusa_hf.evaluation.loaders import load_labelled_images, load_sts
from cusa_hf.evaluation.metrics import RECALL_KS, RETRIEVAL_METRIC_NAMES, retrieval_metrics
from cusa_hf.evaluation.unimodal_evaluators import ImageRetrievalEvaluator, StsEvaluator

THUMBNAIL = 160


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub name")
    parser.add_argument("--processor", help="processor folder or Hub name (default: --model)")
    parser.add_argument("--data", required=True, help="retrieval split: .json/.jsonl, saved dataset, folder, Hub name")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-root", help="folder that relative image paths are resolved against")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--image-id-column", default="image_id")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N images (and their captions)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="leave out records with a missing image or empty caption (reported) instead of stopping")
    parser.add_argument("--head", default="cross", choices=["cross", "uni", "none"],
                        help="'none' for a plain backbone without CUSA heads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--text-batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sts", help="STS pairs (sentence1, sentence2, score): file or Hub name")
    parser.add_argument("--sts-split", default="test")
    parser.add_argument("--labelled-images", help="class-labelled images for uni-modal R@1: folder, table, Hub name")
    parser.add_argument("--labelled-split", default="test")
    parser.add_argument("--output-json", help="write the metrics here")
    parser.add_argument("--save-grid", help="top-5 picture for sample captions: a .png or .html path")
    parser.add_argument("--grid-captions", type=int, default=4, help="number of sample captions in the picture")
    parser.add_argument("--seed", type=int, default=0, help="picks the sample captions")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.save_grid and not args.save_grid.lower().endswith((".png", ".html")):
        parser.error(f"--save-grid must end in .png or .html, got {args.save_grid!r}")
    return args


def checked_location(name: str, flag: str, load):
    """``load(name)``, where a ``name`` that is no folder here fails with an error that says so, rather than with the
    Hub's complaint about repository ids or connections."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(name):
        return load(name)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"{flag} {name}: no such folder (and not the form of a Hub model id)") from None
    try:
        return load(name)
    except OSError as error:
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"{flag} {name}: no such folder, and no Hub model of that id in the local Hub cache (HF_HUB_OFFLINE "
                "is set, so nothing is downloaded)"
            ) from error
        raise FileNotFoundError(f"{flag} {name}: no such folder, and no Hub model of that id loads ({error})") from error


def load_model_and_processor(args: argparse.Namespace):
    from transformers import AutoConfig, AutoModel, AutoProcessor

    import cusa_hf  # noqa: F401  (registers CusaModel with AutoModel)

    check_model_folder(args.model, "--model")
    config = checked_location(args.model, "--model", AutoConfig.from_pretrained)
    processor_source = f"--processor {args.processor}" if args.processor else "its processor"
    processor_flag = "--processor" if args.processor else "--model"
    processor = checked_location(args.processor or args.model, processor_flag, AutoProcessor.from_pretrained)
    # A folder without an image processor loads as its tokenizer alone: say what it holds instead of failing on the
    # first image batch.
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(
            f"--model {args.model} holds a {config.model_type!r} checkpoint and {processor_source} loads as a "
            f"{type(processor).__name__}, not a processor with both an image processor and a tokenizer: "
            "evaluate_cusa.py expects a CUSA, CLIP or other dual-encoder checkpoint saved with its image processor"
        )
    model = AutoModel.from_pretrained(args.model).to(args.device).eval()
    return model, processor


def uni_head_notes(model: Any, uses_uni_head: bool) -> list[str]:
    """What the printed numbers need said: a CusaModel without USA heads answers ``head="uni"`` with its backbone's
    own normalised features, which are not a uni-modal head's."""
    config = getattr(model, "config", None)
    if not uses_uni_head or getattr(config, "model_type", None) != "cusa" or config.use_usa:
        return []
    return [
        f"{type(model).__name__} has no USA heads (use_usa=False), so its 'uni' embeddings are the backbone's own "
        "normalised features: the numbers of --head uni, --sts and --labelled-images measure the backbone, not a "
        "uni-modal head"
    ]


def limit_images(dataset: Any, image_id_column: str, image_column: str, max_images: int | None) -> Any:
    """The rows of the first ``max_images`` distinct images."""
    if max_images is None:
        return dataset
    column = image_id_column if image_id_column in dataset.column_names else image_column
    kept: set = set()
    rows = []
    for index, key in enumerate(dataset[column]):
        key = key if isinstance(key, (str, int)) else json.dumps(key, sort_keys=True, default=str)
        if key not in kept and len(kept) >= max_images:
            continue
        kept.add(key)
        rows.append(index)
    return dataset.select(rows)


def format_table(metrics: dict[str, float]) -> str:
    names = [n for n in RETRIEVAL_METRIC_NAMES if n in metrics]
    lines = ["".join(f"{n:>9}" for n in names), "".join(f"{metrics[n]:>9.2f}" for n in names)]
    extra = [f"{name} = {value:.2f}" for name, value in metrics.items() if name not in names]
    return "\n".join(lines + extra)


def top5_examples(similarity: torch.Tensor, view: Any, n_captions: int, seed: int) -> list[dict[str, Any]]:
    """For sample captions: the caption, its 5 best images (indices) and the index of its own image."""
    texts = list(range(view.num_texts))
    random.Random(seed).shuffle(texts)
    examples = []
    for text in sorted(texts[:n_captions]):
        top = similarity[:, text].topk(min(5, view.num_images)).indices.tolist()
        examples.append({"caption": view.captions[text], "top5": top, "answer": int(view.text_to_image[text])})
    return examples


def thumbnail(view: Any, image_index: int, correct: bool) -> Image.Image:
    image = load_image(view.images[image_index], view.image_root, where=f"image {image_index}")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    framed = Image.new("RGB", (THUMBNAIL + 8, THUMBNAIL + 8), (40, 170, 60) if correct else (235, 235, 235))
    framed.paste(image, (4 + (THUMBNAIL - image.width) // 2, 4 + (THUMBNAIL - image.height) // 2))
    return framed


def save_png(examples: list[dict[str, Any]], view: Any, path: str) -> None:
    cell, text_height = THUMBNAIL + 8, 28
    canvas = Image.new("RGB", (5 * cell, len(examples) * (cell + text_height)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, example in enumerate(examples):
        top = row * (cell + text_height)
        caption = example["caption"] if len(example["caption"]) <= 120 else example["caption"][:117] + "..."
        draw.text((4, top + 8), caption, fill="black")
        for column, image_index in enumerate(example["top5"]):
            canvas.paste(thumbnail(view, image_index, image_index == example["answer"]),
                         (column * cell, top + text_height))
    canvas.save(path)


def save_html(examples: list[dict[str, Any]], view: Any, path: str) -> None:
    rows = []
    for example in examples:
        cells = []
        for image_index in example["top5"]:
            buffer = io.BytesIO()
            thumbnail(view, image_index, image_index == example["answer"]).save(buffer, format="PNG")
            data = base64.b64encode(buffer.getvalue()).decode("ascii")
            cells.append(f'<td><img src="data:image/png;base64,{data}" alt="image {image_index}"></td>')
        rows.append(f"<tr><th colspan=5>{html.escape(example['caption'])}</th></tr><tr>{''.join(cells)}</tr>")
    page = (
        "<!doctype html><meta charset=utf-8><title>CUSA top-5 retrieval</title>"
        "<p>Top-5 images per caption; the caption's own image is framed in green.</p>"
        f"<table>{''.join(rows)}</table>"
    )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    head = None if args.head == "none" else args.head
    show_progress = not args.quiet
    model, processor = load_model_and_processor(args)

    try:
        dataset = load_retrieval_dataset(args.data, split=args.split, image_root=args.image_root,
                                         skip_invalid=args.skip_invalid)  # fmt: skip
    except InvalidRecordError as error:
        raise InvalidRecordError(
            f"{error}; here that is --skip-invalid (those records are left out of the metrics)"
        ) from None
    dataset = limit_images(dataset, args.image_id_column, args.image_column, args.max_images)
    view = build_eval_view(dataset, args.image_column, args.caption_column, args.image_id_column, args.image_root)
    image_features = encode_images(model, view.images, processor.image_processor, args.batch_size, head,
                                   view.image_root, device=args.device, show_progress=show_progress)
    text_features = encode_texts(model, view.captions, processor.tokenizer, args.text_batch_size, head,
                                 device=args.device, show_progress=show_progress)
    similarity = image_features @ text_features.T
    metrics: dict[str, float] = retrieval_metrics(similarity, view.text_to_image)
    captions_per_image = view.num_texts / view.num_images
    protocol = (
        f"{view.num_images} images x {view.num_texts} captions ({captions_per_image:.2f} per image); image->text "
        "rank = best of the image's captions; ties pessimistic"
    )

    uni_head = "uni" if head is not None else None
    notes = uni_head_notes(model, head == "uni" or (uni_head is not None and bool(args.sts or args.labelled_images)))
    if view.num_images <= max(RECALL_KS):
        notes.append(
            f"only {view.num_images} image(s): text->image R@K with K >= {view.num_images} is 100 whatever the model "
            "(and image->text R@K is generous), so these numbers say little about retrieval; evaluate on more images"
        )
    unimodal = []  # the model sits on args.device, where the evaluators encode
    if args.sts:
        unimodal.append(StsEvaluator(load_sts(args.sts, args.sts_split), head=uni_head, show_progress=show_progress))
    if args.labelled_images:
        images = load_labelled_images(args.labelled_images, args.labelled_split)
        unimodal.append(ImageRetrievalEvaluator(images, batch_size=args.batch_size, head=uni_head,
                                                show_progress=show_progress))  # fmt: skip
    for evaluator in unimodal:
        metrics[evaluator.primary_metric] = evaluator.measure(model, processor, accelerator=None)

    print(f"model: {args.model}\ndata: {args.data} [{args.split}]\nprotocol: {protocol}")
    for note in notes:
        print(f"note: {note}")
    print(format_table(metrics))
    result = {"model": args.model, "data": args.data, "split": args.split, "protocol": protocol, "metrics": metrics,
              "notes": notes}  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    if args.save_grid:
        examples = top5_examples(similarity.cpu(), view, args.grid_captions, args.seed)
        (save_png if args.save_grid.lower().endswith(".png") else save_html)(examples, view, args.save_grid)
        print(f"top-5 picture: {os.path.abspath(args.save_grid)}")
    return result


if __name__ == "__main__":
    main()
