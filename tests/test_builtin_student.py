"""The built-in student from Python: ``cusa_hf.models.builtin_student.builtin_backbone`` and ``builtin_processor`` give what
``examples/run_cusa.py`` builds for ``backbone="builtin:efficientnet-lite0+minilm"``; ``CusaModel.from_backbone``
refuses that name with a pointer to them."""

from __future__ import annotations

import pytest
import torch

from cusa_hf import CusaModel
from cusa_hf.arguments import ModelArguments
from cusa_hf.factory import build_model
from cusa_hf.models.builtin_student import builtin_backbone, builtin_processor
from cusa_hf.offline_models import BUILTIN_BACKBONE, efficientnet_lite_student_image_processor, minilm_path


@pytest.fixture(scope="module")
def installed():
    pytest.importorskip("timm")
    try:
        builtin_processor()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"the built-in towers are not installed: {error}")


def test_the_built_in_student_from_python_is_run_cusas(installed):
    torch.manual_seed(0)
    from_python = CusaModel.from_backbone(builtin_backbone(), tower_dropout=0.5)
    torch.manual_seed(0)
    from_run = build_model(ModelArguments(backbone=BUILTIN_BACKBONE), tower_dropout=0.5)
    backbone = from_python.backbone.config
    assert backbone.vision_config.architecture == "tf_efficientnet_lite0" and backbone.projection_dim == 256
    assert (backbone.text_pooling, backbone.text_pooling_normalize) == ("mean", True)
    expected = from_run.state_dict()
    assert from_python.state_dict().keys() == expected.keys()
    for name, tensor in from_python.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert builtin_backbone(projection_dim=64).config.projection_dim == 64


def test_the_built_in_processor_tokenizes_as_minilm_and_crops_as_efficientnet_lite0(installed):
    from transformers import AutoTokenizer

    processor = builtin_processor()
    assert processor.image_processor.to_dict() == efficientnet_lite_student_image_processor(0).to_dict()
    assert processor.image_processor.crop_size == {"height": 224, "width": 224}
    caption = "A horse tied up to a post in a parking lot."
    assert processor.tokenizer(caption)["input_ids"] == AutoTokenizer.from_pretrained(minilm_path())(caption)["input_ids"]


def test_from_backbone_refuses_the_run_setting_name_and_says_what_to_call():
    with pytest.raises(ValueError, match=r"names run_cusa's built-in student.*CusaModel.from_backbone\(cusa_hf.models.builtin_student.builtin_backbone\(\)\)"):
        CusaModel.from_backbone(BUILTIN_BACKBONE)
