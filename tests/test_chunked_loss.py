"""The gradient-cached CUSA loss (``loss_chunk_size``): the same optimiser step as the unchunked one, in one process
and in two with gathered features, with dropout, gradient accumulation and the loss-component logs; refusals."""

from __future__ import annotations

import pytest
import torch
from tiny_models import synthetic_dataset, tiny_clip_processor, tiny_cusa_model

from transformers import TrainerCallback

from cusa_hf.modeling_cusa import CusaOutput
from cusa_hf.trainer import CusaTrainer, cusa_training_arguments


def one_step_args(output_dir, **overrides):
    """One plain SGD step without clipping: the recorded gradients are the loss's own, and the update is the gradient
    times the rate (Adam would blow the 1e-12 noise of gradients that are 0 in exact arithmetic up to full steps)."""
    settings = dict(
        optim="sgd", learning_rate=1e-2, weight_decay=0.0, max_grad_norm=0.0, max_steps=1, per_device_train_batch_size=64, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    settings.update(overrides)
    return cusa_training_arguments(str(output_dir), **settings)


class GradientRecorder(TrainerCallback):
    """The gradient of every parameter just before the optimiser step (the Trainer zeroes them after it)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {
            name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.requires_grad
        }


def train_one_step(output_dir, dataset, model_fields=None, **arg_overrides):
    """``(gradients, parameters after the step, training logs)`` of one ``CusaTrainer`` step of a tiny CLIP with
    trainable towers."""
    model = tiny_cusa_model(seed=0, **(model_fields or {}))
    recorder = GradientRecorder()
    trainer = CusaTrainer(
        model=model, args=one_step_args(output_dir, **arg_overrides), train_dataset=dataset,
        processing_class=tiny_clip_processor(), callbacks=[recorder],
    )  # fmt: skip
    trainer.train()
    parameters = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    logs = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return recorder.gradients, parameters, logs


#: The kinds of trainable parameter that must all get a gradient in a compared step.
TRAINED_PARTS = ("vision_model", "text_model", "cross_image_projection", "usa_text_head", "itc_temperature",
                 "csa_temperature", "usa_image_temperature")


def assert_same_step(step, reference_step, parts=TRAINED_PARTS):
    """Same parameters after the step (1e-6 relative) and same gradients, to 1e-4 of each tensor's largest entry: the
    chunked step sums the same float32 terms in another order, and a temperature's gradient is a small difference of
    large terms (measured: 3e-5 relative for a USA temperature at chunks of 7). A wrong step is off by O(1)."""
    gradient_rtol = 1e-4
    (gradients, parameters, _), (reference_gradients, reference_parameters, _) = step, reference_step
    assert gradients.keys() == reference_gradients.keys()
    moved = [name for name, gradient in reference_gradients.items() if gradient.abs().max() > 0]
    # Every kind of trainable parameter has a gradient: towers, cross projections, USA heads, temperatures.
    for part in parts:
        assert any(part in name for name in moved), part
    # The floor: gradients that are 0 in exact arithmetic (attention key biases) come out as float32 noise of the
    # model's largest gradients.
    floor = 1e-7 * max(float(gradient.abs().max()) for gradient in reference_gradients.values())
    for name, gradient in gradients.items():
        reference = reference_gradients[name]
        tolerance = max(gradient_rtol * float(reference.abs().max()), floor)
        torch.testing.assert_close(gradient, reference, rtol=gradient_rtol, atol=tolerance, msg=lambda m: f"{name}: {m}")
    for name, parameter in parameters.items():
        torch.testing.assert_close(parameter, reference_parameters[name], rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(num_images=32, captions_per_image=2)  # 64 pairs, two captions per image


@pytest.fixture(scope="module")
def unchunked_step(tmp_path_factory, dataset):
    return train_one_step(tmp_path_factory.mktemp("unchunked"), dataset)


@pytest.mark.parametrize("chunk_size", [64, 16, 7])
def test_chunked_step_equals_the_unchunked_step(tmp_path, dataset, unchunked_step, chunk_size):
    step = train_one_step(tmp_path, dataset, loss_chunk_size=chunk_size)
    assert_same_step(step, unchunked_step)
    logs, reference_logs = step[2], unchunked_step[2]
    for key in ("loss", "loss_itc", "loss_csa", "loss_usa", "softlabel_entropy_image", "softlabel_same_image_mass_text",
                "itc_temperature"):
        assert logs[key] == pytest.approx(reference_logs[key], rel=1e-5), key


def test_chunked_step_with_gradient_accumulation(tmp_path, dataset):
    """Two micro-batches of 32 pairs per optimiser step, each chunked, give the unchunked accumulated update."""
    reference = train_one_step(tmp_path / "plain", dataset, per_device_train_batch_size=32,
                               gradient_accumulation_steps=2)
    step = train_one_step(tmp_path / "chunked", dataset, per_device_train_batch_size=32,
                          gradient_accumulation_steps=2, loss_chunk_size=12)
    assert_same_step(step, reference)


def test_one_chunk_with_dropout_equals_the_unchunked_step(tmp_path, dataset):
    """A single chunk draws its dropout masks from the same RNG state as the unchunked forward pass, and its re-run
    with gradients draws them again."""
    fields = {"tower_dropout": 0.3}
    reference = train_one_step(tmp_path / "plain", dataset, fields)
    step = train_one_step(tmp_path / "chunked", dataset, fields, loss_chunk_size=64)
    assert_same_step(step, reference)


def test_chunks_with_dropout_get_the_gradient_of_their_own_masks(tmp_path, dataset):
    """Several chunks draw other masks than one pass over the batch, so the reference is the loss of the same chunked
    forward pass kept with gradients: the re-run must reproduce each chunk's masks (its saved RNG state)."""
    model = tiny_cusa_model(seed=0, tower_dropout=0.3)
    trainer = CusaTrainer(model=model, args=one_step_args(tmp_path, loss_chunk_size=16), train_dataset=dataset,
                          processing_class=tiny_clip_processor())
    batch = trainer.data_collator([dataset[index] for index in range(64)])
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, read by training_step

    torch.manual_seed(3)
    trainer.training_step(model, dict(batch))
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    chunked = {name: parameter.grad.clone() for name, parameter in trainable.items()}

    model.zero_grad()
    torch.manual_seed(3)
    pair_inputs = {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}
    outputs = [model(**{key: value[start:start + 16] for key, value in pair_inputs.items()}, return_loss=False)
               for start in range(0, 64, 16)]
    embeddings = CusaOutput(**{name: torch.cat([getattr(output, name) for output in outputs])
                               for name in ("image_embeds", "text_embeds", "uni_image_embeds", "uni_text_embeds")})
    model.loss_from_embeddings(embeddings, image_ids=batch["image_ids"], teacher_image_embeds=batch["teacher_image_embeds"],
                               teacher_text_embeds=batch["teacher_text_embeds"]).loss.backward()  # fmt: skip
    for name, parameter in trainable.items():
        torch.testing.assert_close(chunked[name], parameter.grad, rtol=1e-4, atol=1e-9, msg=lambda m: f"{name}: {m}")


def _two_process_chunked_step(dataset_rows, output_dir, result_path):
    import datasets

    from cusa_hf.distributed import is_distributed

    dataset = datasets.Dataset.from_dict(dataset_rows).cast(synthetic_dataset(num_images=1).features)
    torch.set_num_threads(1)
    step = train_one_step(output_dir, dataset, {"gather_features": True}, per_device_train_batch_size=8,
                          loss_chunk_size=3)
    assert is_distributed()
    if torch.distributed.get_rank() == 0:
        torch.save(step, result_path)


def test_two_processes_with_gathered_features_equal_one_process_step(tmp_path):
    """Two processes of 8 pairs in chunks of 3 (3 + 3 + 2), features gathered: the update of one process on the
    16 pairs unchunked (every pair of the data is in the first step either way)."""
    from two_process import spawn_launcher

    dataset = synthetic_dataset(num_images=8, captions_per_image=2)
    result_path = tmp_path / "rank0.pt"
    spawn_launcher(_two_process_chunked_step, args=(dataset.to_dict(), str(tmp_path / "ddp"), str(result_path)))
    distributed = torch.load(result_path)

    reference = train_one_step(tmp_path / "one", dataset, {"gather_features": True}, per_device_train_batch_size=16)
    # One process orders the 16 pairs differently from the two processes' concatenation: the same sums in another
    # order.
    assert_same_step(distributed, reference)
    assert distributed[2]["loss"] == pytest.approx(reference[2]["loss"], rel=1e-5)


def test_refusals_name_loss_chunk_size(tmp_path):
    import cusa_hf.models  # noqa: F401  (registers the X2-VLM and SGRAF adapters)
    from test_sgraf_cusa import tiny_config as tiny_sgraf_config
    from test_x2vlm_cusa import tiny_config as tiny_x2vlm_config

    from cusa_hf import CusaConfig, CusaModel

    def build(model, **overrides):
        return CusaTrainer(model=model, args=one_step_args(tmp_path, **overrides), data_collator=lambda rows: rows)

    with pytest.raises(ValueError, match=r"loss_chunk_size=0 must be a positive number"):
        build(tiny_cusa_model(), loss_chunk_size=0)
    with pytest.raises(ValueError, match=r"loss_chunk_size=8 cannot be used with a 'x2vlm' backbone: it brings its own"):
        build(CusaModel(CusaConfig(backbone_config=tiny_x2vlm_config())), loss_chunk_size=8)
    with pytest.raises(ValueError, match=r"loss_chunk_size=8 cannot be used with a 'sgraf' backbone: it scores"):
        build(CusaModel(CusaConfig(backbone_config=tiny_sgraf_config())), loss_chunk_size=8)
    build(CusaModel(CusaConfig(backbone_config=tiny_x2vlm_config())))  # the option off: no check

    # A tower with live BatchNorm (stand-in: a BatchNorm projection input) normalises each chunk on its own.
    model = tiny_cusa_model().train()
    model.cross_image_projection.layer_norm = torch.nn.BatchNorm1d(model.cross_image_projection.linear.in_features)
    with pytest.raises(ValueError, match=r"loss_chunk_size=8: 1 BatchNorm layers are in training mode \(first: "
                                         r"cross_image_projection.layer_norm\)"):
        build(model, loss_chunk_size=8)
