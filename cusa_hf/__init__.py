"""cusa-hf: CUSA soft-label alignment for Hugging Face image-text retrieval models."""

from transformers import AutoConfig, AutoModel

from .backbones import (
    BackboneAdapter,
    BackboneFeatures,
    adapter_class_for,
    dual_encoder_config,
    dual_encoder_from_towers,
    register_backbone_adapter,
    supported_model_types,
)
from .configuration_cusa import CusaConfig
from .modeling_cusa import CusaModel, CusaOutput
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
    "CusaModel",
    "CusaOutput",
    "adapter_class_for",
    "dual_encoder_config",
    "dual_encoder_from_towers",
    "register_backbone_adapter",
    "supported_model_types",
]
