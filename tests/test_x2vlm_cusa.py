"""X2-VLM as a CUSA backbone: adapter features and original loss, CUSA training steps, ITM-reranked evaluation
against a brute-force loop, processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import train_steps

import cusa_hf.models  # noqa: F401  (registers the adapters)
from cusa_hf.configuration_cusa import CusaConfig
from cusa_hf.evaluation.eval_view import RetrievalEvalView
from cusa_hf.modeling_cusa import CusaModel
from cusa_hf.models.x2vlm.adapter import x2vlm_rerank_config
from cusa_hf.models.x2vlm.configuration_x2vlm import X2VlmConfig
from cusa_hf.models.x2vlm.modeling_x2vlm import X2VlmModel
from cusa_hf.models.x2vlm.processing_x2vlm import X2VlmProcessor, pre_caption

WORDS = "a the on in with dog cat bus red blue green grass street man sitting parked two".split()


def tiny_config() -> X2VlmConfig:
    return X2VlmConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=32, drop_path_rate=0.0),
        text_config=dict(vocab_size=len(WORDS) + 5, hidden_size=24, num_text_layers=2, num_fusion_layers=1,
                         num_attention_heads=4, intermediate_size=48, max_position_embeddings=16,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        embed_dim=16,
        k_test=3,
        max_text_length=8,
    )


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    return X2VlmProcessor.from_vocab(str(vocab), image_size=32, max_length=8)


def batch(seed=0, size=6):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(size, 3, 32, 32, generator=g)
    ids = torch.randint(5, 5 + len(WORDS), (size, 6), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])[:size]
    teacher_image = torch.randn(size, 10, generator=g)
    teacher_text = torch.randn(size, 12, generator=g)
    return pixels, ids, mask, image_ids, teacher_image, teacher_text


def test_cusa_on_x2vlm_uses_the_itc_features_and_the_original_loss():
    torch.manual_seed(0)
    backbone = X2VlmModel(tiny_config()).eval()
    model = CusaModel.from_backbone(backbone).eval()
    assert not model.uses_cross_projection  # CSA on X2-VLM's own ITC similarities
    assert not hasattr(model, "itc_temperature")  # X2-VLM's own temp is used
    pixels, ids, mask, image_ids, t_img, t_txt = batch()
    torch.testing.assert_close(model.get_image_features(pixels), backbone.get_image_features(pixels))
    torch.testing.assert_close(model.get_text_features(ids, mask), backbone.get_text_features(ids, mask))
    torch.manual_seed(1)
    out = model(pixels, ids, mask, image_ids=image_ids, teacher_image_embeds=t_img, teacher_text_embeds=t_txt,
                return_loss=True)
    torch.manual_seed(1)  # the same hard-negative draws
    reference = backbone(pixels, ids, mask, image_ids=image_ids, return_loss=True)
    torch.testing.assert_close(out.loss_itc, reference.loss)
    assert out.loss_csa > 0 and out.loss_usa > 0
    torch.testing.assert_close(out.loss, out.loss_itc + 0.1 * out.loss_csa + 0.5 * out.loss_usa)


@pytest.mark.parametrize("cusa", [True, False], ids=["with_cusa", "itc_itm_only"])
def test_training_steps_reduce_the_loss(cusa):
    torch.manual_seed(0)
    fields = {} if cusa else {"use_csa": False, "use_usa": False}
    model = CusaModel(CusaConfig(backbone_config=tiny_config(), **fields)).train()
    assert model.backbone.__class__ is X2VlmModel
    losses = train_steps(model, *batch())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def tiny_eval_view(n_images=5, captions_per_image=2):
    rng = np.random.default_rng(0)
    images, captions, image_ids = [], [], []
    for i in range(n_images):
        picture = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        for c in range(captions_per_image):
            images.append(picture)
            captions.append(" ".join(rng.choice(WORDS, size=3 + c)))
            image_ids.append(i)
    return RetrievalEvalView.from_rows(images, captions, image_ids)


def brute_force_rerank(backbone, processor, view, k):
    """The original's per-query loops (Retrieval.py `evaluation`), one query at a time, -100 elsewhere."""
    pixels = processor.image_processor(images=view.images, return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer([pre_caption(c) for c in view.captions], padding="max_length", truncation=True,
                                 max_length=backbone.config.max_text_length, return_tensors="pt")
    with torch.no_grad():
        image_seq = backbone.get_image_sequence(pixels)
        text_seq = backbone.get_text_sequence(tokens["input_ids"], tokens["attention_mask"])
        sims = backbone.get_image_features(image_sequence=image_seq) @ backbone.get_text_features(text_sequence=text_seq).t()
        i2t = torch.full(sims.shape, -100.0)
        for i in range(sims.shape[0]):
            top = sims[i].topk(k).indices
            for t in top.tolist():
                i2t[i, t] = backbone.itm_score(image_seq[i : i + 1], text_seq[t : t + 1], tokens["attention_mask"][t : t + 1])[0]
        t2i = torch.full(sims.shape, -100.0)
        for t in range(sims.shape[1]):
            top = sims[:, t].topk(k).indices
            for i in top.tolist():
                t2i[i, t] = backbone.itm_score(image_seq[i : i + 1], text_seq[t : t + 1], tokens["attention_mask"][t : t + 1])[0]
    return sims, i2t, t2i


def test_reranked_evaluation_equals_brute_force_loop(processor):
    from cusa_hf.evaluation.encoding import evaluate_retrieval
    from cusa_hf.evaluation.metrics import retrieval_metrics
    from cusa_hf.evaluation.reranking import rerank_with_itm

    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_config())).eval()
    backbone = model.backbone
    view = tiny_eval_view()
    k = backbone.config.k_test
    sims, i2t_loop, t2i_loop = brute_force_rerank(backbone, processor, view, k)
    rerank = x2vlm_rerank_config(model, processor, view, batch_size=4, show_progress=False)
    assert (rerank.k_i2t, rerank.k_t2i) == (k, k)
    i2t, t2i = rerank_with_itm(sims, rerank.itm_score, k, k, batch_size=4, show_progress=False)
    candidates_i2t, candidates_t2i = i2t_loop > -100, t2i_loop > -100
    assert candidates_i2t.sum(1).eq(k).all() and candidates_t2i.sum(0).eq(k).all()
    torch.testing.assert_close(i2t[candidates_i2t], i2t_loop[candidates_i2t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t2i[candidates_t2i], t2i_loop[candidates_t2i], atol=1e-5, rtol=1e-5)
    # Non-candidates rank below every candidate of their query, as the original's -100 fill.
    assert (i2t[~candidates_i2t].max() < i2t[candidates_i2t].min()) and (t2i[~candidates_t2i].max() < t2i[candidates_t2i].min())
    expected = retrieval_metrics(i2t_loop, view.text_to_image, t2i_similarity=t2i_loop)
    metrics = evaluate_retrieval(model, processor, view, batch_size=4, rerank=rerank, show_progress=False)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
    assert "itc_rsum" in metrics


def test_pair_scores_match_the_model_itm_score():
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_config(), use_csa=False, use_usa=False)).eval()
    pixels, ids, mask, *_ = batch()
    assert model.adapter.supports_reranking
    with torch.no_grad():
        scores = model.adapter.pair_scores({"pixel_values": pixels}, {"input_ids": ids, "attention_mask": mask})
        backbone = model.backbone
        expected = backbone.itm_score(backbone.get_image_sequence(pixels), backbone.get_text_sequence(ids, mask), mask)
    torch.testing.assert_close(scores, expected)


def test_cusa_model_round_trip_with_x2vlm_backbone(tmp_path):
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_config())).eval()
    model.save_pretrained(tmp_path)
    reloaded = CusaModel.from_pretrained(tmp_path).eval()
    pixels, ids, mask, *_ = batch()
    assert torch.equal(model.get_image_features(pixels), reloaded.get_image_features(pixels))
    assert torch.equal(model.get_text_features(ids, mask), reloaded.get_text_features(ids, mask))


def test_processor_cleans_captions_and_resizes_like_the_original(processor):
    assert pre_caption("A man-riding a <person>'s BUS/car!!  ") == "a man riding a person s bus car"
    with pytest.raises(ValueError, match="empty"):
        pre_caption(" ?! ")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    out = processor(images=[image], text=["Two DOGS, on grass."], padding="max_length", return_tensors="pt")
    assert out["input_ids"].shape == (1, 8) and out["pixel_values"].shape == (1, 3, 32, 32)
    # Square bicubic resize (no crop) and CLIP mean/std, as the original test transform.
    resized = np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(out["pixel_values"][0].permute(1, 2, 0).numpy(), (resized - mean) / std, atol=1e-5)


def test_processor_round_trip_through_auto_processor(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    X2VlmModel(tiny_config()).save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "X2VlmProcessor" and reloaded.clean_captions
    assert type(reloaded.image_processor).__name__ == "BlipImageProcessorPil"  # the original's PIL resize
    assert reloaded(text=["A dog!"])["input_ids"] == processor(text=["a dog"])["input_ids"]
