"""cusa-hf: CUSA soft-label alignment for Hugging Face image-text retrieval models."""

from transformers import AutoConfig, AutoModel

from .arguments import CusaTrainingArguments
from .backbones import (
    BackboneAdapter,
    BackboneFeatures,
    adapter_class_for,
    dual_encoder_config,
    dual_encoder_from_towers,
    register_backbone_adapter,
    rerank_factory,
    sentence_transformer_text_tower,
    supported_model_types,
)
from .configuration_cusa import CusaConfig
from .data import load_hub_dataset, load_imagefolder_dataset, load_json_dataset, load_retrieval_dataset
from .eval_view import build_eval_view
from .evaluation import (
    RerankConfig,
    RetrievalEvaluator,
    eccv_metrics,
    encode_images,
    encode_texts,
    evaluate_retrieval,
    image_retrieval_r1,
    pairwise_similarity,
    rerank_with_itm,
    retrieval_metrics,
    sts_spearman,
)
from .frozen_towers import add_image_tower_features, add_text_tower_features, freeze_tower
from .losses import CusaLoss
from .modeling_cusa import CusaModel, CusaOutput
from .search import RetrievalIndex
from .teachers import add_teacher_features, check_teacher_features, read_teacher_provenance
from .trainer import CusaDataCollator, CusaTrainer, cusa_training_arguments
from . import models  # noqa: E402,F401  registers the X2VLM, BLIP and SGR/SAF adapters and Auto classes

__version__ = "0.1.0"

AutoConfig.register(CusaConfig.model_type, CusaConfig, exist_ok=True)
AutoModel.register(CusaConfig, CusaModel, exist_ok=True)
# Saved checkpoints carry an auto_map, so they load with trust_remote_code where cusa_hf is not installed.
CusaConfig.register_for_auto_class()
CusaModel.register_for_auto_class("AutoModel")

__all__ = [
    "BackboneAdapter",
    "BackboneFeatures",
    "CusaConfig",
    "CusaDataCollator",
    "CusaLoss",
    "CusaModel",
    "CusaOutput",
    "CusaTrainer",
    "CusaTrainingArguments",
    "RerankConfig",
    "RetrievalEvaluator",
    "RetrievalIndex",
    "adapter_class_for",
    "add_image_tower_features",
    "add_text_tower_features",
    "add_teacher_features",
    "build_eval_view",
    "check_teacher_features",
    "cusa_training_arguments",
    "dual_encoder_config",
    "dual_encoder_from_towers",
    "eccv_metrics",
    "freeze_tower",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "image_retrieval_r1",
    "load_hub_dataset",
    "load_imagefolder_dataset",
    "load_json_dataset",
    "load_retrieval_dataset",
    "pairwise_similarity",
    "read_teacher_provenance",
    "register_backbone_adapter",
    "rerank_factory",
    "rerank_with_itm",
    "sentence_transformer_text_tower",
    "retrieval_metrics",
    "sts_spearman",
    "supported_model_types",
]
