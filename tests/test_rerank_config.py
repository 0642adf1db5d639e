"""Each backbone adapter knows its ITM reranking: ``BackboneAdapter.rerank_config`` and ``rerank_factory`` give the
X2-VLM and BLIP configs of ``x2vlm_rerank_config`` / ``blip_rerank_config``, and refuse backbones without ITM head."""

from __future__ import annotations

import pytest
import torch
from test_blip_adapter import TinyBlipProcessor, tiny_blip_config, tiny_blip_eval_view
from test_x2vlm_cusa import WORDS, tiny_eval_view
from test_x2vlm_cusa import tiny_config as tiny_x2vlm_config
from tiny_models import tiny_clip_config, tiny_clip_processor, tiny_cusa_model
from transformers import BlipForImageTextRetrieval, CLIPModel

import cusa_hf.models  # noqa: F401  (registers the adapters)
from cusa_hf.backbones import rerank_factory
from cusa_hf.configuration_cusa import CusaConfig
from cusa_hf.backbones import RerankConfig
from cusa_hf.evaluation.encoding import evaluate_retrieval
from cusa_hf.evaluation.evaluator import RetrievalEvaluator
from cusa_hf.modeling_cusa import CusaModel
from cusa_hf.models.blip_adapter import BLIP_K_TEST, blip_rerank_config
from cusa_hf.models.x2vlm.adapter import x2vlm_rerank_config
from cusa_hf.models.x2vlm.processing_x2vlm import X2VlmProcessor


@pytest.fixture(scope="module")
def x2vlm_processor(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    return X2VlmProcessor.from_vocab(str(vocab), image_size=32, max_length=8)


def assert_same_rerank(config: RerankConfig, expected: RerankConfig, num_images: int, num_texts: int) -> None:
    assert (config.k_i2t, config.k_t2i, config.batch_size) == (expected.k_i2t, expected.k_t2i, expected.batch_size)
    image_idx = torch.arange(num_images).repeat_interleave(num_texts)
    text_idx = torch.arange(num_texts).repeat(num_images)
    torch.testing.assert_close(config.itm_score(image_idx, text_idx), expected.itm_score(image_idx, text_idx))


def test_x2vlm_factory_gives_x2vlm_rerank_config(x2vlm_processor):
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_x2vlm_config())).eval()
    view = tiny_eval_view()
    expected = x2vlm_rerank_config(model, x2vlm_processor, view, show_progress=False)
    assert expected.k_i2t == model.backbone.config.k_test
    rerank = rerank_factory(model, show_progress=False)
    assert_same_rerank(rerank(model, x2vlm_processor, view), expected, view.num_images, view.num_texts)
    assert_same_rerank(model.adapter.rerank_config(x2vlm_processor, view, show_progress=False), expected,
                       view.num_images, view.num_texts)
    # An explicit k_test wins over the backbone config's, and a bare backbone works as well as a CusaModel.
    rerank = rerank_factory(model.backbone, k_test=2, batch_size=4, show_progress=False)
    bare = rerank(model.backbone, x2vlm_processor, view)
    assert (bare.k_i2t, bare.k_t2i, bare.batch_size) == (2, 2, 4)


def test_blip_factory_gives_blip_rerank_config():
    torch.manual_seed(0)
    backbone = BlipForImageTextRetrieval(tiny_blip_config()).eval()
    model = CusaModel.from_backbone(backbone).eval()
    view, processor = tiny_blip_eval_view(), TinyBlipProcessor()
    expected = blip_rerank_config(model, processor, view, show_progress=False)
    assert expected.k_i2t == expected.k_t2i == BLIP_K_TEST
    rerank = rerank_factory(model, show_progress=False)
    assert_same_rerank(rerank(model, processor, view), expected, view.num_images, view.num_texts)
    config = rerank_factory(backbone, k_test=128, show_progress=False)(backbone, processor, view)
    assert (config.k_i2t, config.k_t2i) == (128, 128)


def test_backbones_without_itm_head_refuse_to_rerank():
    model = tiny_cusa_model()
    message = r"'clip' backbone has no ITM head.*\(model_type in \['blip', 'x2vlm'\]\)"
    with pytest.raises(ValueError, match=message):
        rerank_factory(model)
    with pytest.raises(ValueError, match=message):
        model.adapter.rerank_config(tiny_clip_processor(), eval_view=None)
    bare = CLIPModel(tiny_clip_config())
    with pytest.raises(ValueError, match=message):
        rerank_factory(bare, k_test=16)
    assert bare.logit_scale.requires_grad  # refused before an adapter touched the backbone


def test_evaluator_reranks_with_the_factory_as_with_the_config(x2vlm_processor):
    # RetrievalEvaluator is what CusaTrainer.evaluate calls; it takes a RerankConfig or a factory as ``rerank``.
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_x2vlm_config())).eval()
    view = tiny_eval_view()
    evaluator = RetrievalEvaluator(view, batch_size=4, rerank=rerank_factory(model, show_progress=False),
                                   show_progress=False)
    metrics = evaluator(model, x2vlm_processor)
    expected = evaluate_retrieval(model, x2vlm_processor, view, batch_size=4, show_progress=False,
                                  rerank=x2vlm_rerank_config(model, x2vlm_processor, view, show_progress=False))
    assert "eval_itc_rsum" in metrics
    for name, value in expected.items():
        assert metrics[f"eval_{name}"] == pytest.approx(value), name
