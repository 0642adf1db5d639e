import math

import pytest
import torch
import torch.nn.functional as F

from cusa_hf.contrastive_terms import info_nce, multi_positive_targets, soft_cross_entropy
from cusa_hf.losses import (
    TeacherSoftLabels,
    csa_loss,
    soft_label_diagnostics,
    soft_label_loss,
    teacher_soft_labels,
    usa_loss,
)


def test_info_nce_two_by_two_by_hand():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    per_row = math.log(1 + math.exp(-1))  # -log(e / (e + 1))
    assert info_nce(logits, reduction="row_mean").item() == pytest.approx(per_row, rel=1e-6)
    # The authors' reduction averages over all B x B entries: the usual value divided by B = 2.
    assert info_nce(logits).item() == pytest.approx(per_row / 2, rel=1e-6)


def test_info_nce_unique_ids_equals_symmetric_clip_loss():
    torch.manual_seed(0)
    logits = torch.randn(6, 6)
    labels = torch.arange(6)
    clip_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert torch.allclose(info_nce(logits, torch.tensor([5, 4, 3, 2, 1, 0]), reduction="row_mean"), clip_loss)
    assert torch.allclose(info_nce(logits, None, reduction="row_mean"), clip_loss)
    assert torch.allclose(info_nce(logits, None, reduction="all_entries_mean"), clip_loss / 6)


def test_multi_positive_targets_are_uniform_over_shared_ids():
    targets = multi_positive_targets(torch.tensor([7, 7, 3]), 3, torch.device("cpu"))
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.equal(targets, expected)


def test_info_nce_multi_positive_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    ids = torch.tensor([7, 7, 3])
    log_p = F.log_softmax(logits, dim=1)
    log_p_t = F.log_softmax(logits.t(), dim=1)
    row = lambda lp, i: -(0.5 * lp[i, 0] + 0.5 * lp[i, 1]) if i < 2 else -lp[i, 2]
    expected = (sum(row(log_p, i) for i in range(3)) / 3 + sum(row(log_p_t, i) for i in range(3)) / 3) / 2
    assert info_nce(logits, ids, reduction="row_mean").item() == pytest.approx(expected.item(), rel=1e-6)


def test_teacher_soft_labels_modes_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # cosine: identity
    text = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # cosine [[1, -1], [-1, 1]]
    labels = teacher_soft_labels(image, text, mode="each", temperature=0.5)
    e2 = math.exp(2.0)
    assert labels.image[0].tolist() == pytest.approx([e2 / (e2 + 1), 1 / (e2 + 1)], rel=1e-6)
    assert labels.text[0].tolist() == pytest.approx([e2 / (e2 + math.exp(-2)), math.exp(-2) / (e2 + math.exp(-2))], rel=1e-6)
    assert torch.equal(labels.image_to_text, labels.image) and torch.equal(labels.text_to_image, labels.text)

    added = teacher_soft_labels(image, text, mode="add", temperature=1.0)
    # mean similarity [[1, -0.5], [-0.5, 1]]
    expected = torch.softmax(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), dim=1)
    assert torch.allclose(added.image_to_text, expected) and torch.allclose(added.text_to_image, expected)
    assert torch.allclose(added.image, torch.softmax(torch.eye(2), dim=1))  # USA keeps each teacher's own target

    dotted = teacher_soft_labels(image, text, mode="dot", temperature=1.0)
    # sqrt(max(I,0) * max(T,0)) = [[1, 0], [0, 1]]
    assert torch.allclose(dotted.image_to_text, torch.softmax(torch.eye(2), dim=1))


def test_teacher_soft_labels_carry_no_gradient():
    image = torch.randn(4, 5, requires_grad=True)
    labels = teacher_soft_labels(image, torch.randn(4, 3))
    assert not labels.image.requires_grad
    assert torch.allclose(labels.image.sum(dim=1), torch.ones(4))


def test_kl_axis_and_batchmean_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    targets = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    probabilities = torch.softmax(logits, dim=1)
    expected = (targets * (targets / probabilities).log()).sum() / 2  # sum over each row, mean over rows
    assert soft_label_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    wrong_axis = (targets * (targets / torch.softmax(logits, dim=0)).log()).sum() / 2
    assert soft_label_loss(logits, targets).item() != pytest.approx(wrong_axis.item(), rel=1e-3)


def test_contrastive_soft_label_variant():
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.0]])
    targets = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    log_p = F.log_softmax(logits, dim=1)
    usual = -(targets * log_p).sum(dim=1).mean()
    assert soft_label_loss(logits, targets, loss="contrastive", reduction="row_mean").item() == pytest.approx(usual.item())
    assert soft_label_loss(logits, targets, loss="contrastive").item() == pytest.approx(usual.item() / 2)


def test_csa_directions_use_rows_then_columns():
    similarity = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.8, 0.0], [-0.5, 0.4, 0.7]])
    labels = teacher_soft_labels(torch.randn(3, 4), torch.randn(3, 6))
    result = csa_loss(similarity, labels, temperature=0.45)
    i2t = soft_label_loss(similarity / 0.45, labels.image_to_text)
    t2i = soft_label_loss(similarity.t() / 0.45, labels.text_to_image)
    assert torch.allclose(result.image_to_text, i2t) and torch.allclose(result.text_to_image, t2i)
    assert torch.allclose(result.mean, (i2t + t2i) / 2)
    assert not torch.allclose(result.image_to_text, soft_label_loss(similarity.t() / 0.45, labels.image_to_text))


def test_usa_uses_uni_modal_similarities():
    torch.manual_seed(1)
    uni_image = F.normalize(torch.randn(4, 8), dim=1)
    uni_text = F.normalize(torch.randn(4, 8), dim=1)
    labels = teacher_soft_labels(torch.randn(4, 5), torch.randn(4, 5))
    result = usa_loss(uni_image, uni_text, labels, 0.3, 0.6)
    image_term = soft_label_loss(uni_image @ uni_image.t() / 0.3, labels.image)
    text_term = soft_label_loss(uni_text @ uni_text.t() / 0.6, labels.text)
    assert torch.allclose(result.image, image_term) and torch.allclose(result.text, text_term)
    assert torch.allclose(result.mean, (image_term + text_term) / 2)


def test_float32_arithmetic_under_low_precision():
    torch.manual_seed(2)
    logits = (torch.randn(8, 8) * 30).to(torch.bfloat16)
    targets = torch.softmax(torch.randn(8, 8), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = soft_label_loss(logits, targets)
        nce = info_nce(logits)
    assert low.dtype == torch.float32 and nce.dtype == torch.float32
    assert torch.isfinite(low) and torch.isfinite(nce)
    assert low.item() == pytest.approx(soft_label_loss(logits.float(), targets).item(), rel=1e-5)


def test_batch_size_one_is_finite():
    logits = torch.tensor([[0.3]])
    labels = teacher_soft_labels(torch.randn(1, 3), torch.randn(1, 3))
    assert info_nce(logits).item() == 0.0
    assert csa_loss(logits, labels, 0.45).mean.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    "call",
    [
        lambda: soft_cross_entropy(torch.zeros(2, 2), torch.eye(2), reduction="sum"),
        lambda: soft_label_loss(torch.zeros(2, 2), torch.eye(2), loss="mse"),
        lambda: teacher_soft_labels(torch.randn(2, 2), torch.randn(2, 2), mode="max"),
        lambda: teacher_soft_labels(torch.randn(2, 2), torch.randn(2, 2), temperature=0.0),
        lambda: soft_label_loss(torch.zeros(2, 3), torch.eye(2)),
        lambda: info_nce(torch.zeros(2, 3)),
    ],
)
def test_invalid_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_soft_label_diagnostics_by_hand():
    image = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.0, 1.0]])
    labels = TeacherSoftLabels(image, torch.eye(3), image, torch.eye(3))
    stats = soft_label_diagnostics(labels, torch.tensor([4, 4, 9]))
    expected_entropy = (math.log(2) + (2 * 0.25 * math.log(4) + 0.5 * math.log(2)) + 0.0) / 3
    assert stats["softlabel_entropy_image"].item() == pytest.approx(expected_entropy, rel=1e-6)
    assert stats["softlabel_entropy_text"].item() == pytest.approx(0.0, abs=1e-6)
    # other pairs of the same image: row 0 -> column 1 (0.5), row 1 -> column 0 (0.25), row 2 -> none
    assert stats["softlabel_same_image_mass_image"].item() == pytest.approx(0.75 / 3, rel=1e-6)
