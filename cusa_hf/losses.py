"""CUSA losses as pure functions over similarity / logit matrices.

Nothing here knows about models or datasets, so every term can be checked against hand-computed values.
Formulas and defaults follow ``docs/method.md`` (Huang et al., AAAI 2024, and the authors' released code):

* teacher soft labels from uni-modal teacher features in modes ``each`` / ``add`` / ``dot`` (``teacher_soft_labels``),
* soft-label alignment, KL or soft-target cross-entropy (``soft_label_loss``),
* CSA (``csa_loss``) and USA (``usa_loss``), each returning both directional terms and their mean,
* ``CusaLoss``, the module that assembles ``loss_itc + csa_weight * CSA + usa_weight * USA`` over the (gathered) batch,
  in the spirit of open_clip's ``ClipLoss``: the model hands it embeddings and temperatures, it returns the terms.
  ``loss_itc`` is the contrastive term ``itc_loss`` names (``cusa_hf.contrastive_terms``: InfoNCE or SigLIP's sigmoid).

All softmax / log-softmax / KL arithmetic runs in float32 with autocast disabled, whatever the input dtype, so bf16 or
fp16 training cannot overflow them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_cusa import REDUCTIONS, SOFTLABEL_LOSSES, SOFTLABEL_MODES, CusaConfig, loss_term_active
from .contrastive_terms import check_choice, contrastive_term_class, float32_log_softmax, soft_cross_entropy
from .distributed import gather_with_grad, is_distributed


class CsaTerms(NamedTuple):
    """CSA's two cross-modal terms and their mean (the value that enters the total loss)."""

    image_to_text: torch.Tensor
    text_to_image: torch.Tensor
    mean: torch.Tensor


class UsaTerms(NamedTuple):
    """USA's two uni-modal terms (the image head's and the text head's) and their mean (the value that enters the
    total loss)."""

    image: torch.Tensor
    text: torch.Tensor
    mean: torch.Tensor


class TeacherSoftLabels(NamedTuple):
    """Row-stochastic soft-label matrices built from teacher features, each `(batch_size, batch_size)`.

    Attributes:
        image: softmax over image-teacher cosine similarities (USA image target).
        text: softmax over text-teacher cosine similarities (USA text target).
        image_to_text: CSA target of the image-to-text rows (``image`` in mode "each").
        text_to_image: CSA target of the text-to-image rows (``text`` in mode "each").
    """

    image: torch.Tensor
    text: torch.Tensor
    image_to_text: torch.Tensor
    text_to_image: torch.Tensor


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """`(n, n)` cosine similarities of the rows of a `(n, d)` feature matrix, in float32."""
    normalized = F.normalize(features.float(), dim=-1)
    return normalized @ normalized.t()


@torch.no_grad()
def teacher_soft_labels(
    teacher_image_embeds: torch.Tensor,
    teacher_text_embeds: torch.Tensor,
    mode: str = "each",
    temperature: float = 1.0,
) -> TeacherSoftLabels:
    """Soft labels from frozen uni-modal teacher features (no gradient flows into them).

    ``q = softmax(cos(teacher_i, teacher_j) / temperature)`` per row. CSA targets depend on ``mode``:
    "each": image-teacher targets for image-to-text rows, text-teacher targets for text-to-image rows;
    "add": both directions use the mean of the two teachers' cosine similarities;
    "dot": both use ``sqrt(max(cos_img, 0) * max(cos_txt, 0))``.
    USA always uses each modality's own teacher.

    Args:
        teacher_image_embeds: `(batch_size, image_teacher_dim)`; teacher dims need not match the student's.
        teacher_text_embeds: `(batch_size, text_teacher_dim)`.
    """
    check_choice("softlabel_mode", mode, SOFTLABEL_MODES)
    if temperature <= 0:
        raise ValueError(f"softlabel temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=teacher_image_embeds.device.type, enabled=False):
        image_similarity = cosine_similarity_matrix(teacher_image_embeds)
        text_similarity = cosine_similarity_matrix(teacher_text_embeds)
        image_targets = F.softmax(image_similarity / temperature, dim=1)
        text_targets = F.softmax(text_similarity / temperature, dim=1)
        if mode == "each":
            return TeacherSoftLabels(image_targets, text_targets, image_targets, text_targets)
        if mode == "add":
            joint_similarity = (image_similarity + text_similarity) / 2
        else:
            joint_similarity = torch.sqrt(image_similarity.clamp(min=0) * text_similarity.clamp(min=0))
        joint_targets = F.softmax(joint_similarity / temperature, dim=1)
        return TeacherSoftLabels(image_targets, text_targets, joint_targets, joint_targets)


@torch.no_grad()
def soft_label_diagnostics(soft_labels: TeacherSoftLabels, image_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What the teachers' soft labels look like, for the logs.

    Returns the mean row entropy (nats) of the image and text targets (``log(B)`` is uniform, 0 is one-hot) and, when
    ``image_ids`` are given, the mean mass the targets put on *other* pairs of the same image (captions of one image
    should attract each other: same-image pairs are false negatives for single-positive InfoNCE).
    """
    stats = {}
    for name, targets in (("image", soft_labels.image), ("text", soft_labels.text)):
        stats[f"softlabel_entropy_{name}"] = -(targets * targets.clamp_min(1e-12).log()).sum(dim=1).mean()
    if image_ids is not None:
        image_ids = image_ids.reshape(-1).to(soft_labels.image.device)
        same_image = image_ids[:, None] == image_ids[None, :]
        same_image.fill_diagonal_(False)
        for name, targets in (("image", soft_labels.image), ("text", soft_labels.text)):
            stats[f"softlabel_same_image_mass_{name}"] = (targets * same_image).sum(dim=1).mean()
    return stats


def soft_label_loss(
    logits: torch.Tensor, targets: torch.Tensor, loss: str = "kl", reduction: str = "all_entries_mean"
) -> torch.Tensor:
    """Align ``softmax(logits)`` rows with soft ``targets``, both `(rows, columns)`.

    ``loss="kl"``: ``KL(targets || softmax(logits))``, summed over each row and averaged over rows ("batchmean").
    ``loss="contrastive"``: soft-target cross-entropy with the given ``reduction`` (the authors' alternative).
    """
    check_choice("softlabel_loss", loss, SOFTLABEL_LOSSES)
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and soft-label targets {tuple(targets.shape)} differ in shape")
    if loss == "contrastive":
        return soft_cross_entropy(logits, targets, reduction)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.kl_div(float32_log_softmax(logits), targets.float(), reduction="batchmean")


def csa_loss(
    similarity: torch.Tensor,
    soft_labels: TeacherSoftLabels,
    temperature: torch.Tensor | float,
    loss: str = "kl",
    reduction: str = "all_entries_mean",
) -> CsaTerms:
    """Cross-modal soft-label alignment.

    Args:
        similarity: `(batch_size, batch_size)` student image-by-text cosine similarities ``s_ij``.
        soft_labels: teacher targets from :func:`teacher_soft_labels`.
        temperature: CSA temperature ``tau_c`` (shared by both directions).

    Returns:
        ``CsaTerms(image_to_text, text_to_image, mean)``.
    """
    image_to_text = soft_label_loss(similarity / temperature, soft_labels.image_to_text, loss, reduction)
    text_to_image = soft_label_loss(similarity.t() / temperature, soft_labels.text_to_image, loss, reduction)
    return CsaTerms(image_to_text, text_to_image, (image_to_text + text_to_image) / 2)


def usa_loss(
    uni_image_embeds: torch.Tensor,
    uni_text_embeds: torch.Tensor,
    soft_labels: TeacherSoftLabels,
    image_temperature: torch.Tensor | float,
    text_temperature: torch.Tensor | float,
    loss: str = "kl",
    reduction: str = "all_entries_mean",
) -> UsaTerms:
    """Uni-modal soft-label alignment of the USA heads' image-image and text-text distributions.

    Args:
        uni_image_embeds: `(batch_size, dim)` L2-normalised outputs of the image USA head.
        uni_text_embeds: `(batch_size, dim)` L2-normalised outputs of the text USA head.

    Returns:
        ``UsaTerms(image, text, mean)``.
    """
    image_logits = uni_image_embeds @ uni_image_embeds.t() / image_temperature
    text_logits = uni_text_embeds @ uni_text_embeds.t() / text_temperature
    image_term = soft_label_loss(image_logits, soft_labels.image, loss, reduction)
    text_term = soft_label_loss(text_logits, soft_labels.text, loss, reduction)
    return UsaTerms(image_term, text_term, (image_term + text_term) / 2)


@dataclass
class CusaLossOutput:
    """The terms of one CUSA loss evaluation.

    Attributes:
        loss: `()` ``loss_itc + csa_weight * loss_csa + usa_weight * loss_usa``.
        loss_itc, loss_csa, loss_usa: `()` each term (CSA/USA are 0 when inactive).
        logits_per_image: `(global_batch, global_batch)` image-by-text logits of the contrastive term over the
            gathered batch (for InfoNCE the similarities divided by its temperature when there is one).
        softlabel_stats: :func:`soft_label_diagnostics` of the teachers' soft labels (empty without teachers).
    """

    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_csa: torch.Tensor
    loss_usa: torch.Tensor
    logits_per_image: torch.Tensor
    softlabel_stats: dict[str, torch.Tensor]


class CusaLoss(nn.Module):
    """``loss_itc + csa_weight * CSA + usa_weight * USA`` over a batch of embeddings (docs/method.md).

    The module holds the loss settings (CusaConfig's defaults) and no parameters: temperatures are the model's (they
    are trained and saved with it) and are passed in, as open_clip passes ``logit_scale`` to ``ClipLoss``. With
    ``gather_features`` in a distributed run every input is all-gathered (with gradients) first, so the soft labels and
    InfoNCE are distributions over the global batch.

    Example:
        >>> loss_fn = CusaLoss(csa_weight=0.1, usa_weight=0.1)
        >>> out = loss_fn(image_embeds, text_embeds, itc_temperature=0.05, csa_temperature=0.05,
        ...               uni_image_embeds=u_img, uni_text_embeds=u_txt, usa_image_temperature=0.05,
        ...               usa_text_temperature=0.05, image_ids=ids, teacher_image_embeds=t_img, teacher_text_embeds=t_txt)
        >>> out.loss.backward()
    """

    def __init__(
        self,
        csa_weight: float = CusaConfig.csa_weight,
        usa_weight: float = CusaConfig.usa_weight,
        use_csa: bool = CusaConfig.use_csa,
        use_usa: bool = CusaConfig.use_usa,
        softlabel_mode: str = CusaConfig.softlabel_mode,
        softlabel_temperature: float = CusaConfig.softlabel_temperature,
        softlabel_loss: str = CusaConfig.softlabel_loss,
        reduction: str = CusaConfig.itc_reduction,
        gather_features: bool = CusaConfig.gather_features,
        itc_loss: str = "infonce",
    ):
        super().__init__()
        check_choice("softlabel_mode", softlabel_mode, SOFTLABEL_MODES)
        check_choice("softlabel_loss", softlabel_loss, SOFTLABEL_LOSSES)
        check_choice("itc_reduction", reduction, REDUCTIONS)
        self.csa_weight, self.usa_weight = float(csa_weight), float(usa_weight)
        self.csa_active = loss_term_active(use_csa, self.csa_weight)
        self.usa_active = loss_term_active(use_usa, self.usa_weight)
        self.softlabel_mode, self.softlabel_temperature = softlabel_mode, softlabel_temperature
        self.softlabel_loss, self.reduction = softlabel_loss, reduction
        self.gather_features = gather_features
        self.itc_term = contrastive_term_class(itc_loss)(reduction)

    @classmethod
    def from_config(cls, config: Any) -> "CusaLoss":
        """The loss a [`CusaConfig`] describes."""
        return cls(
            csa_weight=config.csa_weight,
            usa_weight=config.usa_weight,
            use_csa=config.use_csa,
            use_usa=config.use_usa,
            softlabel_mode=config.softlabel_mode,
            softlabel_temperature=config.softlabel_temperature,
            softlabel_loss=config.softlabel_loss,
            reduction=config.itc_reduction,
            gather_features=config.gather_features,
            itc_loss=config.itc_loss,
        )

    @property
    def needs_teachers(self) -> bool:
        return self.csa_active or self.usa_active

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` from every process concatenated in rank order (with gradients) when features are gathered;
        ``tensor`` itself otherwise."""
        return gather_with_grad(tensor) if self.gather_features and is_distributed() else tensor

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        *,
        csa_temperature: torch.Tensor | float | None = None,
        usa_image_temperature: torch.Tensor | float | None = None,
        usa_text_temperature: torch.Tensor | float | None = None,
        uni_image_embeds: torch.Tensor | None = None,
        uni_text_embeds: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        teacher_image_embeds: torch.Tensor | None = None,
        teacher_text_embeds: torch.Tensor | None = None,
        pair_similarity: torch.Tensor | None = None,
        itc_terms: dict[str, torch.Tensor] | None = None,
        **itc_scalars: torch.Tensor | float | None,
    ) -> CusaLossOutput:
        """
        Args:
            image_embeds, text_embeds: `(batch_size, dim)` L2-normalised cross-modal embeddings of aligned pairs.
            csa_temperature, usa_image_temperature, usa_text_temperature: needed while CSA / USA are active.
            uni_image_embeds, uni_text_embeds: `(batch_size, feature_dim)` L2-normalised USA-head embeddings.
            image_ids: `(batch_size,)` image id per pair; pairs sharing one are all positives of each other.
            teacher_image_embeds, teacher_text_embeds: `(batch_size, teacher_dim)` frozen teacher features.
            pair_similarity: `(batch_size, batch_size)` scores of a backbone that scores pairs itself (SGRAF), used
                instead of ``image_embeds @ text_embeds.T``; such scores cannot be gathered.
            itc_terms: the backbone's own loss terms (X2VLM's ITC + ITM), summed into ``loss_itc`` instead of the
                contrastive term.
            **itc_scalars: the contrastive term's learnable scalars, by the names it declares
                (``ContrastiveTerm.scalar_names``): InfoNCE's ``itc_temperature`` (``None``: the similarities are
                already logits), the sigmoid term's ``itc_logit_scale`` and ``itc_logit_bias``.
        """
        batch_size = image_embeds.shape[0]
        if text_embeds.shape[0] != batch_size:
            raise ValueError(f"got {batch_size} images but {text_embeds.shape[0]} captions: CUSA trains on aligned pairs")
        if image_ids is not None and image_ids.reshape(-1).shape[0] != batch_size:
            raise ValueError(f"image_ids has {image_ids.reshape(-1).shape[0]} entries for a batch of {batch_size} pairs")
        gathering = self.gather_features and is_distributed()
        if gathering and pair_similarity is not None:
            raise ValueError(
                "gather_features=True is not supported for backbones that score pairs themselves (e.g. SGRAF): "
                "their B x B scores need every process's token features"
            )
        global_image_embeds, global_text_embeds = self.gather(image_embeds), self.gather(text_embeds)
        if global_image_embeds.shape[0] < 2:
            raise ValueError(
                f"a contrastive batch needs at least two image-text pairs, got {global_image_embeds.shape[0]}: with one "
                "pair every loss term and gradient is exactly 0. Use a per-device batch size of 2 or more (and drop a "
                "last batch of one pair with dataloader_drop_last=True)"
            )
        if pair_similarity is not None:
            similarity = pair_similarity
        else:
            similarity = global_image_embeds @ global_text_embeds.t()
        unknown = sorted(set(itc_scalars) - set(self.itc_term.scalar_names))
        if unknown:
            raise TypeError(
                f"CusaLoss.forward got unexpected keyword(s) {unknown}: neither its own parameters nor scalars of the "
                f"{self.itc_term.name!r} contrastive term, which takes {list(self.itc_term.scalar_names)}"
            )
        scalars = {name: itc_scalars.get(name) for name in self.itc_term.scalar_names}
        global_image_ids = self.gather(image_ids) if image_ids is not None else None
        if itc_terms is None:
            loss_itc, logits_per_image = self.itc_term(similarity, global_image_ids, **scalars)
        else:
            loss_itc, logits_per_image = sum(itc_terms.values()), self.itc_term.logits(similarity, **scalars)
        zero = similarity.new_zeros((), dtype=torch.float32)
        loss_csa = loss_usa = zero
        stats: dict[str, torch.Tensor] = {}
        if self.needs_teachers:
            self._check_teacher_shapes(batch_size, teacher_image_embeds, teacher_text_embeds)
            soft_labels = teacher_soft_labels(
                self.gather(teacher_image_embeds),
                self.gather(teacher_text_embeds),
                mode=self.softlabel_mode,
                temperature=self.softlabel_temperature,
            )
            stats = soft_label_diagnostics(soft_labels, global_image_ids)
            if self.csa_active:
                loss_csa = csa_loss(similarity, soft_labels, csa_temperature, self.softlabel_loss, self.reduction).mean
            if self.usa_active:
                loss_usa = usa_loss(
                    self.gather(uni_image_embeds),
                    self.gather(uni_text_embeds),
                    soft_labels,
                    usa_image_temperature,
                    usa_text_temperature,
                    self.softlabel_loss,
                    self.reduction,
                ).mean
        loss = loss_itc + self.csa_weight * loss_csa + self.usa_weight * loss_usa
        return CusaLossOutput(loss, loss_itc, loss_csa, loss_usa, logits_per_image, stats)

    def _check_teacher_shapes(
        self, batch_size: int, teacher_image_embeds: torch.Tensor | None, teacher_text_embeds: torch.Tensor | None
    ) -> None:
        """Shapes only: value checks (NaN/inf rows) run once over the whole table when the trainer is built
        (``check_teacher_features``), not at every step where they would cost a device synchronisation."""
        active = " and ".join(
            term
            for term, on in (
                (f"CSA (csa_weight={self.csa_weight})", self.csa_active),
                (f"USA (usa_weight={self.usa_weight})", self.usa_active),
            )
            if on
        )
        for name, embeds in (("teacher_image_embeds", teacher_image_embeds), ("teacher_text_embeds", teacher_text_embeds)):
            if embeds is None:
                raise ValueError(
                    f"{active} needs {name}, but it was not given. Add the teacher-feature columns to the dataset "
                    "with cusa_hf.add_teacher_features(...) (or the cusa-extract-teachers CLI), or switch the terms "
                    "off with use_csa=False / use_usa=False (or weight 0) to train the plain baseline."
                )
            if embeds.ndim != 2 or embeds.shape[0] != batch_size:
                raise ValueError(
                    f"{name} has shape {tuple(embeds.shape)} but the batch has {batch_size} pairs: expected "
                    f"({batch_size}, teacher_dim)"
                )
