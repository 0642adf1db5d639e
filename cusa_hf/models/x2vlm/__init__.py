"""X2-VLM (Zeng et al. 2023) as a native transformers-style backbone: ``configuration_x2vlm``, ``modeling_x2vlm``,
``processing_x2vlm``, its CUSA adapter and ITM reranking (``adapter``) and the checkpoint converter (``convert``).

Importing the package registers the config, model and processor with the Auto classes (and, through ``adapter``, the
backbone adapter); import each name from its module.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from . import adapter  # noqa: F401  registers X2VlmAdapter
from .configuration_x2vlm import X2VlmConfig
from .modeling_x2vlm import X2VlmModel
from .processing_x2vlm import X2VlmProcessor

AutoConfig.register(X2VlmConfig.model_type, X2VlmConfig, exist_ok=True)
AutoModel.register(X2VlmConfig, X2VlmModel, exist_ok=True)
AutoProcessor.register(X2VlmConfig, X2VlmProcessor, exist_ok=True)
