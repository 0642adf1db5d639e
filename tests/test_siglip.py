"""SigLIP and SigLIP 2 backbones (tiny random models built in code): features as get_image_features /
get_text_features give them, captions padded as their processors pad them (one tokenization for training batches,
frozen text towers and evaluation), NaFlex inputs carried, saved checkpoints loading with and without the package, and
runs through examples/run_cusa.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_run_cusa import run_cusa, shapes, tiny_run_args  # noqa: F401  (the shapes fixture)
from tiny_models import synthetic_dataset, tiny_siglip_config, tiny_siglip_processor
from without_package import run_without_cusa_hf

from cusa_hf import CusaModel
from cusa_hf.collator import CusaDataCollator
from cusa_hf.evaluation.encoding import encode_images, encode_texts
from cusa_hf.frozen_towers import add_text_tower_features, freeze_tower
from cusa_hf.siglip_backbones import SIGLIP_CAPTION_LENGTH, Siglip2Adapter, SiglipAdapter
from cusa_hf.trainer import CusaTrainer, cusa_training_arguments

CAPTIONS = ["a red cat", "a dog on grass", "blue bus in the street"]


def tiny_siglip(version: int, seed: int = 0):
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_config(tiny_siglip_config(version))


def images(count: int = 3) -> list[Image.Image]:
    return [Image.new("RGB", (40 + 8 * i, 32 + 4 * i), (70 * i, 200 - 50 * i, 40)) for i in range(count)]


@pytest.mark.parametrize("version", [1, 2])
def test_features_are_the_backbones_own_and_captions_are_padded_to_64(version):
    backbone = tiny_siglip(version)
    processor = tiny_siglip_processor(version)
    model = CusaModel.from_backbone(backbone, cross_projection=False).eval()
    assert type(model.adapter) is (SiglipAdapter if version == 1 else Siglip2Adapter)
    assert model.config.itc_loss == "sigmoid"
    image_inputs = processor.image_processor(images(), return_tensors="pt")
    if version == 2:
        assert {"pixel_attention_mask", "spatial_shapes"} <= set(image_inputs)
    text = SiglipAdapter.tokenize_captions(processor.tokenizer, CAPTIONS)
    assert text["input_ids"].shape == (3, SIGLIP_CAPTION_LENGTH)
    with torch.no_grad():
        expected_image = F.normalize(backbone.get_image_features(**image_inputs).pooler_output, dim=-1)
        expected_text = F.normalize(backbone.get_text_features(**text).pooler_output, dim=-1)
        torch.testing.assert_close(model.get_image_features(**image_inputs), expected_image, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.get_text_features(**text), expected_text, rtol=0, atol=1e-6)
    # Evaluation encodes through the same tokenization and image inputs.
    torch.testing.assert_close(
        encode_images(model, images(), processor.image_processor, show_progress=False), expected_image, atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        encode_texts(model, CAPTIONS, processor.tokenizer, show_progress=False), expected_text, atol=1e-6, rtol=0
    )


def test_the_trainer_gives_its_collator_the_models_tokenization_and_the_batch_keeps_naflex_inputs(tmp_path):
    model = CusaModel.from_backbone(tiny_siglip(2))
    processor = tiny_siglip_processor(2)
    collator = CusaDataCollator(processor)
    dataset = synthetic_dataset(num_images=4, captions_per_image=2)
    args = cusa_training_arguments(str(tmp_path), max_steps=1, per_device_train_batch_size=8, report_to=[],
                                   use_cpu=True, save_strategy="no")  # fmt: skip
    trainer = CusaTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    assert collator.backbone_adapter is Siglip2Adapter
    batch = collator([dataset[row] for row in range(4)])
    assert batch["input_ids"].shape == (4, SIGLIP_CAPTION_LENGTH)
    assert {"pixel_attention_mask", "spatial_shapes"} <= set(batch)
    trainer.train()
    assert trainer.state.global_step == 1


def test_a_frozen_text_towers_cache_equals_the_towers_features():
    model = CusaModel.from_backbone(tiny_siglip(1), use_csa=False, use_usa=False)
    freeze_tower(model.backbone.text_model)
    processor = tiny_siglip_processor(1)
    dataset = synthetic_dataset(num_images=3, captions_per_image=1)
    cached = add_text_tower_features(dataset, model, processor.tokenizer, show_progress=False, load_from_cache_file=False)
    text = SiglipAdapter.tokenize_captions(processor.tokenizer, dataset["caption"])
    with torch.no_grad():
        expected = model.backbone.get_text_features(**text).pooler_output
    torch.testing.assert_close(torch.tensor(cached["text_tower_features"]), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_a_saved_checkpoint_loads_with_and_without_the_package(version, tmp_path):
    model = CusaModel.from_backbone(tiny_siglip(version)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = CusaModel.from_pretrained(tmp_path / "ckpt").eval()
    processor = tiny_siglip_processor(version)
    image_inputs = processor.image_processor(images(), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.get_image_features(**image_inputs), model.get_image_features(**image_inputs))
        assert torch.equal(reloaded.backbone.logit_bias, model.backbone.logit_bias)
    torch.save(dict(image_inputs), tmp_path / "inputs.pt")
    script = f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "CusaModel" and "cusa_hf" not in type(model).__module__
        with torch.no_grad():
            features = model.get_image_features(**torch.load({str(tmp_path / "inputs.pt")!r}))
        torch.save(features, {str(tmp_path / "features.pt")!r})
        """
    result = run_without_cusa_hf(script, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "features.pt"), model.get_image_features(**image_inputs))


@pytest.fixture(scope="module", params=[1, 2])
def tiny_siglip_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny_siglip{request.param}")
    tiny_siglip(request.param).save_pretrained(folder)
    tiny_siglip_processor(request.param).save_pretrained(folder)
    return request.param, folder


def test_run_cusa_trains_compares_evaluates_saves_and_reloads(tiny_siglip_folder, shapes, tmp_path, monkeypatch):  # noqa: F811
    version, folder = tiny_siglip_folder
    output_dir = tmp_path / "run"
    processor = tiny_siglip_processor(version)
    trained_texts = {}

    class RecordingTrainer(run_cusa.CusaTrainer):
        def save_model(self, output_dir=None, _internal_call=False):
            if output_dir is None:  # the run's final save: the trained model's embeddings, to compare the reload with
                self.model.eval()
                trained_texts[Path(self.args.output_dir).name] = encode_texts(
                    self.model, CAPTIONS, processor.tokenizer, show_progress=False
                )
            return super().save_model(output_dir, _internal_call)

    monkeypatch.setattr(run_cusa, "CusaTrainer", RecordingTrainer)
    results = run_cusa.main(tiny_run_args(folder, shapes, output_dir, "--compare_with_baseline", "true",
                                          "--num_train_epochs", "1"))  # fmt: skip
    assert set(results) == set(trained_texts) == {"baseline", "cusa"}
    for run in ("baseline", "cusa"):
        assert 0 <= results[run]["test_rsum"] <= 600
        run_folder = output_dir / run
        model = CusaModel.from_pretrained(run_folder).eval()
        assert model.config.itc_loss == "sigmoid" and model.config.use_csa == (run == "cusa")
        card = (run_folder / "README.md").read_text()
        assert ("sigmoid baseline" in card) == (run == "baseline") and "InfoNCE" not in card
        assert 'padding="max_length", truncation=True, max_length=64' in card
        texts = encode_texts(model, CAPTIONS, processor.tokenizer, show_progress=False)
        torch.testing.assert_close(texts, trained_texts[run])


@pytest.mark.parametrize("version", [1, 2])
def test_sentence_transformers_export_encodes_as_the_model(version, tmp_path):
    from sentence_transformers import SentenceTransformer

    from cusa_hf.export import save_sentence_transformer

    model = CusaModel.from_backbone(tiny_siglip(version)).eval()
    processor = tiny_siglip_processor(version)
    save_sentence_transformer(model, processor, tmp_path / "st")
    exported = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu")
    with torch.no_grad():
        texts = model.get_text_features(**SiglipAdapter.tokenize_captions(processor.tokenizer, CAPTIONS))
        pictures = model.get_image_features(**processor.image_processor(images(), return_tensors="pt"))
    torch.testing.assert_close(torch.as_tensor(exported.encode(CAPTIONS)), texts, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(exported.encode(images())), pictures, rtol=0, atol=1e-5)


def test_cusa_search_builds_and_queries_a_siglip2_checkpoint(tmp_path):
    from cusa_hf.search import RetrievalIndex
    from cusa_hf.search_cli import main as search_cli

    model = CusaModel.from_backbone(tiny_siglip(2)).eval()
    processor = tiny_siglip_processor(2)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    paths = []
    for position, picture in enumerate(images()):
        paths.append(str(tmp_path / f"{position}.png"))
        picture.save(paths[-1])
    records = [{"image": path, "caption": caption, "image_id": position}
               for position, (path, caption) in enumerate(zip(paths, CAPTIONS))]  # fmt: skip
    (tmp_path / "data.json").write_text(__import__("json").dumps(records))
    assert search_cli(["build", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.json"),
                       "--out", str(tmp_path / "index")]) == 0  # fmt: skip
    index = RetrievalIndex.load(tmp_path / "index", model=CusaModel.from_pretrained(tmp_path / "model"))
    hits = index.search(texts=CAPTIONS[1], k=3)[0]
    with torch.no_grad():
        query = model.get_text_features(**SiglipAdapter.tokenize_captions(processor.tokenizer, [CAPTIONS[1]]))
        pictures = model.get_image_features(**processor.image_processor(images(), return_tensors="pt"))
    expected = (query @ pictures.T)[0].sort(descending=True)
    assert [hit["score"] for hit in hits] == pytest.approx(expected.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("run", ["cusa", "sigmoid"])
def test_the_siglip2_configs_parse_and_build_with_the_papers_cusa_settings(run, tmp_path):
    from test_run_cusa import REPO, parse_arguments

    from cusa_hf.backbone_recipes import backbone_recipe
    from cusa_hf.factory import build_model

    folder = tmp_path / "tiny_siglip2"
    tiny_siglip(2).save_pretrained(folder)
    tiny_siglip_processor(2).save_pretrained(folder)
    config = REPO / "examples" / "configs" / f"siglip2_base_coco_{run}.yaml"
    model_args, _, training_args = parse_arguments(
        [str(config), "--backbone", str(folder), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    )
    assert training_args.itc_loss == "sigmoid" and training_args.cusa == (run == "cusa")
    assert (training_args.csa_weight, training_args.usa_weight, training_args.csa_temperature) == (0.1, 0.5, 0.45)
    assert (training_args.learning_rate, training_args.num_train_epochs, training_args.per_device_train_batch_size) == (
        1e-5, 30, 128
    )
    backbone_recipe(model_args.backbone).check(model_args)
    model = build_model(model_args, **training_args.cusa_config_fields())
    assert model.config.itc_loss == "sigmoid" and model.config.use_csa == (run == "cusa")
    assert type(model.adapter) is Siglip2Adapter and model.backbone.logit_bias.requires_grad


def test_itc_loss_flag_is_checked_before_anything_slow(tmp_path):
    from test_run_cusa import parse_arguments

    with pytest.raises(ValueError, match=r"itc_loss='softmax' is not supported; choose one of \['infonce', 'sigmoid'\]"):
        parse_arguments(["--itc_loss", "softmax", "--output_dir", str(tmp_path)])


def test_tower_dropout_keeps_siglip2s_naflex_inputs():
    """With ``tower_dropout`` the image features are computed as tower then projection; SigLIP 2's tower still gets
    its patch mask and shapes (in evaluation mode the dropout is off and the features are the backbone's)."""
    backbone = tiny_siglip(2)
    model = CusaModel.from_backbone(backbone, cross_projection=False, tower_dropout=0.5).eval()
    image_inputs = tiny_siglip_processor(2).image_processor(images(), return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(backbone.get_image_features(**image_inputs).pooler_output, dim=-1)
        torch.testing.assert_close(model.get_image_features(**image_inputs), expected, rtol=0, atol=1e-6)
