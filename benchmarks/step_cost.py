"""Cost of CUSA per training step: time and peak memory against the plain contrastive baseline, in one process.

Three variants of one optimiser step (forward, backward, AdamW step, temperature clamp) on the same batch:

* the baseline, named by its contrastive term (``--itc_loss``: ``infonce``, the default, or SigLIP's ``sigmoid``):
  ``use_csa=False, use_usa=False``, no teacher features;
* ``cusa``: CUSA with offline teacher columns; the step includes turning the batch's teacher rows (Python lists,
  as a ``datasets`` table yields them) into tensors, which is the collator's only extra work;
* ``cusa_online_text``: the authors' design, CUSA whose text-teacher features come from running the teacher
  (all-mpnet-base-v2, the same model the offline column holds) on the batch's captions every step; the image
  column stays offline.

All variants train with the contrastive term ``--itc_loss`` (``CusaConfig.itc_loss``).

Students:

* ``builtin``: the built-in default of ``examples/run_cusa.py``: pretrained EfficientNet-Lite0 image tower (frozen,
  BatchNorm frozen) + all-MiniLM-L6-v2 text tower, 256-d projections; random pixel values, real coco_mini captions
  (or generated ones), teacher widths 1280 (EfficientNet-Lite2) and 768 (all-mpnet-base-v2).
* ``tiny_clip``: a randomly initialised 2-layer CLIP (32-px images, 256-d projections) so the step can be timed up
  to batch 1024 on two CPUs; its towers are so cheap that the B x B terms are a large share of the step, which makes
  its ratios an upper bound for real towers.

Timing interleaves the variants (their order rotates every round) after warm-up steps and reports the median of
the timed steps. Peak memory runs one step per variant in a fresh subprocess and reports the peak of live tensor
memory created during the step (a ``TorchDispatchMode`` that counts new storages until they are freed) and the
growth of the peak resident set (``VmHWM``, reset just before the step) over the resident set before the step.

    python benchmarks/step_cost.py                       # full tables (2 CPUs: ~10 min)
    python benchmarks/step_cost.py --quick               # tiny CLIP only, small batches (seconds, used by the tests)
    python benchmarks/step_cost.py --json out.json
    python benchmarks/step_cost.py --itc_loss sigmoid     # the same tables with SigLIP's sigmoid term
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cusa_hf.contrastive_terms import contrastive_term_names


CUSA_VARIANTS = ("cusa", "cusa_online_text")
TEACHER_IMAGE_DIM, TEACHER_TEXT_DIM = 1280, 768


# ----------------------------------------------------------------------------------------------------- students
def build_student(student: str, use_cusa: bool, itc_loss: str = "infonce"):
    """A ``CusaModel`` in training mode, with the contrastive term ``itc_loss``, and its tokenizer."""
    from cusa_hf import CusaModel

    cusa_fields = {"itc_loss": itc_loss} if use_cusa else {"itc_loss": itc_loss, "use_csa": False, "use_usa": False}
    if student == "builtin":
        from cusa_hf.arguments import ModelArguments
        from cusa_hf.factory import build_model, build_processor

        model_args = ModelArguments(freeze_vision_tower=True)
        model = build_model(model_args, **cusa_fields)
        tokenizer = build_processor(model_args).tokenizer
    elif student == "tiny_clip":
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        from cusa_hf.offline_models import minilm_path

        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
        config = CLIPConfig(
            text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2),
            projection_dim=256,
        )
        model = CusaModel.from_backbone(CLIPModel(config), **cusa_fields)
    else:
        raise ValueError(f"unknown student {student!r}; use 'builtin' or 'tiny_clip'")
    return model.train(), tokenizer


def captions_for(batch_size: int) -> list[str]:
    """Real coco_mini captions when available (realistic token lengths), else generated ones."""
    from cusa_hf.example_data import coco_mini_folder

    folder = coco_mini_folder()
    captions = [record["caption"] for record in json.loads((folder / "train.json").read_text())] if folder else []
    if not captions:
        captions = [f"a photo of {n} red squares on a blue background" for n in range(batch_size)]
    return [captions[i % len(captions)] for i in range(batch_size)]


def make_batch(student: str, model, tokenizer, batch_size: int, seed: int = 0) -> dict:
    """Inputs shared by all variants; teacher rows are Python lists, as a dataset yields them to the collator."""
    generator = torch.Generator().manual_seed(seed)
    image_size = 224 if student == "builtin" else model.config.backbone_config.vision_config.image_size
    captions = captions_for(batch_size)
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "image_ids": torch.arange(batch_size) // 5,  # five captions per image, as in COCO
        "captions": captions,
        "teacher_image_rows": torch.randn(batch_size, TEACHER_IMAGE_DIM, generator=generator).tolist(),
        "teacher_text_rows": torch.randn(batch_size, TEACHER_TEXT_DIM, generator=generator).tolist(),
    }


def load_online_text_teacher():
    from cusa_hf.teachers.registry import load_text_teacher

    return load_text_teacher("offline:all-mpnet-base-v2")


class StepRunner:
    """One variant: its model, AdamW optimiser and the code of one training step."""

    def __init__(self, variant: str, model, text_teacher=None):
        self.variant, self.model, self.text_teacher = variant, model, text_teacher
        parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=1e-4)

    def step(self, batch: dict) -> float:
        inputs = {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask", "image_ids")}
        if self.variant in CUSA_VARIANTS:
            inputs["teacher_image_embeds"] = torch.tensor(batch["teacher_image_rows"], dtype=torch.float32)
            if self.variant == "cusa":
                inputs["teacher_text_embeds"] = torch.tensor(batch["teacher_text_rows"], dtype=torch.float32)
            else:
                inputs["teacher_text_embeds"] = self.text_teacher.encode(batch["captions"]).float()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**inputs, return_loss=True).loss
        loss.backward()
        self.optimizer.step()
        self.model.clamp_temperatures_()
        return float(loss.detach())


def build_runners(student: str, variants: tuple[str, ...], itc_loss: str) -> tuple[dict[str, StepRunner], object]:
    """The runners of ``variants``: the baseline (named ``itc_loss``) and CUSA variants, all with that term."""
    baseline, tokenizer = build_student(student, use_cusa=False, itc_loss=itc_loss)
    runners = {itc_loss: StepRunner(itc_loss, baseline)}
    if "cusa" in variants or "cusa_online_text" in variants:
        cusa_model, _ = build_student(student, use_cusa=True, itc_loss=itc_loss)
        # Same starting weights for the shared parts, so both variants do the same backbone work.
        cusa_model.load_state_dict(baseline.state_dict(), strict=False)
        teacher = load_online_text_teacher() if "cusa_online_text" in variants else None
        for variant in variants:
            if variant in CUSA_VARIANTS:
                runners[variant] = StepRunner(variant, cusa_model, teacher)
    return {variant: runners[variant] for variant in variants}, tokenizer


# ----------------------------------------------------------------------------------------------------- timing
def time_interleaved(runners: dict[str, StepRunner], batch: dict, warmup: int, repeats: int) -> dict[str, dict]:
    """Median and spread of the step time (ms) per variant, rounds interleaving the variants in rotating order; the
    first runner is the baseline the ratios divide by."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name].step(batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            runners[name].step(batch)
            times[name].append(1000 * (time.perf_counter() - start))
    baseline = statistics.median(times[names[0]])
    return {
        name: {
            "median_ms": statistics.median(values),
            "min_ms": min(values),
            "max_ms": max(values),
            "ratio_to_baseline": statistics.median(values) / baseline,
            "steps": len(values),
        }
        for name, values in times.items()
    }


def timing_table(
    student: str, batch_sizes: list[int], variants: tuple[str, ...], warmup: int, repeats: int, itc_loss: str
) -> list:
    runners, tokenizer = build_runners(student, variants, itc_loss)
    rows = []
    for batch_size in batch_sizes:
        batch = make_batch(student, runners[itc_loss].model, tokenizer, batch_size)
        load_before = os.getloadavg()[0]
        results = time_interleaved(runners, batch, warmup, repeats)
        for variant, result in results.items():
            rows.append({"student": student, "batch_size": batch_size, "variant": variant, **result,
                         "load_average": round((load_before + os.getloadavg()[0]) / 2, 2)})
        print(json.dumps(rows[-len(results):]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------- memory
class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created by ATen ops while the mode is active (forward, backward and optimiser
    ops on this thread), freed when their storage dies. Outputs that reuse an input's storage (views, in-place ops)
    are not new memory. Independent of the malloc arena behaviour that blurs the process's resident set."""

    def __init__(self):
        super().__init__()
        self.live_bytes = self.peak_bytes = 0
        self._live: set[tuple[int, int]] = set()

    def _free(self, key: tuple[int, int]) -> None:
        self._live.discard(key)
        self.live_bytes -= key[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        input_storages = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(output)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key[1] == 0 or key in self._live or key[0] in input_storages:
                continue
            self._live.add(key)
            self.live_bytes += key[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._free, key)
        return output


def rss_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since start or the last reset) from /proc, in KiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current resident set (Linux ``clear_refs`` value 5), so the peak is the step's own and
    not one reached earlier (loading weights, tokenizers)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def memory_probe(student: str, variant: str, batch_size: int, itc_loss: str = "infonce") -> dict:
    """Run in a fresh process: build the variant, one warm-up step at batch 2 (allocates the optimiser state and
    imports lazily loaded code), then one step at ``batch_size`` measured two ways: the peak of live tensor memory
    created during the step, and the growth of the process's peak resident set (reset just before the step) over
    its resident set before it."""
    runners, tokenizer = build_runners(student, (variant,) if variant == itc_loss else (itc_loss, variant), itc_loss)
    runner = runners[variant]
    runner.step(make_batch(student, runner.model, tokenizer, 2))
    batch = make_batch(student, runner.model, tokenizer, batch_size)
    reset_peak_rss()
    before_kib = rss_kib("VmRSS")
    with PeakTensorMemory() as tracker:
        runner.step(batch)
    peak_kib = rss_kib("VmHWM")
    return {"student": student, "variant": variant, "batch_size": batch_size,
            "step_peak_tensor_mib": tracker.peak_bytes / 2**20,
            "step_peak_rss_growth_mib": max(peak_kib - before_kib, 0) / 1024, "rss_before_mib": before_kib / 1024}


def memory_table(cases: list[tuple[str, int]], variants: tuple[str, ...], threads: int, itc_loss: str) -> list:
    rows = []
    for student, batch_size in cases:
        for variant in variants:
            command = [sys.executable, __file__, "--memory_probe", student, variant, str(batch_size),
                       "--threads", str(threads), "--itc_loss", itc_loss]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = ["| student | batch | variant | median ms/step | min-max ms | ratio to baseline | load avg |",
             "|---|---|---|---|---|---|---|"]
    for row in report["timing"]:
        lines.append(f"| {row['student']} | {row['batch_size']} | {row['variant']} | {row['median_ms']:.1f} | "
                     f"{row['min_ms']:.1f}-{row['max_ms']:.1f} | {row['ratio_to_baseline']:.3f} | {row['load_average']} |")
    lines += ["", "| student | batch | variant | peak tensor memory of the step (MiB) | peak RSS growth (MiB) |",
              "|---|---|---|---|---|"]
    for row in report["memory"]:
        lines.append(f"| {row['student']} | {row['batch_size']} | {row['variant']} | {row['step_peak_tensor_mib']:.1f} | "
                     f"{row['step_peak_rss_growth_mib']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny CLIP, batches 8 and 32, 3 timed steps (seconds)")
    parser.add_argument("--student_batch_sizes", type=int, nargs="*", default=[32, 64])
    parser.add_argument("--scaling_batch_sizes", type=int, nargs="*", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--memory_cases", nargs="*", default=["tiny_clip:128", "tiny_clip:1024", "builtin:128"],
                        help="student:batch pairs measured in fresh subprocesses")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every measurement")
    parser.add_argument("--parts", nargs="+", choices=("timing", "memory"), default=["timing", "memory"])
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--itc_loss", choices=contrastive_term_names(), default="infonce",
                        help="the contrastive term of every variant (CusaConfig.itc_loss); the baseline is named by it")
    parser.add_argument("--memory_probe", nargs=3, metavar=("STUDENT", "VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        student, variant, batch_size = args.memory_probe
        result = memory_probe(student, variant, int(batch_size), args.itc_loss)
        print(json.dumps(result))
        return result
    if args.quick:
        args.student_batch_sizes, args.scaling_batch_sizes = [], [8, 32]
        args.memory_cases, args.warmup, args.repeats = ["tiny_clip:32"], 1, 3

    report = {
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch threads {args.threads}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "load_average_start": os.getloadavg(),
        "command": "python benchmarks/step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "itc_loss": args.itc_loss,
        "timing": [],
        "memory": [],
    }
    if "timing" in args.parts:
        if args.student_batch_sizes:
            report["timing"] += timing_table("builtin", args.student_batch_sizes, (args.itc_loss, *CUSA_VARIANTS),
                                             args.warmup, args.repeats, args.itc_loss)
        # The online text teacher would dominate a tiny CLIP step; the scaling table compares the offline variants.
        report["timing"] += timing_table("tiny_clip", args.scaling_batch_sizes, (args.itc_loss, "cusa"), args.warmup,
                                         args.repeats, args.itc_loss)
    if "memory" in args.parts:
        cases = [(case.split(":")[0], int(case.split(":")[1])) for case in args.memory_cases]
        report["memory"] = memory_table(cases, (args.itc_loss, "cusa"), args.threads, args.itc_loss)
    report["load_average_end"] = os.getloadavg()
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
