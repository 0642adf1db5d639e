"""The contrastive (retrieval) term of ``CusaLoss``: one small module per loss, chosen by ``CusaConfig.itc_loss``.

CUSA's CSA and USA terms are KL divergences between in-batch similarity distributions; they do not depend on which
contrastive term trains the retrieval embeddings beside them. A term, in the spirit of open_clip's ``ClipLoss`` /
``SigLipLoss``:

* takes the image-by-text cosine similarities of the batch that ``CusaLoss`` exchanged across processes (with
  ``gather_features``, every process's embeddings all-gathered with gradients, the same exchange CSA and USA need;
  without it, this process's batch) and the pairs' image ids;
* declares its learnable scalars (:attr:`ContrastiveTerm.scalar_names`, with their initial values): ``CusaModel``
  registers them as its own top-level parameters under these names, so they are trained, clamped where they have
  bounds, and saved under stable state-dict keys (``itc_temperature`` is the key checkpoints have always used), or
  takes them from the backbone when it brings its own (SigLIP's ``logit_scale`` / ``logit_bias``);
* returns the loss and the logits it scored.

A new term is one :class:`ContrastiveTerm` subclass here and one :func:`register_contrastive_term`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_cusa import REDUCTIONS


def float32_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in float32 with autocast off, whatever the input dtype (no bf16/fp16 overflow)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.log_softmax(logits.float(), dim=1)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """``ValueError`` naming the setting ``name`` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def multi_positive_targets(image_ids: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """`(batch_size, batch_size)` InfoNCE targets: identity, or uniform over every pair that shares an image id.

    Args:
        image_ids: `(batch_size,)` integer ids of each pair's image, or ``None`` when every pair is its own positive.
    """
    if image_ids is None:
        return torch.eye(batch_size, device=device, dtype=torch.float32)
    image_ids = image_ids.reshape(-1)
    if image_ids.numel() != batch_size:
        raise ValueError(f"image_ids has {image_ids.numel()} entries but the batch has {batch_size} pairs")
    positives = (image_ids[:, None] == image_ids[None, :]).to(device=device, dtype=torch.float32)
    return positives / positives.sum(dim=1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "all_entries_mean") -> torch.Tensor:
    """Cross-entropy of ``softmax(logits)`` (rows) against row-stochastic ``targets``, both `(rows, columns)`."""
    check_choice("reduction", reduction, REDUCTIONS)
    weighted = float32_log_softmax(logits) * targets.float()
    if reduction == "all_entries_mean":
        return -weighted.mean(dim=1).mean()
    return -weighted.sum(dim=1).mean()


def info_nce(
    logits_per_image: torch.Tensor, image_ids: torch.Tensor | None = None, reduction: str = "all_entries_mean"
) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE: ``1/2 [CE(i2t) + CE(t2i)]``.

    Args:
        logits_per_image: `(batch_size, batch_size)` image-by-text similarities already divided by the temperature.
        image_ids: `(batch_size,)` image id of each pair; pairs sharing an id are all positives (uniform targets).
        reduction: ``"all_entries_mean"`` (authors, the default scale of the published weights) or ``"row_mean"``.
    """
    if logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(f"info_nce needs a square image-by-text matrix, got {tuple(logits_per_image.shape)}")
    targets = multi_positive_targets(image_ids, logits_per_image.shape[0], logits_per_image.device)
    image_to_text = soft_cross_entropy(logits_per_image, targets, reduction)
    text_to_image = soft_cross_entropy(logits_per_image.t(), targets.t(), reduction)
    return (image_to_text + text_to_image) / 2


class ContrastiveTermOutput(NamedTuple):
    """A contrastive term over one batch.

    Attributes:
        loss: `()` the term.
        logits_per_image: `(image_batch, text_batch)` the logits it scored (``CusaOutput.logits_per_image``).
    """

    loss: torch.Tensor
    logits_per_image: torch.Tensor


class ContrastiveTerm(nn.Module):
    """Base class of contrastive terms; subclasses set :attr:`name` and :attr:`scalar_names` and implement
    :meth:`initial_scalars`, :meth:`logits` and :meth:`forward`."""

    #: The value of ``CusaConfig.itc_loss`` that selects the term.
    name: str = ""
    #: The learnable scalars the term reads, as ``CusaModel`` parameter names (keyword arguments of ``forward``).
    scalar_names: tuple[str, ...] = ()
    #: The term's name in the model card (a run trained with this term alone is the "<label> baseline").
    label: str = ""

    def __init__(self, reduction: str = "all_entries_mean"):
        super().__init__()
        self.reduction = reduction

    @classmethod
    def initial_scalars(cls, config: Any) -> dict[str, float]:
        """``{scalar name: initial value}`` of a fresh model with ``config``."""
        raise NotImplementedError

    def logits(self, similarity: torch.Tensor, **scalars: torch.Tensor | None) -> torch.Tensor:
        """The `(image_batch, text_batch)` logits of cosine ``similarity`` (a scalar given as ``None``: the
        similarities are the logits, as for backbones that bring their own loss)."""
        raise NotImplementedError

    def forward(
        self, similarity: torch.Tensor, image_ids: torch.Tensor | None = None, **scalars: torch.Tensor
    ) -> ContrastiveTermOutput:
        raise NotImplementedError


_TERMS: dict[str, type[ContrastiveTerm]] = {}


def register_contrastive_term(term_class: type[ContrastiveTerm]) -> type[ContrastiveTerm]:
    """Register a term under its ``name`` (usable as a class decorator)."""
    if not term_class.name:
        raise ValueError(f"{term_class.__name__}.name is empty: give the itc_loss value that selects it")
    _TERMS[term_class.name] = term_class
    return term_class


def contrastive_term_class(itc_loss: str) -> type[ContrastiveTerm]:
    """The term registered for ``itc_loss``; ``ValueError`` naming the choices otherwise."""
    try:
        return _TERMS[itc_loss]
    except (KeyError, TypeError):
        raise ValueError(f"itc_loss={itc_loss!r} is not supported; choose one of {sorted(_TERMS)}") from None


def contrastive_term_names() -> list[str]:
    return sorted(_TERMS)


@register_contrastive_term
class InfoNCETerm(ContrastiveTerm):
    """Multi-positive InfoNCE (:func:`info_nce`) over ``similarity / itc_temperature``: CUSA's
    original retrieval term, the authors' (``CusaConfig.itc_temperature``, clamped to its bounds every step)."""

    name = "infonce"
    scalar_names = ("itc_temperature",)
    label = "InfoNCE"

    @classmethod
    def initial_scalars(cls, config: Any) -> dict[str, float]:
        return {"itc_temperature": float(config.itc_temperature)}

    def logits(self, similarity: torch.Tensor, itc_temperature: torch.Tensor | float | None = None) -> torch.Tensor:
        return similarity / itc_temperature if itc_temperature is not None else similarity

    def forward(
        self,
        similarity: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        itc_temperature: torch.Tensor | float | None = None,
    ) -> ContrastiveTermOutput:
        logits_per_image = self.logits(similarity, itc_temperature)
        return ContrastiveTermOutput(info_nce(logits_per_image, image_ids, self.reduction), logits_per_image)


#: SigLIP's initial log-scale and bias (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023,
#: section 3.3: t' = log 10, b = -10), for backbones that do not bring trained ones.
SIGMOID_LOGIT_SCALE_INIT = math.log(10.0)
SIGMOID_LOGIT_BIAS_INIT = -10.0


@register_contrastive_term
class SigmoidTerm(ContrastiveTerm):
    """SigLIP's pairwise sigmoid loss: ``-1/B sum_ij log sigmoid(z_ij (exp(t') s_ij + b))`` over the `(B, B)`
    similarities ``s``, with ``z_ij = 1`` for a positive pair and ``-1`` otherwise.

    Positives are the pairs whose images share an id (each pair with itself, and the other captions of its image, as
    InfoNCE's targets); with one caption per image this is exactly transformers' ``SiglipModel`` loss and open_clip's
    ``SigLipLoss``. It is a sum over pairs, so ``loss_chunk_size`` and an all-gathered batch give the same value and
    gradients as one process over the whole batch. ``itc_reduction`` does not apply: the normalisation is SigLIP's
    (by the image batch size). Scalars: ``itc_logit_scale`` (t') and ``itc_logit_bias`` (b), not clamped (as the
    references).
    """

    name = "sigmoid"
    scalar_names = ("itc_logit_scale", "itc_logit_bias")
    label = "sigmoid"

    @classmethod
    def initial_scalars(cls, config: Any) -> dict[str, float]:
        return {"itc_logit_scale": SIGMOID_LOGIT_SCALE_INIT, "itc_logit_bias": SIGMOID_LOGIT_BIAS_INIT}

    def logits(
        self,
        similarity: torch.Tensor,
        itc_logit_scale: torch.Tensor | None = None,
        itc_logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if itc_logit_scale is None or itc_logit_bias is None:
            return similarity
        return similarity * itc_logit_scale.exp() + itc_logit_bias

    def forward(
        self,
        similarity: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        itc_logit_scale: torch.Tensor | None = None,
        itc_logit_bias: torch.Tensor | None = None,
    ) -> ContrastiveTermOutput:
        if itc_logit_scale is None or itc_logit_bias is None:
            raise ValueError("the sigmoid term needs itc_logit_scale and itc_logit_bias")
        logits_per_image = self.logits(similarity, itc_logit_scale, itc_logit_bias)
        with torch.autocast(device_type=logits_per_image.device.type, enabled=False):
            signs = 2 * _positive_pairs(image_ids, logits_per_image) - 1
            loss = -F.logsigmoid(signs * logits_per_image.float()).sum() / logits_per_image.shape[0]
        return ContrastiveTermOutput(loss, logits_per_image)


def _positive_pairs(image_ids: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """`(rows, columns)` float32: 1 where image and text belong to one image (the diagonal without ids)."""
    rows, columns = logits.shape
    if image_ids is None:
        return torch.eye(rows, columns, device=logits.device, dtype=torch.float32)
    image_ids = image_ids.reshape(-1).to(logits.device)
    if image_ids.numel() != rows or rows != columns:
        raise ValueError(f"image_ids has {image_ids.numel()} entries for a {rows} x {columns} logit matrix")
    return (image_ids[:, None] == image_ids[None, :]).float()
