import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_clip_config, tiny_cusa_model

from cusa_hf import CusaConfig, CusaModel
from cusa_hf.contrastive_terms import info_nce
from cusa_hf.losses import csa_loss, teacher_soft_labels, usa_loss
from cusa_hf.trainer import TemperatureClampCallback


def batch(size=4, seq=6, teacher_dims=(12, 10), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        pixel_values=torch.randn(size, 3, 32, 32, generator=generator),
        input_ids=torch.randint(4, 40, (size, seq), generator=generator),
        attention_mask=torch.ones(size, seq, dtype=torch.long),
        image_ids=torch.tensor([1, 1, 2, 3][:size] + list(range(10, 10 + max(0, size - 4)))),
        teacher_image_embeds=torch.randn(size, teacher_dims[0], generator=generator),
        teacher_text_embeds=torch.randn(size, teacher_dims[1], generator=generator),
    )


def test_config_defaults_are_the_authors():
    config = CusaConfig()
    assert (config.csa_weight, config.usa_weight) == (0.1, 0.5)
    assert (config.itc_temperature, config.itc_temperature_min, config.itc_temperature_max) == (0.05, 0.01, 0.10)
    assert (config.csa_temperature, config.csa_temperature_min, config.csa_temperature_max) == (0.45, 0.10, 0.99)
    assert (config.usa_image_temperature, config.usa_text_temperature) == (0.45, 0.45)
    assert (config.usa_temperature_min, config.usa_temperature_max) == (0.10, 1.00)
    assert (config.softlabel_temperature, config.softlabel_mode, config.softlabel_loss) == (1.0, "each", "kl")
    assert config.itc_reduction == "all_entries_mean"
    assert config.backbone_config.model_type == "clip"


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(softlabel_mode="max"), "softlabel_mode"),
        (dict(softlabel_loss="mse"), "softlabel_loss"),
        (dict(itc_reduction="sum"), "itc_reduction"),
        (dict(csa_weight=-0.1), "csa_weight"),
        (dict(usa_weight=-1), "usa_weight"),
        (dict(itc_temperature=0.2), "itc_temperature"),
        (dict(csa_temperature=0.05), "csa_temperature"),
        (dict(usa_temperature_min=0.5, usa_temperature_max=0.2), "usa_temperature_min"),
        (dict(softlabel_temperature=0), "softlabel_temperature"),
    ],
)
def test_invalid_config_values_name_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        CusaConfig(**fields)


def test_backbone_config_from_dict_and_serialised():
    config = CusaConfig(backbone_config=tiny_clip_config().to_dict(), csa_weight=0.3)
    assert config.backbone_config.projection_dim == 16
    data = json.loads(config.to_json_string())
    assert data["backbone_config"]["model_type"] == "clip" and data["csa_weight"] == 0.3
    assert CusaConfig.from_dict(data).backbone_config.projection_dim == 16


def test_output_shapes_and_normalised_embeddings():
    model = tiny_cusa_model()
    output = model(**batch(), return_loss=True)
    assert output.logits_per_image.shape == (4, 4) and torch.equal(output.logits_per_text, output.logits_per_image.t())
    for name in ("image_embeds", "text_embeds", "uni_image_embeds", "uni_text_embeds"):
        embeds = getattr(output, name)
        assert embeds.shape == (4, 16)
        assert torch.allclose(embeds.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert all(getattr(output, name).ndim == 0 for name in ("loss", "loss_itc", "loss_csa", "loss_usa"))


def test_total_loss_recomputed_independently_from_returned_embeddings():
    model = tiny_cusa_model(csa_weight=0.3, usa_weight=0.7)
    inputs = batch()
    output = model(**inputs, return_loss=True)
    similarity = output.image_embeds @ output.text_embeds.t()
    labels = teacher_soft_labels(inputs["teacher_image_embeds"], inputs["teacher_text_embeds"])
    itc = info_nce(similarity / 0.05, inputs["image_ids"])
    csa = csa_loss(similarity, labels, 0.45).mean
    usa = usa_loss(output.uni_image_embeds, output.uni_text_embeds, labels, 0.45, 0.45).mean
    assert torch.allclose(output.loss_itc, itc) and torch.allclose(output.loss_csa, csa)
    assert torch.allclose(output.loss_usa, usa)
    assert torch.allclose(output.loss, itc + 0.3 * csa + 0.7 * usa)


def test_features_match_forward_and_heads():
    model = tiny_cusa_model().eval()
    inputs = batch()
    output = model(**inputs)
    image_cross = model.get_image_features(inputs["pixel_values"])
    text_uni = model.get_text_features(inputs["input_ids"], inputs["attention_mask"], head="uni")
    assert torch.allclose(image_cross, output.image_embeds, atol=1e-6)
    assert torch.allclose(text_uni, output.uni_text_embeds, atol=1e-6)
    assert not torch.allclose(model.get_image_features(inputs["pixel_values"], head="uni"), image_cross)
    with pytest.raises(ValueError, match="head"):
        model.get_image_features(inputs["pixel_values"], head="fusion")


def test_ablation_switches_build_the_same_retrieval_model():
    full = tiny_cusa_model(seed=3)
    baseline = tiny_cusa_model(seed=3, use_csa=False, use_usa=False)
    inputs = batch()
    full_output, baseline_output = full(**inputs, return_loss=True), baseline(**inputs)
    # Same backbone and cross projectors (same seed, same creation order): identical retrieval embeddings.
    assert torch.allclose(full_output.image_embeds, baseline_output.image_embeds)
    assert baseline_output.loss_csa.item() == 0.0 and baseline_output.loss_usa.item() == 0.0
    assert torch.allclose(baseline_output.loss, baseline_output.loss_itc)
    assert not hasattr(baseline, "usa_image_head") and not hasattr(baseline, "csa_temperature")
    no_teachers = {k: v for k, v in inputs.items() if not k.startswith("teacher")}
    assert torch.isfinite(baseline(**no_teachers, return_loss=True).loss)
    weight_zero = tiny_cusa_model(seed=3, csa_weight=0.0, usa_weight=0.0)
    assert torch.allclose(weight_zero(**no_teachers, return_loss=True).loss, baseline_output.loss)
    csa_only = tiny_cusa_model(seed=3, use_usa=False)(**inputs, return_loss=True)
    assert csa_only.loss_usa.item() == 0.0 and csa_only.loss_csa.item() > 0


def test_temperatures_are_clamped_after_each_optimiser_step_not_in_forward():
    model = tiny_cusa_model()
    with torch.no_grad():
        model.itc_temperature.fill_(0.5)
        model.csa_temperature.fill_(0.01)
        model.usa_text_temperature.fill_(3.0)
    model.clamp_temperatures_()
    assert model.temperatures() == pytest.approx(
        {"itc_temperature": 0.10, "csa_temperature": 0.10, "usa_image_temperature": 0.45, "usa_text_temperature": 1.0}
    )
    with torch.no_grad():
        model.itc_temperature.fill_(0.001)
    # forward has no side effects on the parameters; the trainer's callback clamps after the optimiser step
    model.train()(**batch(), return_loss=True)
    assert model.itc_temperature.item() == pytest.approx(0.001)
    TemperatureClampCallback().on_step_end(None, None, None, model=model)
    assert model.itc_temperature.item() == pytest.approx(0.01)


def test_temperatures_learn_and_can_be_frozen():
    model = tiny_cusa_model()
    model(**batch(), return_loss=True).loss.backward()
    assert model.itc_temperature.grad is not None and model.csa_temperature.grad is not None
    frozen = tiny_cusa_model(learnable_temperatures=False)
    assert not frozen.itc_temperature.requires_grad


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny_cusa_model()
    model(**batch(), return_loss=True).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("size", [2, 3])
def test_small_batches_work(size):
    output = tiny_cusa_model()(**batch(size=size), return_loss=True)
    assert torch.isfinite(output.loss)


def test_a_batch_of_one_pair_has_no_contrastive_loss():
    with pytest.raises(ValueError, match="at least two image-text pairs, got 1"):
        tiny_cusa_model()(**batch(size=1), return_loss=True)
    assert tiny_cusa_model()(**batch(size=1), return_loss=False).image_embeds.shape[0] == 1


def test_bad_teacher_inputs_raise_clear_errors():
    model = tiny_cusa_model()
    inputs = batch()
    missing = {k: v for k, v in inputs.items() if k != "teacher_text_embeds"}
    with pytest.raises(ValueError, match="teacher_text_embeds.*add_teacher_features"):
        model(**missing, return_loss=True)
    with pytest.raises(ValueError, match=r"teacher_image_embeds has shape \(3, 12\).*4 pairs"):
        model(**{**inputs, "teacher_image_embeds": inputs["teacher_image_embeds"][:3]}, return_loss=True)
    # NaN/inf teacher rows are refused once for the whole table when CusaTrainer is built
    # (tests/test_trainer.py::test_nan_teacher_features_fail_before_training), not by a device sync every step.
    with pytest.raises(ValueError, match="image_ids has 3 entries"):
        model(**{**inputs, "image_ids": torch.tensor([1, 2, 3])}, return_loss=True)
    with pytest.raises(ValueError, match="3 captions"):
        model(**{**inputs, "input_ids": inputs["input_ids"][:3], "attention_mask": inputs["attention_mask"][:3]})
    # No loss requested: teachers are not needed.
    assert model.eval()(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).loss is None


def test_save_and_load_round_trip_in_safetensors(tmp_path):
    model = tiny_cusa_model(csa_weight=0.2, softlabel_mode="add")
    with torch.no_grad():
        model.csa_temperature.fill_(0.33)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModel"].endswith("CusaModel") and saved["softlabel_mode"] == "add"
    loaded = CusaModel.from_pretrained(tmp_path)
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)
    assert loaded.config.csa_weight == 0.2 and loaded.temperatures()["csa_temperature"] == pytest.approx(0.33)
    inputs = batch()
    assert torch.allclose(model.eval()(**inputs).logits_per_image, loaded.eval()(**inputs).logits_per_image)


def test_auto_classes_load_a_cusa_checkpoint(tmp_path):
    from transformers import AutoConfig, AutoModel

    tiny_cusa_model().save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CusaConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), CusaModel)


def test_remote_code_files_are_saved_beside_the_weights(tmp_path):
    tiny_cusa_model().save_pretrained(tmp_path)
    saved = {path.name for path in tmp_path.iterdir()}
    assert {"modeling_cusa.py", "configuration_cusa.py", "losses.py", "backbones.py", "distributed.py"} <= saved


def test_from_backbone_keeps_pretrained_weights(tmp_path):
    from transformers import CLIPModel

    torch.manual_seed(5)
    clip = CLIPModel(tiny_clip_config())
    clip.save_pretrained(tmp_path / "clip")
    reference = {k: v.clone() for k, v in clip.state_dict().items()}
    for source in (clip, tmp_path / "clip"):
        model = CusaModel.from_backbone(source, usa_weight=0.25)
        assert model.config.usa_weight == 0.25
        state = model.backbone.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    # The retrieval embedding is the backbone's projected feature through the new cross projector.
    pixel_values = torch.randn(2, 3, 32, 32)
    expected = F.normalize(model.cross_image_projection(clip.get_image_features(pixel_values=pixel_values).pooler_output), dim=-1)
    assert torch.allclose(model.get_image_features(pixel_values), expected, atol=1e-6)


def test_unknown_backbone_type_is_a_clear_error():
    from transformers import BertConfig

    with pytest.raises(ValueError, match="No CUSA backbone adapter for model_type='bert'"):
        CusaModel(CusaConfig(backbone_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)))


def test_push_to_hub_uploads_the_checkpoint(monkeypatch):
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_create_commit(self, repo_id, operations, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(operation.path_in_repo for operation in operations)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
            commit_message="",
            commit_description="",
            oid="0" * 40,
        )

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "create_commit", fake_create_commit)
    tiny_cusa_model().push_to_hub("someone/tiny-cusa", token="dummy")
    assert uploaded["repo_id"] == "someone/tiny-cusa"
    assert {"model.safetensors", "config.json", "modeling_cusa.py"} <= set(uploaded["files"])


def test_checkpoint_loads_with_trust_remote_code_without_the_package(tmp_path):
    from without_package import run_without_cusa_hf

    tiny_cusa_model().save_pretrained(tmp_path / "ckpt")
    script = f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert type(model).__name__ == "CusaModel" and "cusa_hf" not in type(model).__module__
        print(model.get_image_features(torch.randn(1, 3, 32, 32)).shape)
        """
    result = run_without_cusa_hf(script, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([1, 16])" in result.stdout


def test_text_features_do_not_depend_on_padding_whichever_way_the_model_is_built(tmp_path):
    """Wrapping a loaded backbone once reset its attention implementation, and CLIP's text tower then attended to
    padding: a caption's embedding changed with the batch it was padded in."""
    from tiny_models import tiny_clip_processor
    from transformers import CLIPModel

    torch.manual_seed(0)
    CLIPModel(tiny_clip_config()).save_pretrained(tmp_path / "clip")
    tiny_cusa_model().save_pretrained(tmp_path / "cusa")
    tokenizer = tiny_clip_processor().tokenizer
    short = tokenizer(["a red cat on the street"], return_tensors="pt")
    padded = tokenizer(["a red cat on the street"], padding="max_length", max_length=16, return_tensors="pt")
    for model in (
        tiny_cusa_model(),
        CusaModel.from_backbone(tmp_path / "clip"),
        CusaModel.from_backbone(CLIPModel.from_pretrained(tmp_path / "clip")),
        CusaModel.from_pretrained(tmp_path / "cusa"),
    ):
        model.eval()
        assert model.backbone.config._attn_implementation is not None
        difference = model.get_text_features(**short) - model.get_text_features(**padded)
        assert difference.abs().max() < 1e-5


def test_loads_a_hub_repo_id_from_the_local_cache(tmp_path, monkeypatch):
    """A Hub checkpoint laid out as huggingface_hub caches it loads by repo id with no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-cusa"
    snapshot = repo / "snapshots" / commit
    model = tiny_cusa_model(usa_weight=0.3)
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = CusaModel.from_pretrained("someone/tiny-cusa", cache_dir=tmp_path / "hub")
    assert loaded.config.usa_weight == 0.3
    state = model.state_dict()
    assert all(torch.equal(tensor, state[name]) for name, tensor in loaded.state_dict().items())
