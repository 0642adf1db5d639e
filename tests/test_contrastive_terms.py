"""The contrastive-term seam (``CusaConfig.itc_loss``): InfoNCE as it always was, and SigLIP's sigmoid term equal to
transformers' ``SiglipModel`` / ``Siglip2Model`` loss and open_clip's ``SigLipLoss`` (loss and gradients), in one
process and in two with gathered features, chunked, and with the backbone's own scalars."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_distributed import GLOBAL_BATCH, global_batch, result_name, worker
from tiny_models import tiny_clip_config, tiny_cusa_model, tiny_siglip_config, tiny_siglip_processor
from two_process import free_port, start_processes

from cusa_hf import CusaConfig, CusaModel
from cusa_hf.contrastive_terms import SigmoidTerm, contrastive_term_class, info_nce
from cusa_hf.modeling_cusa import CusaOutput


def hand_sigmoid_loss(similarity, image_ids, logit_scale, logit_bias):
    """``-1/B sum_ij log sigmoid(z_ij (exp(t) s_ij + b))``, z = +1 for pairs of one image, written out."""
    logits = similarity * math.exp(logit_scale) + logit_bias
    total = 0.0
    for i in range(len(image_ids)):
        for j in range(len(image_ids)):
            sign = 1.0 if image_ids[i] == image_ids[j] else -1.0
            total -= math.log(1 / (1 + math.exp(-sign * float(logits[i, j]))))
    return total / len(image_ids)


def test_the_default_is_infonce_with_todays_parameters_and_numbers():
    model = tiny_cusa_model(seed=0)
    assert model.config.itc_loss == "infonce"
    top_level = {name for name, _ in model.named_parameters() if "." not in name}
    assert top_level == {"itc_temperature", "csa_temperature", "usa_image_temperature", "usa_text_temperature"}
    batch = global_batch()
    output = model(**batch, return_loss=True)
    similarity = output.image_embeds @ output.text_embeds.t()
    assert torch.equal(output.loss_itc, info_nce(similarity / model.itc_temperature, batch["image_ids"]))


def test_sigmoid_on_a_clip_backbone_has_fresh_scalars_and_the_papers_formula():
    model = tiny_cusa_model(seed=0, itc_loss="sigmoid")
    top_level = {name for name, _ in model.named_parameters() if "." not in name}
    assert {"itc_logit_scale", "itc_logit_bias"} <= top_level and "itc_temperature" not in top_level
    assert model.temperatures() == {"csa_temperature": pytest.approx(0.45), "usa_image_temperature": pytest.approx(0.45),
                                    "usa_text_temperature": pytest.approx(0.45)}
    assert float(model.itc_logit_scale.detach()) == pytest.approx(math.log(10)) and float(model.itc_logit_bias.detach()) == -10.0
    batch = global_batch()  # image ids 0 0 1 2 3 3 4 5: two images with two captions each
    output = model(**batch, return_loss=True)
    similarity = (output.image_embeds @ output.text_embeds.t()).detach()
    expected = hand_sigmoid_loss(similarity, batch["image_ids"].tolist(), math.log(10), -10.0)
    assert float(output.loss_itc) == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(output.logits_per_image, similarity * 10 - 10, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_sigmoid_equals_transformers_siglip_loss_and_gradients(version):
    """One caption per image: CusaModel(SigLIP, sigmoid alone, no projectors) is SiglipModel(return_loss=True)."""
    from PIL import Image

    torch.manual_seed(0)
    config = tiny_siglip_config(version)
    from transformers import AutoModel

    backbone = AutoModel.from_config(config)
    with torch.no_grad():
        backbone.logit_scale.fill_(1.3)
        backbone.logit_bias.fill_(-2.0)
    processor = tiny_siglip_processor(version)
    images = [Image.new("RGB", (40 + 8 * i, 32), (60 * i, 200 - 40 * i, 30)) for i in range(5)]
    captions = ["a red cat", "a dog on grass", "blue bus in the street", "pizza on a plate", "a man sitting"]
    inputs = {**processor.image_processor(images, return_tensors="pt"),
              **processor.tokenizer(captions, padding="max_length", max_length=64, return_tensors="pt")}  # fmt: skip
    reference_backbone = copy.deepcopy(backbone)
    expected = reference_backbone(**inputs, return_loss=True).loss
    expected.backward()

    model = CusaModel.from_backbone(backbone, cross_projection=False, use_csa=False, use_usa=False)
    assert model.config.itc_loss == "sigmoid" and model.backbone.logit_scale.requires_grad
    output = model(**inputs, image_ids=torch.arange(5), return_loss=True)
    output.loss.backward()
    torch.testing.assert_close(output.loss, expected, rtol=0, atol=1e-6)
    reference_grads = dict(reference_backbone.named_parameters())
    for name, parameter in model.backbone.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, reference_grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_sigmoid_equals_open_clip_siglip_loss_and_gradients():
    from open_clip.loss import SigLipLoss

    generator = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(7, 16, generator=generator), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(7, 16, generator=generator), dim=-1).requires_grad_()
    scale, bias = torch.tensor(2.1, requires_grad=True), torch.tensor(-4.0, requires_grad=True)
    ours = SigmoidTerm()(image @ text.t(), None, itc_logit_scale=scale, itc_logit_bias=bias).loss
    ours_grads = torch.autograd.grad(ours, (image, text, scale, bias))
    theirs = SigLipLoss()(image, text, scale.exp(), bias)
    theirs_grads = torch.autograd.grad(theirs, (image, text, scale, bias))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    for mine, reference in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)


def test_unknown_itc_loss_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"itc_loss='hinge' is not supported; choose one of \['infonce', 'sigmoid'\]"):
        contrastive_term_class("hinge")
    with pytest.raises(ValueError, match="itc_loss='hinge'"):
        CusaModel(CusaConfig(backbone_config=tiny_clip_config(), itc_loss="hinge"))


def test_two_processes_with_gathered_features_equal_one_process_over_the_global_batch(tmp_path):
    start_processes(worker, args=(2, free_port(), [(3, 5)], str(tmp_path), {"itc_loss": "sigmoid"}))
    distributed = torch.load(tmp_path / result_name((3, 5)))

    model = tiny_cusa_model(seed=0, itc_loss="sigmoid")
    model.train()
    output = model(**global_batch(), return_loss=True)
    output.loss.backward()
    assert distributed["logits_shape"] == output.logits_per_image.shape == (GLOBAL_BATCH, GLOBAL_BATCH)
    torch.testing.assert_close(distributed["loss_itc"], output.loss_itc.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(distributed["loss"], output.loss.detach(), rtol=0, atol=1e-6)
    single_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert distributed["grads"].keys() == single_grads.keys()
    assert {"itc_logit_scale", "itc_logit_bias"} <= single_grads.keys()
    for name, grad in single_grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_embeddings_give_the_same_sigmoid_loss_and_scalar_gradients():
    """The sigmoid loss is a sum over pairs: embeddings computed in chunks and joined give the whole batch's loss and
    the same gradients of its scalars (what ``loss_chunk_size`` relies on; CusaTrainer's step is tested below)."""
    model = tiny_cusa_model(seed=0, itc_loss="sigmoid")
    model.eval()
    batch = global_batch()
    whole = model(**batch, return_loss=True)
    scalar_grads = torch.autograd.grad(whole.loss, list(model.loss_parameters().values()))
    pair_inputs = {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}
    pieces = [model(**{key: value[start:start + 3] for key, value in pair_inputs.items()}, return_loss=False)
              for start in range(0, GLOBAL_BATCH, 3)]  # fmt: skip
    embeddings = CusaOutput(**{name: torch.cat([getattr(piece, name) for piece in pieces])
                               for name in ("image_embeds", "text_embeds", "uni_image_embeds", "uni_text_embeds")})  # fmt: skip
    chunked = model.loss_from_embeddings(embeddings, image_ids=batch["image_ids"],
                                         teacher_image_embeds=batch["teacher_image_embeds"],
                                         teacher_text_embeds=batch["teacher_text_embeds"])  # fmt: skip
    torch.testing.assert_close(chunked.loss, whole.loss, rtol=1e-6, atol=1e-6)
    for mine, reference in zip(torch.autograd.grad(chunked.loss, list(model.loss_parameters().values())), scalar_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


def test_a_chunked_trainer_step_with_the_sigmoid_term_equals_the_unchunked_step(tmp_path):
    """``loss_chunk_size`` with the sigmoid term: CusaTrainer's gradient-cached step takes the gradients of the
    term's scale and bias from the loss itself, and gives the unchunked update."""
    from test_chunked_loss import TRAINED_PARTS, assert_same_step, train_one_step
    from tiny_models import synthetic_dataset

    dataset = synthetic_dataset(num_images=8, captions_per_image=2)
    fields = {"itc_loss": "sigmoid"}
    chunked = train_one_step(tmp_path / "chunked", dataset, fields, per_device_train_batch_size=16, loss_chunk_size=5)
    whole = train_one_step(tmp_path / "whole", dataset, fields, per_device_train_batch_size=16)
    parts = [part for part in TRAINED_PARTS if part != "itc_temperature"] + ["itc_logit_scale", "itc_logit_bias"]
    assert_same_step(chunked, whole, parts)


def test_a_new_term_is_one_class_and_one_registration(monkeypatch, tmp_path):
    """The seam as docs/architecture.md states it: a term with a scalar of its own name, registered in a test, trains
    (its scalar gets a gradient), logs and saves through CusaModel and CusaLoss without another change; a value for
    a scalar the term does not read is refused rather than dropped."""
    from cusa_hf import contrastive_terms
    from cusa_hf.contrastive_terms import ContrastiveTerm, ContrastiveTermOutput, register_contrastive_term
    from cusa_hf.losses import CusaLoss

    monkeypatch.setattr(contrastive_terms, "_TERMS", dict(contrastive_terms._TERMS))  # the registration ends here

    @register_contrastive_term
    class ScaledInfoNce(ContrastiveTerm):
        name, scalar_names, label = "scaled", ("itc_log_scale",), "scaled InfoNCE"

        @classmethod
        def initial_scalars(cls, config):
            return {"itc_log_scale": math.log(20.0)}

        def logits(self, similarity, itc_log_scale=None):
            return similarity if itc_log_scale is None else similarity * itc_log_scale.exp()

        def forward(self, similarity, image_ids=None, itc_log_scale=None):
            logits = self.logits(similarity, itc_log_scale)
            return ContrastiveTermOutput(info_nce(logits, image_ids, self.reduction), logits)

    model = tiny_cusa_model(0, itc_loss="scaled")
    assert "itc_temperature" not in dict(model.named_parameters())
    output = model(**global_batch(), return_loss=True)
    output.loss.backward()
    assert model.itc_log_scale.grad is not None and model.itc_log_scale.grad.abs().item() > 0
    assert model.itc_scalar_values() == {"itc_log_scale": pytest.approx(math.log(20.0))}
    model.save_pretrained(tmp_path)
    reloaded = CusaModel.from_pretrained(tmp_path)
    assert reloaded.config.itc_loss == "scaled" and torch.equal(reloaded.itc_log_scale, model.itc_log_scale)

    embeds = F.normalize(torch.randn(4, 8), dim=-1)
    loss = CusaLoss(use_csa=False, use_usa=False, itc_loss="scaled")
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['itc_temperature'\]: neither its own parameters nor "
                                        r"scalars of the 'scaled' contrastive term, which takes \['itc_log_scale'\]"):  # fmt: skip
        loss(embeds, embeds, itc_temperature=0.05)
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['teacher_image_embed'\]"):  # a misspelling, even as None
        loss(embeds, embeds, itc_log_scale=torch.tensor(1.0), teacher_image_embed=None)


USA_AND_CSA_TEMPERATURES = {"csa_temperature", "usa_image_temperature", "usa_text_temperature"}


@pytest.mark.parametrize(
    "backbone, itc_loss, learnable, trained",
    [
        ("clip", "infonce", True, {"itc_temperature", *USA_AND_CSA_TEMPERATURES}),  # CLIP's logit_scale frozen
        ("clip", "infonce", False, set()),
        ("siglip", "infonce", True, {"itc_temperature", *USA_AND_CSA_TEMPERATURES}),  # its logit_scale / bias frozen
        ("siglip", "sigmoid", True, {"backbone.logit_scale", "backbone.logit_bias", *USA_AND_CSA_TEMPERATURES}),
        ("siglip", "sigmoid", False, set()),
    ],
)
def test_which_scalars_train_is_the_configs_after_from_pretrained_too(backbone, itc_loss, learnable, trained, tmp_path):
    """transformers loads every weight as a trainable parameter; CusaModel.from_pretrained trains the same scalars as
    the model that was saved: the config's ``learnable_temperatures``, the backbone's own only where the term reads
    them (else DDP would see parameters without a gradient)."""
    backbone_config = tiny_clip_config() if backbone == "clip" else tiny_siglip_config(1)
    model = CusaModel(CusaConfig(backbone_config=backbone_config, itc_loss=itc_loss, learnable_temperatures=learnable))
    scalars = {name for name, parameter in model.named_parameters() if parameter.numel() == 1}

    def trainable_scalars(model):
        return {name for name, parameter in model.named_parameters() if name in scalars and parameter.requires_grad}

    assert trainable_scalars(model) == trained
    model.save_pretrained(tmp_path)
    assert trainable_scalars(CusaModel.from_pretrained(tmp_path)) == trained
    reloaded, loading_info = CusaModel.from_pretrained(tmp_path, output_loading_info=True)
    assert trainable_scalars(reloaded) == trained and not loading_info["missing_keys"]
