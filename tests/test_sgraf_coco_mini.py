"""A short real run: coco_mini images -> EfficientNet-Lite0 grid features -> SGR / SAF trained from scratch through
CusaTrainer (hinge baseline and CUSA) -> pairwise retrieval evaluation. Slow (minutes on 2 CPU cores)."""

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from cusa_hf.configuration_cusa import CusaConfig
from cusa_hf.modeling_cusa import CusaModel
from cusa_hf.models.sgraf.configuration_sgraf import SgrafConfig
from cusa_hf.models.sgraf.tokenization_sgraf import SgrafTokenizer
from cusa_hf.models.sgraf.evaluation import evaluate_sgraf
from cusa_hf.models.sgraf.features import SgrafDataCollator, extract_grid_features
from cusa_hf.trainer import CusaTrainer, cusa_training_arguments

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = Path(os.environ.get("CUSA_COCO_MINI", REPO.parent / "shared" / "data" / "coco_mini"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (COCO_MINI / "train.json").is_file(), reason=f"coco_mini not found at {COCO_MINI}"),
]


@pytest.fixture(scope="module")
def grid_splits(tmp_path_factory):
    """The first 500 training captions (~100 images) and 250 test captions (~50 images) as grid features."""
    folder = tmp_path_factory.mktemp("sgraf_grid")
    splits = {}
    for split, count in (("train", 500), ("test", 250)):
        records = json.loads((COCO_MINI / f"{split}.json").read_text())[:count]
        subset = folder / f"{split}.json"
        subset.write_text(json.dumps(records))
        splits[split] = extract_grid_features(subset, folder, split, image_root=COCO_MINI, batch_size=50)
    return splits


def train_and_evaluate(splits, module_name, use_cusa, output_dir):
    train, test = splits["train"], splits["test"]
    tokenizer = SgrafTokenizer.from_captions(train.captions, output_dir / "tokenizer")
    config = SgrafConfig(vocab_size=len(tokenizer), img_dim=1280, embed_size=64, word_dim=64, sim_dim=32,
                         module_name=module_name, sgr_step=3,
                         max_violation=False)  # summed negatives: hardest-only learns too slowly from scratch in 200 steps
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=config, use_csa=use_cusa, use_usa=use_cusa,
                                 csa_weight=0.6 if module_name == "SGR" else 1.0, usa_weight=0.75))
    rows = train.rows()
    if use_cusa:
        # Frozen uni-modal teachers: MiniLM sentence embeddings for text, the EfficientNet-Lite0 pooled features
        # (mean of the grid cells) for images.
        from sentence_transformers import SentenceTransformer

        from cusa_hf.offline_models import minilm_path

        text_teacher = SentenceTransformer(str(minilm_path()), device="cpu").encode([r["caption"] for r in rows])
        image_teacher = np.asarray(train.features).mean(axis=1)
        for row, text_features in zip(rows, text_teacher):
            row["teacher_text_embeds"] = text_features.tolist()
            row["teacher_image_embeds"] = image_teacher[row["image"]].tolist()
    before = evaluate_sgraf(model.backbone, test.features, test.captions, test.text_to_image, tokenizer, "f30k")
    args = cusa_training_arguments(
        str(output_dir), learning_rate=2e-3, lr_scheduler_kwargs={"min_lr": 1e-5}, num_train_epochs=6,
        per_device_train_batch_size=32, max_grad_norm=2.0, report_to="none", use_cpu=True, save_strategy="no",
        logging_steps=8, seed=0,
    )
    trainer = CusaTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          data_collator=SgrafDataCollator(tokenizer, train.features))
    trainer.train()
    after = evaluate_sgraf(model.backbone, test.features, test.captions, test.text_to_image, tokenizer, "f30k")
    logged = [entry for entry in trainer.state.log_history if "loss_itc" in entry]
    return before, after, logged


@pytest.mark.parametrize("module_name,use_cusa", [("SGR", False), ("SAF", True)])
def test_grid_features_train_sgraf_from_scratch(grid_splits, module_name, use_cusa, tmp_path):
    assert grid_splits["train"].features.shape[1:] == (36, 1280)
    before, after, logged = train_and_evaluate(grid_splits, module_name, use_cusa, tmp_path)
    print(f"{module_name} cusa={use_cusa}: RSUM {before['rsum']:.1f} -> {after['rsum']:.1f}; {after}")
    assert after["rsum"] > before["rsum"] + 20, (before, after)
    assert logged[-1]["loss_itc"] < logged[0]["loss_itc"], logged
    if use_cusa:
        assert logged[0]["loss_csa"] > 0 and logged[0]["loss_usa"] > 0
