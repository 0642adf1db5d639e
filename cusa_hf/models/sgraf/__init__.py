"""SGR / SAF / SGRAF (Diao et al., AAAI 2021) as native cusa-hf backbones: ``configuration_sgraf``,
``modeling_sgraf``, ``tokenization_sgraf``, the CUSA adapter (``adapter``), region features (``features``), pairwise
evaluation (``evaluation``), a run's data (``training_data``), the run recipe (``recipe``) and the checkpoint
converter (``convert``).

Importing the package registers the config, model and tokenizer with the Auto classes (and, through ``adapter``, the
backbone adapter and, through ``recipe``, the run recipe); import each name from its module.
"""

from transformers import AutoConfig, AutoModel, AutoTokenizer

from . import adapter  # noqa: F401  registers SgrafAdapter
from . import recipe  # noqa: F401  registers SgrafRecipe
from .configuration_sgraf import SgrafConfig
from .modeling_sgraf import SgrafModel
from .tokenization_sgraf import SgrafTokenizer

AutoConfig.register("sgraf", SgrafConfig)
AutoModel.register(SgrafConfig, SgrafModel)
AutoTokenizer.register(SgrafConfig, slow_tokenizer_class=SgrafTokenizer)
