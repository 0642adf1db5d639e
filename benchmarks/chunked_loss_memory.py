"""Peak memory of a CUSA training step against batch size, with and without the gradient-cached loss
(``CusaTrainingArguments.loss_chunk_size``), and what it means for CLIP ViT-B/32 and ViT-L/14@336 on a GPU.

Every step is ``CusaTrainer.training_step`` (forward, loss, backward; the optimiser step does not depend on the batch
size) of a CUSA model with offline teacher features, measured with ``step_cost.PeakTensorMemory``: the peak of live
tensor memory created during the step (new ATen storages until they are freed), after a warm-up step at batch 2 that
allocated the gradients.

* ``--parts students``: the tiny CLIP of ``step_cost.py`` (2-layer towers, 32-px images, both trainable) and the
  built-in student (EfficientNet-Lite0 image tower frozen but run on 224-px pixels, MiniLM text tower trainable) at
  several batch sizes, unchunked and chunked.
* ``--parts clip_shapes``: the activation memory per pair of CLIP ViT-B/32 (224 px) and ViT-L/14@336 shapes, measured
  on depth-reduced, randomly initialised models (one and two layers per tower, batches 2 and 4): per pair and per
  layer of each tower, then scaled to the full depth. These feed the GPU estimate printed at the end (computed, not
  measured on a GPU).
* ``--parts quadratic``: the B x B part of the chunked step (soft labels, CSA / USA / InfoNCE logits and their
  gradients) from tiny-CLIP steps at large batches in chunks of 64.

    python benchmarks/chunked_loss_memory.py                      # everything (2 CPUs: ~10 min)
    python benchmarks/chunked_loss_memory.py --parts students --tiny_batches 64 256 --builtin_batches
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import TEACHER_IMAGE_DIM, TEACHER_TEXT_DIM, PeakTensorMemory, build_student, make_batch  # noqa: E402

MIB = 2**20
#: Full-size shapes (openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14-336), tokens per caption as COCO
#: captions padded to the batch's longest (about 32 CLIP tokens).
CLIP_SHAPES = {
    "ViT-B/32": dict(image_size=224, patch_size=32, vision_width=768, vision_heads=12, vision_layers=12, text_width=512,
                     text_heads=8, text_layers=12, projection_dim=512, parameters=151_277_313),
    "ViT-L/14@336": dict(image_size=336, patch_size=14, vision_width=1024, vision_heads=16, vision_layers=24,
                         text_width=768, text_heads=12, text_layers=12, projection_dim=768, parameters=427_944_193),
}  # fmt: skip
CAPTION_TOKENS = 32


def trainer_for(model, chunk_size: int | None):
    """A ``CusaTrainer`` whose ``training_step`` runs one step of ``model`` (chunked when ``chunk_size`` is set)."""
    from cusa_hf import CusaTrainingArguments
    from cusa_hf.trainer import CusaTrainer

    args = CusaTrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], loss_chunk_size=chunk_size)
    trainer = CusaTrainer(model=model, args=args, data_collator=lambda rows: rows)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, read by training_step
    return trainer


def measure_step(model, batch: dict, chunk_size: int | None) -> dict:
    """Peak tensor memory (MiB) of one ``training_step`` on ``batch`` (not timed: the dispatch mode that counts the
    storages slows every op down)."""
    trainer = trainer_for(model, chunk_size)
    model.zero_grad(set_to_none=False)
    with PeakTensorMemory() as tracker:
        trainer.training_step(model, dict(batch))
    return {"peak_tensor_mib": tracker.peak_bytes / MIB}


def student_batch(student: str, model, tokenizer, batch_size: int) -> dict:
    raw = make_batch(student, model, tokenizer, batch_size)
    batch = {key: raw[key] for key in ("pixel_values", "input_ids", "attention_mask", "image_ids")}
    batch["teacher_image_embeds"] = torch.tensor(raw["teacher_image_rows"], dtype=torch.float32)
    batch["teacher_text_embeds"] = torch.tensor(raw["teacher_text_rows"], dtype=torch.float32)
    return batch


def warm_up(model, batch: dict) -> None:
    """One step at batch 2: allocates the gradients and imports lazily loaded code."""
    trainer_for(model, None).training_step(model, {key: value[:2] for key, value in batch.items()})


def students_table(tiny_batches: list[int], builtin_batches: list[int], chunk_sizes: list[int]) -> list[dict]:
    rows = []
    for student, batch_sizes in (("tiny_clip", tiny_batches), ("builtin", builtin_batches)):
        if not batch_sizes:
            continue
        model, tokenizer = build_student(student, use_cusa=True)
        warm_up(model, student_batch(student, model, tokenizer, 2))
        for batch_size in batch_sizes:
            batch = student_batch(student, model, tokenizer, batch_size)
            for chunk_size in [None, *[size for size in chunk_sizes if size < batch_size]]:
                rows.append({"student": student, "batch_size": batch_size, "loss_chunk_size": chunk_size,
                             **measure_step(model, batch, chunk_size)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- CLIP shapes
def clip_model(shape: dict, vision_layers: int, text_layers: int):
    """A randomly initialised CUSA model over a CLIP of ``shape`` with the given tower depths, in training mode."""
    from transformers import CLIPConfig, CLIPModel

    from cusa_hf import CusaModel

    config = CLIPConfig(
        vision_config=dict(image_size=shape["image_size"], patch_size=shape["patch_size"], hidden_size=shape["vision_width"],
                           intermediate_size=4 * shape["vision_width"], num_attention_heads=shape["vision_heads"],
                           num_hidden_layers=vision_layers),
        text_config=dict(hidden_size=shape["text_width"], intermediate_size=4 * shape["text_width"],
                         num_attention_heads=shape["text_heads"], num_hidden_layers=text_layers),
        projection_dim=shape["projection_dim"],
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return CusaModel.from_backbone(CLIPModel(config)).train()


def clip_batch(shape: dict, batch_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    size = shape["image_size"]
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "input_ids": torch.randint(1, 49_000, (batch_size, CAPTION_TOKENS), generator=generator),
        "attention_mask": torch.ones(batch_size, CAPTION_TOKENS, dtype=torch.long),
        "image_ids": torch.arange(batch_size) // 5,
        "teacher_image_embeds": torch.randn(batch_size, TEACHER_IMAGE_DIM, generator=generator),
        "teacher_text_embeds": torch.randn(batch_size, TEACHER_TEXT_DIM, generator=generator),
    }


def activation_per_pair(shape: dict, vision_layers: int, text_layers: int) -> float:
    """Bytes per pair of an unchunked step: the slope of its peak tensor memory between batches 2 and 4."""
    model = clip_model(shape, vision_layers, text_layers)
    warm_up(model, clip_batch(shape, 2))
    peaks = {size: measure_step(model, clip_batch(shape, size), None)["peak_tensor_mib"] * MIB for size in (2, 4)}
    return (peaks[4] - peaks[2]) / 2


def clip_shapes_table() -> list[dict]:
    rows = []
    for name, shape in CLIP_SHAPES.items():
        base = activation_per_pair(shape, 1, 1)
        per_vision_layer = activation_per_pair(shape, 2, 1) - base
        per_text_layer = activation_per_pair(shape, 1, 2) - base
        full = base + (shape["vision_layers"] - 1) * per_vision_layer + (shape["text_layers"] - 1) * per_text_layer
        rows.append({"shape": name, "per_pair_one_layer_each_mib": base / MIB,
                     "per_vision_layer_mib": per_vision_layer / MIB, "per_text_layer_mib": per_text_layer / MIB,
                     "per_pair_full_depth_mib": full / MIB})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- B x B part
def quadratic_table(batch_sizes: list[int], chunk_size: int) -> dict:
    """Peaks of chunked tiny-CLIP steps at large batches and the fit ``peak = a + b B + c B^2``."""
    model, tokenizer = build_student("tiny_clip", use_cusa=True)
    warm_up(model, student_batch("tiny_clip", model, tokenizer, 2))
    peaks = []
    for batch_size in batch_sizes:
        batch = student_batch("tiny_clip", model, tokenizer, batch_size)
        peaks.append({"batch_size": batch_size, "loss_chunk_size": chunk_size, **measure_step(model, batch, chunk_size)})
        print(json.dumps(peaks[-1]), flush=True)
    design = torch.tensor([[1.0, b, b * b] for b in batch_sizes], dtype=torch.float64)
    target = torch.tensor([row["peak_tensor_mib"] * MIB for row in peaks], dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(design, target[:, None]).solution[:, 0].tolist()
    return {"peaks": peaks, "bytes_constant": a, "bytes_per_pair": b, "bytes_per_pair_squared": c}


# ----------------------------------------------------------------------------------------------- GPU estimate
def largest_batches(shapes: list[dict], bytes_per_pair_squared: float, gpu_gib: float, chunk_size: int,
                    overhead_gib: float) -> list[dict]:
    """Largest contrastive batch per device, computed: fixed memory (fp32 weights, gradients and AdamW's two
    moments: 16 bytes per parameter, plus ``overhead_gib`` of CUDA context and allocator slack) plus, unchunked,
    ``B`` pairs of activations; chunked, ``chunk_size`` pairs of activations plus the whole batch's inputs on the
    device (fp32 pixels, token ids) plus the B x B terms."""
    rows = []
    for measured in shapes:
        shape = CLIP_SHAPES[measured["shape"]]
        free = (gpu_gib - overhead_gib) * 2**30 - 16 * shape["parameters"]
        activation = measured["per_pair_full_depth_mib"] * MIB
        unchunked = math.floor(free / activation) if free > 0 else 0
        inputs = 4 * 3 * shape["image_size"] ** 2 + 2 * 8 * CAPTION_TOKENS
        room = free - chunk_size * activation
        # c B^2 + inputs B - room = 0
        chunked = math.floor((-inputs + math.sqrt(inputs**2 + 4 * bytes_per_pair_squared * room)) /
                             (2 * bytes_per_pair_squared)) if room > 0 else 0  # fmt: skip
        rows.append({"shape": measured["shape"], "gpu_gib": gpu_gib, "unchunked": unchunked,
                     "chunked": chunked, "loss_chunk_size": chunk_size})  # fmt: skip
    return rows


def markdown(report: dict) -> str:
    lines = []
    if report.get("students"):
        lines += ["| student | batch | loss_chunk_size | peak tensor MiB |", "|---|---|---|---|"]
        for row in report["students"]:
            lines.append(f"| {row['student']} | {row['batch_size']} | {row['loss_chunk_size'] or 'off'} | "
                         f"{row['peak_tensor_mib']:.1f} |")  # fmt: skip
    if report.get("clip_shapes"):
        lines += ["", "| shape | MiB per pair (1+1 layers) | per vision layer | per text layer | per pair, full depth |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for row in report["clip_shapes"]:
            lines.append(f"| {row['shape']} | {row['per_pair_one_layer_each_mib']:.2f} | {row['per_vision_layer_mib']:.2f} | "
                         f"{row['per_text_layer_mib']:.2f} | {row['per_pair_full_depth_mib']:.1f} |")  # fmt: skip
    if report.get("quadratic"):
        fit = report["quadratic"]
        lines += ["", f"chunked peak ~ {fit['bytes_constant'] / MIB:.1f} MiB + {fit['bytes_per_pair'] / 1024:.1f} KiB x B "
                  f"+ {fit['bytes_per_pair_squared']:.1f} bytes x B^2"]  # fmt: skip
    if report.get("estimate"):
        lines += ["", "| shape | GPU GiB | largest batch, unchunked | largest batch, loss_chunk_size |", "|---|---|---|---|"]
        for row in report["estimate"]:
            lines.append(f"| {row['shape']} | {row['gpu_gib']:g} | {row['unchunked']:,} | {row['chunked']:,} "
                         f"({row['loss_chunk_size']}) |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("students", "clip_shapes", "quadratic"),
                        default=["students", "clip_shapes", "quadratic"])  # fmt: skip
    parser.add_argument("--tiny_batches", type=int, nargs="*", default=[128, 512, 1024])
    parser.add_argument("--builtin_batches", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--chunk_sizes", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--quadratic_batches", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--estimate_chunk_size", type=int, default=8)
    parser.add_argument("--overhead_gib", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"command": "python benchmarks/chunked_loss_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    if "students" in args.parts:
        report["students"] = students_table(args.tiny_batches, args.builtin_batches, args.chunk_sizes)
    if "clip_shapes" in args.parts:
        report["clip_shapes"] = clip_shapes_table()
    if "quadratic" in args.parts:
        report["quadratic"] = quadratic_table(args.quadratic_batches, 64)
    if report.get("clip_shapes") and report.get("quadratic"):
        report["estimate"] = [
            row
            for gpu_gib in (24, 80)
            for row in largest_batches(report["clip_shapes"], report["quadratic"]["bytes_per_pair_squared"], gpu_gib,
                                       args.estimate_chunk_size, args.overhead_gib)
        ]  # fmt: skip
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
