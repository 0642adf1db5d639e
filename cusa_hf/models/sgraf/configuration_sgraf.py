"""SGRAF model configuration (SGR and SAF similarity reasoners of Diao et al., AAAI 2021)."""

from __future__ import annotations

from transformers import PreTrainedConfig

#: ``ModelArguments.backbone`` of a fresh SGR/SAF model, trained from scratch on precomputed region features.
SGRAF_BACKBONE = "sgraf"
SGRAF_MODULES = ("SGR", "SAF")
USA_POOLINGS = ("self_attention", "mean")


class SgrafConfig(PreTrainedConfig):
    r"""Configuration of an [`SgrafModel`]: one similarity reasoner, SGR or SAF, over precomputed region features.

    The defaults are the original training options (COCO vocabulary size, BUTD 36 x 2048 region features).
    SGRAF itself is not a configuration: it is the average of a trained SGR's and a trained SAF's scores
    ([`SgrafEnsemble`]).

    Args:
        vocab_size: number of word ids (11,353 for the original COCO vocabulary, 8,481 for Flickr30K).
        word_dim: word embedding size.
        embed_size: joint embedding size of regions and words.
        img_dim: size of one precomputed region feature (2048 for BUTD, 1280 for EfficientNet-Lite grids).
        num_regions: regions per image; the visual self-attention's BatchNorm has one channel per region, so this
            is fixed by the feature extractor (36 in the original).
        sim_dim: size of the similarity vectors that SGR/SAF reason over.
        num_layers: GRU layers.
        bi_gru: bidirectional GRU whose two directions are averaged (the original default).
        no_imgnorm / no_txtnorm: skip the L2 normalisation of region / word embeddings.
        module_name: ``"SGR"`` (graph reasoning) or ``"SAF"`` (attention filtration).
        sgr_step: number of graph reasoning layers (SGR only).
        attn_smooth: inverse temperature of the text-to-image attention (9.0 in the original).
        dropout: dropout of the word embeddings and of both self-attention blocks.
        margin: hinge margin of the triplet loss.
        max_violation: hardest negative per query (True, from step 0, in the original) instead of the sum.
        mask_same_image_negatives: with ``image_ids`` given, do not count other captions of the same image as
            negatives (not in the original, which treats them as negatives).
        caption_chunk_size: captions scored together by the vectorised pairwise scorer; bounds memory
            (about ``n_images * chunk * words * embed_size`` floats per intermediate) without changing scores.
        usa_pooling: which global features feed CUSA's uni-modal heads: ``"self_attention"`` (the visual/text
            self-attention globals the similarity uses) or ``"mean"`` (masked means of the local embeddings).
    """

    model_type = "sgraf"

    vocab_size: int = 11353
    word_dim: int = 300
    embed_size: int = 1024
    img_dim: int = 2048
    num_regions: int = 36
    sim_dim: int = 256
    num_layers: int = 1
    bi_gru: bool = True
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    module_name: str = "SGR"
    sgr_step: int = 3
    attn_smooth: float = 9.0
    dropout: float = 0.4
    margin: float = 0.2
    max_violation: bool = True
    mask_same_image_negatives: bool = False
    caption_chunk_size: int = 32
    usa_pooling: str = "self_attention"
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.module_name not in SGRAF_MODULES:
            raise ValueError(
                f"SgrafConfig.module_name={self.module_name!r}: expected one of {SGRAF_MODULES} "
                "(SGRAF is the average of a trained SGR and SAF, see SgrafEnsemble)"
            )
        if self.usa_pooling not in USA_POOLINGS:
            raise ValueError(f"SgrafConfig.usa_pooling={self.usa_pooling!r}: expected one of {USA_POOLINGS}")
        for name in ("vocab_size", "word_dim", "embed_size", "img_dim", "num_regions", "sim_dim", "num_layers",
                     "caption_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SgrafConfig.{name}={getattr(self, name)} must be a positive integer")
        if self.module_name == "SGR" and self.sgr_step < 1:
            raise ValueError(f"SgrafConfig.sgr_step={self.sgr_step} must be >= 1 for SGR")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SgrafConfig.dropout={self.dropout} must be in [0, 1)")
