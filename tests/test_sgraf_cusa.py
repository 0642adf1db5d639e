"""SGRAF inside CUSA (adapter, CusaModel), pairwise evaluation, and the region-feature data path."""

import datasets
import numpy as np
import pytest
import torch

from cusa_hf.configuration_cusa import CusaConfig
from cusa_hf.evaluation.metrics import retrieval_metrics
from cusa_hf.modeling_cusa import CusaModel
from cusa_hf.models.sgraf.configuration_sgraf import SgrafConfig
from cusa_hf.models.sgraf.modeling_sgraf import SgrafModel, hinge_triplet_loss
from cusa_hf.models.sgraf.evaluation import SgrafPairwiseScorer, evaluate_sgraf, fold_metrics
from cusa_hf.models.sgraf.features import RegionFeatureSplit, SgrafDataCollator, grid_features
from cusa_hf.models.sgraf.tokenization_sgraf import SgrafTokenizer, write_vocab
from cusa_hf.models.sgraf.training_data import load_sgraf_training_data, with_image_paths

MODULES = ["SGR", "SAF"]


def tiny_config(module_name="SGR", **overrides):
    fields = dict(vocab_size=20, word_dim=8, embed_size=16, img_dim=12, num_regions=4, sim_dim=8, sgr_step=2,
                  module_name=module_name, caption_chunk_size=3)
    fields.update(overrides)
    return SgrafConfig(**fields)


def random_batch(batch_size=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 8, (batch_size,), generator=generator)
    input_ids = torch.zeros(batch_size, int(lengths.max()), dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, :length] = torch.randint(4, 20, (length,), generator=generator)
        input_ids[row, 0], input_ids[row, length - 1] = 1, 2
    return torch.randn(batch_size, 4, 12, generator=generator), input_ids, (input_ids != 0).long()


@pytest.mark.parametrize("module_name", MODULES)
def test_cusa_model_uses_sgraf_scores_and_hinge_loss(module_name):
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_config(module_name), csa_weight=0.6, usa_weight=0.75)).eval()
    assert not hasattr(model, "itc_temperature") and not hasattr(model, "cross_image_projection")
    regions, input_ids, attention_mask = random_batch()
    teachers = dict(teacher_image_embeds=torch.randn(6, 5), teacher_text_embeds=torch.randn(6, 7))
    out = model(regions, input_ids, attention_mask, image_ids=torch.arange(6), return_loss=True, **teachers)
    backbone = model.backbone(regions, input_ids, attention_mask)
    torch.testing.assert_close(out.logits_per_image, backbone.sims)  # the raw (0, 1) scores: no ITC temperature
    torch.testing.assert_close(out.logits_per_text, backbone.sims.T)
    torch.testing.assert_close(out.loss_itc, hinge_triplet_loss(backbone.sims, 0.2, True))
    torch.testing.assert_close(out.image_embeds, backbone.image_global)  # already unit norm
    assert out.uni_image_embeds.shape == out.uni_text_embeds.shape == (6, 16)
    assert out.loss_csa > 0 and out.loss_usa > 0
    torch.testing.assert_close(out.loss, out.loss_itc + 0.6 * out.loss_csa + 0.75 * out.loss_usa)
    with pytest.raises(ValueError, match="scores image-text pairs itself"):
        model.get_image_features(regions)
    assert model.get_image_features(regions, head="uni").shape == (6, 16)


def test_usa_pooling_mean_uses_masked_means():
    model = CusaModel(CusaConfig(backbone_config=tiny_config(usa_pooling="mean"), use_csa=False, use_usa=False)).eval()
    regions, input_ids, attention_mask = random_batch()
    features = model.adapter.forward_features(regions, input_ids, attention_mask)
    backbone = model.backbone(regions, input_ids, attention_mask)
    torch.testing.assert_close(features.image_features, backbone.image_embeds.mean(dim=1))
    lengths = attention_mask.sum(dim=1, keepdim=True)
    torch.testing.assert_close(features.text_features, backbone.text_embeds.sum(dim=1) / lengths)
    torch.testing.assert_close(model.adapter.encode_text(input_ids, attention_mask), features.text_features)


@pytest.mark.parametrize("module_name", MODULES)
def test_cusa_steps_reduce_the_loss(module_name):
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_config(module_name, dropout=0.0), csa_weight=0.6, usa_weight=0.75))
    regions, input_ids, attention_mask = random_batch(batch_size=8, seed=1)
    teacher_image = torch.randn(8, 5)
    teachers = dict(teacher_image_embeds=teacher_image, teacher_text_embeds=teacher_image @ torch.randn(5, 7))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    model.train()
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        out = model(regions, input_ids, attention_mask, image_ids=torch.arange(8), return_loss=True, **teachers)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        losses.append([float(term.detach()) for term in (out.loss, out.loss_csa, out.loss_usa)])
    first, last = np.mean(losses[:3], axis=0), np.mean(losses[-3:], axis=0)
    assert last[0] < 0.5 * first[0], losses
    assert last[1] < first[1] and last[2] < first[2], (first, last)


@pytest.mark.parametrize("image_chunk,text_chunk", [(1, 1), (2, 3), (100, 100)])
def test_chunked_scorer_equals_the_model(image_chunk, text_chunk):
    model = SgrafModel(tiny_config("SAF")).eval()
    regions, input_ids, attention_mask = random_batch(batch_size=7, seed=2)
    with torch.no_grad():
        expected = model(regions[:5], input_ids, attention_mask).sims
    scorer = SgrafPairwiseScorer(model, regions[:5].numpy(), input_ids, attention_mask, batch_size=3)
    torch.testing.assert_close(scorer.similarity(image_chunk, text_chunk), expected, atol=1e-6, rtol=0)


def test_ensemble_scorer_and_folds():
    sgr, saf = SgrafModel(tiny_config("SGR")).eval(), SgrafModel(tiny_config("SAF")).eval()
    regions, input_ids, attention_mask = random_batch(batch_size=10, seed=3)
    ensemble = SgrafPairwiseScorer([sgr, saf], regions, input_ids, attention_mask)
    single = [SgrafPairwiseScorer(m, regions, input_ids, attention_mask).similarity() for m in (sgr, saf)]
    torch.testing.assert_close(ensemble.similarity(3, 4), (single[0] + single[1]) / 2, atol=1e-6, rtol=0)

    text_to_image = torch.arange(10)  # one caption per image; 2 folds of 5
    folded = fold_metrics(ensemble, text_to_image, folds=2, image_chunk=2, text_chunk=3)
    full = ensemble.similarity()
    per_fold = [retrieval_metrics(full[f * 5 : f * 5 + 5, f * 5 : f * 5 + 5], torch.arange(5)) for f in range(2)]
    for name, value in folded.items():
        assert value == pytest.approx((per_fold[0][name] + per_fold[1][name]) / 2)
    with pytest.raises(ValueError, match="3 equal folds"):
        fold_metrics(ensemble, text_to_image, folds=3)


def test_evaluate_sgraf_matches_the_shared_metrics(tmp_path):
    words = {t: i for i, t in enumerate(["<pad>", "<start>", "<end>", "<unk>", *"abcdefghijklmnop"])}
    write_vocab(words, tmp_path / "vocab.json")
    tokenizer = SgrafTokenizer(vocab_file=str(tmp_path / "vocab.json"))
    model = SgrafModel(tiny_config(vocab_size=len(words))).eval()
    regions = torch.randn(5, 4, 12)
    captions = [" ".join("abcdefghijklmnop"[(i * 3 + k) % 16] for k in range(3)) for i in range(10)]
    metrics = evaluate_sgraf(model, regions, captions, torch.arange(10) // 2, tokenizer, protocol="f30k")
    assert set(metrics) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}
    assert metrics["t2i_r5"] == metrics["i2t_r10"] == 100.0  # 5 images, 10 captions: all within the top 5 / 10
    text = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        sims = model(regions, text["input_ids"], text["attention_mask"]).sims
    assert metrics == pytest.approx(retrieval_metrics(sims, torch.arange(10) // 2))
    with pytest.raises(ValueError, match="protocol"):
        evaluate_sgraf(model, regions, captions, torch.arange(10) // 2, tokenizer, protocol="coco")


def test_region_feature_split_round_trip_and_scan_rule(tmp_path):
    features = np.random.default_rng(0).standard_normal((3, 4, 12)).astype(np.float32)
    captions = [f"caption {k}" for k in range(15)]
    split = RegionFeatureSplit(features, captions, torch.arange(15) // 5, ["x", "y", "z"])
    split.save(tmp_path, "testall")
    assert not (tmp_path / "testall_text_to_image.txt").exists()  # implied by the SCAN 5-per-image rule
    loaded = RegionFeatureSplit.load(tmp_path, "testall")
    assert isinstance(loaded.features, np.memmap) and np.array_equal(loaded.features, features)
    assert loaded.captions == captions and loaded.image_ids == ["x", "y", "z"]
    assert loaded.text_to_image.tolist() == [k // 5 for k in range(15)]
    assert loaded.rows()[7] == {"image": 1, "caption": "caption 7", "image_id": "y"}
    assert loaded.eval_view().image_to_texts[2] == [10, 11, 12, 13, 14]

    RegionFeatureSplit(features, captions[:4], torch.tensor([0, 0, 1, 2]), [0, 1, 2]).save(tmp_path, "odd")
    assert RegionFeatureSplit.load(tmp_path, "odd").text_to_image.tolist() == [0, 0, 1, 2]
    (tmp_path / "odd_text_to_image.txt").unlink()
    with pytest.raises(ValueError, match="4 captions for 3 images"):
        RegionFeatureSplit.load(tmp_path, "odd")
    with pytest.raises(FileNotFoundError, match="train_ims.npy"):
        RegionFeatureSplit.load(tmp_path, "train")


def test_collator_and_grid_pooling(tmp_path):
    words = {t: i for i, t in enumerate(["<pad>", "<start>", "<end>", "<unk>", "a", "dog"])}
    write_vocab(words, tmp_path / "vocab.json")
    features = np.arange(3 * 4 * 12, dtype=np.float32).reshape(3, 4, 12)
    collator = SgrafDataCollator(SgrafTokenizer(vocab_file=str(tmp_path / "vocab.json")), features)
    rows = [{"image": 2, "caption": "a dog", "image_id": "p", "teacher_image_embeds": [1.0, 2.0]},
            {"image": 0, "caption": "a cat runs", "image_id": "q", "teacher_image_embeds": [3.0, 4.0]}]
    batch = collator(rows)
    assert torch.equal(batch["pixel_values"], torch.from_numpy(features[[2, 0]]))
    assert batch["input_ids"].tolist() == [[1, 4, 5, 2, 0], [1, 4, 3, 3, 2]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 5]
    assert batch["teacher_image_embeds"].shape == (2, 2) and batch["image_ids"].shape == (2,)
    with pytest.raises(ValueError, match=r"feature row indices in \[0, 3\)"):
        collator([{"image": 3, "caption": "a"}])

    feature_map = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    cells = grid_features(feature_map, 2)
    assert cells.shape == (2, 4, 3)
    assert cells[1, 3, 2] == feature_map[1, 2, 2:, 2:].mean()  # bottom-right cell, last channel


def test_sgr_trains_and_evaluates_through_cusa_trainer(tmp_path):
    """The same trainer and retrieval metrics as CLIP: SgrafDataCollator batches, pairwise scoring for evaluation."""
    import datasets

    from cusa_hf.evaluation.evaluator import RetrievalEvaluator
    from cusa_hf.models.sgraf.evaluation import sgraf_pairwise_scorer
    from cusa_hf.trainer import CusaTrainer, cusa_training_arguments

    rng = np.random.default_rng(0)
    words = ["dog", "cat", "bus", "red", "blue", "runs", "sits", "a", "the", "on"]
    captions = [" ".join(rng.choice(words, size=5)) for _ in range(24)]
    split = RegionFeatureSplit(
        features=rng.normal(size=(12, 4, 12)).astype(np.float32),
        captions=captions,
        text_to_image=torch.arange(24) // 2,
        image_ids=[f"im{i}" for i in range(12)],
    )
    tokenizer = SgrafTokenizer.from_captions(captions, tmp_path / "vocab", min_count=1)
    rows = split.rows()
    for row in rows:
        row["teacher_image_embeds"] = rng.normal(size=5).astype(np.float32).tolist()
        row["teacher_text_embeds"] = rng.normal(size=7).astype(np.float32).tolist()
    dataset = datasets.Dataset.from_list(rows)
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_config("SGR", vocab_size=len(tokenizer)), csa_weight=0.6, usa_weight=0.75))
    args = cusa_training_arguments(str(tmp_path / "out"), learning_rate=2e-3, num_train_epochs=3, per_device_train_batch_size=8,
                                   logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    collator = SgrafDataCollator(tokenizer, split.features)
    evaluator = RetrievalEvaluator.from_collator(dataset, collator, pairwise_scorer=sgraf_pairwise_scorer(split.features, tokenizer),
                                                 show_progress=False)  # fmt: skip
    trainer = CusaTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, evaluator=evaluator)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # Each epoch's three batches cover the same 24 rows: compare whole epochs, not two single (shuffled) batches.
    first_epoch, last_epoch = [[entry["loss"] for entry in logs if epoch - 1 < entry["epoch"] <= epoch] for epoch in (1, 3)]
    assert "loss_csa" in logs[-1] and len(first_epoch) == len(last_epoch) == 3
    assert sum(last_epoch) < sum(first_epoch)
    metrics = trainer.evaluate()
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    scorer = SgrafPairwiseScorer(model.backbone, split.features, tokens["input_ids"], tokens["attention_mask"])
    expected = retrieval_metrics(scorer.similarity(), split.text_to_image)
    assert metrics["eval_rsum"] == pytest.approx(expected["rsum"])
    without_scorer = CusaTrainer(model=model, args=args, data_collator=SgrafDataCollator(tokenizer, split.features))
    with pytest.raises(ValueError, match="pairwise_scorer"):
        without_scorer.evaluate(dataset)


def test_training_data_errors_name_the_python_parameters(tmp_path):
    with pytest.raises(ValueError, match=r"^eval_protocol='coco': expected one of"):
        load_sgraf_training_data(str(tmp_path), training_args=None, fresh_model={}, eval_protocol="coco")
    rows = datasets.Dataset.from_dict({"image_id": ["a.jpg"]})
    with pytest.raises(ValueError, match="pass image_root=, the folder holding the files named in ids.txt"):
        with_image_paths(rows, None, "ids.txt")
    with pytest.raises(FileNotFoundError, match=f"not under image_root='{tmp_path}'"):
        with_image_paths(rows, str(tmp_path), "ids.txt")
