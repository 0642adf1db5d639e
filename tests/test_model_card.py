"""cusa_hf.model_card: Hub metadata (base_model, datasets, model-index), the card's text rendered from its template and
its usage snippet, the trainer's callback writing the card of every CusaTrainer run, and the per-run Hub repos of a
comparison. No network: the YAML is checked here."""

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image
from tiny_models import synthetic_dataset, tiny_clip_processor, tiny_cusa_model

from cusa_hf import CusaTrainer, cusa_training_arguments
from cusa_hf.arguments import DataArguments
from cusa_hf.evaluation.metrics import RETRIEVAL_METRIC_NAMES
from cusa_hf.model_card import (
    CARD_TAG,
    CusaModelCardCallback,
    CusaModelCardData,
    comparison_hub_model_id,
    eval_datasets,
    metrics_from_eval_results,
    render_model_card,
)
from cusa_hf.offline_models import BUILTIN_BACKBONE

TEACHERS = {
    "teacher_image_embeds": {"modality": "image", "name_or_path": "facebook/dinov2-base", "revision": "abc123",
                             "pooling": "cls", "dim": 768},
    "teacher_text_embeds": {"modality": "text", "name_or_path": "sentence-transformers/all-mpnet-base-v2",
                            "revision": None, "pooling": "mean+normalize", "dim": 768},
}  # fmt: skip


def run_metrics(offset: float = 0.0, rerank: bool = False) -> dict[str, float]:
    """A run's metric dict as CusaTrainer.evaluate returns it: retrieval metrics plus keys that are not."""
    metrics = {"validation_loss": 1.5, "test_runtime": 2.0, "epoch": 3.0}
    for split_index, split in enumerate(("validation", "test")):
        for index, name in enumerate(RETRIEVAL_METRIC_NAMES):
            metrics[f"{split}_{name}"] = offset + 10 * split_index + index + 1 / 3
            if rerank:
                metrics[f"{split}_itc_{name}"] = offset + index + 1 / 7
    return metrics


def retrieval_only(metrics):
    return {key: value for key, value in metrics.items() if re.fullmatch(r"(validation|test)_(itc_)?(i2t|t2i|rsum).*", key)}


def cusa_config():
    config = tiny_cusa_model().config
    config.teacher_info = TEACHERS
    return config


def front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def card(config=None, metrics=None, repo_id="me/m", **facts) -> ModelCard:
    """The card of ``config`` (default: CUSA with teachers) with ``metrics`` (default: a run's) and the run's facts."""
    metrics = run_metrics() if metrics is None else metrics
    return render_model_card(config or cusa_config(), metrics, repo_id, CusaModelCardData(**facts))


def written_card(folder, config, metrics, **facts) -> str:
    """The README that a trainer's callback writes into ``folder`` after ``metrics`` were logged."""
    callback = CusaModelCardCallback(CusaModelCardData(**facts))
    callback.on_log(None, None, None, logs=metrics)
    return callback.write(str(folder), config)


def hub_data_args(**overrides):
    return DataArguments(train_file="me/karpathy-coco", validation_file="me/karpathy-coco",
                         test_file="me/karpathy-coco", **overrides)  # fmt: skip


def test_model_index_round_trips_every_retrieval_metric_of_both_splits(tmp_path):
    metrics = run_metrics(rerank=True)
    path = written_card(tmp_path, cusa_config(), metrics, backbone="openai/clip-vit-base-patch32",
                        training_data="COCO", command="python run.py", data_args=hub_data_args())  # fmt: skip
    loaded = ModelCard.load(path).data
    assert metrics_from_eval_results(loaded.eval_results) == retrieval_only(metrics)
    assert len(loaded.eval_results) == 2 * 2 * len(RETRIEVAL_METRIC_NAMES)
    by_type = {(result.dataset_split, result.metric_type): result for result in loaded.eval_results}
    i2t, t2i, rsum = by_type["test", "i2t_r1"], by_type["test", "t2i_r10"], by_type["validation", "rsum"]
    assert (i2t.task_type, i2t.metric_name) == ("image-to-text-retrieval", "Image-to-Text R@1")
    assert (t2i.task_type, t2i.metric_name) == ("text-to-image-retrieval", "Text-to-Image R@10")
    assert (rsum.task_type, rsum.metric_name) == ("cross-modal-retrieval", "RSUM")
    assert by_type["test", "itc_rsum"].metric_name == "RSUM (ITC, before ITM reranking)"
    assert {result.dataset_type for result in loaded.eval_results} == {"me/karpathy-coco"}
    assert by_type["validation", "rsum"].dataset_name == "me/karpathy-coco (validation split)"


def test_metadata_is_the_yaml_the_hub_expects():
    metadata = front_matter(str(card(repo_id="me/clip-cusa", backbone="openai/clip-vit-base-patch32",
                                     training_data="COCO", command="python run.py", data_args=hub_data_args())))
    assert metadata["base_model"] == "openai/clip-vit-base-patch32"
    assert metadata["datasets"] == ["me/karpathy-coco"]
    assert metadata["library_name"] == "transformers" and metadata["license"] == "other"
    assert {CARD_TAG, "cusa", "image-text-retrieval", "clip"} <= set(metadata["tags"])
    # model-index as the Hub's spec lays it out: one entry named after the model, results of task + dataset + metrics.
    (entry,) = metadata["model-index"]
    assert entry["name"] == "clip-cusa"
    for result in entry["results"]:
        assert set(result) == {"task", "dataset", "metrics"}
        assert set(result["task"]) == {"type", "name"}
        assert set(result["dataset"]) == {"type", "name", "split"} and result["dataset"]["split"] in ("validation", "test")
        for metric in result["metrics"]:
            assert set(metric) == {"type", "value", "name"} and isinstance(metric["value"], float)
    # Parsing it back without ignore_metadata_errors (what the Hub's validation and ModelCard.load do) keeps all.
    assert metrics_from_eval_results(ModelCardData(**metadata).eval_results) == retrieval_only(run_metrics())


@pytest.mark.parametrize("backbone", ["local", "local CUSA", BUILTIN_BACKBONE, "sgraf", None])
def test_base_model_is_only_ever_a_hub_name(backbone, tmp_path):
    if backbone == "local CUSA":
        tiny_cusa_model().save_pretrained(tmp_path / "cusa")
    folder = {"local": str(tmp_path), "local CUSA": str(tmp_path / "cusa")}
    text = str(card(backbone=folder.get(backbone, backbone)))
    assert "base_model" not in front_matter(text)
    description = {"local": f"a local `clip` checkpoint (`{tmp_path}`)",
                   "local CUSA": f"the CUSA checkpoint `{tmp_path / 'cusa'}` (a `clip` backbone with CUSA's heads), "
                                 "fine-tuned further",
                   BUILTIN_BACKBONE: "EfficientNet-Lite0 image tower and all-MiniLM-L6-v2", "sgraf": "a new SGR/SAF",
                   None: "A fine-tune of a `clip` backbone for"}  # fmt: skip
    assert description[backbone] in text


def test_local_data_is_named_by_its_folder_and_held_out_validation_says_so(tmp_path):
    (tmp_path / "coco_mini").mkdir()
    for name in ("train.json", "test.json"):
        (tmp_path / "coco_mini" / name).write_text("[]")
    data_args = DataArguments(train_file=str(tmp_path / "coco_mini" / "train.json"),
                              test_file=str(tmp_path / "coco_mini" / "test.json"), validation_images=60)  # fmt: skip
    assert eval_datasets(data_args) == {
        "validation": ("coco_mini", "coco_mini (60 images held out of the train split)"),
        "test": ("coco_mini", "coco_mini (test split)"),
    }
    assert "datasets" not in front_matter(str(card(data_args=data_args)))  # no Hub dataset to link
    features = DataArguments(features_dir=str(tmp_path / "coco_precomp"), validation_split="dev")
    assert eval_datasets(features)["validation"] == ("coco_precomp", "coco_precomp (dev region features)")


def test_cusa_card_names_its_teachers_and_loss_settings():
    text = str(card(backbone="b", training_data="COCO", command="cmd"))
    assert "**CUSA**" in text and 'head="uni"' in text and "CSA (weight α = 0.1)" in text and "USA (weight β = 0.5)" in text
    assert "| `teacher_image_embeds` | image | `facebook/dinov2-base` | abc123 | cls | 768 |" in text
    assert "| `teacher_text_embeds` | text | `sentence-transformers/all-mpnet-base-v2` | not pinned |" in text
    assert "| csa_weight | 0.1 |" in text and "| softlabel_temperature | 1.0 |" in text
    assert f"| test | {run_metrics()['test_i2t_r1']:.2f} |" in text


def test_a_csa_only_run_says_csa():
    config = tiny_cusa_model(use_usa=False).config
    csa_card = card(config, {})
    assert "**CSA**" in csa_card.text and "USA (weight" not in csa_card.text and 'head="uni"' not in csa_card.text
    assert "model-index" not in front_matter(str(csa_card))  # nothing evaluated, nothing claimed
    assert "No retrieval evaluation was run." in csa_card.text


def test_baseline_card_says_it_is_the_infonce_baseline():
    config = tiny_cusa_model(use_csa=False, use_usa=False).config
    baseline = card(config, repo_id="me/m-baseline")
    assert "The **InfoNCE baseline** for CUSA" in baseline.text and "**No CSA, no USA, no teachers**" in baseline.text
    assert "None: the InfoNCE baseline learns from the image-caption pairs alone." in baseline.text
    assert "infonce-baseline" in baseline.data.tags and "cusa" not in baseline.data.tags
    assert "`use_csa` and `use_usa` are off" in baseline.text


def test_the_usage_snippet_runs_on_the_saved_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    model = tiny_cusa_model()
    model.save_pretrained(folder)
    tiny_clip_processor().save_pretrained(folder)
    text = Path(written_card(folder, model.config, run_metrics())).read_text()
    embed, search = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert f'CusaModel.from_pretrained("{folder}")' in embed  # no repo: the card loads its own folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for name, colour in (("cat", "red"), ("dog", "blue")):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{name}.jpg")
        Image.new("RGB", (40, 40), colour).save(tmp_path / "photos" / f"{name}.jpg")
    namespace = {}
    exec(textwrap.dedent(embed), namespace)
    assert namespace["scores"].shape == (1, 2)
    pytest.importorskip("faiss")
    exec(textwrap.dedent(search), namespace)
    assert len(namespace["hits"]) == 2


def test_the_template_renders_every_section_in_order():
    text = card(command="accelerate launch examples/run_cusa.py --cusa true").text
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == ["Usage", "Training data", "Retrieval results", "Loss settings", "Teachers",
                        "Training command", "License", "Citation"]  # fmt: skip
    assert text.startswith("\n# m\n\nA fine-tune of ")  # the title, also when the model-index holds the name
    assert "{{" not in text and "{%" not in text and "\n\n\n" not in text
    assert "accelerate launch examples/run_cusa.py --cusa true" in text and "Not recorded." in text  # no data named
    assert "## Training command" not in card().text  # no command, no section
    table = re.search(r"\| split \|.*?\n\n", text, flags=re.S).group(0).strip().splitlines()
    assert len(table) == 2 + 2 and all(line.count("|") == len(RETRIEVAL_METRIC_NAMES) + 2 for line in table)


def test_a_plain_trainer_writes_its_card_wherever_it_saves(tmp_path):
    model = tiny_cusa_model(use_csa=False, use_usa=False)
    model.config.backbone_config._name_or_path = "openai/clip-vit-base-patch32"  # as from_backbone(<Hub name>) records
    args = cusa_training_arguments(str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = CusaTrainer(model=model, args=args, processing_class=tiny_clip_processor())
    metrics = trainer.evaluate(synthetic_dataset(num_images=4, captions_per_image=2), metric_key_prefix="test")
    trainer.save_model()
    saved = ModelCard.load(tmp_path / "README.md")
    assert CARD_TAG in saved.data.tags and saved.data.base_model == "openai/clip-vit-base-patch32"
    assert metrics_from_eval_results(saved.data.eval_results) == retrieval_only(metrics)
    assert f'CusaModel.from_pretrained("{tmp_path}")' in saved.text and "InfoNCE baseline" in saved.text
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# someone else's notes\n")
    trainer.create_model_card(model_name="x")  # what push_to_hub calls before uploading: the CUSA card, not the stock one
    assert CARD_TAG in ModelCard.load(tmp_path / "README.md").data.tags


def test_each_run_of_a_comparison_has_its_own_repo(tmp_path):
    assert comparison_hub_model_id("me/x", str(tmp_path), "cusa") == "me/x"
    assert comparison_hub_model_id("me/x", str(tmp_path), "baseline") == "me/x-baseline"
    # Without hub_model_id: the comparison's folder names both (the Trainer alone would call them cusa / baseline).
    assert comparison_hub_model_id(None, str(tmp_path / "runs"), "baseline") == "runs-baseline"
    with pytest.raises(ValueError, match="run must be 'cusa' or 'baseline', got 'single'"):
        comparison_hub_model_id("me/x", str(tmp_path), "single")


def test_non_finite_metrics_stay_out_of_the_model_index_with_a_warning():
    metrics = {**run_metrics(), "test_rsum": float("nan"), "validation_t2i_r1": float("inf")}
    with pytest.warns(UserWarning, match=r"test_rsum = nan, validation_t2i_r1 = inf: not finite numbers.*left out of "
                                         r"the card's model-index"):  # fmt: skip
        rendered = card(metrics=metrics)
    expected = {key: value for key, value in retrieval_only(metrics).items() if key not in ("test_rsum", "validation_t2i_r1")}
    assert metrics_from_eval_results(rendered.data.eval_results) == expected
    metadata, text = str(rendered).split("---", 2)[1:]
    assert ".nan" not in metadata and ".inf" not in metadata and "| nan |" in text  # the results table shows it
