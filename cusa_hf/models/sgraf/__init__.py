"""SGR / SAF / SGRAF (Diao et al., AAAI 2021) as native cusa-hf backbones."""

from transformers import AutoConfig, AutoModel, AutoTokenizer

from .adapter import SgrafAdapter
from .configuration_sgraf import SgrafConfig
from .evaluation import sgraf_pairwise_scorer
from .modeling_sgraf import SgrafEnsemble, SgrafModel, SgrafOutput, SgrafPreTrainedModel, hinge_triplet_loss
from .tokenization_sgraf import SgrafTokenizer

AutoConfig.register("sgraf", SgrafConfig)
AutoModel.register(SgrafConfig, SgrafModel)
AutoTokenizer.register(SgrafConfig, slow_tokenizer_class=SgrafTokenizer)

__all__ = [
    "SgrafAdapter",
    "SgrafConfig",
    "SgrafEnsemble",
    "SgrafModel",
    "SgrafOutput",
    "SgrafPreTrainedModel",
    "SgrafTokenizer",
    "hinge_triplet_loss",
    "sgraf_pairwise_scorer",
]
