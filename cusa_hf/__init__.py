"""cusa-hf: CUSA soft-label alignment for Hugging Face image-text retrieval models."""

from transformers import AutoConfig, AutoModel

from .arguments import CusaTrainingArguments
from .backbone_recipes import BackboneRecipe, backbone_recipe, register_backbone_recipe
from .backbones import (
    BackboneAdapter,
    BackboneFeatures,
    RerankConfig,
    adapter_class_for,
    dual_encoder_config,
    dual_encoder_from_towers,
    register_backbone_adapter,
    rerank_factory,
    sentence_transformer_text_tower,
    supported_model_types,
)
from .collator import CusaDataCollator
from .configuration_cusa import CusaConfig
from .data import load_hub_dataset, load_imagefolder_dataset, load_json_dataset, load_retrieval_dataset
from .evaluation.eval_view import build_eval_view
from .evaluation.eccv import eccv_metrics
from .evaluation.encoding import encode_images, encode_texts, evaluate_retrieval
from .evaluation.evaluator import Evaluator, RetrievalEvaluator, SequentialEvaluator
from .evaluation.metrics import retrieval_metrics
from .evaluation.reranking import pairwise_similarity, rerank_with_itm
from .evaluation.unimodal import image_retrieval_r1, sts_spearman
from .export import save_sentence_transformer
from .models.builtin_student import builtin_backbone, builtin_processor
from .frozen_towers import add_image_tower_features, add_text_tower_features, freeze_tower
from .losses import CusaLoss
from .modeling_cusa import CusaModel, CusaOutput
from .search import RetrievalIndex
from .teachers.training_split import check_teacher_features
from .teachers.features import add_teacher_features
from .teachers.provenance import read_feature_provenance
from .trainer import CusaTrainer, cusa_training_arguments
from .version import __version__
from . import models  # noqa: E402,F401  registers the X2VLM, BLIP and SGR/SAF adapters and Auto classes

AutoConfig.register(CusaConfig.model_type, CusaConfig, exist_ok=True)
AutoModel.register(CusaConfig, CusaModel, exist_ok=True)
# Saved checkpoints carry an auto_map, so they load with trust_remote_code where cusa_hf is not installed.
CusaConfig.register_for_auto_class()
CusaModel.register_for_auto_class("AutoModel")

__all__ = [
    "BackboneAdapter",
    "BackboneFeatures",
    "BackboneRecipe",
    "CusaConfig",
    "CusaDataCollator",
    "CusaLoss",
    "CusaModel",
    "CusaOutput",
    "CusaTrainer",
    "CusaTrainingArguments",
    "Evaluator",
    "RerankConfig",
    "RetrievalEvaluator",
    "RetrievalIndex",
    "SequentialEvaluator",
    "adapter_class_for",
    "add_image_tower_features",
    "add_text_tower_features",
    "add_teacher_features",
    "backbone_recipe",
    "build_eval_view",
    "builtin_backbone",
    "builtin_processor",
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
    "read_feature_provenance",
    "register_backbone_adapter",
    "register_backbone_recipe",
    "rerank_factory",
    "rerank_with_itm",
    "sentence_transformer_text_tower",
    "retrieval_metrics",
    "save_sentence_transformer",
    "sts_spearman",
    "supported_model_types",
]
