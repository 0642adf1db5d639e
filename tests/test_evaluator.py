"""RetrievalEvaluator: standalone on a tiny model, and as CusaTrainer's evaluator (same metrics as the trainer's own
evaluation, views built once). The evaluator contract: CusaTrainer with any Evaluator and with a list of them; ECCV
Caption and uni-modal metrics as evaluators during training; the model card labels their metrics from the metric
registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import synthetic_dataset, tiny_clip_processor, tiny_cusa_model

import cusa_hf.evaluation.evaluator as evaluator_module
from cusa_hf import RetrievalEvaluator
from cusa_hf.evaluation.eval_view import build_eval_view
from cusa_hf.backbones import RerankConfig
from cusa_hf.evaluation.eccv import eccv_metrics
from cusa_hf.evaluation.eccv_evaluator import EccvEvaluator
from cusa_hf.evaluation.encoding import encode_images, encode_texts, evaluate_retrieval, split_similarity
from cusa_hf.evaluation.evaluator import Evaluator, SequentialEvaluator
from cusa_hf.evaluation.loaders import LabelledImages, StsData
from cusa_hf.evaluation.unimodal import image_retrieval_r1, sts_spearman
from cusa_hf.evaluation.unimodal_evaluators import ImageRetrievalEvaluator, StsEvaluator
from cusa_hf.model_card import metrics_from_eval_results, render_model_card
from cusa_hf.trainer import CusaTrainer, cusa_training_arguments

RETRIEVAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@pytest.fixture(scope="module")
def setup():
    return tiny_cusa_model(), tiny_clip_processor(), synthetic_dataset(num_images=6, captions_per_image=2)


def training_args(tmp_path, **overrides):
    settings = dict(per_device_eval_batch_size=4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    return cusa_training_arguments(str(tmp_path), **{**settings, **overrides})


def oracle_rerank(view):
    """A perfect ITM matcher over the view's indices: reranked recalls reach 100 where k allows."""
    truth = view.text_to_image
    return RerankConfig(lambda image_idx, text_idx: (truth[text_idx] == image_idx).float(), k_i2t=12, k_t2i=6)


def without_runtime(metrics):
    """The retrieval metrics of a trainer's evaluation (without its timing and the epoch that ``Trainer.log`` adds)."""
    return {key: value for key, value in metrics.items() if key != "epoch" and not key.endswith("_runtime")}


def count_view_builds(monkeypatch):
    builds = []

    def counting_build_eval_view(*args, **kwargs):
        builds.append(args[0])
        return build_eval_view(*args, **kwargs)

    monkeypatch.setattr(evaluator_module, "build_eval_view", counting_build_eval_view)
    return builds


def test_standalone_evaluator_equals_evaluate_retrieval_and_builds_its_view_once(setup, monkeypatch):
    model, processor, dataset = setup
    builds = count_view_builds(monkeypatch)
    evaluator = RetrievalEvaluator(dataset, metric_key_prefix="val", batch_size=4, show_progress=False)
    metrics = evaluator(model, processor)
    expected = evaluate_retrieval(model, processor, build_eval_view(dataset), batch_size=4, show_progress=False)
    assert metrics == {f"val_{name}": value for name, value in expected.items()}
    assert list(metrics) == [f"val_{name}" for name in RETRIEVAL_KEYS]
    assert evaluator(model, processor, metric_key_prefix="test") == {f"test_{k}": v for k, v in expected.items()}
    assert len(builds) == 1  # the second call reused the view
    assert evaluator.eval_view is evaluator.eval_view


def test_evaluator_accepts_a_ready_view_and_reranks(setup):
    model, processor, dataset = setup
    view = build_eval_view(dataset)
    plain = RetrievalEvaluator(view, show_progress=False)(model, processor)
    assert plain["eval_rsum"] == evaluate_retrieval(model, processor, view, show_progress=False)["rsum"]
    factory_calls = []

    def rerank_factory(model_, processor_, view_):
        factory_calls.append((model_, processor_, view_))
        return oracle_rerank(view_)

    reranked = RetrievalEvaluator(view, rerank=rerank_factory, show_progress=False)(model, processor)
    assert factory_calls == [(model, processor, view)]
    assert reranked["eval_rsum"] == 600.0 and reranked["eval_itc_rsum"] == plain["eval_rsum"]
    assert RetrievalEvaluator(view, rerank=oracle_rerank(view), show_progress=False)(model, processor) == reranked


def test_pairwise_scorer_replaces_encoding(setup):
    model, processor, dataset = setup
    calls = []

    def dual_encoder_scorer(model_, view):
        calls.append(model_)
        images = encode_images(model_, view.images, processor.image_processor, show_progress=False)
        texts = encode_texts(model_, view.captions, processor.tokenizer, show_progress=False)
        return lambda image_idx, text_idx: images[image_idx] @ texts[text_idx].T

    evaluator = RetrievalEvaluator(dataset, pairwise_scorer=dual_encoder_scorer, show_progress=False)
    metrics = evaluator(model)  # a pairwise scorer needs no processor
    assert calls == [model]
    expected = RetrievalEvaluator(dataset, show_progress=False)(model, processor)
    assert metrics == pytest.approx(expected)


def test_evaluator_errors_name_the_argument(setup):
    model, processor, dataset = setup
    with pytest.raises(TypeError, match="one RetrievalEvaluator per split"):
        RetrievalEvaluator({"validation": dataset})
    with pytest.raises(ValueError, match="rerank or pairwise_scorer, not both"):
        RetrievalEvaluator(dataset, rerank=oracle_rerank(build_eval_view(dataset)), pairwise_scorer=lambda m, v: None)
    with pytest.raises(ValueError, match="text_batch_size must be positive"):
        RetrievalEvaluator(dataset, text_batch_size=0)
    with pytest.raises(ValueError, match="needs the model's processor"):
        RetrievalEvaluator(dataset, show_progress=False)(model)
    with pytest.raises(ValueError, match="no 'picture' column"):
        RetrievalEvaluator(dataset, image_column="picture", show_progress=False)(model, processor)


def test_trainer_with_an_evaluator_reports_what_its_own_evaluation_reports(setup, tmp_path, monkeypatch):
    model, processor, dataset = setup
    builds = count_view_builds(monkeypatch)
    args = training_args(tmp_path)
    own = CusaTrainer(model=model, args=args, eval_dataset=dataset, processing_class=processor)
    evaluator = RetrievalEvaluator(dataset, batch_size=4, show_progress=False)
    given = CusaTrainer(model=model, args=args, processing_class=processor, evaluator=evaluator)
    assert given.eval_dataset is dataset  # the stock Trainer's eval_strategy check sees the evaluator's split
    expected = without_runtime(own.evaluate())
    assert list(expected) == [f"eval_{name}" for name in RETRIEVAL_KEYS]
    assert without_runtime(given.evaluate()) == expected
    assert without_runtime(given.evaluate()) == expected
    assert "eval_runtime" in given.evaluate()
    assert len(builds) == 2  # one view per evaluator, built at its first evaluation
    # Another split (here the same rows) with the given evaluator's settings, under its own prefix; a dict per split.
    test = dataset.select(range(len(dataset)))
    assert without_runtime(given.evaluate(test, metric_key_prefix="test")) == {
        key.replace("eval_", "test_"): value for key, value in expected.items()
    }
    by_split = given.evaluate({"a": test, "b": dataset})
    assert without_runtime(by_split) == {
        key.replace("eval_", f"eval_{split}_"): value for split in "ab" for key, value in expected.items()
    }
    assert len(builds) == 4  # a split passed to evaluate() is evaluated once, by its own evaluator; the given one serves
    # its own split with the view it built
    logged = [entry for entry in given.state.log_history if "test_rsum" in entry]
    assert logged and logged[-1]["test_rsum"] == expected["eval_rsum"]


def test_trainer_evaluates_each_epoch_with_only_an_evaluator(setup, tmp_path):
    _, processor, dataset = setup
    torch.manual_seed(0)
    model = tiny_cusa_model()
    args = training_args(tmp_path, num_train_epochs=2, per_device_train_batch_size=6, eval_strategy="epoch",
                         learning_rate=1e-3)  # fmt: skip
    evaluator = RetrievalEvaluator(dataset, show_progress=False)
    trainer = CusaTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor, evaluator=evaluator)
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_rsum" in entry]
    assert len(evaluations) == 2
    assert evaluations[-1]["eval_rsum"] == evaluator(model, processor)["eval_rsum"]


def test_the_kept_checkpoint_is_chosen_on_the_evaluators_primary_metric(setup, tmp_path):
    _, processor, dataset = setup
    torch.manual_seed(0)
    model = tiny_cusa_model()
    args = training_args(tmp_path / "given", num_train_epochs=2, per_device_train_batch_size=6, eval_strategy="epoch",
                         save_strategy="epoch", load_best_model_at_end=True, learning_rate=1e-3)  # fmt: skip
    assert args.metric_for_best_model == "loss"  # TrainingArguments' fallback: a retrieval evaluation reports no loss
    evaluator = RetrievalEvaluator(dataset, primary_metric="t2i_r1", show_progress=False)
    trainer = CusaTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor, evaluator=evaluator)
    assert (args.metric_for_best_model, args.greater_is_better) == ("t2i_r1", True)
    trainer.train()
    evaluations = [entry["eval_t2i_r1"] for entry in trainer.state.log_history if "eval_t2i_r1" in entry]
    assert len(evaluations) == 2 and trainer.state.best_metric == max(evaluations)
    # The evaluator the trainer builds for eval_dataset ranks on RSUM, also for save_strategy="best" (which the stock
    # Trainer refuses without a metric); a metric the arguments name is kept.
    best = training_args(tmp_path / "best", eval_strategy="epoch", save_strategy="best")
    CusaTrainer(model=model, args=best, eval_dataset=dataset, processing_class=processor)
    assert (best.metric_for_best_model, best.greater_is_better) == ("rsum", True)
    named = training_args(tmp_path / "named", eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                          metric_for_best_model="i2t_r5")  # fmt: skip
    CusaTrainer(model=model, args=named, eval_dataset=dataset, processing_class=processor)
    assert named.metric_for_best_model == "i2t_r5"
    with pytest.raises(ValueError, match="primary_metric='r1' is not a retrieval metric"):
        RetrievalEvaluator(dataset, primary_metric="r1")


def test_cached_tower_columns_are_checked_against_each_model(tmp_path):
    from cusa_hf import add_image_tower_features

    processor = tiny_clip_processor()
    dataset = synthetic_dataset(num_images=4, captions_per_image=2)

    def frozen(seed):
        model = tiny_cusa_model(seed)
        model.adapter.image_tower().requires_grad_(False)
        return model

    model = frozen(0)
    cached = add_image_tower_features(dataset, model, processor.image_processor, show_progress=False, cache_dir=tmp_path)
    evaluator = RetrievalEvaluator(cached, show_progress=False)
    assert evaluator(model, processor) == pytest.approx(RetrievalEvaluator(dataset, show_progress=False)(model, processor))
    with pytest.raises(ValueError, match="computed with other vision tower weights"):
        evaluator(frozen(5), processor)


@dataclasses.dataclass(eq=False)
class MeanTextNorm(Evaluator):
    """A metric that is better when lower, of no retrieval kind: the mean norm of the USA text features."""

    eval_data: list
    primary_metric: str = "text_norm"
    greater_is_better: bool = False

    def __call__(self, model, processor=None, *, accelerator=None, metric_key_prefix=None):
        features = encode_texts(model, self.eval_data, processor.tokenizer, 8, "uni", show_progress=False)
        return self.prefixed({"text_norm": float(features.norm(dim=1).mean()) + 1.0}, metric_key_prefix)


def sts_data():
    return StsData(["a red car", "a blue dog", "the cat", "a green bus"], ["the red car", "a cat", "a dog", "a bus"],
                   [5.0, 1.0, 2.0, 4.0])  # fmt: skip


def test_any_evaluator_and_a_list_of_them_drive_training_and_checkpoint_selection(setup, tmp_path):
    _, processor, dataset = setup
    torch.manual_seed(0)
    model = tiny_cusa_model()
    args = training_args(tmp_path, num_train_epochs=2, per_device_train_batch_size=6, eval_strategy="epoch",
                         save_strategy="epoch", load_best_model_at_end=True, learning_rate=1e-3)  # fmt: skip
    custom = MeanTextNorm(list(dataset["caption"]))
    trainer = CusaTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                          evaluator=[custom, RetrievalEvaluator(dataset, show_progress=False), StsEvaluator(sts_data())])
    assert isinstance(trainer.evaluator, SequentialEvaluator)
    assert (args.metric_for_best_model, args.greater_is_better) == ("text_norm", False)
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_text_norm" in entry]
    assert len(evaluations) == 2 and {"eval_rsum", "eval_sts_spearman"} <= set(evaluations[-1])
    assert trainer.state.best_metric == min(entry["eval_text_norm"] for entry in evaluations)
    # evaluate(split) uses the settings of the first evaluator that has some for other data (here: none, so a
    # RetrievalEvaluator reading the split as the collator does).
    assert "test_rsum" in trainer.evaluate(dataset, metric_key_prefix="test")


def test_sts_and_eccv_evaluators_compute_their_metrics(setup):
    model, processor, dataset = setup
    data = sts_data()
    features = encode_texts(model, data.sentences1 + data.sentences2, processor.tokenizer, 8, "uni", show_progress=False)
    expected = sts_spearman(features[:4], features[4:], data.scores)
    assert StsEvaluator(data, show_progress=False)(model, processor) == {"eval_sts_spearman": pytest.approx(expected)}
    # Image retrieval R@1 of the USA image head: leave-one-out, and queries against a gallery, under a prefix given.
    view = build_eval_view(dataset)
    images = LabelledImages(view.images, [index % 2 for index in range(len(view.images))])
    features = encode_images(model, images.images, processor.image_processor, 4, "uni", show_progress=False)
    evaluator = ImageRetrievalEvaluator(images, batch_size=4, show_progress=False)
    assert evaluator(model, processor) == {"eval_image_r1": pytest.approx(image_retrieval_r1(features, images.labels))}
    queries, gallery = LabelledImages(images.images[:2], [0, 1]), LabelledImages(images.images[2:], images.labels[2:])
    against = ImageRetrievalEvaluator(queries, gallery=gallery, head="cross", show_progress=False)
    cross = encode_images(model, images.images, processor.image_processor, 4, "cross", show_progress=False)
    expected = image_retrieval_r1(cross[:2], [0, 1], cross[2:], images.labels[2:])
    assert against(model, processor, metric_key_prefix="test") == {"test_image_r1": pytest.approx(expected)}

    # COCO ids are integers.
    coco_ids = [int(image_id.removeprefix("img")) for image_id in dataset["image_id"]]
    dataset = dataset.remove_columns("image_id").add_column("image_id", coco_ids)
    view = build_eval_view(dataset)
    caption_ids = [100 + index for index in range(len(view.captions))]
    i2t = {image_id: [caption_ids[t] for t in texts] for image_id, texts in zip(view.image_ids, view.image_to_texts)}
    t2i = {caption_ids[t]: [view.image_ids[int(image)]] for t, image in enumerate(view.text_to_image)}
    eccv = EccvEvaluator(dataset, caption_ids, i2t, t2i, show_progress=False)
    similarity = split_similarity(model, processor, view, show_progress=False)
    expected = eccv_metrics(similarity, view.image_ids, caption_ids, i2t, t2i)
    assert eccv(model, processor, metric_key_prefix="test") == {f"test_{key}": value for key, value in expected.items()}


def test_the_model_card_labels_every_registered_metric(setup):
    model, processor, dataset = setup
    metrics = {"test_rsum": 300.0, "test_sts_spearman": 71.5, "test_eccv_r1_t2i": 40.0, "test_unknown": 1.0}
    card = render_model_card(model.config, metrics, "me/x")
    assert metrics_from_eval_results(card.data.eval_results) == {key: value for key, value in metrics.items()
                                                                 if key != "test_unknown"}  # fmt: skip
    labels = {result.metric_type: result.metric_name for result in card.data.eval_results}
    assert labels == {"rsum": "RSUM", "sts_spearman": "STS Spearman x100", "eccv_r1_t2i": "ECCV Caption t2i R@1"}
    text = str(card)
    assert "### uni-modal" in text and "| test | 71.50 |" in text and "### ECCV Caption" in text
