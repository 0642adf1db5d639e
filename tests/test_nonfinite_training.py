"""A non-finite value during training (a streamed row with NaN teacher features, a step whose gradients are NaN) stops
the run with an error that names the row or the step, and the weights of the last finite step are kept on disk."""

import math

import pytest
import torch
from tiny_models import synthetic_dataset, tiny_clip_processor, tiny_cusa_model

from cusa_hf import CusaModel, CusaTrainer, cusa_training_arguments
from cusa_hf.collator import CusaDataCollator
from cusa_hf.training_checks import NonFiniteTrainingError


def training_args(folder, **overrides):
    settings = dict(use_cpu=True, report_to=[], max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                    save_strategy="no", logging_steps=1, disable_tqdm=True)  # fmt: skip
    return cusa_training_arguments(str(folder), **{**settings, **overrides})


def assert_kept(trainer, checkpoint):
    """The checkpoint holds the trainer's current weights (the last finite step's), all finite."""
    kept = CusaModel.from_pretrained(checkpoint).state_dict()
    current = trainer.model.state_dict()
    for name, tensor in kept.items():
        assert torch.isfinite(tensor).all(), name
        torch.testing.assert_close(tensor, current[name], msg=lambda text: f"{name}: {text}")


def test_a_streamed_row_with_nan_teacher_features_is_named_and_the_last_good_state_kept(tmp_path):
    dataset = synthetic_dataset(num_images=8, captions_per_image=2)
    rows = dataset.to_list()
    rows[9]["teacher_text_embeds"][3] = math.nan  # batch 3 of 4 rows
    broken = dataset.from_list(rows, features=dataset.features)
    trainer = CusaTrainer(model=tiny_cusa_model(0), args=training_args(tmp_path), processing_class=tiny_clip_processor(),
                          train_dataset=broken.to_iterable_dataset())  # fmt: skip
    with pytest.raises(NonFiniteTrainingError) as raised:
        trainer.train()
    message, step = str(raised.value), trainer.state.global_step
    assert 0 < step < 3  # the batch of rows 8 to 11 is step 3's, read when or before that step begins
    assert f"training stopped after step {step}: " in message
    assert "teacher_text_embeds of the row at batch position 1 (image_id 'img4', caption 'the dog is red')" in message
    assert "NaN or infinite" in message and f"{tmp_path / f'checkpoint-{step}'} " in message
    assert_kept(trainer, tmp_path / f"checkpoint-{step}")


def test_a_step_with_nan_gradients_is_not_taken_and_the_last_finite_weights_are_saved(tmp_path):
    collator = CusaDataCollator(tiny_clip_processor())
    calls = []

    def poisoned_third_batch(rows):
        batch = collator(rows)
        calls.append(len(rows))
        if len(calls) == 3:
            batch["pixel_values"][0, 0, 0, 0] = math.nan
        return batch

    trainer = CusaTrainer(model=tiny_cusa_model(0), args=training_args(tmp_path), data_collator=poisoned_third_batch,
                          train_dataset=synthetic_dataset(num_images=8, captions_per_image=2))  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match=r"training stopped after step 2: the gradients of step 3 are not finite"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert_kept(trainer, tmp_path / "checkpoint-2")


def test_nan_at_the_first_step_says_there_is_nothing_to_keep(tmp_path):
    dataset = synthetic_dataset(num_images=4, captions_per_image=2)
    rows = dataset.to_list()
    rows[0]["teacher_image_embeds"][0] = math.inf
    stream = dataset.from_list(rows, features=dataset.features).to_iterable_dataset()
    trainer = CusaTrainer(model=tiny_cusa_model(0), args=training_args(tmp_path, max_steps=1), train_dataset=stream,
                          processing_class=tiny_clip_processor())  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match="teacher_image_embeds of the row at batch position 0.*no training "
                                                     "step had finished"):  # fmt: skip
        trainer.train()
    assert not (tmp_path / "checkpoint-0").exists()


def test_weights_already_blown_up_are_reported_instead_of_a_plain_resume(tmp_path):
    trainer = CusaTrainer(model=tiny_cusa_model(0), args=training_args(tmp_path, learning_rate=1e37),
                          train_dataset=synthetic_dataset(num_images=8, captions_per_image=2),
                          processing_class=tiny_clip_processor())  # fmt: skip
    with pytest.raises(NonFiniteTrainingError) as raised:
        trainer.train()
    message = str(raised.value)
    assert f"saved in {tmp_path / f'checkpoint-{trainer.state.global_step}'}" in message
    assert "their largest magnitude is " in message and "already blown up" in message
    assert "resume_from_checkpoint continues" not in message
