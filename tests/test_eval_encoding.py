"""Encoding helpers: order, de-duplication, modes, heads, and multi-process gathering without duplicates or drops."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cusa_hf.evaluation.eval_view import RetrievalEvalView
from cusa_hf.backbones import RerankConfig
from cusa_hf.evaluation.encoding import (
    encode_images,
    encode_texts,
    evaluate_image_retrieval,
    evaluate_retrieval,
    evaluate_sts,
)
from cusa_hf.evaluation.loaders import LabelledImages, StsData
from cusa_hf.evaluation.metrics import retrieval_metrics


class IndexTokenizer:
    """Stand-in tokenizer: caption "item <i>" -> one token i."""

    model_max_length = 8

    def __call__(self, captions, padding, truncation, max_length, return_tensors):
        ids = torch.tensor([[int(c.split()[1])] for c in captions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class ValueImageProcessor:
    """Stand-in image processor: the red value of a solid image as a 1-pixel 'pixel_values'."""

    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.tensor([[float(image.getpixel((0, 0))[0])] for image in images])}


class StandInModel(torch.nn.Module):
    """Features (item, 1, head flag), recording calls, modes and grad mode."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def _features(self, values, head):
        self.calls.append((len(values), self.training, torch.is_inference_mode_enabled(), head))
        flag = torch.full_like(values, 1.0 if head == "uni" else 0.0)
        return torch.stack([values * self.scale, torch.ones_like(values), flag], dim=-1)

    def get_image_features(self, pixel_values, head="cross"):
        return self._features(pixel_values[:, 0].float(), head)

    def get_text_features(self, input_ids, attention_mask=None, head="cross"):
        return self._features(input_ids[:, 0].float(), head)


def solid(value):
    return Image.new("RGB", (2, 2), (value, 0, 0))


def expected_features(values, head="cross"):
    values = torch.tensor(values, dtype=torch.float32)
    flag = torch.full_like(values, 1.0 if head == "uni" else 0.0)
    return torch.nn.functional.normalize(torch.stack([values, torch.ones_like(values), flag], -1), dim=-1)


def test_encode_texts_order_dedup_modes_and_head():
    model = StandInModel().train()
    captions = ["item 3", "item 1", "item 3", "item 7", "item 1"]
    features = encode_texts(model, captions, IndexTokenizer(), batch_size=2, head="uni", show_progress=False)
    torch.testing.assert_close(features, expected_features([3, 1, 3, 7, 1], "uni"))
    assert [c[0] for c in model.calls] == [2, 1]  # 3 unique captions in batches of 2
    assert all(not training and inference and head == "uni" for _, training, inference, head in model.calls)
    assert model.training  # restored


def test_encode_images_paths_once_and_relative_to_root(tmp_path):
    for value in (10, 20):
        solid(value).save(tmp_path / f"{value}.png")
    model = StandInModel()
    images = ["10.png", "20.png", "10.png", solid(30)]
    features = encode_images(model, images, ValueImageProcessor(), batch_size=8, image_root=str(tmp_path),
                             show_progress=False)
    torch.testing.assert_close(features, expected_features([10, 20, 10, 30]))
    assert model.calls[0][0] == 3


def test_bad_image_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        encode_images(StandInModel(), ["missing.png"], ValueImageProcessor(), image_root=str(tmp_path),
                      show_progress=False)
    with pytest.raises(ValueError, match="head='both'"):
        encode_texts(StandInModel(), ["item 1"], IndexTokenizer(), head="both", show_progress=False)


def _two_process_gather():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    for n_items in (1, 2, 3, 5, 7):
        for batch_size in (1, 2, 4):
            model = StandInModel()
            captions = [f"item {i}" for i in range(n_items)]
            features = encode_texts(model, captions, IndexTokenizer(), batch_size=batch_size,
                                    accelerator=accelerator, show_progress=False)
            torch.testing.assert_close(features, expected_features(list(range(n_items))), rtol=0, atol=0)
            # each process encoded about half of the items (padding only in its last batch)
            assert sum(c[0] for c in model.calls) <= -(-n_items // (2 * batch_size)) * batch_size
            images = [solid(10 * i) for i in range(n_items)]
            image_features = encode_images(StandInModel(), images, ValueImageProcessor(), batch_size=batch_size,
                                           accelerator=accelerator, show_progress=False)
            torch.testing.assert_close(image_features, expected_features([10 * i for i in range(n_items)]),
                                       rtol=0, atol=0)


def test_two_processes_gather_every_row_once():
    from two_process import spawn_launcher

    spawn_launcher(_two_process_gather)


# ------------------------------------------------------------------------------------------ a real tiny CusaModel
@pytest.fixture(scope="module")
def tiny_setup():
    from tiny_models import synthetic_pairs, tiny_clip_processor, tiny_cusa_model

    rows = synthetic_pairs(num_images=6, captions_per_image=3)
    view = RetrievalEvalView.from_rows([r["image"] for r in rows], [r["caption"] for r in rows],
                                       [r["image_id"] for r in rows])
    return tiny_cusa_model(), tiny_clip_processor(), view


def test_evaluate_retrieval_with_tiny_cusa_model(tiny_setup):
    model, processor, view = tiny_setup
    metrics = evaluate_retrieval(model, processor, view, batch_size=4, text_batch_size=5, show_progress=False)
    with torch.no_grad():
        pixel_values = processor.image_processor(images=view.images, return_tensors="pt")["pixel_values"]
        tokens = processor.tokenizer(view.captions, padding=True, truncation=True, return_tensors="pt")
        image_features = model.get_image_features(pixel_values=pixel_values)
        text_features = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    expected = retrieval_metrics(image_features @ text_features.T, view.text_to_image)
    assert metrics.keys() == expected.keys()
    for name in expected:
        assert metrics[name] == pytest.approx(expected[name])


def test_evaluate_retrieval_rerank_reports_both_stages(tiny_setup):
    model, processor, view = tiny_setup
    truth = view.text_to_image

    def oracle_itm(image_idx, text_idx):  # a perfect matcher: reranked recalls must reach 100 where k allows
        return (truth[text_idx] == image_idx).float()

    metrics = evaluate_retrieval(model, processor, view, rerank=RerankConfig(oracle_itm, k_i2t=18, k_t2i=6),
                                 show_progress=False)
    assert metrics["rsum"] == 600.0
    assert "itc_rsum" in metrics and metrics["itc_rsum"] <= 600.0


def test_uni_modal_evaluation_with_tiny_cusa_model(tiny_setup):
    model, processor, view = tiny_setup
    sts = StsData(["a red cat", "the dog is blue", "a bus"], ["the cat is red", "a blue dog", "two pizza"],
                  [5.0, 4.0, 0.5])
    score = evaluate_sts(model, processor.tokenizer, sts, show_progress=False)
    assert -100.0 <= score <= 100.0
    images = LabelledImages(view.images, [i % 2 for i in range(view.num_images)])
    r1 = evaluate_image_retrieval(model, processor.image_processor, images, show_progress=False)
    assert r1 in {100.0 * k / view.num_images for k in range(view.num_images + 1)}


def test_head_none_accepts_plain_backbone_outputs():
    """head=None: no head argument, and an output object's pooler_output is used (transformers 5 CLIPModel)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class PlainModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def get_text_features(self, input_ids, attention_mask=None):
            features = torch.stack([input_ids[:, 0].float() * self.weight, torch.ones(len(input_ids))], -1)
            return BaseModelOutputWithPooling(pooler_output=features)

    features = encode_texts(PlainModel(), ["item 2", "item 5"], IndexTokenizer(), head=None, show_progress=False)
    expected = torch.nn.functional.normalize(torch.tensor([[2.0, 1.0], [5.0, 1.0]]), dim=-1)
    torch.testing.assert_close(features, expected)
