"""BLIP (transformers' BlipForImageTextRetrieval) as a CUSA backbone: features, ITM scores, original loss, training,
reranking scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval
from tiny_models import train_steps

import cusa_hf.models  # noqa: F401  (registers the adapters)
from cusa_hf.configuration_cusa import CusaConfig
from cusa_hf.modeling_cusa import CusaModel
from cusa_hf.models.blip_adapter import BlipAdapter, BlipItmScorer
from cusa_hf.models.fusion_losses import sample_hard_negatives


def tiny_blip_config() -> BlipConfig:
    # initializer_range 0.2: with BLIP's defaults (vision 1e-10, text 0.02) a random 2-layer tower gives nearly
    # identical features for every input (cosine ~0.97), and a dozen steps cannot separate them.
    return BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16, initializer_range=0.2),
        text_config=dict(vocab_size=40, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=2, eos_token_id=3,
                         sep_token_id=3, pad_token_id=0, initializer_range=0.2),
        image_text_hidden_size=16,
    )


def batch(seed=0, size=6):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(size, 3, 32, 32, generator=g)
    ids = torch.randint(4, 40, (size, 7), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    return pixels, ids, mask, torch.tensor([0, 0, 1, 2, 2, 3])[:size], torch.randn(size, 10, generator=g), torch.randn(size, 9, generator=g)


def test_cusa_builds_the_retrieval_model_and_matches_its_outputs():
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_blip_config())).eval()
    assert isinstance(model.backbone, BlipForImageTextRetrieval)
    assert not model.uses_cross_projection and model.adapter.supports_reranking
    pixels, ids, mask, *_ = batch()
    with torch.no_grad():
        itc = model.backbone(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        itm = model.backbone(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
        similarity = model.get_image_features(pixels) @ model.get_text_features(ids, mask).t()
        scores = model.adapter.pair_scores({"pixel_values": pixels}, {"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(similarity, itc)
    torch.testing.assert_close(scores, itm[:, 1])


def reference_blip_loss(adapter, pixels, ids, mask, image_ids, negatives, temp=0.07):
    """ITC with image-id soft targets + ITM with the given negatives, written out from BLIP's retrieval loss."""
    backbone = adapter.backbone
    image_seq = backbone.vision_model(pixel_values=pixels).last_hidden_state
    text_seq = backbone.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    img = F.normalize(backbone.vision_proj(image_seq[:, 0]), dim=-1)
    txt = F.normalize(backbone.text_proj(text_seq[:, 0]), dim=-1)
    pos = (image_ids[:, None] == image_ids[None, :]).float()
    targets = pos / pos.sum(1, keepdim=True)
    i2t, t2i = img @ txt.t() / temp, txt @ img.t() / temp
    itc = (-(F.log_softmax(i2t, 1) * targets).sum(1).mean() - (F.log_softmax(t2i, 1) * targets).sum(1).mean()) / 2

    def itm(images, texts, masks):
        out = backbone(input_ids=texts, attention_mask=masks, pixel_values=images, use_itm_head=True).itm_score
        return out

    neg_img, neg_txt = negatives
    logits = torch.cat([itm(pixels, ids, mask), itm(pixels[neg_img], ids, mask), itm(pixels, ids[neg_txt], mask[neg_txt])])
    labels = torch.tensor([1] * len(ids) + [0] * 2 * len(ids))
    return itc + F.cross_entropy(logits, labels)


def test_original_loss_matches_written_out_blip_loss():
    torch.manual_seed(0)
    backbone = BlipForImageTextRetrieval(tiny_blip_config()).eval()
    model = CusaModel.from_backbone(backbone, use_csa=False, use_usa=False).eval()
    pixels, ids, mask, image_ids, *_ = batch()
    generator_state = torch.get_rng_state()
    with torch.no_grad():
        out = model(pixels, ids, mask, image_ids=image_ids, return_loss=True)
        # Re-draw the same negatives the adapter drew (same global RNG state).
        torch.set_rng_state(generator_state)
        img = F.normalize(model.adapter.encode_image(pixels), dim=-1)
        txt = F.normalize(model.adapter.encode_text(ids, mask), dim=-1)
        negatives = sample_hard_negatives(img, txt, torch.tensor(0.07), image_ids, smoothing=0.0)
        expected = reference_blip_loss(model.adapter, pixels, ids, mask, image_ids, negatives)
    same = image_ids[:, None] == image_ids[None, :]
    assert not same[torch.arange(6), negatives[0]].any() and not same[torch.arange(6), negatives[1]].any()
    torch.testing.assert_close(out.loss_itc, expected, atol=1e-5, rtol=1e-5)


def test_cusa_training_steps_on_blip_reduce_the_loss():
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_blip_config())).train()
    losses = train_steps(model, *batch())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


class TinyBlipProcessor:
    """The two calls ``BlipItmScorer`` makes of a processor, for the tiny BLIP (32 px, 40-token vocabulary)."""

    def image_processor(self, images, return_tensors):
        arrays = [torch.from_numpy(np.asarray(im.resize((32, 32)), dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images]
        return {"pixel_values": torch.stack(arrays)}

    def tokenizer(self, texts, padding, truncation, max_length, return_tensors):
        ids = [[2] + [4 + (ord(ch) % 30) for ch in text][: max_length - 1] for text in texts]
        width = max(map(len, ids))
        return _Batch(input_ids=torch.tensor([row + [0] * (width - len(row)) for row in ids]),
                      attention_mask=torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids]))


def tiny_blip_eval_view():
    """Four random pictures with two captions each."""
    from PIL import Image

    from cusa_hf.evaluation.eval_view import RetrievalEvalView

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(4)]
    return RetrievalEvalView.from_rows([p for p in pictures for _ in range(2)], [f"cap{i}" for i in range(8)],
                                       [i for i in range(4) for _ in range(2)])


def test_rerank_scorer_is_itm_plus_cosine():
    from cusa_hf.evaluation.reranking import rerank_with_itm

    torch.manual_seed(0)
    backbone = BlipForImageTextRetrieval(tiny_blip_config()).eval()
    view = tiny_blip_eval_view()
    scorer = BlipItmScorer.from_eval_view(backbone, TinyBlipProcessor(), view, show_progress=False)
    adapter = BlipAdapter(backbone)
    with torch.no_grad():
        sims = scorer.image_features @ scorer.text_features.t()
        i2t, _ = rerank_with_itm(sims, scorer, 3, 2, batch_size=5, show_progress=False)
        for i in range(4):
            for t in sims[i].topk(3).indices.tolist():
                itm = adapter.itm_logits(scorer.image_sequences[i : i + 1], scorer.input_ids[t : t + 1],
                                         scorer.attention_mask[t : t + 1])[0, 1]
                assert i2t[i, t].item() == pytest.approx((itm + sims[i, t]).item(), abs=1e-5)


class _Batch(dict):
    def to(self, device):
        return _Batch({k: v.to(device) for k, v in self.items()})
