import math

import pytest
import torch
from tiny_models import synthetic_dataset, tiny_clip_processor, tiny_cusa_model

from cusa_hf.images import BadImageError
from cusa_hf.collator import CusaDataCollator
from cusa_hf.schema import stable_image_id
from cusa_hf.trainer import CusaTrainer, cusa_training_arguments


def training_args(tmp_path, **overrides):
    settings = dict(
        learning_rate=5e-3,
        num_train_epochs=8,
        per_device_train_batch_size=8,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return cusa_training_arguments(str(tmp_path), **settings)


def test_trainer_reduces_the_loss_and_logs_cusa_terms(tmp_path):
    dataset = synthetic_dataset(num_images=8, captions_per_image=2)
    model = tiny_cusa_model()
    trainer = CusaTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset, processing_class=tiny_clip_processor())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) >= 4
    for key in ("loss_itc", "loss_csa", "loss_usa", "itc_temperature", "csa_temperature", "usa_image_temperature",
                "softlabel_entropy_image", "softlabel_entropy_text", "softlabel_same_image_mass_text"):
        assert key in logs[-1], key
    # 8-pair batches: a row entropy lies between one-hot (0) and uniform (log 8).
    assert 0 < logs[-1]["softlabel_entropy_text"] <= torch.log(torch.tensor(8.0)).item() + 1e-6
    assert logs[-1]["loss"] < logs[0]["loss"]
    temperatures = model.temperatures()
    assert 0.01 <= temperatures["itc_temperature"] <= 0.10
    assert 0.10 <= temperatures["csa_temperature"] <= 0.99


def test_trainer_logs_the_sigmoid_terms_scale_and_bias_as_it_logs_temperatures(tmp_path):
    dataset = synthetic_dataset(num_images=8, captions_per_image=2)
    model = tiny_cusa_model(itc_loss="sigmoid")
    args = training_args(tmp_path, num_train_epochs=2)  # 16 pairs in batches of 8: 4 steps, logged at steps 2 and 4
    trainer = CusaTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_clip_processor())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    assert "itc_temperature" not in logs[-1] and "csa_temperature" in logs[-1]
    # The last log is of the last step: the values the model ends with, trained away from log 10 and -10.
    assert logs[-1]["itc_logit_scale"] == pytest.approx(float(model.itc_logit_scale.detach()), abs=1e-6)
    assert logs[-1]["itc_logit_bias"] == pytest.approx(float(model.itc_logit_bias.detach()), abs=1e-6)
    assert logs[0]["itc_logit_scale"] != pytest.approx(math.log(10), abs=1e-4)
    assert logs[0]["itc_logit_bias"] != pytest.approx(-10.0, abs=1e-4)


def test_authors_optimiser_settings(tmp_path):
    args = cusa_training_arguments(str(tmp_path))
    assert (args.learning_rate, args.weight_decay, args.num_train_epochs) == (1e-5, 1e-4, 30)
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr": 1e-6}
    assert args.per_device_train_batch_size == 128 and not args.remove_unused_columns


def test_weight_decay_follows_the_authors_rule(tmp_path):
    model = tiny_cusa_model()
    trainer = CusaTrainer(model=model, args=training_args(tmp_path), processing_class=tiny_clip_processor())
    decayed = set(trainer.get_decay_parameter_names(model))
    assert "cross_image_projection.linear.weight" in decayed
    assert "cross_image_projection.linear.bias" not in decayed
    assert "cross_image_projection.layer_norm.weight" not in decayed  # 1-d
    assert "itc_temperature" in decayed  # 0-d parameters are decayed by the authors' rule too


def test_trainer_keeps_the_raw_columns(tmp_path):
    args = training_args(tmp_path, remove_unused_columns=True)
    CusaTrainer(model=tiny_cusa_model(), args=args, processing_class=tiny_clip_processor())
    assert args.remove_unused_columns is False


def test_missing_teacher_column_fails_before_training(tmp_path):
    dataset = synthetic_dataset().remove_columns("teacher_text_embeds")
    with pytest.raises(ValueError, match="'teacher_text_embeds' column.*add_teacher_features"):
        CusaTrainer(model=tiny_cusa_model(), args=training_args(tmp_path), train_dataset=dataset, processing_class=tiny_clip_processor())
    baseline = tiny_cusa_model(use_csa=False, use_usa=False)
    CusaTrainer(model=baseline, args=training_args(tmp_path), train_dataset=dataset, processing_class=tiny_clip_processor())


def test_collator_builds_model_inputs():
    rows = [dict(row) for row in synthetic_dataset(num_images=3, captions_per_image=2)]
    rows[0]["caption"] = " ".join(["cat"] * 40)
    collator = CusaDataCollator(tiny_clip_processor())
    batch = collator(rows)
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    assert batch["input_ids"].shape[1] == 16  # truncated to the tokenizer's limit
    assert batch["teacher_image_embeds"].shape == (6, 12) and batch["teacher_image_embeds"].dtype == torch.float32
    assert batch["image_ids"][0] == batch["image_ids"][1] and batch["image_ids"][0] != batch["image_ids"][2]
    output = tiny_cusa_model()(**batch, return_loss=True)
    assert torch.isfinite(output.loss)


def test_stable_image_ids():
    assert stable_image_id(17) == 17
    assert stable_image_id(torch.tensor(5)) == 5
    assert stable_image_id("COCO_1.jpg") == stable_image_id("COCO_1.jpg") != stable_image_id("COCO_2.jpg")
    assert 0 <= stable_image_id("x") < 2**63


def test_collator_errors_name_the_problem(tmp_path):
    rows = [dict(row) for row in synthetic_dataset(num_images=2, captions_per_image=1)]
    collator = CusaDataCollator(tiny_clip_processor())
    with pytest.raises(ValueError, match="empty or non-text caption '  ' at batch position 1"):
        collator([rows[0], {**rows[1], "caption": "  "}])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadImageError, match="broken.jpg"):
        collator([rows[0], {**rows[1], "image": str(broken)}])
    with pytest.raises(BadImageError, match="missing.jpg.*not found"):
        CusaDataCollator(tiny_clip_processor(), image_root=str(tmp_path))([{**rows[0], "image": "missing.jpg"}])
    with pytest.raises(ValueError, match="no 'caption' column"):
        collator([{k: v for k, v in rows[0].items() if k != "caption"}])
    with pytest.raises(ValueError, match="has no image_processor"):
        CusaDataCollator(tiny_clip_processor().tokenizer)


def test_trainer_evaluate_reports_retrieval_metrics_for_model_selection(tmp_path):
    dataset = synthetic_dataset(num_images=8, captions_per_image=2)
    args = training_args(
        tmp_path,
        num_train_epochs=2,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="rsum",
        per_device_eval_batch_size=4,
    )
    trainer = CusaTrainer(
        model=tiny_cusa_model(), args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=tiny_clip_processor()
    )
    metrics = trainer.evaluate()
    for key in ("eval_i2t_r1", "eval_i2t_r5", "eval_i2t_r10", "eval_t2i_r1", "eval_t2i_r5", "eval_t2i_r10", "eval_rsum"):
        assert 0 <= metrics[key] <= (600 if key == "eval_rsum" else 100), key
    # 8 images: a caption's image is always within its top 10, so text-to-image R@10 is 100 whatever the model.
    assert metrics["eval_t2i_r10"] == 100.0
    assert metrics["eval_rsum"] == sum(metrics[f"eval_{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_rsum" in entry]
    assert len(evaluations) == 2  # one per epoch
    assert trainer.state.best_metric == max(entry["eval_rsum"] for entry in evaluations)
    assert trainer.evaluate()["eval_rsum"] == trainer.state.best_metric  # the best checkpoint was loaded at the end


def test_teacher_features_of_another_width_than_the_model_was_trained_with(tmp_path):
    model = tiny_cusa_model()
    model.config.teacher_image_dim = 99
    with pytest.raises(ValueError, match="dim"):
        CusaTrainer(model=model, args=training_args(tmp_path), train_dataset=synthetic_dataset(), processing_class=tiny_clip_processor())


def test_nan_teacher_features_fail_before_training(tmp_path):
    rows = synthetic_dataset().to_list()
    rows[3]["teacher_text_embeds"][0] = float("nan")
    import datasets

    dataset = datasets.Dataset.from_list(rows, features=synthetic_dataset().features)
    with pytest.raises(ValueError, match="NaN"):
        CusaTrainer(model=tiny_cusa_model(), args=training_args(tmp_path), train_dataset=dataset, processing_class=tiny_clip_processor())
