"""Native backbones absent from transformers and adapters for transformers models; importing this package
registers their Auto classes, CUSA backbone adapters and run recipes (the built-in student's among them)."""

from . import blip_adapter, builtin_student, x2vlm  # noqa: F401
from . import sgraf  # noqa: F401
