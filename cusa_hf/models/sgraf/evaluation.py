"""Retrieval evaluation of SGR / SAF / SGRAF through the shared metrics, with a pairwise ``score_fn``.

SGRAF scores each (image, caption) pair with cross-attention, so there is no ``image @ text.T`` fast path: every
image and caption is encoded once (:class:`SgrafPairwiseScorer`), then
``cusa_hf.evaluation.reranking.pairwise_similarity`` fills the score matrix block by block and ``retrieval_metrics``
ranks it. SGRAF (the ensemble) averages the score matrices of its members, as the authors do.

Protocols (:data:`PROTOCOLS`, the SGRAF/VSE++ conventions): ``"coco5k"`` and ``"f30k"``: one matrix over the whole
split (COCO ``testall`` 5,000 images, Flickr30K ``test`` 1,000 images); ``"coco1k"``: the 5,000 images in 5 folds of
1,000 consecutive images with their captions, metrics averaged over folds, RSUM = mean of the per-fold RSUMs (the
original prints ``6 x`` the mean of a different column; this is the fixed form).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ...evaluation.metrics import retrieval_metrics
from ...evaluation.reranking import pairwise_similarity
from .adapter import SgrafAdapter
from .modeling_sgraf import SgrafModel

PROTOCOLS = {"coco5k": 1, "f30k": 1, "coco1k": 5}  # protocol -> number of folds


class SgrafPairwiseScorer:
    """Encodes a split once and scores any block of (images, captions): ``scorer(image_idx, text_idx)``.

    Args:
        models: one ``SgrafModel`` or several (their sigmoid scores are averaged: SGRAF = SGR + SAF).
        region_features: `(n_images, num_regions, img_dim)` array or tensor (a memory map is read in batches).
        input_ids, attention_mask: `(n_captions, seq_len)` tokenised captions (``SgrafTokenizer``, right-padded).
        batch_size: images / captions encoded at once.
    """

    def __init__(
        self,
        models: SgrafModel | Sequence[SgrafModel],
        region_features: np.ndarray | torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_size: int = 128,
    ):
        self.models = [models] if isinstance(models, SgrafModel) else list(models)
        self.encoded = [self._encode(model, region_features, input_ids, attention_mask, batch_size) for model in self.models]

    @staticmethod
    @torch.no_grad()
    def _encode(model, region_features, input_ids, attention_mask, batch_size):
        model.eval()
        device = model.device
        regions, image_global = [], []
        for start in range(0, len(region_features), batch_size):
            block = torch.as_tensor(np.asarray(region_features[start : start + batch_size]), dtype=torch.float32)
            embeds = model.encode_image(block.to(device))
            regions.append(embeds)
            image_global.append(model.image_global(embeds))
        words, text_global = [], []
        for start in range(0, len(input_ids), batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = model.text_mask(ids, None if attention_mask is None else attention_mask[start : start + batch_size].to(device))
            embeds = model.encode_text(ids, mask)
            text_global.append(model.text_global(embeds, mask))
            # Keep each caption unpadded, so a block is padded only to its own longest caption.
            words.extend(embed[:length] for embed, length in zip(embeds, mask.sum(dim=1).tolist()))
        return torch.cat(regions), torch.cat(image_global), words, torch.cat(text_global)

    @property
    def num_images(self) -> int:
        return len(self.encoded[0][0])

    @property
    def num_texts(self) -> int:
        return len(self.encoded[0][2])

    @torch.no_grad()
    def __call__(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        """`(len(image_idx), len(text_idx))` scores in (0, 1), averaged over the models."""
        blocks = []
        for model, (regions, image_global, words, text_global) in zip(self.models, self.encoded):
            image_idx_d, text_idx_d = image_idx.to(regions.device), text_idx.to(regions.device)
            captions = [words[index] for index in text_idx.tolist()]
            padded = pad_sequence(captions, batch_first=True)
            lengths = torch.tensor([len(caption) for caption in captions], device=regions.device)
            mask = torch.arange(padded.shape[1], device=regions.device)[None] < lengths[:, None]
            logits = model.sim_enc(regions[image_idx_d], image_global[image_idx_d], padded, mask, text_global[text_idx_d])
            blocks.append(torch.sigmoid(logits))
        return torch.stack(blocks).mean(dim=0).cpu()

    def similarity(self, image_chunk: int = 100, text_chunk: int = 100, show_progress: bool = False) -> torch.Tensor:
        """The full `(n_images, n_captions)` score matrix (blocks of ``image_chunk`` x ``text_chunk`` pairs)."""
        return pairwise_similarity(self, self.num_images, self.num_texts, image_chunk, text_chunk, show_progress)


def fold_metrics(
    scorer: SgrafPairwiseScorer,
    text_to_image: torch.Tensor,
    folds: int = 1,
    image_chunk: int = 100,
    text_chunk: int = 100,
    show_progress: bool = False,
) -> dict[str, float]:
    """R@1/5/10 both ways and RSUM, on the whole split (``folds=1``) or averaged over ``folds`` equal folds of
    consecutive images with their captions (COCO 1K). Only the in-fold blocks are scored."""
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    n_images = scorer.num_images
    if n_images % folds:
        raise ValueError(f"{n_images} images cannot be split into {folds} equal folds")
    fold_size = n_images // folds
    per_fold = []
    for fold in range(folds):
        first = fold * fold_size
        texts = torch.nonzero((text_to_image >= first) & (text_to_image < first + fold_size)).flatten()

        def score_fold(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
            return scorer(image_idx + first, texts[text_idx])

        similarity = pairwise_similarity(score_fold, fold_size, len(texts), image_chunk, text_chunk, show_progress)
        per_fold.append(retrieval_metrics(similarity, text_to_image[texts] - first))
    return {name: float(np.mean([metrics[name] for metrics in per_fold])) for name in per_fold[0]}


def evaluate_sgraf(
    models: SgrafModel | Sequence[SgrafModel],
    region_features: np.ndarray | torch.Tensor,
    captions: Sequence[str],
    text_to_image: torch.Tensor,
    tokenizer,
    protocol: str = "coco5k",
    batch_size: int = 128,
    image_chunk: int = 100,
    text_chunk: int = 100,
    show_progress: bool = False,
) -> dict[str, float]:
    """Metrics of one model (SGR or SAF) or an ensemble (SGRAF) on a split, under ``protocol`` (see module doc)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: expected one of {sorted(PROTOCOLS)}")
    text = SgrafAdapter.tokenize_captions(tokenizer, captions)
    scorer = SgrafPairwiseScorer(models, region_features, text["input_ids"], text["attention_mask"], batch_size)
    return fold_metrics(scorer, text_to_image, PROTOCOLS[protocol], image_chunk, text_chunk, show_progress)


def sgraf_pairwise_scorer(region_features: np.ndarray | torch.Tensor, tokenizer, batch_size: int = 128):
    """``CusaTrainer(pairwise_scorer=...)`` for SGR/SAF: scores an evaluation view whose images are rows of
    ``region_features`` (as ``RegionFeatureSplit.rows()`` and ``eval_view()`` make them)."""

    def scorer(model: torch.nn.Module, eval_view) -> SgrafPairwiseScorer:
        backbone = getattr(model, "backbone", model)
        rows = [int(row) for row in eval_view.images]
        features = region_features if rows == list(range(len(region_features))) else region_features[rows]
        text = SgrafAdapter.tokenize_captions(tokenizer, eval_view.captions)
        return SgrafPairwiseScorer(backbone, features, text["input_ids"], text["attention_mask"], batch_size)

    return scorer
