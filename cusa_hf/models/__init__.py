"""Native backbones absent from transformers and adapters for transformers models; importing this package
registers their Auto classes and CUSA backbone adapters."""

from . import blip_adapter, x2vlm  # noqa: F401
from . import sgraf  # noqa: F401
