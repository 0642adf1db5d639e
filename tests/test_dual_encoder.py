"""CUSA around transformers' VisionTextDualEncoderModel, with a timm image tower (TimmWrapperModel)."""

import pytest
import torch

from cusa_hf import CusaConfig, CusaModel, dual_encoder_config, dual_encoder_from_towers

pytest.importorskip("timm")


def towers():
    from transformers import BertConfig, BertModel, TimmWrapperConfig, TimmWrapperModel

    torch.manual_seed(0)
    vision = TimmWrapperModel(TimmWrapperConfig(architecture="tf_efficientnet_lite0", num_classes=0))
    text = BertModel(
        BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37),
        add_pooling_layer=True,
    )
    return vision, text


def batch(size=4):
    generator = torch.Generator().manual_seed(0)
    return dict(
        pixel_values=torch.randn(size, 3, 64, 64, generator=generator),
        input_ids=torch.randint(1, 60, (size, 7), generator=generator),
        attention_mask=torch.ones(size, 7, dtype=torch.long),
        image_ids=torch.tensor([0, 0, 1, 2][:size]),
        teacher_image_embeds=torch.randn(size, 9, generator=generator),
        teacher_text_embeds=torch.randn(size, 5, generator=generator),
    )


def test_timm_tower_config_gets_its_hidden_size():
    vision, text = towers()
    config = dual_encoder_config(vision.config, text.config, projection_dim=24)
    assert config.vision_config.hidden_size == 1280 and config.projection_dim == 24


def test_cusa_trains_a_timm_bert_dual_encoder_and_round_trips(tmp_path):
    vision, text = towers()
    backbone = dual_encoder_from_towers(vision, text, projection_dim=24)
    reference = {k: v.clone() for k, v in backbone.vision_model.state_dict().items()}
    model = CusaModel.from_backbone(backbone)
    assert all(torch.equal(model.backbone.vision_model.state_dict()[k], v) for k, v in reference.items())
    assert model.adapter.image_feature_dim == 24 and model.cross_image_projection.linear.in_features == 24
    output = model(**batch(), return_loss=True)
    assert output.image_embeds.shape == (4, 24) and torch.isfinite(output.loss)
    output.loss.backward()
    assert model.backbone.visual_projection.weight.grad is not None
    model.save_pretrained(tmp_path)
    loaded = CusaModel.from_pretrained(tmp_path).eval()
    model.eval()
    inputs = batch()
    assert torch.allclose(model(**inputs).logits_per_image, loaded(**inputs).logits_per_image, atol=1e-5)


def test_dual_encoder_from_config_alone():
    vision, text = towers()
    config = CusaConfig(backbone_config=dual_encoder_config(vision.config, text.config, projection_dim=16))
    model = CusaModel(config)
    assert model(**batch(2), return_loss=True).loss.ndim == 0
