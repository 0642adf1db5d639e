"""SGR / SAF / SGRAF (Diao et al., AAAI 2021) as native cusa-hf backbones."""

from transformers import AutoConfig, AutoModel

from .configuration_sgraf import SgrafConfig
from .modeling_sgraf import SgrafEnsemble, SgrafModel, SgrafOutput, SgrafPreTrainedModel, hinge_triplet_loss

AutoConfig.register("sgraf", SgrafConfig)
AutoModel.register(SgrafConfig, SgrafModel)

__all__ = [
    "SgrafConfig",
    "SgrafEnsemble",
    "SgrafModel",
    "SgrafOutput",
    "SgrafPreTrainedModel",
    "hinge_triplet_loss",
]
