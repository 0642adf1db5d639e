"""Gain of CUSA on real data: the paper's ablation rows (InfoNCE, +CSA, +USA, CUSA) on coco_mini, several seeds.

Every row trains the built-in student of ``examples/configs/builtin_default.yaml`` (pretrained EfficientNet-Lite0
and all-MiniLM-L6-v2 towers, frozen and cached, new 256-d projections) with the built-in teachers
(EfficientNet-Lite2 and all-mpnet-base-v2: not the student's towers) and the default's hyper-parameters (60 training
images held out for validation); run_cusa flags after ``--`` change them for every row. Rows differ only in which
terms are on. Nothing is selected on the test split: each run's final model is the one tested.

After each run the saved model is reloaded and its uni-modal text-text retrieval is measured on the test split:
every caption queries the other 999 test captions and a hit is a caption of the same image (R@1, and mAP over its
four same-image captions). ``head="uni"`` gives the USA head's embeddings for rows with USA and the text tower's
normalised pooled features otherwise; the cross-modal (retrieval) embeddings are measured too. Image-image
retrieval is not measured: coco_mini has one picture per image id, so no image has another same-image item.

Results are appended run by run to ``<output_dir>/gain_runs.json`` (a rerun skips finished runs) and summarised as
mean and sample std over seeds in ``<output_dir>/gain_summary.json`` and printed as a Markdown table.

    python benchmarks/cusa_gain.py                                  # 4 rows x 3 seeds on coco_mini (2 CPUs: ~1 h)
    python benchmarks/cusa_gain.py --rows infonce cusa --seeds 0 1 2
    python benchmarks/cusa_gain.py --quick                          # a few images, one seed, tiny steps (tests)
    python benchmarks/cusa_gain.py --itc_loss sigmoid --rows infonce cusa --output_dir outputs/cusa-gain-sigmoid
                                    # the same with SigLIP's sigmoid term: sigmoid alone against sigmoid + CUSA

``--itc_loss`` picks the contrastive term of every row (``CusaConfig.itc_loss``); the row ``infonce`` is then the
term alone, labelled by its name ("sigmoid").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

#: Ablation rows of the paper's Table 4 and the run_cusa flags that select them (everything else is shared).
ROWS = {
    "infonce": ("InfoNCE", ["--cusa", "false"]),
    "csa": ("+CSA", ["--cusa", "true", "--use_usa", "false"]),
    "usa": ("+USA", ["--cusa", "true", "--use_csa", "false"]),
    "cusa": ("CUSA", ["--cusa", "true"]),
}
RETRIEVAL_COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
UNIMODAL_COLUMNS = ("tt_r1_uni", "tt_map_uni", "tt_r1_cross", "tt_map_cross")


def same_label_map(features: torch.Tensor, labels: list) -> float:
    """Leave-one-out mean average precision (percent): each row ranks all other rows by cosine similarity, and the
    rows with its label are the relevant ones. Rows without another same-label row are skipped."""
    features = torch.nn.functional.normalize(features.float(), dim=-1)
    codes = {label: index for index, label in enumerate(dict.fromkeys(labels))}
    label_codes = torch.tensor([codes[label] for label in labels])
    scores = features @ features.T
    scores.fill_diagonal_(-float("inf"))
    order = scores.argsort(dim=1, descending=True)[:, :-1]  # the query itself sorts last
    relevant = (label_codes[order] == label_codes[:, None]).float()
    n_relevant = relevant.sum(dim=1)
    precision_at_hit = relevant.cumsum(dim=1) / torch.arange(1, relevant.shape[1] + 1)
    average_precision = (precision_at_hit * relevant).sum(dim=1) / n_relevant.clamp(min=1)
    return 100.0 * float(average_precision[n_relevant > 0].mean())


@torch.no_grad()
def text_text_retrieval(model_dir: str, test_file: str, image_root: str | None) -> dict[str, float]:
    """Same-image caption retrieval on the test split with the saved model's uni and cross text embeddings."""
    from transformers import AutoModel, AutoTokenizer

    import cusa_hf  # noqa: F401  (registers CusaModel with AutoModel)
    from cusa_hf.data import load_retrieval_dataset
    from cusa_hf.evaluation.encoding import encode_texts
    from cusa_hf.evaluation.unimodal import image_retrieval_r1

    model = AutoModel.from_pretrained(model_dir).eval()
    # Only the tokenizer: the built-in student's saved TimmWrapper image processor does not reload through
    # AutoProcessor, and text-text retrieval needs no images.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test = load_retrieval_dataset(test_file, split="test", image_root=image_root)
    captions, image_ids = list(test["caption"]), list(test["image_id"])
    metrics = {}
    for head in ("uni", "cross"):
        features = encode_texts(model, captions, tokenizer, batch_size=128, head=head, show_progress=False)
        metrics[f"tt_r1_{head}"] = image_retrieval_r1(features, image_ids)
        metrics[f"tt_map_{head}"] = same_label_map(features, image_ids)
    return metrics


@torch.no_grad()
def reference_text_text(test_file: str, image_root: str | None, teachers: list[str]) -> dict[str, dict[str, float]]:
    """The same text-text retrieval with sentence-transformers encoders as they are (the text teacher, and the
    student's text tower before fine-tuning with its own sentence-transformers pooling): what the rows compare to."""
    from cusa_hf.data import load_retrieval_dataset
    from cusa_hf.evaluation.unimodal import image_retrieval_r1
    from cusa_hf.teachers.registry import load_text_teacher

    test = load_retrieval_dataset(test_file, split="test", image_root=image_root)
    captions, image_ids = list(test["caption"]), list(test["image_id"])
    references = {}
    for name in teachers:
        encoder = load_text_teacher(name)
        features = torch.cat([encoder.encode(captions[i : i + 128]).float() for i in range(0, len(captions), 128)])
        references[name] = {"tt_r1": image_retrieval_r1(features, image_ids), "tt_map": same_label_map(features, image_ids)}
    return references


def quick_data(folder: Path) -> tuple[Path, list[str]]:
    """A tiny split of coco_mini (8 train images, 4 test images), or generated shapes when coco_mini is absent;
    returns the folder and the run_cusa data flags."""
    from cusa_hf.example_data import coco_mini_folder

    source = coco_mini_folder()
    folder.mkdir(parents=True, exist_ok=True)
    if source is None:
        from cusa_hf.synthetic_data import write_shapes_dataset

        source = write_shapes_dataset(folder / "shapes", train_images=8, test_images=4)
    for split, n_images in (("train", 8), ("test", 4)):
        records = json.loads((source / f"{split}.json").read_text())
        kept = list(dict.fromkeys(record["image_id"] for record in records))[:n_images]
        subset = [record for record in records if record["image_id"] in set(kept)]
        (folder / f"{split}.json").write_text(json.dumps(subset))
    flags = ["--train_file", str(folder / "train.json"), "--test_file", str(folder / "test.json"),
             "--image_root", str(source), "--validation_images", "2", "--per_device_train_batch_size", "8",
             "--per_device_eval_batch_size", "16", "--logging_steps", "1"]
    return folder, flags


def run_one(row: str, seed: int, args: argparse.Namespace, data_flags: list[str]) -> dict[str, float]:
    import run_cusa

    from cusa_hf.example_data import coco_mini_folder

    run_dir = Path(args.output_dir) / f"{row}-seed{seed}"
    argv = [str(run_cusa.BUILTIN_CONFIG), *ROWS[row][1], "--itc_loss", args.itc_loss,
            "--compare_with_baseline", "false", "--seed", str(seed),
            "--output_dir", str(run_dir), "--overwrite_output_dir", "true", "--teacher_cache_dir", args.teacher_cache_dir,
            "--disable_tqdm", "true",
            *data_flags, *args.extra]
    start = time.time()
    results = run_cusa.main(argv)
    metrics = next(iter(results.values()))
    test_file = data_flags[data_flags.index("--test_file") + 1] if "--test_file" in data_flags else None
    if test_file is None:  # run_cusa resolved the built-in data
        test_file = str(coco_mini_folder() / "test.json")
    image_root = data_flags[data_flags.index("--image_root") + 1] if "--image_root" in data_flags else None
    metrics.update(text_text_retrieval(str(run_dir), test_file, image_root))
    metrics["wall_s"] = round(time.time() - start, 1)
    metrics["command"] = "python examples/run_cusa.py " + shlex.join([os.path.relpath(argv[0], REPO), *argv[1:]])
    return metrics


def row_label(row: str, itc_loss: str) -> str:
    """The table's name of a row: the ablation's, with the contrastive term's name for the term alone."""
    from cusa_hf.contrastive_terms import contrastive_term_class

    return contrastive_term_class(itc_loss).label if row == "infonce" else ROWS[row][0]


def summarize(runs: dict[str, dict], rows: list[str], prefix: str, itc_loss: str = "infonce") -> dict[str, dict]:
    summary = {}
    for row in rows:
        seeds = [metrics for key, metrics in runs.items() if key.split("/")[0] == row]
        if not seeds:
            continue
        entry = {"row": row_label(row, itc_loss), "n_seeds": len(seeds)}
        for column in [f"{prefix}_{c}" for c in RETRIEVAL_COLUMNS] + ["validation_rsum", *UNIMODAL_COLUMNS]:
            values = [metrics[column] for metrics in seeds]
            entry[column] = statistics.fmean(values)
            entry[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[row] = entry
    return summary


def markdown(summary: dict[str, dict], prefix: str) -> str:
    def cell(entry, column):  # a spread only where there are seeds to spread
        if entry["n_seeds"] < 2:
            return f"{entry[column]:.1f}"
        return f"{entry[column]:.1f} ± {entry[column + '_std']:.1f}"

    retrieval = [f"{prefix}_{c}" for c in RETRIEVAL_COLUMNS]
    lines = ["| row | seeds | " + " | ".join(RETRIEVAL_COLUMNS) + " | val RSUM |",
             "|---|---|" + "---|" * (len(RETRIEVAL_COLUMNS) + 1)]
    for entry in summary.values():
        lines.append(f"| {entry['row']} | {entry['n_seeds']} | "
                     + " | ".join(cell(entry, c) for c in [*retrieval, "validation_rsum"]) + " |")
    lines += ["", "| row | text-text R@1 (uni) | mAP (uni) | text-text R@1 (cross) | mAP (cross) |", "|---|---|---|---|---|"]
    for entry in summary.values():
        lines.append(f"| {entry['row']} | " + " | ".join(cell(entry, c) for c in UNIMODAL_COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", default="outputs/cusa-gain")
    parser.add_argument("--teacher_cache_dir", default=None, help="shared teacher-feature cache (default: in output_dir)")
    parser.add_argument("--quick", action="store_true", help="8 train / 4 test images, batch 8, one seed (seconds)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--itc_loss", choices=["infonce", "sigmoid"], default="infonce",
                        help="the contrastive term of every row (run_cusa's --itc_loss)")
    parser.add_argument("--references", nargs="*", default=["offline:all-mpnet-base-v2", "offline:all-MiniLM-L6-v2"],
                        help="sentence-transformers encoders whose text-text retrieval is reported as reference lines")
    parser.add_argument("extra", nargs="*", help="more run_cusa flags after '--', applied to every row")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    args.teacher_cache_dir = args.teacher_cache_dir or str(output_dir / "teacher_cache")
    data_flags: list[str] = []
    if args.quick:
        args.seeds = args.seeds[:1]
        _, data_flags = quick_data(output_dir / "quick_data")

    runs_file = output_dir / "gain_runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
    for seed in args.seeds:  # seed-major: an interrupted benchmark still has whole seeds of every row
        for row in args.rows:
            key = f"{row}/seed{seed}"
            if key in runs:
                continue
            runs[key] = run_one(row, seed, args, data_flags)
            runs_file.write_text(json.dumps(runs, indent=1))
    references_file = output_dir / "text_text_references.json"
    references = json.loads(references_file.read_text()) if references_file.is_file() else {}
    missing = [name for name in args.references if name not in references]
    if missing:
        test_file = data_flags[data_flags.index("--test_file") + 1] if data_flags else None
        image_root = data_flags[data_flags.index("--image_root") + 1] if data_flags else None
        if test_file is None:
            from cusa_hf.example_data import coco_mini_folder

            test_file = str(coco_mini_folder() / "test.json")
        references.update(reference_text_text(test_file, image_root, missing))
        references_file.write_text(json.dumps(references, indent=1))
    selected = {key: value for key, value in runs.items() if int(key.split("seed")[1]) in args.seeds}
    summary = summarize(selected, args.rows, "test", args.itc_loss)
    (output_dir / "gain_summary.json").write_text(json.dumps(summary, indent=1))
    print(markdown(summary, "test"))
    for name in args.references:
        print(f"reference {name}: text-text R@1 {references[name]['tt_r1']:.1f}, mAP {references[name]['tt_map']:.1f}")
    return summary


if __name__ == "__main__":
    main()
