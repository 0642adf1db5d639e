"""What a saved search index records about the model and the processor that embedded it (``describe_model``,
``describe_processor``), and how a query's model or processor is told from them: a digest of the weights, the pixel
settings, a digest of the tokenizer. Changing either changes every embedding, so ``cusa_hf.search`` refuses a query
through another."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """What a saved index records about the model that embedded it.

    Returns:
        ``{"name_or_path", "revision", "class", "weights_sha256"}``: the Hub name or the absolute path of a local
        checkpoint (``None`` for a model built in code), the Hub commit hash when transformers knows it, the model
        class, and a SHA-256 digest of the parameters and buffers (names, dtypes, shapes and values), which is what
        decides whether two models give the same embeddings.
    """
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    if name is not None and os.path.isdir(name):
        name = os.path.abspath(name)
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{values.dtype}|{tuple(values.shape)};".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy())
    return {
        "name_or_path": name,
        "revision": getattr(config, "_commit_hash", None),
        "class": type(model).__name__,
        "weights_sha256": digest.hexdigest(),
    }


#: The image processor settings that decide the pixels a model sees, recorded in a saved index.
PIXEL_SETTINGS = (
    "do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_pad",
)  # fmt: skip
#: Text whose tokens show how a tokenizer normalises and splits (case, accents, punctuation, digits).
TOKENIZER_PROBE = "A Dog, CATCHING a frisbee! 1234 Ünïcode café's"


def describe_processor(processor: Any) -> dict[str, Any]:
    """What a saved index records about the processor that prepared its inputs, since a changed processor changes
    every embedding as changed weights do.

    Returns:
        ``{"image": {setting: value}, "tokenizer_sha256": str}``: the image processor's :data:`PIXEL_SETTINGS` it
        has, and a SHA-256 digest of the tokenizer's vocabulary, its maximum length and its tokens of
        :data:`TOKENIZER_PROBE`; a part the processor lacks is ``None``.
    """
    image_processor = getattr(processor, "image_processor", None)
    image = None
    if image_processor is not None:
        image = {}
        for name in PIXEL_SETTINGS:
            value = getattr(image_processor, name, None)
            if value is not None:
                image[name] = json.loads(json.dumps(value, default=lambda item: getattr(item, "value", str(item))))
    tokenizer = getattr(processor, "tokenizer", None)
    tokenizer_sha256 = None
    if tokenizer is not None:
        probe = tokenizer(TOKENIZER_PROBE)["input_ids"]
        described = [sorted(tokenizer.get_vocab().items()), tokenizer.model_max_length, probe]
        tokenizer_sha256 = hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()
    return {"image": image, "tokenizer_sha256": tokenizer_sha256}


def processor_differences(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    differences = []
    recorded_image, actual_image = recorded.get("image") or {}, actual.get("image") or {}
    for name in sorted(set(recorded_image) | set(actual_image)):
        if recorded_image.get(name) != actual_image.get(name):
            was, now = recorded_image.get(name), actual_image.get(name)
            differences.append(f"image processor {name}: index {was!r}, now {now!r}")
    if recorded.get("tokenizer_sha256") != actual.get("tokenizer_sha256"):
        differences.append("the tokenizer (vocabulary, maximum length or how it splits text)")
    return differences


def check_recorded_folder(name: str, info: dict[str, Any]) -> None:
    """A recorded local checkpoint folder (an absolute path) that is gone is named as such, rather than being tried
    as a Hub id."""
    if os.path.isabs(name) and not os.path.isdir(name):
        raise FileNotFoundError(
            f"the index was built with {model_label(info)}, but the folder {name} no longer exists: restore it, pass "
            "model= and processor= to RetrievalIndex.load, or rebuild the index"
        )


def model_label(info: dict[str, Any]) -> str:
    name = info.get("name_or_path") or "<a model built in code>"
    revision = f"@{info['revision']}" if info.get("revision") else ""
    return f"{info.get('class', 'model')} {name}{revision} (weights sha256 {info['weights_sha256'][:12]})"
