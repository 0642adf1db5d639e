"""Training on a frozen vision tower's cached output (cusa_hf.frozen_towers) equals training through the tower."""

import pytest
import torch
from tiny_models import synthetic_dataset, tiny_clip_processor, tiny_cusa_model

from cusa_hf import CusaDataCollator, CusaModel, CusaTrainer, add_image_tower_features, cusa_training_arguments
from cusa_hf.schema import IMAGE_TOWER_COLUMN


def freeze_tower(model: CusaModel) -> CusaModel:
    from timm.layers import freeze_batch_norm_2d

    tower = model.adapter.image_tower()
    tower.requires_grad_(False)
    if hasattr(tower, "timm_model"):
        tower.timm_model = freeze_batch_norm_2d(tower.timm_model)
    return model


def timm_dual_encoder(seed: int = 0) -> CusaModel:
    """EfficientNet-Lite0 (random, timm) + tiny CLIP text tower: a CNN tower with BatchNorm to freeze."""
    from tiny_models import tiny_clip_config
    from transformers import CLIPTextModel, TimmWrapperConfig, TimmWrapperModel

    from cusa_hf import dual_encoder_from_towers

    torch.manual_seed(seed)
    vision = TimmWrapperModel(TimmWrapperConfig(architecture="tf_efficientnet_lite0", num_classes=0))
    text = CLIPTextModel(tiny_clip_config().text_config)
    return CusaModel.from_backbone(dual_encoder_from_towers(vision, text, projection_dim=16))


BACKBONES = {"clip": lambda seed: tiny_cusa_model(seed), "timm-dual-encoder": timm_dual_encoder}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_tower_then_projection_is_the_backbones_image_features(backbone):
    model = BACKBONES[backbone](0).eval()
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapter = model.adapter
    tower_features = adapter.encode_image_tower(pixel_values)
    assert tower_features.shape == (3, adapter.image_tower_dim)
    assert torch.allclose(adapter.project_image_tower(tower_features), adapter.encode_image(pixel_values), atol=1e-6)


def train(model, dataset, tmp_path, processor):
    args = cusa_training_arguments(
        str(tmp_path), learning_rate=5e-3, num_train_epochs=2, per_device_train_batch_size=8, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1,
    )  # fmt: skip
    trainer = CusaTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_training_on_cached_tower_features_equals_training_on_pixels(backbone, tmp_path):
    processor = tiny_clip_processor()
    dataset = synthetic_dataset(num_images=8, captions_per_image=2)
    through_tower = freeze_tower(BACKBONES[backbone](1))
    cached = freeze_tower(BACKBONES[backbone](1))
    cached_dataset = add_image_tower_features(
        dataset, cached, processor.image_processor, batch_size=3, cache_dir=tmp_path / "cache", show_progress=False
    )
    assert len(cached_dataset[0][IMAGE_TOWER_COLUMN]) == cached.adapter.image_tower_dim
    # The collator skips the images: the cached column alone feeds the model.
    batch = CusaDataCollator(processor)([cached_dataset.remove_columns(["image"])[row] for row in range(4)])
    assert "pixel_values" not in batch and batch["image_tower_features"].shape == (4, cached.adapter.image_tower_dim)

    losses_through_tower = train(through_tower, dataset, tmp_path / "a", processor)
    losses_cached = train(cached, cached_dataset, tmp_path / "b", processor)
    assert torch.allclose(torch.tensor(losses_cached), torch.tensor(losses_through_tower), atol=1e-4)
    # Adam turns float noise in zero-gradient entries (attention key biases) into lr-sized steps, so weights are
    # compared loosely and what the model computes closely.
    trained = dict(through_tower.named_parameters())
    for name, parameter in cached.named_parameters():
        assert torch.allclose(parameter, trained[name], atol=2e-3), name
    inputs = CusaDataCollator(processor)([dataset[row] for row in range(len(dataset))])
    inputs = {key: inputs[key] for key in ("pixel_values", "input_ids", "attention_mask")}
    expected, actual = through_tower.eval()(**inputs), cached.eval()(**inputs)
    assert torch.allclose(actual.logits_per_image, expected.logits_per_image, atol=1e-3)
    assert not torch.equal(cached.backbone.visual_projection.weight, BACKBONES[backbone](1).backbone.visual_projection.weight)


def test_a_trainable_tower_cannot_be_cached_or_skipped(tmp_path):
    processor = tiny_clip_processor()
    model = tiny_cusa_model(0)
    dataset = synthetic_dataset(num_images=4, captions_per_image=2)
    with pytest.raises(ValueError, match=r"vision tower has \d+ trainable parameters .*Freeze it first"):
        add_image_tower_features(dataset, model, processor.image_processor, show_progress=False)
    cached = add_image_tower_features(
        dataset, freeze_tower(tiny_cusa_model(0)), processor.image_processor, show_progress=False, cache_dir=tmp_path
    )
    batch = CusaDataCollator(processor)([cached[row] for row in range(4)])
    model.train()
    with pytest.raises(ValueError, match="image_tower_features skip the vision tower, but .* trainable"):
        model(**{key: value for key, value in batch.items() if key != "pixel_values"})
    with pytest.raises(ValueError, match="CusaTrainer|trainable parameters"):
        CusaTrainer(model=model, args=cusa_training_arguments(str(tmp_path), use_cpu=True, report_to=[]),
                    train_dataset=cached, processing_class=processor)  # fmt: skip


def test_features_of_other_tower_weights_or_width_are_refused(tmp_path):
    processor = tiny_clip_processor()
    dataset = synthetic_dataset(num_images=4, captions_per_image=2)
    model = freeze_tower(tiny_cusa_model(0))
    cached = add_image_tower_features(dataset, model, processor.image_processor, show_progress=False, cache_dir=tmp_path)
    other = freeze_tower(tiny_cusa_model(5))
    args = cusa_training_arguments(str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="computed with other vision tower weights"):
        CusaTrainer(model=other, args=args, train_dataset=cached, processing_class=processor)
    # Recomputing for the other weights does not reuse the first model's cached table.
    recomputed = add_image_tower_features(dataset, other, processor.image_processor, show_progress=False, cache_dir=tmp_path)
    assert recomputed[0][IMAGE_TOWER_COLUMN] != cached[0][IMAGE_TOWER_COLUMN]
    CusaTrainer(model=other, args=args, train_dataset=recomputed, processing_class=processor)
    with pytest.raises(ValueError, match=r"image_tower_features has shape \(2, 5\)"):
        model.eval()(input_ids=torch.ones(2, 4, dtype=torch.long), image_tower_features=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="exactly one of pixel_values or image_tower_features"):
        model(input_ids=torch.ones(2, 4, dtype=torch.long), pixel_values=torch.zeros(2, 3, 32, 32),
              image_tower_features=torch.zeros(2, 32))  # fmt: skip


def test_backbones_without_a_separable_tower_say_so():
    from cusa_hf.models.sgraf.configuration_sgraf import SgrafConfig
    from cusa_hf.models.sgraf.modeling_sgraf import SgrafModel

    model = CusaModel.from_backbone(SgrafModel(SgrafConfig(vocab_size=20, img_dim=8, embed_size=8, word_dim=8, sim_dim=8)))
    with pytest.raises(ValueError, match="cannot cache image tower features for a 'sgraf' backbone"):
        add_image_tower_features(synthetic_dataset(num_images=2), model, tiny_clip_processor().image_processor)


def test_a_model_saved_with_frozen_batchnorm_reloads_with_nothing_missing(tmp_path):
    model = freeze_tower(timm_dual_encoder())
    model.save_pretrained(tmp_path)
    loaded, info = CusaModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    saved = model.backbone.vision_model.state_dict()
    for name, tensor in loaded.backbone.vision_model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, saved[name]), name


def test_caching_a_tower_whose_batchnorm_is_live_warns(tmp_path):
    model = timm_dual_encoder()
    model.adapter.image_tower().requires_grad_(False)  # weights frozen, BatchNorm not
    with pytest.warns(UserWarning, match=r"training mode \(\d+ BatchNorm layers are not frozen, first: timm_model\.bn1\)"):
        add_image_tower_features(synthetic_dataset(num_images=2), model, tiny_clip_processor().image_processor,
                                 show_progress=False, cache_dir=tmp_path)  # fmt: skip


def test_a_tower_with_dropout_warns():
    from tiny_models import tiny_clip_config

    from cusa_hf import CusaConfig

    config = tiny_clip_config()
    config.vision_config.attention_dropout = 0.3
    model = freeze_tower(CusaModel(CusaConfig(backbone_config=config)))
    with pytest.warns(UserWarning, match=r"training mode \(.*self_attn\.dropout=0\.3"):
        add_image_tower_features(synthetic_dataset(num_images=2), model, tiny_clip_processor().image_processor,
                                 show_progress=False, load_from_cache_file=False)  # fmt: skip


def test_the_librarys_freeze_tower_switches_dropout_off_so_training_mode_computes_as_evaluation():
    import warnings

    from tiny_models import tiny_clip_config

    from cusa_hf import CusaConfig
    from cusa_hf import freeze_tower as library_freeze_tower

    config = tiny_clip_config()
    config.vision_config.attention_dropout = 0.3
    config.text_config.attention_dropout = 0.3
    model = CusaModel(CusaConfig(backbone_config=config))
    library_freeze_tower(model.backbone.vision_model)
    library_freeze_tower(model.backbone.text_model)
    assert not any(p.requires_grad for p in model.backbone.vision_model.parameters())
    model.train()
    pixel_values = torch.randn(2, 3, 32, 32)
    input_ids = torch.randint(0, config.text_config.vocab_size, (2, 7))
    train_mode = (model.adapter.encode_image_tower(pixel_values), model.adapter.encode_text_tower(input_ids))
    model.eval()
    eval_mode = (model.adapter.encode_image_tower(pixel_values), model.adapter.encode_text_tower(input_ids))
    for trained, evaluated in zip(train_mode, eval_mode):
        assert torch.equal(trained, evaluated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_image_tower_features(synthetic_dataset(num_images=2), model, tiny_clip_processor().image_processor,
                                 show_progress=False, load_from_cache_file=False)  # fmt: skip


def test_trainer_drops_the_images_counts_tokens_and_checks_the_preprocessing(tmp_path):
    from transformers import CLIPImageProcessor, CLIPProcessor

    processor = tiny_clip_processor()
    model = freeze_tower(tiny_cusa_model(0, use_csa=False, use_usa=False))
    cached = add_image_tower_features(
        synthetic_dataset(num_images=4), model, processor.image_processor, show_progress=False, cache_dir=tmp_path
    )
    args = cusa_training_arguments(str(tmp_path), use_cpu=True, report_to=[], max_steps=2, per_device_train_batch_size=4,
                                   include_num_input_tokens_seen=True, save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = CusaTrainer(model=model, args=args, train_dataset=cached, processing_class=processor)
    assert "image" not in trainer.train_dataset.column_names  # not decoded at every step
    trainer.train()
    assert trainer.state.num_input_tokens_seen > 0 and trainer.state.total_flos > 0
    # A streaming dataset is checked from its first row.
    CusaTrainer(model=model, args=args, train_dataset=cached.to_iterable_dataset(), processing_class=processor)
    other_normalisation = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=processor.tokenizer,
    )  # fmt: skip
    with pytest.raises(ValueError, match="computed with another image preprocessing than this trainer's processor"):
        CusaTrainer(model=model, args=args, train_dataset=cached, processing_class=other_normalisation)
