"""Starting a run from a saved CUSA checkpoint (``CusaModel.from_backbone(<checkpoint>)``, ``--backbone <folder>``)
and per-group learning rates (``learning_rate_mapping``)."""

import pytest
import torch
from tiny_models import tiny_cusa_model

from cusa_hf import CusaModel
from cusa_hf.optimization import check_learning_rate_mapping, parameter_groups


def inputs(size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        pixel_values=torch.randn(size, 3, 32, 32, generator=generator),
        input_ids=torch.randint(4, 40, (size, 6), generator=generator),
        attention_mask=torch.ones(size, 6, dtype=torch.long),
    )


def embeddings(model, head="cross"):
    model.eval()
    batch = inputs()
    with torch.no_grad():
        return (
            model.get_image_features(batch["pixel_values"], head=head),
            model.get_text_features(batch["input_ids"], batch["attention_mask"], head=head),
        )


def trained_like(model):
    """Move every parameter away from its initial value, as training would (temperatures inside their bounds)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.itc_temperature.fill_(model.config.itc_temperature_min)  # a trained InfoNCE temperature at its floor
        if hasattr(model, "csa_temperature"):
            model.csa_temperature.fill_(0.3)
    return model


@pytest.fixture
def baseline_folder(tmp_path):
    model = trained_like(tiny_cusa_model(seed=3, use_csa=False, use_usa=False, teacher_image_dim=12))
    model.save_pretrained(tmp_path / "baseline")
    return tmp_path / "baseline"


@pytest.fixture
def cusa_folder(tmp_path):
    model = trained_like(tiny_cusa_model(seed=4))
    model.save_pretrained(tmp_path / "cusa")
    return tmp_path / "cusa"


def test_a_baseline_checkpoint_gives_its_embeddings_before_any_step_with_fresh_cusa_parts(baseline_folder):
    checkpoint = CusaModel.from_pretrained(baseline_folder)
    model = CusaModel.from_backbone(str(baseline_folder), csa_weight=0.3, softlabel_temperature=0.2)
    assert model.config.use_csa and model.config.use_usa and model.config.csa_weight == 0.3
    for ours, theirs in zip(embeddings(model), embeddings(checkpoint)):
        assert torch.equal(ours, theirs)
    # Its trained InfoNCE temperature (float32 at the floor), a fresh CSA temperature and fresh USA heads.
    assert model.temperatures()["itc_temperature"] == pytest.approx(0.01)
    assert model.temperatures()["csa_temperature"] == pytest.approx(0.45)
    fresh = tiny_cusa_model(seed=99)  # heads as a new model builds them
    for name in ("usa_image_head", "usa_text_head"):
        head = getattr(model, name)
        assert torch.equal(head.layer_norm.weight, torch.ones_like(head.layer_norm.weight))
        assert head.linear.weight.std().item() == pytest.approx(getattr(fresh, name).linear.weight.std().item(), rel=0.3)
    # The next run records its own teachers.
    assert checkpoint.config.teacher_image_dim == 12
    assert model.config.teacher_image_dim is None and model.config.teacher_info is None
    assert model.config.backbone_config.to_dict() == checkpoint.config.backbone_config.to_dict()


def test_a_cusa_checkpoint_keeps_its_heads_and_temperatures(cusa_folder):
    checkpoint = CusaModel.from_pretrained(cusa_folder)
    for source in (str(cusa_folder), checkpoint):
        model = CusaModel.from_backbone(source)
        for head in ("cross", "uni"):
            for ours, theirs in zip(embeddings(model, head), embeddings(checkpoint, head)):
                assert torch.equal(ours, theirs)
        assert model.temperatures() == pytest.approx(checkpoint.temperatures())
        assert model.config.itc_temperature == pytest.approx(0.01) and model.config.csa_temperature == pytest.approx(0.3)
    # A baseline run from it drops the heads it does not use; the retrieval embeddings stay the checkpoint's.
    baseline = CusaModel.from_backbone(str(cusa_folder), use_csa=False, use_usa=False)
    assert not hasattr(baseline, "usa_image_head") and not hasattr(baseline, "csa_temperature")
    assert all(torch.equal(a, b) for a, b in zip(embeddings(baseline), embeddings(checkpoint)))


def test_the_projector_layout_of_a_checkpoint_cannot_change(cusa_folder):
    width = CusaModel.from_pretrained(cusa_folder).cross_image_projection.linear.out_features
    assert width != 8 and CusaModel.from_pretrained(cusa_folder).config.projection_dim is None
    with pytest.raises(ValueError, match=f"projection_dim=8 differs from the checkpoint's projection_dim={width}"):
        CusaModel.from_backbone(str(cusa_folder), projection_dim=8)
    # The checkpoint's own width (its config says None: the backbone's) is accepted.
    same = CusaModel.from_backbone(str(cusa_folder), projection_dim=width)
    assert same.cross_image_projection.linear.out_features == width
    with pytest.raises(ValueError, match="cross_projection=False differs"):
        CusaModel.from_backbone(str(cusa_folder), cross_projection=False)


def test_fresh_projectors_and_heads_are_drawn_as_the_authors_and_loaded_weights_are_untouched(tmp_path):
    """The authors' initialize_parameters: Linear weights of the cross projectors and USA heads from N(0, 0.02);
    biases and LayerNorms at PyTorch's defaults. A loaded checkpoint keeps its weights, a wrapped backbone its own."""
    model = tiny_cusa_model(seed=5, projection_dim=512)
    for name in ("cross_image_projection", "cross_text_projection", "usa_image_head", "usa_text_head"):
        linear, layer_norm = getattr(model, name).linear, getattr(model, name).layer_norm
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.15), name
        assert abs(linear.weight.mean().item()) < 0.005, name
        bound = 1 / linear.in_features**0.5
        assert linear.bias.abs().max().item() <= bound and linear.bias.abs().max().item() > bound / 2, name
        assert torch.equal(layer_norm.weight, torch.ones_like(layer_norm.weight)), name
        assert torch.equal(layer_norm.bias, torch.zeros_like(layer_norm.bias)), name
    trained_like(model).save_pretrained(tmp_path / "trained")
    loaded = CusaModel.from_pretrained(tmp_path / "trained")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    backbone_state = {name: tensor.clone() for name, tensor in loaded.backbone.state_dict().items()}
    wrapped = CusaModel.from_backbone(loaded.backbone)
    for name, tensor in wrapped.backbone.state_dict().items():
        assert torch.equal(tensor, backbone_state[name]), name
    assert wrapped.cross_image_projection.linear.weight.std().item() == pytest.approx(0.02, rel=0.3)


@pytest.mark.parametrize("as_folder", [True, False])
def test_fresh_heads_keep_only_the_checkpoints_backbone(cusa_folder, as_folder, caplog):
    import logging

    checkpoint = CusaModel.from_pretrained(cusa_folder)
    with caplog.at_level(logging.INFO, logger="cusa_hf.modeling_cusa"):
        model = CusaModel.from_backbone(
            str(cusa_folder) if as_folder else checkpoint, fresh_heads=True, projection_dim=24, csa_temperature=0.2
        )
    checkpoint_state = checkpoint.backbone.state_dict()
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, checkpoint_state[name]), name
    # Fresh parts: the new layout (projection_dim 24), weights from N(0, 0.02), temperatures from this call / defaults.
    assert model.cross_image_projection.linear.out_features == 24 and model.config.projection_dim == 24
    for name in ("cross_image_projection", "usa_text_head"):
        assert not torch.equal(getattr(model, name).layer_norm.weight, getattr(checkpoint, name).layer_norm.weight)
        assert torch.equal(getattr(model, name).layer_norm.weight, torch.ones_like(getattr(model, name).layer_norm.weight))
    assert checkpoint.temperatures()["itc_temperature"] == pytest.approx(0.01)
    assert model.temperatures() == pytest.approx(
        {"itc_temperature": 0.05, "csa_temperature": 0.2, "usa_image_temperature": 0.45, "usa_text_temperature": 0.45}
    )
    message = next(record.getMessage() for record in caplog.records if "(fresh_heads)" in record.getMessage())
    assert message.startswith("starting from the backbone of the CUSA checkpoint")
    assert "fresh: cross_image_projection, cross_text_projection, usa_image_head, usa_text_head, csa_temperature" in message
    # The checkpoint's embeddings are not kept: its trained projectors are gone.
    assert not torch.equal(embeddings(model)[0][:, :8], embeddings(checkpoint)[0][:, :8])


def test_fresh_heads_needs_a_cusa_checkpoint(cusa_folder):
    backbone = CusaModel.from_pretrained(cusa_folder).backbone
    with pytest.raises(ValueError, match="fresh_heads=True keeps only the backbone of a CUSA checkpoint"):
        CusaModel.from_backbone(backbone, fresh_heads=True)


def test_a_run_started_from_a_checkpoint_trains_from_its_weights(baseline_folder):
    model = CusaModel.from_backbone(str(baseline_folder))
    model.train()
    generator = torch.Generator().manual_seed(2)
    batch = inputs()
    output = model(
        **batch,
        image_ids=torch.tensor([0, 0, 1, 2]),
        teacher_image_embeds=torch.randn(4, 12, generator=generator),
        teacher_text_embeds=torch.randn(4, 10, generator=generator),
    )
    output.loss.backward()
    assert torch.isfinite(output.loss) and output.loss_csa > 0 and output.loss_usa > 0
    assert model.usa_text_head.linear.weight.grad is not None and model.csa_temperature.grad is not None


def test_learning_rate_mapping_groups_parameters_by_pattern():
    model = tiny_cusa_model()
    decay = {name for name, _ in model.named_parameters() if name.endswith("weight")}
    groups = parameter_groups(model, {r"^usa_": 1e-3, r"^csa_temperature$": 2e-3}, 5e-5, 0.1, decay)
    by_name = {id(p): name for name, p in model.named_parameters()}
    rates = {by_name[id(p)]: (group["lr"], group["weight_decay"]) for group in groups for p in group["params"]}
    assert len(rates) == sum(1 for p in model.parameters() if p.requires_grad)
    assert rates["usa_image_head.linear.weight"] == (1e-3, 0.1) and rates["usa_text_head.linear.bias"] == (1e-3, 0.0)
    assert rates["csa_temperature"] == (2e-3, 0.0)
    assert rates["cross_image_projection.linear.weight"] == (5e-5, 0.1) and rates["itc_temperature"] == (5e-5, 0.0)
    with pytest.raises(ValueError, match=r"pattern\(s\) \['\^usa_heda'\] match no trainable parameter"):
        parameter_groups(model, {"^usa_heda": 1e-3}, 5e-5, 0.1, decay)



def test_a_learning_rate_pattern_shadowed_by_an_earlier_one_is_named(caplog):
    import logging

    model = tiny_cusa_model()
    decay = {name for name, _ in model.named_parameters() if name.endswith("weight")}
    with caplog.at_level(logging.WARNING, logger="cusa_hf.optimization"):
        groups = parameter_groups(model, {r"^usa_": 1e-3, r"^usa_text_head": 1e-2}, 5e-5, 0.1, decay)
    assert 1e-2 not in {group["lr"] for group in groups}
    assert ("pattern '^usa_text_head' (rate 0.01) never applies: every parameter it matches is matched first by "
            "'^usa_'") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cusa_hf.optimization"):
        parameter_groups(model, {r"^usa_text_head": 1e-2, r"^usa_": 1e-3}, 5e-5, 0.1, decay)  # the narrow one first
    assert "never applies" not in caplog.text


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"(": 1e-3}, "not a regular expression"),
        ({"^usa_": 0}, r"learning_rate_mapping\['\^usa_'\] must be a finite number > 0"),
        ({"^usa_": float("nan")}, "finite number > 0"),
        ({"^usa_": "fast"}, "finite number > 0"),
        ([1e-3], "must map parameter-name patterns to learning rates"),
    ],
)
def test_a_bad_learning_rate_mapping_names_the_entry(mapping, message):
    with pytest.raises(ValueError, match=message):
        check_learning_rate_mapping(mapping)
