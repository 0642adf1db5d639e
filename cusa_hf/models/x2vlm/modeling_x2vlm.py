"""PyTorch X2-VLM for image-text retrieval: BEiT-v2 vision encoder, BERT text encoder, fusion encoder, ITC + ITM.

A native port of the retrieval model of zengyan-97/X2-VLM (``XVLMForRetrieval``). Sub-module names follow the
original where that keeps the checkpoint conversion a rename (``blocks.i.attn.qkv``, ``gamma_1``,
``attention.self.query``, ``itm_head.0``); ``docs/fusion_backbones.md`` lists every detail that changes numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from ...distributed import gather_with_grad
from ..fusion_losses import hard_negative_itm_loss, itc_loss, sample_hard_negatives
from .configuration_x2vlm import X2VlmConfig, X2VlmTextConfig, X2VlmVisionConfig

# xbert turns padding into an additive -10000 (not -inf): a fully padded row then stays finite.
TEXT_MASK_VALUE = -10000.0


def beit_relative_position_index(grid_size: int) -> torch.Tensor:
    """`(grid_size**2 + 1, grid_size**2 + 1)` long tensor indexing BEiT's relative-position table.

    Patch pairs index the `(2G-1)^2` relative offsets (row offset major); the CLS token uses the three extra rows:
    CLS query -> any key is row `(2G-1)^2`, patch query -> CLS key is the next one, CLS -> CLS the last.
    """
    span = 2 * grid_size - 1
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, P)
    offsets = coords[:, :, None] - coords[:, None, :] + (grid_size - 1)  # (2, P, P), each in [0, 2G-2]
    num_patches = grid_size * grid_size
    index = torch.empty(num_patches + 1, num_patches + 1, dtype=torch.long)
    index[1:, 1:] = offsets[0] * span + offsets[1]
    index[0, :] = span * span
    index[:, 0] = span * span + 1
    index[0, 0] = span * span + 2
    return index


def drop_path(hidden_states: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples' residual branch with probability ``rate`` and rescale the rest."""
    if rate == 0.0 or not training:
        return hidden_states
    keep = 1.0 - rate
    mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.dim() - 1)).bernoulli_(keep)
    return hidden_states * mask / keep


# ----------------------------------------------------------------------------------------------------------------
# Vision encoder (BEiT-v2)
# ----------------------------------------------------------------------------------------------------------------


class X2VlmPatchEmbed(nn.Module):
    def __init__(self, config: X2VlmVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, (H/p)*(W/p), D)` patch tokens, row-major."""
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class X2VlmVisionAttention(nn.Module):
    """BEiT-v2 attention: fused qkv weight, learned q and v biases (keys have none), a per-block relative bias."""

    def __init__(self, config: X2VlmVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        span = 2 * config.grid_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(span * span + 3, self.num_heads))
        self.register_buffer(
            "relative_position_index", beit_relative_position_index(config.grid_size), persistent=False
        )
        self.proj = nn.Linear(width, width)

    def relative_position_bias(self) -> torch.Tensor:
        """`(num_heads, T, T)` additive attention bias, T = patches + 1."""
        tokens = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden_states.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(hidden_states, self.qkv.weight, qkv_bias)
        query, key, value = qkv.view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias().unsqueeze(0).to(query.dtype)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        return self.proj(context.transpose(1, 2).reshape(batch, tokens, width))


class X2VlmVisionMlp(nn.Module):
    def __init__(self, config: X2VlmVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class X2VlmVisionBlock(nn.Module):
    """Pre-norm block with layer scale: ``x + gamma_1 * attn(norm1(x))``, then ``x + gamma_2 * mlp(norm2(x))``."""

    def __init__(self, config: X2VlmVisionConfig, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = X2VlmVisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = X2VlmVisionMlp(config)
        self.gamma_1 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init_value))
        self.gamma_2 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init_value))
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attended = self.gamma_1 * self.attn(self.norm1(hidden_states))
        hidden_states = hidden_states + drop_path(attended, self.drop_path_rate, self.training)
        transformed = self.gamma_2 * self.mlp(self.norm2(hidden_states))
        return hidden_states + drop_path(transformed, self.drop_path_rate, self.training)


class X2VlmVisionModel(nn.Module):
    """BEiT-v2 encoder whose output replaces CLS by the mean of the normed patch tokens.

    ``forward(pixel_values (B, C, S, S)) -> (B, 1 + N, D)``: ``[mean_n fc_norm(patch_n), fc_norm(patch_1..N)]``.
    """

    def __init__(self, config: X2VlmVisionConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embed = X2VlmPatchEmbed(config)
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.blocks = nn.ModuleList(X2VlmVisionBlock(config, rate) for rate in rates)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-3:]) != (self.config.num_channels, size, size):
            raise ValueError(
                f"X2VlmVisionModel expects pixel_values of shape (batch, {self.config.num_channels}, {size}, {size}) "
                f"(the relative-position tables are fixed to image_size={size}); got {tuple(pixel_values.shape)}. "
                "Resize the images, or convert the checkpoint with "
                "cusa_hf.models.x2vlm.convert.convert_checkpoint(..., image_size=N) to change the resolution."
            )
        patches = self.patch_embed(pixel_values)
        hidden_states = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype), patches], 1)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        patches = self.fc_norm(hidden_states[:, 1:])
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Text and fusion encoders (BERT layers; fusion layers add cross-attention with bidirectional self-attention)
# ----------------------------------------------------------------------------------------------------------------


class X2VlmTextEmbeddings(nn.Module):
    def __init__(self, config: X2VlmTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"input_ids has {length} tokens but X2-VLM has {self.position_embeddings.num_embeddings} positions"
            )
        positions = torch.arange(length, device=input_ids.device)
        # X2-VLM always uses token type 0.
        embeddings = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(embeddings))


class X2VlmTextSelfAttention(nn.Module):
    """Multi-head attention of a query sequence over itself, or over ``key_value_states`` of width ``key_width``."""

    def __init__(self, config: X2VlmTextConfig, key_width: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_width, config.hidden_size)
        self.value = nn.Linear(key_width, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.view(states.shape[0], states.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        additive_mask: torch.Tensor | None,
        key_value_states: torch.Tensor | None = None,
        key_value_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        source = hidden_states if key_value_states is None else key_value_states
        query = self._heads(self.query(hidden_states))
        key, value = self._heads(self.key(source)), self._heads(self.value(source))
        if key_value_index is not None:
            # Keys/values of each distinct image are computed once, then indexed per pair (reranking scores one
            # image against k texts; the 577-token K/V projections dominate the fusion cost).
            key, value = key[key_value_index], value[key_value_index]
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=additive_mask, dropout_p=self.dropout_prob if self.training else 0.0
        )
        return context.transpose(1, 2).flatten(2)


class X2VlmTextSelfOutput(nn.Module):
    def __init__(self, config: X2VlmTextConfig, input_size: int):
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class X2VlmTextAttention(nn.Module):
    def __init__(self, config: X2VlmTextConfig, key_width: int):
        super().__init__()
        self.self = X2VlmTextSelfAttention(config, key_width)
        self.output = X2VlmTextSelfOutput(config, config.hidden_size)

    def forward(self, hidden_states, additive_mask, key_value_states=None, key_value_index=None) -> torch.Tensor:
        return self.output(self.self(hidden_states, additive_mask, key_value_states, key_value_index), hidden_states)


class X2VlmTextIntermediate(nn.Module):
    def __init__(self, config: X2VlmTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden_states))


class X2VlmTextLayer(nn.Module):
    """A post-norm BERT layer; with ``cross_attention`` it attends to an image sequence after self-attention.

    Self-attention is bidirectional in both kinds of layer (transformers' ``BertLayer`` only allows
    cross-attention in causal decoders, which is why X2-VLM needs its own layer).
    """

    def __init__(self, config: X2VlmTextConfig, cross_attention: bool):
        super().__init__()
        self.attention = X2VlmTextAttention(config, config.hidden_size)
        self.crossattention = X2VlmTextAttention(config, config.encoder_width) if cross_attention else None
        self.intermediate = X2VlmTextIntermediate(config)
        self.output = X2VlmTextSelfOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        additive_mask: torch.Tensor,
        image_sequence: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = self.attention(hidden_states, additive_mask)
        if self.crossattention is not None:
            # The image mask is all ones in X2-VLM, so cross-attention is unmasked.
            hidden_states = self.crossattention(hidden_states, None, image_sequence, image_index)
        return self.output(self.intermediate(hidden_states), hidden_states)


def text_additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(B, L)` 1/0 mask -> `(B, 1, 1, L)` additive mask with -10000 on padding, as xbert computes it."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * TEXT_MASK_VALUE


class X2VlmTextModel(nn.Module):
    """Embeddings + the text layers. ``forward(input_ids (B, L), attention_mask (B, L)) -> (B, L, D_text)``."""

    def __init__(self, config: X2VlmTextConfig):
        super().__init__()
        self.embeddings = X2VlmTextEmbeddings(config)
        self.layer = nn.ModuleList(X2VlmTextLayer(config, cross_attention=False) for _ in range(config.num_text_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embeddings(input_ids)
        additive_mask = text_additive_mask(attention_mask, hidden_states.dtype)
        for layer in self.layer:
            hidden_states = layer(hidden_states, additive_mask)
        return hidden_states


class X2VlmFusionModel(nn.Module):
    """The fusion layers: text hidden states attend to themselves and to the image sequence.

    ``forward(text_sequence (B, L, D_text), attention_mask (B, L), image_sequence (M, 1+N, D_vision),
    image_index (B,) or None) -> (B, L, D_text)``; text b attends to ``image_sequence[image_index[b]]`` (to
    ``image_sequence[b]`` when ``image_index`` is None).
    """

    def __init__(self, config: X2VlmTextConfig):
        super().__init__()
        self.layer = nn.ModuleList(X2VlmTextLayer(config, cross_attention=True) for _ in range(config.num_fusion_layers))

    def forward(self, text_sequence, attention_mask, image_sequence, image_index=None) -> torch.Tensor:
        additive_mask = text_additive_mask(attention_mask, text_sequence.dtype)
        hidden_states = text_sequence
        for layer in self.layer:
            hidden_states = layer(hidden_states, additive_mask, image_sequence, image_index)
        return hidden_states


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class X2VlmOutput(ModelOutput):
    """Output of [`X2VlmModel.forward`].

    Args:
        loss: `()` ``loss_itc + loss_itm`` when ``return_loss``.
        loss_itc: `()` image-text contrastive loss with image-id soft targets.
        loss_itm: `()` image-text matching loss with one hard negative image and text per pair.
        logits_per_image: `(B_image, B_text)` ``cosine / temp``.
        logits_per_text: `(B_text, B_image)` its transpose.
        image_embeds: `(B, embed_dim)` L2-normalised ITC image features.
        text_embeds: `(B, embed_dim)` L2-normalised ITC text features.
        image_sequence: `(B, 1 + N, D_vision)` vision-encoder output (mean token first), what ITM attends to.
        text_sequence: `(B, L, D_text)` text-encoder output, the fusion encoder's input.
    """

    loss: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_sequence: torch.Tensor | None = None
    text_sequence: torch.Tensor | None = None


class X2VlmPreTrainedModel(PreTrainedModel):
    config: X2VlmConfig
    config_class = X2VlmConfig
    base_model_prefix = "x2vlm"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["X2VlmVisionBlock", "X2VlmTextLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, X2VlmVisionAttention):
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
            init.zeros_(module.relative_position_bias_table)
            # Non-persistent buffer: rebuilt here because from_pretrained materialises modules without it.
            grid = int(math.isqrt(module.relative_position_index.shape[0] - 1))
            init.copy_(module.relative_position_index, beit_relative_position_index(grid))
        elif isinstance(module, X2VlmVisionBlock):
            init.constant_(module.gamma_1, self.config.vision_config.layer_scale_init_value)
            init.constant_(module.gamma_2, self.config.vision_config.layer_scale_init_value)
        elif isinstance(module, X2VlmVisionModel):
            init.trunc_normal_(module.cls_token, std=self.config.vision_config.initializer_range)
        elif isinstance(module, X2VlmModel):
            init.constant_(module.temp, self.config.temp)


class X2VlmModel(X2VlmPreTrainedModel):
    """X2-VLM retrieval model: dual encoders for ITC ranking and a fusion encoder + ITM head for reranking.

    Example::

        config = X2VlmConfig.from_preset("x2vlm-base")
        model = X2VlmModel(config)
        image_embeds = model.get_image_features(pixel_values)           # (B, 256), L2-normalised
        text_embeds = model.get_text_features(input_ids, attention_mask)
        scores = model.itm_score(image_sequence, text_sequence, attention_mask)  # raw match logits
    """

    def __init__(self, config: X2VlmConfig):
        super().__init__(config)
        text_width = config.text_config.hidden_size
        self.vision_model = X2VlmVisionModel(config.vision_config)
        self.text_model = X2VlmTextModel(config.text_config)
        self.fusion_model = X2VlmFusionModel(config.text_config)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(config.temp))
        # Indices 0, 1, 3 as in the original's Sequential(Linear, LayerNorm, GELU, Linear); LayerNorm eps is torch's 1e-5.
        self.itm_head = nn.Sequential(
            nn.Linear(text_width, 2 * text_width), nn.LayerNorm(2 * text_width), nn.GELU(), nn.Linear(2 * text_width, 2)
        )
        self.post_init()

    # -- encoders ---------------------------------------------------------------------------------------------

    def get_image_sequence(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, 3, S, S)` -> `(B, 1 + N, D_vision)`: mean of normed patches, then the normed patches."""
        return self.vision_model(pixel_values)

    def get_text_sequence(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, L)` token ids -> `(B, L, D_text)` output of the last text layer."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.text_model(input_ids, attention_mask)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_sequence: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """`(B, embed_dim)` ITC image features ``vision_proj(sequence[:, 0])``, L2-normalised unless told otherwise.

        Pass ``image_sequence`` (from :meth:`get_image_sequence`) to skip the vision encoder.
        """
        if image_sequence is None:
            if pixel_values is None:
                raise ValueError("get_image_features needs pixel_values or image_sequence")
            image_sequence = self.get_image_sequence(pixel_values)
        features = self.vision_proj(image_sequence[:, 0])
        return F.normalize(features, dim=-1) if normalize else features

    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_sequence: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """`(B, embed_dim)` ITC text features ``text_proj(sequence[:, 0])`` (the [CLS] token), L2-normalised unless
        told otherwise. Pass ``text_sequence`` (from :meth:`get_text_sequence`) to skip the text encoder."""
        if text_sequence is None:
            if input_ids is None:
                raise ValueError("get_text_features needs input_ids or text_sequence")
            text_sequence = self.get_text_sequence(input_ids, attention_mask)
        features = self.text_proj(text_sequence[:, 0])
        return F.normalize(features, dim=-1) if normalize else features

    def fuse(
        self,
        image_sequence: torch.Tensor,
        text_sequence: torch.Tensor,
        text_attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fusion-encoder output `(B, L, D_text)` of image-text pairs.

        Args:
            image_sequence: `(B, 1 + N, D_vision)` aligned with the texts, or `(M, 1 + N, D_vision)` with
                ``image_index``.
            text_sequence: `(B, L, D_text)` text-encoder outputs.
            text_attention_mask: `(B, L)` 1 for tokens, 0 for padding.
            image_index: `(B,)` long, text b is paired with ``image_sequence[image_index[b]]``; each distinct image's
                cross-attention keys/values are then computed once.
        """
        expected = text_sequence.shape[0] if image_index is None else image_index.shape[0]
        if image_index is None and image_sequence.shape[0] != expected or text_sequence.shape[0] != expected:
            raise ValueError(
                f"fuse: {image_sequence.shape[0]} image sequences, {text_sequence.shape[0]} texts and "
                f"image_index of {None if image_index is None else image_index.shape[0]} entries do not pair up"
            )
        return self.fusion_model(text_sequence, text_attention_mask, image_sequence, image_index)

    def itm_logits(self, image_sequence, text_sequence, text_attention_mask, image_index=None) -> torch.Tensor:
        """`(B, 2)` ITM logits of the fusion [CLS] token; column 1 is "match". Arguments as in :meth:`fuse`."""
        return self.itm_head(self.fuse(image_sequence, text_sequence, text_attention_mask, image_index)[:, 0])

    def itm_score(self, image_sequence, text_sequence, text_attention_mask, image_index=None) -> torch.Tensor:
        """`(B,)` raw match logit ``itm_logits[:, 1]``, the score X2-VLM reranks with (no softmax, no ITC added)."""
        return self.itm_logits(image_sequence, text_sequence, text_attention_mask, image_index)[:, 1]

    # -- losses -----------------------------------------------------------------------------------------------

    def clamp_temperature_(self) -> None:
        """Clamp ``temp`` in place to ``[temp_min, temp_max]``, as the original does at every training forward."""
        with torch.no_grad():
            self.temp.clamp_(self.config.temp_min, self.config.temp_max)

    def contrastive_loss(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] = gather_with_grad,
    ) -> torch.Tensor:
        """ITC with ``temp`` over the global batch (features and ids gathered across processes), see
        :func:`~cusa_hf.models.fusion_losses.itc_loss`."""
        return itc_loss(image_embeds, text_embeds, self.temp, image_ids, gather)

    def matching_loss(
        self,
        image_sequence: torch.Tensor,
        text_sequence: torch.Tensor,
        text_attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """ITM cross-entropy over B positives and 2B hard negatives of the local batch, see
        :func:`~cusa_hf.models.fusion_losses.hard_negative_itm_loss`. ``negatives`` (from
        :func:`~cusa_hf.models.fusion_losses.sample_hard_negatives`) fixes the draw.
        """
        if negatives is None:
            negatives = sample_hard_negatives(image_embeds, text_embeds, self.temp, image_ids, generator)

        def pair_itm_logits(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
            # image_index goes to the fusion encoder: each image's cross-attention keys/values are computed once.
            texts, masks = text_sequence[text_index], text_attention_mask[text_index]
            return self.itm_logits(image_sequence, texts, masks, image_index)

        return hard_negative_itm_loss(pair_itm_logits, negatives)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> X2VlmOutput:
        """Encode B aligned image-text pairs; with ``return_loss`` add X2-VLM's fine-tuning loss ITC + ITM.

        Args:
            pixel_values: `(B, 3, S, S)` normalised images.
            input_ids, attention_mask: `(B, L)` tokenised captions.
            image_ids: `(B,)` ids making same-image captions ITC positives and excluding them as ITM negatives.
            return_loss: compute the loss (default: when training).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if return_loss is None:
            return_loss = self.training
        if self.training:
            self.clamp_temperature_()
        image_sequence = self.get_image_sequence(pixel_values)
        text_sequence = self.get_text_sequence(input_ids, attention_mask)
        image_embeds = self.get_image_features(image_sequence=image_sequence)
        text_embeds = self.get_text_features(text_sequence=text_sequence)
        logits_per_image = image_embeds @ text_embeds.t() / self.temp
        loss = loss_itc = loss_itm = None
        if return_loss:
            loss_itc = self.contrastive_loss(image_embeds, text_embeds, image_ids)
            loss_itm = self.matching_loss(
                image_sequence, text_sequence, attention_mask, image_embeds, text_embeds, image_ids
            )
            loss = loss_itc + loss_itm
        return X2VlmOutput(
            loss=loss,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            image_sequence=image_sequence,
            text_sequence=text_sequence,
        )


__all__ = [
    "X2VlmModel",
    "X2VlmOutput",
    "X2VlmPreTrainedModel",
    "beit_relative_position_index",
]
