"""X2-VLM (Zeng et al. 2023) as a native transformers-style backbone, registered with the Auto classes and CUSA."""

from transformers import AutoConfig, AutoModel, AutoProcessor

from ..fusion_losses import itc_loss as x2vlm_contrastive_loss  # its name before BLIP shared it
from ..fusion_losses import sample_hard_negatives
from .adapter import X2VlmAdapter, X2VlmItmScorer, x2vlm_rerank_config
from .configuration_x2vlm import X2VLM_PRESETS, X2VlmConfig, X2VlmTextConfig, X2VlmVisionConfig
from .modeling_x2vlm import X2VlmModel, X2VlmOutput, X2VlmPreTrainedModel
from .processing_x2vlm import X2VlmProcessor, pre_caption

AutoConfig.register(X2VlmConfig.model_type, X2VlmConfig, exist_ok=True)
AutoModel.register(X2VlmConfig, X2VlmModel, exist_ok=True)
AutoProcessor.register(X2VlmConfig, X2VlmProcessor, exist_ok=True)

__all__ = [
    "X2VLM_PRESETS",
    "X2VlmAdapter",
    "X2VlmConfig",
    "X2VlmItmScorer",
    "X2VlmModel",
    "X2VlmOutput",
    "X2VlmPreTrainedModel",
    "X2VlmProcessor",
    "X2VlmTextConfig",
    "X2VlmVisionConfig",
    "pre_caption",
    "sample_hard_negatives",
    "x2vlm_contrastive_loss",
    "x2vlm_rerank_config",
]
