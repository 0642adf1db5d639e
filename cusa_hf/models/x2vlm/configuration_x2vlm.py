"""X2-VLM configuration: a BEiT-v2 vision encoder, a BERT text encoder and a BERT-style fusion encoder.

X2-VLM (Zeng et al., "X²-VLM: All-In-One Pre-trained Model For Vision-Language Tasks", TPAMI 2023) is not part of
``transformers``. The presets below are the retrieval models of the original code at 384 px (see
``docs/fusion_backbones.md``).
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class X2VlmVisionConfig(PreTrainedConfig):
    r"""Configuration of the BEiT-v2 image encoder of X2-VLM.

    Args:
        hidden_size: width of the patch tokens (768 base, 1024 large).
        num_hidden_layers: number of transformer blocks (12 base, 24 large).
        num_attention_heads: attention heads per block (12 base, 16 large).
        intermediate_size: hidden width of the MLP (4 x hidden_size).
        image_size: side of the square input image in pixels; fixes the relative-position tables'
            size `(2 * image_size / patch_size - 1) ** 2 + 3`.
        patch_size: side of a square patch in pixels.
        num_channels: input channels.
        layer_norm_eps: epsilon of every LayerNorm of the vision tower (BEiT-v2 uses 1e-6).
        layer_scale_init_value: initial value of the per-channel layer scale ``gamma_1``/``gamma_2``.
        drop_path_rate: stochastic depth rate of the last block (linearly increasing from 0 over blocks).
        initializer_range: std of the truncated-normal initialisation of linear layers and the CLS token.
    """

    model_type = "x2vlm_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    layer_scale_init_value: float = 0.1
    drop_path_rate: float = 0.1
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"X2VlmVisionConfig: hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"X2VlmVisionConfig: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per image side (24 at 384 px with 16 px patches)."""
        return self.image_size // self.patch_size


class X2VlmTextConfig(PreTrainedConfig):
    r"""Configuration of X2-VLM's text encoder (BERT layers) and fusion encoder (BERT layers with cross-attention).

    The original keeps both in one 18-layer xbert ``BertModel``: layers ``[0, num_text_layers)`` encode text, the
    following ``num_fusion_layers`` layers attend to the image sequence (bidirectional self-attention, then
    cross-attention, then the feed-forward block).

    Args:
        vocab_size: size of the (uncased BERT) vocabulary.
        hidden_size: width of the text and fusion layers (768 base, 1024 large).
        num_text_layers: text-encoder layers (12).
        num_fusion_layers: fusion-encoder layers (6).
        num_attention_heads: attention heads of every text and fusion layer.
        intermediate_size: hidden width of the feed-forward block.
        encoder_width: width of the image sequence the fusion layers' cross-attention keys/values read; set by
            ``X2VlmConfig`` to the vision tower's ``hidden_size``.
        hidden_act: activation of the feed-forward block ("gelu" is the exact erf GELU).
        hidden_dropout_prob: dropout after embeddings and every projection.
        attention_probs_dropout_prob: dropout on attention probabilities.
        max_position_embeddings: length of the learned absolute position table.
        type_vocab_size: number of token types (X2-VLM always uses type 0).
        layer_norm_eps: epsilon of the BERT LayerNorms (1e-12).
        pad_token_id: id of the padding token.
        initializer_range: std of the normal initialisation.
    """

    model_type = "x2vlm_text_model"
    base_config_key = "text_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_text_layers: int = 12
    num_fusion_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    encoder_width: int = 768
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"X2VlmTextConfig: hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_text_layers < 1 or self.num_fusion_layers < 1:
            raise ValueError(
                "X2VlmTextConfig: num_text_layers and num_fusion_layers must be >= 1, got "
                f"{self.num_text_layers} and {self.num_fusion_layers}"
            )


class X2VlmConfig(PreTrainedConfig):
    r"""Configuration of [`X2VlmModel`], the X2-VLM image-text retrieval model (ITC + ITM).

    Args:
        vision_config: an [`X2VlmVisionConfig`] or a dict of its fields.
        text_config: an [`X2VlmTextConfig`] or a dict of its fields; its ``encoder_width`` is set to the vision width.
        embed_dim: width of the ITC projections ``vision_proj``/``text_proj`` (256).
        temp: initial ITC temperature; logits are ``cosine / temp`` (0.07).
        temp_min, temp_max: the temperature is clamped to this range at every training forward ([0.001, 0.5]).
        k_test: candidates per query rescored by the ITM head at evaluation (256 COCO, 128 Flickr30K).
        max_text_length: tokenizer ``max_length`` (40).

    Presets: ``X2VlmConfig.from_preset("x2vlm-base")`` and ``"x2vlm-large"`` (both at 384 px).
    """

    model_type = "x2vlm"
    sub_configs_defaults = {"vision_config": X2VlmVisionConfig, "text_config": X2VlmTextConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    embed_dim: int = 256
    temp: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    k_test: int = 256
    max_text_length: int = 40
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The fusion layers' cross-attention reads the image sequence, so its key/value input width is the vision width.
        self.text_config.encoder_width = self.vision_config.hidden_size
        if not self.temp_min <= self.temp <= self.temp_max:
            raise ValueError(
                f"X2VlmConfig: temp={self.temp} is outside [temp_min, temp_max] = [{self.temp_min}, {self.temp_max}]"
            )
        if self.k_test < 1:
            raise ValueError(f"X2VlmConfig: k_test must be >= 1, got {self.k_test}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "X2VlmConfig":
        """The configuration of a released X2-VLM size ("x2vlm-base" or "x2vlm-large"), 384 px, with ``overrides``
        applied to the top-level fields."""
        try:
            vision, text = X2VLM_PRESETS[name]
        except KeyError:
            raise ValueError(f"Unknown X2-VLM preset {name!r}; choose one of {sorted(X2VLM_PRESETS)}") from None
        return cls(vision_config=dict(vision), text_config=dict(text), **overrides)


# Widths and depths of the original `beit_{base,large}_patch16` towers and `bert-{base,large}-uncased` text configs
# (the large text encoder keeps 12 text layers; X2-VLM adds 6 fusion layers to both sizes).
X2VLM_PRESETS: dict[str, tuple[dict, dict]] = {
    "x2vlm-base": (
        {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
        {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
    ),
    "x2vlm-large": (
        {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
        {"hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
    ),
}

__all__ = ["X2VlmConfig", "X2VlmTextConfig", "X2VlmVisionConfig", "X2VLM_PRESETS"]
