"""A CUSA model as a sentence-transformers model: one folder that ``SentenceTransformer(folder,
trust_remote_code=True)`` loads, whose ``encode`` of captions and of PIL images gives the model's retrieval embeddings,
so ``sentence_transformers.util.semantic_search`` and every sentence-transformers tool use the fine-tuned weights.

The folder is the CUSA checkpoint itself (weights, ``config.json`` with its ``auto_map``, the modeling code that
``save_pretrained`` copies, the processor) plus sentence-transformers' own files. Its only module is
sentence-transformers' stock ``Transformer``, told which model method embeds each modality; it loads the checkpoint
with ``AutoModel`` and ``AutoProcessor``, so no code of cusa-hf is needed to use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .backbones import adapter_class_of
from .configuration_cusa import PACKAGE_ONLY_MODEL_TYPES, CusaConfig

#: The model method that embeds each modality: ``get_text_features`` / ``get_image_features`` with their default
#: ``head="cross"``, which return the normalised retrieval embeddings as one tensor (no output field to pick).
MODALITY_CONFIG = {
    "text": {"method": "get_text_features", "method_output_name": None},
    "image": {"method": "get_image_features", "method_output_name": None},
}


def save_sentence_transformer(model: Any, processor: Any, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save a CLIP or dual-encoder ``CusaModel`` with its processor as a sentence-transformers model in ``folder``.

    ``SentenceTransformer(folder, trust_remote_code=True).encode(captions)`` and ``.encode(pil_images)`` then equal
    ``model.get_text_features`` / ``model.get_image_features`` (``head="cross"``, L2-normalised) of what
    ``processor`` makes of them, also where cusa-hf is not installed (``trust_remote_code`` runs the modeling code
    saved in the folder). The folder still loads with ``CusaModel.from_pretrained`` and ``AutoModel``.

    Args:
        model: the ``CusaModel`` (CLIP, Chinese-CLIP or VisionTextDualEncoder backbone).
        processor: its processor (``image_processor`` + ``tokenizer``), e.g. ``AutoProcessor.from_pretrained`` of the
            checkpoint.
        folder: where to write; created when missing. A folder that already holds anything is refused (the export
            would replace its ``README.md``, ``config.json``, weights...) unless ``overwrite``; the source model's own
            folder (``model.name_or_path``: its card and results) is always refused.
        overwrite: write into a non-empty ``folder``, replacing the files the export writes (others stay).

    Returns:
        The folder.

    Raises:
        FileExistsError: ``folder`` is the model's own folder, or is not empty and ``overwrite`` is not set.

    Example::

        >>> save_sentence_transformer(CusaModel.from_pretrained("out"), AutoProcessor.from_pretrained("out"), "out-st")
        >>> SentenceTransformer("out-st", trust_remote_code=True).encode(["a dog catching a frisbee"])
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Transformer

    if getattr(model.config, "model_type", None) != CusaConfig.model_type:
        raise TypeError(f"model must be a CusaModel, got {type(model).__name__}")
    backbone_type = model.config.backbone_config.model_type
    if backbone_type in PACKAGE_ONLY_MODEL_TYPES:
        raise ValueError(
            f"model has a {backbone_type!r} backbone, whose code lives in cusa_hf.models and does not travel with the "
            "checkpoint; only CLIP and dual-encoder CUSA models export to sentence-transformers"
        )
    folder = Path(folder)
    _check_export_folder(folder, getattr(model, "name_or_path", None), overwrite)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    # Loaded back the way a user's SentenceTransformer(folder, trust_remote_code=True) will load it, then saved by
    # sentence-transformers itself, so its files are those of the installed version.
    remote_code = {"trust_remote_code": True}
    # Inputs made as in training, saved in the folder's module config: captions tokenized as the backbone's adapter
    # does (SigLIP: padded to 64 tokens), images by the image processor's own settings, where the processor class
    # would override them with its defaults (Siglip2Processor's patch_size and max_num_patches).
    tokenization = adapter_class_of(model)
    text_kwargs = {
        "padding": tokenization.text_padding, "truncation": True,
        "max_length": tokenization.caption_length(processor.tokenizer),
    }  # fmt: skip
    image_processor = processor.image_processor
    image_kwargs = {
        name: getattr(image_processor, name)
        for name in getattr(type(processor), "images_kwargs", None) or {}
        if getattr(image_processor, name, None) is not None
    }
    module = Transformer(
        str(folder), model_kwargs=remote_code, processor_kwargs=remote_code, config_kwargs=remote_code,
        modality_config=MODALITY_CONFIG, module_output_name="sentence_embedding", processing_kwargs={"text": text_kwargs, "image": image_kwargs},
    )  # fmt: skip
    SentenceTransformer(modules=[module], device="cpu", similarity_fn_name="cosine").save(str(folder))
    return folder


def _check_export_folder(folder: Path, source: str | None, overwrite: bool) -> None:
    """Refuse to write the export over the source model's folder, or over files in ``folder`` unless asked."""
    if source and os.path.isdir(source) and folder.exists() and os.path.samefile(source, folder):
        raise FileExistsError(
            f"folder={str(folder)!r} is the folder the model was loaded from: the export would replace its model card "
            "(with the run's metrics), config and weights. Export into another folder"
        )
    held = sorted(os.listdir(folder)) if folder.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        raise FileExistsError(
            f"folder={str(folder)!r} is not empty ({shown}): the export would replace files such as README.md and "
            "config.json. Export into an empty or new folder, or pass overwrite=True"
        )
