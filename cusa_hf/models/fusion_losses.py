"""Training losses shared by the fusion backbones (X2-VLM, BLIP): ITC with image-id soft targets, and ITM on hard
negatives mined in the batch from the ITC similarities.

Both models fine-tune for retrieval with the same two terms (X2-VLM's ``Retrieval.py``, BLIP's retrieval loss
without its momentum encoder); they differ only in the temperature, the ``+ 1e-5`` smoothing of the negative
sampling weights and how their fusion encoder is called, which the callers pass in.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..contrastive_terms import info_nce


def same_image_mask(batch_size: int, image_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """`(B, B)` bool: True where rows i and j show the same image (the diagonal when ``image_ids`` is None)."""
    if image_ids is None:
        return torch.eye(batch_size, dtype=torch.bool, device=device)
    image_ids = image_ids.view(-1)
    if image_ids.numel() != batch_size:
        raise ValueError(f"image_ids has {image_ids.numel()} entries for a batch of {batch_size} pairs")
    return image_ids[:, None] == image_ids[None, :]


def itc_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temp: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """ITC: mean of the i2t and t2i soft-target cross-entropies of ``image @ text.T / temp``.

    Args:
        image_features, text_features: `(B, d)` L2-normalised ITC features.
        temp: scalar temperature tensor.
        image_ids: `(B,)` image ids; captions of the same image are all positives, with uniform target mass.
        gather: all-gathers a per-process tensor across processes (with gradient); applied to the features and ids
            first, so the loss runs over the global batch. ``None``: the inputs already are the whole batch.
    """
    if gather is not None:
        image_features, text_features = gather(image_features), gather(text_features)
        image_ids = gather(image_ids.view(-1)) if image_ids is not None else None
    logits = (image_features @ text_features.t()).float() / temp.float()
    # Summed over each row's targets, averaged over rows: the usual cross-entropy scale of both originals.
    return info_nce(logits, image_ids, reduction="row_mean")


@torch.no_grad()
def sample_hard_negatives(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temp: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    smoothing: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ITM hard negative per row, drawn with weight ``softmax(sim / temp) + smoothing``, same-image pairs at 0.

    X2-VLM adds ``smoothing=1e-5``; BLIP adds nothing.

    Args:
        image_features, text_features: `(B, d)` L2-normalised ITC features of the local batch.
        temp: scalar temperature tensor.
        image_ids: `(B,)` image ids; pairs of the same image are never drawn (the diagonal only when ``None``).
        generator: fixes the draw.
        smoothing: added to every sampling weight before the same-image pairs are zeroed.

    Returns:
        ``(negative_image_for_text, negative_text_for_image)``, two `(B,)` long tensors of batch indices.
    """
    batch = image_features.shape[0]
    similarity = (image_features @ text_features.t()).float() / temp.float()
    same_image = same_image_mask(batch, image_ids, similarity.device)
    if same_image.all(dim=1).any():
        raise ValueError(
            "ITM hard negatives need, for every pair, another pair of a different image in the batch; "
            f"image_ids={image_ids.view(-1).tolist() if image_ids is not None else None}"
        )
    weights_i2t = (F.softmax(similarity, dim=1) + smoothing).masked_fill(same_image, 0)
    weights_t2i = (F.softmax(similarity.t(), dim=1) + smoothing).masked_fill(same_image, 0)
    negative_image_for_text = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    negative_text_for_image = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return negative_image_for_text, negative_text_for_image


def hard_negative_itm_loss(
    pair_itm_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    negatives: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """ITM cross-entropy over B positive pairs and 2B hard-negative pairs of the local batch.

    The fusion batch is ``[(image_b, text_b)]``, ``[(image_neg(text_b), text_b)]``, ``[(image_b, text_neg(image_b))]``
    with labels 1, 0, 0.

    Args:
        pair_itm_logits: ``(image_index (3B,), text_index (3B,)) -> (3B, 2)`` ITM logits of the pairs
            ``(image[image_index[n]], text[text_index[n]])`` of the batch, class 1 being "match".
        negatives: ``(negative_image_for_text, negative_text_for_image)`` from :func:`sample_hard_negatives`.
    """
    negative_image_for_text, negative_text_for_image = negatives
    rows = torch.arange(negative_image_for_text.shape[0], device=negative_image_for_text.device)
    image_index = torch.cat([rows, negative_image_for_text, rows])
    text_index = torch.cat([rows, rows, negative_text_for_image])
    logits = pair_itm_logits(image_index, text_index).float()
    labels = torch.zeros(3 * rows.shape[0], dtype=torch.long, device=logits.device)
    labels[: rows.shape[0]] = 1
    return F.cross_entropy(logits, labels)


__all__ = ["hard_negative_itm_loss", "itc_loss", "same_image_mask", "sample_hard_negatives"]
